// CPU entry point of split_by_expert with the per-expert RMSNorm fused (its GPU path is Triton,
// spar_kernels/split_by_expert.py). Plain C++ types: pointers as uintptr_t, sizes and strides in
// elements, DType codes.
#pragma once
#include <cstdint>

namespace spar {
// split_by_expert's CPU path with the per-expert RMSNorm fused :
//   out[j] = x[perm[j]] * rsqrt(mean(x[perm[j]]^2) + eps) * weights[clamp(expert_ids[perm[j]], 0, E-1)]
//   x: [N, D] of dtype `dtype`, element (n, d) at x + n * stride_n + d * stride_d; perm: [N] int64;
//   expert_ids: [N] int32/int64; weights: [E, D] of `weight_dtype` (x's dtype or F32), row e at
//   weights + e * weight_stride, unit inner stride; out: [N, D] contiguous of x's dtype.
void split_by_expert_cpu(uintptr_t x, int dtype, int64_t N, int64_t D, int64_t stride_n, int64_t stride_d,
                         uintptr_t perm, uintptr_t expert_ids, bool ids_int64, uintptr_t weights, int weight_dtype,
                         int64_t E, int64_t weight_stride, float eps, uintptr_t out);
}  // namespace spar
