// The dwconv_glu twin's loops at the AVX-512 variant's width, L = 16 fp32 lanes, compiled for AVX2
// (or, with -DCONV_LANES=4, at the SSE baseline's 4 lanes):
// GCC lowers its 64-byte vector types to pairs of 256-bit registers, so the 16-lane code
// (csrc/dwconv_glu/dwconv_glu_kernels.h: steps, border columns, partial vectors, channel blocks)
// runs on any AVX2 CPU (tests/test_dwconv_glu.py builds it and compares its output with the
// PyTorch reference). The clamp inside SiLU takes its portable compare-and-select form here (the
// AVX-512 variant uses vmaxps / vminps, the same values), and the register pin of the loaded
// vectors (CONV_PIN_LOADS) is left out: it only steers register allocation.
//
// Rows are staged and the output streamed (non-temporal stores where the width has them) whatever
// the shape, so the test runs those paths on every CPU.
//
// usage: dwconv_glu_l16 B H W C f32|bf16 x.bin w.bin bias.bin out.bin
//   x: [B, H*W, 2C] of the dtype, w: [2C, 9] fp32 (the conv weight's layout), bias: [2C] fp32,
//   out: [B, H*W, C]
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/spar_common.h"
#include "harness_io.h"

// CONV_LANES (default 16): the lanes to build; 4 is the baseline variant of an SSE-only build
// (compile it without AVX: the clamp takes the compare-and-select form there too)
#ifndef CONV_LANES
#define CONV_LANES 16
#endif
#if CONV_LANES == 16
#define CONV_PIN_LOADS 0  // a 64-byte vector does not fit one AVX2 register
#endif
namespace spar {
#define SPAR_ISA_AVX2 (CONV_LANES == 16)
#define SPAR_ISA_AVX512 0
#include "dwconv_glu/dwconv_glu_kernels.h"
}  // namespace spar

namespace {

template <typename T>
int run(int64_t B, int64_t H, int64_t W, int64_t C, char** paths) {
  const int64_t N = H * W;
  const std::vector<char> x = harness::read_file(paths[0], size_t(B * N * 2 * C) * sizeof(T));
  const std::vector<char> w = harness::read_file(paths[1], size_t(2 * C * 9) * sizeof(float));
  const std::vector<char> bias = harness::read_file(paths[2], size_t(2 * C) * sizeof(float));
  // the output 64-byte aligned, so that streaming stores run where this width has them (bf16 at 16
  // lanes: 32-byte stores; fp32 at 16 lanes would need AVX-512 and takes ordinary stores here)
  std::vector<T> buf(size_t(B * N * C) + 64);
  T* o = buf.data();
  while (reinterpret_cast<uintptr_t>(o) % 64) ++o;
  spar::dwconv_glu_run<CONV_LANES, T>(reinterpret_cast<const T*>(x.data()), B, H, W, C, N * 2 * C, 2 * C,
                              reinterpret_cast<const float*>(w.data()), 9, 1, reinterpret_cast<const float*>(bias.data()),
                              o, N * C, C, 1, /*stage=*/true, /*stream=*/true);
  return harness::write_file(paths[3], std::vector<T>(o, o + B * N * C));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 10) {
    std::fprintf(stderr, "usage: %s B H W C f32|bf16 x.bin w.bin bias.bin out.bin\n", argv[0]);
    return 2;
  }
  const int64_t B = std::atoll(argv[1]), H = std::atoll(argv[2]), W = std::atoll(argv[3]), C = std::atoll(argv[4]);
  const std::string dtype = argv[5];
  if (dtype == "f32") return run<float>(B, H, W, C, argv + 6);
  if (dtype == "bf16") return run<spar::bf16_t>(B, H, W, C, argv + 6);
  std::fprintf(stderr, "dtype: expected f32 or bf16, got %s\n", argv[5]);
  return 2;
}
