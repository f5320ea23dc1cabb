"""The CPU path of :func:`spar_kernels.hybrid_attention` (the ``"cpu"`` backend): fp32 attention
per sequence through ATen's fused CPU attention, planned on the host from the layout's intervals.

Per sequence, in query chunks whose mask stays under ``_CPU_CHUNK_BYTES`` and whose keys are only
the chunk's ``[min kv_start, max kv_end)`` (explicit matmul-softmax where the fused op is missing);
a sequence whose rows all see the same keys, a plain causal sequence and a fully visible chunk run
without a mask. Three batched shortcuts come first: equal-length plain causal / bidirectional
sequences (:func:`_cpu_uniform`), a small packed batch with one additive mask
(:func:`_cpu_packed_masked`), and equal query blocks over padded key slots (:func:`_cpu_slots`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..reference import attention as _ref

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
# Unmasked chunks of at least this many query rows keep their query heads as heads; fewer rows fold
# the g query heads of a KV head into g x rows of it (_cpu_chunk_fused, _fused_batched).
_CPU_FOLD_ROWS = 64


def _cpu_chunk_fused(qc, kc, vc, visible, scale, g):
    """qc [C, Hq, D], kc/vc [n, Hkv, D] fp32, visible [C, n] (None: every key visible to every
    row) -> (out [C, Hq, D], lse [Hq, C])."""
    C, Hq, D = qc.shape
    Hkv, n = kc.shape[1], kc.shape[0]
    if visible is None:  # no mask: one sequence of a batch (heads kept or folded by the row count)
        o, lse = _fused_batched(qc.transpose(0, 1).unsqueeze(0), kc.transpose(0, 1).unsqueeze(0),
                                vc.transpose(0, 1).unsqueeze(0), False, None, scale)
        return o[0], lse[0]
    # GQA without copying K/V: the g query heads of a KV head become g * C rows of that head (its
    # keys read once, not once per query head), the mask repeated per query head
    qh = qc.view(C, Hkv, g, D).permute(1, 2, 0, 3).reshape(1, Hkv, g * C, D)
    bias = torch.zeros((C, n), dtype=qc.dtype).masked_fill_(~visible, float("-inf"))
    bias = bias.repeat(g, 1).view(1, 1, g * C, n)
    o, lse = _CPU_FUSED(qh, kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0), 0.0, False,
                        attn_mask=bias, scale=scale)
    return o.reshape(Hkv, g, C, D).permute(2, 0, 1, 3).reshape(C, Hq, D), lse.reshape(Hq, C)


def _cpu_chunk_explicit(qc, kc, vc, visible, scale, g):
    """Same contract as :func:`_cpu_chunk_fused` (``visible`` None: every row sees every key):
    matmul, masked softmax, matmul in fp32."""
    C, Hq, D = qc.shape
    Hkv, n = kc.shape[1], kc.shape[0]
    qh = qc.view(C, Hkv, g, D).permute(1, 2, 0, 3).reshape(Hkv, g * C, D)
    s = torch.bmm(qh, kc.permute(1, 2, 0)).view(Hkv, g, C, n)
    s.mul_(scale)
    if visible is not None:
        s.masked_fill_(~visible, float("-inf"))
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


def _fused_batched(qb, kb, vb, causal, mask, scale):
    """ATen's fused call on ``qb [B, Hq, L, D]`` against ``kb, vb [B, Hkv, n, D]`` -> ``(o [B, L, Hq, D]
    (a view), lse [B, Hq, L])``. Without a causal mask and with fewer than ``_CPU_FOLD_ROWS`` rows the
    g = Hq / Hkv query heads of a KV head become g * L rows of that head: each KV head's keys are then
    read once per call, not once per query head (a batch of decode rows against an 8k cache ran ~3x
    faster so); otherwise query heads stay heads (:func:`_fused_kv`; views in and out, no copies:
    0.95x the time of folding at 333 rows x 14 / 2 heads, the bench's connector case)."""
    B, Hq, L, D = qb.shape
    Hkv = kb.shape[1]
    g = Hq // Hkv
    if g == 1 or causal or (L >= _CPU_FOLD_ROWS and _fused_takes_gqa()):
        kb, vb = _fused_kv(kb, vb, g)
        o, l = _CPU_FUSED(qb, kb, vb, 0.0, causal, attn_mask=mask, scale=scale)       # [B, Hq, L, D], [B, Hq, L]
        return o.transpose(1, 2), l
    qg = qb.reshape(B, Hkv, g * L, D)
    o, l = _CPU_FUSED(qg, kb, vb, 0.0, False, attn_mask=mask, scale=scale)             # [B, Hkv, g L, D]
    return o.view(B, Hkv, g, L, D).permute(0, 3, 1, 2, 4).reshape(B, L, Hq, D), l.reshape(B, Hq, L)


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
    o, l = _fused_batched(qb, kb, vb, plan.uniform == 2, None, scale)                 # [B, S, Hq, D], [B, Hq, S]
    out.view(B, S, Hq, D).copy_(o)
    if lse is not None:
        lse.view(Hq, B, S).copy_(l.transpose(0, 1))
    return True


def _cpu_packed_masked(q, k, v, plan, scale, out, lse, q_descale, k_descale, v_descale) -> bool:
    """A small packed batch (a prefill of a few short prompts, any intervals) as one fused call
    over all its rows and keys with the plan's additive mask (:func:`_packed_bias`). Returns False
    (doing nothing) when the plan has none or the result is not finite (see below)."""
    if plan.bias is None:
        return False
    f32 = torch.float32
    qh = _ref.dequantize(q, q_descale, f32).transpose(0, 1).unsqueeze(0)
    kh, vh = _fused_kv(_ref.dequantize(k, k_descale, f32).transpose(0, 1).unsqueeze(0),
                       _ref.dequantize(v, v_descale, f32).transpose(0, 1).unsqueeze(0), q.shape[1] // k.shape[1])
    o, l = _CPU_FUSED(qh, kh, vh, 0.0, False, attn_mask=plan.bias, scale=scale)      # [1, Hq, tq, D], [1, Hq, tq]
    if not math.isfinite(float(o.sum())):  # one reduction: ~1/1000 of the call (isfinite().all(): 1/25)
        # a non-finite key or value of one sequence turns every row's score with it into NaN
        # (NaN + -inf): the per-sequence path keeps the other sequences exact
        return False
    out.copy_(o[0].transpose(0, 1))
    if lse is not None:
        lse.copy_(l[0])
    return True


def _cpu_slots(q, k, v, plan, scale, out, lse, q_descale, k_descale, v_descale) -> bool:
    """Equal query blocks over padded key slots (:func:`_slot_keys`) as one batched fused call
    with a key-padding mask. Returns False (doing nothing) for any other layout, and when the
    result is not finite (as :func:`_cpu_packed_masked`: a non-finite key in a slot's padding
    would turn the rows that do not see it into NaN; the per-sequence path masks it out)."""
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
    o, l = _fused_batched(qb, kb, vb, False, mask, scale)                             # [B, Lq, Hq, D], [B, Hq, Lq]
    if not math.isfinite(float(o.sum())):
        return False
    out.view(B, Lq, Hq, D).copy_(o)
    if lse is not None:
        lse.view(Hq, B, Lq).copy_(l.transpose(0, 1))
    return True


def _chunks(st: np.ndarray, en: np.ndarray, q0: int, rows: int, merge: bool):
    """The query chunks ``(c0, c1)`` of one sequence whose rows see keys ``[st[i], en[i])`` (row
    i is query ``q0 + i``): at most ``rows`` rows each, except that with ``merge`` a run of at least
    ``_CPU_CHUNK_ROWS`` consecutive rows that all see the same interval (an image block)
    is one chunk: the fused call needs no mask there and never forms the scores, and one call
    reads the block's keys once instead of once per 128 rows (BAGEL's text + 4096 image + text:
    33 calls became 3)."""
    n = len(st)
    if merge and n >= _CPU_CHUNK_ROWS:
        cut = np.flatnonzero((st[1:] != st[:-1]) | (en[1:] != en[:-1])) + 1
        bounds = np.concatenate(([0], cut, [n]))
        runs = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= _CPU_CHUNK_ROWS]
    else:
        runs = []
    a = 0
    for r0, r1 in runs + [(n, n)]:
        for c0 in range(a, r0, rows):          # the rows before this run, in chunks of `rows`
            yield q0 + c0, q0 + min(c0 + rows, r0)
        if r1 > r0:
            yield q0 + r0, q0 + r1
        a = r1


def _has_nonfinite(t: torch.Tensor) -> bool:
    """Whether t holds an inf or NaN (float8_e4m3fn: a NaN code; it has no inf)."""
    if t.dtype == torch.float8_e4m3fn:
        return bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    return not bool(torch.isfinite(t).all())


def _impl_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q, max_seqlen_k, softmax_scale,
              out, lse, q_descale, k_descale, v_descale, workspace):
    Hq = q.shape[1]
    g = Hq // k.shape[1]
    # ATen's fused CPU kernel takes a row's max with a NaN-dropping max: a row whose every visible
    # score is NaN (a NaN query, or NaN in each key it sees) comes out as a fully masked row (zeros)
    # instead of NaN. A call with a non-finite query or key takes the explicit path throughout
    # (non-finite values only: one read of q and k; NaN in v reaches the output sums, checked below).
    fused = _CPU_FUSED is not None and not (_has_nonfinite(q) or _has_nonfinite(k))
    chunk_fn = _cpu_chunk_fused if fused else _cpu_chunk_explicit
    per_key = 4 * (g if fused else Hq)  # bytes per (query row, key) of a chunk
    # CPU tensors: numpy views (no copy, no device sync); the path is planned on the host
    plan = _cpu_plan(Hq, q.shape[2], cu_seqlens_q.numpy(), cu_seqlens_k.numpy(), kv_start.numpy(), kv_end.numpy())
    if fused and _cpu_uniform(q, k, v, plan, softmax_scale, out, lse, q_descale, k_descale, v_descale):
        return
    if fused and _cpu_packed_masked(q, k, v, plan, softmax_scale, out, lse, q_descale, k_descale, v_descale):
        return
    if fused and _cpu_slots(q, k, v, plan, softmax_scale, out, lse, q_descale, k_descale, v_descale):
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
        if fused and kind[b] == _SAME:
            # every row sees the same keys (cross-attention, a fully bidirectional sequence):
            # one fused call without a mask; it never forms the [rows, keys] scores
            lo, hi = lo_b[b], hi_b[b]
            o, l = _cpu_chunk_fused(_ref.dequantize(q[q0:q1], q_descale, f32), kb[lo:hi], vb[lo:hi], None,
                                    softmax_scale, g)
            out[q0:q1] = o
            if lse is not None:
                lse[:, q0:q1] = l
            continue
        if fused and kind[b] == _CAUSAL:
            # a plain causal sequence: one fused causal call, no mask
            qh = _ref.dequantize(q[q0:q1], q_descale, f32).transpose(0, 1).unsqueeze(0)
            kh, vh = _fused_kv(kb.transpose(0, 1).unsqueeze(0), vb.transpose(0, 1).unsqueeze(0), g)
            o, l = _CPU_FUSED(qh, kh, vh, 0.0, True, scale=softmax_scale)
            out[q0:q1] = o[0].transpose(0, 1)
            if lse is not None:
                lse[:, q0:q1] = l[0]
            continue
        rows = max(1, min(_CPU_CHUNK_ROWS, _CPU_CHUNK_BYTES // (per_key * max(1, k1 - k0))))
        for c0, c1 in _chunks(kv_start[q0:q1].numpy(), kv_end[q0:q1].numpy(), q0, rows, fused):
            st, en = kv_start[c0:c1].long(), kv_end[c0:c1].long()
            nonempty = en > st
            if not bool(nonempty.any()):
                out[c0:c1].zero_()
                if lse is not None:
                    lse[:, c0:c1] = float("-inf")
                continue
            lo, hi = int(st[nonempty].min()), int(en[nonempty].max())
            if bool((st == lo).all()) and bool((en == hi).all()):
                # every row sees all of [lo, hi) (an image block's run, a fully visible chunk): no
                # mask to build or apply. (lo, hi are the nonempty rows' min / max, so this is the
                # only way every row can see every key of the chunk.)
                visible = None
            else:
                j = torch.arange(lo, hi)
                visible = (j >= st.unsqueeze(1)) & (j < en.unsqueeze(1))        # [C, hi - lo]
            qc = _ref.dequantize(q[c0:c1], q_descale, f32)
            o, l = chunk_fn(qc, kb[lo:hi], vb[lo:hi], visible, softmax_scale, g)
            if visible is not None and chunk_fn is _cpu_chunk_fused and not math.isfinite(float(o.sum())):
                # a non-finite key's scores are NaN, and NaN plus the additive -inf mask stays NaN,
                # also in rows that do not see that key: the explicit path masks by replacement
                o, l = _cpu_chunk_explicit(qc, kb[lo:hi], vb[lo:hi], visible, softmax_scale, g)
            empty = ~nonempty
            o[empty] = 0.0
            l[:, empty] = float("-inf")
            out[c0:c1] = o
            if lse is not None:
                lse[:, c0:c1] = l
