// Row helpers shared by the CPU twins of the float ops: load a row to fp32, store fp32 back with
// one rounding, and dispatch on the dtype code (fp32 / fp16 / bf16).
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
