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
  // SDDMM grad of values and per-latent scatter-add grad of W_dec; an output not needed is [0].
  m.def("sparse_decode_backward(Tensor grad, Tensor values, Tensor indices, Tensor W_dec, bool need_values, "
        "bool need_W_dec) -> (Tensor, Tensor)");

  // Dense JumpReLU pre * H(pre - θ) and step H(pre - θ) (csrc/elementwise.cpp).
  m.def("jumprelu(Tensor pre, Tensor threshold, Tensor bandwidth) -> Tensor");
  m.def("step(Tensor pre, Tensor threshold, Tensor bandwidth) -> Tensor");
  // (grad_pre, grad_threshold) with the rectangle-kernel pseudo-derivatives; [0] where not needed.
  m.def("jumprelu_backward(Tensor grad, Tensor pre, Tensor threshold, Tensor bandwidth, bool is_step, "
        "bool need_pre, bool need_threshold) -> (Tensor, Tensor)");

  // Row-wise top-k of pre [rows, d_sae], sorted descending (csrc/topk.cpp).
  m.def("topk(Tensor pre, int k) -> (Tensor values, Tensor indices)");
  m.def("topk_backward(Tensor grad_values, Tensor indices, int d_sae) -> Tensor");

  // Fused sparse SAE forward passes (csrc/sae.cpp): encoder GEMM in row slabs, compaction
  // (JumpReLU: active ∪ window entries as CSR by row; TopK: k entries per row), sparse decode.
  m.def("jumprelu_sae(Tensor x, Tensor W_enc, Tensor b_enc, Tensor W_dec, Tensor b_dec, Tensor threshold, "
        "Tensor bandwidth, bool apply_b_dec_to_input) -> (Tensor x_hat, Tensor l0, Tensor fired, "
        "Tensor row_ptr, Tensor cols, Tensor values, Tensor flags)");
  m.def("topk_sae(Tensor x, Tensor W_enc, Tensor b_enc, Tensor W_dec, Tensor b_dec, int k, "
        "bool apply_b_dec_to_input) -> (Tensor x_hat, Tensor values, Tensor indices, Tensor l0, Tensor fired)");
  // Their backward from the CSR entries: SDDMM, per-latent scatter-adds, θ-gradient.
  m.def("sparse_sae_backward(Tensor grad_x_hat, Tensor? grad_l0, Tensor? grad_values, Tensor x, Tensor W_enc, "
        "Tensor W_dec, Tensor b_dec, bool apply_b_dec_to_input, Tensor row_ptr, Tensor cols, Tensor values, "
        "Tensor? flags, Tensor? threshold, Tensor? bandwidth) -> (Tensor grad_W_enc, Tensor grad_b_enc, "
        "Tensor grad_W_dec, Tensor grad_b_dec, Tensor grad_threshold)");
}
