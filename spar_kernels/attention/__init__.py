"""Hybrid causal/bidirectional attention over packed sequences: one key interval per query row.

    out[i, h] = softmax_j(scale * q[i, h] . k[j, h // g]) v[j, h // g]   over kv_start[i] <= j < kv_end[i]

for the keys ``j`` of row ``i``'s own sequence (``g = Hq / Hkv``, grouped-query attention).
``q [total_q, Hq, D]`` and ``k, v [total_k, Hkv, D]`` are packed like flash-attn's varlen API;
the intervals come from an :class:`~spar_kernels.AttentionLayout`. Rows with an empty interval
get zeros and ``lse = -inf``.

Implementations (``spar_kernels.backend`` forces one):

- ``"triton"``: FlashAttention-2 style kernel (:mod:`spar_kernels.attention.kernels`) that skips
  empty key tiles and masks only boundary tiles, plus a split-KV decode path for few query rows
  per sequence and a float8_e4m3fn path with per-head descales; its scratch memory (the lse when
  not returned, the decode partials, FP8 descale vectors) comes from a caller-owned ``workspace``
  (:func:`hybrid_attention_workspace`) or is allocated per call;
- ``"cpu"``: fp32 attention per sequence, in query chunks whose mask stays under
  ``_CPU_CHUNK_BYTES`` and whose keys are only the chunk's ``[min kv_start, max kv_end)``: ATen's
  fused CPU attention with an additive mask built from the intervals (explicit matmul-softmax where
  that op is missing). A sequence whose rows all see the same keys (cross-attention, a
  bidirectional connector) runs as one fused call without a mask, and so does a plain causal
  sequence and any chunk that turns out fully visible. Three batched shortcuts come first: equal-length
  plain causal or bidirectional sequences as one batched call, a small packed batch (where the
  masked pairs cost less than the per-sequence calls they save) as one call with a mask over its
  ``[total_q, total_k]`` pairs, and equal query blocks over key slots of equal stride that see
  their slot's first keys (a cross-attention over padded context slots) as one batched call with
  a key-padding mask. Which path runs is decided on the host from the layout's CPU
  tensors (numpy views, a few vectorized passes); grouped K/V heads are passed to the fused op as
  they are where it groups query heads itself;
- ``"reference"``: :mod:`spar_kernels.reference.attention` (one dense mask per sequence).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .._device import same_device
from .._op import spar_op
from .._validate import check_out, check_tensor
from ..reference import attention as _ref
from . import kernels as _kernels
from .kernels import _impl_triton
from .layout import AttentionLayout, TileWork, validate_intervals

# Head dims every backend takes: any from 8 to 128 (the models' 56, 64, 72, 96, 112, 128 and the
# small test configs' 8 to 48). The kernels pad the head dim to their BLOCK_D (64 or 128) with
# masked loads, never the caller; multiples of 8 keep 16-bit rows 16-byte aligned.
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 128
HEAD_DIMS = range(MIN_HEAD_DIM, MAX_HEAD_DIM + 1)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)

# CPU path: the fp32 scores (explicit path) or additive mask (fused path) of one query chunk stay
# under this many bytes; keys are limited to the chunk's [min kv_start, max kv_end).
_CPU_CHUNK_BYTES = 16 << 20
# ... and hold at most this many query rows, so causal rows skip the keys after their chunk.
_CPU_CHUNK_ROWS = 128
# A fused call's fixed cost, in multiply-adds of q.k products (rows x keys x heads x head dim)
# taking about as long on a Zen 3 core (~25 us): a packed batch runs as one masked call when the
# masked pairs add less than this per call saved.
_CPU_CALL_ELEMS = 1 << 17
# ... and its mask stays under this many bytes.
_CPU_MASK_BYTES = 1 << 20
# ATen's fused CPU attention (blocked online softmax, returns the log-sum-exp); takes an additive
# float mask of the query's dtype. None where this torch lacks it: the explicit path runs instead.
_CPU_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _cpu_chunk_fused(qc, kc, vc, visible, scale, g):
    """qc [C, Hq, D], kc/vc [n, Hkv, D] fp32, visible [C, n] (None: every key visible to every
    row) -> (out [C, Hq, D], lse [Hq, C])."""
    C, Hq, D = qc.shape
    Hkv, n = kc.shape[1], kc.shape[0]
    # GQA without copying K/V: the g query heads of a KV head become g * C rows of that head
    qh = qc.view(C, Hkv, g, D).permute(1, 2, 0, 3).reshape(1, Hkv, g * C, D)
    bias = None
    if visible is not None:
        bias = torch.zeros((C, n), dtype=qc.dtype).masked_fill_(~visible, float("-inf"))
        bias = bias.repeat(g, 1).view(1, 1, g * C, n)
    o, lse = _CPU_FUSED(qh, kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0), 0.0, False,
                        attn_mask=bias, scale=scale)
    return o.reshape(Hkv, g, C, D).permute(2, 0, 1, 3).reshape(C, Hq, D), lse.reshape(Hq, C)


def _cpu_chunk_explicit(qc, kc, vc, visible, scale, g):
    """Same contract as :func:`_cpu_chunk_fused`: matmul, masked softmax, matmul in fp32."""
    C, Hq, D = qc.shape
    Hkv, n = kc.shape[1], kc.shape[0]
    qh = qc.view(C, Hkv, g, D).permute(1, 2, 0, 3).reshape(Hkv, g * C, D)
    s = torch.bmm(qh, kc.permute(1, 2, 0)).view(Hkv, g, C, n)
    s.mul_(scale).masked_fill_(~visible, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # empty rows: exp(-inf) = 0
    s.sub_(m).exp_()
    l = s.sum(dim=-1, keepdim=True)
    o = torch.bmm(s.view(Hkv, g * C, n), vc.transpose(0, 1)).view(Hkv, g, C, D) / l.clamp(min=1e-38)
    return o.permute(2, 0, 1, 3).reshape(C, Hq, D), (m + torch.log(l)).view(Hq, C)


# what _cpu_sequences finds a sequence to be
_NO_ROWS, _SAME, _CAUSAL, _OTHER = 0, 1, 2, 3
# whether _CPU_FUSED takes fewer key/value heads than query heads as they are (probed on first use)
_CPU_FUSED_GQA = None
# CPU plans of recent layouts by content (every layer of a forward, the next forward of the same
# batch shape): most recent last; layouts of up to _CPU_PLAN_ROWS query rows are kept.
_CPU_PLANS: dict = {}
_CPU_PLANS_MAX = 16
_CPU_PLAN_ROWS = 4096


def _fused_takes_gqa() -> bool:
    """Whether ATen's fused CPU attention takes fewer key/value heads than query heads itself
    (grouped-query attention without copying K/V per query head); probed once, on fixed values."""
    global _CPU_FUSED_GQA
    if _CPU_FUSED_GQA is None:
        q = torch.linspace(-1.0, 1.0, 2 * 3 * 8).view(1, 2, 3, 8)
        kv = torch.linspace(1.0, -1.0, 3 * 8).view(1, 1, 3, 8)
        try:
            o = _CPU_FUSED(q, kv, kv, 0.0, True)[0]
            r = _CPU_FUSED(q, kv.expand(1, 2, 3, 8).contiguous(), kv.expand(1, 2, 3, 8).contiguous(), 0.0, True)[0]
            _CPU_FUSED_GQA = bool(torch.allclose(o, r, rtol=1e-6, atol=1e-7))
        except RuntimeError:
            _CPU_FUSED_GQA = False
    return _CPU_FUSED_GQA


def _fused_kv(k, v, g):
    """``k, v [B, Hkv, n, D]`` for the fused op with ``g * Hkv`` query heads: as they are, or
    repeated per query head where the op does not group query heads itself."""
    if g > 1 and not _fused_takes_gqa():
        return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return k, v


def _cpu_sequences(cq: np.ndarray, ck: np.ndarray, st: np.ndarray, en: np.ndarray):
    """What each sequence of a layout (host int arrays) is, from a few vectorized passes over its
    rows (no per-sequence tensor op): ``(kind, lo, hi)`` ``[B]`` arrays, kind ``_NO_ROWS``,
    ``_SAME`` (every row sees the same non-empty interval ``[lo, hi)``), ``_CAUSAL`` (as many
    queries as keys, row ``p`` sees ``[0, p + 1)``) or ``_OTHER``."""
    B = cq.size - 1
    lq, lk = np.diff(cq), np.diff(ck)
    total = int(cq[-1])
    if total == 0:
        z = np.zeros(B, np.int64)
        return np.full(B, _NO_ROWS, np.int8), z, z
    seq = np.repeat(np.arange(B), lq)
    has_rows = lq > 0
    first = np.minimum(cq[:-1], total - 1)     # each sequence's first row (any row when it has none)
    lo, hi = st[first].astype(np.int64), en[first].astype(np.int64)
    same = np.bincount(seq, weights=(st == lo[seq]) & (en == hi[seq]), minlength=B) == lq
    causal = np.bincount(seq, weights=(st == 0) & (en == np.arange(1, total + 1) - cq[:-1][seq]), minlength=B) == lq
    kind = np.where(~has_rows, _NO_ROWS, np.where(same & (hi > lo), _SAME,
                                                  np.where(causal & (lq == lk), _CAUSAL, _OTHER))).astype(np.int8)
    return kind, lo, hi


def _uniform_kind(cq, ck, st, en) -> int:
    """0, or 1 (bidirectional) / 2 (causal) when every sequence has the same length S for queries
    and keys and is plain bidirectional / plain causal (rows see ``[0, S)`` / ``[0, p + 1)``)."""
    B = cq.size - 1
    if B == 0:
        return 0
    S = int(cq[1])
    if S == 0 or not np.array_equal(cq, ck) or (np.diff(cq) != S).any() or st.any():
        return 0
    end = en.reshape(B, S)
    if (end == S).all():
        return 1
    return 2 if (end == np.arange(1, S + 1)).all() else 0


def _packed_bias(Hq, D, cq, ck, st, en):
    """The additive ``[1, 1, total_q, total_k]`` mask of a packed batch small enough to run as one
    fused call over all its rows and keys (each row's interval in its own sequence's keys): when
    the masked pairs it computes for nothing cost less than the ``B - 1`` calls it saves
    (:data:`_CPU_CALL_ELEMS`), the mask is at most ``_CPU_MASK_BYTES`` and every row sees a key;
    else None."""
    B = cq.size - 1
    tq, tk = int(cq[-1]), int(ck[-1])
    if B < 2 or 4 * tq * tk > _CPU_MASK_BYTES:
        return None
    lq, lk = np.diff(cq).astype(np.int64), np.diff(ck).astype(np.int64)
    if (tq * tk - int((lq * lk).sum())) * Hq * D > (B - 1) * _CPU_CALL_ELEMS or not (en > st).all():
        return None
    first_key = np.repeat(ck[:-1], lq)                         # each row's sequence's first key
    j = np.arange(tk)
    visible = (j >= (first_key + st)[:, None]) & (j < (first_key + en)[:, None])
    with torch.inference_mode(False):   # kept across calls: an ordinary tensor even when built in inference mode
        return torch.from_numpy(np.where(visible, np.float32(0.0), np.float32(-np.inf))).view(1, 1, tq, tk)


def _slot_keys(Hq, D, cq, ck, st, en):
    """``(n_max, mask)`` when the layout is R equal query blocks over R key slots of equal stride
    whose rows all see the first ``n_r`` keys of their slot (a cross-attention over padded context
    slots): one batched fused call over the slots' first ``n_max`` keys, ``mask`` the additive
    ``[R, 1, 1, n_max]`` key-padding mask (None when every ``n_r`` is ``n_max``). None when the
    layout is not that, or when the padding keys cost more than the ``R - 1`` calls saved."""
    B = cq.size - 1
    if B < 2 or int(cq[-1]) == 0:
        return None
    Lq, Sk = int(cq[1]), int(ck[1])
    if Lq == 0 or Sk == 0 or (np.diff(cq) != Lq).any() or (np.diff(ck) != Sk).any() or st.any():
        return None
    n = en[::Lq].astype(np.int64)
    if (n < 1).any() or not np.array_equal(en.reshape(B, Lq), np.repeat(n[:, None], Lq, 1)):
        return None
    n_max = int(n.max())
    if int(B * n_max - n.sum()) * Lq * Hq * D > (B - 1) * _CPU_CALL_ELEMS:
        return None
    if (n == n_max).all():
        return n_max, None
    with torch.inference_mode(False):   # kept across calls (see _packed_bias)
        keep = np.arange(n_max)[None, :] < n[:, None]
        return n_max, torch.from_numpy(np.where(keep, np.float32(0.0), np.float32(-np.inf))).view(B, 1, 1, n_max)


class _CpuPlan(NamedTuple):
    """How the CPU path runs a layout: ``uniform`` (:func:`_uniform_kind`), ``bias``
    (:func:`_packed_bias`), ``slots`` (:func:`_slot_keys`), and per sequence the offsets and :func:`_cpu_sequences`' kinds."""
    uniform: int
    bias: torch.Tensor | None
    slots: tuple | None
    cq: list
    ck: list
    kind: list
    lo: list
    hi: list


def _cpu_plan(Hq: int, D: int, cq: np.ndarray, ck: np.ndarray, st: np.ndarray, en: np.ndarray) -> _CpuPlan:
    """The plan of a layout given by its host arrays, kept by content for small layouts (a key of
    the arrays' bytes: a layout changed in place, as a decode step's, gets its own plan)."""
    key = None
    if st.size <= _CPU_PLAN_ROWS:
        key = (Hq, D, cq.size, st.size, b"".join((cq.tobytes(), ck.tobytes(), st.tobytes(), en.tobytes())))
        plan = _CPU_PLANS.pop(key, None)
        if plan is not None:
            _CPU_PLANS[key] = plan
            return plan
    uniform = _uniform_kind(cq, ck, st, en) if _CPU_FUSED is not None else 0
    bias = _packed_bias(Hq, D, cq, ck, st, en) if _CPU_FUSED is not None and not uniform else None
    slots = _slot_keys(Hq, D, cq, ck, st, en) if _CPU_FUSED is not None and not uniform and bias is None else None
    kind, lo, hi = _cpu_sequences(cq, ck, st, en)
    plan = _CpuPlan(uniform, bias, slots, cq.tolist(), ck.tolist(), kind.tolist(), lo.tolist(), hi.tolist())
    if key is not None:
        _CPU_PLANS[key] = plan
        while len(_CPU_PLANS) > _CPU_PLANS_MAX:
            _CPU_PLANS.pop(next(iter(_CPU_PLANS)))
    return plan


def _cpu_uniform(q, k, v, plan, scale, out, lse, q_descale, k_descale, v_descale) -> bool:
    """One batched fused call when every sequence has the same length S for queries and keys and the
    layout is plain causal or plain bidirectional within each sequence (LLM prefill of equal-length
    prompts, padding-free encoders). Returns False (doing nothing) for any other layout."""
    if not plan.uniform or not out.is_contiguous() or (lse is not None and not lse.is_contiguous()):
        return False
    B = len(plan.cq) - 1
    S = plan.cq[1]
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    f32 = torch.float32
    qb = _ref.dequantize(q, q_descale, f32).view(B, S, Hq, D).transpose(1, 2)
    kb = _ref.dequantize(k, k_descale, f32).view(B, S, Hkv, D).transpose(1, 2)
    vb = _ref.dequantize(v, v_descale, f32).view(B, S, Hkv, D).transpose(1, 2)
    kb, vb = _fused_kv(kb, vb, Hq // Hkv)
    o, l = _CPU_FUSED(qb, kb, vb, 0.0, plan.uniform == 2, scale=scale)               # [B, Hq, S, D], [B, Hq, S]
    out.view(B, S, Hq, D).copy_(o.transpose(1, 2))
    if lse is not None:
        lse.view(Hq, B, S).copy_(l.transpose(0, 1))
    return True


def _cpu_packed_masked(q, k, v, plan, scale, out, lse, q_descale, k_descale, v_descale) -> bool:
    """A small packed batch (a prefill of a few short prompts, any intervals) as one fused call
    over all its rows and keys with the plan's additive mask (:func:`_packed_bias`). Returns False
    (doing nothing) when the plan has none."""
    if plan.bias is None:
        return False
    f32 = torch.float32
    qh = _ref.dequantize(q, q_descale, f32).transpose(0, 1).unsqueeze(0)
    kh, vh = _fused_kv(_ref.dequantize(k, k_descale, f32).transpose(0, 1).unsqueeze(0),
                       _ref.dequantize(v, v_descale, f32).transpose(0, 1).unsqueeze(0), q.shape[1] // k.shape[1])
    o, l = _CPU_FUSED(qh, kh, vh, 0.0, False, attn_mask=plan.bias, scale=scale)      # [1, Hq, tq, D], [1, Hq, tq]
    out.copy_(o[0].transpose(0, 1))
    if lse is not None:
        lse.copy_(l[0])
    return True


def _cpu_slots(q, k, v, plan, scale, out, lse, q_descale, k_descale, v_descale) -> bool:
    """Equal query blocks over padded key slots (:func:`_slot_keys`) as one batched fused call
    with a key-padding mask. Returns False (doing nothing) for any other layout."""
    if plan.slots is None or not out.is_contiguous() or (lse is not None and not lse.is_contiguous()):
        return False
    n_max, mask = plan.slots
    B = len(plan.cq) - 1
    Lq, Sk = plan.cq[1], plan.ck[1]
    Hq, D, Hkv = q.shape[1], q.shape[2], k.shape[1]
    f32 = torch.float32
    qb = _ref.dequantize(q, q_descale, f32).view(B, Lq, Hq, D).transpose(1, 2)
    kb = _ref.dequantize(k, k_descale, f32).view(B, Sk, Hkv, D)[:, :n_max].transpose(1, 2)
    vb = _ref.dequantize(v, v_descale, f32).view(B, Sk, Hkv, D)[:, :n_max].transpose(1, 2)
    kb, vb = _fused_kv(kb, vb, Hq // Hkv)
    o, l = _CPU_FUSED(qb, kb, vb, 0.0, False, attn_mask=mask, scale=scale)          # [B, Hq, Lq, D], [B, Hq, Lq]
    out.view(B, Lq, Hq, D).copy_(o.transpose(1, 2))
    if lse is not None:
        lse.view(Hq, B, Lq).copy_(l.transpose(0, 1))
    return True


def _impl_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q, max_seqlen_k, softmax_scale,
              out, lse, q_descale, k_descale, v_descale, workspace):
    Hq = q.shape[1]
    g = Hq // k.shape[1]
    chunk_fn = _cpu_chunk_fused if _CPU_FUSED is not None else _cpu_chunk_explicit
    per_key = 4 * (g if _CPU_FUSED is not None else Hq)  # bytes per (query row, key) of a chunk
    # CPU tensors: numpy views (no copy, no device sync); the path is planned on the host
    plan = _cpu_plan(Hq, q.shape[2], cu_seqlens_q.numpy(), cu_seqlens_k.numpy(), kv_start.numpy(), kv_end.numpy())
    if _cpu_uniform(q, k, v, plan, softmax_scale, out, lse, q_descale, k_descale, v_descale):
        return
    if _cpu_packed_masked(q, k, v, plan, softmax_scale, out, lse, q_descale, k_descale, v_descale):
        return
    if _cpu_slots(q, k, v, plan, softmax_scale, out, lse, q_descale, k_descale, v_descale):
        return
    f32 = torch.float32
    cq, ck, kind, lo_b, hi_b = plan.cq, plan.ck, plan.kind, plan.lo, plan.hi
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if kind[b] == _NO_ROWS:
            continue
        # fp32 (and per-head dequantized) keys and values of this sequence (a view when already fp32)
        kb = _ref.dequantize(k[k0:k1], k_descale, f32)
        vb = _ref.dequantize(v[k0:k1], v_descale, f32)
        if _CPU_FUSED is not None and kind[b] == _SAME:
            # every row sees the same keys (cross-attention, a fully bidirectional sequence):
            # one fused call without a mask; it never forms the [rows, keys] scores
            lo, hi = lo_b[b], hi_b[b]
            o, l = _cpu_chunk_fused(_ref.dequantize(q[q0:q1], q_descale, f32), kb[lo:hi], vb[lo:hi], None,
                                    softmax_scale, g)
            out[q0:q1] = o
            if lse is not None:
                lse[:, q0:q1] = l
            continue
        if _CPU_FUSED is not None and kind[b] == _CAUSAL:
            # a plain causal sequence: one fused causal call, no mask
            qh = _ref.dequantize(q[q0:q1], q_descale, f32).transpose(0, 1).unsqueeze(0)
            kh, vh = _fused_kv(kb.transpose(0, 1).unsqueeze(0), vb.transpose(0, 1).unsqueeze(0), g)
            o, l = _CPU_FUSED(qh, kh, vh, 0.0, True, scale=softmax_scale)
            out[q0:q1] = o[0].transpose(0, 1)
            if lse is not None:
                lse[:, q0:q1] = l[0]
            continue
        rows = max(1, min(_CPU_CHUNK_ROWS, _CPU_CHUNK_BYTES // (per_key * max(1, k1 - k0))))
        for c0 in range(q0, q1, rows):
            c1 = min(c0 + rows, q1)
            st, en = kv_start[c0:c1].long(), kv_end[c0:c1].long()
            nonempty = en > st
            if not bool(nonempty.any()):
                out[c0:c1].zero_()
                if lse is not None:
                    lse[:, c0:c1] = float("-inf")
                continue
            lo, hi = int(st[nonempty].min()), int(en[nonempty].max())
            j = torch.arange(lo, hi)
            visible = (j >= st.unsqueeze(1)) & (j < en.unsqueeze(1))            # [C, hi - lo]
            if bool(visible.all()):
                visible = None  # no mask to build or apply
            qc = _ref.dequantize(q[c0:c1], q_descale, f32)
            o, l = chunk_fn(qc, kb[lo:hi], vb[lo:hi], visible, softmax_scale, g)
            empty = ~nonempty
            o[empty] = 0.0
            l[:, empty] = float("-inf")
            out[c0:c1] = o
            if lse is not None:
                lse[:, c0:c1] = l


def _impl_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q, max_seqlen_k,
                    softmax_scale, out, lse, q_descale, k_descale, v_descale, workspace):
    o, l = _ref.hybrid_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, softmax_scale,
                                 q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                                 out_dtype=out.dtype)
    out.copy_(o)
    if lse is not None:
        lse.copy_(l)


_IMPLS = {"triton": _impl_triton, "cpu": _impl_cpu, "reference": _impl_reference}


@spar_op("hybrid_attention", mutates_args=("out", "lse", "workspace"), impls=_IMPLS)
def _hybrid_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, out: torch.Tensor,
                         lse: torch.Tensor | None, q_descale: torch.Tensor | None,
                         k_descale: torch.Tensor | None, v_descale: torch.Tensor | None,
                         workspace: torch.Tensor | None) -> None: ...


# ---------------------------------------------------------------------------------------------
# validation

def _check_qkv(q, k, v):
    check_tensor("q", q, ndim=3, dtypes=INPUT_DTYPES, last_contiguous=True)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device, last_contiguous=True)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=q.device, last_contiguous=True)
    total_q, Hq, D = q.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[2] != D:
        raise ValueError(f"k: expected head dim {D} (q's), got shape {tuple(k.shape)}")
    if D not in HEAD_DIMS:
        raise ValueError(f"q: head dim {D} is not supported; expected {MIN_HEAD_DIM} <= head dim <= {MAX_HEAD_DIM} "
                         f"(shape {tuple(q.shape)})")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: the number of query heads ({Hq}) must be a multiple of the number of key/value "
                         f"heads ({Hkv})")


def _check_descale(name: str, t, heads: int, device, fp8: bool, kv_heads: int | None = None):
    """Validate a float32 per-head descale: ``[heads]``, one value, or (q_descale) ``[kv_heads]``
    shared by each query-head group. Returns it unchanged (None stays None)."""
    if t is None:
        return None
    if not fp8:
        raise ValueError(f"{name}: descale factors apply to float8_e4m3fn inputs only")
    check_tensor(name, t, dtypes=(torch.float32,), device=device)
    if t.numel() == 1 or (t.dim() == 1 and t.shape[0] == heads) or (
            kv_heads is not None and t.dim() == 1 and t.shape[0] == kv_heads):
        return t
    want = f"({heads},)" + (f" or ({kv_heads},)" if kv_heads is not None and kv_heads != heads else "")
    raise ValueError(f"{name}: expected a float32 tensor of shape {want} (one factor per head) or a "
                     f"single factor, got shape {tuple(t.shape)}")


def _descale_vector(t, heads: int, buf, device):
    """A contiguous float32 ``[heads]`` descale (no host sync): ``t`` itself when it already is one,
    else written into ``buf`` (a workspace region) or a new tensor; None means 1."""
    if t is not None and t.dim() == 1 and t.shape[0] == heads and t.stride(0) == 1:
        return t
    if buf is None:
        buf = torch.empty(heads, dtype=torch.float32, device=device)
    if t is None:
        return buf.fill_(1.0)
    if t.numel() == 1:
        return buf.copy_(t.reshape(1).expand(heads))
    return buf.view(t.shape[0], heads // t.shape[0]).copy_(t.view(-1, 1).expand(-1, heads // t.shape[0])).view(heads)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover
        return False


def hybrid_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, *, softmax_scale: float | None = None,
                            return_lse: bool = False, out: torch.Tensor | None = None,
                            out_lse: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
                            q_descale: torch.Tensor | None = None, k_descale: torch.Tensor | None = None,
                            v_descale: torch.Tensor | None = None):
    """:func:`hybrid_attention` without the layout object.

    ``cu_seqlens_q``, ``cu_seqlens_k``: int32 ``[B+1]``; ``kv_start``, ``kv_end``: int32
    ``[total_q]``; ``max_seqlen_q``/``max_seqlen_k``: at least the longest sequence (they size the
    grid). On CPU every value is validated like :meth:`AttentionLayout.from_intervals` (a
    ValueError). On CUDA only shapes, dtypes and devices are checked (reading values would make the
    host wait for the GPU); the kernels clamp each row's interval to ``[0, seqlen_k]`` of its
    sequence, so intervals outside it cannot read other sequences' keys or memory past ``k``. The
    ``cu_seqlens`` are trusted there: build the layout once with ``from_intervals`` (host data,
    validated) when they come from an untrusted source.
    """
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q, max_seqlen_k,
                      softmax_scale, return_lse, out, out_lse, workspace, q_descale, k_descale, v_descale,
                      check_values=True)


def _workspace_regions(q, k, batch: int, max_seqlen_q: int, max_seqlen_k: int):
    """(descale regions, kernel plan or None): what a call with these shapes takes from a workspace."""
    Hq, Hkv = q.shape[1], k.shape[1]
    descales = {"q_descale": Hq, "k_descale": Hkv, "v_descale": Hkv} if q.dtype == torch.float8_e4m3fn else {}
    plan = None
    if _hybrid_attention_op.backend_for(q.device) == "triton":
        plan = _kernels.plan_for(q, k, batch, max_seqlen_q, max_seqlen_k)
    return descales, plan


def _workspace_numel(q, k, batch, max_seqlen_q, max_seqlen_k) -> int:
    descales, plan = _workspace_regions(q, k, batch, max_seqlen_q, max_seqlen_k)
    return sum(_kernels._round_up(n) for n in descales.values()) + (plan.numel if plan is not None else 0)


def hybrid_attention_workspace(q: torch.Tensor, k: torch.Tensor, layout: AttentionLayout | None = None, *,
                               batch_size: int | None = None, max_seqlen_q: int | None = None,
                               max_seqlen_k: int | None = None) -> torch.Tensor:
    """A float32 workspace for :func:`hybrid_attention` calls with these shapes, dtype and device.

    It holds the scratch memory a call needs besides ``out``/``out_lse``: the log-sum-exp the
    kernels write when the caller does not ask for it, the split-KV decode partials, and FP8
    descale vectors built from single or grouped factors (or ones). Allocate it once (e.g. at the
    largest shape a captured CUDA graph will see: a larger workspace serves every smaller call)
    and pass it as ``workspace=``: the call then allocates nothing. The size depends on q's and k's
    shapes and dtype, the layout's batch size and maximum lengths (or the keyword arguments, for
    :func:`hybrid_attention_varlen`) and the backend that runs on q's device (CPU: only the FP8
    descale vectors).
    """
    _check_qkv(q, k, k)
    if layout is not None:
        if not isinstance(layout, AttentionLayout):
            raise TypeError(f"layout: expected an AttentionLayout or None, got {type(layout).__name__}")
        batch_size, max_seqlen_q, max_seqlen_k = layout.batch_size, layout.max_seqlen_q, layout.max_seqlen_k
    for name, val in (("batch_size", batch_size), ("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name}: expected a non-negative int (or a layout), got {val!r}")
    numel = _workspace_numel(q, k, int(batch_size), int(max_seqlen_q), int(max_seqlen_k))
    return torch.empty(numel, dtype=torch.float32, device=q.device)


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q, max_seqlen_k, softmax_scale,
               return_lse, out, out_lse, workspace, q_descale, k_descale, v_descale, *, check_values: bool):
    _check_qkv(q, k, v)
    dev = q.device
    total_q, Hq, D = q.shape
    Hkv = k.shape[1]
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32,), device=dev)
        if t.shape[0] < 1:
            raise ValueError(f"{name}: expected [B+1] offsets starting at 0, got an empty tensor")
        if t.stride(0) != 1 and t.shape[0] > 1:
            raise ValueError(f"{name}: expected a contiguous tensor, got stride {t.stride()}")
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.shape[0]} entries (as many sequences as "
                         f"cu_seqlens_q), got {cu_seqlens_k.shape[0]}")
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32,), device=dev)
        if t.shape[0] != total_q:
            raise ValueError(f"{name}: expected {total_q} entries (one per query row of q), got {t.shape[0]}")
        if t.stride(0) != 1 and t.shape[0] > 1:
            raise ValueError(f"{name}: expected a contiguous tensor, got stride {t.stride()}")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {val!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0 \
            or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: expected a positive finite float or None, got {softmax_scale!r}")
    fp8 = q.dtype == torch.float8_e4m3fn
    q_descale = _check_descale("q_descale", q_descale, Hq, dev, fp8, kv_heads=Hkv)
    k_descale = _check_descale("k_descale", k_descale, Hkv, dev, fp8)
    v_descale = _check_descale("v_descale", v_descale, Hkv, dev, fp8)
    if check_values and dev.type == "cpu" and not _is_compiling():
        cu_q = cu_seqlens_q.numpy().astype(np.int64)
        cu_k = cu_seqlens_k.numpy().astype(np.int64)
        validate_intervals(cu_q, cu_k, kv_start.numpy().astype(np.int64), kv_end.numpy().astype(np.int64))
        _check_totals(cu_q[-1], cu_k[-1], q, k)
        lq, lk = np.diff(cu_q), np.diff(cu_k)
        for name, given, need in (("max_seqlen_q", max_seqlen_q, lq), ("max_seqlen_k", max_seqlen_k, lk)):
            if need.size and given < int(need.max()):
                raise ValueError(f"{name}: {given} is shorter than the longest sequence ({int(need.max())})")
    out_dtype = torch.bfloat16 if fp8 else q.dtype
    if out is None:
        out = torch.empty((total_q, Hq, D), dtype=out_dtype, device=dev)
    else:
        check_out("out", out, (total_q, Hq, D), out_dtype, dev)
    if out_lse is not None:
        check_out("out_lse", out_lse, (Hq, total_q), torch.float32, dev)
        return_lse = True
    lse = out_lse if out_lse is not None else (
        torch.empty((Hq, total_q), dtype=torch.float32, device=dev) if return_lse else None)
    kernel_ws = None
    descale_bufs = {}
    if workspace is not None:
        B = cu_seqlens_q.shape[0] - 1
        need = _workspace_numel(q, k, B, int(max_seqlen_q), int(max_seqlen_k))
        check_tensor("workspace", workspace, ndim=1, dtypes=(torch.float32,), device=dev)
        if workspace.numel() < need or (workspace.numel() > 1 and workspace.stride(0) != 1):
            raise ValueError(f"workspace: expected a contiguous float32 tensor of at least {need} elements "
                             f"(hybrid_attention_workspace), got shape {tuple(workspace.shape)} and stride "
                             f"{tuple(workspace.stride())}")
        descales, _ = _workspace_regions(q, k, B, int(max_seqlen_q), int(max_seqlen_k))
        off = 0
        for name, n in descales.items():
            descale_bufs[name] = workspace.narrow(0, off, n)
            off += _kernels._round_up(n)
        kernel_ws = workspace.narrow(0, off, workspace.numel() - off)
    if fp8:  # [heads] vectors, from the workspace where they must be built
        q_descale = _descale_vector(q_descale, Hq, descale_bufs.get("q_descale"), dev)
        k_descale = _descale_vector(k_descale, Hkv, descale_bufs.get("k_descale"), dev)
        v_descale = _descale_vector(v_descale, Hkv, descale_bufs.get("v_descale"), dev)
    if total_q > 0:
        _hybrid_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, int(max_seqlen_q),
                             int(max_seqlen_k), float(softmax_scale), out, lse, q_descale, k_descale, v_descale,
                             kernel_ws)
    return (out, lse) if return_lse else out


def _check_totals(total_q, total_k, q, k):
    if int(total_q) != q.shape[0]:
        raise ValueError(f"q: the layout has {int(total_q)} query rows (cu_seqlens_q[-1]) but q has "
                         f"{q.shape[0]} (shape {tuple(q.shape)})")
    if int(total_k) != k.shape[0]:
        raise ValueError(f"k: the layout has {int(total_k)} keys (cu_seqlens_k[-1]) but k has "
                         f"{k.shape[0]} (shape {tuple(k.shape)})")


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, *,
                     softmax_scale: float | None = None, return_lse: bool = False, out: torch.Tensor | None = None,
                     out_lse: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
                     q_descale: torch.Tensor | None = None, k_descale: torch.Tensor | None = None,
                     v_descale: torch.Tensor | None = None):
    """Attention over a packed batch where each query row sees one interval of its sequence's keys.

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]`` with ``Hq % Hkv == 0`` and
            ``8 <= D <= 128`` (:data:`HEAD_DIMS`); float32 / float16 / bfloat16 / float8_e4m3fn, all
            the same dtype and device; the last dimension contiguous (other strides are free).
        layout: an :class:`AttentionLayout` on the tensors' device whose totals match q and k.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        return_lse: also return ``lse`` float32 ``[Hq, total_q]`` (natural log; ``-inf`` on rows
            with an empty interval).
        out: optional contiguous ``[total_q, Hq, D]`` output (q's dtype; bfloat16 for FP8 inputs).
        out_lse: optional contiguous float32 ``[Hq, total_q]`` the lse is written into (implies
            ``return_lse``).
        workspace: optional float32 scratch from :func:`hybrid_attention_workspace`; with it (and
            ``out``, ``out_lse``) the call allocates nothing, so a captured CUDA graph can replay it.
        q_descale, k_descale, v_descale: float32 per-head factors (``[Hq]`` (or ``[Hkv]``, shared by a
            group), ``[Hkv]``, ``[Hkv]``, or one value each) of float8_e4m3fn inputs:
            ``q_real = q.float() * q_descale[h]``; missing factors are 1.

    Returns:
        ``out``, or ``(out, lse)`` with ``return_lse``.
    """
    if not isinstance(layout, AttentionLayout):
        raise TypeError(f"layout: expected an AttentionLayout, got {type(layout).__name__}")
    if isinstance(q, torch.Tensor):
        if not same_device(layout.device, q.device):
            raise ValueError(f"layout: its tensors are on {layout.device} but q is on {q.device}; "
                             "use layout.to(device)")
        if q.dim() == 3 and isinstance(k, torch.Tensor) and k.dim() == 3:
            _check_totals(layout.total_q, layout.total_k, q, k)
    # the layout was validated when it was built: only shapes, dtypes and devices are checked here
    return _attention(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.kv_start, layout.kv_end,
                      layout.max_seqlen_q, layout.max_seqlen_k, softmax_scale, return_lse, out, out_lse,
                      workspace, q_descale, k_descale, v_descale, check_values=False)


__all__ = ["AttentionLayout", "TileWork", "hybrid_attention", "hybrid_attention_varlen", "hybrid_attention_workspace",
           "HEAD_DIMS", "MIN_HEAD_DIM", "MAX_HEAD_DIM"]
