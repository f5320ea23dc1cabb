// CPU twin of adaln_layernorm and gated_residual: rows spread over OpenMP threads, fp32 math in
// per-thread buffers (vectorized by the compiler), one rounding to the storage dtype.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "adaln/api.h"
#include "common/cpu_rows.h"

namespace spar {
namespace {

using cpu::dispatch;
using cpu::load_row;
using cpu::store_row;

template <typename T>
void adaln_run(const T* x, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn, const float* shift,
               const float* scale1, T* y, int64_t syb, int64_t syn, float eps) {
#pragma omp parallel
  {
    std::vector<float> buf(C);
    float* h = buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * N; ++r) {
      const int64_t b = r / N, n = r % N;
      load_row(x + b * sxb + n * sxn, h, C);
      // fp64 sums (still vectorized): a long fp32 running sum would lose ~log2(C) bits
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += h[c];
      const float mean = float(sum / double(C));
      double sq = 0.0;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < C; ++c) {
        const float d = h[c] - mean;
        sq += double(d * d);
      }
      const float rstd = float(1.0 / std::sqrt(sq / double(C) + double(eps)));
      const float* sh = shift + b * C;
      const float* sc = scale1 + b * C;
      for (int64_t c = 0; c < C; ++c) h[c] = (h[c] - mean) * rstd * sc[c] + sh[c];
      store_row(h, y + b * syb + n * syn, C);
    }
  }
}

template <typename T>
void gated_run(const T* x, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn, const T* y, int64_t syb,
               int64_t syn, const float* gate, T* out, int64_t sob, int64_t son) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < B * N; ++r) {
    const int64_t b = r / N, n = r % N;
    const T* xr = x + b * sxb + n * sxn;
    const T* yr = y + b * syb + n * syn;
    T* o = out + b * sob + n * son;
    const float* g = gate + b * C;
    for (int64_t c = 0; c < C; ++c) o[c] = from_float<T>(to_float(xr[c]) + g[c] * to_float(yr[c]));
  }
}

}  // namespace

void adaln_layernorm_cpu(uintptr_t x, int dtype, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn,
                         uintptr_t shift, uintptr_t scale1, uintptr_t y, int64_t syb, int64_t syn, double eps) {
  dispatch(dtype, "adaln_layernorm", [&](auto tag) {
    using T = decltype(tag);
    adaln_run(reinterpret_cast<const T*>(x), B, N, C, sxb, sxn, reinterpret_cast<const float*>(shift),
              reinterpret_cast<const float*>(scale1), reinterpret_cast<T*>(y), syb, syn, float(eps));
  });
}

void gated_residual_cpu(uintptr_t x, int dtype, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn,
                        uintptr_t y, int64_t syb, int64_t syn, uintptr_t gate, uintptr_t out, int64_t sob,
                        int64_t son) {
  dispatch(dtype, "gated_residual", [&](auto tag) {
    using T = decltype(tag);
    gated_run(reinterpret_cast<const T*>(x), B, N, C, sxb, sxn, reinterpret_cast<const T*>(y), syb, syn,
              reinterpret_cast<const float*>(gate), reinterpret_cast<T*>(out), sob, son);
  });
}

}  // namespace spar
