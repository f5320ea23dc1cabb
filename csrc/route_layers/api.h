// Launch entry points of route_layers, in plain C++ types (no torch, no CUDA headers), so the
// pybind11 bindings compile with any host compiler.
//
//   hidden:    [L, N, D] elements of dtype `dtype` (DType code), element (l, n, d) at
//              hidden + l * stride_l + n * stride_n + d * stride_d
//   layer_ids: [K] int32 (ids_int64 = false) or int64, contiguous, 1 <= K <= 16
//   logits:    [N, K] of dtype `logits_dtype` (F32/F16/BF16), element (n, k) at
//              logits + n * logits_stride_n + k * logits_stride_k
//   alpha:     [K] contiguous of dtype `alpha_dtype` (F32/F16/BF16)
//   ln_weight, ln_bias: [D] contiguous of dtype `param_dtype` (hidden's dtype or F32), 0 = absent
//              (weight 1 / bias 0)
//   rows:      [M] int32/int64 row indices into N (0 = none: M == N, row i is hidden row i)
//   out:       [M, D] of hidden's dtype, contiguous
// Out-of-range layer ids or rows produce NaN output rows; nothing outside `hidden` is read.
#pragma once
#include <cstdint>

namespace spar {
void route_layers_cpu(uintptr_t hidden, int dtype, int64_t L, int64_t N, int64_t D, int64_t stride_l,
                      int64_t stride_n, int64_t stride_d, uintptr_t layer_ids, bool ids_int64, int64_t K,
                      uintptr_t logits, int logits_dtype, int64_t logits_stride_n, int64_t logits_stride_k,
                      uintptr_t alpha, int alpha_dtype, uintptr_t ln_weight, uintptr_t ln_bias, int param_dtype,
                      float tau, float eps, uintptr_t rows, bool rows_int64, int64_t M, uintptr_t out);

// Same arguments plus the cudaStream_t. Requires D <= kRouteMaxDCuda (the Python wrapper falls back
// to the reference above it).
void route_layers_cuda(uintptr_t hidden, int dtype, int64_t L, int64_t N, int64_t D, int64_t stride_l,
                       int64_t stride_n, int64_t stride_d, uintptr_t layer_ids, bool ids_int64, int64_t K,
                       uintptr_t logits, int logits_dtype, int64_t logits_stride_n, int64_t logits_stride_k,
                       uintptr_t alpha, int alpha_dtype, uintptr_t ln_weight, uintptr_t ln_bias, int param_dtype,
                       float tau, float eps, uintptr_t rows, bool rows_int64, int64_t M, uintptr_t out,
                       uintptr_t stream);

constexpr int64_t kRouteMaxDCuda = 8192;

}  // namespace spar
