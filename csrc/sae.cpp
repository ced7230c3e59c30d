// Fused sparse SAE training steps (DESIGN.md §2): the only dense [B, d_sae] work is the encoder
// GEMM, run in row slabs that stay in cache; each slab is immediately compacted into a CSR list of
// the entries the backward needs, and nothing of size [B, d_sae] survives the forward.
//
//   JumpReLU: entries = active ∪ window (|pre - θ| < ε/2). An inactive window entry carries value 0,
//             so decode skips it, but the backward still computes ∂L/∂f there for the θ-gradient.
//   TopK:     entries = the k selected latents of each row (relu'd values).
//
// Backward (sparse_sae_backward): SDDMM ∂L/∂f_e = grad_x_hat[b] · W_dec[j] at every entry, then the
// entries are regrouped by latent (counting sort) so grad_W_dec rows, grad_W_enc columns, grad_b_enc
// and grad_θ are each reduced by one thread in a fixed order: no atomics, and the same bits for any
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "common.h"
#include "topk.h"

namespace fastsae {

namespace {

constexpr uint8_t kActive = 1;  // pre > θ: f = pre, gradient reaches the encoder
constexpr uint8_t kWindow = 2;  // |pre - θ| / ε < 1/2: the θ pseudo-derivatives are nonzero

struct SaeDims {
  int64_t B, d_in, d_sae;
};

SaeDims check_sae_args(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                       const at::Tensor& W_dec, const at::Tensor& b_dec, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [B, d_in], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point");
  const int64_t B = x.size(0), d_in = x.size(1);
  TORCH_CHECK(W_enc.dim() == 2 && W_enc.size(0) == d_in, op, ": W_enc must be [d_in=", d_in, ", d_sae], got ",
              W_enc.sizes());
  const int64_t d_sae = W_enc.size(1);
  check_vector(b_enc, d_sae, op, "b_enc");
  TORCH_CHECK(W_dec.dim() == 2 && W_dec.size(0) == d_sae && W_dec.size(1) == d_in, op, ": W_dec must be [", d_sae,
              ", ", d_in, "], got ", W_dec.sizes());
  check_vector(b_dec, d_in, op, "b_dec");
  check_same_dtype(W_enc, x, op, "W_enc", "x");
  check_same_dtype(b_enc, x, op, "b_enc", "x");
  check_same_dtype(W_dec, x, op, "W_dec", "x");
  check_same_dtype(b_dec, x, op, "b_dec", "x");
  return {B, d_in, d_sae};
}

at::Tensor encoder_input(const at::Tensor& x, const at::Tensor& b_dec, bool apply_b_dec_to_input) {
  return apply_b_dec_to_input ? at::sub(x, b_dec).contiguous() : x.contiguous();
}

// Threshold/bandwidth in the wide dtype, with the kernel's own check that ε > 0 (a NaN or
// non-positive ε would break the candidate pre-filter below).
std::pair<at::Tensor, at::Tensor> latent_params(const at::Tensor& threshold, const at::Tensor& bandwidth,
                                                int64_t d_sae, at::ScalarType compute, const char* op) {
  check_vector(threshold, d_sae, op, "threshold");
  check_vector(bandwidth, d_sae, op, "bandwidth");
  TORCH_CHECK(at::isFloatingType(threshold.scalar_type()) && at::isFloatingType(bandwidth.scalar_type()), op,
              ": threshold and bandwidth must be floating point");
  const auto wide = wide_type(compute, threshold.scalar_type());
  auto th = threshold.to(wide).contiguous();
  auto eps = bandwidth.to(wide).contiguous();
  TORCH_CHECK(d_sae == 0 || eps.gt(0).all().item<bool>(), op, ": bandwidth must be > 0 everywhere");
  return {th, eps};
}

// x_hat[b] = b_dec + Σ_{e in row b} vals[e] · W_dec[cols[e]]
template <typename scalar_t>
void decode_rows(int64_t B, int64_t d_in, const int64_t* row_ptr, const int64_t* cols, const scalar_t* vals,
                 const scalar_t* W, const scalar_t* bias, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  parallel_tasks(B, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d_in);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < d_in; ++i) acc[i] = static_cast<acc_t>(bias[i]);
      for (int64_t e = row_ptr[b]; e < row_ptr[b + 1]; ++e) {
        const acc_t a = static_cast<acc_t>(vals[e]);
        if (a == acc_t(0)) continue;  // inactive window entries
        axpy<scalar_t, acc_t>(acc.data(), a, W + cols[e] * d_in, d_in);
      }
      for (int64_t i = 0; i < d_in; ++i) out[b * d_in + i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

// Σ a[i]·b[i] with b already in the accumulation type (float32: the multi-ISA dot).
template <typename scalar_t, typename acc_t>
acc_t dot_mixed(const scalar_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<acc_t>(a[i]) * b[i];
  return s;
}
template <>
float dot_mixed<float, float>(const float* a, const float* b, int64_t n) {
  return dot_f32(a, b, n);
}

template <typename T>
at::Tensor vector_to_tensor(const std::vector<T>& v, const at::TensorOptions& opt) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, opt);
  if (!v.empty()) std::memcpy(t.data_ptr(), v.data(), v.size() * sizeof(T));
  return t;
}

}  // namespace

// (x_hat [B, d_in], l0 [B] float32, fired [d_sae] bool, row_ptr [B+1], cols [nnz], values [nnz], flags [nnz] uint8)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> jumprelu_sae_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& W_dec,
    const at::Tensor& b_dec, const at::Tensor& threshold, const at::Tensor& bandwidth, bool apply_b_dec_to_input) {
  const char* op = "jumprelu_sae";
  const SaeDims D = check_sae_args(x, W_enc, b_enc, W_dec, b_dec, op);
  const int64_t B = D.B, d_in = D.d_in, d_sae = D.d_sae;
  auto [th, eps] = latent_params(threshold, bandwidth, d_sae, x.scalar_type(), op);
  auto x_in = encoder_input(x, b_dec, apply_b_dec_to_input);
  auto Wd = W_dec.contiguous();
  auto bd = b_dec.contiguous();
  const auto opt = x.options();
  auto row_ptr = at::empty({B + 1}, opt.dtype(at::kLong));
  auto l0 = at::empty({B}, opt.dtype(at::kFloat));
  auto fired = at::zeros({d_sae}, opt.dtype(at::kBool));
  auto x_hat = at::empty({B, d_in}, opt);
  at::Tensor cols_t, vals_t, flags_t;

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "jumprelu_sae", [&] {
    auto body = [&](auto wide_tag) {
      using wide_t = decltype(wide_tag);
      const wide_t* tp = th.data_ptr<wide_t>();
      const wide_t* ep = eps.data_ptr<wide_t>();
      // A cheap superset test: every active or window entry has pre >= θ - ε (the window is ε/2
      // wide), so the exact (division) test runs only on the few entries that pass it.
      std::vector<wide_t> lo(d_sae);
      for (int64_t j = 0; j < d_sae; ++j) lo[j] = tp[j] - ep[j];
      int64_t* rp = row_ptr.data_ptr<int64_t>();
      float* l0p = l0.data_ptr<float>();
      rp[0] = 0;
      std::vector<int64_t> cols;
      std::vector<scalar_t> vals;
      std::vector<uint8_t> flags;
      const int64_t chunk = encode_chunk_rows(B, d_sae);
      auto slab = at::empty({chunk, d_sae}, opt);
      // One scan per row: candidate test, exact test on the few candidates, entry list kept per
      // row (column << 2 | flags); then the row lists are concatenated into the CSR arrays.
      std::vector<std::vector<int64_t>> row_entries(chunk);
      for (int64_t r0 = 0; r0 < B; r0 += chunk) {
        const int64_t rows = std::min(chunk, B - r0);
        auto pre = slab.narrow(0, 0, rows);
        at::addmm_out(pre, b_enc, x_in.narrow(0, r0, rows), W_enc);
        const scalar_t* pp = pre.data_ptr<scalar_t>();
        parallel_tasks(rows, 16, [&](int64_t begin, int64_t end) {
          std::vector<int64_t> cand(d_sae);
          for (int64_t r = begin; r < end; ++r) {
            const scalar_t* row = pp + r * d_sae;
            int64_t nc = 0;
            for (int64_t j = 0; j < d_sae; ++j) {  // branch-free compaction of the candidates
              cand[nc] = j;
              nc += static_cast<wide_t>(row[j]) >= lo[j];
            }
            auto& out = row_entries[r];
            out.clear();
            int64_t act = 0;
            for (int64_t c = 0; c < nc; ++c) {
              const int64_t j = cand[c];
              const wide_t v = static_cast<wide_t>(row[j]);
              const bool a = v > tp[j];
              const wide_t u = (v - tp[j]) / ep[j];
              const bool w = u > wide_t(-0.5) && u < wide_t(0.5);
              if (!(a || w)) continue;
              out.push_back((j << 2) | (a ? kActive : 0) | (w ? kWindow : 0));
              act += a;
            }
            l0p[r0 + r] = static_cast<float>(act);
          }
        });
        const int64_t base = static_cast<int64_t>(cols.size());
        int64_t total = base;
        for (int64_t r = 0; r < rows; ++r) {
          total += static_cast<int64_t>(row_entries[r].size());
          rp[r0 + r + 1] = total;
        }
        cols.resize(total);
        vals.resize(total);
        flags.resize(total);
        parallel_tasks(rows, 32, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const scalar_t* row = pp + r * d_sae;
            int64_t e = rp[r0 + r];
            for (const int64_t packed : row_entries[r]) {
              const int64_t j = packed >> 2;
              const uint8_t f = static_cast<uint8_t>(packed & 3);
              cols[e] = j;
              vals[e] = (f & kActive) ? row[j] : scalar_t(0);
              flags[e] = f;
              ++e;
            }
          }
        });
      }
      bool* fp = fired.data_ptr<bool>();
      for (size_t e = 0; e < cols.size(); ++e)
        if (flags[e] & kActive) fp[cols[e]] = true;
      cols_t = vector_to_tensor(cols, opt.dtype(at::kLong));
      vals_t = vector_to_tensor(vals, opt);
      flags_t = vector_to_tensor(flags, opt.dtype(at::kByte));
      decode_rows<scalar_t>(B, d_in, rp, cols_t.data_ptr<int64_t>(), vals_t.data_ptr<scalar_t>(),
                            Wd.data_ptr<scalar_t>(), bd.data_ptr<scalar_t>(), x_hat.data_ptr<scalar_t>());
    };
    if (th.scalar_type() == at::kDouble)
      body(double{});
    else
      body(float{});
  });
  return {x_hat, l0, fired, row_ptr, cols_t, vals_t, flags_t};
}

// (x_hat [B, d_in], values [B, k], indices [B, k], l0 [B] float32, fired [d_sae] bool)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_sae_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& W_dec,
    const at::Tensor& b_dec, int64_t k, bool apply_b_dec_to_input) {
  const char* op = "topk_sae";
  const SaeDims D = check_sae_args(x, W_enc, b_enc, W_dec, b_dec, op);
  const int64_t B = D.B, d_in = D.d_in, d_sae = D.d_sae;
  TORCH_CHECK(k >= 1 && k <= d_sae, op, ": k must lie in 1..d_sae=", d_sae, ", got ", k);
  auto x_in = encoder_input(x, b_dec, apply_b_dec_to_input);
  auto Wd = W_dec.contiguous();
  auto bd = b_dec.contiguous();
  const auto opt = x.options();
  auto values = at::empty({B, k}, opt);
  auto indices = at::empty({B, k}, opt.dtype(at::kLong));
  auto l0 = at::empty({B}, opt.dtype(at::kFloat));
  auto fired = at::zeros({d_sae}, opt.dtype(at::kBool));
  auto x_hat = at::empty({B, d_in}, opt);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "topk_sae", [&] {
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    float* l0p = l0.data_ptr<float>();
    const int64_t chunk = encode_chunk_rows(B, d_sae);
    auto slab = at::empty({chunk, d_sae}, opt);
    for (int64_t r0 = 0; r0 < B; r0 += chunk) {
      const int64_t rows = std::min(chunk, B - r0);
      auto pre = slab.narrow(0, 0, rows);
      at::addmm_out(pre, b_enc, x_in.narrow(0, r0, rows), W_enc);
      const scalar_t* pp = pre.data_ptr<scalar_t>();
      parallel_tasks(rows, 16, [&](int64_t begin, int64_t end) {
        TopK<scalar_t> sel(k);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r0 + r;
          sel.run(pp + r * d_sae, d_sae, vp + b * k, ip + b * k);
          // relu after selection: the k largest of relu(pre) are relu of the k largest of pre.
          int64_t act = 0;
          for (int64_t j = 0; j < k; ++j) {
            scalar_t& v = vp[b * k + j];
            if (v < scalar_t(0)) v = scalar_t(0);
            act += v > scalar_t(0);
          }
          l0p[b] = static_cast<float>(act);
        }
      });
    }
    bool* fp = fired.data_ptr<bool>();
    for (int64_t e = 0; e < B * k; ++e)
      if (vp[e] > scalar_t(0)) fp[ip[e]] = true;
    std::vector<int64_t> rp(B + 1);
    for (int64_t b = 0; b <= B; ++b) rp[b] = b * k;
    decode_rows<scalar_t>(B, d_in, rp.data(), ip, vp, Wd.data_ptr<scalar_t>(), bd.data_ptr<scalar_t>(),
                          x_hat.data_ptr<scalar_t>());
  });
  return {x_hat, values, indices, l0, fired};
}

// Gradients of a sparse SAE forward given its CSR entries.
// JumpReLU (flags given): g_pre = ∂L/∂f at active entries; grad_θ_j = Σ_window -(θ_j/ε_j) ∂L/∂f - (1/ε_j) ∂L/∂l0_b.
// TopK (flags absent): g_pre = (∂L/∂f + grad_values) at entries with value > 0 (relu).
// Returns (grad_W_enc [d_in, d_sae], grad_b_enc [d_sae], grad_W_dec [d_sae, d_in], grad_b_dec [d_in],
//          grad_threshold [d_sae] in threshold's dtype, or [0] without flags).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_sae_backward_cpu(
    const at::Tensor& grad_x_hat, const std::optional<at::Tensor>& grad_l0,
    const std::optional<at::Tensor>& grad_values, const at::Tensor& x, const at::Tensor& W_enc,
    const at::Tensor& W_dec, const at::Tensor& b_dec, bool apply_b_dec_to_input, const at::Tensor& row_ptr,
    const at::Tensor& cols, const at::Tensor& values, const std::optional<at::Tensor>& flags,
    const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& bandwidth) {
  const char* op = "sparse_sae_backward";
  TORCH_CHECK(x.dim() == 2 && W_enc.dim() == 2, op, ": x must be [B, d_in] and W_enc [d_in, d_sae]");
  const int64_t B = x.size(0), d_in = x.size(1), d_sae = W_enc.size(1);
  TORCH_CHECK(W_enc.size(0) == d_in, op, ": W_enc must be [d_in=", d_in, ", d_sae], got ", W_enc.sizes());
  TORCH_CHECK(W_dec.dim() == 2 && W_dec.size(0) == d_sae && W_dec.size(1) == d_in, op, ": W_dec must be [", d_sae,
              ", ", d_in, "], got ", W_dec.sizes());
  check_vector(b_dec, d_in, op, "b_dec");
  TORCH_CHECK(grad_x_hat.dim() == 2 && grad_x_hat.size(0) == B && grad_x_hat.size(1) == d_in, op,
              ": grad_x_hat must be [", B, ", ", d_in, "], got ", grad_x_hat.sizes());
  for (const auto* t : {&W_enc, &W_dec, &b_dec, &grad_x_hat, &values}) check_same_dtype(*t, x, op, "tensor", "x");
  TORCH_CHECK(cols.dim() == 1 && cols.scalar_type() == at::kLong, op, ": cols must be a 1-D int64 tensor");
  const int64_t nnz = cols.size(0);
  check_vector(values, nnz, op, "values");
  auto rp_t = row_ptr.contiguous();
  check_row_ptr(rp_t, B, nnz, op);
  auto cols_c = cols.contiguous();
  check_index_range(cols_c, d_sae, op, "cols");
  const bool jump = flags.has_value();
  at::Tensor fl, gl0, gv, th, eps;
  if (jump) {
    TORCH_CHECK(threshold.has_value() && bandwidth.has_value(), op, ": flags need threshold and bandwidth");
    check_vector(*flags, nnz, op, "flags");
    TORCH_CHECK(flags->scalar_type() == at::kByte, op, ": flags must be uint8");
    fl = flags->contiguous();
    std::tie(th, eps) = latent_params(*threshold, *bandwidth, d_sae, x.scalar_type(), op);
    if (grad_l0.has_value()) {
      check_vector(*grad_l0, B, op, "grad_l0");
      gl0 = grad_l0->to(th.scalar_type()).contiguous();
    }
  } else if (grad_values.has_value()) {
    check_vector(*grad_values, nnz, op, "grad_values");
    gv = grad_values->to(x.scalar_type()).contiguous();
  }
  auto x_in = encoder_input(x, b_dec, apply_b_dec_to_input);
  auto gx = grad_x_hat.contiguous();
  auto Wd = W_dec.contiguous();
  auto We = W_enc.contiguous();
  auto vals = values.contiguous();
  const auto opt = x.options();
  auto grad_W_enc = at::empty({d_in, d_sae}, opt);
  auto grad_b_enc = at::empty({d_sae}, opt);
  auto grad_W_dec = at::empty({d_sae, d_in}, opt);
  auto grad_b_dec = at::empty({d_in}, opt);
  at::Tensor grad_th = jump ? at::empty({d_sae}, th.options()) : at::empty({0}, opt);

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "sparse_sae_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto body = [&](auto wide_tag) {
      using wide_t = decltype(wide_tag);
      const int64_t* rp = rp_t.data_ptr<int64_t>();
      const int64_t* cp = cols_c.data_ptr<int64_t>();
      const scalar_t* vp = vals.data_ptr<scalar_t>();
      const scalar_t* gxp = gx.data_ptr<scalar_t>();
      const scalar_t* Wdp = Wd.data_ptr<scalar_t>();
      const scalar_t* xp = x_in.data_ptr<scalar_t>();
      const uint8_t* fp = jump ? fl.data_ptr<uint8_t>() : nullptr;
      const wide_t* tp = jump ? th.data_ptr<wide_t>() : nullptr;
      const wide_t* ep = jump ? eps.data_ptr<wide_t>() : nullptr;
      const wide_t* gl0p = gl0.defined() ? gl0.data_ptr<wide_t>() : nullptr;
      const scalar_t* gvp = gv.defined() ? gv.data_ptr<scalar_t>() : nullptr;

      // 1. Per entry: SDDMM, encoder gradient g_pre, θ term. Also each entry's row.
      // Per-entry buffers come from the ATen allocator, so memory profiles of a step include them.
      at::Tensor gpre_t = at::empty({nnz}, opt.dtype(c10::CppTypeToScalarType<acc_t>::value));
      at::Tensor gth_t = at::empty({jump ? nnz : 0}, opt.dtype(c10::CppTypeToScalarType<wide_t>::value));
      at::Tensor row_of_t = at::empty({nnz}, opt.dtype(at::kLong));
      acc_t* gpre = gpre_t.data_ptr<acc_t>();
      wide_t* gth = gth_t.data_ptr<wide_t>();
      int64_t* row_of = row_of_t.data_ptr<int64_t>();
      parallel_tasks(B, 16, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* g = gxp + b * d_in;
          for (int64_t e = rp[b]; e < rp[b + 1]; ++e) {
            row_of[e] = b;
            const int64_t j = cp[e];
            if (jump) {
              const acc_t gf = dot<scalar_t, acc_t>(g, Wdp + j * d_in, d_in);
              gpre[e] = (fp[e] & kActive) ? gf : acc_t(0);
              wide_t t = 0;
              if (fp[e] & kWindow) {
                t = -(tp[j] / ep[j]) * static_cast<wide_t>(gf);
                if (gl0p) t -= (wide_t(1) / ep[j]) * gl0p[b];
              }
              gth[e] = t;
            } else if (vp[e] > scalar_t(0)) {
              acc_t gf = dot<scalar_t, acc_t>(g, Wdp + j * d_in, d_in);
              if (gvp) gf += static_cast<acc_t>(gvp[e]);
              gpre[e] = gf;
            } else {
              gpre[e] = acc_t(0);  // relu'd away: no gradient reaches pre
            }
          }
        }
      });

      // 2. Regroup by latent; 3. per-latent reductions, LB latents per task so grad_W_enc (stored
      // [d_in, d_sae]) is written in contiguous runs of LB instead of one element per cache line.
      const ByLatent by = group_by_latent(cp, nnz, d_sae);
      constexpr int64_t LB = 16;
      const int64_t nblocks = (d_sae + LB - 1) / LB;
      scalar_t* gWe = grad_W_enc.data_ptr<scalar_t>();
      scalar_t* gWd = grad_W_dec.data_ptr<scalar_t>();
      scalar_t* gbe = grad_b_enc.data_ptr<scalar_t>();
      wide_t* gthp = jump ? grad_th.data_ptr<wide_t>() : nullptr;
      std::vector<acc_t> gbe_acc(d_sae);
      parallel_tasks(nblocks, 4, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> encT(LB * d_in);
        std::vector<acc_t> dec(d_in);
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t j0 = blk * LB, j1 = std::min(d_sae, j0 + LB);
          std::fill(encT.begin(), encT.end(), acc_t(0));
          for (int64_t j = j0; j < j1; ++j) {
            std::fill(dec.begin(), dec.end(), acc_t(0));
            acc_t* enc = encT.data() + (j - j0) * d_in;
            acc_t sb = 0;
            wide_t st = 0;
            for (int64_t s = by.start[j]; s < by.start[j + 1]; ++s) {
              const int64_t e = by.entry[s];
              const int64_t b = row_of[e];
              const acc_t v = static_cast<acc_t>(vp[e]);
              if (v != acc_t(0)) axpy<scalar_t, acc_t>(dec.data(), v, gxp + b * d_in, d_in);
              const acc_t g = gpre[e];
              if (g != acc_t(0)) axpy<scalar_t, acc_t>(enc, g, xp + b * d_in, d_in);
              sb += g;
              if (jump) st += gth[e];
            }
            for (int64_t i = 0; i < d_in; ++i) gWd[j * d_in + i] = static_cast<scalar_t>(dec[i]);
            gbe_acc[j] = sb;
            gbe[j] = static_cast<scalar_t>(sb);
            if (jump) gthp[j] = st;
          }
          const int64_t nb = j1 - j0;
          for (int64_t i = 0; i < d_in; ++i) {
            scalar_t* dst = gWe + i * d_sae + j0;
            for (int64_t jj = 0; jj < nb; ++jj) dst[jj] = static_cast<scalar_t>(encT[jj * d_in + i]);
          }
        }
      });

      // 4. grad_b_dec = Σ_b grad_x_hat[b]  (- W_enc @ Σ_b g_pre_b when b_dec is subtracted from x),
      // each element reduced by one thread in a fixed order.
      scalar_t* gbd = grad_b_dec.data_ptr<scalar_t>();
      const scalar_t* Wep = We.data_ptr<scalar_t>();
      at::parallel_for(0, d_in, 16, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(end - begin, acc_t(0));
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = begin; i < end; ++i) acc[i - begin] += static_cast<acc_t>(gxp[b * d_in + i]);
        for (int64_t i = begin; i < end; ++i) {
          acc_t a = acc[i - begin];
          if (apply_b_dec_to_input) {
            const scalar_t* wrow = Wep + i * d_sae;
            a -= dot_mixed<scalar_t, acc_t>(wrow, gbe_acc.data(), d_sae);
          }
          gbd[i] = static_cast<scalar_t>(a);
        }
      });
    };
    if (jump && th.scalar_type() == at::kDouble)
      body(double{});
    else
      body(float{});
  });
  if (jump) grad_th = grad_th.to(threshold->scalar_type());
  return {grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, grad_th};
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("jumprelu_sae", &jumprelu_sae_cpu);
  m.impl("topk_sae", &topk_sae_cpu);
  m.impl("sparse_sae_backward", &sparse_sae_backward_cpu);
}

}  // namespace fastsae
