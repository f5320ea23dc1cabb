// The hot loops of the dwconv_glu CPU twin. No include guard on purpose: dwconv_glu_cpu.cpp
// includes this file once per instruction-set variant (common/isa_variants.inc) and runs each
// with its register width L in fp32 lanes (16 for AVX-512, 8 for AVX2, 4 for SSE).
//
// Work items are (sample, block of channels, band of rows); the block is sized so that the 3 input
// rows it reads stay in L2 while the rows advance. An item walks each output row kConvPixels
// pixels at a time from column 0 (the last step takes the 1-3 pixels left) and, for each step,
// all L-channel vectors of its block (conv_glu_pixels -> conv_glu_step): per input row of the
// window and per stream (a, then gate) it takes the 3 tap weights into registers, loads each of
// the kConvPixels + 2 input columns once and multiplies it into every output pixel whose window
// holds it, into 2 x kConvPixels independent accumulators (taps in tap order, then the bias, fp32:
// the order of torch's CPU depthwise conv, whose fp32 sums these then equal bit for bit on AVX2).
// The step's accumulators go to a small buffer, and a * silu(gate) is computed and rounded once
// for kConvGroup vectors at a time: SiLU's long dependent chain then overlaps with other vectors'
// SiLU instead of stalling the next step's multiply-adds. A step loads 3 (kConvPixels + 2) input
// vectors per stream for 9 kConvPixels multiply-adds (the loaded vectors and the weights are
// pinned in registers, see CONV_PIN_LOADS), and the block's weights are repacked contiguous per
// vector ([3 rows][a, gate][3 taps][L], the 2 biases) and read from cache. Each tap reads
// contiguous channel runs of one pixel (few pages at a time for the TLB). The input pixels of the
// row below and the output pixels of the next step are prefetched one step ahead, a cache line per
// vector (the output for writing, so that the stores do not wait for their lines), since pixels
// lie 2C (input) and C (output) elements apart and the hardware prefetcher does not follow that
// stride. Rows outside the image are skipped; the first and last step of a row skip the padding
// column; a partial last vector goes through zero-padded buffers.
//
// When the input's pixel, stream or row strides are multiples of a large power of two (channel
// counts such as 256, 512, 1024, 1536 or 2048) a step's input lines fall into a few sets of the L1
// cache, more lines than it has ways, and every load goes back to L2 (3x the time at C = 1024).
// conv_set_load counts them; above kConvSetLoad, and where staging pays (the run's `stage` argument:
// cpu::stage_aliasing_inputs: an L1 of at most 8 ways), each item copies its block of every input row once
// into a 3-row ring whose pixel, stream and row strides are padded until the lines spread
// (conv_stage_layout), and the steps read the ring. Same loads and sums in the same order: the
// results are bit-identical either way. (Staging always was 20% slower where nothing aliases.)
//
// The math is written with GCC vector types of the variant's width, not as scalar loops left to
// the auto-vectorizer: under the default -ftrapping-math g++ does not if-convert the clamp of a
// scalar exp inside a loop, so a loop calling fast::silu runs one lane at a time.

// conv_glu_step pins each loaded input vector and the tap weights in registers with an empty asm:
// without it g++ folds the loads into the multiply-adds' memory operands, 3 loads of each input
// and reloads of the weights, and the step runs at the load ports' pace (about 1.4x the cycles,
// measured on AVX2). tests/cpp/dwconv_glu_l16.cpp turns it off to build the 16-lane code for AVX2,
// whose registers cannot hold a 64-byte vector; it only steers register allocation.
#ifndef CONV_PIN_LOADS
#define CONV_PIN_LOADS 1
#endif

template <int L>
struct ConvVec {
  typedef float f __attribute__((vector_size(L * 4)));
  typedef int32_t i __attribute__((vector_size(L * 4)));
  typedef uint32_t u __attribute__((vector_size(L * 4)));
  typedef uint16_t h __attribute__((vector_size(L * 2)));
};

template <int L>
inline typename ConvVec<L>::f conv_load(const float* p) {
  typename ConvVec<L>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bf16 -> fp32 is exact: the 16 bits become the high half
template <int L>
inline typename ConvVec<L>::f conv_load(const bf16_t* p) {
  typename ConvVec<L>::h b;
  std::memcpy(&b, p, sizeof b);
  const typename ConvVec<L>::u w = __builtin_convertvector(b, typename ConvVec<L>::u) << 16;
  typename ConvVec<L>::f v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

template <int L, typename T>
inline typename ConvVec<L>::f conv_load(const T* p) {
  float t[L];
  for (int c = 0; c < L; ++c) t[c] = to_float(p[c]);
  return conv_load<L>(static_cast<const float*>(t));
}

// A non-temporal store of one vector of `bytes` (32 or 64) bytes at p (aligned to it), where the
// variant has one; false where it does not (the caller then stores normally)
template <int bytes>
inline bool conv_stream(void* p, const void* v) {
#if SPAR_ISA_AVX512
  if constexpr (bytes == 64) {
    _mm512_stream_si512(static_cast<__m512i*>(p), _mm512_loadu_si512(v));
    return true;
  }
#endif
#if SPAR_ISA_AVX2
  if constexpr (bytes == 32) {
    _mm256_stream_si256(static_cast<__m256i*>(p), _mm256_loadu_si256(static_cast<const __m256i*>(v)));
    return true;
  }
#endif
  (void)p, (void)v;
  return false;
}

// fp32 as is; bf16 rounded to nearest even on the bits, NaN kept quiet (bf16_from_float lane-wise).
// nt: a non-temporal store (the caller has checked that p is aligned to the vector's bytes)
template <int L, typename T>
inline void conv_store(T* p, typename ConvVec<L>::f v, bool nt = false) {
  using vu = typename ConvVec<L>::u;
  if constexpr (std::is_same<T, float>::value) {
    if (nt && conv_stream<sizeof v>(p, &v)) return;
    std::memcpy(p, &v, sizeof v);
  } else if constexpr (std::is_same<T, bf16_t>::value) {
    vu u;
    std::memcpy(&u, &v, sizeof u);
    const vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const vu q = (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r;
    const typename ConvVec<L>::h b = __builtin_convertvector(q, typename ConvVec<L>::h);
    if (nt && conv_stream<sizeof b>(p, &b)) return;
    std::memcpy(p, &b, sizeof b);
  } else {
    float t[L];
    std::memcpy(t, &v, sizeof v);
    for (int c = 0; c < L; ++c) p[c] = from_float<T>(t[c]);
  }
}

// min(hi, max(lo, x)) lane-wise, a NaN x kept: one instruction each where the variant has them
// (the operand order of max/min returns x when it is NaN), else compare and select
template <int L>
inline typename ConvVec<L>::f conv_clamp(typename ConvVec<L>::f x, float lo, float hi) {
  using vf = typename ConvVec<L>::f;
#if SPAR_ISA_AVX512
  if constexpr (L == 16) return (vf)_mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), (__m512)x));
#endif
#if SPAR_ISA_AVX2
  if constexpr (L == 8) return (vf)_mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), (__m256)x));
#endif
  x = x < lo ? vf{} + lo : x;
  return x > hi ? vf{} + hi : x;
}

// a * silu(g) lane-wise, silu(g) = g / (1 + exp(-g)) with fast::fast_exp's clamp, Cody-Waite
// reduction and polynomial, written on -x = g clamped (m = -n) to spare the negation: the same
// values as fast_exp(x)
template <int L>
inline typename ConvVec<L>::f conv_glu_act(typename ConvVec<L>::f a, typename ConvVec<L>::f g) {
  using vf = typename ConvVec<L>::f;
  using vi = typename ConvVec<L>::i;
  const vf gc = conv_clamp<L>(g, -88.0f, 87.3f);
  const vf m = (gc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vf r = m * 0.693359375f - gc;
  r = r - m * 2.12194440e-4f;
  vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const vi e = (127 - __builtin_convertvector(m, vi)) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof scale);
  // below -88 the clamped exp would make silu(g) grow with |g|: 1 + exp(-g) is inf there instead
  // (silu = -0, NaN at -inf, as torch's), fast::silu's rule
  const vf d = g < -88.0f ? vf{} + INFINITY : 1.0f + p * scale;
  return a * (g / d);  // silu(g) rounded, then times a: torch's a * F.silu(g)
}

constexpr int kConvPixels = 4;                   // output pixels per step (accumulators a, gate: 2 each)
static_assert(kConvPixels == 4, "conv_glu_block's row loop takes last steps of 3, 2 and 1 pixels");
constexpr int64_t kConvRowsBytes = 128 * 1024;   // the 3 input rows of a channel block, at most (L2)
constexpr int64_t kConvGroup = 8;                // vectors whose SiLU is taken together
constexpr int64_t kConvAhead = 1;                // steps between a pixel's prefetch and its first use

// Keeps v in a register (CONV_PIN_LOADS)
template <typename V>
inline void conv_pin(V& v) {
#if CONV_PIN_LOADS && defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// One step: kP pixels of one output row from column col, channels [c, c + L) of a and gate.
// rows[k]: input row row - 1 + k at channel c (k in [k0, k1), the rows inside the image); wv: the
// block's repacked weights of this vector, [3 rows][a, gate][3 columns][L] then the 2 biases.
// Input column j (image column col - 1 + j) is loaded once per stream and multiplied into every
// pixel whose 3x3 window holds it, so a step loads 3 (kP + 2) input vectors per stream for 9 kP
// multiply-adds. kLeft / kRight: the column left of / right of the pixels is padding. The fp32
// accumulators go to acc: [kP][a, gate][L].
template <int L, int kP, bool kLeft, bool kRight, typename T>
inline void conv_glu_step(const T* const* rows, int k0, int k1, int64_t sxn, int64_t C, int64_t col,
                          const float* wv, float* acc) {
  using vf = typename ConvVec<L>::f;
  vf aa[kP], ag[kP];
#pragma GCC unroll 4
  for (int p = 0; p < kP; ++p) aa[p] = vf{}, ag[p] = vf{};
#pragma GCC unroll 3
  for (int k = k0; k < k1; ++k) {
#pragma GCC unroll 2
    for (int st = 0; st < 2; ++st) {  // a, then gate: 2 kP accumulators, 3 weights and 1 input live
      vf* ac = st ? ag : aa;
      const float* w = wv + (k * 6 + st * 3) * L;
      vf w0 = conv_load<L>(w), w1 = conv_load<L>(w + L), w2 = conv_load<L>(w + 2 * L);
      conv_pin(w0), conv_pin(w1), conv_pin(w2);
#pragma GCC unroll 6
      for (int j = kLeft ? 1 : 0; j < (kRight ? kP + 1 : kP + 2); ++j) {
        vf x = conv_load<L>(rows[k] + (col - 1 + j) * sxn + st * C);
        conv_pin(x);
        // pixel p takes input column j through its tap column j - p
        if (j < kP) ac[j] += w0 * x;
        if (j >= 1 && j - 1 < kP) ac[j - 1] += w1 * x;
        if (j >= 2 && j - 2 < kP) ac[j - 2] += w2 * x;
      }
    }
  }
  // the bias after the taps, as torch's depthwise conv adds it (bias first: the same sums rounded
  // differently, ~2x torch's error in the worst element of 1 in 20 small fp32 outputs)
  const vf ba = conv_load<L>(wv + 18 * L), bg = conv_load<L>(wv + 19 * L);
#pragma GCC unroll 4
  for (int p = 0; p < kP; ++p) {
    aa[p] += ba, ag[p] += bg;
    std::memcpy(acc + 2 * p * L, &aa[p], sizeof(vf));
    std::memcpy(acc + (2 * p + 1) * L, &ag[p], sizeof(vf));
  }
}

// a * silu(gate) of a step's accumulators (acc: [kP][a, gate][L]) to pixels [col, col + kP) of o;
// nt: non-temporal stores
template <int L, int kP, typename T>
inline void conv_glu_finish(const float* acc, T* o, int64_t son, int64_t col, bool nt = false) {
#pragma GCC unroll 4
  for (int p = 0; p < kP; ++p)
    conv_store<L>(o + (col + p) * son,
                  conv_glu_act<L>(conv_load<L>(acc + 2 * p * L), conv_load<L>(acc + (2 * p + 1) * L)), nt);
}

// Pixels [col, col + kP) of one output row, all vectors of the block: channels [0, nv * L) of
// rows[] / o, the weights of vector v at wts + v * 20 * L; a partial last vector (n < L lanes)
// goes through zero-padded copies. Along the way, the block's channels of the np input pixels from
// pf on (both streams) and of the nq output pixels from pq on are prefetched, a line per pixel and
// stream every 64 bytes of channels. nt: the full vectors' outputs go out in non-temporal stores.
template <int L, int kP, bool kLeft, bool kRight, typename T>
inline void conv_glu_pixels(const T* const* rows, int k0, int k1, int64_t sxn, int64_t C, int64_t col, int64_t nv,
                            int64_t n, const float* wts, T* o, int64_t son, const T* pf, int64_t np, const T* pq,
                            int64_t nq, bool nt) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  const int64_t full = n == L ? nv : nv - 1;
  alignas(64) float acc[kConvGroup][kP][2][L];
  for (int64_t g0 = 0; g0 < full; g0 += kConvGroup) {
    const int64_t g1 = std::min(full, g0 + kConvGroup);
    for (int64_t v = g0; v < g1; ++v) {
      if ((v * L) % kLine < L) {
        for (int64_t p = 0; p < np; ++p) {
          __builtin_prefetch(pf + p * sxn + v * L, 0, 3);
          __builtin_prefetch(pf + p * sxn + C + v * L, 0, 3);
        }
        for (int64_t p = 0; p < nq; ++p) __builtin_prefetch(pq + p * son + v * L, 1, 3);
      }
      const T* rv[3] = {rows[0] + v * L, rows[1] + v * L, rows[2] + v * L};
      conv_glu_step<L, kP, kLeft, kRight>(rv, k0, k1, sxn, C, col, wts + v * 20 * L, acc[v - g0][0][0]);
    }
    for (int64_t v = g0; v < g1; ++v) conv_glu_finish<L, kP>(acc[v - g0][0][0], o + v * L, son, col, nt);
  }
  for (int64_t p = 0; p < np; ++p) {  // the run's last line (a block may end mid-line)
    __builtin_prefetch(pf + p * sxn + (nv - 1) * L + n - 1, 0, 3);
    __builtin_prefetch(pf + p * sxn + C + (nv - 1) * L + n - 1, 0, 3);
  }
  for (int64_t p = 0; p < nq; ++p) __builtin_prefetch(pq + p * son + (nv - 1) * L + n - 1, 1, 3);
  if (full == nv) return;
  // the partial vector: its input (kP + 2 columns x 3 rows x 2 streams) and output via buffers,
  // laid out as pixels 0 .. kP + 1 of rows of pixel stride 2L, the step taken from column 1
  float in[3][kP + 2][2][L] = {}, out[kP + 1][L];
  const int64_t c = full * L;
  for (int k = k0; k < k1; ++k)
    for (int j = kLeft ? 1 : 0; j < (kRight ? kP + 1 : kP + 2); ++j)
      for (int st = 0; st < 2; ++st)
        for (int64_t l = 0; l < n; ++l) in[k][j][st][l] = to_float(rows[k][(col - 1 + j) * sxn + st * C + c + l]);
  const float* rb[3] = {in[0][0][0], in[1][0][0], in[2][0][0]};
  conv_glu_step<L, kP, kLeft, kRight>(rb, k0, k1, 2 * L, L, 1, wts + full * 20 * L, acc[0][0][0]);
  conv_glu_finish<L, kP>(acc[0][0][0], out[0], L, 1);
  for (int p = 0; p < kP; ++p)
    for (int64_t l = 0; l < n; ++l) o[(col + p) * son + c + l] = from_float<T>(out[p + 1][l]);
}

// conv_glu_pixels with the padding columns chosen at run time: left, the step starts at column 0;
// right, it ends at column W - 1
template <int L, int kP, typename T>
inline void conv_glu_pixels_at(bool left, bool right, const T* const* rows, int k0, int k1, int64_t sxn, int64_t C,
                               int64_t col, int64_t nv, int64_t n, const float* wts, T* o, int64_t son, const T* pf,
                               int64_t np, const T* pq, int64_t nq, bool nt) {
  if (left && right)
    conv_glu_pixels<L, kP, true, true>(rows, k0, k1, sxn, C, col, nv, n, wts, o, son, pf, np, pq, nq, nt);
  else if (left)
    conv_glu_pixels<L, kP, true, false>(rows, k0, k1, sxn, C, col, nv, n, wts, o, son, pf, np, pq, nq, nt);
  else if (right)
    conv_glu_pixels<L, kP, false, true>(rows, k0, k1, sxn, C, col, nv, n, wts, o, son, pf, np, pq, nq, nt);
  else
    conv_glu_pixels<L, kP, false, false>(rows, k0, k1, sxn, C, col, nv, n, wts, o, son, pf, np, pq, nq, nt);
}

// The most input cache lines of one step (3 rows x (kConvPixels + 2) columns x 2 streams, byte
// offsets row * rs + column * ps + stream * cs) that fall in one set of a 64-set L1 (4 KiB period:
// every x86 L1 data cache of the last decade); see the header comment.
inline int conv_set_load(int64_t rs, int64_t ps, int64_t cs) {
  int count[64] = {};
  int most = 0;
  for (int k = 0; k < 3; ++k)
    for (int j = 0; j < kConvPixels + 2; ++j)
      for (int st = 0; st < 2; ++st) {
        const int64_t off = k * rs + j * ps + st * cs;
        most = std::max(most, ++count[(off >> 6) & 63]);
      }
  return most;
}
constexpr int kConvSetLoad = 8;  // the most lines per set a step may take without staging: the ways of L1

// The staged layout of a block of ch channels and W pixels per row: pixel stride ssn, gate offset
// sc, row (slot) stride srow, in elements of T, padded until a step's lines spread over the sets.
struct ConvStage {
  int64_t ssn, sc, srow;
};
template <int L, typename T>
inline ConvStage conv_stage_layout(int64_t ch, int64_t W) {
  const int64_t es = sizeof(T), line = 64 / es, chv = (ch + L - 1) / L * L;
  ConvStage best{0, 0, 0};
  int best_load = 1 << 30;
  for (int64_t pc = 0; pc < 4; ++pc)
    for (int64_t pr = 0; pr < 4; ++pr) {
      const int64_t sc = chv + pc * line, ssn = 2 * sc, srow = W * ssn + pr * line;
      const int load = conv_set_load(srow * es, ssn * es, sc * es);
      if (load < best_load) best_load = load, best = ConvStage{ssn, sc, srow};
    }
  return best;
}

// Channels [c0, c0 + ch) of rows [r0, r1) of one sample. Pixels go kConvPixels at a time along a
// row from column 0 (the last step takes what is left; the first and last skip the padding
// column), each step over the block's channels (the 3 input rows of the block stay in L2; each tap
// reads contiguous channel runs); the input pixels of the row below, one step ahead, are
// prefetched, since pixels lie 2C elements apart and the hardware prefetcher does not follow.
// wts: this thread's buffer for the block's repacked weights (nv * 20 * L floats). stage: null, or
// this thread's 3-row ring laid out as st says, into which each input row of the block is copied
// once before its first use (when the input's own strides alias in L1, conv_set_load).
template <int L, typename T>
void conv_glu_block(const T* xb, int64_t H, int64_t W, int64_t C, int64_t sxn, int64_t c0, int64_t ch, int64_t r0,
                    int64_t r1, const float* w, int64_t swc, int64_t swt, const float* bias2, T* ob, int64_t son,
                    float* wts, T* stage, ConvStage st, bool nt) {
  constexpr int kP = kConvPixels;
  const int64_t nv = (ch + L - 1) / L, n = ch - (nv - 1) * L;
  for (int64_t v = 0; v < nv; ++v) {
    const int64_t m = v + 1 < nv ? L : n;  // lanes past ch stay zero
    float* wv = wts + v * 20 * L;
    std::fill(wv, wv + 20 * L, 0.0f);
    for (int s = 0; s < 2; ++s) {
      for (int k = 0; k < 3; ++k)
        for (int dc = 0; dc < 3; ++dc)
          for (int64_t l = 0; l < m; ++l)
            wv[(k * 6 + s * 3 + dc) * L + l] = w[(s * C + c0 + v * L + l) * swc + (k * 3 + dc) * swt];
      std::copy_n(bias2 + s * C + c0 + v * L, m, wv + (18 + s) * L);
    }
  }
  // staging: input row r of the block lives in slot r % 3
  auto stage_row = [&](int64_t r) {
    T* dst = stage + (r % 3) * st.srow;
    const T* src = xb + r * W * sxn + c0;
    for (int64_t p = 0; p < W; ++p) {
      if (p + 2 < W) {
        for (int64_t i = 0; i < ch; i += 64 / int64_t(sizeof(T))) {
          __builtin_prefetch(src + (p + 2) * sxn + i, 0, 3);
          __builtin_prefetch(src + (p + 2) * sxn + C + i, 0, 3);
        }
      }
      std::memcpy(dst + p * st.ssn, src + p * sxn, ch * sizeof(T));
      std::memcpy(dst + p * st.ssn + st.sc, src + p * sxn + C, ch * sizeof(T));
    }
  };
  const int64_t rsn = stage ? st.ssn : sxn, rC = stage ? st.sc : C;
  if (stage)
    for (int64_t r = std::max<int64_t>(0, r0 - 1); r < std::min(H, r0 + 1); ++r) stage_row(r);
  for (int64_t row = r0; row < r1; ++row) {
    const T* rows[3];
    if (stage) {
      if (row + 1 < H) stage_row(row + 1);
      for (int k = 0; k < 3; ++k) rows[k] = stage + ((row + 2 + k) % 3) * st.srow;  // row - 1 + k, mod 3
    } else {
      for (int k = 0; k < 3; ++k) rows[k] = xb + std::min(H - 1, std::max<int64_t>(0, row - 1 + k)) * W * sxn + c0;
    }
    const int k0 = row == 0 ? 1 : 0, k1 = row + 1 == H ? 2 : 3;
    T* o = ob + row * W * son + c0;
    for (int64_t col = 0; col < W; col += kP) {
      // the kP input pixels of the row below one step ahead (the next row's first ones at the end);
      // none when staging (the rows are in the ring)
      const int64_t q = (row + 1) * W + col + 1 + kConvAhead * kP;
      const int64_t np = stage ? 0 : std::max<int64_t>(0, std::min(H * W - q, int64_t(kP)));
      const T* pf = xb + std::min(q, H * W - 1) * sxn + c0;
      const int64_t m = std::min<int64_t>(kP, W - col);  // the last step of a row may be shorter
      // the output pixels of the next step (the next row's first ones at the end), this item's rows
      const int64_t qo = row * W + col + m;
      const int64_t nq = nt ? 0 : std::max<int64_t>(0, std::min(r1 * W - qo, int64_t(kP)));  // not for streaming stores
      T* pq = ob + std::min(qo, H * W - 1) * son + c0;
      const bool left = col == 0, right = col + m == W;
      if (m == kP)
        conv_glu_pixels_at<L, kP>(left, right, rows, k0, k1, rsn, rC, col, nv, n, wts, o, son, pf, np, pq, nq, nt);
      else if (m == 3)
        conv_glu_pixels_at<L, 3>(left, right, rows, k0, k1, rsn, rC, col, nv, n, wts, o, son, pf, np, pq, nq, nt);
      else if (m == 2)
        conv_glu_pixels_at<L, 2>(left, right, rows, k0, k1, rsn, rC, col, nv, n, wts, o, son, pf, np, pq, nq, nt);
      else
        conv_glu_pixels_at<L, 1>(left, right, rows, k0, k1, rsn, rC, col, nv, n, wts, o, son, pf, np, pq, nq, nt);
    }
  }
}

// bias2: [2C] fp32 (zeros when the conv has no bias); threads: the OpenMP team size. Work items
// are (sample, block of channels, band of rows). stage: whether inputs whose strides alias in L1
// go through the row ring (see the header comment). stream: whether the output goes out in
// non-temporal stores (cpu::stream_stores); they are used where the variant has a store of one
// vector's bytes (32 or 64) and every full vector's address is aligned to them, ordinary stores
// elsewhere.
template <int L, typename T>
void dwconv_glu_run(const T* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sxb, int64_t sxn,
                    const float* w, int64_t swc, int64_t swt, const float* bias2, T* out, int64_t sob, int64_t son,
                    int64_t threads, bool stage, bool stream) {
  // channel block: the 3 input rows it reads (a + gate channels, fp32-sized) within kConvRowsBytes
  const int64_t budget = kConvRowsBytes / (3 * W * 2 * int64_t(sizeof(float)));
  const int64_t cb = std::min((C + L - 1) / L * L, std::max<int64_t>(L, budget / L * L));
  const int64_t n_blk = (C + cb - 1) / cb;
  // bands of rows only when samples x blocks leave threads idle
  const int64_t want = 4 * threads, have = B * n_blk;
  const int64_t n_band = have >= want ? 1 : std::min(H, (want + have - 1) / have);
  const int64_t band = (H + n_band - 1) / n_band;
  const int64_t es = sizeof(T);
  const bool staged = stage && conv_set_load(W * sxn * es, sxn * es, C * es) > kConvSetLoad;
  const ConvStage st = staged ? conv_stage_layout<L, T>(cb, W) : ConvStage{0, 0, 0};
  // full vectors start at out + b sob + pixel son + c0 + v L: all aligned when these are
  const int64_t vb = L * es;
  const bool nt = stream && (vb == 32 || vb == 64) && reinterpret_cast<uintptr_t>(out) % vb == 0 &&
                  (sob * es) % vb == 0 && (son * es) % vb == 0 && (cb * es) % vb == 0;
#pragma omp parallel
  {
    std::vector<float> wts(size_t(cb / L * 20 * L));
    std::vector<T> ring(staged ? size_t(3 * st.srow + 64) : 0);
    T* stage = staged ? ring.data() : nullptr;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < B * n_blk * n_band; ++item) {
      const int64_t b = item / (n_blk * n_band), blk = (item / n_band) % n_blk, bnd = item % n_band;
      const int64_t c0 = blk * cb, ch = std::min(C, c0 + cb) - c0;
      const int64_t r0 = bnd * band, r1 = std::min(H, r0 + band);
      if (r0 < r1)
        conv_glu_block<L>(x + b * sxb, H, W, C, sxn, c0, ch, r0, r1, w, swc, swt, bias2, out + b * sob, son,
                          wts.data(), stage, st, nt);
    }
#if SPAR_ISA_AVX2
    if (nt) _mm_sfence();  // this thread's streaming stores drain before the team's barrier
#endif
  }
}
