// Scalar element math of the CPU twins (no libm calls): a polynomial exp for SiLU, accurate to
// ~2 ulp in fp32, and ReLU. g++ 12 at its default -ftrapping-math does NOT vectorize a loop calling
// fast_exp / silu (the clamp's ternaries count as control flow), so a hot vector loop spells the
// same math in vector types instead, as csrc/dwconv_glu/dwconv_glu_kernels.h does.
#pragma once
#include "common/spar_common.h"

namespace spar {
namespace fast {

// exp(x) for x in fp32 range: 2^n * p(r), n = round(x / ln2), r = x - n ln2 (Cody-Waite split),
// p the degree-6 Taylor/minimax polynomial (Cephes expf). Saturates to 0 / inf outside +-88.
SPAR_HD float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
  // round to nearest via the 1.5 * 2^23 trick (no libm call, unlike nearbyint)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = fmaf(n, -0.693359375f, x);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p * r, r, r) + 1.0f;
  return p * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
}

// Below -88, exp(-g) would saturate at exp(88) and g / (1 + e^88) grow with |g| (-0.6 at -1e38):
// there 1 + exp(-g) is taken as inf, so silu(g) = -0 (NaN at -inf, as torch's g * sigmoid(g))
SPAR_HD float silu(float g) { return g / (g < -88.0f ? INFINITY : 1.0f + fast_exp(-g)); }

// max(v, 0) with a NaN kept (as torch.relu): the comparison is false for NaN
SPAR_HD float relu(float v) { return v < 0.0f ? 0.0f : v; }

}  // namespace fast
}  // namespace spar
