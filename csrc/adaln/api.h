// CPU entry point of adaLN modulation and the gated residual (spar_kernels/adaln.py) (its GPU path is Triton). Plain C++ types: pointers as uintptr_t,
// sizes and strides in elements (any strides), DType codes. Per-sample vectors arrive as fp32
// [B, C] rows with channel stride 1 (row b at ptr + b * row stride; 0 broadcasts one row),
// prepared by the caller.
#pragma once
#include <cstdint>

namespace spar {
// y[b, n, :] = LayerNorm(x[b, n, :]) * (1 + scale[b, :]) + shift[b, :]
void adaln_layernorm_cpu(uintptr_t x, int dtype, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn,
                         int64_t sxc, uintptr_t shift, int64_t shb, uintptr_t scale, int64_t scb, uintptr_t y,
                         int64_t syb, int64_t syn, int64_t syc, double eps);
// out[b, n, :] = x[b, n, :] + gate[b, :] * y[b, n, :]   (out may be x)
void gated_residual_cpu(uintptr_t x, int dtype, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn,
                        int64_t sxc, uintptr_t y, int64_t syb, int64_t syn, int64_t syc, uintptr_t gate,
                        int64_t gsb, uintptr_t out, int64_t sob, int64_t son, int64_t soc);
}  // namespace spar
