// CPU twin of dwconv_glu: the loops in dwconv_glu_kernels.h, compiled for AVX-512, AVX2 and the
// build's baseline, the widest this CPU runs chosen at run time, each with its register width.
// fp32 accumulators, one rounding to the storage dtype.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the kernels' AVX2 / AVX-512 variants use a few intrinsics (conv_clamp)
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/cpu_rows.h"
#include "common/fast_math.h"
#include "dwconv_glu/api.h"

namespace spar {
namespace {

#define SPAR_ISA_KERNELS "dwconv_glu/dwconv_glu_kernels.h"
#include "common/isa_variants.inc"

}  // namespace

void dwconv_glu_cpu(uintptr_t x, int dtype, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sxb,
                    int64_t sxn, uintptr_t w, int64_t swc, int64_t swt, uintptr_t bias, uintptr_t out, int64_t sob,
                    int64_t son) {
  const cpu::Isa isa = cpu::cpu_isa();
  const bool stage = cpu::stage_aliasing_inputs();
  const int64_t out_bytes = B * H * W * C * int64_t(dtype == int(DType::F32) ? 4 : 2);
  // the kernels read the bias unconditionally: zeros when the conv has none
  std::vector<float> zeros(bias ? 0 : 2 * C, 0.0f);
  const float* bias2 = bias ? reinterpret_cast<const float*>(bias) : zeros.data();
#ifdef _OPENMP
  const int64_t threads = omp_get_max_threads();
#else
  const int64_t threads = 1;
#endif
  cpu::dispatch(dtype, "dwconv_glu", [&](auto tag) {
    using T = decltype(tag);
    auto* run = cpu::by_isa(isa, &avx512::dwconv_glu_run<16, T>, &avx2::dwconv_glu_run<8, T>,
                            &base::dwconv_glu_run<cpu::kBaseLanes, T>);
    run(reinterpret_cast<const T*>(x), B, H, W, C, sxb, sxn, reinterpret_cast<const float*>(w), swc, swt, bias2,
        reinterpret_cast<T*>(out), sob, son, threads, stage, cpu::stream_stores(out_bytes / threads));
  });
}

}  // namespace spar
