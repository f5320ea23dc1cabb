// The hot loops of the flow-sampler CPU twin. No include guard on purpose: flow_sampler_cpu.cpp
// includes this file once per instruction-set variant (AVX-512, AVX2, the build's baseline;
// common/cpu_rows.h), and runs the widest this CPU supports.
//
// A row of the [B, P, Q] view whose inputs are all fp32 with q-stride 1 is updated in one pass
// (fused_row: guidance and update per element, every input stream at once). Other rows are updated
// in chunks of kApply elements staged in fp32 (fp32 inputs with q-stride 1 read in place): every loop below is branch-free with its
// flags fixed at compile time, so it vectorizes; the per-element math is flow_sampler.h's. When
// every input is dense, rows that share one renorm factor (all of them without renorm, a
// sample's under the global renorm) are updated as one long row. Sums of squares run in chunks
// of kChunk (fp32 within, fp64 across), which fixes their rounding.

using namespace spar::flow;

constexpr int64_t kChunk = 256;   // the renorm sums' fp32 partials
constexpr int64_t kApply = 1024;  // the update's chunk (no reduction: any length gives the same result)

// ---- conversions to and from fp32, branch-free (same results as spar_common.h's) ----
inline float f16_to_f32(uint16_t h) {
  const uint32_t em = uint32_t(h & 0x7fffu) << 13;
  float f = bits_to_float(em) * bits_to_float((127u + 112u) << 23);  // 2^112: rebias (subnormals too)
  f = em >= (0x7c00u << 13) ? bits_to_float(em | 0x7f800000u) : f;  // inf / nan keep their payload
  return bits_to_float(float_to_bits(f) | (uint32_t(h & 0x8000u) << 16));
}

inline uint16_t f32_to_f16(float x) {  // round to nearest even; nan -> 0x7e00, overflow -> inf
  const uint32_t u = float_to_bits(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  const float denorm_magic = bits_to_float((127u - 15u + 23u - 10u + 1u) << 23);  // 0.5f
  const uint32_t sub = float_to_bits(bits_to_float(a) + denorm_magic) - float_to_bits(denorm_magic);
  const uint32_t norm = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // rebias (-112 << 23) + round
  uint32_t o = a < 0x38800000u ? sub : norm;
  o = a >= 0x47800000u ? (a > 0x7f800000u ? 0x7e00u : 0x7c00u) : o;
  return uint16_t(o | sign);
}

inline float cvt_in(float v) { return v; }
inline float cvt_in(bf16_t v) { return to_float(v); }
inline float cvt_in(f16_t v) { return f16_to_f32(v.bits); }
template <typename T> inline T cvt_out(float v);
template <> inline float cvt_out<float>(float v) { return v; }
template <> inline bf16_t cvt_out<bf16_t>(float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16_t{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : r)};
}
template <> inline f16_t cvt_out<f16_t>(float v) { return f16_t{f32_to_f16(v)}; }

// n elements of row p (element stride sq) as fp32: in place when fp32 and contiguous, else in buf
template <typename T>
inline const float* stage(const T* p, int64_t sq, float* __restrict buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (sq == 1) return p;
  }
  if (sq == 1) {
#pragma omp simd
    for (int64_t q = 0; q < n; ++q) buf[q] = cvt_in(p[q]);
  } else {
    for (int64_t q = 0; q < n; ++q) buf[q] = cvt_in(p[q * sq]);
  }
  return buf;
}

template <typename T>
inline void unstage(const float* __restrict src, T* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) dst[q] = cvt_out<T>(src[q]);
}

// ---- fp32 chunk loops ----
// the guided velocity whose norm renorm compares with |v_cond|, squared and summed with |v_cond|^2
template <bool kImgNorm>
inline void sums_chunk(const float* c, const float* u, const float* i, int64_t n, float g, float gi, float* s_c,
                       float* s_g) {
  float f0 = 0.f, f1 = 0.f;
#pragma omp simd reduction(+ : f0, f1)
  for (int64_t q = 0; q < n; ++q) {
    const float vg = flow::guide_t<kImgNorm>(c[q], u[q], kImgNorm ? i[q] : 0.f, g, gi);
    f0 += c[q] * c[q];
    f1 += vg * vg;
  }
  *s_c = f0;
  *s_g = f1;
}

// per-q sums (the along-P renorm): sc[q] += |v_cond|^2, sg[q] += |guided|^2, in fp64
template <bool kImgNorm>
inline void col_sums_chunk(const float* c, const float* u, const float* i, int64_t n, float g, float gi,
                           double* __restrict sc, double* __restrict sg) {
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) {
    const float vg = flow::guide_t<kImgNorm>(c[q], u[q], kImgNorm ? i[q] : 0.f, g, gi);
    sc[q] += double(c[q]) * c[q];
    sg[q] += double(vg) * vg;
  }
}

template <bool kImg, bool kText, bool kPerQ>
inline void velocity_loop(const float* c, const float* u, const float* i, const float* scale, float* __restrict v,
                          int64_t n, float g, float gi) {
  const float s0 = scale[0];
#pragma omp simd
  for (int64_t q = 0; q < n; ++q)
    v[q] = flow::velocity_t<kImg, kText>(c[q], u[q], kImg ? i[q] : 0.f, g, gi, kPerQ ? scale[q] : s0);
}

inline void velocity_chunk(bool img, bool text, bool per_q, const float* c, const float* u, const float* i,
                           const float* scale, float* v, int64_t n, float g, float gi) {
  const int sel = (img ? 4 : 0) | (text ? 2 : 0) | (per_q ? 1 : 0);
  switch (sel) {
    case 0: return velocity_loop<false, false, false>(c, u, i, scale, v, n, g, gi);
    case 1: return velocity_loop<false, false, true>(c, u, i, scale, v, n, g, gi);
    case 2: return velocity_loop<false, true, false>(c, u, i, scale, v, n, g, gi);
    case 3: return velocity_loop<false, true, true>(c, u, i, scale, v, n, g, gi);
    case 4: return velocity_loop<true, false, false>(c, u, i, scale, v, n, g, gi);
    case 5: return velocity_loop<true, false, true>(c, u, i, scale, v, n, g, gi);
    case 6: return velocity_loop<true, true, false>(c, u, i, scale, v, n, g, gi);
    default: return velocity_loop<true, true, true>(c, u, i, scale, v, n, g, gi);
  }
}

// The solver update of n elements with the row's solver flags kF (kReadH1 | kReadH2 | kStoreH1X |
// kStoreH1X0 | kStoreH2V) fixed at compile time, its velocity computed in the same pass from the
// branches (kCfgOn: guidance, kImg / kText as velocity_t) or, without guidance, read from c.
// fused_row runs it on fp32 rows read in place (every input stream at once); update_chunk on a
// staged chunk's velocity (kCfgOn false, c = v).
template <bool kCfgOn, bool kImg, bool kText, int kF>
inline void fused_loop(const float* x, const float* c, const float* u, const float* i, float s0, float* h1, float* h2,
                       float* o, int64_t n, const flow::Row& row) {
  const flow::Row r = row;  // a local copy: stores through o / h1 / h2 cannot alias it
  constexpr bool kH1 = kF & (flow::kReadH1 | flow::kStoreH1X | flow::kStoreH1X0);
  constexpr bool kH2 = kF & (flow::kReadH2 | flow::kStoreH2V);
  // o may be x itself (out=x): each element is read before it is written
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) {
    const float v = kCfgOn ? flow::velocity_t<kImg, kText>(c[q], u[q], kImg ? i[q] : 0.f, r.g, r.gi, s0) : c[q];
    float a = kH1 ? h1[q] : 0.f, b = kH2 ? h2[q] : 0.f;
    o[q] = flow::update_t<kF>(x[q], v, a, b, r);
    if (kF & (flow::kStoreH1X | flow::kStoreH1X0)) h1[q] = a;
    if (kF & flow::kStoreH2V) h2[q] = b;
  }
}

template <bool kCfgOn, bool kImg, bool kText>
inline bool fused_flags(const float* x, const float* c, const float* u, const float* i, float s0, float* h1, float* h2,
                        float* o, int64_t n, const flow::Row& r) {
  using namespace flow;
  switch (r.flags & kSolverFlags) {  // the rows the table builder writes; false for others
    case 0: fused_loop<kCfgOn, kImg, kText, 0>(x, c, u, i, s0, h1, h2, o, n, r); return true;
    case kStoreH1X | kStoreH2V:
      fused_loop<kCfgOn, kImg, kText, kStoreH1X | kStoreH2V>(x, c, u, i, s0, h1, h2, o, n, r);
      return true;
    case kReadH1 | kReadH2:
      fused_loop<kCfgOn, kImg, kText, kReadH1 | kReadH2>(x, c, u, i, s0, h1, h2, o, n, r);
      return true;
    case kStoreH1X0: fused_loop<kCfgOn, kImg, kText, kStoreH1X0>(x, c, u, i, s0, h1, h2, o, n, r); return true;
    case kStoreH1X0 | kReadH1:
      fused_loop<kCfgOn, kImg, kText, kStoreH1X0 | kReadH1>(x, c, u, i, s0, h1, h2, o, n, r);
      return true;
    default: return false;
  }
}

inline void update_chunk(const float* x, const float* v, float* h1, float* h2, float* o, int64_t n,
                         const flow::Row& r) {
  if (fused_flags<false, false, false>(x, v, nullptr, nullptr, 1.f, h1, h2, o, n, r)) return;
  for (int64_t q = 0; q < n; ++q) {  // other flags: the generic per-element update
    float d1 = 0.f, d2 = 0.f;
    o[q] = update(x[q], v[q], h1 ? h1[q] : d1, h2 ? h2[q] : d2, r);
  }
}

// false: a row this path does not take (the caller runs the chunked one)
inline bool fused_row(bool cfg, bool img, bool text, const float* x, const float* c, const float* u, const float* i,
                      float s0, float* h1, float* h2, float* o, int64_t n, const flow::Row& r) {
  if (!cfg) return fused_flags<false, false, false>(x, c, u, i, s0, h1, h2, o, n, r);
  if (img)
    return text ? fused_flags<true, true, true>(x, c, u, i, s0, h1, h2, o, n, r)
                : fused_flags<true, true, false>(x, c, u, i, s0, h1, h2, o, n, r);
  return text ? fused_flags<true, false, true>(x, c, u, i, s0, h1, h2, o, n, r)
              : fused_flags<true, false, false>(x, c, u, i, s0, h1, h2, o, n, r);
}

// ---- rows ----
template <typename TX, typename TV>
struct Rows {
  const TX* x;
  int64_t sxb, sxp, sxq;
  const TV *vc, *vu, *vi;
  int64_t scb, scp, scq, sub, sup, suq, sib, sip, siq;
  TX* out;
  float *h1, *h2;
  int64_t B, P, Q;
};

struct Stage {  // per-thread fp32 staging buffers
  float c[kApply], u[kApply], i[kApply], x[kApply], v[kApply], o[kApply];
};

// elements [q0, q0 + n) of row (b, p) of the three branches as fp32 (v_img_uncond only when img)
template <typename TX, typename TV>
void stage_branches(const Rows<TX, TV>& a, int64_t b, int64_t p, int64_t q0, int64_t n, bool img, Stage& st,
                    const float*& c, const float*& u, const float*& i) {
  c = stage(a.vc + b * a.scb + p * a.scp + q0 * a.scq, a.scq, st.c, n);
  u = stage(a.vu + b * a.sub + p * a.sup + q0 * a.suq, a.suq, st.u, n);
  i = img ? stage(a.vi + b * a.sib + p * a.sip + q0 * a.siq, a.siq, st.i, n) : nullptr;
}

// fp32 sums of squares of v_cond and of the guided velocity over elements [q0, q0 + n) of row (b, p)
template <typename TX, typename TV>
void chunk_sums(const Rows<TX, TV>& a, int64_t b, int64_t p, int64_t q0, int64_t n, const flow::Row& r, Stage& st,
                float* f0, float* f1) {
  const bool img = flow::img_in_norm(r);
  const float *c, *u, *i;
  stage_branches(a, b, p, q0, n, img, st, c, u, i);
  if (img) sums_chunk<true>(c, u, i, n, r.g, r.gi, f0, f1);
  else sums_chunk<false>(c, u, i, n, r.g, r.gi, f0, f1);
}

// sums of squares over row (b, p): fp32 within chunks of kChunk, fp64 across
template <typename TX, typename TV>
void row_sums(const Rows<TX, TV>& a, int64_t b, int64_t p, const flow::Row& r, Stage& st, double* sc, double* sg) {
  double s0 = 0, s1 = 0;
  for (int64_t q0 = 0; q0 < a.Q; q0 += kChunk) {
    float f0, f1;
    chunk_sums(a, b, p, q0, std::min(kChunk, a.Q - q0), r, st, &f0, &f1);
    s0 += f0;
    s1 += f1;
  }
  *sc = s0;
  *sg = s1;
}

// the per-q sums of sample b over all its rows (sequential in p, as the CUDA stats kernel)
template <typename TX, typename TV>
void col_sums(const Rows<TX, TV>& a, int64_t b, int64_t q0, int64_t n, const flow::Row& r, Stage& st, double* sc,
              double* sg) {
  const bool img = flow::img_in_norm(r);
  for (int64_t q = 0; q < n; ++q) sc[q] = sg[q] = 0.0;
  for (int64_t p = 0; p < a.P; ++p) {
    const float *c, *u, *i;
    stage_branches(a, b, p, q0, n, img, st, c, u, i);
    if (img) col_sums_chunk<true>(c, u, i, n, r.g, r.gi, sc, sg);
    else col_sums_chunk<false>(c, u, i, n, r.g, r.gi, sc, sg);
  }
}

// the update of row (b, p); `scale`: the row's renorm factor, or one per q (per_q)
template <typename TX, typename TV>
void apply_row(const Rows<TX, TV>& a, int64_t b, int64_t p, const flow::Row& r, const float* scale, bool per_q,
               Stage& st) {
  const bool cfg = r.flags & flow::kCfg, img = cfg && (r.flags & flow::kImg);
  const bool text = r.flags & flow::kRenormText;
  const int64_t base = (b * a.P + p) * a.Q;
  if constexpr (std::is_same_v<TX, float> && std::is_same_v<TV, float>) {
    if (!per_q && a.scq == 1 && a.sxq == 1 && (!cfg || a.suq == 1) && (!img || a.siq == 1) &&
        fused_row(cfg, img, text, a.x + b * a.sxb + p * a.sxp, a.vc + b * a.scb + p * a.scp,
                  cfg ? a.vu + b * a.sub + p * a.sup : nullptr, img ? a.vi + b * a.sib + p * a.sip : nullptr, scale[0],
                  a.h1 ? a.h1 + base : nullptr, a.h2 ? a.h2 + base : nullptr, a.out + base, a.Q, r))
      return;
  }
  for (int64_t q0 = 0; q0 < a.Q; q0 += kApply) {
    const int64_t n = std::min(kApply, a.Q - q0);
    const float* c = stage(a.vc + b * a.scb + p * a.scp + q0 * a.scq, a.scq, st.c, n);
    const float* v = c;
    if (cfg) {
      const float* u = stage(a.vu + b * a.sub + p * a.sup + q0 * a.suq, a.suq, st.u, n);
      const float* i = img ? stage(a.vi + b * a.sib + p * a.sip + q0 * a.siq, a.siq, st.i, n) : nullptr;
      velocity_chunk(img, text, per_q, c, u, i, per_q ? scale + q0 : scale, st.v, n, r.g, r.gi);
      v = st.v;
    }
    const float* x = stage(a.x + b * a.sxb + p * a.sxp + q0 * a.sxq, a.sxq, st.x, n);
    float* o = std::is_same_v<TX, float> ? reinterpret_cast<float*>(a.out + base + q0) : st.o;
    update_chunk(x, v, a.h1 ? a.h1 + base + q0 : nullptr, a.h2 ? a.h2 + base + q0 : nullptr, o, n, r);
    if constexpr (!std::is_same_v<TX, float>) unstage(st.o, a.out + base + q0, n);
  }
}

// body(st, i) for i in [0, n): on OpenMP threads when par, else inline (no parallel region)
template <typename F>
void for_each(bool par, int64_t n, F&& body) {
  if (!par) {
    Stage st;
    for (int64_t i = 0; i < n; ++i) body(st, i);
    return;
  }
#pragma omp parallel
  {
    Stage st;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(st, i);
  }
}

// The [B, P, Q] view with the rows of each sample merged into one row of P * Q elements (per_b)
// or everything into one row, when every input the row reads is dense as [B, P, Q].
template <typename TX, typename TV>
bool merge_rows(Rows<TX, TV>& a, const flow::Row& r, bool per_b) {
  const bool cfg = r.flags & flow::kCfg, img = cfg && (r.flags & flow::kImg);
  const int64_t P = a.P, Q = a.Q, PQ = P * Q;
  auto dense = [&](int64_t sb, int64_t sp, int64_t sq) {
    return (sq == 1 || Q == 1) && (sp == Q || P == 1) && (sb == PQ || a.B == 1);
  };
  if (!dense(a.sxb, a.sxp, a.sxq) || !dense(a.scb, a.scp, a.scq) || (cfg && !dense(a.sub, a.sup, a.suq)) ||
      (img && !dense(a.sib, a.sip, a.siq)))
    return false;
  const int64_t b = per_b ? a.B : 1, q = per_b ? PQ : a.B * PQ;
  a.sxb = a.scb = a.sub = a.sib = q;
  a.sxp = a.scp = a.sup = a.sip = q;
  a.sxq = a.scq = a.suq = a.siq = 1;
  a.B = b;
  a.P = 1;
  a.Q = q;
  return true;
}

template <typename TX, typename TV>
void run(const Rows<TX, TV>& a, const flow::Row& r, int mode, float lo, bool par) {
  const int64_t nrows = a.B * a.P;
  const bool ren = flow::renorm_on(r, mode);
  if (!ren) {
    Rows<TX, TV> m = a;
    if (!par && merge_rows(m, r, false)) {
      Stage st;
      const float one = 1.f;
      return apply_row(m, 0, 0, r, &one, false, st);
    }
  }
  if (!ren || mode == flow::kRenormRow) {  // one pass per row: its own sums (if any), then the update
    for_each(par, nrows, [&](Stage& st, int64_t rr) {
      const int64_t b = rr / a.P, p = rr % a.P;
      float s = 1.f;
      if (ren) {
        double sc, sg;
        row_sums(a, b, p, r, st, &sc, &sg);
        s = flow::renorm_scale(float(sc), float(sg), lo);
      }
      apply_row(a, b, p, r, &s, false, st);
    });
    return;
  }
  std::vector<float> scale;
  if (mode == flow::kRenormGlobal) {  // one factor per sample
    scale.resize(a.B);
    Rows<TX, TV> m = a;
    if (merge_rows(m, r, true)) {  // dense: fp32 sums over kChunk pieces of the sample, fp64 across in order
      const int64_t nc = (m.Q + kChunk - 1) / kChunk;
      std::vector<float> fc(m.B * nc), fg(m.B * nc);
      for_each(par, m.B * nc, [&](Stage& st, int64_t j) {
        const int64_t b = j / nc, q0 = (j % nc) * kChunk;
        chunk_sums(m, b, 0, q0, std::min(kChunk, m.Q - q0), r, st, &fc[j], &fg[j]);
      });
      for (int64_t b = 0; b < m.B; ++b) {
        double c = 0, g = 0;
        for (int64_t j = b * nc; j < (b + 1) * nc; ++j) c += fc[j], g += fg[j];
        scale[b] = flow::renorm_scale(float(c), float(g), lo);
      }
      if (!par) {  // a sample's rows share its factor: one long row
        Stage st;
        for (int64_t b = 0; b < m.B; ++b) apply_row(m, b, 0, r, &scale[b], false, st);
      } else {
        for_each(par, nrows, [&](Stage& st, int64_t rr) { apply_row(a, rr / a.P, rr % a.P, r, &scale[rr / a.P], false, st); });
      }
      return;
    }
    // row sums, then a fixed-order total
    std::vector<double> sc(nrows), sg(nrows);
    for_each(par, nrows, [&](Stage& st, int64_t rr) { row_sums(a, rr / a.P, rr % a.P, r, st, &sc[rr], &sg[rr]); });
    for (int64_t b = 0; b < a.B; ++b) {
      double c = 0, g = 0;
      for (int64_t p = 0; p < a.P; ++p) c += sc[b * a.P + p], g += sg[b * a.P + p];
      scale[b] = flow::renorm_scale(float(c), float(g), lo);
    }
    for_each(par, nrows, [&](Stage& st, int64_t rr) { apply_row(a, rr / a.P, rr % a.P, r, &scale[rr / a.P], false, st); });
    return;
  }
  // kRenormCol: one factor per (b, q), the norm running over p
  scale.resize(a.B * a.Q);
  const int64_t nq = (a.Q + kChunk - 1) / kChunk;
  for_each(par, a.B * nq, [&](Stage& st, int64_t j) {
    double sc[kChunk], sg[kChunk];
    const int64_t b = j / nq, q0 = (j % nq) * kChunk, n = std::min(kChunk, a.Q - q0);
    col_sums(a, b, q0, n, r, st, sc, sg);
    for (int64_t q = 0; q < n; ++q) scale[b * a.Q + q0 + q] = flow::renorm_scale(float(sc[q]), float(sg[q]), lo);
  });
  for_each(par, nrows, [&](Stage& st, int64_t rr) { apply_row(a, rr / a.P, rr % a.P, r, &scale[(rr / a.P) * a.Q], true, st); });
}
