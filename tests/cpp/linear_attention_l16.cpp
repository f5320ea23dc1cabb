// The linear_attention twin's loops at the AVX-512 variant's width, 16 fp32 lanes, compiled for
// AVX2 (or, with -DLA_LANES=4, at the SSE baseline's 4 lanes): GCC lowers the 64-byte vector types of csrc/linear_attention/linear_attention_kernels.h to
// pairs of 256-bit registers, so the 16-lane blocking (tiles of up to 8 rows x 1 or 2 vectors,
// query chunks of 8, the state's row blocks) runs on any AVX2 CPU. tests/test_linear_attention.py
// builds it and compares its output with the PyTorch reference. The empty asm that pins B's row
// in registers is left out (SPAR_LA_PIN_LOADS 0): it only steers register allocation.
//
// usage: linear_attention_l16 B Nq Nk H D f32|bf16 eps q.bin k.bin v.bin out.bin
//   q: [B, Nq, H, D], k and v: [B, Nk, H, D] of the dtype, contiguous; out: [B, Nq, H, D]
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/fast_math.h"
#include "common/spar_common.h"
#include "harness_io.h"

// LA_LANES (default 16): the lanes to build; 4 is the baseline variant of an SSE-only build
// (compile it without AVX: the AVX2-only normaliser path is left out as in that variant)
#ifndef LA_LANES
#define LA_LANES 16
#endif
namespace spar {
#if LA_LANES == 16
#define SPAR_ISA_AVX2 1
#define SPAR_LA_PIN_LOADS 0  // a 64-byte vector does not fit one AVX2 register
#else
#define SPAR_ISA_AVX2 0
#endif
#define SPAR_ISA_AVX512 0
#include "linear_attention/linear_attention_kernels.h"
}  // namespace spar

namespace {

template <typename T, int HD>
int run(int64_t B, int64_t Nq, int64_t Nk, int64_t H, float eps, char** paths) {
  const std::vector<char> q = harness::read_file(paths[0], size_t(B * Nq * H * HD) * sizeof(T));
  const std::vector<char> k = harness::read_file(paths[1], size_t(B * Nk * H * HD) * sizeof(T));
  const std::vector<char> v = harness::read_file(paths[2], size_t(B * Nk * H * HD) * sizeof(T));
  std::vector<T> out(size_t(B * Nq * H * HD));
  const int64_t sqb = Nq * H * HD, skb = Nk * H * HD, sn = H * HD;
  spar::linear_attention_run<T, HD, LA_LANES>(reinterpret_cast<const T*>(q.data()), reinterpret_cast<const T*>(k.data()),
                                        reinterpret_cast<const T*>(v.data()), B, Nq, Nk, H, sqb, sn, HD, skb, sn, HD,
                                        skb, sn, HD, out.data(), sqb, sn, HD, eps);
  return harness::write_file(paths[3], out);
}

template <typename T>
int by_dim(int64_t D, int64_t B, int64_t Nq, int64_t Nk, int64_t H, float eps, char** paths) {
  if (D == 16) return run<T, 16>(B, Nq, Nk, H, eps, paths);
  if (D == 32) return run<T, 32>(B, Nq, Nk, H, eps, paths);
  if (D == 64) return run<T, 64>(B, Nq, Nk, H, eps, paths);
  std::fprintf(stderr, "D: expected 16, 32 or 64, got %lld\n", static_cast<long long>(D));
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s B Nq Nk H D f32|bf16 eps q.bin k.bin v.bin out.bin\n", argv[0]);
    return 2;
  }
  const int64_t B = std::atoll(argv[1]), Nq = std::atoll(argv[2]), Nk = std::atoll(argv[3]), H = std::atoll(argv[4]),
                D = std::atoll(argv[5]);
  const std::string dtype = argv[6];
  const float eps = std::strtof(argv[7], nullptr);
  if (dtype == "f32") return by_dim<float>(D, B, Nq, Nk, H, eps, argv + 8);
  if (dtype == "bf16") return by_dim<spar::bf16_t>(D, B, Nq, Nk, H, eps, argv + 8);
  std::fprintf(stderr, "dtype: expected f32 or bf16, got %s\n", argv[6]);
  return 2;
}
