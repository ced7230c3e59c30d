// Dense formulations of the fused training steps, for the phase of a run where most latents fire (a
// fresh JumpReLU fires on about half of them; ReLU and Gated start dense too). There the compact
// entry lists would be larger than the dense tensors, so the step is the five (Gated: seven) GEMMs of
// the eager reference, with every elementwise stage fused into one pass after the encoder GEMM and
// one after ∂L/∂f = grad_x_hat · W_decᵀ — and the per-element gradients are the very formulas the
// sparse engine applies at its entries (csrc/backward.h), so both paths compute the same math.
// The dispatcher (fastsae/backends.py) picks this path from the previous step's density.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>
#include <type_traits>

#include "backward.h"
#include "common.h"
#include "encoder.h"

namespace fastsae {

namespace {

// f(begin, end) on row ranges; fired_task[j] |= ... is OR-ed into `fired` at the end of each task.
template <typename F>
void rows_with_fired(int64_t B, int64_t d_sae, bool* fired, F&& f) {
  std::mutex mu;
  parallel_tasks(B, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> local(d_sae, 0);
    f(begin, end, local.data());
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t j = 0; j < d_sae; ++j) fired[j] = fired[j] || local[j];
  });
}

// f(c0, c1) for blocks of latent columns: every per-latent reduction runs over the rows in order, in one task.
template <typename F>
void column_blocks(int64_t d_sae, F&& f) {
  constexpr int64_t CB = 256;
  parallel_tasks((d_sae + CB - 1) / CB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) f(blk * CB, std::min(d_sae, (blk + 1) * CB));
  });
}

// grad_W_enc = x_inᵀ·g and grad_W_dec = fᵀ·grad_x_hat, the dense backward's weight GEMMs, into recycled memory.
std::pair<at::Tensor, at::Tensor> dense_weight_grads(const at::Tensor& x_in, const at::Tensor& g, const at::Tensor& f,
                                                     const at::Tensor& gx) {
  const auto opt = gx.options();
  auto gWe = recycled_empty(kGradWEnc, {x_in.size(1), g.size(1)}, opt);
  auto gWd = recycled_empty(kGradWDec, {f.size(1), gx.size(1)}, opt);
  at::mm_out(gWe, x_in.t(), g);
  at::mm_out(gWd, f.t(), gx);
  return {gWe, gWd};
}

// ∂L/∂f = grad_x_hat · W_decᵀ [B, d_sae], into recycled memory.
at::Tensor grad_code(const BackwardInputs& in) {
  auto g = recycled_empty(kDenseGrad, {in.B, in.d_sae}, in.gx.options());
  at::mm_out(g, in.gx, in.W_dec.t());
  return g;
}

// ReLU's / Gated's dense backward pass (jump_math.h) for a block of columns: float32 through simd.cpp's clones.
template <typename scalar_t, typename acc_t>
void relu_grad_rows(const scalar_t* f, scalar_t* g, int64_t ld, int64_t rows, int64_t n, const acc_t* w,
                    const acc_t* gsp, acc_t* genc, acc_t* s_w) {
  relu_dense_grad_rows<scalar_t, acc_t>(f, g, ld, rows, n, w, gsp, genc, s_w);
}
void relu_grad_rows(const float* f, float* g, int64_t ld, int64_t rows, int64_t n, const float* w, const float* gsp,
                    float* genc, float* s_w) {
  relu_dense_grad_rows_f32(f, g, ld, rows, n, w, gsp, genc, s_w);
}
template <typename scalar_t, typename acc_t>
void gated_grad_rows(const scalar_t* f, const scalar_t* gate, const scalar_t* g2, scalar_t* g, int64_t ld,
                     int64_t rows, int64_t n, const acc_t* scale, const acc_t* b_mag, const acc_t* gsp, acc_t* genc,
                     acc_t* s_gate, acc_t* s_mag, acc_t* s_r) {
  gated_dense_grad_rows<scalar_t, acc_t>(f, gate, g2, g, ld, rows, n, scale, b_mag, gsp, genc, s_gate, s_mag, s_r);
}
void gated_grad_rows(const float* f, const float* gate, const float* g2, float* g, int64_t ld, int64_t rows,
                     int64_t n, const float* scale, const float* b_mag, const float* gsp, float* genc, float* s_gate,
                     float* s_mag, float* s_r) {
  gated_dense_grad_rows_f32(f, gate, g2, g, ld, rows, n, scale, b_mag, gsp, genc, s_gate, s_mag, s_r);
}

at::Tensor count_tensor(int64_t n, const at::TensorOptions& opt) { return at::full({}, n, opt.dtype(at::kLong)); }

template <typename scalar_t>
at::Tensor finish_grad_b_dec(const at::Tensor& gx, const at::Tensor& W_enc, const at::Tensor& genc,
                             bool apply_b_dec_to_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = gx.size(0), d_in = gx.size(1), d_sae = W_enc.size(1);
  auto out = at::empty({d_in}, gx.options());
  auto We = W_enc.contiguous();
  decoder_bias_grad<scalar_t>(B, d_in, d_sae, gx.data_ptr<scalar_t>(), We.data_ptr<scalar_t>(),
                              genc.data_ptr<acc_t>(), apply_b_dec_to_input, out.data_ptr<scalar_t>());
  return out;
}

}  // namespace

// (x_hat, l0, fired, entries = #(active ∪ window), pre, f)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> jumprelu_sae_dense_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& W_dec,
    const at::Tensor& b_dec, const at::Tensor& threshold, const at::Tensor& bandwidth, bool apply_b_dec_to_input,
    bool /*straight_through: used by the backward*/) {
  const char* op = "jumprelu_sae_dense";
  const SaeInputs in = prepare_sae(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_sae = in.d_sae;
  auto [th, eps] = latent_params(threshold, bandwidth, d_sae, x.scalar_type(), op);
  const at::Tensor& x_in = in.x_in;
  const auto opt = x.options();
  auto pre = recycled_empty(kDensePre, {B, d_sae}, opt);
  at::addmm_out(pre, b_enc, x_in, W_enc);
  auto f = recycled_empty(kDenseCode, {B, d_sae}, opt);
  auto l0 = at::empty({B}, opt.dtype(at::kFloat));
  auto fired = at::zeros({d_sae}, opt.dtype(at::kBool));
  std::atomic<int64_t> entries{0};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "jumprelu_sae_dense", [&] {
    dispatch_wide(th.scalar_type(), [&](auto wide_tag) {
      using wide_t = decltype(wide_tag);
      const wide_t* tp = th.data_ptr<wide_t>();
      const wide_t* ep = eps.data_ptr<wide_t>();
      const scalar_t* pp = pre.data_ptr<scalar_t>();
      scalar_t* fp = f.data_ptr<scalar_t>();
      float* l0p = l0.data_ptr<float>();
      rows_with_fired(B, d_sae, fired.data_ptr<bool>(), [&](int64_t begin, int64_t end, uint8_t* fired_local) {
        int64_t ent = 0;
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* row = pp + b * d_sae;
          scalar_t* out = fp + b * d_sae;
          int64_t act;
          if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<wide_t, float>)
            act = jump_dense_row_f32(row, tp, ep, d_sae, out, fired_local, &ent);
          else
            act = jump_dense_row<scalar_t, wide_t>(row, tp, ep, d_sae, out, fired_local, &ent);
          l0p[b] = static_cast<float>(act);
        }
        entries += ent;
      });
    });
  });
  auto x_hat = at::addmm(b_dec, f, W_dec);
  return {x_hat, l0, fired, count_tensor(entries, opt), pre, f};
}

// (grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, grad_threshold) of jumprelu_sae_dense; grad_f is a
// gradient reaching f directly (e.g. a penalty on the activations), added to grad_x_hat · W_decᵀ.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> jumprelu_sae_dense_backward_cpu(
    const at::Tensor& grad_x_hat, const std::optional<at::Tensor>& grad_l0, const std::optional<at::Tensor>& grad_f,
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& W_dec, const at::Tensor& b_dec,
    bool apply_b_dec_to_input, const at::Tensor& pre, const at::Tensor& f, const at::Tensor& threshold,
    const at::Tensor& bandwidth, bool straight_through) {
  const char* op = "jumprelu_sae_dense_backward";
  const BackwardInputs in = prepare_backward(grad_x_hat, x, W_enc, W_dec, b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_sae = in.d_sae;
  const at::Tensor &x_in = in.x_in, &gx = in.gx;
  TORCH_CHECK(pre.sizes() == f.sizes() && pre.dim() == 2 && pre.size(0) == B && pre.size(1) == d_sae, op,
              ": pre and f must be [", B, ", ", d_sae, "]");
  auto [th, eps] = latent_params(threshold, bandwidth, d_sae, x.scalar_type(), op);
  auto g = grad_code(in);  // ∂L/∂f, then ∂L/∂pre
  if (grad_f.has_value()) {
    TORCH_CHECK(grad_f->sizes() == g.sizes(), op, ": grad_f must be [", B, ", ", d_sae, "]");
    g.add_(*grad_f);
  }
  auto p = pre.contiguous();
  at::Tensor gbe, gth, genc;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "jumprelu_sae_dense_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_wide(th.scalar_type(), [&](auto wide_tag) {
      using wide_t = decltype(wide_tag);
      at::Tensor gl0;
      if (grad_l0.has_value()) {
        check_vector(*grad_l0, B, op, "grad_l0");
        gl0 = grad_l0->to(th.scalar_type()).contiguous();
      }
      const wide_t* gl0p = gl0.defined() ? gl0.data_ptr<wide_t>() : nullptr;
      const wide_t* tp = th.data_ptr<wide_t>();
      const wide_t* ep = eps.data_ptr<wide_t>();
      const scalar_t* pp = p.data_ptr<scalar_t>();
      scalar_t* gp = g.data_ptr<scalar_t>();
      genc = at::empty({d_sae}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      gth = at::empty({d_sae}, th.options());
      acc_t* gencp = genc.data_ptr<acc_t>();
      wide_t* gthp = gth.data_ptr<wide_t>();
      column_blocks(d_sae, [&](int64_t c0, int64_t c1) {
        std::vector<acc_t> sb(c1 - c0, acc_t(0));
        std::vector<wide_t> st(c1 - c0, wide_t(0));
        if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<wide_t, float>)
          jump_dense_grad_rows_f32(pp + c0, gp + c0, d_sae, B, c1 - c0, tp + c0, ep + c0, gl0p, straight_through,
                                   sb.data(), st.data());
        else
          jump_dense_grad_rows<scalar_t, acc_t, wide_t>(pp + c0, gp + c0, d_sae, B, c1 - c0, tp + c0, ep + c0, gl0p,
                                                        straight_through, sb.data(), st.data());
        for (int64_t j = c0; j < c1; ++j) {
          gencp[j] = sb[j - c0];
          gthp[j] = st[j - c0];
        }
      });
      gbe = genc.to(x.scalar_type());
    });
  });
  auto [gWe, gWd] = dense_weight_grads(x_in, g, f, gx);
  at::Tensor gbd;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "jumprelu_sae_dense_backward",
                                 [&] { gbd = finish_grad_b_dec<scalar_t>(gx, W_enc, genc, apply_b_dec_to_input); });
  return {gWe, gbe, gWd, gbd, gth.to(threshold.scalar_type())};
}

// (x_hat, sparsity [B] = Σ_j f_bj·w_j, l0, fired, entries = #(f > 0), f)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> relu_sae_dense_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& W_dec,
    const at::Tensor& b_dec, const at::Tensor& latent_weight, bool apply_b_dec_to_input) {
  const char* op = "relu_sae_dense";
  const SaeInputs in = prepare_sae(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_sae = in.d_sae;
  const at::Tensor& x_in = in.x_in;
  const auto opt = x.options();
  auto f = recycled_empty(kDensePre, {B, d_sae}, opt);  // relu'd in place
  at::addmm_out(f, b_enc, x_in, W_enc);
  auto l0 = at::empty({B}, opt.dtype(at::kFloat));
  auto sparsity = at::empty({B}, opt);
  auto fired = at::zeros({d_sae}, opt.dtype(at::kBool));
  std::atomic<int64_t> entries{0};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "relu_sae_dense", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto w_t = latent_vector(latent_weight, d_sae, c10::CppTypeToScalarType<acc_t>::value, op, "latent_weight");
    const acc_t* w = w_t.data_ptr<acc_t>();
    scalar_t* fp = f.data_ptr<scalar_t>();
    scalar_t* sp = sparsity.data_ptr<scalar_t>();
    float* l0p = l0.data_ptr<float>();
    rows_with_fired(B, d_sae, fired.data_ptr<bool>(), [&](int64_t begin, int64_t end, uint8_t* fired_local) {
      int64_t ent = 0;
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* row = fp + b * d_sae;
        acc_t s = 0;
        int64_t act = 0;
        for (int64_t j = 0; j < d_sae; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]);
          const bool a = v > acc_t(0);
          if (a) s += v * w[j];  // the sparse kernel's sum, term for term
          row[j] = a ? row[j] : scalar_t(0);
          act += a;
          fired_local[j] |= a;
        }
        sp[b] = static_cast<scalar_t>(s);
        l0p[b] = static_cast<float>(act);
        ent += act;
      }
      entries += ent;
    });
  });
  auto x_hat = at::addmm(b_dec, f, W_dec);
  return {x_hat, sparsity, l0, fired, count_tensor(entries, opt), f};
}

// (grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, grad_latent_weight) of relu_sae_dense.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> relu_sae_dense_backward_cpu(
    const at::Tensor& grad_x_hat, const std::optional<at::Tensor>& grad_sparsity, const at::Tensor& x,
    const at::Tensor& W_enc, const at::Tensor& W_dec, const at::Tensor& b_dec, const at::Tensor& latent_weight,
    bool apply_b_dec_to_input, const at::Tensor& f) {
  const char* op = "relu_sae_dense_backward";
  const BackwardInputs in = prepare_backward(grad_x_hat, x, W_enc, W_dec, b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_sae = in.d_sae;
  const at::Tensor &x_in = in.x_in, &gx = in.gx;
  TORCH_CHECK(f.dim() == 2 && f.size(0) == B && f.size(1) == d_sae, op, ": f must be [", B, ", ", d_sae, "]");
  auto g = grad_code(in);
  auto fc = f.contiguous();
  at::Tensor genc, gw;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "relu_sae_dense_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    auto w_t = latent_vector(latent_weight, d_sae, acc_type, op, "latent_weight");
    at::Tensor gsp;
    if (grad_sparsity.has_value()) {
      check_vector(*grad_sparsity, B, op, "grad_sparsity");
      gsp = grad_sparsity->to(acc_type).contiguous();
    }
    const acc_t* w = w_t.data_ptr<acc_t>();
    const acc_t* gspp = gsp.defined() ? gsp.data_ptr<acc_t>() : nullptr;
    const scalar_t* fp = fc.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    genc = at::empty({d_sae}, x.options().dtype(acc_type));
    gw = at::empty({d_sae}, x.options().dtype(acc_type));
    acc_t* gencp = genc.data_ptr<acc_t>();
    acc_t* gwp = gw.data_ptr<acc_t>();
    column_blocks(d_sae, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> sb(c1 - c0, acc_t(0)), sw(c1 - c0, acc_t(0));
      relu_grad_rows(fp + c0, gp + c0, d_sae, B, c1 - c0, w + c0, gspp, sb.data(), sw.data());
      for (int64_t j = c0; j < c1; ++j) {
        gencp[j] = sb[j - c0];
        gwp[j] = sw[j - c0];
      }
    });
  });
  auto [gWe, gWd] = dense_weight_grads(x_in, g, fc, gx);
  at::Tensor gbd;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "relu_sae_dense_backward",
                                 [&] { gbd = finish_grad_b_dec<scalar_t>(gx, W_enc, genc, apply_b_dec_to_input); });
  return {gWe, genc.to(x.scalar_type()), gWd, gbd, gw.to(latent_weight.scalar_type())};
}

// (x_hat, x_hat_frozen, sparsity [B] = Σ relu(π_gate), l0, fired, entries = #(open gates), f, gate = relu(π_gate))
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_sae_dense_cpu(const at::Tensor& x, const at::Tensor& W_gate, const at::Tensor& b_gate, const at::Tensor& r_mag,
                    const at::Tensor& b_mag, const at::Tensor& W_dec, const at::Tensor& b_dec,
                    bool apply_b_dec_to_input) {
  const char* op = "gated_sae_dense";
  const SaeInputs in = prepare_sae(x, W_gate, b_gate, W_dec, b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_sae = in.d_sae;
  check_gated(r_mag, b_mag, x, d_sae, op);
  const at::Tensor& x_in = in.x_in;
  const auto opt = x.options();
  auto gate = recycled_empty(kDensePre, {B, d_sae}, opt);  // z, then relu(π_gate)
  at::mm_out(gate, x_in, W_gate);
  auto f = recycled_empty(kDenseCode, {B, d_sae}, opt);
  auto l0 = at::empty({B}, opt.dtype(at::kFloat));
  auto sparsity = at::empty({B}, opt);
  auto fired = at::zeros({d_sae}, opt.dtype(at::kBool));
  std::atomic<int64_t> entries{0};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "gated_sae_dense", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto bg = b_gate.contiguous(), rm = r_mag.contiguous(), bm = b_mag.contiguous();
    const GatedSelect<acc_t> sel(bg.data_ptr<scalar_t>(), rm.data_ptr<scalar_t>(), bm.data_ptr<scalar_t>(), d_sae);
    scalar_t* zp = gate.data_ptr<scalar_t>();
    scalar_t* fp = f.data_ptr<scalar_t>();
    scalar_t* sp = sparsity.data_ptr<scalar_t>();
    float* l0p = l0.data_ptr<float>();
    rows_with_fired(B, d_sae, fired.data_ptr<bool>(), [&](int64_t begin, int64_t end, uint8_t* fired_local) {
      int64_t ent = 0;
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* zrow = zp + b * d_sae;
        scalar_t* frow = fp + b * d_sae;
        acc_t s = 0;
        int64_t act = 0;
        for (int64_t j = 0; j < d_sae; ++j) {
          const acc_t z = static_cast<acc_t>(zrow[j]);
          const bool on = sel.gate(z, j);
          const scalar_t fv = on ? static_cast<scalar_t>(sel.mag(z, j)) : scalar_t(0);
          const scalar_t q = on ? static_cast<scalar_t>(sel.pi_gate(z, j)) : scalar_t(0);
          frow[j] = fv;
          zrow[j] = q;
          if (on) s += static_cast<acc_t>(q);
          const bool a = static_cast<acc_t>(fv) > acc_t(0);
          act += a;
          ent += on;
          fired_local[j] |= a;
        }
        sp[b] = static_cast<scalar_t>(s);
        l0p[b] = static_cast<float>(act);
      }
      entries += ent;
    });
  });
  auto x_hat = at::addmm(b_dec, f, W_dec);
  auto x_hat_frozen = at::addmm(b_dec, gate, W_dec);
  return {x_hat, x_hat_frozen, sparsity, l0, fired, count_tensor(entries, opt), f, gate};
}

// (grad_W_gate, grad_b_gate, grad_r_mag, grad_b_mag, grad_W_dec, grad_b_dec) of gated_sae_dense.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_sae_dense_backward_cpu(
    const at::Tensor& grad_x_hat, const std::optional<at::Tensor>& grad_x_hat_frozen,
    const std::optional<at::Tensor>& grad_sparsity, const at::Tensor& x, const at::Tensor& W_gate,
    const at::Tensor& r_mag, const at::Tensor& b_mag, const at::Tensor& W_dec, const at::Tensor& b_dec,
    bool apply_b_dec_to_input, const at::Tensor& f, const at::Tensor& gate) {
  const char* op = "gated_sae_dense_backward";
  const BackwardInputs in = prepare_backward(grad_x_hat, x, W_gate, W_dec, b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_sae = in.d_sae;
  const at::Tensor &x_in = in.x_in, &gx = in.gx;
  TORCH_CHECK(f.sizes() == gate.sizes() && f.dim() == 2 && f.size(0) == B && f.size(1) == d_sae, op,
              ": f and gate must be [", B, ", ", d_sae, "]");
  check_gated(r_mag, b_mag, x, d_sae, op);
  auto g = grad_code(in);
  at::Tensor g2;
  if (grad_x_hat_frozen.has_value()) {
    TORCH_CHECK(grad_x_hat_frozen->sizes() == x.sizes(), op, ": grad_x_hat_frozen must have the shape of x");
    g2 = at::mm(grad_x_hat_frozen->to(x.scalar_type()), W_dec.t());
  }
  auto fc = f.contiguous(), qc = gate.contiguous();
  at::Tensor genc, scal;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "gated_sae_dense_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    auto scale = r_mag.to(acc_type).exp().contiguous();
    auto bm = b_mag.to(acc_type).contiguous();
    at::Tensor gsp;
    if (grad_sparsity.has_value()) {
      check_vector(*grad_sparsity, B, op, "grad_sparsity");
      gsp = grad_sparsity->to(acc_type).contiguous();
    }
    const acc_t* sc = scale.data_ptr<acc_t>();
    const acc_t* bmp = bm.data_ptr<acc_t>();
    const acc_t* gspp = gsp.defined() ? gsp.data_ptr<acc_t>() : nullptr;
    const scalar_t* fp = fc.data_ptr<scalar_t>();
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* g2p = g2.defined() ? g2.data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = g.data_ptr<scalar_t>();
    genc = at::empty({d_sae}, x.options().dtype(acc_type));
    scal = at::empty({3, d_sae}, x.options().dtype(acc_type));
    acc_t* gencp = genc.data_ptr<acc_t>();
    acc_t* sp = scal.data_ptr<acc_t>();
    column_blocks(d_sae, [&](int64_t c0, int64_t c1) {
      const int64_t n = c1 - c0;
      std::vector<acc_t> sb(n, acc_t(0)), s3(3 * n, acc_t(0));
      const scalar_t* g2c = g2p ? g2p + c0 : nullptr;
      gated_grad_rows(fp + c0, qp + c0, g2c, gp + c0, d_sae, B, n, sc + c0, bmp + c0, gspp, sb.data(), s3.data(),
                      s3.data() + n, s3.data() + 2 * n);
      for (int64_t j = c0; j < c1; ++j) {
        gencp[j] = sb[j - c0];
        for (int k = 0; k < 3; ++k) sp[k * d_sae + j] = s3[k * n + j - c0];
      }
    });
  });
  auto [gWe, gWd] = dense_weight_grads(x_in, g, fc, gx);
  at::Tensor gbd;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "gated_sae_dense_backward",
                                 [&] { gbd = finish_grad_b_dec<scalar_t>(gx, W_gate, genc, apply_b_dec_to_input); });
  const auto dt = x.scalar_type();
  return {gWe, own(scal[0], dt), own(scal[2], dt), own(scal[1], dt), gWd, gbd};
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("jumprelu_sae_dense", &jumprelu_sae_dense_cpu);
  m.impl("jumprelu_sae_dense_backward", &jumprelu_sae_dense_backward_cpu);
  m.impl("relu_sae_dense", &relu_sae_dense_cpu);
  m.impl("relu_sae_dense_backward", &relu_sae_dense_backward_cpu);
  m.impl("gated_sae_dense", &gated_sae_dense_cpu);
  m.impl("gated_sae_dense_backward", &gated_sae_dense_backward_cpu);
}

}  // namespace fastsae
