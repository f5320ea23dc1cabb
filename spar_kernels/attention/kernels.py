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

Every grid has one axis (the kernels decompose the program id), so batch x heads is not limited
by the 65535 of grid axes y and z, and offsets that multiply a head, split or row index by a
stride are 64-bit. Each row's key interval is clamped to its sequence (values never validated on
the device cannot read outside it). Head dims are padded inside the kernel to ``BLOCK_D`` (64 or
128) with masked loads on a runtime ``head_dim``; it and the strides are passed in units of the
constexpr ``ALIGN`` (16, 8 or 1, :func:`align_of`) so the loads stay 16-byte vectors for head dims
that are multiples of 8. The GQA group size and the grid sizes are runtime arguments excluded from
triton's specialization (``NO_SPECIALIZE``), so a handful of compiled variants covers every model
(``python -m spar_kernels.inspect``; the specs come from :class:`Plan`, see ``_aot_specs.py``).
Under the interpreter (``DOT_UPCAST``) the dots run in fp32 on the same 16-bit operands the GPU
multiplies: P is rounded to the dot dtype first.
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

# Integer arguments triton must not specialize at run time (as a constant when equal to 1, or as
# divisible by 16): grid sizes, the GQA group and the lse strides (total_q). Left alone they would
# compile a different kernel for a batch of one, a single query tile, MHA or one query row; their
# value changes nothing the compiler could use.
# The head dim and the q/k/v/out strides are passed in units of the constexpr ALIGN (16, 8 or 1: the
# largest dividing all of them, :func:`align_of`) and multiplied back in the kernel, so the compiler
# knows their divisibility: 16-byte vector loads for head dims like 56 or 72 (multiples of 8), one
# compiled kernel per ALIGN instead of one per stride pattern.
_UNITS_FWD = ["head_dim", "stride_qm", "stride_qh", "stride_km", "stride_kh", "stride_vm", "stride_vh", "stride_om",
              "stride_oh"]
_UNITS_PART = ["head_dim", "stride_ps", "stride_pm", "stride_ph"]
NO_SPECIALIZE = {
    "fwd": ["batch", "num_m_tiles", "group", "stride_lh"] + _UNITS_FWD,
    "decode": ["batch", "num_splits", "group", "stride_ls", "stride_lh"] + _UNITS_FWD[:7] + _UNITS_PART[1:],
    "combine": ["num_splits", "total_q", "stride_ls", "stride_lh", "stride_lo", "stride_om", "stride_oh"] + _UNITS_PART,
}


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
def _step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, seqlen_k, st, en, lo, hi, qk_scale,
          head_dim, offs_n, offs_d, MASKED: tl.constexpr, IS_FP8: tl.constexpr,
          IS_FP32: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One key tile [start_n, start_n + BLOCK_N) of the online softmax. [lo, hi): the union of
    the rows' intervals; a masked tile loads no value outside it (P is 0 there, but 0 * NaN is NaN:
    a NaN / inf value in a padded cache slot past every row's keys would reach every row)."""
    cols = start_n + offs_n
    k_ptrs = k_base + cols.to(tl.int64)[None, :] * stride_kn + offs_d[:, None]   # [BLOCK_D, BLOCK_N]
    v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_d[None, :]   # [BLOCK_N, BLOCK_D]
    d_ok = offs_d < head_dim  # the head-dim padding (all true for D = BLOCK_D)
    if MASKED:
        in_k = cols < seqlen_k
        k = tl.load(k_ptrs, mask=in_k[None, :] & d_ok[:, None], other=0.0)   # masked after the dot
        v_ok = in_k & (cols >= lo) & (cols < hi)
        v = tl.load(v_ptrs, mask=v_ok[:, None] & d_ok[None, :], other=0.0)
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
    else:  # every score -inf (a -inf query component) is a row that has seen nothing yet too
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_UPCAST:
        if IS_FP32:
            acc = tl.dot(p, v.to(tl.float32), acc)
        else:  # P rounded to the 16-bit dot dtype, exactly as the compiled branch below does
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
    elif IS_FP32:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _attend(q, k_base, v_base, stride_kn, stride_vn, st, en, lo, hi, full_lo, full_hi, seqlen_k,
            qk_scale, head_dim, offs_n, offs_d, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            IS_FP8: tl.constexpr, IS_FP32: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Visit the key tiles meeting [lo, hi): masked ones below full_lo, unmasked ones inside
    [full_lo, full_hi), masked ones above, from an empty online-softmax state. Returns the state
    (acc, m_i, l_i) and the (visited, unmasked) tile counts."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo_t = (lo // BLOCK_N) * BLOCK_N
    hi_t = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    f0 = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo_t), hi_t)
    f1 = tl.minimum(tl.maximum((full_hi // BLOCK_N) * BLOCK_N, f0), hi_t)
    for start_n in range(lo_t, f0, BLOCK_N):
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, seqlen_k, st, en,
                              lo, hi, qk_scale, head_dim, offs_n, offs_d, True, IS_FP8, IS_FP32, DOT_UPCAST)
    for start_n in range(f0, f1, BLOCK_N):
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, seqlen_k, st, en,
                              lo, hi, qk_scale, head_dim, offs_n, offs_d, False, IS_FP8, IS_FP32, DOT_UPCAST)
    for start_n in range(f1, hi_t, BLOCK_N):
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, seqlen_k, st, en,
                              lo, hi, qk_scale, head_dim, offs_n, offs_d, True, IS_FP8, IS_FP32, DOT_UPCAST)
    visited = tl.maximum(hi_t - lo_t, 0) // BLOCK_N
    return acc, m_i, l_i, visited, (f1 - f0) // BLOCK_N


@triton.jit
def _qkv_units(head_dim, stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, ALIGN: tl.constexpr):
    """The head dim and the q/k/v strides, passed in units of ALIGN (NO_SPECIALIZE), in elements."""
    return (head_dim * ALIGN, stride_qm * ALIGN, stride_qh * ALIGN, stride_km * ALIGN, stride_kh * ALIGN,
            stride_vm * ALIGN, stride_vh * ALIGN)


@triton.jit
def _program(n_inner, batch, CU_Q, CU_K):
    """The one grid axis as (inner, sequence b, head), inner fastest; and sequence b's query and key
    rows: (inner, b, head, q_start, seqlen_q, k_start, seqlen_k)."""
    pid = tl.program_id(0)
    b = (pid // n_inner) % batch
    q_start = tl.load(CU_Q + b)
    k_start = tl.load(CU_K + b)
    return (pid % n_inner, b, pid // n_inner // batch, q_start, tl.load(CU_Q + b + 1) - q_start, k_start,
            tl.load(CU_K + b + 1) - k_start)


@triton.jit(do_not_specialize=NO_SPECIALIZE["fwd"])
def _hybrid_attn_fwd(Q, K, V, O, LSE, CU_Q, CU_K, KV_START, KV_END, Q_DESCALE, K_DESCALE, V_DESCALE, TILES,
                     sm_scale_log2, head_dim, batch, num_m_tiles,
                     stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh, stride_lh,
                     group, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     IS_FP8: tl.constexpr, COUNT_TILES: tl.constexpr, ALIGN: tl.constexpr,
                     DOT_UPCAST: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    head_dim, stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh = _qkv_units(
        head_dim, stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, ALIGN)
    stride_om, stride_oh = stride_om * ALIGN, stride_oh * ALIGN
    # one grid axis: (query tile, sequence, head), query tile fastest
    pid_m, b, h, q_start, seqlen_q, k_start, seqlen_k = _program(num_m_tiles, batch, CU_Q, CU_K)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:  # grid sized by max_seqlen_q: shorter sequences end early
        return
    hk = h // group
    h64 = h.to(tl.int64)  # 64-bit offsets: head-major tensors may hold more than 2^31 elements
    hk64 = hk.to(tl.int64)
    IS_FP32: tl.constexpr = Q.dtype.element_ty == tl.float32

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    # intervals clamped to the sequence's keys: values never validated on the device cannot read
    # outside it
    st = tl.maximum(tl.load(KV_START + q_start + offs_m, mask=row_ok, other=0), 0)
    en = tl.minimum(tl.load(KV_END + q_start + offs_m, mask=row_ok, other=0), seqlen_k)
    nonempty = en > st
    lo = tl.min(tl.where(nonempty, st, _BIG), 0)
    hi = tl.max(tl.where(nonempty, en, 0), 0)
    full_lo = tl.max(tl.where(row_ok, st, 0), 0)
    full_hi = tl.min(tl.where(row_ok, en, _BIG), 0)

    rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = Q + rows[:, None] * stride_qm + h64 * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    qk_scale = sm_scale_log2
    if IS_FP8:
        q = _e4m3_to_f16(q)
        qk_scale = qk_scale * tl.load(Q_DESCALE + h) * tl.load(K_DESCALE + hk)
    k_base = K + k_start.to(tl.int64) * stride_km + hk64 * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vm + hk64 * stride_vh

    acc, m_i, l_i, visited, unmasked = _attend(q, k_base, v_base, stride_km, stride_vm, st, en, lo, hi, full_lo,
                                               full_hi, seqlen_k, qk_scale, head_dim, offs_n, offs_d, BLOCK_M,
                                               BLOCK_N, BLOCK_D, IS_FP8, IS_FP32, DOT_UPCAST)
    if COUNT_TILES:
        tl.atomic_add(TILES, visited)
        tl.atomic_add(TILES + 1, visited - unmasked)

    has = (l_i > 0.0) | (l_i != l_i)  # a NaN sum (NaN scores) gives a NaN row and lse, not an empty one
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if IS_FP8:
        out = out * tl.load(V_DESCALE + hk)
    lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) / _LOG2E, float("-inf"))
    tl.store(LSE + h64 * stride_lh + q_start + offs_m, lse, mask=row_ok)
    o_ptrs = O + rows[:, None] * stride_om + h64 * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))


@triton.jit(do_not_specialize=NO_SPECIALIZE["decode"])
def _hybrid_attn_decode(Q, K, V, O_PART, LSE_PART, CU_Q, CU_K, KV_START, KV_END, Q_DESCALE, K_DESCALE, V_DESCALE,
                        sm_scale_log2, head_dim, keys_per_split, batch, num_splits,
                        stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
                        stride_ps, stride_pm, stride_ph, stride_ls, stride_lh,
                        group, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        IS_FP8: tl.constexpr, ALIGN: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Split s of the keys for every query row x group head of (sequence b, KV head hk)."""
    head_dim, stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh = _qkv_units(
        head_dim, stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, ALIGN)
    stride_ps, stride_pm, stride_ph = stride_ps * ALIGN, stride_pm * ALIGN, stride_ph * ALIGN
    # one grid axis: (split, sequence, KV head), split fastest
    split, b, hk, q_start, seqlen_q, k_start, seqlen_k = _program(num_splits, batch, CU_Q, CU_K)
    IS_FP32: tl.constexpr = Q.dtype.element_ty == tl.float32

    r = tl.arange(0, BLOCK_M)          # tile row -> (query row r // group, head hk * group + r % group)
    qi = r // group
    h = hk * group + r % group
    h64 = h.to(tl.int64)
    row_ok = qi < seqlen_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    st = tl.maximum(tl.load(KV_START + q_start + qi, mask=row_ok, other=0), 0)   # clamped as in the prefill
    en = tl.minimum(tl.load(KV_END + q_start + qi, mask=row_ok, other=0), seqlen_k)
    s0 = split * keys_per_split
    s1 = s0 + keys_per_split
    nonempty = en > st
    lo = tl.maximum(tl.min(tl.where(nonempty, st, _BIG), 0), s0)
    hi = tl.minimum(tl.max(tl.where(nonempty, en, 0), 0), s1)
    full_lo = tl.max(tl.where(row_ok, st, 0), 0)
    full_hi = tl.min(tl.where(row_ok, en, _BIG), 0)

    rows = (q_start + qi).to(tl.int64)
    q_ptrs = Q + rows[:, None] * stride_qm + h64[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    qk_scale = tl.full([BLOCK_M], 1.0, tl.float32) * sm_scale_log2
    if IS_FP8:
        q = _e4m3_to_f16(q)
        qk_scale = qk_scale * tl.load(Q_DESCALE + h) * tl.load(K_DESCALE + hk)
    qk_scale = qk_scale[:, None]
    k_base = K + k_start.to(tl.int64) * stride_km + hk.to(tl.int64) * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vm + hk.to(tl.int64) * stride_vh

    acc, m_i, l_i, visited, unmasked = _attend(q, k_base, v_base, stride_km, stride_vm, st, en, lo, hi, full_lo,
                                               full_hi, seqlen_k, qk_scale, head_dim, offs_n, offs_d, BLOCK_M,
                                               BLOCK_N, BLOCK_D, IS_FP8, IS_FP32, DOT_UPCAST)
    has = (l_i > 0.0) | (l_i != l_i)  # NaN scores: a NaN partial and lse, which the combine keeps
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if IS_FP8:
        out = out * tl.load(V_DESCALE + hk)
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # base 2
    split64 = split.to(tl.int64)
    tl.store(LSE_PART + split64 * stride_ls + h64 * stride_lh + q_start + qi, lse, mask=row_ok)
    p_ptrs = O_PART + split64 * stride_ps + rows[:, None] * stride_pm + h64[:, None] * stride_ph + offs_d[None, :]
    tl.store(p_ptrs, out, mask=row_ok[:, None] & (offs_d[None, :] < head_dim))


@triton.jit(do_not_specialize=NO_SPECIALIZE["combine"])
def _combine_kernel(O_PART, LSE_PART, O, LSE, num_splits, head_dim, total_q,
                    stride_ps, stride_pm, stride_ph, stride_ls, stride_lh, stride_om, stride_oh, stride_lo,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    """out[i, h] = sum_s 2^(lse_s - lse) out_s over the split partials of one (row, head)."""
    head_dim = head_dim * ALIGN  # passed in units of ALIGN (NO_SPECIALIZE)
    stride_ps, stride_pm, stride_ph = stride_ps * ALIGN, stride_pm * ALIGN, stride_ph * ALIGN
    stride_om, stride_oh = stride_om * ALIGN, stride_oh * ALIGN
    pid = tl.program_id(0)  # one grid axis: (row, head), row fastest
    i = (pid % total_q).to(tl.int64)
    h = (pid // total_q).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_row = LSE_PART + h * stride_lh + i
    lse_s = tl.load(lse_row + offs_s.to(tl.int64) * stride_ls, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, output 0
    total = tl.sum(tl.math.exp2(lse_s - m_use), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    part_row = O_PART + i * stride_pm + h * stride_ph
    for _s in range(0, num_splits):  # pointers advance by one split per step (64-bit pointer math)
        w = tl.math.exp2(tl.load(lse_row) - m_use)
        acc += w * tl.load(part_row + offs_d, mask=offs_d < head_dim, other=0.0)
        lse_row += stride_ls
        part_row += stride_ps
    has = (total > 0.0) | (total != total)  # a NaN split makes the row NaN (its lse too)
    out = acc / tl.where(has, total, 1.0)
    tl.store(O + i * stride_om + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < head_dim)
    lse = tl.where(has, (m_use + tl.math.log2(tl.where(has, total, 1.0))) / _LOG2E, float("-inf"))
    tl.store(LSE + h * stride_lo + i, lse)


# ---------------------------------------------------------------------------------------------
# launch configurations: one table, chosen by padded head dim and input dtype. Every entry is
# spill-free on both sm_80 and sm_90a and uses mma / wgmma (python -m spar_kernels.inspect
# --kernel hybrid_attention).

# (BLOCK_D, dtype kind) -> (BLOCK_M, BLOCK_N, num_warps, num_stages). Kind "fp8-narrow": FP8 inputs
# whose head dim or strides are not multiples of 16 (ALIGN < 16: 8-byte loads of the bytes), which
# spill 300+ bytes on sm_80 with the "half" tiles.
_PREFILL_CONFIGS = {
    (64, "half"): (128, 64, 8, 2),   # fp16, bf16, FP8 (ALIGN 16); 4 warps spill 8-16 bytes on both archs
    (128, "half"): (128, 32, 8, 2),  # 128x64 spills on sm_80 (ORACLES); 128x32 fits both
    (64, "fp8-narrow"): (128, 32, 8, 2),
    (128, "fp8-narrow"): (128, 16, 8, 2),
    (64, "fp32"): (32, 32, 4, 1),    # fp32 dots are exact FMA loops (input_precision="ieee"), no tensor cores
    (128, "fp32"): (32, 16, 8, 1),
}
# (BLOCK_D, FP8?) -> (BLOCK_N, num_warps, num_stages) of the DECODE_BLOCK_M-row decode tile
# (fp16/bf16/fp8; fp32 inputs decode with the prefill kernel). 64 keys spill on sm_90a (D=128, 56
# bytes) and on sm_80 (FP8 D=64, 40 bytes), 32 keys with FP8 D=128 on sm_80 (8 bytes); decode is
# bound by reading K/V, so narrow key tiles cost little.
_DECODE_CONFIGS = {(64, False): (32, 4, 2), (128, False): (32, 4, 2), (64, True): (32, 4, 2),
                   (128, True): (16, 4, 2)}
_COMBINE_BLOCK_D = 128
_COMBINE_WARPS = 1
BLOCK_DS = (64, 128)


def _kind(dtype: torch.dtype, align: int = 16) -> str:
    if dtype == torch.float32:
        return "fp32"
    return "fp8-narrow" if dtype == torch.float8_e4m3fn and align < 16 else "half"  # fp8 multiplied as fp16


def block_d(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def prefill_config(head_dim: int, dtype: torch.dtype, align: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel (``align``: see
    :func:`align_of`; by default that of contiguous inputs with this head dim)."""
    return _PREFILL_CONFIGS[(block_d(head_dim), _kind(dtype, align_of(head_dim) if align is None else align))]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # the interpreter, meta and simulated devices: behave like an H100


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


_ALIGN = 16  # fp32 elements: every workspace region starts 64-byte aligned, like a fresh allocation


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class Plan:
    """The launch geometry of one call, from shapes, dtype and device only (no host sync): which
    path runs, its tiles, and the fp32 scratch regions it needs (the workspace)."""

    def __init__(self, total_q: int, hq: int, hkv: int, d: int, batch: int, max_seqlen_q: int, max_seqlen_k: int,
                 dtype: torch.dtype, device: torch.device, tile_counter: "TileCounter | None" = None,
                 align: int = 16):
        self.total_q, self.hq, self.hkv, self.d, self.batch = total_q, hq, hkv, d, batch
        self.align = align  # of the head dim and strides (align_of): in the kernels' ALIGN
        self.max_seqlen_q, self.max_seqlen_k = max_seqlen_q, max_seqlen_k
        self.group = hq // hkv
        self.bd = block_d(d)
        self.tile_counter = tile_counter
        self.decode = tile_counter is None and use_decode(max_seqlen_q, max_seqlen_k, self.group, dtype)
        if self.decode:
            self.bn, self.warps, self.stages = _DECODE_CONFIGS[(self.bd, dtype == torch.float8_e4m3fn)]
            splits = decode_splits(batch, hkv, max_seqlen_k, device)
            self.per_split = -(-max_seqlen_k // (splits * self.bn)) * self.bn
            self.splits = -(-max_seqlen_k // self.per_split)
        else:
            self.bm, self.bn, self.warps, self.stages = _PREFILL_CONFIGS[(self.bd, _kind(dtype, align))]
            if tile_counter is not None:
                self.bm, self.bn = tile_counter.block_m, tile_counter.block_n
            self.splits = 0

    def regions(self) -> dict[str, tuple[int, ...]]:
        """name -> shape of each fp32 scratch region: ``lse`` (used when the caller does not ask
        for it; the kernels always write it) and the decode path's partial outputs and LSEs."""
        r = {"lse": (self.hq, self.total_q)}
        if self.decode:
            r["o_part"] = (self.splits, self.total_q, self.hq, self.d)
            r["lse_part"] = (self.splits, self.hq, self.total_q)
        return r

    @property
    def numel(self) -> int:
        return sum(_round_up(_prod(shape)) for shape in self.regions().values())

    def carve(self, workspace: torch.Tensor | None, device) -> dict[str, torch.Tensor]:
        """The regions as views of ``workspace`` (fresh allocations when it is None)."""
        out, off = {}, 0
        for name, shape in self.regions().items():
            n = _prod(shape)
            if workspace is None:
                out[name] = torch.empty(shape, dtype=torch.float32, device=device)
            else:
                out[name] = workspace.narrow(0, off, n).view(shape)
            off += _round_up(n)
        return out

    def launches(self, q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, softmax_scale, out, lse, qd, kd, vd,
                 scratch):
        """[(kernel, grid, args, constexprs, num_warps, num_stages)]: what :func:`_impl_triton`
        launches and what the AOT specs compile (one description, so they cannot drift). ``q``,
        ``k``, ``v`` as the kernels read them (FP8 as uint8); ``scratch`` from :meth:`carve`."""
        scale_log2 = float(softmax_scale) * LOG2E
        fp8 = q.dtype == torch.uint8
        a = self.align
        common = dict(Q=q, K=k, V=v, CU_Q=cu_seqlens_q, CU_K=cu_seqlens_k, KV_START=kv_start, KV_END=kv_end,
                      Q_DESCALE=qd, K_DESCALE=kd, V_DESCALE=vd, sm_scale_log2=scale_log2, head_dim=self.d // a,
                      batch=self.batch, stride_qm=q.stride(0) // a, stride_qh=q.stride(1) // a,
                      stride_km=k.stride(0) // a, stride_kh=k.stride(1) // a, stride_vm=v.stride(0) // a,
                      stride_vh=v.stride(1) // a, group=self.group)
        if self.decode:
            o_part, lse_part = scratch["o_part"], scratch["lse_part"]
            part = dict(stride_ps=o_part.stride(0) // a, stride_pm=o_part.stride(1) // a,
                        stride_ph=o_part.stride(2) // a, stride_ls=lse_part.stride(0), stride_lh=lse_part.stride(1))
            dec = dict(common, **part, O_PART=o_part, LSE_PART=lse_part, keys_per_split=self.per_split,
                       num_splits=self.splits)
            comb = dict(part, O_PART=o_part, LSE_PART=lse_part, O=out, LSE=lse, num_splits=self.splits,
                        head_dim=self.d // a, total_q=self.total_q, stride_om=out.stride(0) // a,
                        stride_oh=out.stride(1) // a, stride_lo=lse.stride(0))
            return [
                (_hybrid_attn_decode, (_grid(self.splits * self.batch * self.hkv),), dec,
                 dict(BLOCK_M=DECODE_BLOCK_M, BLOCK_N=self.bn, BLOCK_D=self.bd, IS_FP8=fp8, ALIGN=a,
                      DOT_UPCAST=DOT_UPCAST), self.warps, self.stages),
                (_combine_kernel, (_grid(self.total_q * self.hq),), comb,
                 dict(BLOCK_S=DECODE_MAX_SPLITS, BLOCK_D=_COMBINE_BLOCK_D, ALIGN=a), _COMBINE_WARPS, 1)]
        n_m = -(-max(self.max_seqlen_q, 1) // self.bm)
        tc = self.tile_counter
        fwd = dict(common, O=out, LSE=lse, TILES=tc.counts if tc is not None else cu_seqlens_q,  # int32, unused
                   num_m_tiles=n_m, stride_om=out.stride(0) // a, stride_oh=out.stride(1) // a,
                   stride_lh=lse.stride(0))
        return [(_hybrid_attn_fwd, (_grid(n_m * self.batch * self.hq),), fwd,
                 dict(BLOCK_M=self.bm, BLOCK_N=self.bn, BLOCK_D=self.bd, IS_FP8=fp8, COUNT_TILES=tc is not None,
                      ALIGN=a, DOT_UPCAST=DOT_UPCAST), self.warps, self.stages)]


def align_of(*values: int) -> int:
    """The largest of 16 and 8 dividing every value (the head dim and the q/k/v/out strides), else 1."""
    for a in (16, 8):
        if all(v % a == 0 for v in values):
            return a
    return 1


_MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid axis x (axes y and z stop at 65535: not used)


def _grid(n: int) -> int:
    if n > _MAX_PROGRAMS:
        raise ValueError(f"hybrid_attention: the launch needs {n} programs, more than a CUDA grid holds "
                         f"({_MAX_PROGRAMS}); split the batch")
    return n


def _prod(shape) -> int:
    n = 1
    for x in shape:
        n *= int(x)
    return n


def plan_for(q, k, batch: int, max_seqlen_q: int, max_seqlen_k: int, tile_counter=None, v=None, out=None) -> Plan:
    """The plan of a call; ``v`` and ``out`` (when given) join q and k in the alignment (the
    workspace size does not depend on it)."""
    total_q, hq, d = q.shape
    strides = [s for t in (q, k, v, out) if t is not None for s in t.stride()[:2]]
    return Plan(total_q, hq, k.shape[1], d, batch, int(max_seqlen_q), int(max_seqlen_k), q.dtype, q.device,
                tile_counter, align_of(d, *strides))


def _impl_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q, max_seqlen_k, softmax_scale,
                 out, lse, q_descale, k_descale, v_descale, workspace, tile_counter=None):
    """The Triton launches; ``workspace`` (fp32, at least ``Plan.numel`` elements, or None: allocate)
    holds the scratch regions, ``lse`` may be None (then its workspace region takes it)."""
    plan = plan_for(q, k, cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, tile_counter, v, out)
    if workspace is not None and workspace.numel() < plan.numel:
        workspace = None  # too small (a direct op call): allocate instead of writing out of bounds
    scratch = plan.carve(workspace, q.device)
    if lse is None:
        lse = scratch["lse"]
    fp8 = q.dtype == torch.float8_e4m3fn
    if fp8:  # bytes: decoded in the kernel
        q, k, v = q.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    # descales: [heads] vectors (the public entry points always pass them for FP8 inputs)
    qd = q_descale if q_descale is not None else (torch.ones(plan.hq, device=q.device) if fp8 else lse)
    kd = k_descale if k_descale is not None else (torch.ones(plan.hkv, device=q.device) if fp8 else lse)
    vd = v_descale if v_descale is not None else (torch.ones(plan.hkv, device=q.device) if fp8 else lse)
    with device_guard(q):
        for fn, grid, args, consts, warps, stages in plan.launches(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start,
                                                                    kv_end, softmax_scale, out, lse, qd, kd, vd,
                                                                    scratch):
            fn[grid](**args, **consts, num_warps=warps, num_stages=stages)


class TileCounter:
    """Test hook: run the prefill kernel with ``block_m`` x ``block_n`` tiles and count, over all
    programs, the key tiles visited and masked (``counts = [visited, masked]``)."""

    def __init__(self, block_m: int, block_n: int, device="cpu"):
        self.block_m, self.block_n = block_m, block_n
        self.counts = torch.zeros(2, dtype=torch.int32, device=device)


from . import _aot_specs  # noqa: E402,F401  - registers the AOT specs (python -m spar_kernels.inspect)
