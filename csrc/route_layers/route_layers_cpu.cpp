// CPU twin of route_layers.cu: the same per-row math (route_layers.h), output rows spread over
// OpenMP threads. Each thread accumulates the fp32 mixture of one row in a private buffer of D
// floats (L1/L2 resident), then computes the LayerNorm from it: one read of the K input rows,
// one write of the output row. Contiguous rows (stride_d == 1) take a loop the compiler
// vectorizes (AVX2/F16C conversions where the build has them); any other stride_d the scalar loop.
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "route_layers/api.h"
#include "route_layers/cpu_simd.h"
#include "route_layers/route_layers.h"

namespace spar {
namespace {

#ifdef SPAR_ROUTE_AVX2
using simd::load8;
using simd::store8;
#endif

// acc[d] (+)= c * x[d] for a contiguous row, in fp32.
template <typename T>
inline void axpy_row(float* acc, float c, const T* x, int64_t D, bool first) {
  for (int64_t d = 0; d < D; ++d) {
    const float h = to_float(x[d]);
    acc[d] = first ? c * h : route::mix_fma(acc[d], c, h);
  }
}

#ifdef SPAR_ROUTE_AVX2
// `next` (may be null): the same layer's next output row, prefetched while this one streams in
// (rows of different layers live far apart, so the hardware prefetcher restarts on every row).
template <typename T>
inline void axpy_row_avx2(float* acc, float c, const T* x, int64_t D, bool first, const T* next) {
  const __m256 vc = _mm256_set1_ps(c);
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  if (next)
    for (int64_t d = 0; d < D; d += kLine) _mm_prefetch(reinterpret_cast<const char*>(next + d), _MM_HINT_T0);
  int64_t d = 0;
  if (first) {
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(acc + d, _mm256_mul_ps(vc, load8(x + d)));
  } else {
    for (; d + 8 <= D; d += 8)
      _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(vc, load8(x + d), _mm256_loadu_ps(acc + d)));
  }
  for (; d < D; ++d) {
    const float h = to_float(x[d]);
    acc[d] = first ? c * h : route::mix_fma(acc[d], c, h);
  }
}
#endif

// Sums over the fp32 row buffer. A plain `s += m[d]` loop is one serial add chain (the compiler
// may not reorder fp adds), ~4 cycles per element: vector accumulators make it ~16x cheaper.
inline float row_sum(const float* m, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
#ifdef SPAR_ROUTE_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; d + 16 <= D; d += 16) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(m + d));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(m + d + 8));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  for (float v : lanes) s += v;
#endif
  for (; d < D; ++d) s += m[d];
  return s;
}

inline float row_centered_sq(const float* m, int64_t D, float mean) {
  int64_t d = 0;
  float s = 0.f;
#ifdef SPAR_ROUTE_AVX2
  const __m256 vm = _mm256_set1_ps(mean);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; d + 16 <= D; d += 16) {
    const __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(m + d), vm);
    const __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(m + d + 8), vm);
    a0 = _mm256_fmadd_ps(t0, t0, a0);
    a1 = _mm256_fmadd_ps(t1, t1, a1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  for (float v : lanes) s += v;
#endif
  for (; d < D; ++d) {
    const float t = m[d] - mean;
    s += t * t;
  }
  return s;
}

template <typename T, typename P>
void run(const T* hidden, int64_t L, int64_t N, int64_t D, int64_t stride_l, int64_t stride_n, int64_t stride_d,
         const void* layer_ids, bool ids64, int64_t K, const void* logits, int logits_dtype, int64_t lsn,
         int64_t lsk, const void* alpha, int adt, const P* w, const P* b, float tau, float eps, const void* rows,
         bool rows64, int64_t M, T* out) {
  // Layer ids are the same for every row: resolve them once.
  int64_t lid[route::kMaxK];
  bool ids_ok = true;
  for (int64_t k = 0; k < K; ++k) {
    lid[k] = route::load_index(layer_ids, ids64, k);
    ids_ok = ids_ok && route::in_range(lid[k], L);
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();

#pragma omp parallel
  {
    std::vector<float> acc(size_t(D > 0 ? D : 1));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      T* o = out + i * D;
      const int64_t r = rows ? route::load_index(rows, rows64, i) : i;
      if (!ids_ok || !route::in_range(r, N)) {
        for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(nan);
        continue;
      }
      // softmax(logits[r] / tau) * alpha
      float v[route::kMaxK], c[route::kMaxK];
      float vmax = -INFINITY;
      for (int64_t k = 0; k < K; ++k) {
        v[k] = route::tempered(route::load_float(logits, logits_dtype, r * lsn + k * lsk), tau);
        vmax = fmaxf(vmax, v[k]);
      }
      float esum = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        c[k] = route::shifted_exp(v[k], vmax);
        esum += c[k];
      }
      for (int64_t k = 0; k < K; ++k) c[k] = route::mix_coeff(c[k], esum, route::load_float(alpha, adt, k));

      // m = sum_k c_k * hidden[lid_k, r]
      float* m = acc.data();
      for (int64_t k = 0; k < K; ++k) {
        const T* x = hidden + lid[k] * stride_l + r * stride_n;
        if (stride_d == 1) {
#ifdef SPAR_ROUTE_AVX2
          const T* next = nullptr;
          if (i + 1 < M) {
            const int64_t rn = rows ? route::load_index(rows, rows64, i + 1) : i + 1;
            if (route::in_range(rn, N)) next = hidden + lid[k] * stride_l + rn * stride_n;
          }
          axpy_row_avx2(m, c[k], x, D, k == 0, next);
#else
          axpy_row(m, c[k], x, D, k == 0);
#endif
        } else {
          for (int64_t d = 0; d < D; ++d) {
            const float h = to_float(x[d * stride_d]);
            m[d] = k == 0 ? c[k] * h : route::mix_fma(m[d], c[k], h);
          }
        }
      }
      // LayerNorm: mean, then the centered sum of squares (two passes over the L1-resident m)
      const float mean = route::ln_mean(row_sum(m, D), D);
      const float sq = row_centered_sq(m, D, mean);
      const float rstd = route::ln_rstd(sq, D, eps);
      int64_t d0 = 0;
#ifdef SPAR_ROUTE_AVX2
      {
        if (w && b) {
          // vector affine for float/f16 outputs; the same expression as route::ln_apply
          const __m256 vmean = _mm256_set1_ps(mean), vrstd = _mm256_set1_ps(rstd);
          for (; d0 + 8 <= D; d0 += 8) {
            const __m256 y = _mm256_add_ps(
                _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(m + d0), vmean), vrstd), load8(w + d0)),
                load8(b + d0));
            store8(o + d0, y);
          }
        }
      }
#endif
      for (int64_t d = d0; d < D; ++d) {
        const float wd = w ? to_float(w[d]) : 1.f;
        const float bd = b ? to_float(b[d]) : 0.f;
        o[d] = from_float<T>(route::ln_apply(m[d], mean, rstd, wd, bd));
      }
    }
  }
}

template <typename T>
void dispatch_param(uintptr_t hidden, int64_t L, int64_t N, int64_t D, int64_t sl, int64_t sn, int64_t sd,
                    uintptr_t ids, bool ids64, int64_t K, uintptr_t logits, int ldt, int64_t lsn, int64_t lsk,
                    uintptr_t alpha, int adt, uintptr_t w, uintptr_t b, int pdt, float tau, float eps, uintptr_t rows,
                    bool rows64, int64_t M, uintptr_t out) {
  auto* h = reinterpret_cast<const T*>(hidden);
  auto* o = reinterpret_cast<T*>(out);
  auto* a = reinterpret_cast<const void*>(alpha);
  auto* ip = reinterpret_cast<const void*>(ids);
  auto* lp = reinterpret_cast<const void*>(logits);
  auto* rp = reinterpret_cast<const void*>(rows);
  if (static_cast<DType>(pdt) == DType::F32)
    run<T, float>(h, L, N, D, sl, sn, sd, ip, ids64, K, lp, ldt, lsn, lsk, a, adt, reinterpret_cast<const float*>(w),
                  reinterpret_cast<const float*>(b), tau, eps, rp, rows64, M, o);
  else
    run<T, T>(h, L, N, D, sl, sn, sd, ip, ids64, K, lp, ldt, lsn, lsk, a, adt, reinterpret_cast<const T*>(w),
              reinterpret_cast<const T*>(b), tau, eps, rp, rows64, M, o);
}

}  // namespace

void route_layers_cpu(uintptr_t hidden, int dtype, int64_t L, int64_t N, int64_t D, int64_t stride_l,
                      int64_t stride_n, int64_t stride_d, uintptr_t layer_ids, bool ids_int64, int64_t K,
                      uintptr_t logits, int logits_dtype, int64_t logits_stride_n, int64_t logits_stride_k,
                      uintptr_t alpha, int alpha_dtype, uintptr_t ln_weight, uintptr_t ln_bias, int param_dtype,
                      float tau, float eps, uintptr_t rows, bool rows_int64, int64_t M, uintptr_t out) {
  if (K < 1 || K > route::kMaxK) throw std::invalid_argument("route_layers: K must be in [1, 16], got " + std::to_string(K));
  if (param_dtype != dtype && static_cast<DType>(param_dtype) != DType::F32)
    throw std::invalid_argument("route_layers: param_dtype must be hidden's dtype or float32");
#define SPAR_ROUTE_ARGS                                                                                     \
  hidden, L, N, D, stride_l, stride_n, stride_d, layer_ids, ids_int64, K, logits, logits_dtype, logits_stride_n, \
      logits_stride_k, alpha, alpha_dtype, ln_weight, ln_bias, param_dtype, tau, eps, rows, rows_int64, M, out
  switch (static_cast<DType>(dtype)) {
    case DType::F32: return dispatch_param<float>(SPAR_ROUTE_ARGS);
    case DType::F16: return dispatch_param<f16_t>(SPAR_ROUTE_ARGS);
    case DType::BF16: return dispatch_param<bf16_t>(SPAR_ROUTE_ARGS);
    default: throw std::invalid_argument("route_layers: unsupported dtype code " + std::to_string(dtype));
  }
#undef SPAR_ROUTE_ARGS
}

}  // namespace spar
