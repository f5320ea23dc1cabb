// CPU twin of linear_attention for head dims 16 / 32 / 64 (other head dims run as batched BLAS
// matmuls from PyTorch): the loops in linear_attention_kernels.h, compiled for AVX-512, AVX2 and
// the build's baseline, the widest this CPU runs chosen at run time; fp32 throughout.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cpu_rows.h"
#include "common/fast_math.h"
#include "linear_attention/api.h"

namespace spar {
namespace {

#define SPAR_ISA_KERNELS "linear_attention/linear_attention_kernels.h"
#include "common/isa_variants.inc"

// the accumulators the build's own registers hold (the base variant): 16 of 32 zmm, 8 of 16 ymm
// or 8 of 16 xmm
constexpr int kBaseAccFloats = cpu::kBaseLanes == 16 ? 256 : 8 * cpu::kBaseLanes;

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
      auto* fn = isa == cpu::Isa::Avx512 ? &avx512::linear_attention_run<T, HD, 256>
                 : isa == cpu::Isa::Avx2 ? &avx2::linear_attention_run<T, HD, 64>
                                         : &base::linear_attention_run<T, HD, kBaseAccFloats>;
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
