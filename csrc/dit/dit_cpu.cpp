// CPU implementations of the SANA DiT block kernels (adaLN modulation, gated residual, depthwise
// conv + GLU, ReLU linear attention for head dims 16 / 32 / 64): rows / pixels / heads spread over
// OpenMP threads, fp32 math in per-thread buffers (vectorized by the compiler), one rounding to
// the storage dtype. Other linear-attention head dims run as batched BLAS matmuls from PyTorch.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "dit/api.h"
#include "dit/dit.h"

namespace spar {
namespace {

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

template <typename T>
void adaln_run(const T* x, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn, const float* shift,
               const float* scale1, T* y, int64_t syb, int64_t syn, float eps) {
#pragma omp parallel
  {
    std::vector<float> buf(C);
    float* h = buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * N; ++r) {
      const int64_t b = r / N, n = r % N;
      load_row(x + b * sxb + n * sxn, h, C);
      // fp64 sums (still vectorized): a long fp32 running sum would lose ~log2(C) bits
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += h[c];
      const float mean = float(sum / double(C));
      double sq = 0.0;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < C; ++c) {
        const float d = h[c] - mean;
        sq += double(d * d);
      }
      const float rstd = float(1.0 / std::sqrt(sq / double(C) + double(eps)));
      const float* sh = shift + b * C;
      const float* sc = scale1 + b * C;
      for (int64_t c = 0; c < C; ++c) h[c] = (h[c] - mean) * rstd * sc[c] + sh[c];
      store_row(h, y + b * syb + n * syn, C);
    }
  }
}

template <typename T>
void gated_run(const T* x, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn, const T* y, int64_t syb,
               int64_t syn, const float* gate, T* out, int64_t sob, int64_t son) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < B * N; ++r) {
    const int64_t b = r / N, n = r % N;
    const T* xr = x + b * sxb + n * sxn;
    const T* yr = y + b * syb + n * syn;
    T* o = out + b * sob + n * son;
    const float* g = gate + b * C;
    for (int64_t c = 0; c < C; ++c) o[c] = from_float<T>(to_float(xr[c]) + g[c] * to_float(yr[c]));
  }
}

// Work items are (sample, vector of kConvVec channels of the a half with the matching gate
// channels). An item keeps its 2 x 9 weight vectors and 2 accumulators in registers and sweeps
// every pixel of the image: per pixel 18 loads of neighbour vectors (from L1/L2) and 18 FMAs.
// Interior pixels skip the bounds checks. The last vector of a C that is not a multiple of
// kConvVec is handled with a runtime width.
constexpr int64_t kConvVec = 16;

template <bool kFull, typename T>
void conv_glu_item(const T* xb, int64_t H, int64_t W, int64_t C, int64_t sxn, int64_t c0, int64_t cw,
                   const float* w9, const float* bias, T* ob, int64_t son) {
  constexpr int64_t V = kConvVec;
  const int64_t n = kFull ? V : cw;
  float wa[9][V], wg[9][V], ba[V], bg[V];
  for (int t = 0; t < 9; ++t)
    for (int64_t c = 0; c < V; ++c) {
      wa[t][c] = c < n ? w9[t * 2 * C + c0 + c] : 0.f;
      wg[t][c] = c < n ? w9[t * 2 * C + C + c0 + c] : 0.f;
    }
  for (int64_t c = 0; c < V; ++c) {
    ba[c] = bias && c < n ? bias[c0 + c] : 0.f;
    bg[c] = bias && c < n ? bias[C + c0 + c] : 0.f;
  }
  for (int64_t row = 0; row < H; ++row) {
    for (int64_t col = 0; col < W; ++col) {
      const bool interior = row > 0 && row < H - 1 && col > 0 && col < W - 1;
      float aa[V], ag[V];
      for (int64_t c = 0; c < V; ++c) {
        aa[c] = ba[c];
        ag[c] = bg[c];
      }
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        const int64_t rr = row + t / 3 - 1, cc = col + t % 3 - 1;
        if (!interior && (rr < 0 || rr >= H || cc < 0 || cc >= W)) continue;
        const T* src = xb + (rr * W + cc) * sxn + c0;
        if (kFull) {
#pragma omp simd
          for (int64_t c = 0; c < V; ++c) {
            aa[c] += to_float(src[c]) * wa[t][c];
            ag[c] += to_float(src[C + c]) * wg[t][c];
          }
        } else {
          for (int64_t c = 0; c < n; ++c) {
            aa[c] += to_float(src[c]) * wa[t][c];
            ag[c] += to_float(src[C + c]) * wg[t][c];
          }
        }
      }
      T* o = ob + (row * W + col) * son + c0;
      if (kFull) {
#pragma omp simd
        for (int64_t c = 0; c < V; ++c) o[c] = from_float<T>(aa[c] * dit::silu(ag[c]));
      } else {
        for (int64_t c = 0; c < n; ++c) o[c] = from_float<T>(aa[c] * dit::silu(ag[c]));
      }
    }
  }
}

template <typename T>
void dwconv_glu_run(const T* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sxb, int64_t sxn,
                    const float* w9, const float* bias, T* out, int64_t sob, int64_t son) {
  const int64_t n_vec = (C + kConvVec - 1) / kConvVec;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < B * n_vec; ++item) {
    const int64_t b = item / n_vec, c0 = (item % n_vec) * kConvVec;
    const int64_t cw = std::min(kConvVec, C - c0);
    if (cw == kConvVec)
      conv_glu_item<true>(x + b * sxb, H, W, C, sxn, c0, cw, w9, bias, out + b * sob, son);
    else
      conv_glu_item<false>(x + b * sxb, H, W, C, sxn, c0, cw, w9, bias, out + b * sob, son);
  }
}

// ReLU linear attention for head dims d = e = HD (SANA: 32). Phase 1, per (b, h): the state
// [HD, HD] and normaliser in register-sized blocks of kLaRows rows of the state, accumulated over
// all keys; phase 2, per query row: relu(q) @ state / (relu(q) . z + eps). fp32 throughout.
constexpr int kLaRows = 8;

template <typename T, int HD>
void linear_attention_run(const T* q, const T* k, const T* v, int64_t B, int64_t Nq, int64_t Nk, int64_t H,
                          int64_t sqb, int64_t sqn, int64_t sqh, int64_t skb, int64_t skn, int64_t skh,
                          int64_t svb, int64_t svn, int64_t svh, T* out, int64_t sob, int64_t son, int64_t soh,
                          float eps) {
  constexpr int64_t SE = HD * HD + HD;
  std::vector<float> ws(B * H * SE);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* S = ws.data() + bh * SE;
      float* z = S + HD * HD;
      alignas(64) float vf[HD];
      for (int d0 = 0; d0 < HD; d0 += kLaRows) {
        alignas(64) float acc[kLaRows][HD] = {};
        float zz[kLaRows] = {};
        for (int64_t n = 0; n < Nk; ++n) {
          const T* kr = k + b * skb + n * skn + h * skh + d0;
          const T* vr = v + b * svb + n * svn + h * svh;
          const float* vrow = vf;
          if constexpr (std::is_same<T, float>::value) {
            vrow = vr;  // fp32: read v in place
          } else {
            for (int e = 0; e < HD; ++e) vf[e] = to_float(vr[e]);
          }
#pragma GCC unroll 8
          for (int i = 0; i < kLaRows; ++i) {
            const float kd = dit::relu(to_float(kr[i]));
            zz[i] += kd;
#pragma omp simd
            for (int e = 0; e < HD; ++e) acc[i][e] += kd * vrow[e];
          }
        }
        for (int i = 0; i < kLaRows; ++i) {
          z[d0 + i] = zz[i];
          for (int e = 0; e < HD; ++e) S[(d0 + i) * HD + e] = acc[i][e];
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * H * Nq; ++r) {
      const int64_t bh = r / Nq, n = r % Nq, b = bh / H, h = bh % H;
      const float* S = ws.data() + bh * SE;
      const float* z = S + HD * HD;
      const T* qr = q + b * sqb + n * sqn + h * sqh;
      alignas(64) float num[HD] = {};
      float den = 0.f;
#pragma GCC unroll 32
      for (int d = 0; d < HD; ++d) {  // unrolled: num stays in registers
        const float qd = dit::relu(to_float(qr[d]));
        den += qd * z[d];
#pragma omp simd
        for (int e = 0; e < HD; ++e) num[e] += qd * S[d * HD + e];
      }
      const float dd = den + eps;
      T* o = out + b * sob + n * son + h * soh;
#pragma omp simd
      for (int e = 0; e < HD; ++e) o[e] = from_float<T>(num[e] / dd);
    }
  }
}

}  // namespace

void adaln_layernorm_cpu(uintptr_t x, int dtype, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn,
                         uintptr_t shift, uintptr_t scale1, uintptr_t y, int64_t syb, int64_t syn, double eps) {
  dispatch(dtype, "adaln_layernorm", [&](auto tag) {
    using T = decltype(tag);
    adaln_run(reinterpret_cast<const T*>(x), B, N, C, sxb, sxn, reinterpret_cast<const float*>(shift),
              reinterpret_cast<const float*>(scale1), reinterpret_cast<T*>(y), syb, syn, float(eps));
  });
}

void gated_residual_cpu(uintptr_t x, int dtype, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn,
                        uintptr_t y, int64_t syb, int64_t syn, uintptr_t gate, uintptr_t out, int64_t sob,
                        int64_t son) {
  dispatch(dtype, "gated_residual", [&](auto tag) {
    using T = decltype(tag);
    gated_run(reinterpret_cast<const T*>(x), B, N, C, sxb, sxn, reinterpret_cast<const T*>(y), syb, syn,
              reinterpret_cast<const float*>(gate), reinterpret_cast<T*>(out), sob, son);
  });
}

void dwconv_glu_cpu(uintptr_t x, int dtype, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sxb,
                    int64_t sxn, uintptr_t w9, uintptr_t bias, uintptr_t out, int64_t sob, int64_t son) {
  dispatch(dtype, "dwconv_glu", [&](auto tag) {
    using T = decltype(tag);
    dwconv_glu_run(reinterpret_cast<const T*>(x), B, H, W, C, sxb, sxn, reinterpret_cast<const float*>(w9),
                   reinterpret_cast<const float*>(bias), reinterpret_cast<T*>(out), sob, son);
  });
}

bool linear_attention_cpu(uintptr_t q, uintptr_t k, uintptr_t v, int dtype, int64_t B, int64_t Nq, int64_t Nk,
                          int64_t H, int64_t D, int64_t sqb, int64_t sqn, int64_t sqh, int64_t skb, int64_t skn,
                          int64_t skh, int64_t svb, int64_t svn, int64_t svh, uintptr_t out, int64_t sob,
                          int64_t son, int64_t soh, double eps) {
  bool done = false;
  dispatch(dtype, "linear_attention", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto hd) {
      linear_attention_run<T, decltype(hd)::value>(
          reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v), B, Nq, Nk,
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
