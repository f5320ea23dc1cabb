// flow_sampler.h: the per-element math of the fused flow-sampler step, shared by the CUDA
// kernel (flow_sampler.cu) and its CPU twin (flow_sampler_cpu.cpp). Everything in fp32.
//
// One table row per model evaluation (built on the host by spar_kernels/flow_sampler.py):
//   guidance  v_t = vu + g (vc - vu);  v_g = vi + gi (v_t - vi) if kImg;
//             v_g *= clamp(|vc| / (|v_g| + 1e-8), renorm_min, 1) if kRenorm;  v = kCfg ? v_g : vc
//             (kRenormText: v_t is renormed instead, before the image branch, as BAGEL's "text_channel")
//   solver    x0 = x - sigma v;  out = cx x + cv v + c0 x0 [+ c1 h1] [+ c2 h2]
//             h1 <- x (kStoreH1X) or x0 (kStoreH1X0);  h2 <- v (kStoreH2V)
// Euler: cx = 1, cv = dt. Heun: predictor stores (x, v), corrector out = h1 + dt/2 (h2 + v).
// DPM-Solver++ 2M: cx = s_t / s_s, c0 / c1 fold D0 and D1 = (x0 - h1) / r0, h1 <- x0.
// The column and flag numbers must match spar_kernels/flow_sampler.py (COL_* / F_*).
#pragma once

#include "common/spar_common.h"

namespace spar::flow {

enum Col : int { kSigma = 0, kCx, kCv, kC0, kC1, kC2, kG, kGi, kFlags, kNumCols = 12 };
enum Flag : int {
  kCfg = 1, kImg = 2, kRenorm = 4, kStoreH1X = 8, kStoreH1X0 = 16, kStoreH2V = 32, kReadH1 = 64, kReadH2 = 128,
  kRenormText = 256  // BAGEL's "text_channel": renorm the text-guided velocity, before the image branch
};
enum Renorm : int { kRenormNone = 0, kRenormGlobal = 1, kRenormRow = 2, kRenormCol = 3 };
constexpr float kRenormEps = 1e-8f;  // BAGEL: norm_v_t / (norm_v_t_ + 1e-8)

struct Row {
  float sigma, cx, cv, c0, c1, c2, g, gi;
  int flags;
};

// Row k of the table; evaluations past the end use the last (identity) row.
SPAR_HD Row load_row(const float* table, int64_t rows, int64_t k) {
  if (k < 0 || k > rows - 1) k = rows - 1;
  const float* t = table + k * kNumCols;
  return Row{t[kSigma], t[kCx], t[kCv], t[kC0], t[kC1], t[kC2], t[kG], t[kGi], int(t[kFlags])};
}

SPAR_HD bool renorm_on(const Row& r, int mode) { return mode != kRenormNone && (r.flags & kCfg) && (r.flags & kRenorm); }

// The velocity whose norm the renorm compares with |v_cond| (only called when kCfg is on, so
// vu is present): the fully guided one, or the text-guided one under kRenormText.
SPAR_HD float guide(float vc, float vu, float vi, const Row& r) {
  float v = vu + r.g * (vc - vu);
  if ((r.flags & kImg) && !(r.flags & kRenormText)) v = vi + r.gi * (v - vi);
  return v;
}

// clamp(sqrt(ss_cond) / (sqrt(ss_guided) + eps), lo, 1) from the two sums of squares.
SPAR_HD float renorm_scale(float ss_cond, float ss_guided, float lo) {
  const float s = sqrtf(ss_cond) / (sqrtf(ss_guided) + kRenormEps);
  return fminf(fmaxf(s, lo), 1.0f);
}

// The velocity the solver uses, given the renorm factor (1 when renorm is off).
SPAR_HD float velocity(float vc, float vu, float vi, const Row& r, float scale) {
  if (!(r.flags & kCfg)) return vc;
  if (!(r.flags & kRenormText)) return guide(vc, vu, vi, r) * scale;
  const float t = (vu + r.g * (vc - vu)) * scale;
  return (r.flags & kImg) ? vi + r.gi * (t - vi) : t;
}

// The solver update of one element; h1 / h2 are the element's history (dummies when absent:
// the row's flags never touch a history the method does not have).
SPAR_HD float update(float x, float v, float& h1, float& h2, const Row& r) {
  const float x0 = x - r.sigma * v;
  float o = r.cx * x + r.cv * v + r.c0 * x0;
  if (r.flags & kReadH1) o += r.c1 * h1;
  if (r.flags & kReadH2) o += r.c2 * h2;
  if (r.flags & kStoreH1X) h1 = x;
  if (r.flags & kStoreH1X0) h1 = x0;
  if (r.flags & kStoreH2V) h2 = v;
  return o;
}

// Load element i (stride in elements) of a branch, or 0 when the branch is absent.
template <typename T>
SPAR_HD float load_or_zero(const T* p, int64_t off) { return p ? to_float(p[off]) : 0.f; }

}  // namespace spar::flow
