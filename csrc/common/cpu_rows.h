// Row helpers shared by the CPU twins of the float ops: load a row to fp32, store fp32 back with
// one rounding (contiguous or with an element stride), and dispatch on the dtype code
// (fp32 / fp16 / bf16).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/spar_common.h"

namespace spar {
namespace cpu {

template <typename T>
inline void load_row(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
inline void store_row(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

// element stride `stride` (any value; 1 takes the contiguous, vectorized loop)
template <typename T>
inline void load_row(const T* __restrict src, int64_t stride, float* __restrict dst, int64_t n) {
  if (stride == 1) return load_row(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i * stride]);
}

template <typename T>
inline void store_row(const float* __restrict src, T* __restrict dst, int64_t stride, int64_t n) {
  if (stride == 1) return store_row(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = from_float<T>(src[i]);
}

template <typename F>
void dispatch(int dtype, const char* op, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::F32: return f(float{});
    case DType::F16: return f(f16_t{});
    case DType::BF16: return f(bf16_t{});
    default: throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace cpu
}  // namespace spar

// ---- run-time choice of the instruction set for the DiT twins --------------------------------
// A twin's hot loops live in a header without include guard (e.g. adaln/adaln_kernels.h), included
// once per variant inside SPAR_ISA_BEGIN_* / SPAR_ISA_END (x86-64 + GCC: the variant's functions,
// OpenMP regions included, are compiled for AVX-512 or AVX2 on top of the build's -march; elsewhere
// every variant is the build's own code). cpu_isa() picks the widest one this CPU runs;
// SPAR_CPU_ISA=base|avx2|avx512 forces one (tests and benchmarks), never one the CPU lacks.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPAR_ISA_MULTI 1
#define SPAR_ISA_BEGIN_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")")
#define SPAR_ISA_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define SPAR_ISA_END _Pragma("GCC pop_options")
#else
#define SPAR_ISA_MULTI 0
#define SPAR_ISA_BEGIN_AVX512
#define SPAR_ISA_BEGIN_AVX2
#define SPAR_ISA_END
#endif

#include <cstdlib>
#include <cstring>

namespace spar {
namespace cpu {

enum class Isa { Base = 0, Avx2 = 1, Avx512 = 2 };

inline Isa cpu_isa_supported() {
#if SPAR_ISA_MULTI
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Base;
  }();
  return best;
#else
  return Isa::Base;
#endif
}

// the variant to run: the widest supported, or SPAR_CPU_ISA's choice when this CPU has it
inline Isa cpu_isa() {
  const Isa best = cpu_isa_supported();
  const char* env = std::getenv("SPAR_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa want = best;
  if (std::strcmp(env, "base") == 0) want = Isa::Base;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::Avx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::Avx512;
  return static_cast<int>(want) <= static_cast<int>(best) ? want : best;
}

}  // namespace cpu
}  // namespace spar
