// flow_sampler.cu: one fused flow-sampler step (guidance + renorm + solver + history) per launch.
//
// Rows of the [B, P, Q] view go to a warp each (Q <= kWarpRowMax) or to a whole block, in a
// grid-stride loop. Every program reads the evaluation index from the device counter, picks its
// coefficient row from the device table, and the last block to finish advances the counter
// (a done-count in counter[1]), so N steps need no host involvement and capture in one CUDA graph.
// Renorm "row" (a norm along Q) stays in the same launch: the row is reduced, then re-read from
// L1/L2 for the update. "global" and "col" norms need the whole sample first: a stats launch
// (fp32 sums of squares in `stats`) precedes the update launch. Rows move in 4-element vectors
// when every present tensor's q-stride is 1 and the row length, strides and pointers allow it.
// Every reduction has a fixed order (no float atomics), so results are bitwise reproducible run
// to run: a row is reduced by a fixed shuffle / shared-memory tree, the global norm sums the
// per-row sums in a second stage (the last block of the stats launch), the along-P norm is
// one thread's sequential sum.
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "flow_sampler/api.h"
#include "flow_sampler/flow_sampler.h"

namespace spar {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kWarpRowMax = 512;  // rows up to this length go one per warp (8 per block)
constexpr int kMaxBlocks = 8192;      // grid-stride beyond this

template <typename TX, typename TV>
struct Params {
  const TX* x;
  const TV *vc, *vu, *vi;
  int64_t sxb, sxp, scb, scp, sub, sup, sib, sip;  // q-strides are 1 (VEC > 1) or passed below
  int64_t sxq, scq, suq, siq;
  TX* out;
  float *h1, *h2;
  const float* table;
  int64_t rows;
  int32_t* counter;
  float* stats;
  int64_t B, P, Q;
  int mode;
  float lo;
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* p, int64_t sq, float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    f[0] = to_float(p[0]);
  } else if constexpr (sizeof(T) == 2 && VEC == 4) {  // 8 bytes as two words: keeps it in registers
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    f[0] = to_float(T{uint16_t(w.x & 0xffffu)});
    f[1] = to_float(T{uint16_t(w.x >> 16)});
    f[2] = to_float(T{uint16_t(w.y & 0xffffu)});
    f[3] = to_float(T{uint16_t(w.y >> 16)});
  } else {
    Vec<T, VEC> v = load_vec<T, VEC>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = to_float(v.v[i]);
  }
  (void)sq;
}

template <int TPR>
__device__ __forceinline__ float group_sum(float v, float* smem) {
  if constexpr (TPR == 32) return warp_reduce_sum(v);
  else return block_reduce<false>(v, smem);
}

// Sums of squares of v_cond and of the guided velocity over row (b, p), reduced over the group.
template <typename TX, typename TV, int VEC, int TPR>
__device__ void row_sums(const Params<TX, TV>& a, int64_t b, int64_t p, const flow::Row& r, int lane, float* smem,
                         float* s_c, float* s_g) {
  const TV* c = a.vc + b * a.scb + p * a.scp;
  const TV* u = a.vu + b * a.sub + p * a.sup;
  const TV* i = a.vi ? a.vi + b * a.sib + p * a.sip : nullptr;
  float s0 = 0.f, s1 = 0.f;
  for (int64_t q = int64_t(lane) * VEC; q < a.Q; q += int64_t(TPR) * VEC) {
    float fc[VEC], fu[VEC], fi[VEC];
    load_f<TV, VEC>(c + q * a.scq, a.scq, fc);
    load_f<TV, VEC>(u + q * a.suq, a.suq, fu);
    if (i) load_f<TV, VEC>(i + q * a.siq, a.siq, fi);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float g = flow::guide(fc[e], fu[e], i ? fi[e] : 0.f, r);
      s0 += fc[e] * fc[e];
      s1 += g * g;
    }
  }
  *s_c = group_sum<TPR>(s0, smem);
  *s_g = group_sum<TPR>(s1, smem);
}

// The last block to finish advances the evaluation counter: every block has read it by then,
// and no other block writes it, so re-reading it here (instead of keeping k live in a register
// across the row loop) is safe.
__device__ __forceinline__ void finish(int32_t* counter) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned prev = atomicAdd(reinterpret_cast<unsigned*>(counter + 1), 1u);
    if (prev == gridDim.x - 1) {
      volatile int32_t* c = counter;
      c[0] = c[0] + 1;
      c[1] = 0;
    }
  }
}

template <typename TX, typename TV, int VEC, int TPR>
__global__ void __launch_bounds__(kThreads, 1) step_kernel(Params<TX, TV> a) {
  __shared__ float smem[32];
  const int32_t k = *reinterpret_cast<volatile int32_t*>(a.counter);
  const flow::Row r = flow::load_row(a.table, a.rows, k);
  if (flow::missing_input(r, a.vu, a.vi, a.h1, a.h2)) __trap();  // the Python API never lets this happen
  const bool ren = flow::renorm_on(r, a.mode);
  constexpr int kGroups = kThreads / TPR;
  const int lane = threadIdx.x % TPR;
  const int64_t nrows = a.B * a.P;
  for (int64_t rr = int64_t(blockIdx.x) * kGroups + threadIdx.x / TPR; rr < nrows;
       rr += int64_t(gridDim.x) * kGroups) {
    const int64_t b = rr / a.P, p = rr % a.P;
    float scale = 1.f;
    if (ren && a.mode == flow::kRenormRow) {
      float sc, sg;
      row_sums<TX, TV, VEC, TPR>(a, b, p, r, lane, smem, &sc, &sg);
      scale = flow::renorm_scale(sc, sg, a.lo);
    } else if (ren && a.mode == flow::kRenormGlobal) {
      scale = flow::renorm_scale(a.stats[2 * b], a.stats[2 * b + 1], a.lo);
    }
    const bool per_q = ren && a.mode == flow::kRenormCol;
    const TX* x = a.x + b * a.sxb + p * a.sxp;
    const TV* c = a.vc + b * a.scb + p * a.scp;
    const TV* u = a.vu ? a.vu + b * a.sub + p * a.sup : nullptr;
    const TV* i = a.vi ? a.vi + b * a.sib + p * a.sip : nullptr;
    const int64_t base = rr * a.Q;
    for (int64_t q = int64_t(lane) * VEC; q < a.Q; q += int64_t(TPR) * VEC) {
      float fx[VEC], fc[VEC], fu[VEC], fi[VEC];
      load_f<TX, VEC>(x + q * a.sxq, a.sxq, fx);
      load_f<TV, VEC>(c + q * a.scq, a.scq, fc);
      if (u) load_f<TV, VEC>(u + q * a.suq, a.suq, fu);
      if (i) load_f<TV, VEC>(i + q * a.siq, a.siq, fi);
      Vec<float, VEC> h1, h2;
      if (r.flags & flow::kReadH1) h1 = load_vec<float, VEC>(a.h1 + base + q);
      if (r.flags & flow::kReadH2) h2 = load_vec<float, VEC>(a.h2 + base + q);
      Vec<TX, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float s = per_q ? flow::renorm_scale(a.stats[2 * (b * a.Q + q + e)], a.stats[2 * (b * a.Q + q + e) + 1], a.lo)
                              : scale;
        const float v = flow::velocity(fc[e], u ? fu[e] : 0.f, i ? fi[e] : 0.f, r, s);
        o.v[e] = from_float<TX>(flow::update(fx[e], v, h1.v[e], h2.v[e], r));
      }
      store_vec<TX, VEC>(a.out + base + q, o);
      if (r.flags & (flow::kStoreH1X | flow::kStoreH1X0)) store_vec<float, VEC>(a.h1 + base + q, h1);
      if (r.flags & flow::kStoreH2V) store_vec<float, VEC>(a.h2 + base + q, h2);
    }
  }
  finish(a.counter);
}

// "global", stage 1: the sums of squares of every row into stats[2B + 2 rr], [2B + 2 rr + 1];
// stage 2, in the last block to finish (a done count in counter[1], reset afterwards): per
// sample, the block sums its P row sums in a fixed order into stats[2b], stats[2b + 1].
template <typename TX, typename TV, int VEC, int TPR>
__global__ void __launch_bounds__(kThreads) stats_global_kernel(Params<TX, TV> a) {
  __shared__ float smem[32];
  __shared__ bool last;
  const int32_t k = *reinterpret_cast<volatile int32_t*>(a.counter);
  const flow::Row r = flow::load_row(a.table, a.rows, k);
  if (!flow::renorm_on(r, a.mode)) return;  // uniform: the whole grid leaves
  if (flow::missing_input(r, a.vu, a.vi, a.h1, a.h2)) __trap();
  constexpr int kGroups = kThreads / TPR;
  const int lane = threadIdx.x % TPR;
  float* row_ss = a.stats + 2 * a.B;
  for (int64_t rr = int64_t(blockIdx.x) * kGroups + threadIdx.x / TPR; rr < a.B * a.P;
       rr += int64_t(gridDim.x) * kGroups) {
    float sc, sg;
    row_sums<TX, TV, VEC, TPR>(a, rr / a.P, rr % a.P, r, lane, smem, &sc, &sg);
    if (lane == 0) {
      row_ss[2 * rr] = sc;
      row_ss[2 * rr + 1] = sg;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // this block's row sums are visible before it counts itself done
    last = atomicAdd(reinterpret_cast<unsigned*>(a.counter + 1), 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int64_t b = 0; b < a.B; ++b) {
    float s0 = 0.f, s1 = 0.f;
    for (int64_t p = threadIdx.x; p < a.P; p += kThreads) {  // L2 loads: other blocks wrote these
      s0 += __ldcg(row_ss + 2 * (b * a.P + p));
      s1 += __ldcg(row_ss + 2 * (b * a.P + p) + 1);
    }
    s0 = block_reduce<false>(s0, smem);
    s1 = block_reduce<false>(s1, smem);
    if (threadIdx.x == 0) {
      a.stats[2 * b] = s0;
      a.stats[2 * b + 1] = s1;
    }
  }
  if (threadIdx.x == 0) a.counter[1] = 0;  // the update launch counts its own blocks
}

// "col": one thread per (b, q) sums over p (coalesced along q).
template <typename TX, typename TV>
__global__ void __launch_bounds__(kThreads) stats_col_kernel(Params<TX, TV> a) {
  const int32_t k = *reinterpret_cast<volatile int32_t*>(a.counter);
  const flow::Row r = flow::load_row(a.table, a.rows, k);
  if (!flow::renorm_on(r, a.mode)) return;
  if (flow::missing_input(r, a.vu, a.vi, a.h1, a.h2)) __trap();
  for (int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x; j < a.B * a.Q; j += int64_t(gridDim.x) * kThreads) {
    const int64_t b = j / a.Q, q = j % a.Q;
    float s0 = 0.f, s1 = 0.f;
    for (int64_t p = 0; p < a.P; ++p) {
      const float c = to_float(a.vc[b * a.scb + p * a.scp + q * a.scq]);
      const float u = to_float(a.vu[b * a.sub + p * a.sup + q * a.suq]);
      const float i = a.vi ? to_float(a.vi[b * a.sib + p * a.sip + q * a.siq]) : 0.f;
      const float g = flow::guide(c, u, i, r);
      s0 += c * c;
      s1 += g * g;
    }
    a.stats[2 * j] = s0;
    a.stats[2 * j + 1] = s1;
  }
}

template <int VEC, int TPR, typename TX, typename TV>
void launch_step(const Params<TX, TV>& a, cudaStream_t stream) {
  const int64_t groups = kThreads / TPR;
  const int64_t nrows = a.B * a.P;
  const int grid = int(std::min<int64_t>((nrows + groups - 1) / groups, kMaxBlocks));
  if (a.mode == flow::kRenormGlobal) {
    stats_global_kernel<TX, TV, VEC, TPR><<<grid, kThreads, 0, stream>>>(a);
  } else if (a.mode == flow::kRenormCol) {
    const int g = int(std::min<int64_t>((a.B * a.Q + kThreads - 1) / kThreads, kMaxBlocks));
    stats_col_kernel<TX, TV><<<g, kThreads, 0, stream>>>(a);
  }
  step_kernel<TX, TV, VEC, TPR><<<grid, kThreads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "flow_sampler_step: launch");
}

template <typename TX, typename TV>
void dispatch(Params<TX, TV> a, cudaStream_t stream) {
  constexpr int V = 4;
  auto ok = [&](const void* p, int64_t sb, int64_t sp, int64_t sq, size_t es) {
    return p == nullptr || (sq == 1 && sb % V == 0 && sp % V == 0 && (reinterpret_cast<uintptr_t>(p) % (V * es)) == 0);
  };
  const bool vec = a.Q % V == 0 && ok(a.x, a.sxb, a.sxp, a.sxq, sizeof(TX)) && ok(a.vc, a.scb, a.scp, a.scq, sizeof(TV)) &&
                   ok(a.vu, a.sub, a.sup, a.suq, sizeof(TV)) && ok(a.vi, a.sib, a.sip, a.siq, sizeof(TV)) &&
                   ok(a.out, 0, 0, 1, sizeof(TX)) && ok(a.h1, 0, 0, 1, 4) && ok(a.h2, 0, 0, 1, 4);
  const bool warp_rows = a.Q <= kWarpRowMax;
  if (vec) {
    if (warp_rows) launch_step<V, 32>(a, stream);
    else launch_step<V, kThreads>(a, stream);
  } else {
    if (warp_rows) launch_step<1, 32>(a, stream);
    else launch_step<1, kThreads>(a, stream);
  }
}

template <typename TX, typename TV>
void make(int64_t B, int64_t P, int64_t Q, uintptr_t x, int64_t sxb, int64_t sxp, int64_t sxq, uintptr_t vc,
          int64_t scb, int64_t scp, int64_t scq, uintptr_t vu, int64_t sub, int64_t sup, int64_t suq, uintptr_t vi,
          int64_t sib, int64_t sip, int64_t siq, uintptr_t out, uintptr_t h1, uintptr_t h2, uintptr_t table,
          int64_t rows, uintptr_t counter, uintptr_t stats, int mode, float lo, cudaStream_t stream) {
  Params<TX, TV> a{reinterpret_cast<const TX*>(x), reinterpret_cast<const TV*>(vc), reinterpret_cast<const TV*>(vu),
                   reinterpret_cast<const TV*>(vi), sxb, sxp, scb, scp, sub, sup, sib, sip, sxq, scq, suq, siq,
                   reinterpret_cast<TX*>(out), reinterpret_cast<float*>(h1), reinterpret_cast<float*>(h2),
                   reinterpret_cast<const float*>(table), rows, reinterpret_cast<int32_t*>(counter),
                   reinterpret_cast<float*>(stats), B, P, Q, mode, lo};
  dispatch(a, stream);
}

template <typename TX>
void dispatch_v(int v_dtype, int64_t B, int64_t P, int64_t Q, uintptr_t x, int64_t sxb, int64_t sxp, int64_t sxq,
                uintptr_t vc, int64_t scb, int64_t scp, int64_t scq, uintptr_t vu, int64_t sub, int64_t sup,
                int64_t suq, uintptr_t vi, int64_t sib, int64_t sip, int64_t siq, uintptr_t out, uintptr_t h1,
                uintptr_t h2, uintptr_t table, int64_t rows, uintptr_t counter, uintptr_t stats, int mode, float lo,
                cudaStream_t st) {
#define SPAR_FS_ARGS B, P, Q, x, sxb, sxp, sxq, vc, scb, scp, scq, vu, sub, sup, suq, vi, sib, sip, siq, out, h1, h2, \
                     table, rows, counter, stats, mode, lo, st
  switch (static_cast<DType>(v_dtype)) {
    case DType::F32: return make<TX, float>(SPAR_FS_ARGS);
    case DType::F16: return make<TX, f16_t>(SPAR_FS_ARGS);
    case DType::BF16: return make<TX, bf16_t>(SPAR_FS_ARGS);
    default: throw std::invalid_argument("flow_sampler_step: unsupported branch dtype code " + std::to_string(v_dtype));
  }
#undef SPAR_FS_ARGS
}

}  // namespace

// the parameters: flow_sampler/api.h
void flow_sampler_step_cuda(SPAR_FLOW_SAMPLER_STEP_PARAMS, uintptr_t stream) {
  if (renorm_mode < flow::kRenormNone || renorm_mode > flow::kRenormCol)
    throw std::invalid_argument("flow_sampler_step: unknown renorm mode " + std::to_string(renorm_mode));
  // v_uncond / v_img_uncond are needed only at steps where guidance is on: the row is on the
  // device, so the kernels check flow::missing_input (Python checks it on its host copy first)
  if ((renorm_mode == flow::kRenormGlobal || renorm_mode == flow::kRenormCol) && stats == 0)
    throw std::invalid_argument("flow_sampler_step: global / col renorm needs the stats workspace");
  if (B * P * Q == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
#define SPAR_FS_ARGS v_dtype, B, P, Q, x, sxb, sxp, sxq, vc, scb, scp, scq, vu, sub, sup, suq, vi, sib, sip, siq, out, \
                     h1, h2, table, rows, counter, stats, renorm_mode, renorm_min, st
  switch (static_cast<DType>(x_dtype)) {
    case DType::F32: return dispatch_v<float>(SPAR_FS_ARGS);
    case DType::F16: return dispatch_v<f16_t>(SPAR_FS_ARGS);
    case DType::BF16: return dispatch_v<bf16_t>(SPAR_FS_ARGS);
    default: throw std::invalid_argument("flow_sampler_step: unsupported state dtype code " + std::to_string(x_dtype));
  }
#undef SPAR_FS_ARGS
}

}  // namespace spar
