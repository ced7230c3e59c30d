#pragma once
#include <cstdint>

namespace fastsae {
// Defined in simd.cpp with per-ISA clones.
float dot_f32(const float* a, const float* b, int64_t n);
void axpy_f32(float* y, float a, const float* x, int64_t n);
// dot(g, w) and, over the same pass through g, acc += v·g (the sparse backward's SDDMM fused with the
// decoder-gradient scatter: each row of grad_x_hat is read once for both).
float dot_axpy_f32(const float* g, const float* w, float* acc, float v, int64_t n);
// y1 += a1·x and y2 += a2·x over one pass through x (two decodes sharing the decoder rows).
void axpy2_f32(float* y1, float a1, float* y2, float a2, const float* x, int64_t n);
// JumpReLU's dense step in float32 (jump_math.h's jump_dense_row / jump_dense_grad_rows, vectorised).
int64_t jump_dense_row_f32(const float* pre, const float* th, const float* eps, int64_t n, float* f, uint8_t* fired,
                           int64_t* entries);
void jump_dense_grad_rows_f32(const float* pre, float* g, int64_t ld, int64_t rows, int64_t n, const float* th,
                              const float* eps, const float* gl0, bool ste, float* genc, float* s_th);
// ReLU's and Gated's dense backward passes in float32 (jump_math.h's relu_dense_grad_rows / gated_dense_grad_rows).
void relu_dense_grad_rows_f32(const float* f, float* g, int64_t ld, int64_t rows, int64_t n, const float* w,
                              const float* gsp, float* genc, float* s_w);
void gated_dense_grad_rows_f32(const float* f, const float* gate, const float* g2, float* g, int64_t ld, int64_t rows,
                               int64_t n, const float* scale, const float* b_mag, const float* gsp, float* genc,
                               float* s_gate, float* s_mag, float* s_r);
}  // namespace fastsae
