// float32 inner loops compiled for several x86-64 levels (GCC/Clang target_clones: the loader
// picks the widest the CPU supports), so the wheel stays portable while AVX2/AVX-512 machines get
// 8/16-wide FMAs. The summation order of dot is fixed per machine, independent of thread count.
#include <cstdint>

#define FASTSAE_SCAN_VECTOR
#if defined(__GNUC__) && !defined(__clang__)
// scan.h's vector helpers are inline and used only inside this file's clones: no ABI crosses a file boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#include "jump_math.h"
#include "scan.h"
#include "simd.h"

namespace fastsae {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTSAE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTSAE_CLONES
#endif

FASTSAE_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  constexpr int L = 32;
  float part[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int t = 0; t < L; ++t) part[t] += a[i + t] * b[i + t];
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int t = 0; t < L; ++t) s += part[t];
  return s;
}

FASTSAE_CLONES void axpy_f32(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Same partial sums (hence the same bits) as dot_f32.
// acc never aliases g or w (an accumulator buffer): __restrict__ lets the compiler keep the partial sums in
// registers across the stores.
FASTSAE_CLONES float dot_axpy_f32(const float* __restrict__ g, const float* __restrict__ w, float* __restrict__ acc,
                                  float v, int64_t n) {
  constexpr int L = 32;
  float part[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int t = 0; t < L; ++t) {
      part[t] += g[i + t] * w[i + t];
      acc[i + t] += v * g[i + t];
    }
  float s = 0;
  for (; i < n; ++i) {
    s += g[i] * w[i];
    acc[i] += v * g[i];
  }
  for (int t = 0; t < L; ++t) s += part[t];
  return s;
}

FASTSAE_CLONES void axpy2_f32(float* __restrict__ y1, float a1, float* __restrict__ y2, float a2,
                              const float* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y1[i] += a1 * x[i];
    y2[i] += a2 * x[i];
  }
}

FASTSAE_CLONES int64_t jump_dense_row_f32(const float* pre, const float* th, const float* eps, int64_t n, float* f,
                                          uint8_t* fired, int64_t* entries) {
  return jump_dense_row<float, float>(pre, th, eps, n, f, fired, entries);
}

FASTSAE_CLONES void jump_dense_grad_rows_f32(const float* pre, float* g, int64_t ld, int64_t rows, int64_t n,
                                             const float* th, const float* eps, const float* gl0, bool ste,
                                             float* genc, float* s_th) {
  jump_dense_grad_rows<float, float, float>(pre, g, ld, rows, n, th, eps, gl0, ste, genc, s_th);
}

FASTSAE_CLONES void relu_dense_grad_rows_f32(const float* f, float* g, int64_t ld, int64_t rows, int64_t n,
                                             const float* w, const float* gsp, float* genc, float* s_w) {
  relu_dense_grad_rows<float, float>(f, g, ld, rows, n, w, gsp, genc, s_w);
}

FASTSAE_CLONES void gated_dense_grad_rows_f32(const float* f, const float* gate, const float* g2, float* g, int64_t ld,
                                              int64_t rows, int64_t n, const float* scale, const float* b_mag,
                                              const float* gsp, float* genc, float* s_gate, float* s_mag, float* s_r) {
  gated_dense_grad_rows<float, float>(f, gate, g2, g, ld, rows, n, scale, b_mag, gsp, genc, s_gate, s_mag, s_r);
}

#if defined(__GNUC__) || defined(__clang__)
FASTSAE_CLONES int64_t candidates_f32(const float* row, const float* lo, int64_t n, int64_t* cand) {
  return candidates_vec(row, lo, n, cand);
}

FASTSAE_CLONES int64_t candidates_above_f32(const float* row, float lo, int64_t n, int64_t* cand) {
  return candidates_above_vec(row, lo, n, cand);
}
#else
int64_t candidates_f32(const float* row, const float* lo, int64_t n, int64_t* cand) {
  return candidates<float, float>(row, lo, n, cand);
}

int64_t candidates_above_f32(const float* row, float lo, int64_t n, int64_t* cand) {
  return candidates_above<float, float>(row, lo, n, cand);
}
#endif

FASTSAE_CLONES void add_bias_f32(float* __restrict__ row, const float* __restrict__ bias, int64_t n) {
  add_bias<float>(row, bias, n);
}

FASTSAE_CLONES int group_maxima_f32(const float* row, const float* bias, int64_t n, int64_t S, float* m) {
  return bias ? group_maxima<float, float, true>(row, bias, n, S, m)
              : group_maxima<float, float, false>(row, bias, n, S, m);
}

}  // namespace fastsae
