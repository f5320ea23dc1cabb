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

// What row r needs besides x and v_cond, or nullptr when the given inputs suffice. v_uncond is
// read only when guidance is on at this step (every renorm mode included: renorm is part of the
// guidance), v_img_uncond only when its image branch is on too: BAGEL skips the unconditional
// passes outside its guidance interval. The CPU twin throws this message; the CUDA kernels
// (whose host launcher cannot see the device-side row) trap on it; spar_kernels/flow_sampler.py
// checks the same condition on its host copy of the flags before every step.
SPAR_HD const char* missing_input(const Row& r, bool has_vu, bool has_vi, bool has_h1, bool has_h2) {
  if ((r.flags & kCfg) && !has_vu) return "guidance is on at this step but v_uncond is missing";
  if ((r.flags & kCfg) && (r.flags & kImg) && !has_vi)
    return "image guidance is on at this step but v_img_uncond is missing";
  if ((r.flags & (kReadH1 | kStoreH1X | kStoreH1X0)) && !has_h1) return "the method needs the h1 history buffer";
  if ((r.flags & (kReadH2 | kStoreH2V)) && !has_h2) return "the method needs the h2 history buffer";
  return nullptr;
}

// The velocity whose norm the renorm compares with |v_cond| (only when kCfg is on, so vu is
// present): the fully guided one (kImgNorm: the image branch is on and not kRenormText), or the
// text-guided one.
template <bool kImgNorm>
SPAR_HD float guide_t(float vc, float vu, float vi, float g, float gi) {
  float v = vu + g * (vc - vu);
  if (kImgNorm) v = vi + gi * (v - vi);
  return v;
}

SPAR_HD bool img_in_norm(const Row& r) { return (r.flags & kImg) && !(r.flags & kRenormText); }

SPAR_HD float guide(float vc, float vu, float vi, const Row& r) {
  return img_in_norm(r) ? guide_t<true>(vc, vu, vi, r.g, r.gi) : guide_t<false>(vc, vu, vi, r.g, r.gi);
}

// clamp(sqrt(ss_cond) / (sqrt(ss_guided) + eps), lo, 1) from the two sums of squares.
SPAR_HD float renorm_scale(float ss_cond, float ss_guided, float lo) {
  const float s = sqrtf(ss_cond) / (sqrtf(ss_guided) + kRenormEps);
  return s != s ? s : fminf(fmaxf(s, lo), 1.0f);  // a NaN stays NaN, as torch.clamp keeps it (fmaxf drops it)
}

// The guided velocity (kCfg on) given the renorm factor (1 when renorm is off): kImg the image
// branch, kText BAGEL's "text_channel" order (renorm the text-guided velocity, then the image branch).
template <bool kImg, bool kText>
SPAR_HD float velocity_t(float vc, float vu, float vi, float g, float gi, float scale) {
  if (!kText) return guide_t<kImg>(vc, vu, vi, g, gi) * scale;
  const float t = (vu + g * (vc - vu)) * scale;
  return kImg ? vi + gi * (t - vi) : t;
}

// The velocity the solver uses, given the renorm factor (1 when renorm is off).
SPAR_HD float velocity(float vc, float vu, float vi, const Row& r, float scale) {
  if (!(r.flags & kCfg)) return vc;
  const bool img = r.flags & kImg;
  if (r.flags & kRenormText)
    return img ? velocity_t<true, true>(vc, vu, vi, r.g, r.gi, scale) : velocity_t<false, true>(vc, vu, vi, r.g, r.gi, scale);
  return img ? velocity_t<true, false>(vc, vu, vi, r.g, r.gi, scale) : velocity_t<false, false>(vc, vu, vi, r.g, r.gi, scale);
}

// The solver update of one element; h1 / h2 are the element's history (dummies when absent:
// the row's flags never touch a history the method does not have). update_t: the same with the
// row's solver flags (kSolverFlags bits) fixed at compile time, for the vectorized CPU loops.
constexpr int kSolverFlags = kReadH1 | kReadH2 | kStoreH1X | kStoreH1X0 | kStoreH2V;

template <int kF>
SPAR_HD float update_t(float x, float v, float& h1, float& h2, const Row& r) {
  const float x0 = x - r.sigma * v;
  float o = r.cx * x + r.cv * v + (r.c0 != 0.0f ? r.c0 * x0 : 0.0f);  // 0 * x0 is NaN for an infinite v
  if (kF & kReadH1) o += r.c1 * h1;
  if (kF & kReadH2) o += r.c2 * h2;
  if (kF & kStoreH1X) h1 = x;
  if (kF & kStoreH1X0) h1 = x0;
  if (kF & kStoreH2V) h2 = v;
  return o;
}

SPAR_HD float update(float x, float v, float& h1, float& h2, const Row& r) {
  const float x0 = x - r.sigma * v;
  float o = r.cx * x + r.cv * v + (r.c0 != 0.0f ? r.c0 * x0 : 0.0f);  // 0 * x0 is NaN for an infinite v
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
