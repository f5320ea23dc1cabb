// CPU entry point of rms_norm (its GPU path is the Triton kernel in spar_kernels/rms_norm.py).
// Plain C++ types: pointers as uintptr_t, sizes and strides in elements, DType codes.
#pragma once
#include <cstdint>

namespace spar {
// rows x D elements of dtype `dtype`; row i of x at x + i * x_row_stride, element d of it at
// + d * x_d_stride (any strides), likewise `residual` (0 = none). weight: [D] contiguous of
// `weight_dtype` (x's dtype or F32). out, residual_out: [rows, D] contiguous of x's dtype
// (residual_out only with a residual).
//   s = x + residual  (rounded to x's dtype, stored in residual_out)
//   y = s * rsqrt(mean(s^2) + eps) * weight            (fp32 math, one rounding)
void rms_norm_cpu(uintptr_t x, int dtype, int64_t rows, int64_t D, int64_t x_row_stride, int64_t x_d_stride,
                  uintptr_t residual, int64_t r_row_stride, int64_t r_d_stride, uintptr_t weight, int weight_dtype,
                  float eps, uintptr_t out, uintptr_t residual_out);
}  // namespace spar
