// Launch entry points of quantize_fp8, in plain C++ types (no torch, no CUDA headers), so the
// pybind11 bindings compile with any host compiler.
//   x: rows x cols elements of dtype `dtype` (DType code), row r at x + r * row_stride
//   q: rows x cols bytes (float8_e4m3fn), contiguous
//   scales: `rows` floats (per_token) or one float (per tensor)
#pragma once
#include <cstdint>

namespace spar {
void quantize_fp8_cpu(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                      uintptr_t q, uintptr_t scales, bool per_token);
// workspace: one float of device memory, used for the tensor-wide amax.
void quantize_fp8_cuda(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                       uintptr_t q, uintptr_t scales, bool per_token, uintptr_t workspace,
                       uintptr_t stream);
}  // namespace spar
