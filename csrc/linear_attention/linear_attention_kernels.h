// The hot loops of the linear_attention CPU twin. No include guard on purpose:
// linear_attention_cpu.cpp includes this file once per instruction-set variant (common/isa_variants.inc).
//
// ReLU linear attention for head dims d = e = HD in {16, 32, 64} (SANA: 32), fp32 throughout, as
// two small GEMMs per (b, h) written in the BLIS pattern: operands staged contiguous in L1, then
// a register-blocked micro-kernel (la_tile: R rows x NV vectors of accumulators; per step NV
// vector loads of a B row, R broadcasts of A, R * NV FMAs; AVX2: 6 x 16, 12 ymm accumulators).
// - Phase 1, the state S = relu(K)^T V [HD, HD] and z = sum relu(K) [HD] of each (b, h): keys in
//   chunks of kLaKeys tokens (64 at HD 32); a chunk's relu(k) rows are staged as fp32 (z summed
//   on the way) and its v rows read in place when fp32 (staged as fp32 otherwise), then S[d0:d0+R, c0:c0+W] += sum over the chunk's keys t of
//   relu(k_t)[d0+i] v_t[c0:c0+W]: each block of S is loaded and stored once per chunk. Token-major:
//   each chunk for all heads of the thread's range in turn (their states, 4 KB each at HD 32,
//   stay in L2), the rows of the head kAhead1 further on prefetched meanwhile; keys of one head
//   are C * 4 bytes apart (a page per key), a chunk's rows are read along the token row.
// - Phase 2, per chunk of R query rows of one (b, h), again token-major over the heads with the
//   rows kAhead2 heads on prefetched: relu(q) staged, 1 / (relu(q) . z + eps) for the R rows
//   together (la_recip_den8); then out[rows, c0:c0+W] = (relu(q) S[:, c0:c0+W]) * that
//   reciprocal, fp32 rows stored in place.
// kLanes: the fp32 lanes of the variant's vectors (linear_attention_cpu.cpp passes 16 for
// AVX-512, 8 for AVX2, the build's own width for the baseline); the block sizes follow from it
// (16 vector registers below 16 lanes, 32 with AVX-512).

// la_tile pins B's row in registers with an empty asm (below); tests/cpp/linear_attention_l16.cpp
// turns it off to build the 16-lane code for AVX2, whose registers cannot hold a 64-byte vector
#ifndef SPAR_LA_PIN_LOADS
#define SPAR_LA_PIN_LOADS 1
#endif

// kLanes fp32 as one GCC vector: each variant compiles the same micro-kernel to its own registers
template <int kLanes>
struct LaVec {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};

template <typename V>
inline V la_load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void la_store(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// x in every lane (an initializer of equal elements: one vbroadcastss; a loop over the lanes is not
// recognised and spills)
template <typename V, int kLanes>
inline V la_splat(float x) {
  static_assert(kLanes == 4 || kLanes == 8 || kLanes == 16, "linear_attention: 4, 8 or 16 lanes");
  if constexpr (kLanes == 4) return V{x, x, x, x};
  else if constexpr (kLanes == 8) return V{x, x, x, x, x, x, x, x};
  else return V{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

// C[R, NV * kLanes] = (kAccumulate ? C : 0) + sum_k A(i, k) B[k, :], A(i, k) = a[i * kArs + k * kAks],
// B's row k at b + k * ldb, C's row i at c + i * ldc. kDivide (phase 2): each row of the result
// multiplied by rden[i] (1 / its denominator) before it is stored.
template <int R, int NV, int kLanes, int HD, int kArs, int kAks, bool kAccumulate, bool kDivide>
inline void la_tile(const float* __restrict a, const float* __restrict b, int64_t ldb, int K, float* __restrict c,
                    int64_t ldc, const float* __restrict rden) {
  static_assert(NV == 1 || NV == 2, "linear_attention: a tile row is one or two vectors");
  using V = typename LaVec<kLanes>::type;
  V acc[R][NV];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = kAccumulate ? la_load<V>(c + i * ldc + j * kLanes) : V{};
  for (int k = 0; k < K; ++k) {
    // B's row k as NV (<= 2) named vectors, each loaded once into a register and reused by the R
    // FMAs: without the empty asm g++ may fold the load into every FMA (R loads of one vector a
    // step: load-bound), and an array of them is kept in memory too (a store a step)
    V b0 = la_load<V>(b + int64_t(k) * ldb), b1 = NV > 1 ? la_load<V>(b + int64_t(k) * ldb + kLanes) : V{};
#if SPAR_LA_PIN_LOADS && defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    if constexpr (NV > 1) asm("" : "+v"(b0), "+v"(b1));
    else asm("" : "+v"(b0));
#endif
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const V av = la_splat<V, kLanes>(a[i * kArs + int64_t(k) * kAks]);
      acc[i][0] += av * b0;
      if constexpr (NV > 1) acc[i][1] += av * b1;
    }
  }
#if defined(__GNUC__)
  // rden read only here: g++ otherwise hoists its R broadcasts above the loop, into registers
  // the accumulators need (they spill)
  asm("" : "+r"(rden));
#endif
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    if constexpr (kDivide) {
      const V rv = la_splat<V, kLanes>(rden[i]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] *= rv;
    }
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) la_store(c + i * ldc + j * kLanes, acc[i][j]);
  }
}

// the block sizes of one variant: NV vectors (of kLanes) per row of a tile, at most R rows (R * NV
// accumulators + NV B vectors + a broadcast fit the register file)
template <int HD, int kLanes>
struct LaBlocks {
  static constexpr int NV = HD / kLanes >= 2 ? 2 : 1;
  static constexpr int W = NV * kLanes;  // columns of a tile
  static constexpr int kRegs = kLanes >= 16 ? 32 : 16;
  static constexpr int R0 = (kRegs - NV - 2) / NV;
  static constexpr int R = R0 > 8 ? 8 : R0;
  static_assert(HD % W == 0, "linear_attention: the tile width must divide the head dim");
  // rows of the next block when `left` rows remain: R while two or more blocks remain, then the
  // rest in two halves (32 rows at R = 6: 6 6 6 6 4 4, not 6 6 6 6 6 2)
  static constexpr int next(int left) { return left >= 2 * R ? R : left > R ? (left + 1) / 2 : left; }
};

// la_tile with a run-time row count 1..8 (the compile-time kernels)
template <int NV, int kLanes, int HD, int kArs, int kAks, bool kAccumulate, bool kDivide>
inline void la_tile_rows(int rows, const float* a, const float* b, int64_t ldb, int K, float* c, int64_t ldc,
                         const float* rden) {
  switch (rows) {
#define SPAR_LA_ROWS(r) \
  case r: return la_tile<r, NV, kLanes, HD, kArs, kAks, kAccumulate, kDivide>(a, b, ldb, K, c, ldc, rden);
    SPAR_LA_ROWS(1) SPAR_LA_ROWS(2) SPAR_LA_ROWS(3) SPAR_LA_ROWS(4)
    SPAR_LA_ROWS(5) SPAR_LA_ROWS(6) SPAR_LA_ROWS(7) SPAR_LA_ROWS(8)
#undef SPAR_LA_ROWS
    default: return;
  }
}

// one row of HD elements requested into L1 (rw: for writing)
template <typename T, int HD>
inline void la_prefetch_row(const T* p, int rw) {
#pragma GCC unroll 8
  for (int off = 0; off < int(HD * sizeof(T)); off += 64) {
    if (rw) __builtin_prefetch(reinterpret_cast<const char*>(p) + off, 1, 3);
    else __builtin_prefetch(reinterpret_cast<const char*>(p) + off, 0, 3);
  }
}

// Phase 1 for keys [n0, n0 + nt) of one (b, h): stage relu(k) as fp32 rows of kb (nt x HD) and
// add it into z, then S (+)= kb^T V, V the chunk's v rows: read in place when fp32 (0.87-0.97x
// the time of staging them too, SANA shapes, one-off harness), else staged as fp32 rows of vb.
// The chunk starting at key 0 writes S and z.
// pk / pv: pnt rows of a later chunk, prefetched while this one computes.
template <typename T, int HD, int kLanes>
inline void la_state_chunk(const T* kh, int64_t skn, const T* vh, int64_t svn, int64_t n0, int nt, float* S,
                           float* z, float* kb, float* vb, const T* pk, const T* pv, int pnt) {
  using Bk = LaBlocks<HD, kLanes>;
  const bool first = n0 == 0;
  constexpr bool kVInPlace = std::is_same<T, float>::value;
  alignas(64) float zl[HD];  // z's partial sums, local (no aliasing with kb / vb: kept in registers)
  for (int e = 0; e < HD; ++e) zl[e] = first ? 0.f : z[e];
  for (int t = 0; t < nt; ++t) {
    const T* __restrict kr = kh + (n0 + t) * skn;
    const T* __restrict vr = vh + (n0 + t) * svn;
    float* __restrict kt = kb + t * HD;
    float* __restrict vt = vb + t * HD;
#pragma omp simd
    for (int e = 0; e < HD; ++e) {
      const float kd = fast::relu(to_float(kr[e]));
      kt[e] = kd;
      zl[e] += kd;
      if constexpr (!kVInPlace) vt[e] = to_float(vr[e]);
    }
  }
  // B: fp32 v rows in place (a chunk's rows stay in L1 across its tiles), other dtypes staged
  const float* bsrc = kVInPlace ? reinterpret_cast<const float*>(vh + n0 * svn) : vb;
  const int64_t ldb = kVInPlace ? svn : HD;
  for (int e = 0; e < HD; ++e) z[e] = zl[e];
  // the prefetches spread over the tiles, a few rows before each: issued all at once they would
  // outnumber the L1 miss buffers (measured ~20% slower from memory)
  constexpr int kTiles = [] {
    int n = 0;
    for (int d = 0; d < HD; d += Bk::next(HD - d)) n += HD / Bk::W;
    return n;
  }();
  const int per_tile = (pnt + kTiles - 1) / kTiles;
  int pf = 0;
  for (int d0 = 0; d0 < HD;) {
    const int rows = Bk::next(HD - d0);
    for (int c0 = 0; c0 < HD; c0 += Bk::W) {
      for (const int end = pf + per_tile; pf < pnt && pf < end; ++pf) {
        la_prefetch_row<T, HD>(pk + pf * skn, 0);
        la_prefetch_row<T, HD>(pv + pf * svn, 0);
      }
      // A(i, t) = kb[t][d0 + i]: rows 1 apart, keys HD apart
      if (first)
        la_tile_rows<Bk::NV, kLanes, HD, 1, HD, false, false>(rows, kb + d0, bsrc + c0, ldb, nt, S + d0 * HD + c0, HD,
                                                               nullptr);
      else
        la_tile_rows<Bk::NV, kLanes, HD, 1, HD, true, false>(rows, kb + d0, bsrc + c0, ldb, nt, S + d0 * HD + c0, HD,
                                                              nullptr);
    }
    d0 += rows;
  }
}

#if SPAR_ISA_AVX2
// rden[t] = 1 / (qb[t] . z + eps) for the nt <= 8 staged relu(q) rows of a phase-2 chunk: each
// row's products summed in one 8-lane vector, the 8 rows' lanes added across in one hadd tree,
// one division for all (instead of a horizontal sum and a scalar division per row: phase 2 alone
// on cached data measured 30-36 -> 50-64 GFLOP/s; within the whole op no slower, ~5% faster at
// 1024 tokens from memory)
template <int HD>
inline void la_recip_den8(const float* qb, const float* z, float eps, int nt, float* rden) {
  __m256 p[8];
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) {
    __m256 a = _mm256_setzero_ps();
    if (t < nt) {
#pragma GCC unroll 8
      for (int d = 0; d < HD; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qb + t * HD + d), _mm256_loadu_ps(z + d), a);
    }
    p[t] = a;
  }
  // hadd(a, b) = [a0+a1 a2+a3 b0+b1 b2+b3 | a4+a5 a6+a7 b4+b5 b6+b7]: after two levels, lane i of
  // the low halves holds rows 0-3 / 4-7's sums of lanes 0-3, of the high halves of lanes 4-7
  const __m256 b03 = _mm256_hadd_ps(_mm256_hadd_ps(p[0], p[1]), _mm256_hadd_ps(p[2], p[3]));
  const __m256 b47 = _mm256_hadd_ps(_mm256_hadd_ps(p[4], p[5]), _mm256_hadd_ps(p[6], p[7]));
  const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(b03, b47, 0x20), _mm256_permute2f128_ps(b03, b47, 0x31));
  alignas(32) float r[8];
  _mm256_store_ps(r, _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(sum, _mm256_set1_ps(eps))));
  for (int t = 0; t < nt; ++t) rden[t] = r[t];
}
#endif

// Phase 2 for query rows [n0, n0 + nt) of one (b, h): out rows = relu(q) S / (relu(q) . z + eps).
// fp32 output rows are written in place (row stride son), others through ob and one rounding.
// pq / po: pnt query and output rows of a later head, prefetched during the staging.
template <typename T, int HD, int kLanes>
inline void la_out_chunk(const T* qh, int64_t sqn, const float* S, const float* z, float eps, T* oh, int64_t son,
                         int64_t n0, int nt, float* qb, float* ob, float* rden, const T* pq, T* po, int pnt) {
  using Bk = LaBlocks<HD, kLanes>;
  for (int t = 0; t < nt; ++t) {
    const T* qr = qh + (n0 + t) * sqn;
    if (t < pnt) {
      la_prefetch_row<T, HD>(pq + t * sqn, 0);
      la_prefetch_row<T, HD>(po + t * son, 1);
    }
    float* qt = qb + t * HD;
#if SPAR_ISA_AVX2
#pragma omp simd
    for (int d = 0; d < HD; ++d) qt[d] = fast::relu(to_float(qr[d]));
  }
  la_recip_den8<HD>(qb, z, eps, nt, rden);
#else
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int d = 0; d < HD; ++d) {
      const float qd = fast::relu(to_float(qr[d]));
      qt[d] = qd;
      s += qd * z[d];
    }
    rden[t] = 1.f / (s + eps);
  }
#endif
  constexpr bool kInPlace = std::is_same<T, float>::value;
  float* c = kInPlace ? reinterpret_cast<float*>(oh + n0 * son) : ob;
  const int64_t ldc = kInPlace ? son : HD;
  for (int r0 = 0; r0 < nt;) {
    const int rows = nt - r0 >= Bk::R ? Bk::R : nt - r0;
    for (int c0 = 0; c0 < HD; c0 += Bk::W)  // A(i, d) = qb[r0 + i][d]: rows HD apart, d 1 apart
      la_tile_rows<Bk::NV, kLanes, HD, HD, 1, false, true>(rows, qb + r0 * HD, S + c0, HD, HD, c + r0 * ldc + c0, ldc,
                                                     rden + r0);
    r0 += rows;
  }
  if constexpr (!kInPlace) {
    for (int t = 0; t < nt; ++t) {
      T* o = oh + (n0 + t) * son;
      const float* src = ob + t * HD;
#pragma omp simd
      for (int e = 0; e < HD; ++e) o[e] = from_float<T>(src[e]);
    }
  }
}

template <typename T, int HD, int kLanes>
void linear_attention_run(const T* q, const T* k, const T* v, int64_t B, int64_t Nq, int64_t Nk, int64_t H,
                          int64_t sqb, int64_t sqn, int64_t sqh, int64_t skb, int64_t skn, int64_t skh,
                          int64_t svb, int64_t svn, int64_t svh, T* out, int64_t sob, int64_t son, int64_t soh,
                          float eps) {
  using Bk = LaBlocks<HD, kLanes>;
  // keys per phase-1 chunk: their relu(k) and v take 2 x 8 KB, next to a 4 KB state (HD 32)
  constexpr int kLaKeys = 2048 / HD;
  // how many heads ahead the rows to come are prefetched (at SANA's shapes, 1024 tokens from
  // memory: 2 measured ~10% faster than 1 in either phase, 3 or 4 no faster than 2)
  constexpr int kAhead1 = 2, kAhead2 = 2;
  // query rows per phase-2 chunk: one row block of the micro-kernel. The rows of a chunk are read
  // and written head slice by head slice, one memory stream per row: at SANA's 1024 tokens a chunk
  // of 6 rows measured ~15% faster than 12 and ~30% faster than 48 (fewer streams at a time; the
  // state, reloaded from L2 for each chunk, costs less).
  constexpr int kLaQueries = Bk::R;
  static_assert(kLaQueries <= kLaKeys && kLaQueries <= 8,
                "linear_attention: phase 2 reuses the phase-1 buffers; la_recip_den8 takes 8 rows");
  constexpr int64_t SE = HD * HD + HD;  // a state and its normaliser
  const int64_t BH = B * H;
  // the states of all heads (phase 2 reads them on every thread), kept by the calling thread from
  // call to call up to 16 MB (every call writes what it reads: no zeroing, and no page faults
  // after the first call); larger ones are allocated per call
  static thread_local std::vector<float> ws_keep;
  std::vector<float> ws_once;
  float* ws;
  if (BH * SE <= (int64_t(1) << 22)) {
    if (ws_keep.size() < size_t(BH * SE)) ws_keep.resize(size_t(BH * SE));
    ws = ws_keep.data();
  } else {
    ws_once.resize(size_t(BH * SE));
    ws = ws_once.data();
  }
  const int64_t q_chunks = (Nq + kLaQueries - 1) / kLaQueries;
#pragma omp parallel
  {
    alignas(64) float kb[kLaKeys * HD];
    alignas(64) float vb[kLaKeys * HD];
    // phase 1: this thread's contiguous range of (b, h); within a sample token-major: each chunk of
    // keys for all heads of the range in turn, prefetching the rows of the head kAhead1 further on
    // (past the range's last head: the first heads' rows of the next chunk)
    {
#ifdef _OPENMP
      const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
#else
      const int64_t nth = 1, tid = 0;
#endif
      const int64_t lo = BH * tid / nth, hi = BH * (tid + 1) / nth;
      for (int64_t bh0 = lo; bh0 < hi;) {
        const int64_t b = bh0 / H, h0 = bh0 % H, h1 = std::min(H, h0 + (hi - bh0));
        if (Nk == 0) std::fill(ws + (b * H + h0) * SE, ws + (b * H + h1) * SE, 0.f);
        const T* kb0 = k + b * skb;
        const T* vb0 = v + b * svb;
        for (int64_t n0 = 0; n0 < Nk; n0 += kLaKeys) {
          const int nt = int(std::min<int64_t>(kLaKeys, Nk - n0));
          for (int64_t h = h0; h < h1; ++h) {
            float* S = ws + (b * H + h) * SE;
            const int64_t ahead = h - h0 + kAhead1, hp = h0 + ahead % (h1 - h0);
            const int64_t np = n0 + ahead / (h1 - h0) * kLaKeys;
            const int pn = np < Nk ? int(std::min<int64_t>(kLaKeys, Nk - np)) : 0;
            la_state_chunk<T, HD, kLanes>(kb0 + h * skh, skn, vb0 + h * svh, svn, n0, nt, S, S + HD * HD, kb, vb,
                                          kb0 + hp * skh + (pn ? np : 0) * skn, vb0 + hp * svh + (pn ? np : 0) * svn,
                                          pn);
          }
        }
        bh0 += h1 - h0;
      }
    }
#pragma omp barrier
    // phase 2: (b, query chunk) pairs over the threads, the heads of a chunk in turn, prefetching
    // the query and output rows of the head kAhead2 further on (past the last head: the first
    // heads' rows of the next chunk)
    float* qb = kb;  // the phase-1 buffers, reused
    float* ob = vb;
    alignas(64) float rden[kLaQueries];
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < B * q_chunks; ++bc) {
      const int64_t b = bc / q_chunks, n0 = (bc % q_chunks) * kLaQueries;
      const int nt = int(std::min<int64_t>(kLaQueries, Nq - n0));
      for (int64_t h = 0; h < H; ++h) {
        const float* S = ws + (b * H + h) * SE;
        const int64_t hp = (h + kAhead2) % H, np = n0 + (h + kAhead2) / H * kLaQueries;
        const int pn = np < Nq ? int(std::min<int64_t>(kLaQueries, Nq - np)) : 0;
        la_out_chunk<T, HD, kLanes>(q + b * sqb + h * sqh, sqn, S, S + HD * HD, eps, out + b * sob + h * soh, son,
                                    n0, nt, qb, ob, rden, q + b * sqb + hp * sqh + (pn ? np : 0) * sqn,
                                    out + b * sob + hp * soh + (pn ? np : 0) * son, pn);
      }
    }
  }
}
