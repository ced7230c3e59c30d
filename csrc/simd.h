#pragma once
#include <cstdint>

namespace fastsae {
// Defined in simd.cpp with per-ISA clones.
float dot_f32(const float* a, const float* b, int64_t n);
void axpy_f32(float* y, float a, const float* x, int64_t n);
}  // namespace fastsae
