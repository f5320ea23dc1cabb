// The hot loops of the adaln_layernorm / gated_residual CPU twin. No include guard on purpose:
// adaln_cpu.cpp includes this file once per instruction-set variant (common/isa_variants.inc);
// SPAR_ISA_AVX2 is 1 where the variant may use AVX2/FMA intrinsics (the AVX-512 variant runs the
// same 256-bit code), 0 in a baseline build without them (the scalar loops only, which also take
// every row's tail). Rows spread over OpenMP threads; fp32 math; one rounding to T.
//
// adaln_run, per row of C elements (h = the row as fp32):
// - contiguous fp32 rows are read in place and the output is written straight into y; other
//   dtypes and strided rows are staged through a per-thread fp32 buffer (load_row / store_row);
//   channels-first rows (a [B, C, N] tensor seen as [B, N, C]) go in tiles of tokens
//   (adaln_run_tiles, below);
// - m0 = sum(h) / C: four independent 8-lane fp32 accumulators (each sums C/32 elements, 32 a
//   step), their 32 lanes and the scalar tail added in double;
// - the corrected two-pass variance: with d = h - m0 (exact for h near m0), sd = sum(d) and
//   sq = sum(d^2) in the same way (4 + 4 accumulators); corr = sd / C fixes the rounding of m0
//   and var = sq / C - corr^2 (corr is tiny, so no cancellation; a one-pass E[h^2] - E[h]^2
//   would lose everything to a large mean);
// - y = ((h - m0) - corr) * rstd * (1 + scale) + shift, 8 lanes a step (1 + scale rounded to fp32
//   first, as the Triton kernel and the reference do; shift and scale rows read in place);
// - the next contiguous row is prefetched into L1 during the second pass, so its reads overlap
//   this row's arithmetic.
// Contiguous fp32 rows thus take one read of x from memory (the later passes hit L1) and one write.
// Max |error| against an fp64 reference, fp32 in and out, shift 0 and scale 0 (2 x 64 rows,
// x = mean + std * randn; torch = F.layer_norm in fp32 on the same rows), AMD EPYC Zen 3:
//   C      x = randn              x = 1000 + randn       x = 1e4 + randn
//   1152   5.7e-7 (torch 6.6e-7)  5.2e-7 (torch 8.4e-5)  7.5e-7 (torch 1.7e-3)
//   2240   4.6e-7 (torch 6.4e-7)  5.7e-7 (torch 9.4e-5)  1.3e-6 (torch 1.7e-3)
//   9000   5.7e-7 (torch 8.3e-7)  6.6e-7 (torch 1.2e-4)  5.4e-7 (torch 1.5e-3)
// tests/test_adaln.py::test_adaln_layernorm_cpu_large_mean holds the large-mean rows to the fp32
// tolerance table (dropping the correction or one accumulator of the first pass fails it).

#if SPAR_ISA_AVX2
// the 32 lanes of four accumulators, added in double (a tree of 4-lane double vectors: a serial
// sum of 32 lanes would cost ~100 cycles of add latency per call, 3 calls a row)
inline __m256d adaln_widen_sum(__m256 a) {
  return _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
}
inline double adaln_hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256d s = _mm256_add_pd(_mm256_add_pd(adaln_widen_sum(a0), adaln_widen_sum(a1)),
                                  _mm256_add_pd(adaln_widen_sum(a2), adaln_widen_sum(a3)));
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}
#endif

struct AdalnStats {
  float m0, corr, rstd;  // first-pass mean, its correction, 1 / sqrt(var + eps)
};

// the statistics of a contiguous fp32 row h[0, C) (see the header comment).
// `next` (may be null): the next row (C floats), fetched into L1 during the second pass so that its
// memory reads overlap this row's arithmetic instead of following it; `next_out` (may be null): the
// next row's output, fetched for writing (its read-for-ownership then overlaps this row too)
inline AdalnStats adaln_stats(const float* h, int64_t C, float eps, const float* next, float* next_out) {
  int64_t c = 0;
  double s = 0.0;
#if SPAR_ISA_AVX2
  {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; c + 32 <= C; c += 32) {
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(h + c));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(h + c + 8));
      a2 = _mm256_add_ps(a2, _mm256_loadu_ps(h + c + 16));
      a3 = _mm256_add_ps(a3, _mm256_loadu_ps(h + c + 24));
    }
    for (; c + 8 <= C; c += 8) a0 = _mm256_add_ps(a0, _mm256_loadu_ps(h + c));
    s = adaln_hsum4(a0, a1, a2, a3);
  }
#endif
  for (; c < C; ++c) s += h[c];
  const float m0 = float(s / double(C));
  c = 0;
  double sd = 0.0, sq = 0.0;
#if SPAR_ISA_AVX2
  {
    const __m256 vm = _mm256_set1_ps(m0);
    __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0, q0 = d0, q1 = d0, q2 = d0, q3 = d0;
    for (; c + 32 <= C; c += 32) {
      if (next) {
        _mm_prefetch(reinterpret_cast<const char*>(next + c), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(next + c + 16), _MM_HINT_T0);
      }
      if (next_out) {
        __builtin_prefetch(next_out + c, 1, 3);
        __builtin_prefetch(next_out + c + 16, 1, 3);
      }
      const __m256 e0 = _mm256_sub_ps(_mm256_loadu_ps(h + c), vm);
      const __m256 e1 = _mm256_sub_ps(_mm256_loadu_ps(h + c + 8), vm);
      const __m256 e2 = _mm256_sub_ps(_mm256_loadu_ps(h + c + 16), vm);
      const __m256 e3 = _mm256_sub_ps(_mm256_loadu_ps(h + c + 24), vm);
      d0 = _mm256_add_ps(d0, e0);
      d1 = _mm256_add_ps(d1, e1);
      d2 = _mm256_add_ps(d2, e2);
      d3 = _mm256_add_ps(d3, e3);
      q0 = _mm256_fmadd_ps(e0, e0, q0);
      q1 = _mm256_fmadd_ps(e1, e1, q1);
      q2 = _mm256_fmadd_ps(e2, e2, q2);
      q3 = _mm256_fmadd_ps(e3, e3, q3);
    }
    for (; c + 8 <= C; c += 8) {
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next + c), _MM_HINT_T0);
      if (next_out) __builtin_prefetch(next_out + c, 1, 3);
      const __m256 e0 = _mm256_sub_ps(_mm256_loadu_ps(h + c), vm);
      d0 = _mm256_add_ps(d0, e0);
      q0 = _mm256_fmadd_ps(e0, e0, q0);
    }
    sd = adaln_hsum4(d0, d1, d2, d3);
    sq = adaln_hsum4(q0, q1, q2, q3);
  }
#else
  (void)next;
  (void)next_out;
#endif
  for (; c < C; ++c) {
    const double d = double(h[c] - m0);
    sd += d;
    sq += d * d;
  }
  const double corr = sd / double(C);
  const double var = std::max(sq / double(C) - corr * corr, 0.0);
  return {m0, float(corr), float(1.0 / std::sqrt(var + double(eps)))};
}

// o[c] = ((h[c] - m0) - corr) * rstd * (1 + sc[c]) + sh[c] over a contiguous row (o may be h)
inline void adaln_out(const float* h, AdalnStats st, const float* sc, const float* sh, float* o, int64_t C) {
  int64_t c = 0;
#if SPAR_ISA_AVX2
  const __m256 vm = _mm256_set1_ps(st.m0), vc = _mm256_set1_ps(st.corr), vr = _mm256_set1_ps(st.rstd);
  for (; c + 8 <= C; c += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(h + c), vm), vc);
    const __m256 sc1 = _mm256_add_ps(_mm256_set1_ps(1.f), _mm256_loadu_ps(sc + c));
    _mm256_storeu_ps(o + c, _mm256_fmadd_ps(_mm256_mul_ps(d, vr), sc1, _mm256_loadu_ps(sh + c)));
  }
#endif
  for (; c < C; ++c) o[c] = ((h[c] - st.m0) - st.corr) * st.rstd * (1.f + sc[c]) + sh[c];
}

// Channels-first rows (tokens closer together than channels: a [B, C, N] tensor seen as [B, N, C],
// as NCHW code hands it over) go kAdalnTile tokens at a time: the tile is gathered channel by
// channel (a channel's tokens are adjacent, one cache line), each token normalized from the fp32
// tile as a contiguous row (the same adaln_stats / adaln_out: bit-identical to a contiguous x),
// and written back row by row, or channel by channel when y is channels-first too. Row by row,
// a token's C elements lie on C lines that only the next tokens reuse; at N = 1024 or 4096 fp32
// (a 4 KiB channel stride) they share a few cache sets and come from memory for every token:
// 7.1-9.0 ns an element against 1.8-2.1 at N = 1040 / 4100 (C = 1152, fp32, one Zen 3 thread).
constexpr int64_t kAdalnTile = 16;
constexpr int64_t kGatedChannels = 64;  // gated_run's channel block for channels-first operands

// dst[j * ds + i] = src[i * ss + j] for an 8 x 8 fp32 block (AVX2: 8 loads, 24 shuffles, 8 stores)
inline void adaln_transpose8(const float* src, int64_t ss, float* dst, int64_t ds) {
#if SPAR_ISA_AVX2
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ds, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ds, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * ds + i] = src[i * ss + j];
#endif
}

inline bool adaln_channels_first(int64_t sn, int64_t sc) {
  return sc != 1 && (sn < 0 ? -sn : sn) < (sc < 0 ? -sc : sc);
}

template <typename T>
void adaln_run_tiles(const T* x, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn, int64_t sxc,
                     const float* shift, int64_t shb, const float* scale, int64_t scb, T* y, int64_t syb,
                     int64_t syn, int64_t syc, float eps) {
  constexpr int64_t kT = kAdalnTile;
  const bool y_rows = std::is_same<T, float>::value && syc == 1;
  const int64_t tiles = (N + kT - 1) / kT;
#pragma omp parallel
  {
    std::vector<float> buf(size_t(kT * C));
#pragma omp for schedule(static)
    for (int64_t item = 0; item < B * tiles; ++item) {
      const int64_t b = item / tiles, n0 = (item % tiles) * kT, m = std::min(kT, N - n0);
      const T* xb = x + b * sxb + n0 * sxn;
      float* tile = buf.data();
      // 8 channels at a time: their lines (each a run of the tile's tokens) stay in L1 while
      // every token takes its 8 elements, stored contiguous in the token's row of the tile
      // the next tile's lines (its tokens of each channel) are fetched while this one computes:
      // nothing else would, they lie a channel stride apart
      const bool ahead = n0 + kT < N;
      for (int64_t c0 = 0; c0 < C; c0 += 8) {
        const int64_t cn = std::min<int64_t>(8, C - c0);
        if (ahead)
          for (int64_t c = c0; c < c0 + cn; ++c) __builtin_prefetch(xb + c * sxc + kT * sxn, 0, 3);
        int64_t t = 0;
        if constexpr (std::is_same<T, float>::value) {
          if (cn == 8 && sxn == 1)  // 8 channels x 8 adjacent tokens at a time
            for (; t + 8 <= m; t += 8) adaln_transpose8(xb + c0 * sxc + t, sxc, tile + t * C + c0, C);
        }
        for (; t < m; ++t)
          for (int64_t c = c0; c < c0 + cn; ++c) tile[t * C + c] = to_float(xb[c * sxc + t * sxn]);
      }
      for (int64_t t = 0; t < m; ++t) {
        float* h = tile + t * C;
        const AdalnStats st = adaln_stats(h, C, eps, nullptr, nullptr);
        float* o = y_rows ? reinterpret_cast<float*>(y + b * syb + (n0 + t) * syn) : h;  // in place in the tile
        adaln_out(h, st, scale + b * scb, shift + b * shb, o, C);
      }
      if (y_rows) continue;
      T* yb = y + b * syb + n0 * syn;
      if (syc == 1) {
        for (int64_t t = 0; t < m; ++t) cpu::store_row(tile + t * C, yb + t * syn, C);
      } else {
        // a strided y (the Python entry point takes contiguous outputs only; the C++ one any)
        for (int64_t c0 = 0; c0 < C; c0 += 8) {
          const int64_t cn = std::min<int64_t>(8, C - c0);
          for (int64_t t = 0; t < m; ++t)
            for (int64_t c = c0; c < c0 + cn; ++c) yb[c * syc + t * syn] = from_float<T>(tile[t * C + c]);
        }
      }
    }
  }
}

template <typename T>
void adaln_run(const T* x, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn, int64_t sxc,
               const float* shift, int64_t shb, const float* scale, int64_t scb, T* y, int64_t syb, int64_t syn,
               int64_t syc, float eps) {
  if (adaln_channels_first(sxn, sxc))
    return adaln_run_tiles(x, B, N, C, sxb, sxn, sxc, shift, shb, scale, scb, y, syb, syn, syc, eps);
  constexpr bool f32 = std::is_same<T, float>::value;
  const bool x_direct = f32 && sxc == 1, y_direct = f32 && syc == 1;
#pragma omp parallel
  {
    std::vector<float> buf(x_direct && y_direct ? 0 : C);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * N; ++r) {
      const int64_t b = r / N, n = r % N;
      const T* xr = x + b * sxb + n * sxn;
      T* yr = y + b * syb + n * syn;
      const float* h = reinterpret_cast<const float*>(xr);
      if (!x_direct) {
        cpu::load_row(xr, sxc, buf.data(), C);
        h = buf.data();
      }
      const float* next = x_direct && r + 1 < B * N
                              ? reinterpret_cast<const float*>(x + (r + 1) / N * sxb + (r + 1) % N * sxn)
                              : nullptr;
      float* next_out = y_direct && r + 1 < B * N
                            ? reinterpret_cast<float*>(y + (r + 1) / N * syb + (r + 1) % N * syn)
                            : nullptr;
      const AdalnStats st = adaln_stats(h, C, eps, next, next_out);
      if (y_direct) {
        adaln_out(h, st, scale + b * scb, shift + b * shb, reinterpret_cast<float*>(yr), C);
      } else {
        adaln_out(h, st, scale + b * scb, shift + b * shb, buf.data(), C);
        cpu::store_row(buf.data(), yr, syc, C);
      }
    }
  }
}

// o[i] = x[i] + g(i) * y[i] over one contiguous run, g(i) = g[i] (kPerElement: a row of channels)
// or g[0] (a channel's run of tokens); o may be x
template <bool kPerElement, typename T>
inline void gated_line(const T* x, const T* y, const float* g, T* o, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = from_float<T>(to_float(x[i]) + g[kPerElement ? i : 0] * to_float(y[i]));
}

template <typename T>
void gated_run(const T* x, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn, int64_t sxc, const T* y,
               int64_t syb, int64_t syn, int64_t syc, const float* gate, int64_t gsb, T* out, int64_t sob,
               int64_t son, int64_t soc) {
  const bool dense = sxc == 1 && syc == 1 && soc == 1;
  // every operand channels-first: the rows below are channels, each one contiguous run of N tokens
  const bool by_channel = !dense && sxn == 1 && syn == 1 && son == 1;
  if (!dense && !by_channel &&
      (adaln_channels_first(sxn, sxc) || adaln_channels_first(syn, syc) || adaln_channels_first(son, soc))) {
    // a channels-first operand: blocks of kGatedChannels channels, each walked over all tokens
    // kAdalnTile at a time, channel by channel, so that a channels-first operand's tokens are read
    // (written) as adjacent runs and a channels-last one's rows as runs of the block's channels.
    // Every channel of a channels-first tensor with N >= 1024 fp32 tokens is its own 4 KiB page:
    // a sweep over all C channels per token tile (two inputs: 2C pages) outran the TLB (9 ns an
    // element at C = 1152, N = 1040); a block's pages stay in it. Each element is read before it
    // is written (in place is safe).
    constexpr int64_t kT = kAdalnTile, kCb = kGatedChannels;
    const int64_t blocks = (C + kCb - 1) / kCb;
#pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < B * blocks; ++item) {
      const int64_t b = item / blocks, c0 = (item % blocks) * kCb, c1 = std::min(C, c0 + kCb);
      const float* g = gate + b * gsb;
      for (int64_t n0 = 0; n0 < N; n0 += kT) {
        const int64_t m = std::min(kT, N - n0);
        const T* xb = x + b * sxb + n0 * sxn;
        const T* yb = y + b * syb + n0 * syn;
        T* ob = out + b * sob + n0 * son;
        int64_t cs = c0;  // channels [c0, cs) done by the fp32 8 x 8 blocks
        if constexpr (std::is_same<T, float>::value) {
          if (sxn == 1 && syn == 1 && soc == 1 && m == kT) {
            // channels-first x and y into a channels-last out (fp32): 8 channels x 8 tokens at a
            // time, x + g * y per channel row, then one transpose into the 8 token rows
            alignas(32) float blk[8 * 8];
            for (; cs + 8 <= c1; cs += 8)
              for (int64_t t = 0; t < kT; t += 8) {
                for (int i = 0; i < 8; ++i) {
                  const float gc = g[cs + i];
                  const float* xr = xb + (cs + i) * sxc + t;
                  const float* yr = yb + (cs + i) * syc + t;
#pragma omp simd
                  for (int j = 0; j < 8; ++j) blk[i * 8 + j] = xr[j] + gc * yr[j];
                }
                adaln_transpose8(blk, 8, ob + t * son + cs, son);
              }
          }
        }
        for (int64_t c = cs; c < c1; ++c) {
          const float gc = g[c];
          for (int64_t t = 0; t < m; ++t)
            ob[c * soc + t * son] = from_float<T>(to_float(xb[c * sxc + t * sxn]) + gc * to_float(yb[c * syc + t * syn]));
        }
      }
    }
    return;
  }
  const int64_t R = by_channel ? C : N;  // rows per sample
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < B * R; ++r) {
    const int64_t b = r / R, n = r % R;
    const T* xr = x + b * sxb + n * (by_channel ? sxc : sxn);
    const T* yr = y + b * syb + n * (by_channel ? syc : syn);
    T* o = out + b * sob + n * (by_channel ? soc : son);
    const float* g = gate + b * gsb;
    if (by_channel) {  // out may be x (in place): each element is read before it is written
      gated_line<false>(xr, yr, g + n, o, N);
    } else if (dense) {
      gated_line<true>(xr, yr, g, o, C);
    } else {
      for (int64_t c = 0; c < C; ++c)
        o[c * soc] = from_float<T>(to_float(xr[c * sxc]) + g[c] * to_float(yr[c * syc]));
    }
  }
}
