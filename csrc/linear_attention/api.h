// CPU entry point of ReLU linear attention (spar_kernels/linear_attention.py) (its GPU path is Triton). Plain C++ types: pointers as uintptr_t,
// sizes and strides in elements, DType codes. Per-sample vectors, weights and biases arrive as
// contiguous fp32, prepared by the caller.
#pragma once
#include <cstdint>

namespace spar {
// ReLU linear attention, d = e = D in {16, 32, 64} (returns false, doing nothing, for other D):
// out[b, n, h, :] = relu(q) S / (relu(q) . z + eps), S = sum_n relu(k) v^T, z = sum_n relu(k)
// strides (batch, token, head) in elements; head dims contiguous
bool linear_attention_cpu(uintptr_t q, uintptr_t k, uintptr_t v, int dtype, int64_t B, int64_t Nq, int64_t Nk,
                          int64_t H, int64_t D, int64_t sqb, int64_t sqn, int64_t sqh, int64_t skb, int64_t skn,
                          int64_t skh, int64_t svb, int64_t svn, int64_t svh, uintptr_t out, int64_t sob,
                          int64_t son, int64_t soh, double eps);
}  // namespace spar
