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

// float32 rows with float32 bounds (simd.cpp)
int64_t candidates_f32(const float* row, const float* lo, int64_t n, int64_t* cand);

}  // namespace fastsae
