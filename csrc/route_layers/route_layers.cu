// route_layers.cu: Dynamic Token Routing, one output row per warp (narrow rows) or per block.
//
// Each row: the first warp computes the K softmax coefficients (lane k owns layer k) and the K
// row offsets into shared memory; then every thread accumulates its columns of
// m = sum_k c_k * hidden[layer_ids[k], r] in fp32 registers (one read of the K rows, 16-byte
// vector loads when D, the strides and the pointers allow it, a scalar path with any stride_d
// otherwise), reduces the LayerNorm mean and centered sum of squares from registers, and writes
// the row once. The scalar math is route_layers.h, shared with the CPU twin. No host sync:
// out-of-range ids/rows are detected here and give NaN rows. ln_weight / ln_bias may be absent
// (null: weight 1, bias 0) and alpha is read in its own dtype, so a call allocates nothing.
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "route_layers/api.h"
#include "route_layers/route_layers.h"

namespace spar {
namespace {

constexpr int kBlockThreads = 256;  // block-per-row kernels
constexpr int kWarpRows = 4;        // warp-per-row kernels: rows (warps) per block
constexpr int kWarpChunks = 4;      // warp-per-row vector path: up to 32 * VEC * 4 columns
constexpr int kScalarWarpChunks = 16;

struct Params {
  const void* hidden;
  int64_t L, N, D, sl, sn, sd;
  const void* ids;
  bool ids64;
  int K;
  const void* logits;
  int ldt;
  int64_t lsn, lsk;
  const void* alpha;
  int adt;
  const void* w;
  const void* b;
  float tau, eps;
  const void* rows;
  bool rows64;
  int64_t M;
  void* out;
};

// VEC LayerNorm parameters at q + col as floats, or `fill` everywhere when q is null (no weight:
// 1, no bias: 0).
template <typename P, int VEC>
__device__ __forceinline__ void load_param(const P* q, int64_t col, float fill, float (&out)[VEC]) {
  if (q) {
    const Vec<P, VEC> v = load_vec<P, VEC>(q + col);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_float(v.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = fill;
  }
}

template <typename T, typename P, int VEC, int CHUNKS, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kWarpRows : kBlockThreads, WARP ? 4 : 2)
route_layers_kernel(const Params p) {
  constexpr int kSlots = WARP ? kWarpRows : 1;
  __shared__ float s_coef[kSlots][route::kMaxK];
  __shared__ int64_t s_off[kSlots][route::kMaxK];
  __shared__ int s_ok[kSlots];
  __shared__ float s_red[32];

  const int lane = threadIdx.x & 31;
  const int slot = WARP ? int(threadIdx.x >> 5) : 0;
  const int64_t i = WARP ? int64_t(blockIdx.x) * kWarpRows + slot : int64_t(blockIdx.x);
  const int tid = WARP ? lane : int(threadIdx.x);
  const int nthr = WARP ? 32 : int(blockDim.x);
  if (WARP && i >= p.M) return;  // the whole warp leaves; warp kernels never sync the block

  const int64_t D = p.D;
  T* o = static_cast<T*>(p.out) + i * D;

  if (WARP || threadIdx.x < 32) {
    const int64_t r = p.rows ? route::load_index(p.rows, p.rows64, i) : i;
    bool ok = route::in_range(r, p.N);
    float v = -INFINITY;
    int64_t off = 0;
    if (lane < p.K && ok) {
      const int64_t lid = route::load_index(p.ids, p.ids64, lane);
      ok = route::in_range(lid, p.L);
      v = route::tempered(route::load_float(p.logits, p.ldt, r * p.lsn + lane * p.lsk), p.tau);
      off = lid * p.sl + r * p.sn;
    }
    ok = __all_sync(0xffffffffu, ok);
    const float vmax = warp_reduce_max(v);
    const float e = lane < p.K ? route::shifted_exp(v, vmax) : 0.f;
    const float esum = warp_reduce_sum(e);
    if (lane < p.K) {
      s_coef[slot][lane] = route::mix_coeff(e, esum, route::load_float(p.alpha, p.adt, lane));
      s_off[slot][lane] = off;
    }
    if (lane == 0) s_ok[slot] = ok;
  }
  if (WARP) __syncwarp(); else __syncthreads();

  if (!s_ok[slot]) {
    for (int64_t c = tid; c < D; c += nthr) o[c] = from_float<T>(NAN);
    return;  // uniform across the row's threads
  }

  const T* hidden = static_cast<const T*>(p.hidden);
  float acc[CHUNKS][VEC];
#pragma unroll
  for (int ch = 0; ch < CHUNKS; ++ch)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[ch][j] = 0.f;

  for (int k = 0; k < p.K; ++k) {
    const float c = s_coef[slot][k];
    const T* x = hidden + s_off[slot][k];
#pragma unroll
    for (int ch = 0; ch < CHUNKS; ++ch) {
      const int64_t col = (int64_t(ch) * nthr + tid) * VEC;
      if (col < D) {
        if constexpr (VEC > 1) {
          const Vec<T, VEC> hv = load_vec<T, VEC>(x + col);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[ch][j] = route::mix_fma(acc[ch][j], c, to_float(hv.v[j]));
        } else {
          acc[ch][0] = route::mix_fma(acc[ch][0], c, to_float(x[col * p.sd]));
        }
      }
    }
  }

  // LayerNorm statistics from registers (masked columns hold 0 and are skipped below)
  float s = 0.f;
#pragma unroll
  for (int ch = 0; ch < CHUNKS; ++ch)
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += acc[ch][j];
  s = WARP ? warp_reduce_sum(s) : block_reduce<false>(s, s_red);
  const float mean = route::ln_mean(s, D);
  float sq = 0.f;
#pragma unroll
  for (int ch = 0; ch < CHUNKS; ++ch) {
    if ((int64_t(ch) * nthr + tid) * VEC < D) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float t = acc[ch][j] - mean;
        sq += t * t;
      }
    }
  }
  sq = WARP ? warp_reduce_sum(sq) : block_reduce<false>(sq, s_red);
  const float rstd = route::ln_rstd(sq, D, p.eps);

  const P* w = static_cast<const P*>(p.w);
  const P* b = static_cast<const P*>(p.b);
#pragma unroll
  for (int ch = 0; ch < CHUNKS; ++ch) {
    const int64_t col = (int64_t(ch) * nthr + tid) * VEC;
    if (col < D) {
      Vec<T, VEC> ov;
      float wf[VEC], bf[VEC];
      load_param<P, VEC>(w, col, 1.f, wf);
      load_param<P, VEC>(b, col, 0.f, bf);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ov.v[j] = from_float<T>(route::ln_apply(acc[ch][j], mean, rstd, wf[j], bf[j]));
      store_vec<T, VEC>(o + col, ov);
    }
  }
}

template <typename T, typename P, int VEC, int CHUNKS, bool WARP>
void launch(const Params& p, cudaStream_t stream) {
  const int64_t grid = WARP ? (p.M + kWarpRows - 1) / kWarpRows : p.M;
  const int threads = WARP ? 32 * kWarpRows : kBlockThreads;
  route_layers_kernel<T, P, VEC, CHUNKS, WARP><<<unsigned(grid), threads, 0, stream>>>(p);
}

template <typename T, typename P>
void dispatch(const Params& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const auto u = [](const void* q) { return reinterpret_cast<uintptr_t>(q); };
  const uintptr_t pal = sizeof(P) * kVec;  // alignment of a Vec<P, kVec> of weights
  const bool vec_ok = p.sd == 1 && p.D % kVec == 0 && p.sl % kVec == 0 && p.sn % kVec == 0 &&
                      aligned16(u(p.hidden)) && aligned16(u(p.out)) && u(p.w) % pal == 0 && u(p.b) % pal == 0;
  if (vec_ok) {
    if (p.D <= int64_t(32) * kVec * kWarpChunks) launch<T, P, kVec, kWarpChunks, true>(p, stream);
    else launch<T, P, kVec, kRouteMaxDCuda / (kBlockThreads * kVec), false>(p, stream);
  } else {
    if (p.D <= int64_t(32) * kScalarWarpChunks) launch<T, P, 1, kScalarWarpChunks, true>(p, stream);
    else launch<T, P, 1, kRouteMaxDCuda / kBlockThreads, false>(p, stream);
  }
}

template <typename T>
void dispatch_param(const Params& p, int param_dtype, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    dispatch<float, float>(p, stream);
  } else {
    if (static_cast<DType>(param_dtype) == DType::F32) dispatch<T, float>(p, stream);
    else dispatch<T, T>(p, stream);
  }
}

}  // namespace

void route_layers_cuda(uintptr_t hidden, int dtype, int64_t L, int64_t N, int64_t D, int64_t stride_l,
                       int64_t stride_n, int64_t stride_d, uintptr_t layer_ids, bool ids_int64, int64_t K,
                       uintptr_t logits, int logits_dtype, int64_t logits_stride_n, int64_t logits_stride_k,
                       uintptr_t alpha, int alpha_dtype, uintptr_t ln_weight, uintptr_t ln_bias, int param_dtype,
                       float tau, float eps, uintptr_t rows, bool rows_int64, int64_t M, uintptr_t out,
                       uintptr_t stream) {
  if (K < 1 || K > route::kMaxK) throw std::invalid_argument("route_layers: K must be in [1, 16], got " + std::to_string(K));
  if (D < 1 || D > kRouteMaxDCuda)
    throw std::invalid_argument("route_layers: the CUDA kernel takes 1 <= D <= 8192, got " + std::to_string(D));
  if (param_dtype != dtype && static_cast<DType>(param_dtype) != DType::F32)
    throw std::invalid_argument("route_layers: param_dtype must be hidden's dtype or float32");
  if (M == 0) return;
  const auto cp = [](uintptr_t v) { return reinterpret_cast<const void*>(v); };
  Params p{cp(hidden), L, N, D, stride_l, stride_n, stride_d, cp(layer_ids), ids_int64, int(K), cp(logits),
           logits_dtype, logits_stride_n, logits_stride_k, cp(alpha), alpha_dtype, cp(ln_weight),
           cp(ln_bias), tau, eps, cp(rows), rows_int64, M, reinterpret_cast<void*>(out)};
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (static_cast<DType>(dtype)) {
    case DType::F32: dispatch_param<float>(p, param_dtype, st); break;
    case DType::F16: dispatch_param<f16_t>(p, param_dtype, st); break;
    case DType::BF16: dispatch_param<bf16_t>(p, param_dtype, st); break;
    default: throw std::invalid_argument("route_layers: unsupported dtype code " + std::to_string(dtype));
  }
  check_cuda(cudaGetLastError(), "route_layers: launch");
}

}  // namespace spar
