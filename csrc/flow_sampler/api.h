// Launch entry points of the fused flow-sampler step, in plain C++ types (no torch, no CUDA
// headers), so the pybind11 bindings compile with any host compiler.
//
// The state is viewed as [B, P, Q]; element (b, p, q) of tensor t lives at
// t + b * sb + p * sp + q * sq (strides in elements). out, h1, h2 are contiguous [B, P, Q].
//   x_dtype / v_dtype: DType codes of the state (x, out) and of the three branches
//   vu / vi: 0 when absent (the table never turns their use on then)
//   h1 / h2: fp32 solver history, 0 when the method has none
//   table: `rows` x flow::kNumCols float32 coefficient rows (the last is the identity)
//   counter: int32[2] on the same device: {evaluation index, block-done count (CUDA only)}
//   stats: fp32 workspace of the CUDA global renorm (2 * B * (P + 1) floats: per-sample sums, then
//          per-row sums) or col renorm (2 * B * Q floats), else 0 (the CPU twin ignores it)
//   renorm_mode: flow::Renorm; renorm_min: the lower clamp of the renorm factor
#pragma once
#include <cstdint>

// The parameters both entry points take (the CUDA one adds the cudaStream_t), written once: the
// declarations below and the definitions in flow_sampler_cpu.cpp / flow_sampler.cu use this list.
#define SPAR_FLOW_SAMPLER_STEP_PARAMS                                                      \
  int x_dtype, int v_dtype, int64_t B, int64_t P, int64_t Q,                               \
  uintptr_t x, int64_t sxb, int64_t sxp, int64_t sxq,                                      \
  uintptr_t vc, int64_t scb, int64_t scp, int64_t scq,                                     \
  uintptr_t vu, int64_t sub, int64_t sup, int64_t suq,                                     \
  uintptr_t vi, int64_t sib, int64_t sip, int64_t siq,                                     \
  uintptr_t out, uintptr_t h1, uintptr_t h2, uintptr_t table, int64_t rows,                \
  uintptr_t counter, uintptr_t stats, int renorm_mode, float renorm_min

namespace spar {
void flow_sampler_step_cpu(SPAR_FLOW_SAMPLER_STEP_PARAMS);
// The same call with its 30 arguments packed, in the order above, in an int64 array at `args`
// (renorm_min as the bits of a double in the last slot): one argument to convert per call, for
// the eager fast path that replays a step's arguments.
void flow_sampler_step_cpu_packed(uintptr_t args);
void flow_sampler_step_cuda(SPAR_FLOW_SAMPLER_STEP_PARAMS, uintptr_t stream);
}  // namespace spar
