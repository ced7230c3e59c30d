#pragma once
// JumpReLU's (and, below, ReLU's and Gated's) per-element math, the one definition every kernel uses (the sparse engine at its entries, the dense
// step at every element, scalar or vectorised in simd.cpp): which entries are kept, and an entry's gradients.
// Plain C++ (no ATen) so that simd.cpp's per-ISA clones inline it. Written with selects, not branches, so a loop
// over a row vectorises; a select adds exactly 0 where a branch would add nothing (the same value, up to the
// sign of a zero).
#include <cstdint>

// The inner loops below carry no dependence between iterations j (their arrays never alias): say so, so that they
// vectorise without runtime alias checks.
#if defined(__GNUC__) && !defined(__clang__)
#define FASTSAE_IVDEP _Pragma("GCC ivdep")
#elif defined(__clang__)
#define FASTSAE_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#else
#define FASTSAE_IVDEP
#endif

namespace fastsae {

constexpr uint8_t kActive = 1;  // JumpReLU pre > θ / Gated π_gate > 0: the entry carries a value
constexpr uint8_t kWindow = 2;  // JumpReLU |pre - θ| / ε < 1/2: the θ pseudo-derivatives are nonzero

// The window test |u| < 1/2 with u = (v - θ)/ε (the open interval of the rectangle kernel K).
template <typename wide_t>
inline bool jump_window(wide_t v, wide_t th, wide_t eps) {
  const wide_t u = (v - th) / eps;
  return (u > wide_t(-0.5)) & (u < wide_t(0.5));
}

// JumpReLU: g_pre = H·∂L/∂f; ∂L/∂θ_j += K·(-(θ/ε)·∂L/∂f - (1/ε)·∂L/∂l0_b). With the straight-through option
// (reference.py's ste_to_input) the jump's and the step's pseudo-derivatives reach pre too: f and H depend on pre
// only through pre - θ, so g_pre gains minus the entry's θ term, K·((θ/ε)·∂L/∂f + (1/ε)·∂L/∂l0_b).
template <typename acc_t, typename wide_t>
inline acc_t jump_grad(bool active, bool window, acc_t gf, wide_t th, wide_t eps, wide_t gl0, bool ste, wide_t& s_th) {
  acc_t g = active ? gf : acc_t(0);
  wide_t t = -(th / eps) * static_cast<wide_t>(gf);
  t -= (wide_t(1) / eps) * gl0;
  s_th += window ? t : wide_t(0);
  if (ste) g -= window ? static_cast<acc_t>(t) : acc_t(0);
  return g;
}

template <typename acc_t, typename wide_t>
inline acc_t jump_entry(uint8_t flags, acc_t gf, wide_t th, wide_t eps, wide_t gl0, bool ste, wide_t& s_th) {
  return jump_grad<acc_t, wide_t>((flags & kActive) != 0, (flags & kWindow) != 0, gf, th, eps, gl0, ste, s_th);
}

// The dense step over one row of pre-activations: f = pre·H(pre - θ) into `f`, fired[j] |= active; returns the
// active count, adds the active ∪ window count to *entries.
template <typename scalar_t, typename wide_t>
inline int64_t jump_dense_row(const scalar_t* pre, const wide_t* th, const wide_t* eps, int64_t n, scalar_t* f,
                              uint8_t* fired, int64_t* entries) {
  int64_t act = 0, ent = 0;
  FASTSAE_IVDEP
  for (int64_t j = 0; j < n; ++j) {
    const wide_t v = static_cast<wide_t>(pre[j]);
    const bool a = v > th[j];
    const bool w = jump_window<wide_t>(v, th[j], eps[j]);
    f[j] = a ? pre[j] : scalar_t(0);
    act += a;
    ent += a | w;
    fired[j] |= static_cast<uint8_t>(a);
  }
  *entries += ent;
  return act;
}

// The dense backward over rows [0, rows) of one block of n latents (pointers at the block's first column, rows
// `ld` apart): g (∂L/∂f on entry) becomes ∂L/∂pre; genc[j] and s_th[j] accumulate over the rows in order.
template <typename scalar_t, typename acc_t, typename wide_t>
inline void jump_dense_grad_rows(const scalar_t* pre, scalar_t* g, int64_t ld, int64_t rows, int64_t n,
                                 const wide_t* th, const wide_t* eps, const wide_t* gl0, bool ste, acc_t* genc,
                                 wide_t* s_th) {
  for (int64_t b = 0; b < rows; ++b) {
    const wide_t l = gl0 ? gl0[b] : wide_t(0);
    const scalar_t* prow = pre + b * ld;
    scalar_t* grow = g + b * ld;
    FASTSAE_IVDEP
    for (int64_t j = 0; j < n; ++j) {
      const wide_t v = static_cast<wide_t>(prow[j]);
      const acc_t ge = jump_grad<acc_t, wide_t>(v > th[j], jump_window<wide_t>(v, th[j], eps[j]),
                                                static_cast<acc_t>(grow[j]), th[j], eps[j], l, ste, s_th[j]);
      grow[j] = static_cast<scalar_t>(ge);
      genc[j] += ge;
    }
  }
}

// ---- ReLU and Gated: the same mechanism -------------------------------------------------------------

// A kept entry of a relu'd code (v > 0): g_pre = ∂L/∂f + ∂L/∂sparsity_b · w_j, where ReLU's
// sparsity_b = Σ_j f_bj · w_j (w = the decoder row norms); ∂L/∂w_j += ∂L/∂sparsity_b · f_bj.
template <typename acc_t>
inline acc_t relu_entry(acc_t v, acc_t gf, acc_t gsp, acc_t w, acc_t& s_w) {
  s_w += gsp * v;
  return gf + gsp * w;
}

// Gated, at an open gate: f = relu(π_mag), π_mag = s_j·z + b_mag_j with s = exp(r_mag). ∂L/∂π_mag =
// 1{f > 0}·∂L/∂f; ∂L/∂π_gate = g_gate (frozen decoder and L1 of relu(π_gate)); z feeds both:
// g_z = g_gate + s_j·∂L/∂π_mag. Scalars: b_gate += g_gate, b_mag += ∂L/∂π_mag, r_mag += ∂L/∂π_mag·(π_mag - b_mag).
template <typename acc_t>
inline acc_t gated_entry(acc_t f, acc_t gf, acc_t g_gate, acc_t scale, acc_t b_mag, acc_t* s) {
  const acc_t g_mag = f > acc_t(0) ? gf : acc_t(0);
  s[0] += g_gate;
  s[1] += g_mag;
  s[2] += g_mag * (f - b_mag);
  return g_gate + scale * g_mag;
}

// The dense ReLU backward over rows [0, rows) of one block of n latents (pointers at the block's first column, rows
// `ld` apart): g (∂L/∂f on entry) becomes ∂L/∂pre (relu_entry where f > 0, else 0); genc[j] and, with the weighted
// L1 (gsp: [rows] ∂L/∂sparsity), s_w[j] accumulate over the rows in order.
template <typename scalar_t, typename acc_t>
inline void relu_dense_grad_rows(const scalar_t* f, scalar_t* g, int64_t ld, int64_t rows, int64_t n, const acc_t* w,
                                 const acc_t* gsp, acc_t* genc, acc_t* s_w) {
  const bool weighted = gsp != nullptr;
  for (int64_t b = 0; b < rows; ++b) {
    const acc_t l = weighted ? gsp[b] : acc_t(0);
    const scalar_t* frow = f + b * ld;
    scalar_t* grow = g + b * ld;
    FASTSAE_IVDEP
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = static_cast<acc_t>(frow[j]);
      const bool a = v > acc_t(0);
      acc_t sw = 0;
      const acc_t gf = static_cast<acc_t>(grow[j]);
      const acc_t on = weighted ? relu_entry<acc_t>(v, gf, l, w[j], sw) : gf;
      const acc_t ge = a ? on : acc_t(0);
      s_w[j] += a ? sw : acc_t(0);
      grow[j] = static_cast<scalar_t>(ge);
      genc[j] += ge;
    }
  }
}

// The dense Gated backward, the same way: at an open gate (gate = relu(π_gate) > 0) gated_entry with ∂L/∂f = g,
// g_gate = g2 (the frozen decoder's, or 0) + gsp[b]; else 0. s (3 arrays of n: b_gate, b_mag, r_mag) accumulate.
template <typename scalar_t, typename acc_t>
inline void gated_dense_grad_rows(const scalar_t* f, const scalar_t* gate, const scalar_t* g2, scalar_t* g, int64_t ld,
                                  int64_t rows, int64_t n, const acc_t* scale, const acc_t* b_mag, const acc_t* gsp,
                                  acc_t* genc, acc_t* s_gate, acc_t* s_mag, acc_t* s_r) {
  for (int64_t b = 0; b < rows; ++b) {
    const acc_t l = gsp ? gsp[b] : acc_t(0);
    const scalar_t* frow = f + b * ld;
    const scalar_t* qrow = gate + b * ld;
    const scalar_t* g2row = g2 ? g2 + b * ld : nullptr;
    scalar_t* grow = g + b * ld;
    FASTSAE_IVDEP
    for (int64_t j = 0; j < n; ++j) {
      const bool a = static_cast<acc_t>(qrow[j]) > acc_t(0);
      const acc_t d2 = g2row ? static_cast<acc_t>(g2row[j]) : acc_t(0);
      acc_t s[3] = {0, 0, 0};
      const acc_t on = gated_entry<acc_t>(static_cast<acc_t>(frow[j]), static_cast<acc_t>(grow[j]), d2 + l, scale[j],
                                          b_mag[j], s);
      const acc_t ge = a ? on : acc_t(0);
      s_gate[j] += a ? s[0] : acc_t(0);
      s_mag[j] += a ? s[1] : acc_t(0);
      s_r[j] += a ? s[2] : acc_t(0);
      grow[j] = static_cast<scalar_t>(ge);
      genc[j] += ge;
    }
  }
}

}  // namespace fastsae
