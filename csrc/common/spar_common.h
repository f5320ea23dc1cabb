// spar_common.h: types and conversions shared by the CUDA kernels and their CPU twins.
//
// Everything here compiles as host code (g++) and as device code (nvcc). Element types
// are plain 16-bit storage structs so the CPU build needs no CUDA headers; on the device
// the fp16 conversions use the hardware instructions, everywhere else the bit-exact
// software routines below.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SPAR_HD __host__ __device__ __forceinline__
#include <cuda_fp16.h>
#else
#define SPAR_HD inline
#endif

namespace spar {

// Must match spar_kernels/_ext.py (DTYPE_CODES).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F8E4M3 = 3 };

struct alignas(2) bf16_t { uint16_t bits; };
struct alignas(2) f16_t { uint16_t bits; };
struct alignas(1) fp8e4m3_t { uint8_t bits; };

// The same 4 bytes read as the other type (std::bit_cast is C++20): a register move on host and
// device (nvcc and g++ both lower a 4-byte memcpy to one).
template <typename To, typename From>
SPAR_HD To bit_cast4(From v) {
  static_assert(sizeof(To) == 4 && sizeof(From) == 4, "bit_cast4: 4-byte types only");
  To out;
  memcpy(&out, &v, 4);
  return out;
}

SPAR_HD float bits_to_float(uint32_t u) { return bit_cast4<float>(u); }
SPAR_HD uint32_t float_to_bits(float f) { return bit_cast4<uint32_t>(f); }

// Round to nearest, ties to even (the default FP environment on host and device).
SPAR_HD float round_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}

// ---- bfloat16: round to nearest even, NaN stays NaN ----
SPAR_HD float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
SPAR_HD bf16_t bf16_from_float(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

// ---- float16 ----
SPAR_HD float to_float(f16_t x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t man = x.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: value = man * 2^-24
    float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

SPAR_HD f16_t f16_from_float(float f) {
#if defined(__CUDA_ARCH__)
  return f16_t{__half_as_ushort(__float2half_rn(f))};
#else
  uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};          // nan
  if (u >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};         // rounds to inf
  if (u < 0x38800000u) {                                                 // subnormal or zero
    // value / 2^-24, rounded to nearest even by the FPU (exact: fits in float)
    float v = bits_to_float(u) * 16777216.0f;
    float r = round_even(v);
    return f16_t{uint16_t(sign | uint16_t(r))};
  }
  uint32_t lsb = (u >> 13) & 1u;
  u += 0xfffu + lsb;
  return f16_t{uint16_t(sign | uint16_t(((u >> 13) - (112u << 10)) & 0x7fffu))};
#endif
}

// Generic load/store between storage types and fp32.
SPAR_HD float to_float(float x) { return x; }
template <typename T> SPAR_HD T from_float(float f);
template <> SPAR_HD float from_float<float>(float f) { return f; }
template <> SPAR_HD bf16_t from_float<bf16_t>(float f) { return bf16_from_float(f); }
template <> SPAR_HD f16_t from_float<f16_t>(float f) { return f16_from_float(f); }

// ---- float8 e4m3fn (bias 7, max 448, no inf, NaN = 0x7f) ----
constexpr float kFp8E4M3Max = 448.0f;

// Round-to-nearest-even encode of a float into e4m3fn, saturating to +-448.
SPAR_HD fp8e4m3_t fp8e4m3_from_float_sat(float f) {
  uint32_t u = float_to_bits(f);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return fp8e4m3_t{uint8_t(sign | 0x7fu)};
  const float a = bits_to_float(u);
  if (a >= kFp8E4M3Max) return fp8e4m3_t{uint8_t(sign | 0x7eu)};
  if (a < 0.015625f) {  // below 2^-6: subnormals in steps of 2^-9, rounded to nearest even
    float m = round_even(a * 512.0f);  // 0..8; 8 is the smallest normal, code 0x08
    return fp8e4m3_t{uint8_t(sign | uint8_t(m))};
  }
  const uint32_t lsb = (u >> 20) & 1u;
  u += 0x7ffffu + lsb;
  uint32_t e = (u >> 23) - 127u + 7u;
  uint32_t code = (e << 3) | ((u >> 20) & 7u);
  if (code > 0x7eu) code = 0x7eu;
  return fp8e4m3_t{uint8_t(sign | code)};
}

}  // namespace spar
