// CPU twin of quantize_fp8.cu: the same math (quantize_fp8.h), rows spread over OpenMP threads.
// Contiguous rows take 8-wide AVX2 loops (where the build targets AVX2): the amax as an integer
// max over the bits of |x| (for non-negative floats the bit order is the value order, and a NaN's
// bits are above +inf's, so NaN propagates exactly as quant::amax_combine does), and the
// division plus the saturating round-to-nearest-even e4m3 encode of fp8e4m3_from_float_sat in
// integer vector ops (bit-identical to the scalar encode, which handles the tail).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "quantize_fp8/api.h"
#include "quantize_fp8/quantize_fp8.h"
#include "route_layers/cpu_simd.h"

namespace spar {
namespace {

template <typename T>
float row_amax(const T* x, int64_t cols) {
  float m = 0.f;
  int64_t c = 0;
#ifdef SPAR_ROUTE_AVX2
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
  for (; c + 16 <= cols; c += 16) {
    a0 = _mm256_max_epi32(a0, _mm256_and_si256(_mm256_castps_si256(simd::load8(x + c)), abs_mask));
    a1 = _mm256_max_epi32(a1, _mm256_and_si256(_mm256_castps_si256(simd::load8(x + c + 8)), abs_mask));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_max_epi32(a0, a1));
  int32_t mb = 0;
  for (int32_t v : lanes) mb = std::max(mb, v);
  m = bits_to_float(uint32_t(mb));
#endif
  for (; c < cols; ++c) m = quant::amax_combine(m, quant::abs_value(x[c]));
  return m;
}

#ifdef SPAR_ROUTE_AVX2
// 8 floats -> 8 e4m3fn codes, exactly fp8e4m3_from_float_sat (spar_common.h) lane by lane.
inline void encode8(uint8_t* q, __m256 f) {
  const __m256i u0 = _mm256_castps_si256(f);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u0, 24), _mm256_set1_epi32(0x80));
  const __m256i u = _mm256_and_si256(u0, _mm256_set1_epi32(0x7fffffff));
  const __m256 a = _mm256_castsi256_ps(u);
  // normal range: round the mantissa to 3 bits (nearest even), rebias the exponent by 127 - 7
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 20), _mm256_set1_epi32(1));
  const __m256i ur = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7ffff), lsb));
  const __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(ur, 23), _mm256_set1_epi32(120));
  __m256i code = _mm256_or_si256(_mm256_slli_epi32(e, 3), _mm256_and_si256(_mm256_srli_epi32(ur, 20), _mm256_set1_epi32(7)));
  code = _mm256_min_epi32(code, _mm256_set1_epi32(0x7e));
  // below 2^-6: subnormal steps of 2^-9, rounded to nearest even
  const __m256i sub = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(512.0f)),
                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256 is_sub = _mm256_cmp_ps(a, _mm256_set1_ps(0.015625f), _CMP_LT_OQ);
  code = _mm256_blendv_epi8(code, sub, _mm256_castps_si256(is_sub));
  const __m256 is_sat = _mm256_cmp_ps(a, _mm256_set1_ps(kFp8E4M3Max), _CMP_GE_OQ);
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7e), _mm256_castps_si256(is_sat));
  const __m256i is_nan = _mm256_cmpgt_epi32(u, _mm256_set1_epi32(0x7f800000));
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7f), is_nan);
  code = _mm256_or_si256(code, sign);
  // 8 x i32 (each < 256) -> 8 bytes
  const __m256i w16 = _mm256_packus_epi32(code, code);      // [c0..c3 c0..c3 | c4..c7 c4..c7] as u16
  const __m256i w8 = _mm256_packus_epi16(w16, w16);          // bytes
  const uint32_t lo = uint32_t(_mm256_extract_epi32(w8, 0)), hi = uint32_t(_mm256_extract_epi32(w8, 4));
  const uint64_t packed = uint64_t(lo) | (uint64_t(hi) << 32);
  std::memcpy(q, &packed, 8);
}
#endif

template <typename T>
void quantize_row(const T* xr, float scale, uint8_t* qr, int64_t cols) {
  int64_t c = 0;
#ifdef SPAR_ROUTE_AVX2
  const __m256 vs = _mm256_set1_ps(scale);
  for (; c + 8 <= cols; c += 8) encode8(qr + c, _mm256_div_ps(simd::load8(xr + c), vs));  // x / scale: IEEE division
#endif
  for (; c < cols; ++c) qr[c] = quant::quantize(xr[c], scale);
}

template <typename T>
void run(const T* x, int64_t rows, int64_t cols, int64_t row_stride, uint8_t* q, float* scales,
         bool per_token) {
  float tensor_scale = 0.f;
  if (!per_token) {
    // per-thread maxima combined with amax_combine (OpenMP's max reduction drops NaN)
    float amax = 0.f;
#pragma omp parallel
    {
      float m = 0.f;
#pragma omp for schedule(static) nowait
      for (int64_t r = 0; r < rows; ++r) m = quant::amax_combine(m, row_amax(x + r * row_stride, cols));
#pragma omp critical
      amax = quant::amax_combine(amax, m);
    }
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
    quantize_row(xr, scale, q + r * cols, cols);
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
