#pragma once
// JumpReLU's per-element math, the one definition every kernel uses (the sparse engine at its entries, the dense
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

// JumpReLU: g_pre = H·∂L/∂f (+ with the straight-through option (1/ε)K·∂L/∂l0_b);
// ∂L/∂θ_j += K·(-(θ/ε)·∂L/∂f - (1/ε)·∂L/∂l0_b).
template <typename acc_t, typename wide_t>
inline acc_t jump_grad(bool active, bool window, acc_t gf, wide_t th, wide_t eps, wide_t gl0, bool ste, wide_t& s_th) {
  acc_t g = active ? gf : acc_t(0);
  wide_t t = -(th / eps) * static_cast<wide_t>(gf);
  t -= (wide_t(1) / eps) * gl0;
  s_th += window ? t : wide_t(0);
  if (ste) g += window ? static_cast<acc_t>((wide_t(1) / eps) * gl0) : acc_t(0);
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

}  // namespace fastsae
