"""Plain-PyTorch reference of :func:`spar_kernels.hybrid_attention`, written for clarity.

One dense ``[n_q, n_k]`` boolean mask per sequence (never for the whole packed batch), scores
and softmax in ``compute_dtype`` (float32 like the kernels' accumulators, or float64 for the
tests' ground truth), the output rounded once to its dtype. FP8 inputs are dequantized with
their per-head descale factors first.

:func:`segments_mask` builds the mask of one sequence straight from the definition of
causal / full segments, independently of :class:`spar_kernels.AttentionLayout`, so the tests
can check the layout constructors and the kernels against it.
"""

from __future__ import annotations

import math

import torch


def segments_mask(segments, num_queries: int | None = None) -> torch.Tensor:
    """Dense bool mask ``[n_q, n]`` of one sequence of ``(kind, length)`` segments.

    Key ``j`` is visible from token ``i`` when ``j <= i`` (every earlier token and itself), or
    when ``i`` lies in a ``"full"`` segment that contains ``j``. With ``num_queries`` the rows are
    the last ``num_queries`` tokens.
    """
    seg_id, full = [], []
    for s, (kind, n) in enumerate(segments):
        seg_id += [s] * n
        full += [kind == "full"] * n
    n = len(seg_id)
    seg = torch.tensor(seg_id, dtype=torch.int64)
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    same_full = (seg.unsqueeze(1) == seg.unsqueeze(0)) & torch.tensor(full, dtype=torch.bool).unsqueeze(1)
    mask = (j <= i) | same_full
    nq = n if num_queries is None else num_queries
    return mask[n - nq:]


def interval_mask(kv_start: torch.Tensor, kv_end: torch.Tensor, n_k: int) -> torch.Tensor:
    """Dense bool mask ``[n_q, n_k]`` of rows seeing ``kv_start <= j < kv_end``."""
    j = torch.arange(n_k, device=kv_start.device)
    return (j >= kv_start.long().unsqueeze(1)) & (j < kv_end.long().unsqueeze(1))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, softmax_scale: float,
                     compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: ``q [n_q, Hq, D]``, ``k, v [n_k, Hkv, D]``, ``mask [n_q, n_k]`` ->
    ``(out [n_q, Hq, D] in compute_dtype, lse [Hq, n_q] in compute_dtype)``. Fully masked rows give
    zeros and ``lse = -inf``."""
    Hq, Hkv = q.shape[1], k.shape[1]
    g = Hq // Hkv
    qc = q.to(compute_dtype).transpose(0, 1)                                   # [Hq, n_q, D]
    kc = k.to(compute_dtype).transpose(0, 1).repeat_interleave(g, dim=0)       # [Hq, n_k, D]
    vc = v.to(compute_dtype).transpose(0, 1).repeat_interleave(g, dim=0)
    s = (qc @ kc.transpose(1, 2)) * softmax_scale
    s = s.masked_fill(~mask.unsqueeze(0), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                           # -inf on empty rows
    p = torch.exp(s - lse.unsqueeze(-1).nan_to_num(0.0, 0.0, 0.0))
    p = torch.where(mask.unsqueeze(0), p, torch.zeros_like(p))
    out = (p @ vc).transpose(0, 1)
    return out, lse


def dequantize(x: torch.Tensor, descale: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """``x [N, H, D]`` times a per-head ``descale [H]`` (FP8 inputs); other inputs pass through."""
    x = x.to(compute_dtype)
    return x if descale is None else x * descale.to(compute_dtype).view(1, -1, 1)


def hybrid_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, softmax_scale: float | None = None,
                     compute_dtype: torch.dtype = torch.float32, q_descale=None, k_descale=None, v_descale=None,
                     out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed varlen attention with one key interval per query row.

    Returns ``(out [total_q, Hq, D] in out_dtype (default: q's dtype, bf16 for FP8 inputs),
    lse [Hq, total_q] float32 (or compute_dtype when that is float64))``.
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    fp8 = q.dtype == torch.float8_e4m3fn
    if out_dtype is None:
        out_dtype = torch.bfloat16 if fp8 else q.dtype
    lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    qd = dequantize(q, q_descale, compute_dtype)
    kd = dequantize(k, k_descale, compute_dtype)
    vd = dequantize(v, v_descale, compute_dtype)
    out = torch.zeros(q.shape, dtype=out_dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0:
            continue
        mask = interval_mask(kv_start[q0:q1], kv_end[q0:q1], k1 - k0)
        o, l = masked_attention(qd[q0:q1], kd[k0:k1], vd[k0:k1], mask, scale, compute_dtype)
        out[q0:q1] = o.to(out_dtype)
        lse[:, q0:q1] = l.to(lse_dtype)
    return out, lse
