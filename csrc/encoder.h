#pragma once
// The encoder side shared by every fused op (training, dense, inference): the GEMM in row slabs,
// the per-latent parameters of each architecture's selection rule, the candidate pre-filter, the
// per-row entry lists that become CSR arrays, and the row decode.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/ThreadLocalState.h>

#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <vector>

#include "common.h"
#include "jump_math.h"
#include "scan.h"

namespace fastsae {


struct SaeDims {
  int64_t B, d_in, d_sae;
};

// b_enc and W_dec may be undefined (ops that take none).
inline SaeDims check_sae_args(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                              const at::Tensor& W_dec, const at::Tensor& b_dec, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [B, d_in], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point");
  const int64_t B = x.size(0), d_in = x.size(1);
  TORCH_CHECK(W_enc.dim() == 2 && W_enc.size(0) == d_in, op, ": W_enc must be [d_in=", d_in, ", d_sae], got ",
              W_enc.sizes());
  const int64_t d_sae = W_enc.size(1);
  if (b_enc.defined()) {
    check_vector(b_enc, d_sae, op, "b_enc");
    check_same_dtype(b_enc, x, op, "b_enc", "x");
  }
  if (W_dec.defined()) {
    TORCH_CHECK(W_dec.dim() == 2 && W_dec.size(0) == d_sae && W_dec.size(1) == d_in, op, ": W_dec must be [",
                d_sae, ", ", d_in, "], got ", W_dec.sizes());
    check_same_dtype(W_dec, x, op, "W_dec", "x");
  }
  check_vector(b_dec, d_in, op, "b_dec");
  check_same_dtype(W_enc, x, op, "W_enc", "x");
  check_same_dtype(b_dec, x, op, "b_dec", "x");
  return {B, d_in, d_sae};
}

inline at::Tensor encoder_input(const at::Tensor& x, const at::Tensor& b_dec, bool apply_b_dec_to_input) {
  return apply_b_dec_to_input ? at::sub(x, b_dec).contiguous() : x.contiguous();
}

// What every fused op starts from: checked sizes, the encoder input, the decoder weights contiguous.
struct SaeInputs {
  int64_t B, d_in, d_sae;
  at::Tensor x_in, W_dec, b_dec;  // W_dec undefined where the op takes none
};

inline SaeInputs prepare_sae(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                             const at::Tensor& W_dec, const at::Tensor& b_dec, bool apply_b_dec_to_input,
                             const char* op) {
  const SaeDims D = check_sae_args(x, W_enc, b_enc, W_dec, b_dec, op);
  return {D.B, D.d_in, D.d_sae, encoder_input(x, b_dec, apply_b_dec_to_input),
          W_dec.defined() ? W_dec.contiguous() : at::Tensor(), b_dec.contiguous()};
}

// What every fused backward (sparse and dense) starts from: checked sizes and dtypes (grad_x_hat [B, d_in] like
// x), the encoder input, grad_x_hat and the decoder weights contiguous.
struct BackwardInputs {
  int64_t B, d_in, d_sae;
  at::Tensor x_in, gx, W_dec;
};

inline BackwardInputs prepare_backward(const at::Tensor& grad_x_hat, const at::Tensor& x, const at::Tensor& W_enc,
                                       const at::Tensor& W_dec, const at::Tensor& b_dec, bool apply_b_dec_to_input,
                                       const char* op) {
  const SaeDims D = check_sae_args(x, W_enc, at::Tensor(), W_dec, b_dec, op);
  TORCH_CHECK(grad_x_hat.dim() == 2 && grad_x_hat.size(0) == D.B && grad_x_hat.size(1) == D.d_in, op,
              ": grad_x_hat must be [", D.B, ", ", D.d_in, "] (the shape of x), got ", grad_x_hat.sizes());
  check_same_dtype(grad_x_hat, x, op, "grad_x_hat", "x");
  return {D.B, D.d_in, D.d_sae, encoder_input(x, b_dec, apply_b_dec_to_input), grad_x_hat.contiguous(),
          W_dec.contiguous()};
}

inline void check_k(int64_t k, int64_t d_sae, const char* op) {
  TORCH_CHECK(k >= 1 && k <= d_sae, op, ": k must lie in 1..d_sae=", d_sae, ", got ", k);
}

// Gated's per-latent magnitude scale and bias: [d_sae], the compute dtype.
inline void check_gated(const at::Tensor& r_mag, const at::Tensor& b_mag, const at::Tensor& x, int64_t d_sae,
                        const char* op) {
  check_vector(r_mag, d_sae, op, "r_mag");
  check_vector(b_mag, d_sae, op, "b_mag");
  check_same_dtype(r_mag, x, op, "r_mag", "x");
  check_same_dtype(b_mag, x, op, "b_mag", "x");
}

// A per-latent vector in the given dtype, contiguous (θ, ε, the Gated scales).
inline at::Tensor latent_vector(const at::Tensor& t, int64_t d_sae, at::ScalarType dtype, const char* op,
                                const char* name) {
  check_vector(t, d_sae, op, name);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point");
  return t.to(dtype).contiguous();
}

// JumpReLU's θ and ε in the wide dtype, with the kernel's own check that ε > 0 (a NaN or
// non-positive ε would break the candidate pre-filter).
inline std::pair<at::Tensor, at::Tensor> latent_params(const at::Tensor& threshold, const at::Tensor& bandwidth,
                                                       int64_t d_sae, at::ScalarType compute, const char* op) {
  const auto wide = wide_type(compute, threshold.scalar_type());
  auto th = latent_vector(threshold, d_sae, wide, op, "threshold");
  auto eps = latent_vector(bandwidth, d_sae, wide, op, "bandwidth");
  TORCH_CHECK(d_sae == 0 || eps.gt(0).all().item<bool>(), op, ": bandwidth must be > 0 everywhere");
  return {th, eps};
}

// Calls f(wide_t{}) with wide_t = double when `t` is double, else float.
template <typename F>
void dispatch_wide(at::ScalarType t, F&& f) {
  if (t == at::kDouble)
    f(double{});
  else
    f(float{});
}

// A slab buffer of n elements, reused by the calling thread from one call to the next: a fresh multi-MB
// allocation costs a page fault per 4 KB on first touch (about as long as the scan of the slab itself).
// At most 64 MB per thread is kept; a larger slab is allocated for the call only.
inline at::Tensor slab_workspace(int64_t n, const at::TensorOptions& opt) {
  // Never destroyed: a thread_local tensor's destructor could run after the allocator at process exit.
  thread_local at::Tensor* cache = new at::Tensor();
  const int64_t bytes = n * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opt.dtype())));
  if (bytes > (int64_t(64) << 20)) return at::empty({n}, opt);
  at::Tensor& c = *cache;
  // A view of the cache still alive (a caller up the stack) means it is in use: take a fresh one.
  if (!c.defined() || c.dtype() != opt.dtype() || c.numel() < n || c.storage().use_count() > 1)
    c = at::empty({n}, opt);
  return c.narrow(0, 0, n);
}

// One slab of encoder pre-activations, rows r0..r0+rows of the batch: pre [rows, d_sae], contiguous. Read each row
// through row(r), once: when the GEMM left the bias out (late_bias), row(r) adds it to that row in place first.
struct Slab {
  int64_t r0, rows, d_sae;
  at::Tensor pre;
  at::Tensor late_bias;  // [d_sae] still to be added to every row, or undefined
  template <typename scalar_t>
  scalar_t* row(int64_t r) const;
  // Row r without the pending bias, and that bias (null when the GEMM added it): for a scan that forms
  // row + bias where it reads it instead of adding it in a pass of its own (TopK's selection).
  template <typename scalar_t>
  const scalar_t* raw_row(int64_t r) const {
    return pre.data_ptr<scalar_t>() + r * d_sae;
  }
  template <typename scalar_t>
  const scalar_t* pending_bias() const {
    return late_bias.defined() ? late_bias.data_ptr<scalar_t>() : nullptr;
  }
};

// Whether for_each_slab leaves the bias to the scan (float32 / float64 slabs of its own) rather than to the GEMM.
inline bool bias_added_late(const at::Tensor& x_in, const at::Tensor& bias, const at::Tensor& target) {
  return bias.defined() && !target.defined() && x_in.scalar_type() != at::kBFloat16;
}

// The encoder GEMM of x_in [B, d_in] @ W [d_in, d_sae] (+ bias) in row slabs: f(slab) sees the [rows, d_sae]
// pre-activations of rows r0..r0+rows while they are in cache. With `target` the slabs are views of target's rows
// (the dense output of an inference encode) and the GEMM adds the bias; otherwise each thread reuses one slab
// buffer, so no [B, d_sae] tensor is allocated, and the bias is added row by row as the callback reads each row
// (Slab::row), in float32 and float64 (in bfloat16, addmm rounds z + b once where a bf16 slab would round twice).
// With enough slabs, the slabs themselves run in parallel (each GEMM single-threaded inside the task, as
// MKL/oneDNN do inside a parallel region), so one step is one parallel region: a thread the OS deschedules
// on a busy machine delays one slab rather than every slab's GEMM and scan barriers. f may run concurrently
// for different slabs (it must write only to its rows' outputs); its own parallel_tasks then run inline.
template <typename F>
void for_each_slab(const at::Tensor& x_in, const at::Tensor& W, const at::Tensor& bias, const at::Tensor& target,
                   F&& f) {
  const int64_t B = x_in.size(0), d_sae = W.size(1);
  const int64_t chunk = encode_chunk_rows(B, d_sae);
  const int64_t nslabs = (B + chunk - 1) / chunk;
  const bool late = bias_added_late(x_in, bias, target);
  const at::Tensor late_bias = late ? bias.contiguous() : at::Tensor();
  auto slab = [&](int64_t s, at::Tensor& buf) {
    const int64_t r0 = s * chunk, rows = std::min(chunk, B - r0);
    at::Tensor pre;
    if (target.defined()) {
      pre = target.narrow(0, r0, rows);
    } else {
      if (!buf.defined()) buf = slab_workspace(chunk * d_sae, x_in.options());
      pre = buf.narrow(0, 0, rows * d_sae).view({rows, d_sae});
    }
    if (bias.defined() && !late)
      at::addmm_out(pre, bias, x_in.narrow(0, r0, rows), W);
    else
      at::mm_out(pre, x_in.narrow(0, r0, rows), W);
    f(Slab{r0, rows, d_sae, pre, late_bias});
  };
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && nslabs >= threads) {
    // The GEMM is an ATen op called from worker threads: they take this thread's dispatch state (autograd
    // already handled above this kernel, grad mode, inference mode).
    const at::ThreadLocalState state;
    parallel_tasks(nslabs, 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard guard(state);
      at::Tensor buf;
      for (int64_t s = begin; s < end; ++s) slab(s, buf);
    });
  } else {
    at::Tensor buf;
    for (int64_t s = 0; s < nslabs; ++s) slab(s, buf);
  }
}

template <>
inline void add_bias<float>(float* row, const float* bias, int64_t n) {
  add_bias_f32(row, bias, n);
}

// A slab row as a scan reads it: z = x_in · W, plus the pending bias b when the GEMM left it (element j of the
// pre-activation is row[j] = z[j] + b[j], rounded once, as Slab::row's in-place add gives). The scans test z
// against bounds that already have the bias subtracted (raw_bounds), so the bias is added only to the candidates:
// no pass of its own over the row.
template <typename scalar_t>
struct RowRef {
  const scalar_t* z;
  const scalar_t* b;  // null: z is the pre-activation
  scalar_t operator[](int64_t j) const { return b ? static_cast<scalar_t>(z[j] + b[j]) : z[j]; }
};

// Bounds on z for the scan's superset test `row[j] >= lo[j]` on the biased row: z[j] >= lo[j] - b[j] less a
// margin for the roundings of z + b and of the subtraction, so every entry the biased test would pass is a
// candidate (the exact test then runs on row[j]). lo itself where the GEMM adds the bias.
template <typename scalar_t, typename wide_t>
std::vector<wide_t> raw_bounds(const wide_t* lo, const at::Tensor& x_in, const at::Tensor& bias, int64_t n) {
  std::vector<wide_t> out(lo, lo + n);
  if (!bias_added_late(x_in, bias, at::Tensor())) return out;
  const at::Tensor bc = bias.contiguous();
  const scalar_t* b = bc.data_ptr<scalar_t>();
  const wide_t rel = 4 * (static_cast<wide_t>(std::numeric_limits<scalar_t>::epsilon()) +
                          std::numeric_limits<wide_t>::epsilon());
  for (int64_t j = 0; j < n; ++j) {
    const wide_t bj = static_cast<wide_t>(b[j]);
    if (std::isfinite(lo[j]))
      out[j] = lo[j] - bj - rel * (std::abs(lo[j]) + std::abs(bj)) - std::numeric_limits<wide_t>::min();
  }
  return out;
}

template <typename scalar_t>
scalar_t* Slab::row(int64_t r) const {
  scalar_t* p = pre.data_ptr<scalar_t>() + r * d_sae;
  if (late_bias.defined()) add_bias<scalar_t>(p, late_bias.data_ptr<scalar_t>(), d_sae);
  return p;
}

// candidates / candidates_above: csrc/scan.h (float32 rows: simd.cpp's per-ISA clones).
template <>
inline int64_t candidates<float, float>(const float* row, const float* lo, int64_t n, int64_t* cand) {
  return candidates_f32(row, lo, n, cand);
}
template <>
inline int64_t candidates_above<float, float>(const float* row, float lo, int64_t n, int64_t* cand) {
  return candidates_above_f32(row, lo, n, cand);
}

// One kept entry: latent, up to two values (Gated: f and relu(π_gate)), flags.
template <typename scalar_t>
struct Entry {
  int64_t col;
  scalar_t v0, v1;
  uint8_t flags;
};

// The kept entries of the whole batch, written row by row (rows of different slabs possibly concurrently)
// into growing arenas, one per task, then assembled into CSR arrays by row once at the end: appending
// allocates only when an arena grows, never per row. (Arenas are per task, not per thread: ATen reports
// thread 0 inside a nested parallel region, where every slab's scan runs.)
template <typename scalar_t>
struct CsrBuilder {
  using E = Entry<scalar_t>;
  CsrBuilder(int64_t B, bool two, bool with_flags) : spans(B), two(two), with_flags(with_flags) {}

  std::vector<E>& new_arena() {
    std::lock_guard<std::mutex> lock(mu);
    arenas.emplace_back();
    return arenas.back();
  }
  // Row b's entries are arena[start:] (pushed after start = arena.size()).
  void set_row(int64_t b, const std::vector<E>& arena, int64_t start) {
    spans[b] = {&arena, start, static_cast<int64_t>(arena.size()) - start};
  }

  // The CSR tensors (row_ptr [B+1], cols [nnz], v0 [nnz] (and v1, flags)) and fired [d_sae]: latents with
  // an entry where fired_if(entry) holds.
  template <typename Fired>
  void finish(const at::TensorOptions& opt, int64_t d_sae, Fired&& fired_if) {
    const int64_t B = static_cast<int64_t>(spans.size());
    row_ptr = at::empty({B + 1}, opt.dtype(at::kLong));
    int64_t* rp = row_ptr.data_ptr<int64_t>();
    rp[0] = 0;
    for (int64_t r = 0; r < B; ++r) rp[r + 1] = rp[r] + spans[r].count;
    const int64_t total = rp[B];
    cols = at::empty({total}, opt.dtype(at::kLong));
    v0 = at::empty({total}, opt);
    v1 = two ? at::empty({total}, opt) : at::Tensor();
    flags = with_flags ? at::empty({total}, opt.dtype(at::kByte)) : at::Tensor();
    int64_t* cp = cols.data_ptr<int64_t>();
    scalar_t* v0p = v0.data_ptr<scalar_t>();
    scalar_t* v1p = two ? v1.data_ptr<scalar_t>() : nullptr;
    uint8_t* fp = with_flags ? flags.data_ptr<uint8_t>() : nullptr;
    parallel_tasks(B, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const Span& sp = spans[r];
        const E* e = sp.count ? sp.arena->data() + sp.offset : nullptr;
        for (int64_t t = 0, at = rp[r]; t < sp.count; ++t, ++at) {
          cp[at] = e[t].col;
          v0p[at] = e[t].v0;
          if (v1p) v1p[at] = e[t].v1;
          if (fp) fp[at] = e[t].flags;
        }
      }
    });
    fired = at::zeros({d_sae}, opt.dtype(at::kBool));
    bool* fired_p = fired.data_ptr<bool>();
    for (const auto& a : arenas)
      for (const E& e : a)
        if (fired_if(e)) fired_p[e.col] = true;
    arenas.clear();
  }

  // Instead of finish(): the padded [B, K] layout (K = the longest row), rows' entries first, zeros after.
  std::pair<at::Tensor, at::Tensor> padded(const at::TensorOptions& opt) {
    const int64_t B = static_cast<int64_t>(spans.size());
    int64_t K = 0;
    for (const Span& sp : spans) K = std::max(K, sp.count);
    auto values = at::zeros({B, K}, opt);
    auto indices = at::zeros({B, K}, opt.dtype(at::kLong));
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    parallel_tasks(B, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const Span& sp = spans[r];
        const E* e = sp.count ? sp.arena->data() + sp.offset : nullptr;
        for (int64_t t = 0; t < sp.count; ++t) {
          vp[r * K + t] = e[t].v0;
          ip[r * K + t] = e[t].col;
        }
      }
    });
    arenas.clear();
    return {values, indices};
  }

  struct Span {
    const std::vector<E>* arena = nullptr;
    int64_t offset = 0, count = 0;
  };
  std::mutex mu;
  std::deque<std::vector<E>> arenas;  // a deque: growing it keeps the other arenas in place
  std::vector<Span> spans;
  at::Tensor row_ptr, cols, v0, v1, flags, fired;  // finish()
  bool two, with_flags;
};

// For every row b of the batch: keep(row, cand, arena) (row: a RowRef) pushes the row's kept entries (latent order) onto the
// thread's arena (`cand`: scratch of d_sae indices), then post(b, entries, n, acc) computes the row's outputs
// from them (decode, counts; `acc`: scratch of 2·d_in accumulators). Then csr.finish() or csr.padded().
template <typename scalar_t, typename Keep, typename Post>
void compact_rows(const at::Tensor& x_in, const at::Tensor& W, const at::Tensor& bias, CsrBuilder<scalar_t>& csr,
                  Keep&& keep, Post&& post) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d_sae = W.size(1), d_in = x_in.size(1);
  for_each_slab(x_in, W, bias, at::Tensor(), [&](const Slab& slab) {
    parallel_tasks(slab.rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> cand(d_sae);
      std::vector<acc_t> acc(2 * d_in);
      auto& arena = csr.new_arena();
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = slab.r0 + r, start = static_cast<int64_t>(arena.size());
        keep(RowRef<scalar_t>{slab.raw_row<scalar_t>(r), slab.pending_bias<scalar_t>()}, cand.data(), arena);
        csr.set_row(b, arena, start);
        post(b, arena.data() + start, static_cast<int64_t>(arena.size()) - start, acc.data());
      }
    });
  });
}

template <typename T>
at::Tensor vector_to_tensor(const std::vector<T>& v, const at::TensorOptions& opt) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, opt);
  if (!v.empty()) std::memcpy(t.data_ptr(), v.data(), v.size() * sizeof(T));
  return t;
}

// out = bias + Σ_e vals[e] · W[cols[e]] over one row's entries (zero values skipped), accumulated in acc.
template <typename scalar_t, typename acc_t>
inline void decode_row(int64_t d_in, const int64_t* cols, const scalar_t* vals, int64_t n, const scalar_t* W,
                       const scalar_t* bias, acc_t* acc, scalar_t* out) {
  for (int64_t i = 0; i < d_in; ++i) acc[i] = bias ? static_cast<acc_t>(bias[i]) : acc_t(0);
  for (int64_t e = 0; e < n; ++e) {
    if (e + 1 < n) prefetch_bytes(W + cols[e + 1] * d_in, d_in * static_cast<int64_t>(sizeof(scalar_t)));
    const acc_t a = static_cast<acc_t>(vals[e]);
    if (a == acc_t(0)) continue;  // inactive window entries, relu'd zeros
    axpy<scalar_t, acc_t>(acc, a, W + cols[e] * d_in, d_in);
  }
  for (int64_t i = 0; i < d_in; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}

// The same over a row's Entry list (value v0).
template <typename scalar_t, typename acc_t>
inline void decode_entries(int64_t d_in, const Entry<scalar_t>* e, int64_t n, const scalar_t* W, const scalar_t* bias,
                           acc_t* acc, scalar_t* out) {
  for (int64_t i = 0; i < d_in; ++i) acc[i] = bias ? static_cast<acc_t>(bias[i]) : acc_t(0);
  for (int64_t t = 0; t < n; ++t) {
    if (t + 1 < n) prefetch_bytes(W + e[t + 1].col * d_in, d_in * static_cast<int64_t>(sizeof(scalar_t)));
    const acc_t a = static_cast<acc_t>(e[t].v0);
    if (a == acc_t(0)) continue;
    axpy<scalar_t, acc_t>(acc, a, W + e[t].col * d_in, d_in);
  }
  for (int64_t i = 0; i < d_in; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}

// Two decodes of one row through the same decoder rows (Gated: x̂ from f, x̂_frozen from relu(π_gate)).
template <typename scalar_t, typename acc_t>
inline void decode_entries2(int64_t d_in, const Entry<scalar_t>* e, int64_t n, const scalar_t* W,
                            const scalar_t* bias, acc_t* acc_a, acc_t* acc_b, scalar_t* out_a, scalar_t* out_b) {
  for (int64_t i = 0; i < d_in; ++i) acc_a[i] = acc_b[i] = static_cast<acc_t>(bias[i]);
  for (int64_t t = 0; t < n; ++t) {
    const acc_t a = static_cast<acc_t>(e[t].v0), b = static_cast<acc_t>(e[t].v1);
    const scalar_t* w = W + e[t].col * d_in;
    if (a != acc_t(0))
      axpy2<scalar_t, acc_t>(acc_a, a, acc_b, b, w, d_in);
    else
      axpy<scalar_t, acc_t>(acc_b, b, w, d_in);
  }
  for (int64_t i = 0; i < d_in; ++i) {
    out_a[i] = static_cast<scalar_t>(acc_a[i]);
    out_b[i] = static_cast<scalar_t>(acc_b[i]);
  }
}

// The batch-wide top-k of relu(x_in · W + b): the min(B·k, B·d_sae) largest positive entries as CSR by
// row (csrc/sae.cpp; bound_hint: a starting bound for the scan, 0 for none, which never changes the result).
template <typename scalar_t>
void batch_topk_entries(const at::Tensor& x_in, const at::Tensor& W, const at::Tensor& b, int64_t k,
                        double bound_hint, std::vector<int64_t>& row_ptr, std::vector<int64_t>& cols,
                        std::vector<scalar_t>& vals);

// ---- the selection rules: what each architecture keeps of a pre-activation ----------------------

// JumpReLU (and, with θ = 0 / τ, ReLU and a calibrated BatchTopK): active = pre > θ; with a bandwidth,
// the window |pre - θ|/ε < 1/2 too. Every kept entry has pre >= lo = θ - ε (θ without a window).
template <typename wide_t>
struct JumpSelect {
  const wide_t* th;
  const wide_t* eps;  // null: no window (inference)
  std::vector<wide_t> lo;
  JumpSelect(const wide_t* th, const wide_t* eps, int64_t d_sae) : th(th), eps(eps), lo(d_sae) {
    for (int64_t j = 0; j < d_sae; ++j) lo[j] = eps ? th[j] - eps[j] : th[j];
  }
  // flags of an entry (0: not kept)
  uint8_t classify(wide_t v, int64_t j) const {
    const bool a = v > th[j];
    if (!eps) return a ? kActive : 0;
    return (a ? kActive : 0) | (jump_window<wide_t>(v, th[j], eps[j]) ? kWindow : 0);
  }
};

// Gated: z = x_in · W_gate (no bias). The gate π_gate = z + b_gate is on (kept) when > 0; the entry's
// values are f = relu(π_mag) with π_mag = exp(r_mag)·z + b_mag (W_mag = exp(r_mag) ⊙ W_gate is a
// per-column scale, so one GEMM serves both) and relu(π_gate) = π_gate.
template <typename acc_t>
struct GatedSelect {
  std::vector<acc_t> lo, b_gate, scale, b_mag;
  template <typename scalar_t>
  GatedSelect(const scalar_t* bg, const scalar_t* r_mag, const scalar_t* bm, int64_t d_sae)
      : lo(d_sae), b_gate(d_sae), scale(d_sae), b_mag(d_sae) {
    for (int64_t j = 0; j < d_sae; ++j) {
      b_gate[j] = static_cast<acc_t>(bg[j]);
      lo[j] = -b_gate[j];  // a superset of π_gate > 0 (rounding of z + b_gate)
      scale[j] = std::exp(static_cast<acc_t>(r_mag[j]));
      b_mag[j] = static_cast<acc_t>(bm[j]);
    }
  }
  bool gate(acc_t z, int64_t j) const { return z + b_gate[j] > acc_t(0); }
  acc_t pi_gate(acc_t z, int64_t j) const { return z + b_gate[j]; }
  acc_t mag(acc_t z, int64_t j) const {
    const acc_t m = scale[j] * z + b_mag[j];
    return m > acc_t(0) ? m : acc_t(0);
  }
};

}  // namespace fastsae
