// route_layers.h: the per-row math of Dynamic Token Routing, shared by the CUDA kernel
// (route_layers.cu) and its CPU twin (route_layers_cpu.cpp).
//
//   v_k    = logits[r, k] / tau
//   w_k    = exp(v_k - max_j v_j) / sum_j exp(v_j - max_j v_j)        (softmax, no overflow)
//   c_k    = w_k * alpha_k
//   m[d]   = sum_k c_k * hidden[layer_ids[k], r, d]                     (fp32)
//   mean   = sum_d m[d] / D,  var = sum_d (m[d] - mean)^2 / D             (two passes over m)
//   out[d] = (m[d] - mean) * rsqrt(var + eps) * w[d] + b[d]             (one rounding)
//
// Both sides call exactly these functions for every scalar step; only the order of the fp32
// sums (sequential on CPU, butterfly on GPU) differs.
#pragma once

#include "common/spar_common.h"

namespace spar::route {

constexpr int kMaxK = 16;

// A scalar of runtime dtype `code` (F32/F16/BF16) at p[i], as float.
SPAR_HD float load_float(const void* p, int code, int64_t i) {
  switch (static_cast<DType>(code)) {
    case DType::F16: return to_float(static_cast<const f16_t*>(p)[i]);
    case DType::BF16: return to_float(static_cast<const bf16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

SPAR_HD int64_t load_index(const void* p, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(p)[i] : int64_t(static_cast<const int32_t*>(p)[i]);
}

SPAR_HD bool in_range(int64_t v, int64_t n) { return v >= 0 && v < n; }

// Softmax pieces: the tempered logit, its shifted exponential, the final mixture coefficient.
SPAR_HD float tempered(float logit, float tau) { return logit / tau; }
SPAR_HD float shifted_exp(float v, float vmax) { return expf(v - vmax); }
SPAR_HD float mix_coeff(float e, float esum, float alpha) { return e / esum * alpha; }

// One step of the mixture accumulation.
SPAR_HD float mix_fma(float acc, float c, float h) { return fmaf(c, h, acc); }

// LayerNorm statistics and affine.
SPAR_HD float ln_mean(float sum, int64_t D) { return sum / float(D); }
SPAR_HD float ln_rstd(float centered_sq_sum, int64_t D, float eps) {
  return 1.0f / sqrtf(centered_sq_sum / float(D) + eps);
}
SPAR_HD float ln_apply(float m, float mean, float rstd, float w, float b) { return (m - mean) * rstd * w + b; }

}  // namespace spar::route
