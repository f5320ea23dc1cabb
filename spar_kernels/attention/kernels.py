"""Triton kernels of :func:`spar_kernels.hybrid_attention` (FlashAttention-2 style, one key
interval per query row).

Prefill kernel: one program per (query tile of one sequence, query head). It loads the tile's
``kv_start``/``kv_end`` once and reduces them to four scalars: the union ``[lo, hi)`` of its
non-empty rows and the common part ``[full_lo, full_hi)`` of all its rows. Key tiles outside
``[lo, hi)`` are never visited; tiles inside ``[full_lo, full_hi)`` run without any mask
arithmetic (no key bounds checks, no ``where``); the boundary tiles on either side are masked. The
inner loop loads no per-key metadata. Online softmax in base 2, fp32 accumulators.

Decode kernel (few query rows per sequence, long keys): one program per (key split, sequence,
KV head) holds every query row of the sequence times the query heads of its group in one
tile, so K/V are read once per group; partial results are merged by :func:`_combine_kernel`
with their log-sum-exps.

Head dims are padded inside the kernel to ``BLOCK_D`` (64 or 128) with masked loads on a runtime
``head_dim`` (its mask is uniform over 16 elements when head_dim % 16 == 0, which triton
specializes on, so the loads stay 16-byte vectors); the GQA group size is a runtime argument too,
so a handful of compiled variants covers every model (``python -m spar_kernels.inspect``).
FP8 (float8_e4m3fn) inputs are read as bytes (half the K/V traffic of bf16), decoded to fp16 in
registers with two integer ops and a multiply (:func:`_e4m3_to_f16`, exact) and multiplied on
fp16 tensor cores (P in fp16 too), with the per-head descales folded into the score scale and the
output. Triton has no fp8e4nv type before sm_89, and the AOT specs compile for sm_80 too, so the
native fp8 wgmma is not used.
"""

from __future__ import annotations

import torch

from .. import _aot
from .._op import device_guard
from .._triton import DOT_UPCAST, HAS_TRITON, tl, triton

LOG2E = 1.4426950408889634
# jit globals must be tl.constexpr (plain values where triton is absent and nothing is compiled)
_LOG2E = tl.constexpr(LOG2E) if HAS_TRITON else LOG2E
_BIG = tl.constexpr(1 << 30) if HAS_TRITON else 1 << 30  # "no bound" for the tile reductions (int32-safe)

# Decode path: used when every sequence has at most this many query rows, the rows of a KV
# group fit one tile, and the keys are long enough to be worth splitting.
DECODE_MAX_Q = 16
DECODE_BLOCK_M = 64         # rows of one decode tile (query rows x group heads); 64 = one wgmma
DECODE_MIN_KEYS = 512       # shorter keys: the prefill kernel is enough
DECODE_KEYS_PER_SPLIT = 256  # the least keys one split handles
DECODE_MAX_SPLITS = 64


@triton.jit
def _e4m3_to_f16(x):
    """float8_e4m3fn bits (loaded as uint8) -> float16, exactly: the sign and the 7 exponent/mantissa
    bits placed in an fp16 make the e4m3 value times 2^-8 (subnormals included: the exponent biases
    differ by 8), so a multiply by 2^8 finishes it; e4m3fn's NaN (S.1111.111) is mapped explicitly.
    Integer ops only, so the FP8 path compiles for sm_80 as well as sm_90a (triton has no fp8e4nv
    type before sm_89)."""
    u = x.to(tl.int16)
    low = u & 0x7F
    f = (((u & 0x80) << 8) | (low << 7)).to(tl.float16, bitcast=True) * 256.0
    return tl.where(low == 0x7F, float("nan"), f)


@triton.jit
def _step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, seqlen_k, st, en, qk_scale, head_dim,
          offs_n, offs_d, MASKED: tl.constexpr, IS_FP8: tl.constexpr,
          IS_FP32: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One key tile [start_n, start_n + BLOCK_N) of the online softmax."""
    cols = start_n + offs_n
    k_ptrs = k_base + cols.to(tl.int64)[None, :] * stride_kn + offs_d[:, None]   # [BLOCK_D, BLOCK_N]
    v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_d[None, :]   # [BLOCK_N, BLOCK_D]
    d_ok = offs_d < head_dim  # the head-dim padding (all true for D = BLOCK_D)
    if MASKED:
        in_k = cols < seqlen_k
        k = tl.load(k_ptrs, mask=in_k[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=in_k[:, None] & d_ok[None, :], other=0.0)
    else:  # inside [full_lo, full_hi): every key exists and is visible to every row
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    if IS_FP8:
        k = _e4m3_to_f16(k)
        v = _e4m3_to_f16(v)
    if DOT_UPCAST:
        s = tl.dot(q.to(tl.float32), k.to(tl.float32))
    elif IS_FP32:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale
    if MASKED:
        visible = (cols[None, :] >= st[:, None]) & (cols[None, :] < en[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_UPCAST:
        acc = tl.dot(p, v.to(tl.float32), acc)
    elif IS_FP32:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, st, en, lo, hi, full_lo, full_hi, seqlen_k,
            qk_scale, head_dim, offs_n, offs_d, BLOCK_N: tl.constexpr, IS_FP8: tl.constexpr,
            IS_FP32: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Visit the key tiles meeting [lo, hi): masked ones below full_lo, unmasked ones inside
    [full_lo, full_hi), masked ones above. Returns the state and (visited, unmasked) tile counts."""
    lo_t = (lo // BLOCK_N) * BLOCK_N
    hi_t = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    f0 = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo_t), hi_t)
    f1 = tl.minimum(tl.maximum((full_hi // BLOCK_N) * BLOCK_N, f0), hi_t)
    for start_n in range(lo_t, f0, BLOCK_N):
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, seqlen_k, st, en,
                              qk_scale, head_dim, offs_n, offs_d, True, IS_FP8, IS_FP32, DOT_UPCAST)
    for start_n in range(f0, f1, BLOCK_N):
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, seqlen_k, st, en,
                              qk_scale, head_dim, offs_n, offs_d, False, IS_FP8, IS_FP32, DOT_UPCAST)
    for start_n in range(f1, hi_t, BLOCK_N):
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, seqlen_k, st, en,
                              qk_scale, head_dim, offs_n, offs_d, True, IS_FP8, IS_FP32, DOT_UPCAST)
    visited = tl.maximum(hi_t - lo_t, 0) // BLOCK_N
    return acc, m_i, l_i, visited, (f1 - f0) // BLOCK_N


@triton.jit
def _hybrid_attn_fwd(Q, K, V, O, LSE, CU_Q, CU_K, KV_START, KV_END, Q_DESCALE, K_DESCALE, V_DESCALE, TILES,
                     sm_scale_log2, head_dim,
                     stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh, stride_lh,
                     group, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     IS_FP8: tl.constexpr, COUNT_TILES: tl.constexpr,
                     DOT_UPCAST: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    seqlen_q = tl.load(CU_Q + b + 1) - q_start
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:  # grid sized by max_seqlen_q: shorter sequences end early
        return
    k_start = tl.load(CU_K + b)
    seqlen_k = tl.load(CU_K + b + 1) - k_start
    hk = h // group
    IS_FP32: tl.constexpr = Q.dtype.element_ty == tl.float32

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    st = tl.load(KV_START + q_start + offs_m, mask=row_ok, other=0)
    en = tl.load(KV_END + q_start + offs_m, mask=row_ok, other=0)
    nonempty = en > st
    lo = tl.min(tl.where(nonempty, st, _BIG), 0)
    hi = tl.max(tl.where(nonempty, en, 0), 0)
    full_lo = tl.max(tl.where(row_ok, st, 0), 0)
    full_hi = tl.min(tl.where(row_ok, en, _BIG), 0)

    rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = Q + rows[:, None] * stride_qm + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    qk_scale = sm_scale_log2
    if IS_FP8:
        q = _e4m3_to_f16(q)
        qk_scale = qk_scale * tl.load(Q_DESCALE + h) * tl.load(K_DESCALE + hk)
    k_base = K + k_start.to(tl.int64) * stride_km + hk * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vm + hk * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i, visited, unmasked = _attend(acc, m_i, l_i, q, k_base, v_base, stride_km, stride_vm, st, en, lo,
                                               hi, full_lo, full_hi, seqlen_k, qk_scale, head_dim, offs_n, offs_d,
                                               BLOCK_N, IS_FP8, IS_FP32, DOT_UPCAST)
    if COUNT_TILES:
        tl.atomic_add(TILES, visited)
        tl.atomic_add(TILES + 1, visited - unmasked)

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if IS_FP8:
        out = out * tl.load(V_DESCALE + hk)
    lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) / _LOG2E, float("-inf"))
    tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=row_ok)
    o_ptrs = O + rows[:, None] * stride_om + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))


@triton.jit
def _hybrid_attn_decode(Q, K, V, O_PART, LSE_PART, CU_Q, CU_K, KV_START, KV_END, Q_DESCALE, K_DESCALE, V_DESCALE,
                        sm_scale_log2, head_dim, keys_per_split,
                        stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
                        stride_ps, stride_pm, stride_ph, stride_ls, stride_lh,
                        group, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        IS_FP8: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Split s of the keys for every query row x group head of (sequence b, KV head hk)."""
    split = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    seqlen_q = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    seqlen_k = tl.load(CU_K + b + 1) - k_start
    IS_FP32: tl.constexpr = Q.dtype.element_ty == tl.float32

    r = tl.arange(0, BLOCK_M)          # tile row -> (query row r // group, head hk * group + r % group)
    qi = r // group
    h = hk * group + r % group
    row_ok = qi < seqlen_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    st = tl.load(KV_START + q_start + qi, mask=row_ok, other=0)
    en = tl.load(KV_END + q_start + qi, mask=row_ok, other=0)
    s0 = split * keys_per_split
    s1 = s0 + keys_per_split
    nonempty = en > st
    lo = tl.maximum(tl.min(tl.where(nonempty, st, _BIG), 0), s0)
    hi = tl.minimum(tl.max(tl.where(nonempty, en, 0), 0), s1)
    full_lo = tl.max(tl.where(row_ok, st, 0), 0)
    full_hi = tl.min(tl.where(row_ok, en, _BIG), 0)

    rows = (q_start + qi).to(tl.int64)
    q_ptrs = Q + rows[:, None] * stride_qm + h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    qk_scale = tl.full([BLOCK_M], 1.0, tl.float32) * sm_scale_log2
    if IS_FP8:
        q = _e4m3_to_f16(q)
        qk_scale = qk_scale * tl.load(Q_DESCALE + h) * tl.load(K_DESCALE + hk)
    qk_scale = qk_scale[:, None]
    k_base = K + k_start.to(tl.int64) * stride_km + hk * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vm + hk * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i, visited, unmasked = _attend(acc, m_i, l_i, q, k_base, v_base, stride_km, stride_vm, st, en, lo,
                                               hi, full_lo, full_hi, seqlen_k, qk_scale, head_dim, offs_n, offs_d,
                                               BLOCK_N, IS_FP8, IS_FP32, DOT_UPCAST)
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if IS_FP8:
        out = out * tl.load(V_DESCALE + hk)
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # base 2
    tl.store(LSE_PART + split * stride_ls + h * stride_lh + q_start + qi, lse, mask=row_ok)
    p_ptrs = O_PART + split * stride_ps + rows[:, None] * stride_pm + h[:, None] * stride_ph + offs_d[None, :]
    tl.store(p_ptrs, out, mask=row_ok[:, None] & (offs_d[None, :] < head_dim))


@triton.jit
def _combine_kernel(O_PART, LSE_PART, O, LSE, num_splits, head_dim,
                    stride_ps, stride_pm, stride_ph, stride_ls, stride_lh, stride_om, stride_oh, stride_lo,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[i, h] = sum_s 2^(lse_s - lse) out_s over the split partials of one (row, head)."""
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LSE_PART + offs_s * stride_ls + h * stride_lh + i, mask=offs_s < num_splits,
                    other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, output 0
    total = tl.sum(tl.math.exp2(lse_s - m_use), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        w = tl.math.exp2(tl.load(LSE_PART + s * stride_ls + h * stride_lh + i) - m_use)
        part = tl.load(O_PART + s * stride_ps + i * stride_pm + h * stride_ph + offs_d, mask=offs_d < head_dim,
                       other=0.0)
        acc += w * part
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(O + i * stride_om + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < head_dim)
    lse = tl.where(total > 0.0, (m_use + tl.math.log2(tl.where(total > 0.0, total, 1.0))) / _LOG2E, float("-inf"))
    tl.store(LSE + h * stride_lo + i, lse)


# ---------------------------------------------------------------------------------------------
# launch configurations: one table, chosen by padded head dim and input dtype. Every entry is
# spill-free on both sm_80 and sm_90a and uses mma / wgmma (python -m spar_kernels.inspect
# --kernel hybrid_attention).

# (BLOCK_D, dtype kind) -> (BLOCK_M, BLOCK_N, num_warps, num_stages)
_PREFILL_CONFIGS = {
    (64, "half"): (128, 64, 8, 2),   # 4 warps spill 8-16 bytes on both archs
    (128, "half"): (128, 32, 8, 2),  # 128x64 spills on sm_80 (ORACLES); 128x32 fits both
    (64, "fp32"): (32, 32, 4, 1),    # fp32 dots are exact FMA loops (input_precision="ieee"), no tensor cores
    (128, "fp32"): (32, 16, 8, 1),
}
# BLOCK_D -> (BLOCK_N, num_warps, num_stages) of the DECODE_BLOCK_M-row decode tile (fp16/bf16/fp8;
# fp32 inputs decode with the prefill kernel). 64 keys spill on sm_90a (D=128, 56 bytes) and on
# sm_80 (FP8 D=64, 40 bytes); decode is bound by reading K/V, so 32-key tiles cost little.
_DECODE_CONFIGS = {64: (32, 4, 2), 128: (32, 4, 2)}
_COMBINE_BLOCK_D = 128
_COMBINE_WARPS = 1
BLOCK_DS = (64, 128)


def _kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"  # fp16, bf16 and fp8 (multiplied as fp16)


def block_d(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def prefill_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel."""
    return _PREFILL_CONFIGS[(block_d(head_dim), _kind(dtype))]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # the interpreter: behave like an H100 so the split logic is exercised


_SM_CACHE: dict[int, int] = {}


def _sm_count(index: int) -> int:
    if index not in _SM_CACHE:
        _SM_CACHE[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_CACHE[index]


def decode_splits(batch: int, hkv: int, max_seqlen_k: int, device: torch.device) -> int:
    """Key splits of the decode path: enough programs for two waves, at least
    DECODE_KEYS_PER_SPLIT keys per split, at most DECODE_MAX_SPLITS."""
    want = -(-2 * _num_sms(device) // max(1, batch * hkv))
    return max(1, min(want, -(-max_seqlen_k // DECODE_KEYS_PER_SPLIT), DECODE_MAX_SPLITS))


def use_decode(max_seqlen_q: int, max_seqlen_k: int, group: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    return (dtype != torch.float32 and 0 < max_seqlen_q <= DECODE_MAX_Q and max_seqlen_q * group <= DECODE_BLOCK_M
            and max_seqlen_k >= DECODE_MIN_KEYS)


def _impl_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q, max_seqlen_k, softmax_scale,
                 out, lse, q_descale, k_descale, v_descale, tile_counter=None):
    total_q, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    B = cu_seqlens_q.shape[0] - 1
    if lse is None:
        lse = torch.empty((Hq, total_q), dtype=torch.float32, device=q.device)
    fp8 = q.dtype == torch.float8_e4m3fn
    decode = tile_counter is None and use_decode(max_seqlen_q, max_seqlen_k, group, q.dtype)
    if fp8:  # bytes: decoded in the kernel
        q, k, v = q.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    dummy = lse  # any fp32 pointer for unused arguments
    qd = q_descale if q_descale is not None else (torch.ones(Hq, device=q.device) if fp8 else dummy)
    kd = k_descale if k_descale is not None else (torch.ones(Hkv, device=q.device) if fp8 else dummy)
    vd = v_descale if v_descale is not None else (torch.ones(Hkv, device=q.device) if fp8 else dummy)
    bd = block_d(D)
    scale_log2 = softmax_scale * LOG2E
    ctx = device_guard(q)
    with ctx:
        if decode:
            bn, warps, stages = _DECODE_CONFIGS[bd]
            splits = decode_splits(B, Hkv, max_seqlen_k, q.device)
            per_split = -(-max_seqlen_k // (splits * bn)) * bn
            splits = -(-max_seqlen_k // per_split)
            o_part = torch.empty((splits, total_q, Hq, D), dtype=torch.float32, device=q.device)
            lse_part = torch.empty((splits, Hq, total_q), dtype=torch.float32, device=q.device)
            _hybrid_attn_decode[(splits, B, Hkv)](
                q, k, v, o_part, lse_part, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, qd, kd, vd,
                scale_log2, D, per_split,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
                group, BLOCK_M=DECODE_BLOCK_M, BLOCK_N=bn, BLOCK_D=bd, IS_FP8=fp8,
                DOT_UPCAST=DOT_UPCAST, num_warps=warps, num_stages=stages)
            _combine_kernel[(total_q, Hq)](
                o_part, lse_part, out, lse, splits, D,
                o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
                out.stride(0), out.stride(1), lse.stride(0),
                BLOCK_S=DECODE_MAX_SPLITS, BLOCK_D=_COMBINE_BLOCK_D, num_warps=_COMBINE_WARPS)
            return
        bm, bn, warps, stages = _PREFILL_CONFIGS[(bd, _kind(q.dtype))]
        if tile_counter is not None:
            bm, bn = tile_counter.block_m, tile_counter.block_n
        grid = (triton.cdiv(max(max_seqlen_q, 1), bm), B, Hq)
        _hybrid_attn_fwd[grid](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, qd, kd, vd,
            tile_counter.counts if tile_counter is not None else cu_seqlens_q,  # int32, unused
            scale_log2, D,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), group,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IS_FP8=fp8,
            COUNT_TILES=tile_counter is not None, DOT_UPCAST=DOT_UPCAST, num_warps=warps, num_stages=stages)


class TileCounter:
    """Test hook: run the prefill kernel with ``block_m`` x ``block_n`` tiles and count, over all
    programs, the key tiles visited and masked (``counts = [visited, masked]``)."""

    def __init__(self, block_m: int, block_n: int, device="cpu"):
        self.block_m, self.block_n = block_m, block_n
        self.counts = torch.zeros(2, dtype=torch.int32, device=device)




# ---------------------------------------------------------------------------------------------
# AOT specs: every configuration the launcher can pick

_STRIDES_FWD = ("stride_qm", "stride_qh", "stride_km", "stride_kh", "stride_vm", "stride_vh", "stride_om",
                "stride_oh", "stride_lh")
_STRIDES_DEC = ("stride_qm", "stride_qh", "stride_km", "stride_kh", "stride_vm", "stride_vh", "stride_ps",
                "stride_pm", "stride_ph", "stride_ls", "stride_lh")


_ALIGNED_FWD = ("Q", "K", "V", "O", "LSE", "head_dim") + tuple(n for n in _STRIDES_FWD if n != "stride_lh")
_ALIGNED_DEC = ("Q", "K", "V", "O_PART", "LSE_PART", "head_dim", "keys_per_split") + tuple(
    n for n in _STRIDES_DEC if n not in ("stride_ls", "stride_lh"))  # those are multiples of total_q


@_aot.register
def _aot_specs():
    """The base variants plus how triton specializes them at run time for the models' shapes:
    ``group == 1`` (plain multi-head attention, e.g. SANA's cross-attention) becomes a constant, and
    head_dim 72 is not a multiple of 16 (its masked loads are then checked element-wise)."""
    import dataclasses

    for spec in _base_specs():
        yield spec
        if spec.fn is _combine_kernel or "bf16" not in spec.config:
            continue
        yield dataclasses.replace(spec, config=spec.config + " group=1", constexprs=dict(spec.constexprs, group=1))
        if spec.constexprs["BLOCK_D"] == 128:
            yield dataclasses.replace(spec, config=spec.config + " head_dim=72",
                                      aligned=tuple(a for a in spec.aligned if a != "head_dim"))


def _base_specs():
    """Every kernel variant the launcher compiles: (input dtype) x (BLOCK_D 64 / 128) for prefill
    and decode, plus the combine kernel per output dtype. head_dim and the strides are specialized
    as multiples of 16, as triton does at run time for head dims 16, 32, 64, 80, 96, 112, 128."""
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float32):
        fp8 = dtype == torch.float8_e4m3fn
        t = "u8" if fp8 else _aot.TRITON_DTYPE[dtype]
        o_t = "bf16" if fp8 else t
        for bd in BLOCK_DS:
            bm, bn, warps, stages = _PREFILL_CONFIGS[(bd, _kind(dtype))]
            sig = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "O": f"*{o_t}", "LSE": "*fp32", "CU_Q": "*i32",
                   "CU_K": "*i32", "KV_START": "*i32", "KV_END": "*i32", "Q_DESCALE": "*fp32", "K_DESCALE": "*fp32",
                   "V_DESCALE": "*fp32", "TILES": "*i32", "sm_scale_log2": "fp32"}
            yield _aot.AOTSpec(
                kernel_name="hybrid_attention", fn=_hybrid_attn_fwd,
                config=f"prefill {t} D<={bd} {bm}x{bn} warps={warps} stages={stages}", types=sig,
                constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "IS_FP8": fp8, "COUNT_TILES": False,
                            "DOT_UPCAST": False},
                num_warps=warps, num_stages=stages,
                aligned=_ALIGNED_FWD,
                expect_mma=dtype != torch.float32)
            if dtype == torch.float32:
                continue  # fp32 decodes with the prefill kernel
            bn, warps, stages = _DECODE_CONFIGS[bd]
            sig = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "O_PART": "*fp32", "LSE_PART": "*fp32",
                   "CU_Q": "*i32", "CU_K": "*i32", "KV_START": "*i32", "KV_END": "*i32", "Q_DESCALE": "*fp32",
                   "K_DESCALE": "*fp32", "V_DESCALE": "*fp32", "sm_scale_log2": "fp32"}
            yield _aot.AOTSpec(
                kernel_name="hybrid_attention", fn=_hybrid_attn_decode,
                config=f"decode {t} D<={bd} {DECODE_BLOCK_M}x{bn} warps={warps} stages={stages}", types=sig,
                constexprs={"BLOCK_M": DECODE_BLOCK_M, "BLOCK_N": bn, "BLOCK_D": bd, "IS_FP8": fp8,
                            "DOT_UPCAST": False},
                num_warps=warps, num_stages=stages,
                aligned=_ALIGNED_DEC,
                expect_mma=True)
    for o_t in ("fp16", "bf16"):
        sig = {"O_PART": "*fp32", "LSE_PART": "*fp32", "O": f"*{o_t}", "LSE": "*fp32"}
        yield _aot.AOTSpec(
            kernel_name="hybrid_attention", fn=_combine_kernel,
            config=f"combine {o_t} splits<={DECODE_MAX_SPLITS} D<={_COMBINE_BLOCK_D}", types=sig,
            constexprs={"BLOCK_S": DECODE_MAX_SPLITS, "BLOCK_D": _COMBINE_BLOCK_D},
            num_warps=_COMBINE_WARPS, num_stages=1, aligned=("O_PART", "LSE_PART", "O", "LSE", "head_dim"))
