// The hot loops of the dwconv_glu CPU twin. No include guard on purpose: dwconv_glu_cpu.cpp
// includes this file once per instruction-set variant (common/isa_variants.inc) and runs each
// with its register width L in fp32 lanes (16 for AVX-512, 8 for AVX2, 4 for SSE).
//
// Work items are (sample, block of channels, band of rows). An item sweeps its rows pixel by
// pixel; at each pixel it walks its channel block 4 registers at a time: 9 taps x (a, gate)
// multiply-adds from the neighbours' contiguous channel runs into 8 independent accumulators, then
// a * silu(gate) and one rounding. The channel block is sized so that the 3 input rows it reads
// stay in L2 while the rows advance, so each input element comes from memory once and the taps
// re-read it from cache; the input pixel a few pixels ahead is prefetched step by step. Border
// pixels take only their in-range taps.
//
// The math is written with GCC vector types of the variant's width, not as scalar loops left to
// the auto-vectorizer: under the default -ftrapping-math g++ does not if-convert the clamp of a
// scalar exp inside a loop, so a loop calling fast::silu runs one lane at a time.

template <int L>
struct ConvVec {
  typedef float f __attribute__((vector_size(L * 4)));
  typedef int32_t i __attribute__((vector_size(L * 4)));
};

template <int L>
inline typename ConvVec<L>::f conv_load(const float* p) {
  typename ConvVec<L>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int L, typename T>
inline typename ConvVec<L>::f conv_load(const T* p) {
  float t[L];
  for (int c = 0; c < L; ++c) t[c] = to_float(p[c]);
  return conv_load<L>(static_cast<const float*>(t));
}

template <int L, typename T>
inline void conv_store(T* p, typename ConvVec<L>::f v) {
  float t[L];
  std::memcpy(t, &v, sizeof v);
  for (int c = 0; c < L; ++c) p[c] = from_float<T>(t[c]);
}

// a * silu(g) lane-wise, silu(g) = g / (1 + exp(-g)) with fast::fast_exp's clamp, Cody-Waite
// reduction and polynomial
template <int L>
inline typename ConvVec<L>::f conv_glu_act(typename ConvVec<L>::f a, typename ConvVec<L>::f g) {
  using vf = typename ConvVec<L>::f;
  using vi = typename ConvVec<L>::i;
  vf x = -g;
  x = x < -87.3f ? vf{} - 87.3f : x;
  x = x > 88.0f ? vf{} + 88.0f : x;
  const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof scale);
  return a * g / (1.0f + p * scale);
}

// one pixel, channels [c, c + kU * L); src[k] / wt[k]: the k-th in-range tap's a channels and
// weights (the gate ones C further); kN == 0: `taps` taps, known at run time
template <int L, int kU, int kN, typename T>
inline void conv_glu_pixel(const T* const* src, const float* const* wt, int taps, int64_t c, int64_t C,
                           const float* bias2, T* o) {
  using vf = typename ConvVec<L>::f;
  const int nt = kN > 0 ? kN : taps;
  vf aa[kU], ag[kU];
#pragma GCC unroll 4
  for (int u = 0; u < kU; ++u) {
    aa[u] = conv_load<L>(bias2 + c + u * L);
    ag[u] = conv_load<L>(bias2 + C + c + u * L);
  }
#pragma GCC unroll 9
  for (int k = 0; k < nt; ++k) {
    const T* s = src[k] + c;
    const float* w = wt[k] + c;
#pragma GCC unroll 4
    for (int u = 0; u < kU; ++u) {
      aa[u] += conv_load<L>(s + u * L) * conv_load<L>(w + u * L);
      ag[u] += conv_load<L>(s + C + u * L) * conv_load<L>(w + C + u * L);
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < kU; ++u) conv_store<L>(o + c + u * L, conv_glu_act<L>(aa[u], ag[u]));
}

// channels [c, c1) of one pixel, c1 - c < L: zero-padded lanes
template <int L, typename T>
inline void conv_glu_tail(const T* const* src, const float* const* wt, int taps, int64_t c, int64_t c1, int64_t C,
                          const float* bias2, T* o) {
  using vf = typename ConvVec<L>::f;
  const int64_t n = c1 - c;
  float aa[L] = {}, ag[L] = {}, y[L];
  for (int64_t j = 0; j < n; ++j) {
    aa[j] = bias2[c + j];
    ag[j] = bias2[C + c + j];
  }
  for (int k = 0; k < taps; ++k)
    for (int64_t j = 0; j < n; ++j) {
      aa[j] += to_float(src[k][c + j]) * wt[k][c + j];
      ag[j] += to_float(src[k][C + c + j]) * wt[k][C + c + j];
    }
  const vf vy = conv_glu_act<L>(conv_load<L>(static_cast<const float*>(aa)), conv_load<L>(static_cast<const float*>(ag)));
  std::memcpy(y, &vy, sizeof y);
  for (int64_t j = 0; j < n; ++j) o[c + j] = from_float<T>(y[j]);
}

constexpr int64_t kConvPrefetchPixels = 4;  // how far ahead the input pixel is prefetched

// channels [c0, c1) of rows [r0, r1) of one sample
template <int L, typename T>
void conv_glu_block(const T* xb, int64_t H, int64_t W, int64_t C, int64_t sxn, int64_t c0, int64_t c1, int64_t r0,
                    int64_t r1, const float* w9, const float* bias2, T* ob, int64_t son) {
  constexpr int64_t kStep = 4 * L, kLine = 64 / int64_t(sizeof(T));
  const T* src[9];
  const float* wt[9];
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t col = 0; col < W; ++col) {
      int taps = 0;
      for (int t = 0; t < 9; ++t) {
        const int64_t rr = row + t / 3 - 1, cc = col + t % 3 - 1;
        if (rr < 0 || rr >= H || cc < 0 || cc >= W) continue;
        src[taps] = xb + (rr * W + cc) * sxn;
        wt[taps] = w9 + t * 2 * C;
        ++taps;
      }
      // the input pixel first read by the pixel kConvPrefetchPixels on (its lower right tap)
      int64_t pr = row + 1, pc = col + 1 + kConvPrefetchPixels;
      if (pc >= W) pr += 1, pc -= W;
      const T* pf = pr < H && pc < W ? xb + (pr * W + pc) * sxn : nullptr;
      T* o = ob + (row * W + col) * son;
      int64_t c = c0;
      for (; c + kStep <= c1; c += kStep) {
        if (pf)
          for (int64_t j = 0; j < kStep; j += kLine) {
            __builtin_prefetch(pf + c + j, 0, 3);
            __builtin_prefetch(pf + C + c + j, 0, 3);
          }
        if (taps == 9)
          conv_glu_pixel<L, 4, 9>(src, wt, 9, c, C, bias2, o);
        else
          conv_glu_pixel<L, 4, 0>(src, wt, taps, c, C, bias2, o);
      }
      for (; c + L <= c1; c += L) conv_glu_pixel<L, 1, 0>(src, wt, taps, c, C, bias2, o);
      if (c < c1) conv_glu_tail<L>(src, wt, taps, c, c1, C, bias2, o);
    }
  }
}

// bias2: [2C] fp32 (zeros when the conv has no bias); threads: the OpenMP team size
template <int L, typename T>
void dwconv_glu_run(const T* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sxb, int64_t sxn,
                    const float* w9, const float* bias2, T* out, int64_t sob, int64_t son, int64_t threads) {
  constexpr int64_t kStep = 4 * L;
  // channel block: the 3 input rows it reads (a + gate channels, fp32-sized) within ~192 KiB of L2
  const int64_t budget = (192 * 1024) / (3 * W * 2 * int64_t(sizeof(float)));
  const int64_t cb = std::min(C, std::max(kStep, budget / kStep * kStep));
  const int64_t n_blk = (C + cb - 1) / cb;
  // bands of rows only when samples x blocks leave threads idle
  const int64_t want = 4 * threads, have = B * n_blk;
  const int64_t n_band = have >= want ? 1 : std::min(H, (want + have - 1) / have);
  const int64_t band = (H + n_band - 1) / n_band;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < B * n_blk * n_band; ++item) {
    const int64_t b = item / (n_blk * n_band), blk = (item / n_band) % n_blk, bnd = item % n_band;
    const int64_t c0 = blk * cb, c1 = std::min(C, c0 + cb);
    const int64_t r0 = bnd * band, r1 = std::min(H, r0 + band);
    if (r0 < r1) conv_glu_block<L>(x + b * sxb, H, W, C, sxn, c0, c1, r0, r1, w9, bias2, out + b * sob, son);
  }
}
