// Cross-checks the instruction-set variants of the C++ twins that have them (common/isa_variants.inc:
// adaln_layernorm, gated_residual, dwconv_glu, linear_attention, flow_sampler_step, quantize_fp8):
// each case runs once per variant this CPU has (SPAR_CPU_ISA = base, avx2, avx512, set in turn)
// on the same inputs, and every variant's output is compared with the base variant's.
//
// Why: the AVX-512 variants are compiled into every x86-64 build but no CPU that runs the test
// suite has AVX-512. Built statically, this program runs under an emulator of an AVX-512 CPU
// (tests/cpp/avx512_emulated.sh: Bochs' Skylake-X model), where all three variants run; on this
// kind of machine tests/test_isa_selftest.py runs it with the variants the CPU has (base and avx2),
// so the program itself is tested. The base and avx2 variants are checked against PyTorch
// references by the op tests; agreement with them is what this program checks for avx512.
//
// Tolerances (max |variant - base| / max |base| per output): fp32 outputs 1e-5, gated_residual's
// 2e-6 (lane counts change the order of reductions and partial sums); bf16 / fp16 outputs 1 unit in
// the last place of the largest output (a rounding boundary may fall between two variants' fp32
// results); quantize_fp8 bit for bit (its encode is exact in every variant).
//
// usage: isa_selftest [--require-avx512] [--perturb]   (exit 0: all cases agree; 1: a mismatch;
// 3: avx512 required but this CPU lacks it). --perturb moves the largest output of every variant
// but the base one by twice the case's tolerance before comparing, so every case must fail: the
// test of the comparison itself.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "adaln/api.h"
#include "common/cpu_rows.h"
#include "common/spar_common.h"
#include "dwconv_glu/api.h"
#include "flow_sampler/api.h"
#include "flow_sampler/flow_sampler.h"
#include "linear_attention/api.h"
#include "quantize_fp8/api.h"

namespace {

using spar::DType;
using spar::cpu::Isa;

const char* kIsaNames[] = {"base", "avx2", "avx512"};
int g_failures = 0, g_cases = 0;
bool g_perturb = false;

// deterministic inputs: an LCG's floats in [-a, a]
struct Lcg {
  uint64_t s;
  explicit Lcg(uint64_t seed) : s(seed * 6364136223846793005ull + 1442695040888963407ull) {}
  float next(float a = 1.f) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return a * (float((s >> 40) & 0xffffff) / float(1 << 23) - 1.f);
  }
};

// a tensor's storage in one dtype, filled from fp32 values
struct Buf {
  DType dt;
  std::vector<uint8_t> bytes;
  Buf(DType d, const std::vector<float>& v) : dt(d), bytes(v.size() * size()) {
    for (size_t i = 0; i < v.size(); ++i) set(i, v[i]);
  }
  Buf(DType d, size_t n) : dt(d), bytes(n * size(), 0) {}
  size_t size() const { return dt == DType::F32 ? 4 : 2; }
  size_t count() const { return bytes.size() / size(); }
  uintptr_t ptr() { return reinterpret_cast<uintptr_t>(bytes.data()); }
  void set(size_t i, float f) {
    if (dt == DType::F32) { std::memcpy(&bytes[4 * i], &f, 4); return; }
    const uint16_t h = dt == DType::BF16 ? spar::bf16_from_float(f).bits : spar::f16_from_float(f).bits;
    std::memcpy(&bytes[2 * i], &h, 2);
  }
  float get(size_t i) const {
    if (dt == DType::F32) { float f; std::memcpy(&f, &bytes[4 * i], 4); return f; }
    uint16_t h;
    std::memcpy(&h, &bytes[2 * i], 2);
    return dt == DType::BF16 ? spar::to_float(spar::bf16_t{h}) : spar::to_float(spar::f16_t{h});
  }
};

std::vector<float> values(size_t n, uint64_t seed, float a = 1.f) {
  Lcg g(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = g.next(a);
  return v;
}

const char* dtype_name(DType d) { return d == DType::F32 ? "f32" : d == DType::BF16 ? "bf16" : "f16"; }

// the variants this CPU runs, base first
std::vector<Isa> variants() {
  std::vector<Isa> out;
  for (int i = 0; i <= int(spar::cpu::cpu_isa_supported()); ++i) out.push_back(Isa(i));
  return out;
}

void use(Isa isa) { setenv("SPAR_CPU_ISA", kIsaNames[int(isa)], 1); }

// compares the outputs (lists of float values) of every variant with the base variant's
void compare(const std::string& name, const std::vector<std::vector<float>>& outs, const std::vector<Isa>& isas,
             double tol) {
  ++g_cases;
  const std::vector<float>& base = outs[0];
  double mx = 0;
  for (float v : base) mx = std::max(mx, double(std::fabs(v)));
  for (size_t k = 1; k < outs.size(); ++k) {
    std::vector<float> out = outs[k];
    if (g_perturb) {  // the largest output moved by twice the tolerance (at least 1e-3 of itself)
      size_t at = 0;
      for (size_t i = 0; i < out.size(); ++i) if (std::fabs(base[i]) > std::fabs(base[at])) at = i;
      out[at] = float(base[at] + std::max(2 * tol * mx, 1e-3 * std::fabs(double(base[at])) + 1e-3));
    }
    double err = 0;
    bool finite = true;
    for (size_t i = 0; i < base.size(); ++i) {
      if (!std::isfinite(out[i]) || !std::isfinite(base[i])) finite = finite && out[i] == base[i];
      else err = std::max(err, double(std::fabs(out[i] - base[i])));
    }
    const double rel = err / std::max(mx, 1e-30);
    if (!finite || rel > tol) {
      ++g_failures;
      std::printf("FAIL %s: %s vs base: max |diff| / max |base| = %.3g (tolerance %.3g)%s\n", name.c_str(),
                  kIsaNames[int(isas[k])], rel, tol, finite ? "" : ", non-finite mismatch");
    }
  }
}

double tol_for(DType d) { return d == DType::F32 ? 2e-6 : d == DType::BF16 ? 1.0 / 128 : 1.0 / 1024; }

std::vector<float> read_all(const Buf& b) {
  std::vector<float> v(b.count());
  for (size_t i = 0; i < v.size(); ++i) v[i] = b.get(i);
  return v;
}

// ---- the cases ---------------------------------------------------------------------------------

void adaln_cases(const std::vector<Isa>& isas) {
  const int64_t shapes[][3] = {{1, 1, 1}, {2, 3, 7}, {1, 5, 33}, {2, 4, 200}, {1, 3, 1152}, {2, 2, 2240}};
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    for (auto& s : shapes) {
      const int64_t B = s[0], N = s[1], C = s[2];
      for (int strided = 0; strided < 2; ++strided) {
        const int64_t sxn = strided ? C + 3 : C, sxb = N * sxn + (strided ? 5 : 0);
        std::vector<float> xv = values(size_t(B * sxb), 11 + C, 3.f);
        if (strided && C > 1) for (auto& v : xv) v += 100.f;  // a large mean
        const std::vector<float> shift = values(size_t(B * C), 12), scale = values(size_t(B * C), 13, 0.5f);
        const std::vector<float> yv = values(size_t(B * sxb), 14, 2.f), gate = values(size_t(B * C), 15);
        std::vector<std::vector<float>> ln, gr;
        for (Isa isa : isas) {
          use(isa);
          Buf x(dt, xv), y(dt, size_t(B * N * C));
          spar::adaln_layernorm_cpu(x.ptr(), int(dt), B, N, C, sxb, sxn, 1, uintptr_t(shift.data()), C,
                                    uintptr_t(scale.data()), C, y.ptr(), N * C, C, 1, 1e-6);
          ln.push_back(read_all(y));
          Buf r(dt, xv), yy(dt, yv), out(dt, size_t(B * N * C));
          spar::gated_residual_cpu(r.ptr(), int(dt), B, N, C, sxb, sxn, 1, yy.ptr(), sxb, sxn, 1,
                                   uintptr_t(gate.data()), C, out.ptr(), N * C, C, 1);
          gr.push_back(read_all(out));
        }
        const std::string tag = std::string(dtype_name(dt)) + " B" + std::to_string(B) + " N" + std::to_string(N) +
                                " C" + std::to_string(C) + (strided ? " strided" : "");
        // LayerNorm: fp32 statistics in lanes of the variant's width (a 1e2 mean: 1e-5 of the output)
        compare("adaln_layernorm " + tag, ln, isas, dt == DType::F32 ? 1e-5 : tol_for(dt));
        compare("gated_residual " + tag, gr, isas, tol_for(dt));
      }
    }
  }
}

void dwconv_cases(const std::vector<Isa>& isas) {
  const int64_t shapes[][4] = {{1, 1, 1, 5}, {1, 2, 3, 12}, {2, 5, 7, 20}, {1, 3, 11, 37}, {1, 1, 40, 90},
                               {1, 4, 4, 300}, {2, 3, 5, 16},
                               // several channel blocks (the block's 3 rows fit 128 KiB) and bands of rows
                               {1, 3, 40, 300}, {2, 2, 64, 150},
                               // power-of-two channel counts: strides that alias in L1, rows staged
                               {1, 4, 6, 256}, {1, 3, 16, 1024}};
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    for (auto& s : shapes) {
      const int64_t B = s[0], H = s[1], W = s[2], C = s[3], N = H * W;
      for (int strided = 0; strided < 2; ++strided) {
        const int64_t sxn = strided ? 2 * C + 3 : 2 * C, sxb = N * sxn + (strided ? 7 : 0);
        const std::vector<float> xv = values(size_t(B * sxb), 21 + C), wv = values(size_t(2 * C * 9), 22, 0.4f);
        const std::vector<float> bias = values(size_t(2 * C), 23);
        std::vector<std::vector<float>> outs;
        for (Isa isa : isas) {
          use(isa);
          Buf x(dt, xv), out(dt, size_t(B * N * C));
          spar::dwconv_glu_cpu(x.ptr(), int(dt), B, H, W, C, sxb, sxn, uintptr_t(wv.data()), 9, 1,
                               strided ? 0 : uintptr_t(bias.data()), out.ptr(), N * C, C);
          outs.push_back(read_all(out));
        }
        compare(std::string("dwconv_glu ") + dtype_name(dt) + " B" + std::to_string(B) + " " + std::to_string(H) +
                    "x" + std::to_string(W) + " C" + std::to_string(C) + (strided ? " strided, no bias" : ""),
                outs, isas, dt == DType::F32 ? 1e-5 : tol_for(dt));
      }
    }
  }
}

void linear_attention_cases(const std::vector<Isa>& isas) {
  const int64_t shapes[][5] = {{1, 1, 1, 1, 16}, {2, 7, 9, 3, 32}, {1, 65, 130, 2, 32}, {1, 20, 300, 2, 64},
                               {2, 33, 33, 1, 16}, {1, 256, 256, 4, 32}};
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    for (auto& s : shapes) {
      const int64_t B = s[0], Nq = s[1], Nk = s[2], H = s[3], D = s[4];
      // q, k, v interleaved per token as one [B, N, 3, H, D] buffer (strided heads and tokens)
      const int64_t sn = 3 * H * D, sb = std::max(Nq, Nk) * sn;
      const std::vector<float> qkv = values(size_t(B * sb), 31 + D + Nk, 2.f);
      std::vector<std::vector<float>> outs;
      for (Isa isa : isas) {
        use(isa);
        Buf in(dt, qkv), out(dt, size_t(B * Nq * H * D));
        const uintptr_t q = in.ptr(), k = q + H * D * in.size(), v = k + H * D * in.size();
        const bool ok = spar::linear_attention_cpu(q, k, v, int(dt), B, Nq, Nk, H, D, sb, sn, D, sb, sn, D, sb, sn, D,
                                                   out.ptr(), Nq * H * D, H * D, D, 1e-4);
        if (!ok) {
          ++g_failures;
          std::printf("FAIL linear_attention: D = %lld not taken\n", (long long)D);
        }
        outs.push_back(read_all(out));
      }
      compare(std::string("linear_attention ") + dtype_name(dt) + " B" + std::to_string(B) + " Nq" +
                  std::to_string(Nq) + " Nk" + std::to_string(Nk) + " H" + std::to_string(H) + " D" + std::to_string(D),
              outs, isas, dt == DType::F32 ? 1e-5 : tol_for(dt));
    }
  }
}

void flow_sampler_cases(const std::vector<Isa>& isas) {
  namespace flow = spar::flow;
  // coefficient rows of every kind of step: guidance on / off, image branch, renorm (text or
  // guided), history stored and read; the last row is the identity (as the sampler's tables end)
  const int flags[] = {flow::kCfg | flow::kStoreH1X,
                       flow::kCfg | flow::kImg | flow::kRenorm | flow::kReadH1 | flow::kStoreH2V,
                       0,
                       flow::kCfg | flow::kRenorm | flow::kRenormText | flow::kImg | flow::kReadH1 | flow::kReadH2,
                       flow::kCfg | flow::kStoreH1X0 | flow::kReadH2,
                       flow::kImg | flow::kCfg};
  const int rows = int(sizeof(flags) / sizeof(flags[0])) + 1;
  std::vector<float> table(size_t(rows * flow::kNumCols), 0.f);
  Lcg g(41);
  for (int r = 0; r + 1 < rows; ++r) {
    float* t = &table[size_t(r * flow::kNumCols)];
    for (int c = 0; c < flow::kFlags; ++c) t[c] = g.next();
    t[flow::kG] = 4.5f;
    t[flow::kGi] = 1.5f;
    t[flow::kFlags] = float(flags[r]);
  }
  table[size_t((rows - 1) * flow::kNumCols + flow::kCx)] = 1.f;
  const int64_t shapes[][3] = {{1, 1, 1}, {1, 32, 256}, {2, 7, 33}, {2, 64, 64}, {1, 3, 1000}};
  const int modes[] = {flow::kRenormNone, flow::kRenormGlobal, flow::kRenormRow, flow::kRenormCol};
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    for (auto& s : shapes) {
      const int64_t B = s[0], P = s[1], Q = s[2], n = B * P * Q;
      for (int mode : modes) {
        const std::vector<float> x0 = values(size_t(n), 51 + Q, 2.f);
        // branches with a padded row stride (Q + 1)
        const int64_t sp = Q + 1, sb = P * sp, nb = B * sb;
        const std::vector<float> vc = values(size_t(nb), 52), vu = values(size_t(nb), 53), vi = values(size_t(nb), 54);
        std::vector<std::vector<float>> outs;
        for (Isa isa : isas) {
          use(isa);
          Buf x(dt, x0), bc(dt, vc), bu(dt, vu), bi(dt, vi);
          std::vector<float> h1(size_t(n), 0.f), h2(size_t(n), 0.f), stats(size_t(2 * B * (P + Q + 1)), 0.f);
          int32_t counter[2] = {0, 0};
          std::vector<float> all;
          for (int step = 0; step + 1 < rows; ++step) {  // the state walks through every row
            Buf out(dt, size_t(n));
            spar::flow_sampler_step_cpu(int(dt), int(dt), B, P, Q, x.ptr(), P * Q, Q, 1, bc.ptr(), sb, sp, 1, bu.ptr(),
                                        sb, sp, 1, bi.ptr(), sb, sp, 1, out.ptr(), uintptr_t(h1.data()),
                                        uintptr_t(h2.data()), uintptr_t(table.data()), rows, uintptr_t(counter),
                                        uintptr_t(stats.data()), mode, 0.f);
            x = out;
            for (size_t i = 0; i < size_t(n); ++i) all.push_back(out.get(i));
          }
          all.insert(all.end(), h1.begin(), h1.end());
          all.insert(all.end(), h2.begin(), h2.end());
          outs.push_back(all);
        }
        compare(std::string("flow_sampler_step ") + dtype_name(dt) + " B" + std::to_string(B) + " P" +
                    std::to_string(P) + " Q" + std::to_string(Q) + " renorm " + std::to_string(mode),
                outs, isas, dt == DType::F32 ? 1e-5 : tol_for(dt));
      }
    }
  }
}

void quantize_fp8_cases(const std::vector<Isa>& isas) {
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {5, 33}, {4, 896}, {2, 4097}};
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    for (auto& s : shapes) {
      const int64_t rows = s[0], cols = s[1], stride = cols + 5;
      std::vector<float> xv = values(size_t(rows * stride), 61 + cols, 8.f);
      if (cols > 2) xv[1] = 0.f, xv[2] = 1e-3f;  // zeros and tiny values next to large ones
      for (int per_token = 0; per_token < 2; ++per_token) {
        std::vector<std::vector<float>> outs;
        for (Isa isa : isas) {
          use(isa);
          Buf x(dt, xv);
          std::vector<uint8_t> q(size_t(rows * cols));
          std::vector<float> scales(size_t(per_token ? rows : 1));
          spar::quantize_fp8_cpu(x.ptr(), int(dt), rows, cols, stride, uintptr_t(q.data()), uintptr_t(scales.data()),
                                 per_token != 0);
          std::vector<float> all(q.begin(), q.end());  // the codes, compared exactly
          all.insert(all.end(), scales.begin(), scales.end());
          outs.push_back(all);
        }
        compare(std::string("quantize_fp8 ") + dtype_name(dt) + " " + std::to_string(rows) + "x" +
                    std::to_string(cols) + (per_token ? " per-token" : " per-tensor"),
                outs, isas, 0.0);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool require512 = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--require-avx512") == 0) require512 = true;
    else if (std::strcmp(argv[i], "--perturb") == 0) g_perturb = true;
    else {
      std::fprintf(stderr, "usage: %s [--require-avx512] [--perturb]\n", argv[0]);
      return 2;
    }
  }
  const std::vector<Isa> isas = variants();
  std::printf("isa_selftest: variants this CPU runs:");
  for (Isa i : isas) std::printf(" %s", kIsaNames[int(i)]);
  std::printf("\n");
  if (require512 && isas.back() != Isa::Avx512) {
    std::printf("isa_selftest: --require-avx512 but this CPU has no AVX-512 (F, BW, VL, DQ)\n");
    return 3;
  }
  adaln_cases(isas);
  // dwconv_glu stages inputs that alias in L1 only where L1 has <= 8 ways (cpu::stage_aliasing_inputs): forced
  // here, so that its aliasing cases run the row ring on every CPU
  setenv("SPAR_CPU_STAGE", "1", 1);
  dwconv_cases(isas);
  unsetenv("SPAR_CPU_STAGE");
  linear_attention_cases(isas);
  flow_sampler_cases(isas);
  quantize_fp8_cases(isas);
  std::printf("isa_selftest: %d cases, %d failures\n", g_cases, g_failures);
  return g_failures == 0 ? 0 : 1;
}
