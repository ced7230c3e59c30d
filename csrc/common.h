#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "simd.h"

namespace fastsae {

// Every kernel that dereferences user indices checks them first, so a bad index raises a Python
// error instead of reading out of bounds. One O(n) pass; negligible next to the gather it guards.
inline void check_index_range(const at::Tensor& idx, int64_t size, const char* op, const char* arg) {
  if (idx.numel() == 0) return;
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
  }
  TORCH_CHECK_INDEX(lo >= 0 && hi < size, op, ": ", arg, " must lie in [0, ", size, "), got values in [", lo,
                    ", ", hi, "]");
}

// A CSR row pointer must start at 0, never decrease, and end at nnz; otherwise a row's entries
// would run past the column array.
inline void check_row_ptr(const at::Tensor& row_ptr, int64_t rows, int64_t nnz, const char* op) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) == rows + 1, op, ": row_ptr must be [", rows + 1, "], got ",
              row_ptr.sizes());
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong, op, ": row_ptr must be int64");
  const int64_t* p = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK_INDEX(p[0] == 0 && p[rows] == nnz, op, ": row_ptr must run from 0 to nnz=", nnz, ", got ", p[0],
                    "..", p[rows]);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_INDEX(p[r] <= p[r + 1], op, ": row_ptr must be non-decreasing (row ", r, ")");
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                             const char* nb) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", na, " (", a.scalar_type(), ") and ", nb, " (",
              b.scalar_type(), ") must have the same dtype");
}

inline void check_vector(const at::Tensor& t, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must be [", n, "], got ", t.sizes());
}

// An output in its own storage and dtype (rows of one [k, d_sae] scratch tensor would alias each other).
inline at::Tensor own(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype, false, true); }

// The dtype JumpReLU's window test runs in: float32-or-wider, as reference._kernel_window.
inline at::ScalarType wide_type(at::ScalarType a, at::ScalarType b) {
  return (a == at::kDouble || b == at::kDouble) ? at::kDouble : at::kFloat;
}

// Inner loops: plain counted loops over contiguous memory, which -O3 vectorises.
// A reduction is not reassociated by the compiler (no -ffast-math), so dot keeps 16 independent
// partial sums explicitly: the lane loop vectorises and the add chains overlap. The summation
// order is fixed, so the result never depends on the thread count.
template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  constexpr int L = 16;
  acc_t part[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int t = 0; t < L; ++t) part[t] += static_cast<acc_t>(a[i + t]) * static_cast<acc_t>(b[i + t]);
  acc_t s = 0;
  for (; i < n; ++i) s += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  for (int t = 0; t < L; ++t) s += part[t];
  return s;
}

template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* y, acc_t a, const scalar_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<acc_t>(x[i]);
}

// dot(g, w) with the partial sums of dot, and acc += v·g in the same pass over g.
template <typename scalar_t, typename acc_t>
inline acc_t dot_axpy(const scalar_t* g, const scalar_t* w, acc_t* acc, acc_t v, int64_t n) {
  constexpr int L = 16;
  acc_t part[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int t = 0; t < L; ++t) {
      const acc_t gi = static_cast<acc_t>(g[i + t]);
      part[t] += gi * static_cast<acc_t>(w[i + t]);
      acc[i + t] += v * gi;
    }
  acc_t s = 0;
  for (; i < n; ++i) {
    const acc_t gi = static_cast<acc_t>(g[i]);
    s += gi * static_cast<acc_t>(w[i]);
    acc[i] += v * gi;
  }
  for (int t = 0; t < L; ++t) s += part[t];
  return s;
}

// y1 += a1·x, y2 += a2·x in one pass over x.
template <typename scalar_t, typename acc_t>
inline void axpy2(acc_t* y1, acc_t a1, acc_t* y2, acc_t a2, const scalar_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    y1[i] += a1 * xi;
    y2[i] += a2 * xi;
  }
}

// Σ a[i]·b[i] with b already in the accumulation type.
template <typename scalar_t, typename acc_t>
inline acc_t dot_mixed(const scalar_t* a, const acc_t* b, int64_t n) {
  constexpr int L = 16;
  acc_t part[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int t = 0; t < L; ++t) part[t] += static_cast<acc_t>(a[i + t]) * b[i + t];
  acc_t s = 0;
  for (; i < n; ++i) s += static_cast<acc_t>(a[i]) * b[i];
  for (int t = 0; t < L; ++t) s += part[t];
  return s;
}

// float32, the training dtype: the multi-ISA versions from simd.cpp.
template <>
inline float dot_mixed<float, float>(const float* a, const float* b, int64_t n) {
  return dot_f32(a, b, n);
}
template <>
inline float dot<float, float>(const float* a, const float* b, int64_t n) {
  return dot_f32(a, b, n);
}
template <>
inline void axpy<float, float>(float* y, float a, const float* x, int64_t n) {
  axpy_f32(y, a, x, n);
}
template <>
inline float dot_axpy<float, float>(const float* g, const float* w, float* acc, float v, int64_t n) {
  return dot_axpy_f32(g, w, acc, v, n);
}
template <>
inline void axpy2<float, float>(float* y1, float a1, float* y2, float a2, const float* x, int64_t n) {
  axpy2_f32(y1, a1, y2, a2, x, n);
}

// Asks the cache for the `bytes` at p ahead of their use: the sparse kernels gather rows (2 KB at d_in 512) in an
// order the hardware prefetcher cannot guess, and the next row's lines arrive while the current one is computed.
inline void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
#else
  (void)p;
  (void)bytes;
#endif
}

// Work-sharing over [0, n) in tasks of `grain` indices: threads pull the next task from a shared
// counter, so on a busy machine a descheduled thread delays one task, not a static half of the
// range. Each index is processed by exactly one thread with the same code, so results do not
// depend on the scheduling or the thread count.
template <typename F>
inline void parallel_tasks(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t ntasks = (n + grain - 1) / grain;
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), ntasks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;) {
      const int64_t b = t * grain;
      f(b, std::min(n, b + grain));
    }
  });
}

// Entries of a sparse [rows, n_latents] matrix regrouped by latent (a counting sort). Within one
// latent the entries keep their original order (increasing row), so every per-latent reduction
// runs in a fixed order: results do not depend on the thread count, and each latent's output row
// is owned by one thread (no atomics).
struct ByLatent {
  std::vector<int64_t> start;  // [n_latents + 1]
  std::vector<int64_t> entry;  // [nnz], entry ids grouped by latent
  std::vector<int64_t> row;    // [nnz], each grouped entry's row (group_by_latent_rows only)
};

inline ByLatent group_by_latent(const int64_t* cols, int64_t nnz, int64_t n_latents) {
  ByLatent g;
  g.start.assign(n_latents + 1, 0);
  for (int64_t e = 0; e < nnz; ++e) ++g.start[cols[e] + 1];
  for (int64_t j = 0; j < n_latents; ++j) g.start[j + 1] += g.start[j];
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  g.entry.resize(nnz);
  for (int64_t e = 0; e < nnz; ++e) g.entry[fill[cols[e]]++] = e;
  return g;
}

// The same for CSR entries by row (row_ptr [rows + 1]), also recording each grouped entry's row, so a
// per-latent loop reads (entry, row) in sequence instead of looking the row up per entry.
inline ByLatent group_by_latent_rows(const int64_t* row_ptr, int64_t rows, const int64_t* cols, int64_t nnz,
                                     int64_t n_latents) {
  ByLatent g;
  g.start.assign(n_latents + 1, 0);
  for (int64_t e = 0; e < nnz; ++e) ++g.start[cols[e] + 1];
  for (int64_t j = 0; j < n_latents; ++j) g.start[j + 1] += g.start[j];
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  g.entry.resize(nnz);
  g.row.resize(nnz);
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t e = row_ptr[b]; e < row_ptr[b + 1]; ++e) {
      const int64_t at = fill[cols[e]]++;
      g.entry[at] = e;
      g.row[at] = b;
    }
  return g;
}

// Outputs of the fused ops big enough that a fresh allocation costs a page fault per 4 KB on first touch (the
// weight gradients, the dense step's [B, d_sae] tensors: 16-64 MB each, about as long to fault in as to compute).
// Each slot keeps the memory of its last output; once the caller has released that output (a training loop sets
// the gradients to None, autograd frees the saved tensors after the backward), the next call hands the same memory
// out again in a new tensor. Memory still referenced by anyone is never reused: the op allocates afresh then.
enum RecycleSlot : int { kGradWEnc, kGradWDec, kDensePre, kDenseCode, kDenseGrad, kRecycleSlots };

inline at::Tensor recycled_empty(RecycleSlot slot, at::IntArrayRef sizes, const at::TensorOptions& opt) {
  static std::mutex mu;
  // Never destroyed: storages released at process exit could outlive the allocator.
  static auto* cache = new std::vector<c10::Storage>(kRecycleSlots);
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const auto dtype = c10::typeMetaToScalarType(opt.dtype());
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  std::lock_guard<std::mutex> lock(mu);
  c10::Storage& c = (*cache)[slot];
  // use_count 1: only this cache holds the storage (every tensor over it, views included, holds a reference)
  if (c && c.use_count() == 1 && c.nbytes() >= nbytes && c.device() == opt.device() && nbytes > 0) {
    auto t = at::empty({0}, opt);
    t.set_(c, 0, sizes);
    return t;
  }
  auto t = at::empty(sizes, opt);
  c = t.storage();
  return t;
}

// Rows per slab of the encoder GEMM: a [rows, d_sae] slab of pre-activations is thresholded/selected right after
// its GEMM, and the dense [B, d_sae] is never materialised at once. A function of (B, d_sae) only: the GEMM's
// shapes, hence its bits, never depend on the thread count.
inline int64_t encode_chunk_rows(int64_t B, int64_t d_sae) {
  // The GEMM packs all of W once per slab: measured (AMD EPYC, Intel Xeon), slabs below ~512 rows make it 5-15%
  // slower than one GEMM over the batch, 1024 rows cost ~1%. So slabs of ~8M elements (32 MB in float32), at
  // least 512 rows, and at least two when the batch allows (two threads then each take one: for_each_slab).
  const int64_t target = (int64_t(1) << 23);
  int64_t rows = std::min(target / (d_sae > 0 ? d_sae : 1), (B + 1) / 2);
  rows = rows < 512 ? 512 : rows;
  return rows > B ? (B > 0 ? B : 1) : rows;
}

}  // namespace fastsae
