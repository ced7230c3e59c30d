#pragma once
// The encoder side shared by every fused op (training, dense, inference): the GEMM in row slabs,
// the per-latent parameters of each architecture's selection rule, the candidate pre-filter, the
// per-row entry lists that become CSR arrays, and the row decode.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace fastsae {

constexpr uint8_t kActive = 1;  // JumpReLU pre > θ / Gated π_gate > 0: the entry carries a value
constexpr uint8_t kWindow = 2;  // JumpReLU |pre - θ| / ε < 1/2: the θ pseudo-derivatives are nonzero

struct SaeDims {
  int64_t B, d_in, d_sae;
};

// b_enc and W_dec may be undefined (ops that take none).
inline SaeDims check_sae_args(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                              const at::Tensor& W_dec, const at::Tensor& b_dec, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [B, d_in], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point");
  const int64_t B = x.size(0), d_in = x.size(1);
  TORCH_CHECK(W_enc.dim() == 2 && W_enc.size(0) == d_in, op, ": W_enc must be [d_in=", d_in, ", d_sae], got ",
              W_enc.sizes());
  const int64_t d_sae = W_enc.size(1);
  if (b_enc.defined()) {
    check_vector(b_enc, d_sae, op, "b_enc");
    check_same_dtype(b_enc, x, op, "b_enc", "x");
  }
  if (W_dec.defined()) {
    TORCH_CHECK(W_dec.dim() == 2 && W_dec.size(0) == d_sae && W_dec.size(1) == d_in, op, ": W_dec must be [",
                d_sae, ", ", d_in, "], got ", W_dec.sizes());
    check_same_dtype(W_dec, x, op, "W_dec", "x");
  }
  check_vector(b_dec, d_in, op, "b_dec");
  check_same_dtype(W_enc, x, op, "W_enc", "x");
  check_same_dtype(b_dec, x, op, "b_dec", "x");
  return {B, d_in, d_sae};
}

inline at::Tensor encoder_input(const at::Tensor& x, const at::Tensor& b_dec, bool apply_b_dec_to_input) {
  return apply_b_dec_to_input ? at::sub(x, b_dec).contiguous() : x.contiguous();
}

// A per-latent vector in the given dtype, contiguous (θ, ε, the Gated scales).
inline at::Tensor latent_vector(const at::Tensor& t, int64_t d_sae, at::ScalarType dtype, const char* op,
                                const char* name) {
  check_vector(t, d_sae, op, name);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point");
  return t.to(dtype).contiguous();
}

// JumpReLU's θ and ε in the wide dtype, with the kernel's own check that ε > 0 (a NaN or
// non-positive ε would break the candidate pre-filter).
inline std::pair<at::Tensor, at::Tensor> latent_params(const at::Tensor& threshold, const at::Tensor& bandwidth,
                                                       int64_t d_sae, at::ScalarType compute, const char* op) {
  const auto wide = wide_type(compute, threshold.scalar_type());
  auto th = latent_vector(threshold, d_sae, wide, op, "threshold");
  auto eps = latent_vector(bandwidth, d_sae, wide, op, "bandwidth");
  TORCH_CHECK(d_sae == 0 || eps.gt(0).all().item<bool>(), op, ": bandwidth must be > 0 everywhere");
  return {th, eps};
}

// Calls f(wide_t{}) with wide_t = double when `t` is double, else float.
template <typename F>
void dispatch_wide(at::ScalarType t, F&& f) {
  if (t == at::kDouble)
    f(double{});
  else
    f(float{});
}

// The encoder GEMM of x_in [B, d_in] @ W [d_in, d_sae] (+ bias) in row slabs: f(r0, rows, pre) sees the
// [rows, d_sae] pre-activations of rows r0..r0+rows, contiguous, while they are in cache. With `target`
// the slabs are views of target's rows (the dense output of an inference encode); otherwise one slab
// buffer is reused, so no [B, d_sae] tensor is allocated.
template <typename F>
void for_each_slab(const at::Tensor& x_in, const at::Tensor& W, const at::Tensor& bias, const at::Tensor& target,
                   F&& f) {
  const int64_t B = x_in.size(0), d_sae = W.size(1);
  const int64_t chunk = encode_chunk_rows(B, d_sae);
  at::Tensor slab = target.defined() ? at::Tensor() : at::empty({chunk, d_sae}, x_in.options());
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t rows = std::min(chunk, B - r0);
    auto pre = target.defined() ? target.narrow(0, r0, rows) : slab.narrow(0, 0, rows);
    if (bias.defined())
      at::addmm_out(pre, bias, x_in.narrow(0, r0, rows), W);
    else
      at::mm_out(pre, x_in.narrow(0, r0, rows), W);
    f(r0, rows, pre);
  }
}

// Branch-free compaction of the latents whose pre-activation passes a cheap superset test
// (row[j] >= lo[j], or > lo for one bound): the exact, costlier test then runs on those few only.
template <typename scalar_t, typename wide_t>
inline int64_t candidates(const scalar_t* row, const wide_t* lo, int64_t n, int64_t* cand) {
  int64_t nc = 0;
  for (int64_t j = 0; j < n; ++j) {
    cand[nc] = j;
    nc += static_cast<wide_t>(row[j]) >= lo[j];
  }
  return nc;
}
template <typename scalar_t, typename wide_t>
inline int64_t candidates_above(const scalar_t* row, wide_t lo, int64_t n, int64_t* cand) {
  int64_t nc = 0;
  for (int64_t j = 0; j < n; ++j) {
    cand[nc] = j;
    nc += static_cast<wide_t>(row[j]) > lo;
  }
  return nc;
}

// The kept entries of one row (latent order), with up to two values each (Gated: f and relu(π_gate)).
template <typename scalar_t>
struct RowEntries {
  std::vector<int64_t> cols;
  std::vector<scalar_t> v0, v1;
  std::vector<uint8_t> flags;
  void clear() {
    cols.clear();
    v0.clear();
    v1.clear();
    flags.clear();
  }
  int64_t size() const { return static_cast<int64_t>(cols.size()); }
};

// CSR arrays by row, grown slab by slab from the slab's RowEntries (each row's entries in latent
// order, rows in order). `two` keeps the second value, `with_flags` the flags.
template <typename scalar_t>
struct CsrBuilder {
  CsrBuilder(int64_t B, int64_t slab_rows, bool two, bool with_flags)
      : row_ptr(B + 1, 0), rows(slab_rows), two(two), with_flags(with_flags) {}

  void append(int64_t r0, int64_t n) {
    int64_t total = static_cast<int64_t>(cols.size());
    for (int64_t r = 0; r < n; ++r) {
      total += rows[r].size();
      row_ptr[r0 + r + 1] = total;
    }
    cols.resize(total);
    v0.resize(total);
    if (two) v1.resize(total);
    if (with_flags) flags.resize(total);
    parallel_tasks(n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto& e = rows[r];
        const int64_t at = row_ptr[r0 + r], m = e.size();
        if (!m) continue;
        std::memcpy(cols.data() + at, e.cols.data(), m * sizeof(int64_t));
        std::memcpy(v0.data() + at, e.v0.data(), m * sizeof(scalar_t));
        if (two) std::memcpy(v1.data() + at, e.v1.data(), m * sizeof(scalar_t));
        if (with_flags) std::memcpy(flags.data() + at, e.flags.data(), m);
      }
    });
  }

  std::vector<int64_t> row_ptr, cols;
  std::vector<scalar_t> v0, v1;
  std::vector<uint8_t> flags;
  std::vector<RowEntries<scalar_t>> rows;  // the current slab's rows
  bool two, with_flags;
};

template <typename T>
at::Tensor vector_to_tensor(const std::vector<T>& v, const at::TensorOptions& opt) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, opt);
  if (!v.empty()) std::memcpy(t.data_ptr(), v.data(), v.size() * sizeof(T));
  return t;
}

// out = bias + Σ_e vals[e] · W[cols[e]] over one row's entries (zero values skipped), accumulated in acc.
template <typename scalar_t, typename acc_t>
inline void decode_row(int64_t d_in, const int64_t* cols, const scalar_t* vals, int64_t n, const scalar_t* W,
                       const scalar_t* bias, acc_t* acc, scalar_t* out) {
  for (int64_t i = 0; i < d_in; ++i) acc[i] = bias ? static_cast<acc_t>(bias[i]) : acc_t(0);
  for (int64_t e = 0; e < n; ++e) {
    const acc_t a = static_cast<acc_t>(vals[e]);
    if (a == acc_t(0)) continue;  // inactive window entries, relu'd zeros
    axpy<scalar_t, acc_t>(acc, a, W + cols[e] * d_in, d_in);
  }
  for (int64_t i = 0; i < d_in; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}

// Two decodes of one row through the same decoder rows (Gated: x̂ from f, x̂_frozen from relu(π_gate)).
template <typename scalar_t, typename acc_t>
inline void decode_row2(int64_t d_in, const int64_t* cols, const scalar_t* va, const scalar_t* vb, int64_t n,
                        const scalar_t* W, const scalar_t* bias, acc_t* acc_a, acc_t* acc_b, scalar_t* out_a,
                        scalar_t* out_b) {
  for (int64_t i = 0; i < d_in; ++i) acc_a[i] = acc_b[i] = static_cast<acc_t>(bias[i]);
  for (int64_t e = 0; e < n; ++e) {
    const acc_t a = static_cast<acc_t>(va[e]), b = static_cast<acc_t>(vb[e]);
    const scalar_t* w = W + cols[e] * d_in;
    if (a != acc_t(0))
      axpy2<scalar_t, acc_t>(acc_a, a, acc_b, b, w, d_in);
    else
      axpy<scalar_t, acc_t>(acc_b, b, w, d_in);
  }
  for (int64_t i = 0; i < d_in; ++i) {
    out_a[i] = static_cast<scalar_t>(acc_a[i]);
    out_b[i] = static_cast<scalar_t>(acc_b[i]);
  }
}

// The batch-wide top-k of relu(x_in · W + b): the min(B·k, B·d_sae) largest positive entries as CSR by
// row (csrc/sae.cpp).
template <typename scalar_t>
void batch_topk_entries(const at::Tensor& x_in, const at::Tensor& W, const at::Tensor& b, int64_t k,
                        std::vector<int64_t>& row_ptr, std::vector<int64_t>& cols, std::vector<scalar_t>& vals);

// ---- the selection rules: what each architecture keeps of a pre-activation ----------------------

// JumpReLU (and, with θ = 0 / τ, ReLU and a calibrated BatchTopK): active = pre > θ; with a bandwidth,
// the window |pre - θ|/ε < 1/2 too. Every kept entry has pre >= lo = θ - ε (θ without a window).
template <typename wide_t>
struct JumpSelect {
  const wide_t* th;
  const wide_t* eps;  // null: no window (inference)
  std::vector<wide_t> lo;
  JumpSelect(const wide_t* th, const wide_t* eps, int64_t d_sae) : th(th), eps(eps), lo(d_sae) {
    for (int64_t j = 0; j < d_sae; ++j) lo[j] = eps ? th[j] - eps[j] : th[j];
  }
  // flags of an entry (0: not kept)
  uint8_t classify(wide_t v, int64_t j) const {
    const bool a = v > th[j];
    if (!eps) return a ? kActive : 0;
    const wide_t u = (v - th[j]) / eps[j];
    const bool w = u > wide_t(-0.5) && u < wide_t(0.5);
    return (a ? kActive : 0) | (w ? kWindow : 0);
  }
};

// Gated: z = x_in · W_gate (no bias). The gate π_gate = z + b_gate is on (kept) when > 0; the entry's
// values are f = relu(π_mag) with π_mag = exp(r_mag)·z + b_mag (W_mag = exp(r_mag) ⊙ W_gate is a
// per-column scale, so one GEMM serves both) and relu(π_gate) = π_gate.
template <typename acc_t>
struct GatedSelect {
  std::vector<acc_t> lo, b_gate, scale, b_mag;
  template <typename scalar_t>
  GatedSelect(const scalar_t* bg, const scalar_t* r_mag, const scalar_t* bm, int64_t d_sae)
      : lo(d_sae), b_gate(d_sae), scale(d_sae), b_mag(d_sae) {
    for (int64_t j = 0; j < d_sae; ++j) {
      b_gate[j] = static_cast<acc_t>(bg[j]);
      lo[j] = -b_gate[j];  // a superset of π_gate > 0 (rounding of z + b_gate)
      scale[j] = std::exp(static_cast<acc_t>(r_mag[j]));
      b_mag[j] = static_cast<acc_t>(bm[j]);
    }
  }
  bool gate(acc_t z, int64_t j) const { return z + b_gate[j] > acc_t(0); }
  acc_t pi_gate(acc_t z, int64_t j) const { return z + b_gate[j]; }
  acc_t mag(acc_t z, int64_t j) const {
    const acc_t m = scale[j] * z + b_mag[j];
    return m > acc_t(0) ? m : acc_t(0);
  }
};

}  // namespace fastsae
