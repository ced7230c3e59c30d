#pragma once
#include <ATen/ATen.h>

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

}  // namespace fastsae
