// CPU twin of flow_sampler.cu: the same per-element math (flow_sampler.h); rows of the
// [B, P, Q] view spread over OpenMP threads (only above kParallelMin elements). Sums of squares:
// fp32 vectorized partials within a contiguous row, double across rows and along strided rows
// (the CUDA kernel uses fp32 tree reductions); both round the factor to fp32.
#include <stdexcept>
#include <string>
#include <vector>

#include "flow_sampler/api.h"
#include "flow_sampler/flow_sampler.h"

namespace spar {
namespace {

struct Strided {
  int64_t b, p, q;
};

template <typename TX, typename TV>
struct Args {
  const TX* x;
  Strided sx;
  const TV *vc, *vu, *vi;
  Strided sc, su, si;
  TX* out;
  float *h1, *h2;
  int64_t B, P, Q;
};

// Sums of squares of v_cond and of the guided velocity over q of row (b, p).
template <typename TX, typename TV>
void row_sums(const Args<TX, TV>& a, int64_t b, int64_t p, const flow::Row& r, double* sc, double* sg) {
  const TV* c = a.vc + b * a.sc.b + p * a.sc.p;
  const TV* u = a.vu + b * a.su.b + p * a.su.p;
  const TV* i = a.vi ? a.vi + b * a.si.b + p * a.si.p : nullptr;
  if (a.sc.q == 1 && a.su.q == 1 && (!i || a.si.q == 1)) {  // contiguous: vectorized fp32 partial sums
    const TV* ii = i ? i : c;
    float f0 = 0.f, f1 = 0.f;
#pragma omp simd reduction(+ : f0, f1)
    for (int64_t q = 0; q < a.Q; ++q) {
      const float vc = to_float(c[q]);
      const float vg = flow::guide(vc, to_float(u[q]), to_float(ii[q]), r);
      f0 += vc * vc;
      f1 += vg * vg;
    }
    *sc = f0;
    *sg = f1;
    return;
  }
  double s0 = 0, s1 = 0;
  for (int64_t q = 0; q < a.Q; ++q) {
    const float vc = to_float(c[q * a.sc.q]);
    const float vg = flow::guide(vc, to_float(u[q * a.su.q]), flow::load_or_zero(i, q * a.si.q), r);
    s0 += double(vc) * vc;
    s1 += double(vg) * vg;
  }
  *sc = s0;
  *sg = s1;
}

// The update of a contiguous-q row: branch-free per element so the compiler vectorizes it.
// Absent branches arrive as v_cond (the table never selects them then); H1 / H2: the method
// keeps that fp32 history; PER_Q: one renorm factor per q (else scale[0] for the row).
template <typename TX, typename TV, bool H1, bool H2, bool PER_Q>
void apply_contig(const TX* __restrict x, const TV* __restrict c, const TV* __restrict u, const TV* __restrict i,
                  TX* __restrict o, float* __restrict h1, float* __restrict h2, const float* __restrict scale,
                  int64_t Q, const flow::Row& r) {
#pragma omp simd
  for (int64_t q = 0; q < Q; ++q) {
    const float s = PER_Q ? scale[q] : scale[0];
    const float v = flow::velocity(to_float(c[q]), to_float(u[q]), to_float(i[q]), r, s);
    float a = H1 ? h1[q] : 0.f, b = H2 ? h2[q] : 0.f;
    o[q] = from_float<TX>(flow::update(to_float(x[q]), v, a, b, r));
    if (H1) h1[q] = a;
    if (H2) h2[q] = b;
  }
}

// The update of row (b, p); `scale` is one factor for the row, or one per q when per_q.
template <typename TX, typename TV>
void apply_row(const Args<TX, TV>& a, int64_t b, int64_t p, const flow::Row& r, const float* scale, bool per_q) {
  const TX* x = a.x + b * a.sx.b + p * a.sx.p;
  const TV* c = a.vc + b * a.sc.b + p * a.sc.p;
  const TV* u = a.vu ? a.vu + b * a.su.b + p * a.su.p : nullptr;
  const TV* i = a.vi ? a.vi + b * a.si.b + p * a.si.p : nullptr;
  const int64_t base = (b * a.P + p) * a.Q;
  TX* o = a.out + base;
  float* h1 = a.h1 ? a.h1 + base : nullptr;
  float* h2 = a.h2 ? a.h2 + base : nullptr;
  const bool contig = a.sx.q == 1 && a.sc.q == 1 && (!u || a.su.q == 1) && (!i || a.si.q == 1);
  if (contig) {
    const TV* uu = u ? u : c;
    const TV* ii = i ? i : c;
#define SPAR_FS_CONTIG(H1, H2)                                                                  \
  return per_q ? apply_contig<TX, TV, H1, H2, true>(x, c, uu, ii, o, h1, h2, scale, a.Q, r)     \
               : apply_contig<TX, TV, H1, H2, false>(x, c, uu, ii, o, h1, h2, scale, a.Q, r)
    if (h1 && h2) SPAR_FS_CONTIG(true, true);
    if (h1) SPAR_FS_CONTIG(true, false);
    SPAR_FS_CONTIG(false, false);
#undef SPAR_FS_CONTIG
  }
  for (int64_t q = 0; q < a.Q; ++q) {  // strided rows
    const float s = per_q ? scale[q] : *scale;
    const float v = flow::velocity(to_float(c[q * a.sc.q]), flow::load_or_zero(u, q * a.su.q),
                                   flow::load_or_zero(i, q * a.si.q), r, s);
    float d1 = 0.f, d2 = 0.f;
    o[q] = from_float<TX>(flow::update(to_float(x[q * a.sx.q]), v, h1 ? h1[q] : d1, h2 ? h2[q] : d2, r));
  }
}

// Below this many elements a step runs on one thread: waking the OpenMP team costs more.
constexpr int64_t kParallelMin = int64_t(1) << 16;

template <typename TX, typename TV>
void run(const Args<TX, TV>& a, const flow::Row& r, int mode, float lo) {
  const int64_t nrows = a.B * a.P;
  const bool par = nrows * a.Q >= kParallelMin;
  const bool ren = flow::renorm_on(r, mode);
  if (!ren || mode == flow::kRenormRow) {  // one pass per row: its own sums (if any), then the update
#pragma omp parallel for schedule(static) if (par)
    for (int64_t rr = 0; rr < nrows; ++rr) {
      const int64_t b = rr / a.P, p = rr % a.P;
      float s = 1.f;
      if (ren) {
        double sc, sg;
        row_sums(a, b, p, r, &sc, &sg);
        s = flow::renorm_scale(float(sc), float(sg), lo);
      }
      apply_row(a, b, p, r, &s, false);
    }
    return;
  }
  std::vector<float> scale;
  if (mode == flow::kRenormGlobal) {  // one factor per sample
    std::vector<double> sc(nrows), sg(nrows);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t rr = 0; rr < nrows; ++rr) row_sums(a, rr / a.P, rr % a.P, r, &sc[rr], &sg[rr]);
    scale.resize(a.B);
    for (int64_t b = 0; b < a.B; ++b) {
      double c = 0, g = 0;
      for (int64_t p = 0; p < a.P; ++p) c += sc[b * a.P + p], g += sg[b * a.P + p];
      scale[b] = flow::renorm_scale(float(c), float(g), lo);
    }
#pragma omp parallel for schedule(static) if (par)
    for (int64_t rr = 0; rr < nrows; ++rr) apply_row(a, rr / a.P, rr % a.P, r, &scale[rr / a.P], false);
    return;
  }
  // kRenormCol: one factor per (b, q), the norm running over p
  scale.resize(a.B * a.Q);
  for (int64_t b = 0; b < a.B; ++b) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t q = 0; q < a.Q; ++q) {
      double s0 = 0, s1 = 0;
      for (int64_t p = 0; p < a.P; ++p) {
        const float vc = to_float(a.vc[b * a.sc.b + p * a.sc.p + q * a.sc.q]);
        const float vu = to_float(a.vu[b * a.su.b + p * a.su.p + q * a.su.q]);
        const float vi = a.vi ? to_float(a.vi[b * a.si.b + p * a.si.p + q * a.si.q]) : 0.f;
        const float vg = flow::guide(vc, vu, vi, r);
        s0 += double(vc) * vc;
        s1 += double(vg) * vg;
      }
      scale[b * a.Q + q] = flow::renorm_scale(float(s0), float(s1), lo);
    }
  }
#pragma omp parallel for schedule(static) if (par)
  for (int64_t rr = 0; rr < nrows; ++rr) apply_row(a, rr / a.P, rr % a.P, r, &scale[(rr / a.P) * a.Q], true);
}

template <typename TX, typename TV>
void launch(int64_t B, int64_t P, int64_t Q, uintptr_t x, Strided sx, uintptr_t vc, Strided sc, uintptr_t vu,
            Strided su, uintptr_t vi, Strided si, uintptr_t out, uintptr_t h1, uintptr_t h2, const flow::Row& r,
            int mode, float lo) {
  Args<TX, TV> a{reinterpret_cast<const TX*>(x), sx, reinterpret_cast<const TV*>(vc),
                 reinterpret_cast<const TV*>(vu), reinterpret_cast<const TV*>(vi), sc, su, si,
                 reinterpret_cast<TX*>(out), reinterpret_cast<float*>(h1), reinterpret_cast<float*>(h2), B, P, Q};
  run(a, r, mode, lo);
}

template <typename TX>
void dispatch_v(int v_dtype, int64_t B, int64_t P, int64_t Q, uintptr_t x, Strided sx, uintptr_t vc, Strided sc,
                uintptr_t vu, Strided su, uintptr_t vi, Strided si, uintptr_t out, uintptr_t h1, uintptr_t h2,
                const flow::Row& r, int mode, float lo) {
  switch (static_cast<DType>(v_dtype)) {
    case DType::F32: return launch<TX, float>(B, P, Q, x, sx, vc, sc, vu, su, vi, si, out, h1, h2, r, mode, lo);
    case DType::F16: return launch<TX, f16_t>(B, P, Q, x, sx, vc, sc, vu, su, vi, si, out, h1, h2, r, mode, lo);
    case DType::BF16: return launch<TX, bf16_t>(B, P, Q, x, sx, vc, sc, vu, su, vi, si, out, h1, h2, r, mode, lo);
    default: throw std::invalid_argument("flow_sampler_step: unsupported branch dtype code " + std::to_string(v_dtype));
  }
}

}  // namespace

void flow_sampler_step_cpu(int x_dtype, int v_dtype, int64_t B, int64_t P, int64_t Q,
                           uintptr_t x, int64_t sxb, int64_t sxp, int64_t sxq,
                           uintptr_t vc, int64_t scb, int64_t scp, int64_t scq,
                           uintptr_t vu, int64_t sub, int64_t sup, int64_t suq,
                           uintptr_t vi, int64_t sib, int64_t sip, int64_t siq,
                           uintptr_t out, uintptr_t h1, uintptr_t h2, uintptr_t table, int64_t rows,
                           uintptr_t counter, uintptr_t stats, int renorm_mode, float renorm_min) {
  (void)stats;  // the CPU twin keeps its sums on the stack
  if (renorm_mode < flow::kRenormNone || renorm_mode > flow::kRenormCol)
    throw std::invalid_argument("flow_sampler_step: unknown renorm mode " + std::to_string(renorm_mode));
  auto* cnt = reinterpret_cast<int32_t*>(counter);
  const flow::Row r = flow::load_row(reinterpret_cast<const float*>(table), rows, cnt[0]);
  if ((r.flags & flow::kCfg) && vu == 0)
    throw std::invalid_argument("flow_sampler_step: guidance is on at this step but v_uncond is missing");
  if ((r.flags & flow::kCfg) && (r.flags & flow::kImg) && vi == 0)
    throw std::invalid_argument("flow_sampler_step: image guidance is on at this step but v_img_uncond is missing");
  if ((r.flags & (flow::kReadH1 | flow::kStoreH1X | flow::kStoreH1X0)) && h1 == 0)
    throw std::invalid_argument("flow_sampler_step: the method needs the h1 history buffer");
  if ((r.flags & (flow::kReadH2 | flow::kStoreH2V)) && h2 == 0)
    throw std::invalid_argument("flow_sampler_step: the method needs the h2 history buffer");
  const Strided sx{sxb, sxp, sxq}, sc{scb, scp, scq}, su{sub, sup, suq}, si{sib, sip, siq};
  if (B * P * Q > 0) {
    switch (static_cast<DType>(x_dtype)) {
      case DType::F32: dispatch_v<float>(v_dtype, B, P, Q, x, sx, vc, sc, vu, su, vi, si, out, h1, h2, r, renorm_mode, renorm_min); break;
      case DType::F16: dispatch_v<f16_t>(v_dtype, B, P, Q, x, sx, vc, sc, vu, su, vi, si, out, h1, h2, r, renorm_mode, renorm_min); break;
      case DType::BF16: dispatch_v<bf16_t>(v_dtype, B, P, Q, x, sx, vc, sc, vu, su, vi, si, out, h1, h2, r, renorm_mode, renorm_min); break;
      default: throw std::invalid_argument("flow_sampler_step: unsupported state dtype code " + std::to_string(x_dtype));
    }
  }
  cnt[0] += 1;
}

}  // namespace spar
