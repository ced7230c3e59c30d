// Inference encoders of every architecture: the encoder GEMM in row slabs, each slab reduced to its
// code while it is in cache (DESIGN.md §2), with no other [B, d_sae] tensor.
//   dense = true:  the slabs are rows of the dense output f [B, d_sae], thresholded in place.
//   dense = false: padded (values, indices) [B, K] of the nonzero entries, K = the longest row (TopK: k,
//                  sorted descending); with W_dec also x̂ = decode(code) + b_dec, each row decoded as
//                  soon as its entries are known.
// Outputs not asked for are empty [0] tensors.
//   threshold_encode: f = pre · H(pre - θ_j) — JumpReLU, ReLU (θ = 0), a calibrated BatchTopK (θ = τ);
//   gated_encode:     f = H(π_gate) · relu(π_mag) from one GEMM (π_mag = exp(r_mag)·z + b_mag);
//   topk_encode:      relu of each row's k largest;  batchtopk_encode: the batch's B·k largest.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "encoder.h"
#include "topk.h"

namespace fastsae {

namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor none_like(const at::Tensor& x, at::ScalarType dtype) { return at::empty({0}, x.options().dtype(dtype)); }

// Padded [B, K] from CSR by row (K = the longest row), and x̂ if W_dec is given (BatchTopK: the rows are known
// only once the whole batch is selected).
template <typename scalar_t>
Outputs padded_from_csr(const std::vector<int64_t>& rp, const std::vector<int64_t>& cols,
                        const std::vector<scalar_t>& vals, const at::Tensor& x, const at::Tensor& W_dec,
                        const at::Tensor& b_dec) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = static_cast<int64_t>(rp.size()) - 1, d_in = x.size(1);
  int64_t K = 0;
  for (int64_t b = 0; b < B; ++b) K = std::max(K, rp[b + 1] - rp[b]);
  auto values = at::zeros({B, K}, x.options());
  auto indices = at::zeros({B, K}, x.options().dtype(at::kLong));
  at::Tensor x_hat = W_dec.defined() ? at::empty({B, d_in}, x.options()) : none_like(x, x.scalar_type());
  scalar_t* vp = values.data_ptr<scalar_t>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::Tensor Wd = W_dec.defined() ? W_dec.contiguous() : at::Tensor();
  at::Tensor bd = b_dec.contiguous();
  parallel_tasks(B, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(x_hat.numel() ? d_in : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = rp[b + 1] - rp[b];
      if (n) {
        std::memcpy(vp + b * K, vals.data() + rp[b], n * sizeof(scalar_t));
        std::memcpy(ip + b * K, cols.data() + rp[b], n * sizeof(int64_t));
      }
      if (x_hat.numel())
        decode_row<scalar_t, acc_t>(d_in, cols.data() + rp[b], vals.data() + rp[b], n, Wd.data_ptr<scalar_t>(),
                                    bd.data_ptr<scalar_t>(), acc.data(), x_hat.data_ptr<scalar_t>() + b * d_in);
    }
  });
  return {values, indices, x_hat};
}

// The shared body of threshold_encode and gated_encode: keep(row, cand, entries) fills one row's entries
// (nonzero values, latent order) from its slab row (a RowRef); apply_dense(row) thresholds a row of f in place.
template <typename scalar_t, typename Keep, typename Dense>
Outputs select_encode(const at::Tensor& x_in, const at::Tensor& x, const at::Tensor& W, const at::Tensor& bias,
                      const at::Tensor& W_dec, const at::Tensor& b_dec, bool dense, Keep&& keep, Dense&& apply_dense) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x_in.size(0), d_in = x_in.size(1), d_sae = W.size(1);
  if (dense) {
    auto f = at::empty({B, d_sae}, x.options());
    for_each_slab(x_in, W, bias, f, [&](const Slab& slab) {
      parallel_tasks(slab.rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) apply_dense(slab.row<scalar_t>(r));
      });
    });
    return {f, none_like(x, at::kLong), none_like(x, x.scalar_type())};
  }
  const bool decode = W_dec.defined();
  at::Tensor x_hat = decode ? at::empty({B, d_in}, x.options()) : none_like(x, x.scalar_type());
  const scalar_t* Wp = decode ? W_dec.data_ptr<scalar_t>() : nullptr;
  const scalar_t* bp = b_dec.data_ptr<scalar_t>();
  CsrBuilder<scalar_t> csr(B, false, false);
  auto post = [&](int64_t b, const Entry<scalar_t>* e, int64_t n, acc_t* acc) {
    if (decode) decode_entries<scalar_t, acc_t>(d_in, e, n, Wp, bp, acc, x_hat.data_ptr<scalar_t>() + b * d_in);
  };
  compact_rows<scalar_t>(x_in, W, bias, csr, keep, post);
  auto [values, indices] = csr.padded(x.options());
  return {values, indices, x_hat};
}

at::Tensor checked_decoder(const std::optional<at::Tensor>& W_dec, const at::Tensor& x, int64_t d_sae,
                           const char* op) {
  if (!W_dec.has_value()) return at::Tensor();
  TORCH_CHECK(W_dec->dim() == 2 && W_dec->size(0) == d_sae && W_dec->size(1) == x.size(1), op,
              ": W_dec must be [", d_sae, ", ", x.size(1), "], got ", W_dec->sizes());
  check_same_dtype(*W_dec, x, op, "W_dec", "x");
  return W_dec->contiguous();
}

}  // namespace

Outputs threshold_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                             const at::Tensor& b_dec, const at::Tensor& threshold, bool apply_b_dec_to_input,
                             const std::optional<at::Tensor>& W_dec, bool dense) {
  const char* op = "threshold_encode";
  const SaeInputs in = prepare_sae(x, W_enc, b_enc, at::Tensor(), b_dec, apply_b_dec_to_input, op);
  const int64_t d_sae = in.d_sae;
  auto Wd = checked_decoder(W_dec, x, d_sae, op);
  auto th = latent_vector(threshold, d_sae, wide_type(x.scalar_type(), threshold.scalar_type()), op, "threshold");
  const at::Tensor& x_in = in.x_in;
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "threshold_encode", [&] {
    dispatch_wide(th.scalar_type(), [&](auto wide_tag) {
      using wide_t = decltype(wide_tag);
      const JumpSelect<wide_t> sel(th.data_ptr<wide_t>(), nullptr, d_sae);
      const std::vector<wide_t> lo = raw_bounds<scalar_t, wide_t>(sel.lo.data(), x_in, b_enc, d_sae);
      auto keep = [&](const RowRef<scalar_t>& row, int64_t* cand, std::vector<Entry<scalar_t>>& e) {
        const int64_t nc = candidates<scalar_t, wide_t>(row.z, lo.data(), d_sae, cand);
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t j = cand[c];
          const scalar_t v = row[j];
          if (sel.classify(static_cast<wide_t>(v), j) && v != scalar_t(0)) e.push_back({j, v, scalar_t(0), kActive});
        }
      };
      auto apply_dense = [&](scalar_t* row) {
        for (int64_t j = 0; j < d_sae; ++j) row[j] = static_cast<wide_t>(row[j]) > sel.th[j] ? row[j] : scalar_t(0);
      };
      out = select_encode<scalar_t>(x_in, x, W_enc, b_enc, Wd, b_dec, dense, keep, apply_dense);
    });
  });
  return out;
}

Outputs gated_encode_cpu(const at::Tensor& x, const at::Tensor& W_gate, const at::Tensor& b_gate,
                         const at::Tensor& r_mag, const at::Tensor& b_mag, const at::Tensor& b_dec,
                         bool apply_b_dec_to_input, const std::optional<at::Tensor>& W_dec, bool dense) {
  const char* op = "gated_encode";
  const SaeInputs in = prepare_sae(x, W_gate, b_gate, at::Tensor(), b_dec, apply_b_dec_to_input, op);
  const int64_t d_sae = in.d_sae;
  check_gated(r_mag, b_mag, x, d_sae, op);
  auto Wd = checked_decoder(W_dec, x, d_sae, op);
  const at::Tensor& x_in = in.x_in;
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "gated_encode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto bg = b_gate.contiguous(), rm = r_mag.contiguous(), bm = b_mag.contiguous();
    const GatedSelect<acc_t> sel(bg.data_ptr<scalar_t>(), rm.data_ptr<scalar_t>(), bm.data_ptr<scalar_t>(), d_sae);
    auto keep = [&](const RowRef<scalar_t>& row, int64_t* cand, std::vector<Entry<scalar_t>>& e) {
      const int64_t nc = candidates<scalar_t, acc_t>(row.z, sel.lo.data(), d_sae, cand);  // no GEMM bias: row.z
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t j = cand[c];
        const acc_t z = static_cast<acc_t>(row.z[j]);
        if (!sel.gate(z, j)) continue;
        const scalar_t f = static_cast<scalar_t>(sel.mag(z, j));
        if (f != scalar_t(0)) e.push_back({j, f, scalar_t(0), kActive});
      }
    };
    auto apply_dense = [&](scalar_t* row) {
      for (int64_t j = 0; j < d_sae; ++j) {
        const acc_t z = static_cast<acc_t>(row[j]);
        row[j] = sel.gate(z, j) ? static_cast<scalar_t>(sel.mag(z, j)) : scalar_t(0);
      }
    };
    out = select_encode<scalar_t>(x_in, x, W_gate, at::Tensor(), Wd, b_dec, dense, keep, apply_dense);
  });
  return out;
}

Outputs topk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                        const at::Tensor& b_dec, int64_t k, bool apply_b_dec_to_input,
                        const std::optional<at::Tensor>& W_dec, bool dense) {
  const char* op = "topk_encode";
  const SaeInputs in = prepare_sae(x, W_enc, b_enc, at::Tensor(), b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_in = in.d_in, d_sae = in.d_sae;
  check_k(k, d_sae, op);
  auto Wd = checked_decoder(W_dec, x, d_sae, op);
  const at::Tensor& x_in = in.x_in;
  const auto opt = x.options();
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "topk_encode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool decode = !dense && Wd.defined();
    auto f = dense ? at::empty({B, d_sae}, opt) : at::Tensor();
    auto values = dense ? none_like(x, x.scalar_type()) : at::empty({B, k}, opt);
    auto indices = dense ? none_like(x, at::kLong) : at::empty({B, k}, opt.dtype(at::kLong));
    auto x_hat = decode ? at::empty({B, d_in}, opt) : none_like(x, x.scalar_type());
    const scalar_t* Wp = decode ? Wd.data_ptr<scalar_t>() : nullptr;
    auto bd = b_dec.contiguous();
    for_each_slab(x_in, W_enc, b_enc, f, [&](const Slab& slab) {
      parallel_tasks(slab.rows, 16, [&](int64_t begin, int64_t end) {
        TopK<scalar_t> sel(k);
        std::vector<scalar_t> tv(dense ? k : 0);
        std::vector<int64_t> ti(dense ? k : 0);
        std::vector<acc_t> acc(decode ? d_in : 0);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = slab.r0 + r;
          // the dense output is written over its own row (biased in place); the sparse one only reads it
          scalar_t* row = dense ? slab.row<scalar_t>(r) : nullptr;
          scalar_t* v = dense ? tv.data() : values.data_ptr<scalar_t>() + b * k;
          int64_t* i = dense ? ti.data() : indices.data_ptr<int64_t>() + b * k;
          if (dense)
            sel.run(row, d_sae, v, i);
          else
            sel.run(slab.raw_row<scalar_t>(r), d_sae, v, i, slab.pending_bias<scalar_t>());
          for (int64_t j = 0; j < k; ++j)
            if (v[j] < scalar_t(0)) v[j] = scalar_t(0);
          if (dense) {
            std::fill(row, row + d_sae, scalar_t(0));
            for (int64_t j = 0; j < k; ++j) row[i[j]] = v[j];
          }
          if (decode)
            decode_row<scalar_t, acc_t>(d_in, i, v, k, Wp, bd.data_ptr<scalar_t>(), acc.data(),
                                        x_hat.data_ptr<scalar_t>() + b * d_in);
        }
      });
    });
    out = {dense ? f : values, indices, x_hat};
  });
  return out;
}

Outputs batchtopk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                             const at::Tensor& b_dec, int64_t k, bool apply_b_dec_to_input,
                             const std::optional<at::Tensor>& W_dec, bool dense) {
  const char* op = "batchtopk_encode";
  const SaeInputs in = prepare_sae(x, W_enc, b_enc, at::Tensor(), b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_sae = in.d_sae;
  check_k(k, d_sae, op);
  auto Wd = checked_decoder(W_dec, x, d_sae, op);
  const at::Tensor& x_in = in.x_in;
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "batchtopk_encode", [&] {
    std::vector<int64_t> rp, cols;
    std::vector<scalar_t> vals;
    batch_topk_entries<scalar_t>(x_in, W_enc, b_enc, k, 0.0, rp, cols, vals);
    if (dense) {
      auto f = at::zeros({B, d_sae}, x.options());
      scalar_t* fp = f.data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t e = rp[b]; e < rp[b + 1]; ++e) fp[b * d_sae + cols[e]] = vals[e];
      out = {f, none_like(x, at::kLong), none_like(x, x.scalar_type())};
    } else {
      out = padded_from_csr<scalar_t>(rp, cols, vals, x, Wd, b_dec);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("threshold_encode", &threshold_encode_cpu);
  m.impl("gated_encode", &gated_encode_cpu);
  m.impl("topk_encode", &topk_encode_cpu);
  m.impl("batchtopk_encode", &batchtopk_encode_cpu);
}

}  // namespace fastsae
