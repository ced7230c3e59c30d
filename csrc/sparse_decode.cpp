// Sparse decode: a gather-sum of decoder rows, k (or L0) rows per example instead of a dense
// [B, d_sae] @ [d_sae, d_in] matmul; its backward is an SDDMM (grad of values: row-gathered dot
// products) and a scatter-add (grad of W_dec), written per latent so no two threads share a row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.h"

namespace fastsae {

namespace {

void check_decode_args(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                       const char* op) {
  TORCH_CHECK(values.dim() == 2, op, ": values must be [B, k], got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), op, ": indices ", indices.sizes(),
              " must have the shape of values ", values.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64");
  TORCH_CHECK(W_dec.dim() == 2, op, ": W_dec must be [d_sae, d_in], got ", W_dec.sizes());
  check_same_dtype(values, W_dec, op, "values", "W_dec");
}

}  // namespace

at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                             const std::optional<at::Tensor>& b_dec) {
  check_decode_args(values, indices, W_dec, "sparse_decode");
  const int64_t B = values.size(0), K = values.size(1), d_sae = W_dec.size(0), d_in = W_dec.size(1);
  if (b_dec.has_value()) {
    check_vector(*b_dec, d_in, "sparse_decode", "b_dec");
    check_same_dtype(*b_dec, W_dec, "sparse_decode", "b_dec", "W_dec");
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
    parallel_tasks(B, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d_in);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t i = 0; i < d_in; ++i) acc[i] = bp ? static_cast<acc_t>(bp[i]) : acc_t(0);
        for (int64_t j = 0; j < K; ++j) {
          const acc_t a = static_cast<acc_t>(vp[b * K + j]);
          if (a == acc_t(0)) continue;  // padding and inactive window entries
          axpy<scalar_t, acc_t>(acc.data(), a, Wp + ip[b * K + j] * d_in, d_in);
        }
        for (int64_t i = 0; i < d_in; ++i) op[b * d_in + i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return out;
}

// (grad_values [B, k] or empty, grad_W_dec [d_sae, d_in] or empty)
std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cpu(const at::Tensor& grad, const at::Tensor& values,
                                                              const at::Tensor& indices, const at::Tensor& W_dec,
                                                              bool need_values, bool need_W_dec) {
  const char* op = "sparse_decode_backward";
  check_decode_args(values, indices, W_dec, op);
  const int64_t B = values.size(0), K = values.size(1), d_sae = W_dec.size(0), d_in = W_dec.size(1);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == d_in, op, ": grad must be [", B, ", ", d_in,
              "], got ", grad.sizes());
  check_same_dtype(grad, W_dec, op, "grad", "W_dec");
  auto g = grad.contiguous();
  auto v = values.contiguous();
  auto idx = indices.contiguous();
  auto W = W_dec.contiguous();
  check_index_range(idx, d_sae, op, "indices");

  at::Tensor grad_values = need_values ? at::empty({B, K}, values.options()) : at::empty({0}, values.options());
  at::Tensor grad_W = need_W_dec ? at::empty({d_sae, d_in}, W_dec.options()) : at::empty({0}, W_dec.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "sparse_decode_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* Wp = W.data_ptr<scalar_t>();
    if (need_values) {
      // SDDMM: d x_hat[b] / d values[b, j] = W_dec[indices[b, j]] . grad[b]
      scalar_t* gv = grad_values.data_ptr<scalar_t>();
      parallel_tasks(B, 16, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b)
          for (int64_t j = 0; j < K; ++j)
            gv[b * K + j] = static_cast<scalar_t>(dot<scalar_t, acc_t>(gp + b * d_in, Wp + ip[b * K + j] * d_in, d_in));
      });
    }
    if (need_W_dec) {
      // grad_W_dec[l] = sum over entries e with indices[e] == l of values[e] * grad[row(e)]
      const ByLatent by = group_by_latent(ip, B * K, d_sae);
      scalar_t* gw = grad_W.data_ptr<scalar_t>();
      parallel_tasks(d_sae, 64, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(d_in);
        for (int64_t l = begin; l < end; ++l) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t s = by.start[l]; s < by.start[l + 1]; ++s) {
            const int64_t e = by.entry[s];
            axpy<scalar_t, acc_t>(acc.data(), static_cast<acc_t>(vp[e]), gp + (e / K) * d_in, d_in);
          }
          for (int64_t i = 0; i < d_in; ++i) gw[l * d_in + i] = static_cast<scalar_t>(acc[i]);
        }
      });
    }
  });
  return {grad_values, grad_W};
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("sparse_decode", &sparse_decode_cpu);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cpu);
}

}  // namespace fastsae
