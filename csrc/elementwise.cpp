// Dense JumpReLU / Heaviside step with the rectangle-kernel pseudo-derivatives (DESIGN.md §1).
// These are the dense (inference / functional API) forms; training goes through the sparse
// jumprelu_sae op in sae.cpp, which never keeps a [B, d_sae] tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.h"

namespace fastsae {

namespace {

struct Latents {
  at::Tensor threshold, bandwidth;  // both in the wide dtype, contiguous
  int64_t d, rows;
};

Latents check_elementwise(const at::Tensor& pre, const at::Tensor& threshold, const at::Tensor& bandwidth,
                          const char* op) {
  TORCH_CHECK(pre.dim() >= 1, op, ": pre must be [..., d_sae], got a scalar");
  TORCH_CHECK(at::isFloatingType(pre.scalar_type()), op, ": pre must be floating point");
  const int64_t d = pre.size(-1);
  check_vector(threshold, d, op, "threshold");
  check_vector(bandwidth, d, op, "bandwidth");
  TORCH_CHECK(at::isFloatingType(threshold.scalar_type()) && at::isFloatingType(bandwidth.scalar_type()), op,
              ": threshold and bandwidth must be floating point");
  const auto wide = wide_type(pre.scalar_type(), threshold.scalar_type());
  return {threshold.to(wide).contiguous(), bandwidth.to(wide).contiguous(), d, d > 0 ? pre.numel() / d : 0};
}

// Calls f(wide_t{}) with wide_t = the float32-or-wider type of `t`.
template <typename F>
void dispatch_wide(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kDouble)
    f(double{});
  else
    f(float{});
}

at::Tensor heaviside_forward(const at::Tensor& pre, const at::Tensor& threshold, const at::Tensor& bandwidth,
                             bool is_step, const char* op) {
  const Latents L = check_elementwise(pre, threshold, bandwidth, op);
  auto p = pre.contiguous();
  auto out = at::empty_like(p);
  const int64_t n = p.numel(), d = L.d;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "heaviside_forward", [&] {
    dispatch_wide(L.threshold, [&](auto wide_tag) {
      using wide_t = decltype(wide_tag);
      const scalar_t* pp = p.data_ptr<scalar_t>();
      const wide_t* tp = L.threshold.data_ptr<wide_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, L.rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* row = pp + r * d;
          scalar_t* orow = o + r * d;
          for (int64_t j = 0; j < d; ++j) {
            const bool on = static_cast<wide_t>(row[j]) > tp[j];
            // pre * H keeps the sign of zero the reference produces (pre * 0.0).
            orow[j] = is_step ? scalar_t(on ? 1 : 0) : static_cast<scalar_t>(row[j] * scalar_t(on ? 1 : 0));
          }
        }
      });
      (void)n;
    });
  });
  return out;
}

}  // namespace

at::Tensor jumprelu_cpu(const at::Tensor& pre, const at::Tensor& threshold, const at::Tensor& bandwidth) {
  return heaviside_forward(pre, threshold, bandwidth, false, "jumprelu");
}

at::Tensor step_cpu(const at::Tensor& pre, const at::Tensor& threshold, const at::Tensor& bandwidth) {
  return heaviside_forward(pre, threshold, bandwidth, true, "step");
}

// (grad_pre or empty, grad_threshold or empty). JumpReLU: grad_pre = grad * H,
// grad_θ_j = Σ_rows -(θ_j/ε_j) K(u) grad; step: grad_pre = 0, grad_θ_j = Σ_rows -(1/ε_j) K(u) grad.
std::tuple<at::Tensor, at::Tensor> jumprelu_backward_cpu(const at::Tensor& grad, const at::Tensor& pre,
                                                         const at::Tensor& threshold, const at::Tensor& bandwidth,
                                                         bool is_step, bool need_pre, bool need_threshold) {
  const char* op = "jumprelu_backward";
  const Latents L = check_elementwise(pre, threshold, bandwidth, op);
  TORCH_CHECK(grad.sizes() == pre.sizes(), op, ": grad ", grad.sizes(), " must have the shape of pre ",
              pre.sizes());
  check_same_dtype(grad, pre, op, "grad", "pre");
  auto p = pre.contiguous();
  auto g = grad.contiguous();
  const int64_t d = L.d, rows = L.rows;
  at::Tensor grad_pre;
  if (!need_pre)
    grad_pre = at::empty({0}, grad.options());
  else if (is_step)
    grad_pre = at::zeros_like(p);
  else
    grad_pre = at::empty(p.sizes(), grad.options());
  at::Tensor grad_th = at::empty({need_threshold ? d : 0}, L.threshold.options());
  const bool write_pre = need_pre && !is_step;
  if (!write_pre && !need_threshold) return {grad_pre, grad_th.to(threshold.scalar_type())};

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "jumprelu_backward", [&] {
    using pre_t = scalar_t;
    {
      using grad_t = scalar_t;
      dispatch_wide(L.threshold, [&](auto wide_tag) {
        using wide_t = decltype(wide_tag);
        const pre_t* pp = p.data_ptr<pre_t>();
        const grad_t* gp = g.data_ptr<grad_t>();
        const wide_t* tp = L.threshold.data_ptr<wide_t>();
        const wide_t* ep = L.bandwidth.data_ptr<wide_t>();
        grad_t* gpre = write_pre ? grad_pre.data_ptr<grad_t>() : nullptr;
        wide_t* gth = need_threshold ? grad_th.data_ptr<wide_t>() : nullptr;
        // Parallel over latent columns: each θ_j is reduced over the rows by one thread, in row
        // order, so the result does not depend on the thread count.
        at::parallel_for(0, d, 256, [&](int64_t begin, int64_t end) {
          std::vector<wide_t> acc(end - begin, wide_t(0));
          for (int64_t r = 0; r < rows; ++r) {
            const pre_t* prow = pp + r * d;
            const grad_t* grow = gp + r * d;
            for (int64_t j = begin; j < end; ++j) {
              const wide_t x = static_cast<wide_t>(prow[j]);
              if (write_pre) gpre[r * d + j] = x > tp[j] ? grow[j] : grad_t(0);
              if (need_threshold) {
                const wide_t u = (x - tp[j]) / ep[j];
                if (u > wide_t(-0.5) && u < wide_t(0.5)) {
                  const wide_t coef = is_step ? -(wide_t(1) / ep[j]) : -(tp[j] / ep[j]);
                  acc[j - begin] += coef * static_cast<wide_t>(grow[j]);
                }
              }
            }
          }
          if (need_threshold)
            for (int64_t j = begin; j < end; ++j) gth[j] = acc[j - begin];
        });
      });
    }
  });
  return {grad_pre, grad_th.to(threshold.scalar_type())};
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("jumprelu", &jumprelu_cpu);
  m.impl("step", &step_cpu);
  m.impl("jumprelu_backward", &jumprelu_backward_cpu);
}

}  // namespace fastsae
