// Row helpers shared by the CPU twins of the float ops: load a row to fp32, store fp32 back with
// one rounding (contiguous or with an element stride), dispatch on the dtype code
// (fp32 / fp16 / bf16), 8-lane AVX2/F16C loads and stores as fp32 and a row's sum of squares.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/spar_common.h"

// SPAR_CPU_AVX2: the build targets AVX2/F16C/FMA (-march), so the twins compiled once (not per
// instruction set, below) may use the 8-lane helpers of spar::simd.
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define SPAR_CPU_AVX2 1
#endif

namespace spar {
namespace simd {
#ifdef SPAR_CPU_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
// Store 8 floats as T (round to nearest even; the same rounding as from_float<T>).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(f16_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// bf16: round to nearest even on the bits, NaN kept quiet (the vector form of bf16_from_float).
inline void store8(bf16_t* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, qnan, nan);
  // pack the 8 low halves: [r0..r3 | r4..r7] -> 8 x u16
  const __m256i packed = _mm256_packus_epi32(r, r);  // values are < 2^16: no saturation
  const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(ordered));
}
// the sum of the 8 lanes, added in lane order into `s` (float or double)
template <typename S>
inline S hsum(__m256 v, S s) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (float l : lanes) s += l;
  return s;
}
#endif
}  // namespace simd
}  // namespace spar

namespace spar {
namespace cpu {

template <typename T>
inline void load_row(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
inline void store_row(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

// element stride `stride` (any value; 1 takes the contiguous, vectorized loop)
template <typename T>
inline void load_row(const T* __restrict src, int64_t stride, float* __restrict dst, int64_t n) {
  if (stride == 1) return load_row(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i * stride]);
}

template <typename T>
inline void store_row(const float* __restrict src, T* __restrict dst, int64_t stride, int64_t n) {
  if (stride == 1) return store_row(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = from_float<T>(src[i]);
}

// Sum of squares of a row of n elements at element stride sd: the contiguous part in two 8-lane
// fp32 accumulators (16 elements a step), the rest and the lanes' total in double (a serial fp32
// sum of thousands of squares drifts by several ulp).
template <typename T>
float sum_sq(const T* x, int64_t n, int64_t sd) {
  int64_t d = 0;
  double s = 0.0;
#ifdef SPAR_CPU_AVX2
  if (sd == 1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; d + 16 <= n; d += 16) {
      const __m256 v0 = simd::load8(x + d), v1 = simd::load8(x + d + 8);
      a0 = _mm256_fmadd_ps(v0, v0, a0);
      a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    s = simd::hsum(_mm256_add_ps(a0, a1), s);
  }
#endif
  for (; d < n; ++d) {
    const double h = to_float(x[d * sd]);
    s += h * h;
  }
  return float(s);
}

// y[d] = round(x[d * sd] * rstd * w[d]) over a row of n elements (y and w contiguous): the
// RMSNorm scaling of rms_norm and split_by_expert.
template <typename T, typename P>
void scale_row(const T* x, int64_t sd, const P* w, float rstd, T* y, int64_t n) {
  int64_t d = 0;
#ifdef SPAR_CPU_AVX2
  if (sd == 1) {
    const __m256 vr = _mm256_set1_ps(rstd);
    for (; d + 8 <= n; d += 8)
      simd::store8(y + d, _mm256_mul_ps(_mm256_mul_ps(simd::load8(x + d), vr), simd::load8(w + d)));
  }
#endif
  for (; d < n; ++d) y[d] = from_float<T>(to_float(x[d * sd]) * rstd * to_float(w[d]));
}

template <typename F>
void dispatch(int dtype, const char* op, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::F32: return f(float{});
    case DType::F16: return f(f16_t{});
    case DType::BF16: return f(bf16_t{});
    default: throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace cpu
}  // namespace spar

// ---- run-time choice of the instruction set for the DiT twins --------------------------------
// A twin's hot loops live in a header without include guard (e.g. adaln/adaln_kernels.h), included
// once per variant inside SPAR_ISA_BEGIN_* / SPAR_ISA_END (x86-64 + GCC: the variant's functions,
// OpenMP regions included, are compiled for AVX-512 or AVX2 on top of the build's -march; elsewhere
// every variant is the build's own code). cpu_isa() picks the widest one this CPU runs;
// SPAR_CPU_ISA=base|avx2|avx512 forces one (tests and benchmarks), never one the CPU lacks.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPAR_ISA_MULTI 1
#define SPAR_ISA_BEGIN_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")")
#define SPAR_ISA_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define SPAR_ISA_END _Pragma("GCC pop_options")
#else
#define SPAR_ISA_MULTI 0
#define SPAR_ISA_BEGIN_AVX512
#define SPAR_ISA_BEGIN_AVX2
#define SPAR_ISA_END
#endif

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#if SPAR_ISA_MULTI
#include <cpuid.h>
#endif

namespace spar {
namespace cpu {

enum class Isa { Base = 0, Avx2 = 1, Avx512 = 2 };

// fp32 lanes of the build's own vector registers: what the base variant (compiled with the build's
// -march) may use; the avx2 and avx512 variants use 8 and 16
#if defined(__AVX512F__)
constexpr int kBaseLanes = 16;
#elif defined(__AVX__)
constexpr int kBaseLanes = 8;
#else
constexpr int kBaseLanes = 4;
#endif

inline Isa cpu_isa_supported() {
#if SPAR_ISA_MULTI
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Base;
  }();
  return best;
#else
  return Isa::Base;
#endif
}

// the variant to run: the widest supported, or SPAR_CPU_ISA's choice when this CPU has it
inline Isa cpu_isa() {
  const Isa best = cpu_isa_supported();
  const char* env = std::getenv("SPAR_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa want = best;
  if (std::strcmp(env, "base") == 0) want = Isa::Base;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::Avx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::Avx512;
  return static_cast<int>(want) <= static_cast<int>(best) ? want : best;
}

// AVX512-VBMI (byte permutes across a register, vpermi2b): an extra the avx512 variant uses only
// after asking (quantize_fp8's bf16 table rows), since the first AVX-512 CPUs lack it.
inline bool has_avx512vbmi() {
#if SPAR_ISA_MULTI
  static const bool vbmi = [] {
    __builtin_cpu_init();
    return bool(__builtin_cpu_supports("avx512vbmi"));
  }();
  return vbmi;
#else
  return false;
#endif
}

// One cache of this CPU from CPUID's deterministic cache parameters (leaf 4 on Intel, 0x8000001D on
// AMD): level 1 data (type 1) or level 2 unified (type 3); zeros when unknown.
struct CacheInfo {
  int ways = 0;
  int64_t bytes = 0;
};
inline CacheInfo cache_info(unsigned level, unsigned type) {
#if SPAR_ISA_MULTI
  for (unsigned leaf : {4u, 0x8000001Du}) {
    if (__get_cpuid_max(leaf & 0x80000000u, nullptr) < leaf) continue;
    for (unsigned i = 0; i < 16; ++i) {
      unsigned a, b, c, d;
      __cpuid_count(leaf, i, a, b, c, d);
      const unsigned t = a & 31;  // 0: no more caches, 1: data, 2: instruction, 3: unified
      if (t == 0) break;
      if (t == type && ((a >> 5) & 7) == level) {
        const int ways = int((b >> 22) & 0x3ff) + 1, parts = int((b >> 12) & 0x3ff) + 1;
        const int line = int(b & 0xfff) + 1;
        return CacheInfo{ways, int64_t(ways) * parts * line * (int64_t(c) + 1)};
      }
    }
  }
#else
  (void)level, (void)type;
#endif
  return CacheInfo{};
}

// The associativity of this CPU's level-1 data cache; 0 when unknown.
inline int l1d_ways() {
  static const int ways = cache_info(1, 1).ways;
  return ways;
}

// The size of the level-2 cache of one core in bytes; 0 when unknown.
inline int64_t l2_bytes() {
  static const int64_t bytes = cache_info(2, 3).bytes;
  return bytes;
}

// Whether a twin writes an output of `bytes_per_thread` (what one thread writes in a call) with
// non-temporal stores: when it is more than half of this core's L2 (1 MiB taken when unknown), the
// output would leave the caches before anything reads it anyway, and a streaming store spares the
// read of every output line that an ordinary store makes first (a third of a memory-bound
// stencil's traffic). Below that, ordinary stores keep the output cached for the op that reads it
// next. Measured on dwconv_glu (fp32, B = 2, one thread, caches evicted before each call, 0 / 1
// alternated call by call in one process, medians of 15; Intel Xeon family 6 model 207): 5-6% faster
// at 16x16 with C = 2048 and 2880, 10% at C = 5600, 13% at 32x32 with C = 2880.
// SPAR_CPU_STREAM=1 / 0 forces it (tests, benchmarks).
inline bool stream_stores(int64_t bytes_per_thread) {
  const char* env = std::getenv("SPAR_CPU_STREAM");
  if (env != nullptr && *env != '\0') return std::strcmp(env, "0") != 0;
  const int64_t l2 = l2_bytes();
  return bytes_per_thread > (l2 > 0 ? l2 : int64_t(1) << 21) / 2;
}

// Whether a twin copies inputs whose strides alias in L1 into padded buffers before its loops read
// them (dwconv_glu's row ring, dwconv_glu_kernels.h): where L1 has at most 8 ways, or its ways are
// unknown. Measured: on AMD Zen 3 (32 KiB, 8 ways) staging ran 2-3x faster at power-of-two widths;
// on an Intel Xeon (family 6 model 207; 48 KiB, 12 ways), alternating both in one process at
// C = 1024-3072, it ran 13-15% slower in the AVX-512 variant at 16x16 pixels (equal at 32x32) and
// 0-9% faster in the AVX2 one. SPAR_CPU_STAGE=1 / 0 forces it (tests, benchmarks).
inline bool stage_aliasing_inputs() {
  const char* env = std::getenv("SPAR_CPU_STAGE");
  if (env != nullptr && *env != '\0') return std::strcmp(env, "0") != 0;
  const int ways = l1d_ways();
  return ways <= 8;  // 0 (unknown) included
}

// The entry of variant `isa` among a twin's three instantiations of one function (each twin's
// dispatch names its own kernel and template arguments; this is the choice they share).
template <typename F>
inline F* by_isa(Isa isa, F* avx512, F* avx2, F* base) {
  return isa == Isa::Avx512 ? avx512 : isa == Isa::Avx2 ? avx2 : base;
}

}  // namespace cpu
}  // namespace spar
