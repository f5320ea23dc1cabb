// CPU twin of the rms_norm Triton kernel (spar_kernels/rms_norm.py): one read of x (and the
// residual), one write of y (and the sum), rows spread over OpenMP threads. Contiguous rows take
// 8-wide AVX2/F16C loops (common/cpu_rows.h) with two accumulators for the sum of
// squares; column-major rows go in tiles copied contiguous first (run_tiles); any other element
// stride the scalar loop (accumulating in double: a serial fp32 sum of thousands of squares
// drifts by several ulp). The same math as the kernel:
//   s = round(x + r);  rstd = 1 / sqrt(sum(s^2) / D + eps);  y = round(s * rstd * w)
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "rms_norm/api.h"
#include "common/cpu_rows.h"

namespace spar {
namespace {

// o[d] = round(x[d] + r[d]) (o contiguous); returns the sum of squares of the rounded values
template <typename T>
float add_store_sum_sq(const T* x, int64_t sxd, const T* r, int64_t srd, T* o, int64_t D) {
  int64_t d = 0;
  double s = 0.0;
#ifdef SPAR_CPU_AVX2
  if (sxd == 1 && srd == 1) {
    __m256 a0 = _mm256_setzero_ps();
    for (; d + 8 <= D; d += 8) {
      simd::store8(o + d, _mm256_add_ps(simd::load8(x + d), simd::load8(r + d)));
      const __m256 v = simd::load8(o + d);  // the rounded sum is what gets normalized
      a0 = _mm256_fmadd_ps(v, v, a0);
    }
    s = simd::hsum(a0, s);
  }
#endif
  for (; d < D; ++d) {
    o[d] = from_float<T>(to_float(x[d * sxd]) + to_float(r[d * srd]));
    const double h = to_float(o[d]);
    s += h * h;
  }
  return float(s);
}

// Rows closer together than their elements (a column-major [rows, D], e.g. the transpose of a
// [D, rows] tensor), without a residual: kTile rows at a time, copied element block by element
// block (a block's elements hold adjacent rows, one cache line), then normalized as contiguous
// rows (the contiguous path's math: results equal a contiguous x's). Row by row, each row's D
// elements lie on D lines only the next rows reuse; at 1024 rows (a 4 KiB element stride, one page
// per element) they came from memory for every row: 17 ns an element against eager's 10.
constexpr int64_t kTile = 16;

template <typename T, typename P>
void run_tiles(const T* x, int64_t rows, int64_t D, int64_t sxr, int64_t sxd, const P* w, float eps, T* y) {
  const int64_t tiles = (rows + kTile - 1) / kTile;
#pragma omp parallel
  {
    std::vector<T> buf(size_t(kTile * D));
#pragma omp for schedule(static)
    for (int64_t it = 0; it < tiles; ++it) {
      const int64_t i0 = it * kTile, m = std::min(kTile, rows - i0);
      const T* xt = x + i0 * sxr;
      for (int64_t d0 = 0; d0 < D; d0 += 8)
        for (int64_t t = 0; t < m; ++t)
          for (int64_t d = d0; d < std::min(D, d0 + 8); ++d) buf[t * D + d] = xt[d * sxd + t * sxr];
      for (int64_t t = 0; t < m; ++t) {
        const T* row = buf.data() + t * D;
        const float rstd = 1.0f / sqrtf(cpu::sum_sq(row, D, 1) / float(D) + eps);
        cpu::scale_row(row, 1, w, rstd, y + (i0 + t) * D, D);
      }
    }
  }
}

template <typename T, typename P>
void run(const T* x, int64_t rows, int64_t D, int64_t sxr, int64_t sxd, const T* r, int64_t srr, int64_t srd,
         const P* w, float eps, T* y, T* s) {
  if (!r && sxd != 1 && std::abs(sxr) < std::abs(sxd)) return run_tiles(x, rows, D, sxr, sxd, w, eps, y);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const T* src = x + i * sxr;
    int64_t sd = sxd;
    float ss;
    if (r) {
      T* si = s + i * D;
      ss = add_store_sum_sq(src, sxd, r + i * srr, srd, si, D);
      src = si;
      sd = 1;
    } else {
      ss = cpu::sum_sq(src, D, sd);
    }
    const float rstd = 1.0f / sqrtf(ss / float(D) + eps);
    cpu::scale_row(src, sd, w, rstd, y + i * D, D);
  }
}

template <typename T>
void dispatch_w(uintptr_t x, int64_t rows, int64_t D, int64_t sxr, int64_t sxd, uintptr_t r, int64_t srr,
                int64_t srd, uintptr_t w, int wdtype, float eps, uintptr_t y, uintptr_t s) {
  auto* xp = reinterpret_cast<const T*>(x);
  auto* rp = reinterpret_cast<const T*>(r);
  auto* yp = reinterpret_cast<T*>(y);
  auto* sp = reinterpret_cast<T*>(s);
  if (static_cast<DType>(wdtype) == DType::F32)
    run(xp, rows, D, sxr, sxd, rp, srr, srd, reinterpret_cast<const float*>(w), eps, yp, sp);
  else
    run(xp, rows, D, sxr, sxd, rp, srr, srd, reinterpret_cast<const T*>(w), eps, yp, sp);
}

}  // namespace

void rms_norm_cpu(uintptr_t x, int dtype, int64_t rows, int64_t D, int64_t x_row_stride, int64_t x_d_stride,
                  uintptr_t residual, int64_t r_row_stride, int64_t r_d_stride, uintptr_t weight, int weight_dtype,
                  float eps, uintptr_t out, uintptr_t residual_out) {
  if (weight_dtype != dtype && static_cast<DType>(weight_dtype) != DType::F32)
    throw std::invalid_argument("rms_norm: weight_dtype must be x's dtype or float32");
  if (residual && !residual_out) throw std::invalid_argument("rms_norm: a residual needs residual_out");
  cpu::dispatch(dtype, "rms_norm", [&](auto t) {
    dispatch_w<decltype(t)>(x, rows, D, x_row_stride, x_d_stride, residual, r_row_stride, r_d_stride, weight,
                            weight_dtype, eps, out, residual_out);
  });
}

}  // namespace spar
