// CPU twin of linear_attention for head dims 16 / 32 / 64 (other head dims run as batched BLAS
// matmuls from PyTorch): the loops in linear_attention_kernels.h (staged chunks, register-blocked
// micro-kernels), compiled for AVX-512, AVX2 and the build's baseline, the widest this CPU runs
// chosen at run time; fp32 throughout.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>  // the AVX2 / AVX-512 variants' intrinsics, whatever the build's -march
#endif

#include "common/cpu_rows.h"
#include "common/fast_math.h"
#include "linear_attention/api.h"

namespace spar {
namespace {

#define SPAR_ISA_KERNELS "linear_attention/linear_attention_kernels.h"
#include "common/isa_variants.inc"

}  // namespace

bool linear_attention_cpu(uintptr_t q, uintptr_t k, uintptr_t v, int dtype, int64_t B, int64_t Nq, int64_t Nk,
                          int64_t H, int64_t D, int64_t sqb, int64_t sqn, int64_t sqh, int64_t skb, int64_t skn,
                          int64_t skh, int64_t svb, int64_t svn, int64_t svh, uintptr_t out, int64_t sob,
                          int64_t son, int64_t soh, double eps) {
  bool done = false;
  const cpu::Isa isa = cpu::cpu_isa();
  cpu::dispatch(dtype, "linear_attention", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto hd) {
      constexpr int HD = decltype(hd)::value;
      // the fp32 lanes of each variant's vectors (the base variant: the build's own)
      auto* fn = cpu::by_isa(isa, &avx512::linear_attention_run<T, HD, 16>, &avx2::linear_attention_run<T, HD, 8>,
                             &base::linear_attention_run<T, HD, cpu::kBaseLanes>);
      fn(reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v), B, Nq, Nk,
          H, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, reinterpret_cast<T*>(out), sob, son, soh, float(eps));
      done = true;
    };
    if (D == 16) run(std::integral_constant<int, 16>{});
    else if (D == 32) run(std::integral_constant<int, 32>{});
    else if (D == 64) run(std::integral_constant<int, 64>{});
  });
  return done;
}

}  // namespace spar
