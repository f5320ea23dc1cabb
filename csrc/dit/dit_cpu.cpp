// CPU implementations of the SANA DiT block kernels (adaLN modulation, gated residual, depthwise
// conv + GLU, ReLU linear attention): rows / pixels / heads spread over OpenMP threads, fp32 math
// in per-thread row buffers (vectorized by the compiler), one rounding to the storage dtype.
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

// Channels are processed in blocks of kConvBlock so the a / g accumulators stay in L1 across the
// 9 taps; the GLU is applied to each block right away.
constexpr int64_t kConvBlock = 256;

template <typename T>
void dwconv_glu_run(const T* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sxb, int64_t sxn,
                    const float* w9, const float* bias, T* out, int64_t sob, int64_t son) {
  const int64_t C2 = 2 * C;
#pragma omp parallel
  {
    alignas(64) float acc_a[kConvBlock], acc_g[kConvBlock], xa[kConvBlock], xg[kConvBlock];
#pragma omp for schedule(static)
    for (int64_t bp = 0; bp < B * H * W; ++bp) {
      const int64_t b = bp / (H * W), p = bp % (H * W);
      const int64_t row = p / W, col = p % W;
      for (int64_t c0 = 0; c0 < C; c0 += kConvBlock) {
        const int64_t cb = std::min(kConvBlock, C - c0);
        for (int64_t c = 0; c < cb; ++c) {
          acc_a[c] = bias ? bias[c0 + c] : 0.f;
          acc_g[c] = bias ? bias[C + c0 + c] : 0.f;
        }
        for (int t = 0; t < 9; ++t) {
          const int64_t rr = row + t / 3 - 1, cc = col + t % 3 - 1;
          if (rr < 0 || rr >= H || cc < 0 || cc >= W) continue;
          const float* __restrict wa = w9 + t * C2 + c0;
          const float* __restrict wg = wa + C;
          const T* src = x + b * sxb + (rr * W + cc) * sxn + c0;
          load_row(src, xa, cb);
          load_row(src + C, xg, cb);
          for (int64_t c = 0; c < cb; ++c) {
            acc_a[c] += xa[c] * wa[c];
            acc_g[c] += xg[c] * wg[c];
          }
        }
#pragma omp simd
        for (int64_t c = 0; c < cb; ++c) xa[c] = acc_a[c] * dit::silu(acc_g[c]);
        store_row(xa, out + b * sob + p * son + c0, cb);
      }
    }
  }
}

template <typename T>
void linear_attention_run(const T* q, const T* k, const T* v, int64_t B, int64_t Nq, int64_t Nk, int64_t H,
                          int64_t D, int64_t E, int64_t sqb, int64_t sqn, int64_t sqh, int64_t skb, int64_t skn,
                          int64_t skh, int64_t svb, int64_t svn, int64_t svh, T* out, int64_t sob, int64_t son,
                          int64_t soh, float eps) {
  // Phase 1: per (b, h) the state [D, E] and normaliser [D] (fp32), in a shared workspace.
  const int64_t BH = B * H, SE = D * E + D;
  std::vector<float> ws(BH * SE, 0.f);
#pragma omp parallel
  {
    std::vector<float> buf(D + E);
    float* __restrict kr = buf.data();
    float* __restrict vf = kr + D;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < BH; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* S = ws.data() + bh * SE;
      float* z = S + D * E;
      for (int64_t n = 0; n < Nk; ++n) {
        load_row(k + b * skb + n * skn + h * skh, kr, D);
        load_row(v + b * svb + n * svn + h * svh, vf, E);
        for (int64_t d = 0; d < D; ++d) {  // no zero-skip: a random branch costs more than the FMAs
          const float kd = dit::relu(kr[d]);
          z[d] += kd;
          float* __restrict Sd = S + d * E;
          for (int64_t e = 0; e < E; ++e) Sd[e] += kd * vf[e];
        }
      }
    }
    // Phase 2: every query row against its head's state.
    std::vector<float> buf2(D + E);
    float* __restrict qr = buf2.data();
    float* __restrict num = qr + D;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < BH * Nq; ++r) {
      const int64_t bh = r / Nq, n = r % Nq;
      const int64_t b = bh / H, h = bh % H;
      const float* S = ws.data() + bh * SE;
      const float* z = S + D * E;
      load_row(q + b * sqb + n * sqn + h * sqh, qr, D);
      float den = 0.f;
      for (int64_t e = 0; e < E; ++e) num[e] = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float qd = dit::relu(qr[d]);
        den += qd * z[d];
        const float* __restrict Sd = S + d * E;
        for (int64_t e = 0; e < E; ++e) num[e] += qd * Sd[e];
      }
      const float dd = den + eps;
      for (int64_t e = 0; e < E; ++e) num[e] = num[e] / dd;
      store_row(num, out + b * sob + n * son + h * soh, E);
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

void linear_attention_cpu(uintptr_t q, uintptr_t k, uintptr_t v, int dtype, int64_t B, int64_t Nq, int64_t Nk,
                          int64_t H, int64_t D, int64_t E, int64_t sqb, int64_t sqn, int64_t sqh, int64_t skb,
                          int64_t skn, int64_t skh, int64_t svb, int64_t svn, int64_t svh, uintptr_t out,
                          int64_t sob, int64_t son, int64_t soh, double eps) {
  dispatch(dtype, "linear_attention", [&](auto tag) {
    using T = decltype(tag);
    linear_attention_run(reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k),
                         reinterpret_cast<const T*>(v), B, Nq, Nk, H, D, E, sqb, sqn, sqh, skb, skn, skh, svb,
                         svn, svh, reinterpret_cast<T*>(out), sob, son, soh, float(eps));
  });
}

}  // namespace spar
