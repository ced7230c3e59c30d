#pragma once
// The per-row top-k selector shared by the topk op and the fused topk_sae encoder.
// Ties rank the lower index first, so the result is a deterministic function of the row.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "scan.h"

namespace fastsae {

template <typename scalar_t>
struct TopK {
  using key_t = at::opmath_type<scalar_t>;
  struct Entry {
    key_t v;  // NaN stored as +inf, with `nan` set: comparisons stay a strict weak order
    int64_t i;
    bool nan;
  };
  // `a` ranks before `b`: NaN above everything (as torch.topk ranks it), then larger value first,
  // ties by lower index.
  static bool better(const Entry& a, const Entry& b) {
    if (a.nan != b.nan) return a.nan;
    return a.v > b.v || (a.v == b.v && a.i < b.i);
  }
  static Entry entry(scalar_t x, int64_t i) {
    const key_t v = static_cast<key_t>(x);
    const bool nan = std::isnan(v);
    return {nan ? std::numeric_limits<key_t>::infinity() : v, i, nan};
  }

  explicit TopK(int64_t k) : k(k) { heap.reserve(k); }

  // The k best entries of row[0:n] + bias[0:n] (k <= n; bias may be null), written sorted best-first to out_v /
  // out_i. With a bias each element is row[i] + bias[i] rounded once, as an in-place add would give, but the row is
  // read as it is: the sum is formed where the selection reads it, not in a pass of its own.
  void run(const scalar_t* row, int64_t n, scalar_t* out_v, int64_t* out_i, const scalar_t* bias = nullptr) {
    constexpr int64_t T = 16;
    const int64_t S = n / T;
    if (S >= 4 * k && run_blocked(row, bias, n, S, out_v, out_i)) return;
    if (bias) {
      biased.resize(n);
      for (int64_t i = 0; i < n; ++i) biased[i] = value_at(row, bias, i);
      row = biased.data();
    }
    run_heap(row, n, out_v, out_i);
  }

  // View row[0 : T·S] as T strided slices of length S; group b = {row[t·S + b] : t < T}. The k-th
  // largest group maximum τ is a lower bound on the k-th largest entry (k distinct entries reach
  // it), so only entries >= τ (in groups whose max >= τ, plus the tail) can be selected: a few times
  // k candidates, ranked exactly as the heap would. The group maxima pass is contiguous and
  // vectorises. Returns false (caller uses the heap) when the row holds a NaN.
  bool run_blocked(const scalar_t* row, const scalar_t* bias, int64_t n, int64_t S, scalar_t* out_v,
                   int64_t* out_i) {
    constexpr int64_t T = 16;
    gmax.resize(S);
    key_t* m = gmax.data();
    if (maxima(row, bias, n, S, m)) return false;
    const key_t tau = kth_group_max(m, S);
    heap.clear();  // reused as the candidate list
    for (int64_t b = 0; b < S; ++b) {
      if (!(m[b] >= tau)) continue;
      for (int64_t t = 0; t < T; ++t) {
        const key_t x = static_cast<key_t>(value_at(row, bias, t * S + b));
        if (x >= tau) heap.push_back({x, t * S + b, false});
      }
    }
    for (int64_t i = T * S; i < n; ++i) {
      const key_t x = static_cast<key_t>(value_at(row, bias, i));
      if (x >= tau) heap.push_back({x, i, false});
    }
    std::partial_sort(heap.begin(), heap.begin() + k, heap.end(), better);
    for (int64_t j = 0; j < k; ++j) {
      out_v[j] = value_at(row, bias, heap[j].i);
      out_i[j] = heap[j].i;
    }
    return true;
  }

  // One pass with a k-entry heap (any row, NaN included).
  void run_heap(const scalar_t* row, int64_t n, scalar_t* out_v, int64_t* out_i) {
    heap.clear();
    for (int64_t i = 0; i < k; ++i) heap.push_back(entry(row[i], i));
    std::make_heap(heap.begin(), heap.end(), better);  // front() = the worst kept entry
    key_t worst = heap.front().v;  // the skip test below; consider() decides exactly
    int64_t i = k;
    constexpr int64_t BLK = 16;
    for (; i + BLK <= n; i += BLK) {
      // A NaN (x != x) is never skipped; an integer count of compares vectorises.
      int any = 0;
      for (int64_t t = 0; t < BLK; ++t) {
        const key_t x = static_cast<key_t>(row[i + t]);
        any += static_cast<int>(x > worst) | static_cast<int>(x != x);
      }
      if (!any) continue;
      for (int64_t t = 0; t < BLK; ++t) consider(row, i + t, worst);
    }
    for (; i < n; ++i) consider(row, i, worst);
    std::sort(heap.begin(), heap.end(), better);
    for (int64_t j = 0; j < k; ++j) {
      out_v[j] = row[heap[j].i];
      out_i[j] = heap[j].i;
    }
  }

 private:
  // scan.h's group_maxima; in float32 simd.cpp's per-ISA clone of it (8 or 16 lanes wide).
  static int maxima(const scalar_t* row, const scalar_t* bias, int64_t n, int64_t S, key_t* m) {
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<key_t, float>) {
      return group_maxima_f32(row, bias, n, S, m);
    } else {
      return bias ? group_maxima<scalar_t, key_t, true>(row, bias, n, S, m)
                  : group_maxima<scalar_t, key_t, false>(row, bias, n, S, m);
    }
  }

  static scalar_t value_at(const scalar_t* row, const scalar_t* bias, int64_t i) {
    return bias ? static_cast<scalar_t>(row[i] + bias[i]) : row[i];
  }

  // The k-th largest of the S >= 4k group maxima m (no NaN). Consecutive rows of one batch have similar
  // maxima, so the previous row's 2k-th largest (`hint`) usually leaves k..8k of them above it: the selection then
  // runs on those few instead of all S (nth_element over 512 maxima was 2.5% of a TopK step at d_sae 8192, k 32).
  // Exact either way: when at least k maxima are >= hint, the k-th largest of them is the k-th largest of all.
  key_t kth_group_max(const key_t* m, int64_t S) {
    int64_t count = 0;
    if (has_hint)
      for (int64_t b = 0; b < S; ++b) count += m[b] >= hint;
    if (has_hint && count >= k && count <= 8 * k) {
      sel.clear();
      for (int64_t b = 0; b < S; ++b)
        if (m[b] >= hint) sel.push_back(m[b]);
    } else {
      sel.assign(m, m + S);
      count = S;
    }
    std::nth_element(sel.begin(), sel.begin() + (k - 1), sel.end(), std::greater<key_t>());
    const key_t tau = sel[k - 1];
    if (count >= 2 * k) {  // always on the full set (S >= 4k)
      std::nth_element(sel.begin() + k, sel.begin() + (2 * k - 1), sel.end(), std::greater<key_t>());
      hint = sel[2 * k - 1];
      has_hint = true;
    }
    return tau;
  }

  void consider(const scalar_t* row, int64_t i, key_t& worst) {
    const Entry e = entry(row[i], i);
    // i is past every kept index, so an equal value keeps the earlier entry
    if (!better(e, heap.front())) return;
    std::pop_heap(heap.begin(), heap.end(), better);
    heap.back() = e;
    std::push_heap(heap.begin(), heap.end(), better);
    worst = heap.front().v;
  }

  int64_t k;
  std::vector<Entry> heap;
  std::vector<key_t> gmax, sel;
  std::vector<scalar_t> biased;
  key_t hint = key_t(0);
  bool has_hint = false;
};

}  // namespace fastsae
