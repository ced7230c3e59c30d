// Every op of the `fastsae` namespace is declared here, once, so the op set is visible in one
// place. Kernels are registered per device next to their implementation
// (TORCH_LIBRARY_IMPL(fastsae, CPU, m) in csrc/<family>.cpp); fake (meta) kernels and autograd
// are registered from Python in fastsae/ops/cpp.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastsae._C from Python loads this shared object, which runs the static
// TORCH_LIBRARY initialisers below. The module itself is empty: ops are reached through
// torch.ops.fastsae.*, so there is no pybind11 and the limited Python API suffices.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastsae, m) {
  // x_hat[b] = sum_j values[b, j] * W_dec[indices[b, j]] (+ b_dec)
  m.def("sparse_decode(Tensor values, Tensor indices, Tensor W_dec, Tensor? b_dec) -> Tensor");
}
