// Fused sparse SAE training steps (DESIGN.md §2): the only dense [B, d_sae] work is the encoder
// GEMM, run in row slabs that stay in cache; each slab is immediately compacted into per-row lists of
// the entries the backward needs (and those rows decoded while their entries are at hand), and nothing
// of size [B, d_sae] survives the forward.
//
//   JumpReLU:  entries = active ∪ window (|pre - θ| < ε/2). An inactive window entry carries value 0,
//              so decode skips it, but the backward still computes ∂L/∂f there for the θ-gradient.
//   TopK:      the k selected latents of each row (relu'd values).
//   BatchTopK: the B·k largest relu'd pre-activations of the batch: a global bound rises slab by slab
//              (the (B·k)-th largest value seen so far can only be below the final one), so only
//              entries above it are kept; the exact B·k are selected at the end.
//   ReLU:      pre > 0; sparsity_b = Σ f_bj · w_j (w = decoder row norms) is computed here too.
//   Gated:     open gates π_gate > 0; one GEMM z = x_in · W_gate serves gate and magnitude
//              (π_mag = exp(r_mag)·z + b_mag), and x̂, x̂_frozen (relu(π_gate) through the same decoder
//              rows) and the L1 of relu(π_gate) are all sums over the open gates.
//
// Backward: csrc/backward.h, one engine with a rule per architecture.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>

#include "backward.h"
#include "common.h"
#include "encoder.h"
#include "topk.h"

namespace fastsae {

namespace {

at::Tensor fired_from(const std::vector<int64_t>& cols, const std::vector<uint8_t>* flags, int64_t d_sae,
                      const at::TensorOptions& opt) {
  auto fired = at::zeros({d_sae}, opt.dtype(at::kBool));
  bool* fp = fired.data_ptr<bool>();
  for (size_t e = 0; e < cols.size(); ++e)
    if (!flags || ((*flags)[e] & kActive)) fp[cols[e]] = true;
  return fired;
}

}  // namespace

// ---- the batch-wide top-k selection (training, and inference before calibration) -------------------

// Kept entries of relu(x_in · W + b) [B, d_sae]: the n_keep = min(B·k, B·d_sae) largest, as CSR by row
// in latent order. Entries <= 0 are never kept (they carry no value and no gradient). Ties at the
// boundary are broken by the lower flat index, so the result is a deterministic function of the batch.
//
// `bound_hint` (> 0: a guess at a value below the final n_keep-th, such as a fraction of the previous step's
// smallest kept value) is the scan's starting bound instead of 0: from the first slab on only the entries above
// it are candidates, where a bound that starts at 0 rises to the final one only slab by slab (about 5·n_keep
// candidates copied, pruned and ranked; 30% of a step at d_sae 8192, k 32). The result does not depend on it:
// when at least n_keep entries are above the hint the n_keep-th largest is too, and otherwise the selection
// runs again from 0 (its GEMM included).
template <typename scalar_t>
void batch_topk_entries(const at::Tensor& x_in, const at::Tensor& W, const at::Tensor& b, int64_t k,
                        double bound_hint, std::vector<int64_t>& row_ptr, std::vector<int64_t>& cols,
                        std::vector<scalar_t>& vals) {
  using key_t = at::opmath_type<scalar_t>;
  struct Cand {
    int64_t flat;  // row * d_sae + col
    key_t v;
  };
  const int64_t B = x_in.size(0), d_sae = W.size(1);
  const int64_t n_keep = std::min(B * k, B * d_sae);
  const key_t hint = std::isfinite(bound_hint) && bound_hint > 0 ? static_cast<key_t>(bound_hint) : key_t(0);
  // Candidates are appended (and pruned) under `mu`. `lo` only rises: every value it takes is the n_keep-th
  // largest of a subset of the batch, so never above the final one (the hint excepted: checked below).
  std::vector<Cand> all;
  std::mutex mu;
  std::atomic<key_t> lo{hint};  // keep v > lo
  auto prune = [&] {  // under mu
    std::vector<key_t> tmp(all.size());
    for (size_t e = 0; e < all.size(); ++e) tmp[e] = all[e].v;
    std::nth_element(tmp.begin(), tmp.begin() + (n_keep - 1), tmp.end(), std::greater<key_t>());
    const key_t p = tmp[n_keep - 1];
    all.erase(std::remove_if(all.begin(), all.end(), [&](const Cand& c) { return c.v < p; }), all.end());
    lo.store(std::max(lo.load(), std::nextafter(p, -std::numeric_limits<key_t>::infinity())));
  };
  for_each_slab(x_in, W, b, at::Tensor(), [&](const Slab& slab) {
    parallel_tasks(slab.rows, 16, [&](int64_t begin, int64_t end) {
      const key_t bound = lo.load();
      std::vector<int64_t> cand(d_sae);
      std::vector<Cand> local;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = slab.row<scalar_t>(r);
        const int64_t nc = candidates_above<scalar_t, key_t>(row, bound, d_sae, cand.data());
        for (int64_t t = 0; t < nc; ++t)
          local.push_back({(slab.r0 + r) * d_sae + cand[t], static_cast<key_t>(row[cand[t]])});
      }
      std::lock_guard<std::mutex> lock(mu);
      all.insert(all.end(), local.begin(), local.end());
    });
    std::lock_guard<std::mutex> lock(mu);
    if (n_keep > 0 && static_cast<int64_t>(all.size()) > 2 * n_keep) prune();
  });
  if (hint > key_t(0) && static_cast<int64_t>(all.size()) < n_keep) {
    batch_topk_entries<scalar_t>(x_in, W, b, k, 0.0, row_ptr, cols, vals);  // the hint was above the final bound
    return;
  }
  // The exact n_keep: rank by value, ties by the lower flat index.
  auto better = [](const Cand& a, const Cand& c) { return a.v > c.v || (a.v == c.v && a.flat < c.flat); };
  if (static_cast<int64_t>(all.size()) > n_keep) {
    if (n_keep > 0) {
      std::nth_element(all.begin(), all.begin() + (n_keep - 1), all.end(), better);
      all.resize(n_keep);
    } else {
      all.clear();
    }
  }
  // CSR by row, latents in order: a counting sort by row, then each row's few entries by latent.
  row_ptr.assign(B + 1, 0);
  for (const Cand& c : all) ++row_ptr[c.flat / d_sae + 1];
  for (int64_t r = 0; r < B; ++r) row_ptr[r + 1] += row_ptr[r];
  std::vector<Cand> by_row(all.size());
  {
    std::vector<int64_t> fill(row_ptr.begin(), row_ptr.end() - 1);
    for (const Cand& c : all) by_row[fill[c.flat / d_sae]++] = c;
  }
  cols.resize(all.size());
  vals.resize(all.size());
  parallel_tasks(B, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::sort(by_row.begin() + row_ptr[r], by_row.begin() + row_ptr[r + 1],
                [](const Cand& a, const Cand& c) { return a.flat < c.flat; });
      for (int64_t e = row_ptr[r]; e < row_ptr[r + 1]; ++e) {
        cols[e] = by_row[e].flat - r * d_sae;
        vals[e] = static_cast<scalar_t>(by_row[e].v);
      }
    }
  });
}

template void batch_topk_entries<float>(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                                        std::vector<int64_t>&, std::vector<int64_t>&, std::vector<float>&);
template void batch_topk_entries<double>(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                                         std::vector<int64_t>&, std::vector<int64_t>&, std::vector<double>&);
template void batch_topk_entries<at::BFloat16>(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                                               std::vector<int64_t>&, std::vector<int64_t>&,
                                               std::vector<at::BFloat16>&);

// ---- forwards -----------------------------------------------------------------------------------------

// (x_hat [B, d_in], l0 [B] float32, fired [d_sae] bool, row_ptr [B+1], cols [nnz], values [nnz], flags [nnz] uint8)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> jumprelu_sae_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& W_dec,
    const at::Tensor& b_dec, const at::Tensor& threshold, const at::Tensor& bandwidth, bool apply_b_dec_to_input,
    bool /*straight_through: used by the backward*/) {
  const char* op = "jumprelu_sae";
  const SaeInputs in = prepare_sae(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_in = in.d_in, d_sae = in.d_sae;
  auto [th, eps] = latent_params(threshold, bandwidth, d_sae, x.scalar_type(), op);
  const at::Tensor& x_in = in.x_in;
  const at::Tensor& Wd = in.W_dec;
  const at::Tensor& bd = in.b_dec;
  const auto opt = x.options();
  auto l0 = at::empty({B}, opt.dtype(at::kFloat));
  auto x_hat = at::empty({B, d_in}, opt);
  at::Tensor row_ptr, cols, vals, flags, fired;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "jumprelu_sae", [&] {
    dispatch_wide(th.scalar_type(), [&](auto wide_tag) {
      using wide_t = decltype(wide_tag);
      using acc_t = at::opmath_type<scalar_t>;
      const JumpSelect<wide_t> sel(th.data_ptr<wide_t>(), eps.data_ptr<wide_t>(), d_sae);
      const scalar_t* W = Wd.data_ptr<scalar_t>();
      const scalar_t* bias = bd.data_ptr<scalar_t>();
      scalar_t* xh = x_hat.data_ptr<scalar_t>();
      float* l0p = l0.data_ptr<float>();
      CsrBuilder<scalar_t> csr(B, false, true);
      const std::vector<wide_t> lo = raw_bounds<scalar_t, wide_t>(sel.lo.data(), x_in, b_enc, d_sae);
      auto keep = [&](const RowRef<scalar_t>& row, int64_t* cand, std::vector<Entry<scalar_t>>& out) {
        const int64_t nc = candidates<scalar_t, wide_t>(row.z, lo.data(), d_sae, cand);
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t j = cand[c];
          const scalar_t v = row[j];
          const uint8_t f = sel.classify(static_cast<wide_t>(v), j);
          if (f) out.push_back({j, (f & kActive) ? v : scalar_t(0), scalar_t(0), f});
        }
      };
      auto post = [&](int64_t b, const Entry<scalar_t>* e, int64_t n, acc_t* acc) {
        int64_t act = 0;
        for (int64_t t = 0; t < n; ++t) act += e[t].flags & kActive;
        l0p[b] = static_cast<float>(act);
        decode_entries<scalar_t, acc_t>(d_in, e, n, W, bias, acc, xh + b * d_in);
      };
      compact_rows<scalar_t>(x_in, W_enc, b_enc, csr, keep, post);
      csr.finish(opt, d_sae, [](const Entry<scalar_t>& e) { return (e.flags & kActive) != 0; });
      fired = csr.fired;
      row_ptr = csr.row_ptr;
      cols = csr.cols;
      vals = csr.v0;
      flags = csr.flags;
    });
  });
  return {x_hat, l0, fired, row_ptr, cols, vals, flags};
}

// (x_hat [B, d_in], values [B, k], indices [B, k], l0 [B] float32, fired [d_sae] bool)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_sae_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& W_dec,
    const at::Tensor& b_dec, int64_t k, bool apply_b_dec_to_input) {
  const char* op = "topk_sae";
  const SaeInputs in = prepare_sae(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_in = in.d_in, d_sae = in.d_sae;
  check_k(k, d_sae, op);
  const at::Tensor& x_in = in.x_in;
  const at::Tensor& Wd = in.W_dec;
  const at::Tensor& bd = in.b_dec;
  const auto opt = x.options();
  auto values = at::empty({B, k}, opt);
  auto indices = at::empty({B, k}, opt.dtype(at::kLong));
  auto l0 = at::empty({B}, opt.dtype(at::kFloat));
  auto fired = at::zeros({d_sae}, opt.dtype(at::kBool));
  auto x_hat = at::empty({B, d_in}, opt);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "topk_sae", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    float* l0p = l0.data_ptr<float>();
    const scalar_t* W = Wd.data_ptr<scalar_t>();
    const scalar_t* bias = bd.data_ptr<scalar_t>();
    scalar_t* xh = x_hat.data_ptr<scalar_t>();
    for_each_slab(x_in, W_enc, b_enc, at::Tensor(), [&](const Slab& slab) {
      parallel_tasks(slab.rows, 16, [&](int64_t begin, int64_t end) {
        TopK<scalar_t> sel(k);
        std::vector<acc_t> acc(d_in);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = slab.r0 + r;
          sel.run(slab.raw_row<scalar_t>(r), d_sae, vp + b * k, ip + b * k, slab.pending_bias<scalar_t>());
          // relu after selection: the k largest of relu(pre) are relu of the k largest of pre.
          int64_t act = 0;
          for (int64_t j = 0; j < k; ++j) {
            scalar_t& v = vp[b * k + j];
            if (v < scalar_t(0)) v = scalar_t(0);
            act += v > scalar_t(0);
          }
          l0p[b] = static_cast<float>(act);
          decode_row<scalar_t, acc_t>(d_in, ip + b * k, vp + b * k, k, W, bias, acc.data(), xh + b * d_in);
        }
      });
    });
    bool* fp = fired.data_ptr<bool>();
    for (int64_t e = 0; e < B * k; ++e)
      if (vp[e] > scalar_t(0)) fp[ip[e]] = true;
  });
  return {x_hat, values, indices, l0, fired};
}

// (x_hat, l0, fired, row_ptr, cols, values, min_kept [1], or [0] when nothing is kept)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batchtopk_sae_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& W_dec,
    const at::Tensor& b_dec, int64_t k, bool apply_b_dec_to_input, double bound_hint) {
  const char* op = "batchtopk_sae";
  const SaeInputs in = prepare_sae(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_in = in.d_in, d_sae = in.d_sae;
  check_k(k, d_sae, op);
  const at::Tensor& x_in = in.x_in;
  const at::Tensor& Wd = in.W_dec;
  const at::Tensor& bd = in.b_dec;
  const auto opt = x.options();
  auto l0 = at::empty({B}, opt.dtype(at::kFloat));
  auto x_hat = at::empty({B, d_in}, opt);
  at::Tensor row_ptr, cols, vals, fired, min_kept;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "batchtopk_sae", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<int64_t> rp, cs;
    std::vector<scalar_t> vs;
    batch_topk_entries<scalar_t>(x_in, W_enc, b_enc, k, bound_hint, rp, cs, vs);
    const scalar_t* W = Wd.data_ptr<scalar_t>();
    const scalar_t* bias = bd.data_ptr<scalar_t>();
    scalar_t* xh = x_hat.data_ptr<scalar_t>();
    float* l0p = l0.data_ptr<float>();
    parallel_tasks(B, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d_in);
      for (int64_t b = begin; b < end; ++b) {
        l0p[b] = static_cast<float>(rp[b + 1] - rp[b]);
        decode_row<scalar_t, acc_t>(d_in, cs.data() + rp[b], vs.data() + rp[b], rp[b + 1] - rp[b], W, bias,
                                    acc.data(), xh + b * d_in);
      }
    });
    fired = fired_from(cs, nullptr, d_sae, opt);
    if (vs.empty()) {
      min_kept = at::empty({0}, opt);
    } else {
      acc_t m = static_cast<acc_t>(vs[0]);
      for (const scalar_t v : vs) m = std::min(m, static_cast<acc_t>(v));
      min_kept = at::full({1}, static_cast<double>(m), opt);
    }
    row_ptr = vector_to_tensor(rp, opt.dtype(at::kLong));
    cols = vector_to_tensor(cs, opt.dtype(at::kLong));
    vals = vector_to_tensor(vs, opt);
  });
  return {x_hat, l0, fired, row_ptr, cols, vals, min_kept};
}

// (x_hat, sparsity [B] = Σ_j f_bj·w_j, l0 [B] float32, fired, row_ptr, cols, values)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> relu_sae_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& W_dec,
    const at::Tensor& b_dec, const at::Tensor& latent_weight, bool apply_b_dec_to_input) {
  const char* op = "relu_sae";
  const SaeInputs in = prepare_sae(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_in = in.d_in, d_sae = in.d_sae;
  const at::Tensor& x_in = in.x_in;
  const at::Tensor& Wd = in.W_dec;
  const at::Tensor& bd = in.b_dec;
  const auto opt = x.options();
  auto l0 = at::empty({B}, opt.dtype(at::kFloat));
  auto x_hat = at::empty({B, d_in}, opt);
  auto sparsity = at::empty({B}, opt);
  at::Tensor row_ptr, cols, vals, fired;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "relu_sae", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto w_t = latent_vector(latent_weight, d_sae, c10::CppTypeToScalarType<acc_t>::value, op, "latent_weight");
    const acc_t* w = w_t.data_ptr<acc_t>();
    const scalar_t* W = Wd.data_ptr<scalar_t>();
    const scalar_t* bias = bd.data_ptr<scalar_t>();
    scalar_t* xh = x_hat.data_ptr<scalar_t>();
    scalar_t* sp = sparsity.data_ptr<scalar_t>();
    float* l0p = l0.data_ptr<float>();
    CsrBuilder<scalar_t> csr(B, false, false);
    const std::vector<acc_t> zero(d_sae, acc_t(0));
    const std::vector<acc_t> lo = raw_bounds<scalar_t, acc_t>(zero.data(), x_in, b_enc, d_sae);
    auto keep = [&](const RowRef<scalar_t>& row, int64_t* cand, std::vector<Entry<scalar_t>>& out) {
      const int64_t nc = candidates<scalar_t, acc_t>(row.z, lo.data(), d_sae, cand);
      for (int64_t c = 0; c < nc; ++c) {
        const scalar_t v = row[cand[c]];
        if (static_cast<acc_t>(v) > acc_t(0)) out.push_back({cand[c], v, scalar_t(0), kActive});
      }
    };
    auto post = [&](int64_t b, const Entry<scalar_t>* e, int64_t n, acc_t* acc) {
      acc_t s = 0;
      for (int64_t t = 0; t < n; ++t) s += static_cast<acc_t>(e[t].v0) * w[e[t].col];
      sp[b] = static_cast<scalar_t>(s);
      l0p[b] = static_cast<float>(n);
      decode_entries<scalar_t, acc_t>(d_in, e, n, W, bias, acc, xh + b * d_in);
    };
    compact_rows<scalar_t>(x_in, W_enc, b_enc, csr, keep, post);
    csr.finish(opt, d_sae, [](const Entry<scalar_t>&) { return true; });
    fired = csr.fired;
    row_ptr = csr.row_ptr;
    cols = csr.cols;
    vals = csr.v0;
  });
  return {x_hat, sparsity, l0, fired, row_ptr, cols, vals};
}

// (x_hat, x_hat_frozen, sparsity [B] = Σ relu(π_gate), l0 [B] float32, fired, row_ptr, cols,
//  values = relu(π_mag) at the open gates, gate_values = π_gate there)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
gated_sae_cpu(const at::Tensor& x, const at::Tensor& W_gate, const at::Tensor& b_gate, const at::Tensor& r_mag,
              const at::Tensor& b_mag, const at::Tensor& W_dec, const at::Tensor& b_dec, bool apply_b_dec_to_input) {
  const char* op = "gated_sae";
  const SaeInputs in = prepare_sae(x, W_gate, b_gate, W_dec, b_dec, apply_b_dec_to_input, op);
  const int64_t B = in.B, d_in = in.d_in, d_sae = in.d_sae;
  check_gated(r_mag, b_mag, x, d_sae, op);
  const at::Tensor& x_in = in.x_in;
  const at::Tensor& Wd = in.W_dec;
  const at::Tensor& bd = in.b_dec;
  const auto opt = x.options();
  auto l0 = at::empty({B}, opt.dtype(at::kFloat));
  auto x_hat = at::empty({B, d_in}, opt);
  auto x_hat_frozen = at::empty({B, d_in}, opt);
  auto sparsity = at::empty({B}, opt);
  at::Tensor row_ptr, cols, vals, gvals, fired;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "gated_sae", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto bg = b_gate.contiguous(), rm = r_mag.contiguous(), bm = b_mag.contiguous();
    const GatedSelect<acc_t> sel(bg.data_ptr<scalar_t>(), rm.data_ptr<scalar_t>(), bm.data_ptr<scalar_t>(), d_sae);
    const scalar_t* W = Wd.data_ptr<scalar_t>();
    const scalar_t* bias = bd.data_ptr<scalar_t>();
    scalar_t* xh = x_hat.data_ptr<scalar_t>();
    scalar_t* xf = x_hat_frozen.data_ptr<scalar_t>();
    scalar_t* sp = sparsity.data_ptr<scalar_t>();
    float* l0p = l0.data_ptr<float>();
    CsrBuilder<scalar_t> csr(B, true, false);
    auto keep = [&](const RowRef<scalar_t>& row, int64_t* cand, std::vector<Entry<scalar_t>>& out) {
      const int64_t nc = candidates<scalar_t, acc_t>(row.z, sel.lo.data(), d_sae, cand);  // no GEMM bias: row.z
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t j = cand[c];
        const acc_t z = static_cast<acc_t>(row.z[j]);
        if (sel.gate(z, j))
          out.push_back({j, static_cast<scalar_t>(sel.mag(z, j)), static_cast<scalar_t>(sel.pi_gate(z, j)), kActive});
      }
    };
    auto post = [&](int64_t b, const Entry<scalar_t>* e, int64_t n, acc_t* acc) {
      acc_t s = 0;
      int64_t act = 0;
      for (int64_t t = 0; t < n; ++t) {
        s += static_cast<acc_t>(e[t].v1);
        act += static_cast<acc_t>(e[t].v0) > acc_t(0);
      }
      sp[b] = static_cast<scalar_t>(s);
      l0p[b] = static_cast<float>(act);
      decode_entries2<scalar_t, acc_t>(d_in, e, n, W, bias, acc, acc + d_in, xh + b * d_in, xf + b * d_in);
    };
    compact_rows<scalar_t>(x_in, W_gate, at::Tensor(), csr, keep, post);
    csr.finish(opt, d_sae, [](const Entry<scalar_t>& e) { return static_cast<acc_t>(e.v0) > acc_t(0); });
    fired = csr.fired;
    row_ptr = csr.row_ptr;
    cols = csr.cols;
    vals = csr.v0;
    gvals = csr.v1;
  });
  return {x_hat, x_hat_frozen, sparsity, l0, fired, row_ptr, cols, vals, gvals};
}

// ---- backwards ------------------------------------------------------------------------------------

namespace {

// The sparse backwards' inputs: prepare_backward's, and the CSR of the kept entries, checked.
struct CsrArgs : BackwardInputs {
  int64_t nnz;
  at::Tensor row_ptr, cols;
};

CsrArgs check_backward_args(const at::Tensor& grad_x_hat, const at::Tensor& x, const at::Tensor& W_enc,
                            const at::Tensor& W_dec, const at::Tensor& b_dec, bool apply_b_dec_to_input,
                            const at::Tensor& row_ptr, const at::Tensor& cols, const at::Tensor& values,
                            const char* op) {
  CsrArgs a{prepare_backward(grad_x_hat, x, W_enc, W_dec, b_dec, apply_b_dec_to_input, op), 0, {}, {}};
  check_same_dtype(values, x, op, "values", "x");
  TORCH_CHECK(cols.dim() == 1 && cols.scalar_type() == at::kLong, op, ": cols must be a 1-D int64 tensor");
  a.nnz = cols.size(0);
  check_vector(values, a.nnz, op, "values");
  a.row_ptr = row_ptr.contiguous();
  check_row_ptr(a.row_ptr, a.B, a.nnz, op);
  a.cols = cols.contiguous();
  check_index_range(a.cols, a.d_sae, op, "cols");
  return a;
}

at::Tensor optional_rows(const std::optional<at::Tensor>& t, int64_t n, at::ScalarType dtype, const char* op,
                         const char* name) {
  if (!t.has_value()) return at::Tensor();
  check_vector(*t, n, op, name);
  return t->to(dtype).contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The shared tail of every sparse backward: the engine, then grad_b_enc / grad_b_dec.
// Returns (grad_W_enc, grad_W_dec, grad_b_dec, genc_sum (acc dtype), scalars [kScalars, d_sae] (wide dtype)).
template <typename scalar_t, typename wide_t, typename Rule>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_sparse_backward(
    const CsrArgs& a, const at::Tensor& gx, const at::Tensor& gx2, const at::Tensor& x_in, const at::Tensor& W_enc,
    const at::Tensor& W_dec, bool apply_b_dec_to_input, const Rule& rule) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto opt = x_in.options();
  at::Tensor gWe = recycled_empty(kGradWEnc, {a.d_in, a.d_sae}, opt);
  at::Tensor gWd = recycled_empty(kGradWDec, {a.d_sae, a.d_in}, opt);
  at::Tensor gbd = at::empty({a.d_in}, opt);
  at::Tensor genc = at::empty({a.d_sae}, opt.dtype(c10::CppTypeToScalarType<acc_t>::value));
  at::Tensor scal = at::empty({Rule::kScalars, a.d_sae}, opt.dtype(c10::CppTypeToScalarType<wide_t>::value));
  at::Tensor We = W_enc.contiguous();
  sparse_backward<scalar_t, wide_t, Rule>(a.B, a.d_in, a.d_sae, a.row_ptr.data_ptr<int64_t>(),
                                          a.cols.data_ptr<int64_t>(), a.nnz, gx.data_ptr<scalar_t>(),
                                          ptr_or_null<scalar_t>(gx2), x_in.data_ptr<scalar_t>(),
                                          W_dec.data_ptr<scalar_t>(), rule, gWe.data_ptr<scalar_t>(),
                                          gWd.data_ptr<scalar_t>(), genc.data_ptr<acc_t>(), scal.data_ptr<wide_t>());
  decoder_bias_grad<scalar_t>(a.B, a.d_in, a.d_sae, gx.data_ptr<scalar_t>(), We.data_ptr<scalar_t>(),
                              genc.data_ptr<acc_t>(), apply_b_dec_to_input, gbd.data_ptr<scalar_t>());
  return {gWe, gWd, gbd, genc, scal};
}

}  // namespace

// Gradients of jumprelu_sae (flags given) or topk_sae / batchtopk_sae (no flags) from their CSR entries.
// JumpReLU: ∂L/∂f = SDDMM + grad_values at every entry; g_pre = ∂L/∂f at active entries (plus, with
// straight_through, K·((θ/ε)·∂L/∂f + (1/ε)·∂L/∂l0) at window entries);
// grad_θ_j = Σ_window -(θ_j/ε_j) ∂L/∂f - (1/ε_j) ∂L/∂l0_b.
// TopK: g_pre = ∂L/∂f + grad_values at entries with value > 0 (relu).
// Returns (grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, grad_threshold in threshold's dtype or [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_sae_backward_cpu(
    const at::Tensor& grad_x_hat, const std::optional<at::Tensor>& grad_l0,
    const std::optional<at::Tensor>& grad_values, const at::Tensor& x, const at::Tensor& W_enc,
    const at::Tensor& W_dec, const at::Tensor& b_dec, bool apply_b_dec_to_input, const at::Tensor& row_ptr,
    const at::Tensor& cols, const at::Tensor& values, const std::optional<at::Tensor>& flags,
    const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& bandwidth, bool straight_through) {
  const char* op = "sparse_sae_backward";
  const CsrArgs a =
      check_backward_args(grad_x_hat, x, W_enc, W_dec, b_dec, apply_b_dec_to_input, row_ptr, cols, values, op);
  const bool jump = flags.has_value();
  at::Tensor fl, th, eps, gl0;
  if (jump) {
    TORCH_CHECK(threshold.has_value() && bandwidth.has_value(), op, ": flags need threshold and bandwidth");
    check_vector(*flags, a.nnz, op, "flags");
    TORCH_CHECK(flags->scalar_type() == at::kByte, op, ": flags must be uint8");
    fl = flags->contiguous();
    std::tie(th, eps) = latent_params(*threshold, *bandwidth, a.d_sae, x.scalar_type(), op);
    gl0 = optional_rows(grad_l0, a.B, th.scalar_type(), op, "grad_l0");
  }
  auto gv = optional_rows(grad_values, a.nnz, x.scalar_type(), op, "grad_values");
  const at::Tensor &x_in = a.x_in, &gx = a.gx, &Wd = a.W_dec;
  auto vals = values.contiguous();
  at::Tensor gWe, gWd, gbd, genc, scal;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "sparse_sae_backward", [&] {
    if (jump) {
      dispatch_wide(th.scalar_type(), [&](auto wide_tag) {
        using wide_t = decltype(wide_tag);
        const JumpRule<scalar_t, wide_t> rule{vals.data_ptr<scalar_t>(), fl.data_ptr<uint8_t>(), th.data_ptr<wide_t>(),
                                              eps.data_ptr<wide_t>(), ptr_or_null<wide_t>(gl0),
                                              ptr_or_null<scalar_t>(gv), straight_through};
        std::tie(gWe, gWd, gbd, genc, scal) = run_sparse_backward<scalar_t, wide_t>(
            a, gx, at::Tensor(), x_in, W_enc, Wd, apply_b_dec_to_input, rule);
      });
    } else {
      using acc_t = at::opmath_type<scalar_t>;
      const ReluRule<scalar_t> rule{vals.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(gv), nullptr, nullptr};
      std::tie(gWe, gWd, gbd, genc, scal) = run_sparse_backward<scalar_t, acc_t>(
          a, gx, at::Tensor(), x_in, W_enc, Wd, apply_b_dec_to_input, rule);
    }
  });
  auto grad_th = jump ? own(scal[0], threshold->scalar_type()) : at::empty({0}, x.options());
  return {gWe, genc.to(x.scalar_type()), gWd, gbd, grad_th};
}

// (grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, grad_latent_weight) of relu_sae.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> relu_sae_backward_cpu(
    const at::Tensor& grad_x_hat, const std::optional<at::Tensor>& grad_sparsity, const at::Tensor& x,
    const at::Tensor& W_enc, const at::Tensor& W_dec, const at::Tensor& b_dec, const at::Tensor& latent_weight,
    bool apply_b_dec_to_input, const at::Tensor& row_ptr, const at::Tensor& cols, const at::Tensor& values) {
  const char* op = "relu_sae_backward";
  const CsrArgs a =
      check_backward_args(grad_x_hat, x, W_enc, W_dec, b_dec, apply_b_dec_to_input, row_ptr, cols, values, op);
  const at::Tensor &x_in = a.x_in, &gx = a.gx, &Wd = a.W_dec;
  auto vals = values.contiguous();
  at::Tensor gWe, gWd, gbd, genc, scal;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "relu_sae_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    auto w = latent_vector(latent_weight, a.d_sae, acc_type, op, "latent_weight");
    auto gsp = optional_rows(grad_sparsity, a.B, acc_type, op, "grad_sparsity");
    const ReluRule<scalar_t> rule{vals.data_ptr<scalar_t>(), nullptr, w.data_ptr<acc_t>(), ptr_or_null<acc_t>(gsp)};
    std::tie(gWe, gWd, gbd, genc, scal) =
        run_sparse_backward<scalar_t, acc_t>(a, gx, at::Tensor(), x_in, W_enc, Wd, apply_b_dec_to_input, rule);
  });
  return {gWe, genc.to(x.scalar_type()), gWd, gbd, own(scal[0], latent_weight.scalar_type())};
}

// (grad_W_gate, grad_b_gate, grad_r_mag, grad_b_mag, grad_W_dec, grad_b_dec) of gated_sae. grad_x_hat_frozen
// reaches relu(π_gate) through the detached decoder: no gradient to W_dec or b_dec from it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_sae_backward_cpu(
    const at::Tensor& grad_x_hat, const std::optional<at::Tensor>& grad_x_hat_frozen,
    const std::optional<at::Tensor>& grad_sparsity, const at::Tensor& x, const at::Tensor& W_gate,
    const at::Tensor& r_mag, const at::Tensor& b_mag, const at::Tensor& W_dec, const at::Tensor& b_dec,
    bool apply_b_dec_to_input, const at::Tensor& row_ptr, const at::Tensor& cols, const at::Tensor& values) {
  const char* op = "gated_sae_backward";
  const CsrArgs a =
      check_backward_args(grad_x_hat, x, W_gate, W_dec, b_dec, apply_b_dec_to_input, row_ptr, cols, values, op);
  check_gated(r_mag, b_mag, x, a.d_sae, op);
  at::Tensor gx2;
  if (grad_x_hat_frozen.has_value()) {
    TORCH_CHECK(grad_x_hat_frozen->sizes() == grad_x_hat.sizes(), op, ": grad_x_hat_frozen must be [", a.B, ", ",
                a.d_in, "], got ", grad_x_hat_frozen->sizes());
    gx2 = grad_x_hat_frozen->to(x.scalar_type()).contiguous();
  }
  const at::Tensor &x_in = a.x_in, &gx = a.gx, &Wd = a.W_dec;
  auto vals = values.contiguous();
  at::Tensor gWe, gWd, gbd, genc, scal;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "gated_sae_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    auto scale = r_mag.to(acc_type).exp().contiguous();
    auto bm = b_mag.to(acc_type).contiguous();
    auto gsp = optional_rows(grad_sparsity, a.B, acc_type, op, "grad_sparsity");
    const GatedRule<scalar_t> rule{vals.data_ptr<scalar_t>(), scale.data_ptr<acc_t>(), bm.data_ptr<acc_t>(),
                                   ptr_or_null<acc_t>(gsp)};
    std::tie(gWe, gWd, gbd, genc, scal) =
        run_sparse_backward<scalar_t, acc_t>(a, gx, gx2, x_in, W_gate, Wd, apply_b_dec_to_input, rule);
  });
  const auto dt = x.scalar_type();
  return {gWe, own(scal[0], dt), own(scal[2], dt), own(scal[1], dt), gWd, gbd};
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("jumprelu_sae", &jumprelu_sae_cpu);
  m.impl("topk_sae", &topk_sae_cpu);
  m.impl("batchtopk_sae", &batchtopk_sae_cpu);
  m.impl("relu_sae", &relu_sae_cpu);
  m.impl("gated_sae", &gated_sae_cpu);
  m.impl("sparse_sae_backward", &sparse_sae_backward_cpu);
  m.impl("relu_sae_backward", &relu_sae_backward_cpu);
  m.impl("gated_sae_backward", &gated_sae_backward_cpu);
}

}  // namespace fastsae
