// CPU twin of adaln_layernorm and gated_residual: the loops in adaln_kernels.h, compiled for
// AVX-512, AVX2 and the build's baseline, the widest this CPU runs chosen at run time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "adaln/api.h"
#include "common/cpu_rows.h"

namespace spar {
namespace {

#define SPAR_ISA_KERNELS "adaln/adaln_kernels.h"
#include "common/isa_variants.inc"

}  // namespace

void adaln_layernorm_cpu(uintptr_t x, int dtype, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn,
                         int64_t sxc, uintptr_t shift, int64_t shb, uintptr_t scale, int64_t scb, uintptr_t y,
                         int64_t syb, int64_t syn, int64_t syc, double eps) {
  cpu::dispatch(dtype, "adaln_layernorm", [&](auto tag) {
    using T = decltype(tag);
    auto* run = cpu::by_isa(cpu::cpu_isa(), &avx512::adaln_run<T>, &avx2::adaln_run<T>, &base::adaln_run<T>);
    run(reinterpret_cast<const T*>(x), B, N, C, sxb, sxn, sxc, reinterpret_cast<const float*>(shift), shb,
        reinterpret_cast<const float*>(scale), scb, reinterpret_cast<T*>(y), syb, syn, syc, float(eps));
  });
}

void gated_residual_cpu(uintptr_t x, int dtype, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn,
                        int64_t sxc, uintptr_t y, int64_t syb, int64_t syn, int64_t syc, uintptr_t gate,
                        int64_t gsb, uintptr_t out, int64_t sob, int64_t son, int64_t soc) {
  cpu::dispatch(dtype, "gated_residual", [&](auto tag) {
    using T = decltype(tag);
    auto* run = cpu::by_isa(cpu::cpu_isa(), &avx512::gated_run<T>, &avx2::gated_run<T>, &base::gated_run<T>);
    run(reinterpret_cast<const T*>(x), B, N, C, sxb, sxn, sxc, reinterpret_cast<const T*>(y), syb, syn, syc,
        reinterpret_cast<const float*>(gate), gsb, reinterpret_cast<T*>(out), sob, son, soc);
  });
}

}  // namespace spar
