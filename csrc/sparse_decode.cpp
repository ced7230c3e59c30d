// Sparse decode: a gather-sum of decoder rows, k (or L0) rows per example instead of a dense
// [B, d_sae] @ [d_sae, d_in] matmul.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.h"

namespace fastsae {

at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                             const std::optional<at::Tensor>& b_dec) {
  TORCH_CHECK(values.dim() == 2, "sparse_decode: values must be [B, k], got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), "sparse_decode: indices ", indices.sizes(),
              " must have the shape of values ", values.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "sparse_decode: indices must be int64");
  TORCH_CHECK(W_dec.dim() == 2, "sparse_decode: W_dec must be [d_sae, d_in], got ", W_dec.sizes());
  TORCH_CHECK(values.scalar_type() == W_dec.scalar_type(), "sparse_decode: values and W_dec dtypes differ");
  const int64_t B = values.size(0), K = values.size(1), d_sae = W_dec.size(0), d_in = W_dec.size(1);
  if (b_dec.has_value()) {
    TORCH_CHECK(b_dec->dim() == 1 && b_dec->size(0) == d_in, "sparse_decode: b_dec must be [", d_in, "]");
    TORCH_CHECK(b_dec->scalar_type() == W_dec.scalar_type(), "sparse_decode: b_dec and W_dec dtypes differ");
  }
  auto v = values.contiguous();
  auto idx = indices.contiguous();
  auto W = W_dec.contiguous();
  at::Tensor bias = b_dec.has_value() ? b_dec->contiguous() : at::Tensor();
  check_index_range(idx, d_sae, "sparse_decode", "indices");

  auto out = at::empty({B, d_in}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "sparse_decode_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* Wp = W.data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d_in);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t i = 0; i < d_in; ++i) acc[i] = bp ? static_cast<acc_t>(bp[i]) : acc_t(0);
        for (int64_t j = 0; j < K; ++j) {
          const acc_t a = static_cast<acc_t>(vp[b * K + j]);
          if (a == acc_t(0)) continue;  // padding and inactive window entries
          const scalar_t* row = Wp + ip[b * K + j] * d_in;
          for (int64_t i = 0; i < d_in; ++i) acc[i] += a * static_cast<acc_t>(row[i]);
        }
        for (int64_t i = 0; i < d_in; ++i) op[b * d_in + i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) { m.impl("sparse_decode", &sparse_decode_cpu); }

}  // namespace fastsae
