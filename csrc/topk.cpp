// Row-wise top-k selection (csrc/topk.h): a vectorised pass of group maxima bounds the k-th value,
// then only the few entries above that bound are ranked; rows too short for it (or holding a NaN)
// use a one-pass k-entry heap.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "topk.h"

namespace fastsae {

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& pre, int64_t k) {
  TORCH_CHECK(pre.dim() == 2, "topk: pre must be [rows, d_sae], got ", pre.sizes());
  const int64_t rows = pre.size(0), n = pre.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "topk: k must lie in 1..d_sae=", n, ", got ", k);
  auto p = pre.contiguous();
  auto values = at::empty({rows, k}, pre.options());
  auto indices = at::empty({rows, k}, pre.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "topk_cpu", [&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    parallel_tasks(rows, 16, [&](int64_t begin, int64_t end) {
      TopK<scalar_t> sel(k);
      for (int64_t r = begin; r < end; ++r) sel.run(pp + r * n, n, vp + r * k, ip + r * k);
    });
  });
  return {values, indices};
}

// grad_pre [rows, d_sae]: zeros except grad_values scattered to the kept indices.
at::Tensor topk_backward_cpu(const at::Tensor& grad_values, const at::Tensor& indices, int64_t d_sae) {
  TORCH_CHECK(grad_values.dim() == 2, "topk_backward: grad_values must be [rows, k], got ", grad_values.sizes());
  TORCH_CHECK(indices.sizes() == grad_values.sizes(), "topk_backward: indices must have the shape of grad_values");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "topk_backward: indices must be int64");
  TORCH_CHECK(d_sae >= 0, "topk_backward: d_sae must be >= 0");
  auto g = grad_values.contiguous();
  auto idx = indices.contiguous();
  check_index_range(idx, d_sae, "topk_backward", "indices");
  const int64_t rows = g.size(0), k = g.size(1);
  auto out = at::zeros({rows, d_sae}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "topk_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < k; ++j) op[r * d_sae + ip[r * k + j]] += gp[r * k + j];
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("topk", &topk_cpu);
  m.impl("topk_backward", &topk_backward_cpu);
}

}  // namespace fastsae
