#pragma once
// The candidate pre-filter of every fused encoder: plain C++ (no ATen), so simd.cpp's per-ISA clones inline it.
#include <cstdint>

namespace fastsae {

// Branch-free compaction of the latents whose pre-activation passes a cheap superset test
// (row[j] >= lo[j], or > lo for one bound): the exact, costlier test then runs on those few only. A
// vectorised test of each block of 16 first skips the blocks without a candidate (most of them in a
// trained SAE), so the compaction proper runs on a small fraction of the row.
template <typename scalar_t, typename wide_t>
inline int64_t candidates(const scalar_t* row, const wide_t* lo, int64_t n, int64_t* cand) {
  constexpr int64_t BLK = 16;
  int64_t nc = 0, j0 = 0;
  for (; j0 + BLK <= n; j0 += BLK) {
    int any = 0;
    for (int64_t t = 0; t < BLK; ++t) any |= static_cast<int>(static_cast<wide_t>(row[j0 + t]) >= lo[j0 + t]);
    if (!any) continue;
    for (int64_t j = j0; j < j0 + BLK; ++j) {
      cand[nc] = j;
      nc += static_cast<wide_t>(row[j]) >= lo[j];
    }
  }
  for (int64_t j = j0; j < n; ++j) {
    cand[nc] = j;
    nc += static_cast<wide_t>(row[j]) >= lo[j];
  }
  return nc;
}
template <typename scalar_t, typename wide_t>
inline int64_t candidates_above(const scalar_t* row, wide_t lo, int64_t n, int64_t* cand) {
  constexpr int64_t BLK = 16;
  int64_t nc = 0, j0 = 0;
  for (; j0 + BLK <= n; j0 += BLK) {
    int any = 0;
    for (int64_t t = 0; t < BLK; ++t) any |= static_cast<int>(static_cast<wide_t>(row[j0 + t]) > lo);
    if (!any) continue;
    for (int64_t j = j0; j < j0 + BLK; ++j) {
      cand[nc] = j;
      nc += static_cast<wide_t>(row[j]) > lo;
    }
  }
  for (int64_t j = j0; j < n; ++j) {
    cand[nc] = j;
    nc += static_cast<wide_t>(row[j]) > lo;
  }
  return nc;
}

// row[j] += bias[j]: the encoder bias, added to a slab row of x_in · W just before its scan reads it (the row is
// then in cache), instead of by the GEMM (addmm copies the bias into the whole output first: one more pass over
// [B, d_sae] through memory, and a GEMM that reads its output as well as writing it). One rounding, as addmm's.
template <typename scalar_t>
inline void add_bias(scalar_t* row, const scalar_t* bias, int64_t n) {
  for (int64_t j = 0; j < n; ++j) row[j] = row[j] + bias[j];
}

// TopK's grouped maxima (csrc/topk.h): m[b] = max_t (row + bias)[t·S + b] over T = 16 strided slices of length
// S, with each element row[i] + bias[i] rounded once to scalar_t (bias may be null); returns the number of NaNs in
// row[0:n], tail included. The bias test is a template parameter so that each loop is a plain vectorisable max.
template <typename scalar_t, typename key_t, bool kBias>
inline int group_maxima(const scalar_t* row, const scalar_t* bias, int64_t n, int64_t S, key_t* m) {
  constexpr int64_t T = 16;
  auto v = [&](int64_t i) {
    return static_cast<key_t>(kBias ? static_cast<scalar_t>(row[i] + bias[i]) : row[i]);
  };
  int nan = 0;
  for (int64_t b = 0; b < S; ++b) {
    const key_t x = v(b);
    m[b] = x;
    nan += x != x;
  }
  for (int64_t t = 1; t < T; ++t) {
    for (int64_t b = 0; b < S; ++b) {
      const key_t x = v(t * S + b);
      m[b] = x > m[b] ? x : m[b];
      nan += x != x;
    }
  }
  for (int64_t i = T * S; i < n; ++i) {
    const key_t x = v(i);
    nan += x != x;
  }
  return nan;
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(FASTSAE_SCAN_VECTOR)
// (Compiled in simd.cpp only, which defines FASTSAE_SCAN_VECTOR: 64-byte vector types outside its per-ISA clones
// would change the ABI of these inline functions between translation units.)
// The same two scans over float32 rows written with GCC/Clang vector types, so that every per-ISA clone in simd.cpp
// tests a block of 16 with one (AVX-512), two (AVX2) or four (SSE) vector compares: the scalar form above compiles
// to 16 scalar compares per block (the compiler unrolls the block loop before it could vectorise it), and that scan
// cost as much as a third of the encoder GEMM. Same candidates, same order.
namespace scan_detail {
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
inline f32x16 load16(const float* p) {
  f32x16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline bool any16(i32x16 m) {
  i32x8 a, b;
  __builtin_memcpy(&a, &m, sizeof a);
  __builtin_memcpy(&b, reinterpret_cast<const char*>(&m) + sizeof a, sizeof b);
  a |= b;
  i32x4 c, d;
  __builtin_memcpy(&c, &a, sizeof c);
  __builtin_memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof c, sizeof d);
  c |= d;
  return (c[0] | c[1] | c[2] | c[3]) != 0;
}
}  // namespace scan_detail

inline int64_t candidates_vec(const float* row, const float* lo, int64_t n, int64_t* cand) {
  using namespace scan_detail;
  constexpr int64_t BLK = 16;
  int64_t nc = 0, j0 = 0;
  for (; j0 + BLK <= n; j0 += BLK) {
    if (!any16(load16(row + j0) >= load16(lo + j0))) continue;
    for (int64_t j = j0; j < j0 + BLK; ++j) {
      cand[nc] = j;
      nc += row[j] >= lo[j];
    }
  }
  for (int64_t j = j0; j < n; ++j) {
    cand[nc] = j;
    nc += row[j] >= lo[j];
  }
  return nc;
}

inline int64_t candidates_above_vec(const float* row, float lo, int64_t n, int64_t* cand) {
  using namespace scan_detail;
  constexpr int64_t BLK = 16;
  const f32x16 l = lo - f32x16{};  // lo in every lane
  int64_t nc = 0, j0 = 0;
  for (; j0 + BLK <= n; j0 += BLK) {
    if (!any16(load16(row + j0) > l)) continue;
    for (int64_t j = j0; j < j0 + BLK; ++j) {
      cand[nc] = j;
      nc += row[j] > lo;
    }
  }
  for (int64_t j = j0; j < n; ++j) {
    cand[nc] = j;
    nc += row[j] > lo;
  }
  return nc;
}
#endif

// float32 rows with float32 bounds (simd.cpp)
int64_t candidates_f32(const float* row, const float* lo, int64_t n, int64_t* cand);
int64_t candidates_above_f32(const float* row, float lo, int64_t n, int64_t* cand);
void add_bias_f32(float* row, const float* bias, int64_t n);
int group_maxima_f32(const float* row, const float* bias, int64_t n, int64_t S, float* m);

}  // namespace fastsae
