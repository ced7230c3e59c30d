#pragma once
// The backward of every fused SAE training step, sparse and dense, from one set of per-entry rules.
//
// An "entry" is a (row b, latent j) pair that the forward kept: JumpReLU's active ∪ window entries,
// TopK's / BatchTopK's kept entries, ReLU's positive ones, Gated's open gates. With ∂L/∂f = d1 (and
// Gated's frozen-decoder ∂L/∂relu(π_gate) = d2), an architecture's rule gives the entry's gradient
// g_enc reaching the encoder pre-activation (grad_W_enc[:, j] += g_enc · x_in[b], grad of the encoder
// bias += g_enc) and its contributions to per-latent scalars (θ, Gated's b_gate / b_mag / r_mag, ReLU's
// decoder-norm weights). The sparse engine (sparse_backward) applies the rule at the kept entries, the
// dense kernels (csrc/sae_dense.cpp) at every element of [B, d_sae]: the same math either way.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "encoder.h"
#include "jump_math.h"

namespace fastsae {

// relu_entry / gated_entry (ReLU's and Gated's per-entry gradients): csrc/jump_math.h.

// ---- rules for the sparse engine ------------------------------------------------------------------
// Interface: kScalars; skip(e) (no contribution at all); needs_dot(e) (d1 is used); dec_value(e) (the
// entry's f, for grad_W_dec); grad(e, b, j, d1, d2, s) -> g_enc, adding to the latent's scalars s.

template <typename scalar_t, typename wide_t>
struct JumpRule {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kScalars = 1;  // θ
  const scalar_t* values;
  const uint8_t* flags;
  const wide_t* th;
  const wide_t* eps;
  const wide_t* gl0;      // [B] ∂L/∂l0, or null
  const scalar_t* gv;     // [nnz] ∂L/∂values, or null
  bool ste;
  bool skip(int64_t) const { return false; }
  bool needs_dot(int64_t) const { return true; }
  acc_t dec_value(int64_t e) const { return static_cast<acc_t>(values[e]); }
  acc_t grad(int64_t e, int64_t b, int64_t j, acc_t d1, acc_t, wide_t* s) const {
    const acc_t gf = gv ? d1 + static_cast<acc_t>(gv[e]) : d1;
    return jump_entry<acc_t, wide_t>(flags[e], gf, th[j], eps[j], gl0 ? gl0[b] : wide_t(0), ste, s[0]);
  }
};

// TopK, BatchTopK and ReLU: kept entries with value 0 (relu'd) pass no gradient anywhere.
template <typename scalar_t>
struct ReluRule {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kScalars = 1;  // ∂L/∂w (ReLU's decoder-norm weights)
  const scalar_t* values;
  const scalar_t* gv;     // [nnz] ∂L/∂values, or null
  const acc_t* weight;    // [d_sae] w, or null (no weighted L1)
  const acc_t* gsp;       // [B] ∂L/∂sparsity, or null
  bool skip(int64_t e) const { return !(static_cast<acc_t>(values[e]) > acc_t(0)); }
  bool needs_dot(int64_t) const { return true; }
  acc_t dec_value(int64_t e) const { return static_cast<acc_t>(values[e]); }
  acc_t grad(int64_t e, int64_t b, int64_t j, acc_t d1, acc_t, acc_t* s) const {
    const acc_t gf = gv ? d1 + static_cast<acc_t>(gv[e]) : d1;
    if (!weight || !gsp) return gf;
    return relu_entry<acc_t>(static_cast<acc_t>(values[e]), gf, gsp[b], weight[j], s[0]);
  }
};

template <typename scalar_t>
struct GatedRule {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kScalars = 3;  // b_gate, b_mag, r_mag
  const scalar_t* values;  // f = relu(π_mag)
  const acc_t* scale;      // exp(r_mag)
  const acc_t* b_mag;
  const acc_t* gsp;        // [B] ∂L/∂sparsity (L1 of relu(π_gate)), or null
  bool skip(int64_t) const { return false; }
  bool needs_dot(int64_t e) const { return static_cast<acc_t>(values[e]) > acc_t(0); }
  acc_t dec_value(int64_t e) const { return static_cast<acc_t>(values[e]); }
  acc_t grad(int64_t e, int64_t b, int64_t j, acc_t d1, acc_t d2, acc_t* s) const {
    const acc_t g_gate = gsp ? d2 + gsp[b] : d2;
    return gated_entry<acc_t>(static_cast<acc_t>(values[e]), d1, g_gate, scale[j], b_mag[j], s);
  }
};

// ---- the sparse engine ------------------------------------------------------------------------------
// Entries (CSR by row) are regrouped by latent (a stable counting sort, so each latent's entries run in
// increasing row order), then one task per block of LB latents runs, for each entry (b, j):
//   d1 = grad_x_hat[b] · W_dec[j], fused with grad_W_dec[j] += f · grad_x_hat[b] over the same pass
//   (each gathered row is read once for both); d2 = grad_aux[b] · W_dec[j] (Gated only);
//   g = rule.grad(...);  grad_W_enc[:, j] += g · x_in[b];  genc_sum[j] += g.
// Each output element is owned by one thread and reduced in a fixed order: the same bits for any thread
// count. grad_W_enc ([d_in, d_sae]) is accumulated per latent in a [LB, d_in] block and written transposed in
// runs of LB contiguous latents: 64 latents make each run 4 cache lines, so the strided write (one run per
// row of grad_W_enc) touches each page of the output once per block instead of once per 16 latents.
template <typename scalar_t, typename wide_t, typename Rule>
void sparse_backward(int64_t B, int64_t d_in, int64_t d_sae, const int64_t* row_ptr, const int64_t* cols, int64_t nnz,
                     const scalar_t* gx, const scalar_t* gx2, const scalar_t* x_in, const scalar_t* W_dec,
                     const Rule& rule, scalar_t* gWe, scalar_t* gWd, at::opmath_type<scalar_t>* genc_sum,
                     wide_t* scal) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int NS = Rule::kScalars;
  const ByLatent by = group_by_latent_rows(row_ptr, B, cols, nnz, d_sae);
  constexpr int64_t LB = 64;
  const int64_t nblocks = (d_sae + LB - 1) / LB;
  // encT rows are padded by one cache line: at a power-of-two d_in the column reads of the transposed write
  // would otherwise all fall into the same few cache sets.
  const int64_t ld = d_in + 64 / static_cast<int64_t>(sizeof(acc_t));
  const int64_t row_bytes = d_in * static_cast<int64_t>(sizeof(scalar_t));
  // Row blocks: with many entries per latent (a dense phase), a block of 64 latents visits the rows in blocks
  // small enough (~1 MB of grad_x_hat and x_in rows) that the rows it gathers are reused from cache by its other
  // latents, instead of coming from memory once per entry. Each latent still takes its entries in row order
  // (the row blocks in order), so the bits do not depend on the blocking; with few entries per latent (trained
  // sparsity) one block covers the batch and each latent's decoder row stays in L1 over all its entries.
  const int64_t per_latent = d_sae > 0 ? nnz / d_sae : 0;
  const int64_t min_rows = std::max<int64_t>(16, (int64_t(1) << 20) / (2 * row_bytes));
  const int64_t n_rb = std::max<int64_t>(1, std::min<int64_t>(per_latent / 16, B / min_rows));
  const int64_t RB = (B + n_rb - 1) / std::max<int64_t>(n_rb, 1);
  parallel_tasks(nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> encT(LB * ld), decT(LB * ld), gsum(LB);
    std::vector<wide_t> sT(LB * (NS > 0 ? NS : 1));
    std::vector<int64_t> pos(LB);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t j0 = blk * LB, j1 = std::min(d_sae, j0 + LB), nb = j1 - j0;
      std::fill(encT.begin(), encT.end(), acc_t(0));
      std::fill(decT.begin(), decT.begin() + nb * ld, acc_t(0));
      std::fill(gsum.begin(), gsum.end(), acc_t(0));
      std::fill(sT.begin(), sT.end(), wide_t(0));
      for (int64_t j = j0; j < j1; ++j) pos[j - j0] = by.start[j];
      for (int64_t r1 = RB; r1 - RB < B; r1 += RB) {
        for (int64_t j = j0; j < j1; ++j) {
          acc_t* enc = encT.data() + (j - j0) * ld;
          acc_t* dec = decT.data() + (j - j0) * ld;
          wide_t* s = sT.data() + (j - j0) * (NS > 0 ? NS : 1);
          const scalar_t* w = W_dec + j * d_in;
          int64_t t = pos[j - j0];
          const int64_t t_end = by.start[j + 1];
          for (; t < t_end && by.row[t] < r1; ++t) {
            if (t + 1 < t_end) {  // the next entry's rows
              prefetch_bytes(gx + by.row[t + 1] * d_in, row_bytes);
              prefetch_bytes(x_in + by.row[t + 1] * d_in, row_bytes);
            }
            const int64_t e = by.entry[t];
            if (rule.skip(e)) continue;
            const int64_t b = by.row[t];
            const scalar_t* g = gx + b * d_in;
            const acc_t v = rule.dec_value(e);
            acc_t d1 = 0;
            if (rule.needs_dot(e))
              d1 = v != acc_t(0) ? dot_axpy<scalar_t, acc_t>(g, w, dec, v, d_in) : dot<scalar_t, acc_t>(g, w, d_in);
            else if (v != acc_t(0))
              axpy<scalar_t, acc_t>(dec, v, g, d_in);
            const acc_t d2 = gx2 ? dot<scalar_t, acc_t>(gx2 + b * d_in, w, d_in) : acc_t(0);
            const acc_t ge = rule.grad(e, b, j, d1, d2, s);
            if (ge != acc_t(0)) axpy<scalar_t, acc_t>(enc, ge, x_in + b * d_in, d_in);
            gsum[j - j0] += ge;
          }
          pos[j - j0] = t;
        }
      }
      for (int64_t j = j0; j < j1; ++j) {
        const acc_t* dec = decT.data() + (j - j0) * ld;
        for (int64_t i = 0; i < d_in; ++i) gWd[j * d_in + i] = static_cast<scalar_t>(dec[i]);
        genc_sum[j] = gsum[j - j0];
        for (int k = 0; k < NS; ++k) scal[k * d_sae + j] = sT[(j - j0) * (NS > 0 ? NS : 1) + k];
      }
      for (int64_t i = 0; i < d_in; ++i) {
        scalar_t* dst = gWe + i * d_sae + j0;
        for (int64_t jj = 0; jj < nb; ++jj) dst[jj] = static_cast<scalar_t>(encT[jj * ld + i]);
      }
    }
  });
}

// grad_b_dec = Σ_b grad_x_hat[b] (the decoder bias), minus W_enc · genc_sum when b_dec is subtracted from the
// encoder input. Each element is reduced by one thread in row order.
template <typename scalar_t>
void decoder_bias_grad(int64_t B, int64_t d_in, int64_t d_sae, const scalar_t* gx, const scalar_t* W_enc,
                       const at::opmath_type<scalar_t>* genc_sum, bool apply_b_dec_to_input, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, d_in, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(end - begin, acc_t(0));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = begin; i < end; ++i) acc[i - begin] += static_cast<acc_t>(gx[b * d_in + i]);
    for (int64_t i = begin; i < end; ++i) {
      acc_t a = acc[i - begin];
      if (apply_b_dec_to_input) {
        a -= dot_mixed<scalar_t, acc_t>(W_enc + i * d_sae, genc_sum, d_sae);
      }
      out[i] = static_cast<scalar_t>(a);
    }
  });
}

}  // namespace fastsae
