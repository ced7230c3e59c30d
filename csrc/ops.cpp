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

  // Fused sparse SAE training forwards (csrc/sae.cpp): encoder GEMM in row slabs, compaction into CSR
  // by row of the entries the backward needs (JumpReLU: active ∪ window; TopK: k per row; BatchTopK: the
  // batch's B·k largest; ReLU: pre > 0; Gated: open gates), and the sparse decode.
  // straight_through (reference.py's ste_to_input): the backward adds K·((θ/ε)·∂L/∂f + (1/ε)·∂L/∂l0) to ∂L/∂pre at
  // window entries (∂f/∂pre += (θ/ε)K, ∂H/∂pre := (1/ε)K).
  m.def("jumprelu_sae(Tensor x, Tensor W_enc, Tensor b_enc, Tensor W_dec, Tensor b_dec, Tensor threshold, "
        "Tensor bandwidth, bool apply_b_dec_to_input, bool straight_through=False) -> (Tensor x_hat, Tensor l0, "
        "Tensor fired, "
        "Tensor row_ptr, Tensor cols, Tensor values, Tensor flags)");
  m.def("topk_sae(Tensor x, Tensor W_enc, Tensor b_enc, Tensor W_dec, Tensor b_dec, int k, "
        "bool apply_b_dec_to_input) -> (Tensor x_hat, Tensor values, Tensor indices, Tensor l0, Tensor fired)");
  // bound_hint: a guess below the batch's B·k-th value (speed only: the selection is exact whatever it is).
  m.def("batchtopk_sae(Tensor x, Tensor W_enc, Tensor b_enc, Tensor W_dec, Tensor b_dec, int k, "
        "bool apply_b_dec_to_input, float bound_hint=0.0) -> (Tensor x_hat, Tensor l0, Tensor fired, "
        "Tensor row_ptr, Tensor cols, Tensor values, Tensor min_kept)");
  m.def("relu_sae(Tensor x, Tensor W_enc, Tensor b_enc, Tensor W_dec, Tensor b_dec, Tensor latent_weight, "
        "bool apply_b_dec_to_input) -> (Tensor x_hat, Tensor sparsity, Tensor l0, Tensor fired, Tensor row_ptr, "
        "Tensor cols, Tensor values)");
  m.def("gated_sae(Tensor x, Tensor W_gate, Tensor b_gate, Tensor r_mag, Tensor b_mag, Tensor W_dec, Tensor b_dec, "
        "bool apply_b_dec_to_input) -> (Tensor x_hat, Tensor x_hat_frozen, Tensor sparsity, Tensor l0, "
        "Tensor fired, Tensor row_ptr, Tensor cols, Tensor values, Tensor gate_values)");
  // Their backwards from the CSR entries (csrc/backward.h: SDDMM fused with the per-latent scatter-adds).
  m.def("sparse_sae_backward(Tensor grad_x_hat, Tensor? grad_l0, Tensor? grad_values, Tensor x, Tensor W_enc, "
        "Tensor W_dec, Tensor b_dec, bool apply_b_dec_to_input, Tensor row_ptr, Tensor cols, Tensor values, "
        "Tensor? flags, Tensor? threshold, Tensor? bandwidth, bool straight_through=False) -> (Tensor grad_W_enc, "
        "Tensor grad_b_enc, Tensor grad_W_dec, Tensor grad_b_dec, Tensor grad_threshold)");
  m.def("relu_sae_backward(Tensor grad_x_hat, Tensor? grad_sparsity, Tensor x, Tensor W_enc, Tensor W_dec, "
        "Tensor b_dec, Tensor latent_weight, bool apply_b_dec_to_input, Tensor row_ptr, Tensor cols, "
        "Tensor values) -> (Tensor grad_W_enc, Tensor grad_b_enc, Tensor grad_W_dec, Tensor grad_b_dec, "
        "Tensor grad_latent_weight)");
  m.def("gated_sae_backward(Tensor grad_x_hat, Tensor? grad_x_hat_frozen, Tensor? grad_sparsity, Tensor x, "
        "Tensor W_gate, Tensor r_mag, Tensor b_mag, Tensor W_dec, Tensor b_dec, bool apply_b_dec_to_input, "
        "Tensor row_ptr, Tensor cols, Tensor values) -> (Tensor grad_W_gate, Tensor grad_b_gate, "
        "Tensor grad_r_mag, Tensor grad_b_mag, Tensor grad_W_dec, Tensor grad_b_dec)");

  // The same steps for the dense phase of a run (csrc/sae_dense.cpp): the eager GEMMs with fused
  // elementwise passes; `entries` counts what the sparse ops would keep (the dispatcher's density).
  m.def("jumprelu_sae_dense(Tensor x, Tensor W_enc, Tensor b_enc, Tensor W_dec, Tensor b_dec, Tensor threshold, "
        "Tensor bandwidth, bool apply_b_dec_to_input, bool straight_through=False) -> (Tensor x_hat, Tensor l0, "
        "Tensor fired, Tensor entries, "
        "Tensor pre, Tensor f)");
  m.def("jumprelu_sae_dense_backward(Tensor grad_x_hat, Tensor? grad_l0, Tensor? grad_f, Tensor x, Tensor W_enc, "
        "Tensor W_dec, Tensor b_dec, bool apply_b_dec_to_input, Tensor pre, Tensor f, Tensor threshold, "
        "Tensor bandwidth, bool straight_through=False) -> (Tensor grad_W_enc, Tensor grad_b_enc, "
        "Tensor grad_W_dec, Tensor grad_b_dec, Tensor grad_threshold)");
  m.def("relu_sae_dense(Tensor x, Tensor W_enc, Tensor b_enc, Tensor W_dec, Tensor b_dec, Tensor latent_weight, "
        "bool apply_b_dec_to_input) -> (Tensor x_hat, Tensor sparsity, Tensor l0, Tensor fired, Tensor entries, "
        "Tensor f)");
  m.def("relu_sae_dense_backward(Tensor grad_x_hat, Tensor? grad_sparsity, Tensor x, Tensor W_enc, Tensor W_dec, "
        "Tensor b_dec, Tensor latent_weight, bool apply_b_dec_to_input, Tensor f) -> (Tensor grad_W_enc, "
        "Tensor grad_b_enc, Tensor grad_W_dec, Tensor grad_b_dec, Tensor grad_latent_weight)");
  m.def("gated_sae_dense(Tensor x, Tensor W_gate, Tensor b_gate, Tensor r_mag, Tensor b_mag, Tensor W_dec, "
        "Tensor b_dec, bool apply_b_dec_to_input) -> (Tensor x_hat, Tensor x_hat_frozen, Tensor sparsity, "
        "Tensor l0, Tensor fired, Tensor entries, Tensor f, Tensor gate)");
  m.def("gated_sae_dense_backward(Tensor grad_x_hat, Tensor? grad_x_hat_frozen, Tensor? grad_sparsity, Tensor x, "
        "Tensor W_gate, Tensor r_mag, Tensor b_mag, Tensor W_dec, Tensor b_dec, bool apply_b_dec_to_input, "
        "Tensor f, Tensor gate) -> (Tensor grad_W_gate, Tensor grad_b_gate, Tensor grad_r_mag, Tensor grad_b_mag, "
        "Tensor grad_W_dec, Tensor grad_b_dec)");

  // Inference encoders (csrc/encode.cpp): dense f, or padded (values, indices) and, with W_dec, x_hat.
  m.def("threshold_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor b_dec, Tensor threshold, "
        "bool apply_b_dec_to_input, Tensor? W_dec, bool dense) -> (Tensor values, Tensor indices, Tensor x_hat)");
  m.def("gated_encode(Tensor x, Tensor W_gate, Tensor b_gate, Tensor r_mag, Tensor b_mag, Tensor b_dec, "
        "bool apply_b_dec_to_input, Tensor? W_dec, bool dense) -> (Tensor values, Tensor indices, Tensor x_hat)");
  m.def("topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor b_dec, int k, bool apply_b_dec_to_input, "
        "Tensor? W_dec, bool dense) -> (Tensor values, Tensor indices, Tensor x_hat)");
  m.def("batchtopk_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor b_dec, int k, bool apply_b_dec_to_input, "
        "Tensor? W_dec, bool dense) -> (Tensor values, Tensor indices, Tensor x_hat)");
}
