// CPU entry point of the depthwise 3x3 conv + GLU of SANA's Mix-FFN (spar_kernels/dwconv_glu.py) (its GPU path is Triton). Plain C++ types: pointers as uintptr_t,
// sizes and strides in elements, DType codes. Weights and biases arrive as fp32, prepared by the
// caller.
#pragma once
#include <cstdint>

namespace spar {
// out[b, p, c] = a * silu(g), a/g = depthwise 3x3 conv (zero pad 1) of channels c / C + c of x
// w: fp32, tap t (3 ky + kx) of channel c at w[c * swc + t * swt] (a [2C, 9] view of the conv's
// [2C, 1, 3, 3] weight: swc = 9, swt = 1), read in place; bias: [2C] contiguous fp32 or 0
void dwconv_glu_cpu(uintptr_t x, int dtype, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sxb,
                    int64_t sxn, uintptr_t w, int64_t swc, int64_t swt, uintptr_t bias, uintptr_t out, int64_t sob,
                    int64_t son);
}  // namespace spar
