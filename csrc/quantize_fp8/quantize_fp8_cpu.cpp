// CPU twin of quantize_fp8.cu: the same math (quantize_fp8.h), rows spread over OpenMP threads.
// The row loops live in quantize_fp8_kernels.h, compiled for AVX-512, AVX2 and the build's
// baseline (common/isa_variants.inc); the widest this CPU runs is chosen at run time
// (common/cpu_rows.h). Contiguous rows take 32 elements a step, bit-identical to the scalar encode
// of quantize_fp8.h (which handles the tails and rows with a NaN or infinite scale).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_rows.h"
#include "quantize_fp8/api.h"
#include "quantize_fp8/quantize_fp8.h"

namespace spar {
namespace {

using namespace spar::quant;
#define SPAR_ISA_KERNELS "quantize_fp8/quantize_fp8_kernels.h"
#include "common/isa_variants.inc"

template <typename T>
struct RowFns {
  float (*amax)(const T*, int64_t);
  void (*quantize)(const T*, float, uint8_t*, int64_t, const T*);
  float (*quantize_amax_next)(const T*, float, uint8_t*, int64_t, const T*, const T*);
};

template <typename T>
RowFns<T> row_fns() {
  switch (cpu::cpu_isa()) {
    case cpu::Isa::Avx512:
      return {avx512::row_amax<T>, avx512::quantize_row<T>, avx512::quantize_row_amax_next<T>};
    case cpu::Isa::Avx2: return {avx2::row_amax<T>, avx2::quantize_row<T>, avx2::quantize_row_amax_next<T>};
    default: return {base::row_amax<T>, base::quantize_row<T>, base::quantize_row_amax_next<T>};
  }
}

// Flush-to-zero and denormals-are-zero on the calling thread while alive (MXCSR, restored after).
// A subnormal operand or result costs a microcode assist of ~100 cycles; in the AVX-512 variant's
// Markstein division a tiny x makes the remainder x - q s subnormal, and one such element per 32
// made a call 40x slower. Codes do not change: a quotient that meets a subnormal anywhere (a
// subnormal x, remainder or quotient) is below 2^-100, far under e4m3's half-smallest 2^-10, and
// codes to a zero of x's sign either way (DAZ keeps the sign, so does FTZ).
struct FlushDenormals {
#if defined(__x86_64__)
  unsigned saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

// rows a per-token task takes in turn: each row's encode pass also takes the next row's amax, so
// only a task's first row has an amax pass of its own
constexpr int64_t kTokenRows = 16;

template <typename T>
void run(const T* x, int64_t rows, int64_t cols, int64_t row_stride, uint8_t* q, float* scales,
         bool per_token) {
  const RowFns<T> fn = row_fns<T>();
  float tensor_scale = 0.f;
  if (!per_token) {
    // per-thread maxima combined with amax_combine (OpenMP's max reduction drops NaN)
    float amax = 0.f;
#pragma omp parallel
    {
      float m = 0.f;
#pragma omp for schedule(static) nowait
      for (int64_t r = 0; r < rows; ++r) m = quant::amax_combine(m, fn.amax(x + r * row_stride, cols));
#pragma omp critical
      amax = quant::amax_combine(amax, m);
    }
    tensor_scale = quant::scale_from_amax(amax);
    scales[0] = tensor_scale;
  }
  if (!per_token) {
#pragma omp parallel
    {
      const FlushDenormals ftz;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r)
        fn.quantize(x + r * row_stride, tensor_scale, q + r * cols, cols, r + 1 < rows ? x + (r + 1) * row_stride : nullptr);
    }
    return;
  }
  const int64_t tasks = (rows + kTokenRows - 1) / kTokenRows;
#pragma omp parallel
  {
  const FlushDenormals ftz;
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t lo = t * kTokenRows, hi = std::min(rows, lo + kTokenRows);
    float amax = fn.amax(x + lo * row_stride, cols);
    for (int64_t r = lo; r < hi; ++r) {
      const T* xr = x + r * row_stride;
      const float scale = quant::scale_from_amax(amax);
      scales[r] = scale;
      // prefetch one row beyond the rows this step reads (the next task's first row, which the
      // same thread takes next under a static schedule, when this is the task's last row)
      const T* ahead = r + 2 < rows ? xr + 2 * row_stride : nullptr;
      if (r + 1 < hi) {
        amax = fn.quantize_amax_next(xr, scale, q + r * cols, cols, xr + row_stride, ahead);
      } else {
        fn.quantize(xr, scale, q + r * cols, cols, r + 1 < rows ? xr + row_stride : nullptr);
      }
    }
  }
  }  // omp parallel
}

}  // namespace

void quantize_fp8_cpu(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                      uintptr_t q, uintptr_t scales, bool per_token) {
  auto* qp = reinterpret_cast<uint8_t*>(q);
  auto* sp = reinterpret_cast<float*>(scales);
  switch (static_cast<DType>(dtype)) {
    case DType::F32: return run(reinterpret_cast<const float*>(x), rows, cols, row_stride, qp, sp, per_token);
    case DType::F16: return run(reinterpret_cast<const f16_t*>(x), rows, cols, row_stride, qp, sp, per_token);
    case DType::BF16: return run(reinterpret_cast<const bf16_t*>(x), rows, cols, row_stride, qp, sp, per_token);
    default: throw std::invalid_argument("quantize_fp8: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace spar
