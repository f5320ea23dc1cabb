// CPU twin of quantize_fp8.cu: the same math (quantize_fp8.h), rows spread over OpenMP threads.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "quantize_fp8/api.h"
#include "quantize_fp8/quantize_fp8.h"

namespace spar {
namespace {

template <typename T>
float row_amax(const T* x, int64_t cols) {
  float m = 0.f;
  for (int64_t c = 0; c < cols; ++c) m = std::max(m, quant::abs_value(x[c]));
  return m;
}

template <typename T>
void run(const T* x, int64_t rows, int64_t cols, int64_t row_stride, uint8_t* q, float* scales,
         bool per_token) {
  float tensor_scale = 0.f;
  if (!per_token) {
    float amax = 0.f;
#pragma omp parallel for reduction(max : amax) schedule(static)
    for (int64_t r = 0; r < rows; ++r) amax = std::max(amax, row_amax(x + r * row_stride, cols));
    tensor_scale = quant::scale_from_amax(amax);
    scales[0] = tensor_scale;
  }
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * row_stride;
    float scale = tensor_scale;
    if (per_token) {
      scale = quant::scale_from_amax(row_amax(xr, cols));
      scales[r] = scale;
    }
    uint8_t* qr = q + r * cols;
    for (int64_t c = 0; c < cols; ++c) qr[c] = quant::quantize(xr[c], scale);
  }
}

}  // namespace

void quantize_fp8_cpu(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                      uintptr_t q, uintptr_t scales, bool per_token) {
  auto* qp = reinterpret_cast<uint8_t*>(q);
  auto* sp = reinterpret_cast<float*>(scales);
  switch (static_cast<DType>(dtype)) {
    case DType::F32: return run(reinterpret_cast<const float*>(x), rows, cols, row_stride, qp, sp, per_token);
    case DType::F16: return run(reinterpret_cast<const f16_t*>(x), rows, cols, row_stride, qp, sp, per_token);
    case DType::BF16: return run(reinterpret_cast<const bf16_t*>(x), rows, cols, row_stride, qp, sp, per_token);
    default: throw std::invalid_argument("quantize_fp8: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace spar
