#pragma once
// The per-row top-k selector shared by the topk op and the fused topk_sae encoder.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fastsae {

template <typename scalar_t>
struct TopK {
  using key_t = at::opmath_type<scalar_t>;
  struct Entry {
    key_t v;
    int64_t i;
  };
  // `a` ranks before `b`: larger value first, ties by lower index. NaN is given key +inf (torch
  // ranks NaN largest), so this stays a strict weak order and the std:: heap/sort never misbehave.
  static bool better(const Entry& a, const Entry& b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }
  static key_t key(scalar_t x) {
    const key_t v = static_cast<key_t>(x);
    return std::isnan(v) ? std::numeric_limits<key_t>::infinity() : v;
  }

  explicit TopK(int64_t k) : k(k) { heap.reserve(k); }

  // The k best entries of row[0:n] (k <= n), written sorted best-first to out_v / out_i.
  void run(const scalar_t* row, int64_t n, scalar_t* out_v, int64_t* out_i) {
    heap.clear();
    for (int64_t i = 0; i < k; ++i) heap.push_back({key(row[i]), i});
    std::make_heap(heap.begin(), heap.end(), better);  // front() = the worst kept entry
    key_t worst = heap.front().v;
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
    const key_t v = key(row[i]);
    if (!(v > worst)) return;  // equal values keep the earlier (lower) index
    std::pop_heap(heap.begin(), heap.end(), better);
    heap.back() = {v, i};
    std::push_heap(heap.begin(), heap.end(), better);
    worst = heap.front().v;
  }

  int64_t k;
  std::vector<Entry> heap;
};

}  // namespace fastsae
