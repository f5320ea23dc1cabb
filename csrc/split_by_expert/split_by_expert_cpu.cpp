// CPU path of split_by_expert with the per-expert RMSNorm fused (the GPU path is the Triton
// kernel in spar_kernels/split_by_expert.py): row j of the output is token perm[j] normalized with
// its expert's weight, one read of the token row and one write, rows spread over OpenMP threads.
//   y = x * rsqrt(sum(x^2) / D + eps) * w[expert]     (fp32, one rounding; as the Triton kernel)
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/cpu_rows.h"
#include "split_by_expert/api.h"
#include "route_layers/route_layers.h"

namespace spar {
namespace {

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
    const float rstd = 1.0f / sqrtf(cpu::sum_sq(xr, D, sd) / float(D) + eps);
    cpu::scale_row(xr, sd, wr, rstd, o, D);
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
  cpu::dispatch(dtype, "split_by_expert", [&](auto t) {
    dispatch_w<decltype(t)>(x, N, D, stride_n, stride_d, perm, expert_ids, ids_int64, weights, weight_dtype, E,
                            weight_stride, eps, out);
  });
}

}  // namespace spar
