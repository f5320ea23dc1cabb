// cpu_simd.h: AVX2/F16C loads and stores of 8 elements as fp32, for the CPU twins in this folder
// (host-only; SPAR_ROUTE_AVX2 is defined when the build targets a CPU that has them).
#pragma once

#include "common/spar_common.h"

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define SPAR_ROUTE_AVX2 1
#endif

namespace spar {
namespace simd {
#ifdef SPAR_ROUTE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
// Store 8 floats as T (round to nearest even; the same rounding as from_float<T>).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(f16_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// bf16: round to nearest even on the bits, NaN kept quiet (the vector form of bf16_from_float).
inline void store8(bf16_t* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, qnan, nan);
  // pack the 8 low halves: [r0..r3 | r4..r7] -> 8 x u16
  const __m256i packed = _mm256_packus_epi32(r, r);  // values are < 2^16: no saturation
  const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(ordered));
}
#endif
}  // namespace simd
}  // namespace spar
