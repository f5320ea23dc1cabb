// quantize_fp8.cu: FP8 e4m3fn quantization, per token row or per tensor.
//
// Per token: one block per row reads the row once for its amax (kept in L1/L2) and once to
// quantize. Per tensor: an amax pass (atomicMax on the float bits, valid for values >= 0)
// into a one-float workspace, then the same row kernel reading the shared amax. No host sync.
// Deterministic: max is exact and does not depend on the order values meet in, so the block
// reductions and the atomicMax give the same bits on every run (no float atomicAdd anywhere).
// NaN propagates (quant::amax_combine; the atomicMax on the bits of |x| keeps it too, a positive
// NaN's bits being above +inf's), as in the reference.
// Rows move in 16-byte vectors when the row length, row stride and pointers allow it.
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "quantize_fp8/api.h"
#include "quantize_fp8/quantize_fp8.h"

namespace spar {
namespace {

constexpr int kThreads = 256;

// Warp / block max with quant::amax_combine (cuda_utils' reductions use fmaxf, which drops NaN).
__device__ __forceinline__ float warp_amax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = quant::amax_combine(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float block_amax(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_amax(v);
  __syncthreads();  // smem may still be read from a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : 0.f;
  return warp_amax(v);
}

template <typename T, int VEC>
__device__ float row_amax(const T* xr, int64_t cols) {
  float m = 0.f;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < cols; c += int64_t(blockDim.x) * VEC) {
    Vec<T, VEC> v = load_vec<T, VEC>(xr + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) m = quant::amax_combine(m, quant::abs_value(v.v[i]));
  }
  return m;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
tensor_amax_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t row_stride,
                   float* __restrict__ amax) {
  __shared__ float smem[32];
  float m = 0.f;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) m = quant::amax_combine(m, row_amax<T, VEC>(x + r * row_stride, cols));
  m = block_amax(m, smem);
  if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(amax), __float_as_int(m));
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
quantize_rows_kernel(const T* __restrict__ x, int64_t cols, int64_t row_stride, uint8_t* __restrict__ q,
                     float* __restrict__ scales, const float* __restrict__ tensor_amax) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * row_stride;
  float scale;
  if (tensor_amax == nullptr) {
    scale = quant::scale_from_amax(block_amax(row_amax<T, VEC>(xr, cols), smem));
    if (threadIdx.x == 0) scales[row] = scale;
  } else {
    scale = quant::scale_from_amax(*tensor_amax);
    if (row == 0 && threadIdx.x == 0) scales[0] = scale;
  }
  uint8_t* qr = q + row * cols;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < cols; c += int64_t(blockDim.x) * VEC) {
    Vec<T, VEC> v = load_vec<T, VEC>(xr + c);
    Vec<uint8_t, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = quant::quantize(v.v[i], scale);
    store_vec<uint8_t, VEC>(qr + c, o);
  }
}

template <typename T, int VEC>
void launch(const T* x, int64_t rows, int64_t cols, int64_t row_stride, uint8_t* q, float* scales,
            bool per_token, float* workspace, cudaStream_t stream) {
  if (rows == 0) return;
  const float* tensor_amax = nullptr;
  if (!per_token) {
    check_cuda(cudaMemsetAsync(workspace, 0, sizeof(float), stream), "quantize_fp8: memset");
    const int grid = int(rows < 1024 ? rows : 1024);
    tensor_amax_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(x, rows, cols, row_stride, workspace);
    tensor_amax = workspace;
  }
  quantize_rows_kernel<T, VEC><<<unsigned(rows), kThreads, 0, stream>>>(x, cols, row_stride, q, scales, tensor_amax);
  check_cuda(cudaGetLastError(), "quantize_fp8: launch");
}

template <typename T>
void dispatch_vec(uintptr_t x, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t q, uintptr_t scales,
                  bool per_token, uintptr_t workspace, uintptr_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = cols % kVec == 0 && row_stride % kVec == 0 && aligned16(x) && (q % kVec) == 0;
  auto* xp = reinterpret_cast<const T*>(x);
  auto* qp = reinterpret_cast<uint8_t*>(q);
  auto* sp = reinterpret_cast<float*>(scales);
  auto* wp = reinterpret_cast<float*>(workspace);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  if (vec_ok) launch<T, kVec>(xp, rows, cols, row_stride, qp, sp, per_token, wp, st);
  else launch<T, 1>(xp, rows, cols, row_stride, qp, sp, per_token, wp, st);
}

}  // namespace

void quantize_fp8_cuda(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                       uintptr_t q, uintptr_t scales, bool per_token, uintptr_t workspace, uintptr_t stream) {
  switch (static_cast<DType>(dtype)) {
    case DType::F32: return dispatch_vec<float>(x, rows, cols, row_stride, q, scales, per_token, workspace, stream);
    case DType::F16: return dispatch_vec<f16_t>(x, rows, cols, row_stride, q, scales, per_token, workspace, stream);
    case DType::BF16: return dispatch_vec<bf16_t>(x, rows, cols, row_stride, q, scales, per_token, workspace, stream);
    default: throw std::invalid_argument("quantize_fp8: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace spar
