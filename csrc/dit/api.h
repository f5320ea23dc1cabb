// CPU entry points of the SANA DiT block kernels (their GPU path is Triton: spar_kernels/adaln.py,
// dwconv_glu.py, linear_attention.py). Plain C++ types: pointers as uintptr_t, sizes
// and strides in elements, DType codes (x / y / out share one dtype). Per-sample
// modulation vectors, conv weights and biases arrive as contiguous fp32, prepared by the caller.
#pragma once
#include <cstdint>

namespace spar {
// y[b, n, :] = LayerNorm(x[b, n, :]) * scale1[b, :] + shift[b, :]   (scale1 = 1 + scale)
void adaln_layernorm_cpu(uintptr_t x, int dtype, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn,
                         uintptr_t shift, uintptr_t scale1, uintptr_t y, int64_t syb, int64_t syn, double eps);
// out[b, n, :] = x[b, n, :] + gate[b, :] * y[b, n, :]   (out may be x)
void gated_residual_cpu(uintptr_t x, int dtype, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn,
                        uintptr_t y, int64_t syb, int64_t syn, uintptr_t gate, uintptr_t out, int64_t sob,
                        int64_t son);
// out[b, p, c] = a * silu(g), a/g = depthwise 3x3 conv (zero pad 1) of channels c / C + c of x
// w9: [9, 2C] fp32 (tap-major), bias: [2C] fp32 or 0
void dwconv_glu_cpu(uintptr_t x, int dtype, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sxb,
                    int64_t sxn, uintptr_t w9, uintptr_t bias, uintptr_t out, int64_t sob, int64_t son);
// ReLU linear attention, d = e = D in {16, 32, 64} (returns false, doing nothing, for other D):
// out[b, n, h, :] = relu(q) S / (relu(q) . z + eps), S = sum_n relu(k) v^T, z = sum_n relu(k)
// strides (batch, token, head) in elements; head dims contiguous
bool linear_attention_cpu(uintptr_t q, uintptr_t k, uintptr_t v, int dtype, int64_t B, int64_t Nq, int64_t Nk,
                          int64_t H, int64_t D, int64_t sqb, int64_t sqn, int64_t sqh, int64_t skb, int64_t skn,
                          int64_t skh, int64_t svb, int64_t svn, int64_t svh, uintptr_t out, int64_t sob,
                          int64_t son, int64_t soh, double eps);
}  // namespace spar
