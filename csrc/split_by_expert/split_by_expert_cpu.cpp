// CPU path of split_by_expert with the per-expert RMSNorm fused (the GPU path is the Triton
// kernel in spar_kernels/split_by_expert.py): row j of the output is token perm[j] normalized with
// its expert's weight, one read of the token row and one write, rows spread over OpenMP threads.
//   y = x * rsqrt(sum(x^2) / D + eps) * w[expert]     (fp32, one rounding; as the Triton kernel)
#include <cmath>
#include <stdexcept>
#include <string>

#include "split_by_expert/api.h"
#include "route_layers/cpu_simd.h"
#include "route_layers/route_layers.h"

namespace spar {
namespace {

template <typename T>
float sum_sq(const T* x, int64_t D, int64_t sd) {
  int64_t d = 0;
  float s = 0.f;
#ifdef SPAR_ROUTE_AVX2
  if (sd == 1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; d + 16 <= D; d += 16) {
      const __m256 v0 = simd::load8(x + d), v1 = simd::load8(x + d + 8);
      a0 = _mm256_fmadd_ps(v0, v0, a0);
      a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
    for (float v : lanes) s += v;
  }
#endif
  for (; d < D; ++d) {
    const float h = to_float(x[d * sd]);
    s += h * h;
  }
  return s;
}

template <typename T, typename P>
void run(const T* x, int64_t N, int64_t D, int64_t sn, int64_t sd, const int64_t* perm, const void* ids, bool ids64,
         const P* w, int64_t E, int64_t ws, float eps, T* out) {
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < N; ++j) {
    const int64_t src = perm[j];
    T* o = out + j * D;
    if (!route::in_range(src, N)) {
      for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(NAN);
      continue;
    }
    int64_t e = route::load_index(ids, ids64, src);
    e = e < 0 ? 0 : (e >= E ? E - 1 : e);  // never read outside the weight table (as the kernel)
    const T* xr = x + src * sn;
    const P* wr = w + e * ws;
    const float rstd = 1.0f / sqrtf(sum_sq(xr, D, sd) / float(D) + eps);
    int64_t d = 0;
#ifdef SPAR_ROUTE_AVX2
    if (sd == 1) {
      const __m256 vr = _mm256_set1_ps(rstd);
      for (; d + 8 <= D; d += 8)
        simd::store8(o + d, _mm256_mul_ps(_mm256_mul_ps(simd::load8(xr + d), vr), simd::load8(wr + d)));
    }
#endif
    for (; d < D; ++d) o[d] = from_float<T>(to_float(xr[d * sd]) * rstd * to_float(wr[d]));
  }
}

template <typename T>
void dispatch_w(uintptr_t x, int64_t N, int64_t D, int64_t sn, int64_t sd, uintptr_t perm, uintptr_t ids, bool ids64,
                uintptr_t w, int wdtype, int64_t E, int64_t ws, float eps, uintptr_t out) {
  auto* xp = reinterpret_cast<const T*>(x);
  auto* pp = reinterpret_cast<const int64_t*>(perm);
  auto* ip = reinterpret_cast<const void*>(ids);
  auto* op = reinterpret_cast<T*>(out);
  if (static_cast<DType>(wdtype) == DType::F32)
    run(xp, N, D, sn, sd, pp, ip, ids64, reinterpret_cast<const float*>(w), E, ws, eps, op);
  else
    run(xp, N, D, sn, sd, pp, ip, ids64, reinterpret_cast<const T*>(w), E, ws, eps, op);
}

}  // namespace

void split_by_expert_cpu(uintptr_t x, int dtype, int64_t N, int64_t D, int64_t stride_n, int64_t stride_d,
                         uintptr_t perm, uintptr_t expert_ids, bool ids_int64, uintptr_t weights, int weight_dtype,
                         int64_t E, int64_t weight_stride, float eps, uintptr_t out) {
  if (E < 1) throw std::invalid_argument("split_by_expert: E must be >= 1");
  if (weight_dtype != dtype && static_cast<DType>(weight_dtype) != DType::F32)
    throw std::invalid_argument("split_by_expert: weight_dtype must be x's dtype or float32");
  switch (static_cast<DType>(dtype)) {
    case DType::F32:
      return dispatch_w<float>(x, N, D, stride_n, stride_d, perm, expert_ids, ids_int64, weights, weight_dtype, E,
                               weight_stride, eps, out);
    case DType::F16:
      return dispatch_w<f16_t>(x, N, D, stride_n, stride_d, perm, expert_ids, ids_int64, weights, weight_dtype, E,
                               weight_stride, eps, out);
    case DType::BF16:
      return dispatch_w<bf16_t>(x, N, D, stride_n, stride_d, perm, expert_ids, ids_int64, weights, weight_dtype, E,
                                weight_stride, eps, out);
    default: throw std::invalid_argument("split_by_expert: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace spar
