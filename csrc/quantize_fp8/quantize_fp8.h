// quantize_fp8.h: the per-element and per-row math of FP8 (e4m3fn) quantization, shared by
// the CUDA kernel (quantize_fp8.cu) and its CPU twin (quantize_fp8_cpu.cpp).
//
//   scale = max(amax, kMinAmax) / 448        (per token row, or one for the whole tensor)
//   q     = e4m3fn_saturating(x / scale)     (round to nearest even, clamp to +-448)
//
// x / scale (a true IEEE division, not x * (1/scale)) keeps the CPU twin, the CUDA kernel and
// the PyTorch reference bit-identical. NaN propagates as in the reference (torch's amax and
// clamp): a NaN in a row (or the tensor) gives a NaN amax, a NaN scale and NaN codes; fmaxf and
// std::max would drop it, so the amax is taken with amax_combine.
#pragma once

#include "common/spar_common.h"

namespace spar::quant {

constexpr float kMinAmax = 1e-12f;

// max(m, a) that keeps a NaN from either side (NaN compares false with everything). The
// result does not depend on the order values are combined in, so reductions stay deterministic.
SPAR_HD float amax_combine(float m, float a) { return (a > m || a != a) ? a : m; }

SPAR_HD float scale_from_amax(float amax) {
  return amax != amax ? amax : fmaxf(amax, kMinAmax) / kFp8E4M3Max;  // NaN amax -> NaN scale
}

template <typename T>
SPAR_HD float abs_value(T v) { return fabsf(to_float(v)); }

template <typename T>
SPAR_HD uint8_t quantize(T v, float scale) { return fp8e4m3_from_float_sat(to_float(v) / scale).bits; }

}  // namespace spar::quant
