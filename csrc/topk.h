#pragma once
// The per-row top-k selector shared by the topk op and the fused topk_sae encoder.
// Ties rank the lower index first, so the result is a deterministic function of the row.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

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

  // The k best entries of row[0:n] (k <= n), written sorted best-first to out_v / out_i.
  void run(const scalar_t* row, int64_t n, scalar_t* out_v, int64_t* out_i) {
    constexpr int64_t T = 16;
    const int64_t S = n / T;
    if (S >= 4 * k && run_blocked(row, n, S, out_v, out_i)) return;
    run_heap(row, n, out_v, out_i);
  }

  // View row[0 : T·S] as T strided slices of length S; group b = {row[t·S + b] : t < T}. The k-th
  // largest group maximum τ is a lower bound on the k-th largest entry (k distinct entries reach
  // it), so only entries >= τ (in groups whose max >= τ, plus the tail) can be selected: a few times
  // k candidates, ranked exactly as the heap would. The group maxima pass is contiguous and
  // vectorises. Returns false (caller uses the heap) when the row holds a NaN.
  bool run_blocked(const scalar_t* row, int64_t n, int64_t S, scalar_t* out_v, int64_t* out_i) {
    constexpr int64_t T = 16;
    gmax.resize(S);
    key_t* m = gmax.data();
    int nan = 0;
    for (int64_t b = 0; b < S; ++b) {
      const key_t x = static_cast<key_t>(row[b]);
      m[b] = x;
      nan += x != x;
    }
    for (int64_t t = 1; t < T; ++t) {
      const scalar_t* r = row + t * S;
      for (int64_t b = 0; b < S; ++b) {
        const key_t x = static_cast<key_t>(r[b]);
        m[b] = x > m[b] ? x : m[b];
        nan += x != x;
      }
    }
    for (int64_t i = T * S; i < n; ++i) nan += row[i] != row[i];
    if (nan) return false;
    sel.assign(gmax.begin(), gmax.end());
    std::nth_element(sel.begin(), sel.begin() + (k - 1), sel.end(), std::greater<key_t>());
    const key_t tau = sel[k - 1];
    heap.clear();  // reused as the candidate list
    for (int64_t b = 0; b < S; ++b) {
      if (!(m[b] >= tau)) continue;
      for (int64_t t = 0; t < T; ++t) {
        const key_t x = static_cast<key_t>(row[t * S + b]);
        if (x >= tau) heap.push_back({x, t * S + b, false});
      }
    }
    for (int64_t i = T * S; i < n; ++i) {
      const key_t x = static_cast<key_t>(row[i]);
      if (x >= tau) heap.push_back({x, i, false});
    }
    std::partial_sort(heap.begin(), heap.begin() + k, heap.end(), better);
    for (int64_t j = 0; j < k; ++j) {
      out_v[j] = row[heap[j].i];
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
};

}  // namespace fastsae
