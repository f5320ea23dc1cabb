// CPU twin of flow_sampler.cu: the same per-element math (flow_sampler.h). The loops live in
// flow_sampler_kernels.h, compiled for AVX-512, AVX2 and the build's baseline; the widest this
// CPU runs is chosen at run time (common/cpu_rows.h). Rows of the [B, P, Q] view spread over
// OpenMP threads only above kParallelMin elements. Sums of squares: fp32 vectorized partials
// within a chunk of a row, fp64 across chunks and rows, in a fixed order (the CUDA kernel uses
// fixed-order fp32 trees); both round the factor to fp32.
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cpu_rows.h"
#include "flow_sampler/api.h"
#include "flow_sampler/flow_sampler.h"

namespace spar {
namespace {

#define SPAR_ISA_KERNELS "flow_sampler/flow_sampler_kernels.h"
#include "common/isa_variants.inc"

// Below this many elements (or with one OpenMP thread) a step runs inline, outside any parallel
// region: waking the OpenMP team costs more.
constexpr int64_t kParallelMin = int64_t(1) << 16;

template <typename TX, typename TV>
void launch(cpu::Isa isa, int64_t B, int64_t P, int64_t Q, uintptr_t x, const int64_t* sx, uintptr_t vc,
            const int64_t* sc, uintptr_t vu, const int64_t* su, uintptr_t vi, const int64_t* si, uintptr_t out,
            uintptr_t h1, uintptr_t h2, const flow::Row& r, int mode, float lo) {
#ifdef _OPENMP
  const bool par = B * P * Q >= kParallelMin && omp_get_max_threads() > 1;
#else
  const bool par = false;
#endif
  auto args = [&](auto tag) {
    using R = decltype(tag);
    return R{reinterpret_cast<const TX*>(x), sx[0], sx[1], sx[2], reinterpret_cast<const TV*>(vc),
             reinterpret_cast<const TV*>(vu), reinterpret_cast<const TV*>(vi), sc[0], sc[1], sc[2], su[0], su[1],
             su[2], si[0], si[1], si[2], reinterpret_cast<TX*>(out), reinterpret_cast<float*>(h1),
             reinterpret_cast<float*>(h2), B, P, Q};
  };
  if (isa == cpu::Isa::Avx512) return avx512::run(args(avx512::Rows<TX, TV>{}), r, mode, lo, par);
  if (isa == cpu::Isa::Avx2) return avx2::run(args(avx2::Rows<TX, TV>{}), r, mode, lo, par);
  base::run(args(base::Rows<TX, TV>{}), r, mode, lo, par);
}

}  // namespace

void flow_sampler_step_cpu(SPAR_FLOW_SAMPLER_STEP_PARAMS) {  // the parameters: flow_sampler/api.h
  (void)stats;  // the CPU twin keeps its sums on the stack
  if (renorm_mode < flow::kRenormNone || renorm_mode > flow::kRenormCol)
    throw std::invalid_argument("flow_sampler_step: unknown renorm mode " + std::to_string(renorm_mode));
  auto* cnt = reinterpret_cast<int32_t*>(counter);
  const flow::Row r = flow::load_row(reinterpret_cast<const float*>(table), rows, cnt[0]);
  if (const char* why = flow::missing_input(r, vu != 0, vi != 0, h1 != 0, h2 != 0))
    throw std::invalid_argument(std::string("flow_sampler_step: ") + why);
  const int64_t sx[3] = {sxb, sxp, sxq}, sc[3] = {scb, scp, scq}, su[3] = {sub, sup, suq}, si[3] = {sib, sip, siq};
  if (B * P * Q > 0) {
    const cpu::Isa isa = cpu::cpu_isa();
    auto go = [&](auto tx, auto tv) {
      using TX = decltype(tx);
      using TV = decltype(tv);
      launch<TX, TV>(isa, B, P, Q, x, sx, vc, sc, vu, su, vi, si, out, h1, h2, r, renorm_mode, renorm_min);
    };
    cpu::dispatch(x_dtype, "flow_sampler_step (state)", [&](auto tx) {
      cpu::dispatch(v_dtype, "flow_sampler_step (branches)", [&](auto tv) { go(tx, tv); });
    });
  }
  cnt[0] += 1;
}

void flow_sampler_step_cpu_packed(uintptr_t args) {
  const int64_t* a = reinterpret_cast<const int64_t*>(args);
  double lo;
  std::memcpy(&lo, a + 29, sizeof lo);
  const auto u = [&](int i) { return static_cast<uintptr_t>(a[i]); };
  flow_sampler_step_cpu(int(a[0]), int(a[1]), a[2], a[3], a[4], u(5), a[6], a[7], a[8], u(9), a[10], a[11], a[12],
                        u(13), a[14], a[15], a[16], u(17), a[18], a[19], a[20], u(21), u(22), u(23), u(24), a[25],
                        u(26), u(27), int(a[28]), float(lo));
}

}  // namespace spar
