// The AVX-512 variant of the quantize_fp8 twin divides without the divider: the reciprocal and two
// Markstein corrections in FMAs (csrc/quantize_fp8/quantize_fp8_kernels.h, struct Div). Its row
// loops use only 256-bit AVX2/FMA/F16C intrinsics, so this program compiles that variant's code
// for AVX2 and runs it on any AVX2 CPU (tests/test_quantize_fp8.py builds and runs it): every
// bf16 value, and the same values as fp32, against the scalar encode (a true IEEE division), for
// random scales, scales at and next to powers of two, and the scale of every bf16 amax in
// [2^-7, 2^9). Only elements with |x| <= 448 * scale count (the row loop's contract: x / scale
// of a row never exceeds its amax's 448). Prints "checked N mismatches M baseline B", B being the
// mismatches of a plain x * (1 / scale), which the inputs must expose (else they prove nothing).
#include <immintrin.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "common/spar_common.h"
#include "quantize_fp8/quantize_fp8.h"

namespace spar {
using namespace spar::quant;
#define SPAR_ISA_AVX2 1
#define SPAR_ISA_AVX512 1
#define SPAR_QUANT_NO_ZMM 1  // the 256-bit steps: this program runs on AVX2 CPUs
#include "quantize_fp8/quantize_fp8_kernels.h"
}  // namespace spar

using namespace spar;

int main() {
  const int n = 65536;
  std::vector<bf16_t> xb(n);
  std::vector<float> xf(n);
  for (int i = 0; i < n; ++i) {
    xb[i].bits = uint16_t(i);
    xf[i] = to_float(xb[i]);
  }
  std::vector<float> scales;
  std::mt19937 g(3);
  for (int i = 0; i < 1500; ++i) {
    const uint32_t u = (g() & 0x007fffffu) | (uint32_t(100 + g() % 60) << 23);
    float f;
    std::memcpy(&f, &u, 4);
    scales.push_back(f);
  }
  for (int e = -30; e < 30; ++e) {
    const float p = std::ldexp(1.0f, e);
    scales.insert(scales.end(), {p, std::nextafter(p, 0.0f), std::nextafter(p, INFINITY), std::ldexp(1.9999999f, e)});
  }
  for (int a = 0x3c00; a < 0x4400; ++a) scales.push_back(scale_from_amax(to_float(bf16_t{uint16_t(a)})));
  std::vector<uint8_t> q(n);
  size_t checked = 0, bad = 0, baseline = 0;
  for (const float s : scales) {
    const float r = 1.0f / s;
    quantize_row(xb.data(), s, q.data(), n, static_cast<const bf16_t*>(nullptr));
    for (int i = 0; i < n; ++i) {
      if (!(std::fabs(xf[i]) <= 448.0f * s)) continue;
      ++checked;
      const uint8_t want = quant::quantize(xb[i], s);
      bad += q[i] != want;
      baseline += fp8e4m3_from_float_sat(xf[i] * r).bits != want;
    }
    quantize_row(xf.data(), s, q.data(), n, static_cast<const float*>(nullptr));
    for (int i = 0; i < n; ++i) {
      if (!(std::fabs(xf[i]) <= 448.0f * s)) continue;
      ++checked;
      bad += q[i] != quant::quantize(xf[i], s);
    }
  }
  std::printf("checked %zu mismatches %zu baseline %zu\n", checked, bad, baseline);
  return 0;
}
