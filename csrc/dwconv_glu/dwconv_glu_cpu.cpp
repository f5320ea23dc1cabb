// CPU twin of dwconv_glu: the loops in dwconv_glu_kernels.h, compiled for AVX-512, AVX2 and the
// build's baseline, the widest this CPU runs chosen at run time. fp32 accumulators, one rounding
// to the storage dtype.
#include <cstdint>
#include <type_traits>

#include "common/cpu_rows.h"
#include "common/fast_math.h"
#include "dwconv_glu/api.h"

namespace spar {
namespace {

#define SPAR_ISA_KERNELS "dwconv_glu/dwconv_glu_kernels.h"
#include "common/isa_variants.inc"

}  // namespace

void dwconv_glu_cpu(uintptr_t x, int dtype, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sxb,
                    int64_t sxn, uintptr_t w9, uintptr_t bias, uintptr_t out, int64_t sob, int64_t son) {
  const cpu::Isa isa = cpu::cpu_isa();
  cpu::dispatch(dtype, "dwconv_glu", [&](auto tag) {
    using T = decltype(tag);
    auto* run = isa == cpu::Isa::Avx512 ? &avx512::dwconv_glu_run<T>
                : isa == cpu::Isa::Avx2 ? &avx2::dwconv_glu_run<T> : &base::dwconv_glu_run<T>;
    run(reinterpret_cast<const T*>(x), B, H, W, C, sxb, sxn, reinterpret_cast<const float*>(w9),
        reinterpret_cast<const float*>(bias), reinterpret_cast<T*>(out), sob, son);
  });
}

}  // namespace spar
