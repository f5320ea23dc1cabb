// CPU entry point of the depthwise 3x3 conv + GLU of SANA's Mix-FFN (spar_kernels/dwconv_glu.py) (its GPU path is Triton). Plain C++ types: pointers as uintptr_t,
// sizes and strides in elements, DType codes. Per-sample vectors, weights and biases arrive as
// contiguous fp32, prepared by the caller.
#pragma once
#include <cstdint>

namespace spar {
// out[b, p, c] = a * silu(g), a/g = depthwise 3x3 conv (zero pad 1) of channels c / C + c of x
// w9: [9, 2C] fp32 (tap-major), bias: [2C] fp32 or 0
void dwconv_glu_cpu(uintptr_t x, int dtype, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sxb,
                    int64_t sxn, uintptr_t w9, uintptr_t bias, uintptr_t out, int64_t sob, int64_t son);
}  // namespace spar
