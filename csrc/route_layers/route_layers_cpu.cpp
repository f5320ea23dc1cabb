// CPU twin of route_layers.cu: the same per-row math (route_layers.h), output rows spread over
// OpenMP threads. Each thread accumulates the fp32 mixture of one row in a private buffer of D
// floats (L1/L2 resident), then computes the LayerNorm from it: one read of the K input rows,
// one write of the output row. Contiguous rows (stride_d == 1) take one 8-lane AVX2/F16C pass over
// the K rows that also sums the mixture (where the build targets AVX2; common/cpu_rows.h); any
// other stride_d the scalar loop.
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/cpu_rows.h"
#include "route_layers/api.h"
#include "route_layers/route_layers.h"

namespace spar {
namespace {

#ifdef SPAR_CPU_AVX2
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

#ifdef SPAR_CPU_AVX2
// m[d] = sum_k c_k x_k[d] over K contiguous rows in one pass (k = 0 first, then one fma per
// layer, as route::mix_fma), returning sum_d m[d] (two 8-lane accumulators, 16 elements a step,
// the rest in order). next[k] (null at the last row): the same layers' next output row,
// prefetched a line per step while this one streams in (rows of different layers live far apart,
// so the hardware prefetcher restarts on every row).
template <typename T>
float mix_rows_sum(float* m, const float* c, const T* const* x, int64_t K, int64_t D, const T* const* next) {
  __m256 vc[route::kMaxK];
  for (int64_t k = 0; k < K; ++k) vc[k] = _mm256_set1_ps(c[k]);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    if (next)
      for (int64_t k = 0; k < K; ++k) _mm_prefetch(reinterpret_cast<const char*>(next[k] + d), _MM_HINT_T0);
    __m256 v0 = _mm256_mul_ps(vc[0], load8(x[0] + d)), v1 = _mm256_mul_ps(vc[0], load8(x[0] + d + 8));
    for (int64_t k = 1; k < K; ++k) {
      v0 = _mm256_fmadd_ps(vc[k], load8(x[k] + d), v0);
      v1 = _mm256_fmadd_ps(vc[k], load8(x[k] + d + 8), v1);
    }
    _mm256_storeu_ps(m + d, v0);
    _mm256_storeu_ps(m + d + 8, v1);
    a0 = _mm256_add_ps(a0, v0);
    a1 = _mm256_add_ps(a1, v1);
  }
  float s = simd::hsum(_mm256_add_ps(a0, a1), 0.f);
  const int64_t d16 = d;
  if (d + 8 <= D) {
    __m256 v = _mm256_mul_ps(vc[0], load8(x[0] + d));
    for (int64_t k = 1; k < K; ++k) v = _mm256_fmadd_ps(vc[k], load8(x[k] + d), v);
    _mm256_storeu_ps(m + d, v);
    d += 8;
  }
  for (; d < D; ++d) {
    float v = c[0] * to_float(x[0][d]);
    for (int64_t k = 1; k < K; ++k) v = route::mix_fma(v, c[k], to_float(x[k][d]));
    m[d] = v;
  }
  for (d = d16; d < D; ++d) s += m[d];
  return s;
}
#endif

// The sum of (m[d] - mean) and of its squares over the row. With mean = RN(sum / D) from an fp32
// sum, the first is what that mean missed: the caller corrects the mean by it and the squares by its
// square (the corrected two-pass algorithm), so a row far from zero (an offset of 100 at D = 4096:
// 26x torch's error before) or a constant row (exactly the bias) comes out as with an exact mean.
struct Centered {
  float sum, sq;
};
inline Centered row_centered(const float* m, int64_t D, float mean) {
  int64_t d = 0;
  float s = 0.f, q = 0.f;
#ifdef SPAR_CPU_AVX2
  const __m256 vm = _mm256_set1_ps(mean);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; d + 16 <= D; d += 16) {
    const __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(m + d), vm);
    const __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(m + d + 8), vm);
    s0 = _mm256_add_ps(s0, t0);
    s1 = _mm256_add_ps(s1, t1);
    a0 = _mm256_fmadd_ps(t0, t0, a0);
    a1 = _mm256_fmadd_ps(t1, t1, a1);
  }
  s = simd::hsum(_mm256_add_ps(s0, s1), s);
  q = simd::hsum(_mm256_add_ps(a0, a1), q);
#endif
  for (; d < D; ++d) {
    const float t = m[d] - mean;
    s += t;
    q += t * t;
  }
  return Centered{s, q};
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

      // m = sum_k c_k * hidden[lid_k, r], and its sum for the mean
      float* m = acc.data();
      const T* xs[route::kMaxK];
      for (int64_t k = 0; k < K; ++k) xs[k] = hidden + lid[k] * stride_l + r * stride_n;
      float msum = 0.f;
#ifdef SPAR_CPU_AVX2
      if (stride_d == 1) {
        const T* nx[route::kMaxK];
        const int64_t rn = i + 1 < M ? (rows ? route::load_index(rows, rows64, i + 1) : i + 1) : -1;
        const bool prefetch = route::in_range(rn, N);
        for (int64_t k = 0; prefetch && k < K; ++k) nx[k] = hidden + lid[k] * stride_l + rn * stride_n;
        msum = mix_rows_sum(m, c, xs, K, D, prefetch ? nx : nullptr);
      } else
#endif
      {
        for (int64_t k = 0; k < K; ++k) {
          if (stride_d == 1) {
            axpy_row(m, c[k], xs[k], D, k == 0);
          } else {
            for (int64_t d = 0; d < D; ++d) {
              const float h = to_float(xs[k][d * stride_d]);
              m[d] = k == 0 ? c[k] * h : route::mix_fma(m[d], c[k], h);
            }
          }
        }
        for (int64_t d = 0; d < D; ++d) msum += m[d];
      }
      // LayerNorm: mean, then the centered sums (two passes over the L1-resident m), the mean and
      // the sum of squares corrected by what the first pass missed (row_centered)
      const float mean0 = route::ln_mean(msum, D);
      const Centered cs = row_centered(m, D, mean0);
      const float mean = mean0 + cs.sum / float(D);
      const float var = cs.sq - cs.sum * (cs.sum / float(D));
      const float rstd = route::ln_rstd(var < 0.f ? 0.f : var, D, eps);  // a NaN variance stays NaN (std::max drops it)
      int64_t d0 = 0;
#ifdef SPAR_CPU_AVX2
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
  cpu::dispatch(dtype, "route_layers", [&](auto t) {
    dispatch_param<decltype(t)>(hidden, L, N, D, stride_l, stride_n, stride_d, layer_ids, ids_int64, K, logits,
                                logits_dtype, logits_stride_n, logits_stride_k, alpha, alpha_dtype, ln_weight,
                                ln_bias, param_dtype, tau, eps, rows, rows_int64, M, out);
  });
}

}  // namespace spar
