"""Plain-PyTorch references of the routing ops (:mod:`spar_kernels.routing`,
:mod:`spar_kernels.row_moves`, :mod:`spar_kernels.moe_routing`).

Written for clarity, upcasting exactly where the kernels upcast:

- ``route_layers``: the softmax, the weighted sum over K layers and the LayerNorm run in
  ``compute_dtype`` (fp32 by default; fp64 for the oracle), one rounding to hidden's dtype at the end.
- ``split_by_expert``: the per-expert RMSNorm runs in fp32, one rounding to x's dtype.
- The row moves are pure copies (bit-exact in every dtype).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def route_layers(hidden: torch.Tensor, layer_ids, logits: torch.Tensor, alpha: torch.Tensor,
                 ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, *, tau: float = 1.0,
                 eps: float = 1e-5, rows=None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``out[i] = LayerNorm(sum_k softmax(logits[r] / tau)[k] * alpha[k] * hidden[layer_ids[k], r])``
    with ``r = rows[i]`` (or ``i`` when ``rows`` is None)."""
    cd = compute_dtype if hidden.dtype != torch.float64 else torch.float64
    ids = torch.as_tensor(layer_ids, device=hidden.device).long()
    h = hidden.index_select(0, ids)                       # [K, N, D]
    lg = logits
    if rows is not None:
        r = torch.as_tensor(rows, device=hidden.device).long()
        h = h.index_select(1, r)                          # [K, M, D]
        lg = lg.index_select(0, r)                        # [M, K]
    w = torch.softmax(lg.to(cd) / tau, dim=-1)            # [M, K]
    coeff = w * alpha.to(cd)                              # [M, K]
    m = (coeff.t().unsqueeze(-1) * h.to(cd)).sum(0)       # [M, D]
    D = hidden.shape[-1]
    y = F.layer_norm(m, (D,), None if ln_weight is None else ln_weight.to(cd),
                     None if ln_bias is None else ln_bias.to(cd), eps)
    return y.to(hidden.dtype)


def route_layers_eager(hidden, layer_ids, logits, alpha, ln_weight, ln_bias, tau=1.0, eps=1e-5):
    """The obvious PyTorch formulation (the benchmark's eager provider): stack K layers, softmax,
    multiply, sum, layer_norm, all in hidden's dtype."""
    H = torch.stack([hidden[int(i)] for i in layer_ids], dim=0)          # [K, N, D]
    w = torch.softmax(logits / tau, dim=-1).to(hidden.dtype)              # [N, K]
    m = (H * (w.t() * alpha.to(hidden.dtype)[:, None]).unsqueeze(-1)).sum(0)
    return F.layer_norm(m, (hidden.shape[-1],), ln_weight, ln_bias, eps)


# ---- row moves ------------------------------------------------------------------------------

def gather_rows(x: torch.Tensor, index) -> torch.Tensor:
    return x[torch.as_tensor(index, device=x.device).long()]


def scatter_rows(x: torch.Tensor, index, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with ``x[index[i]] = src[i]`` (index without duplicates)."""
    y = x.clone()
    y[torch.as_tensor(index, device=x.device).long()] = src.to(x.dtype)
    return y


def pack_sequences(padded: torch.Tensor, lengths) -> torch.Tensor:
    lens = [int(v) for v in torch.as_tensor(lengths).tolist()]
    parts = [padded[b, :n] for b, n in enumerate(lens)]
    if not parts:
        return padded.new_empty((0,) + tuple(padded.shape[2:]))
    return torch.cat(parts, dim=0)


def unpack_sequences(packed: torch.Tensor, cu_seqlens, max_len: int, pad_value=0) -> torch.Tensor:
    cu = [int(v) for v in torch.as_tensor(cu_seqlens).tolist()]
    B = len(cu) - 1
    out = packed.new_full((B, max_len) + tuple(packed.shape[1:]), pad_value)
    for b in range(B):
        n = cu[b + 1] - cu[b]
        out[b, :n] = packed[cu[b]:cu[b + 1]]
    return out


# ---- modality (expert) routing ----------------------------------------------------------------

def split_by_expert(x: torch.Tensor, expert_ids, num_experts: int,
                    norm_weights: torch.Tensor | Sequence[torch.Tensor] | None = None,
                    eps: float = 1e-6, compute_dtype: torch.dtype = torch.float32):
    """``(rows, offsets, perm)``: rows grouped by expert (stable: original order inside a group),
    ``offsets[e]:offsets[e+1]`` the rows of expert e, ``rows[j] = norm_e(x[perm[j]])``."""
    ids = torch.as_tensor(expert_ids, device=x.device).long()
    perm = torch.cat([torch.nonzero(ids == e).flatten() for e in range(num_experts)]) if num_experts else \
        torch.zeros(0, dtype=torch.long, device=x.device)
    counts = torch.stack([(ids == e).sum() for e in range(num_experts)]) if num_experts else \
        torch.zeros(0, dtype=torch.long, device=x.device)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device), counts.cumsum(0)])
    rows = x[perm]
    if norm_weights is not None:
        W = torch.stack(list(norm_weights)) if not isinstance(norm_weights, torch.Tensor) else norm_weights
        cd = compute_dtype if x.dtype != torch.float64 else torch.float64
        h = rows.to(cd)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        w = W.to(cd)[ids[perm]]
        rows = (h * rstd * w).to(x.dtype)
    return rows, offsets, perm


def merge_experts(grouped: torch.Tensor, perm) -> torch.Tensor:
    """Inverse of the grouping: ``out[perm[j]] = grouped[j]``."""
    p = torch.as_tensor(perm, device=grouped.device).long()
    out = torch.empty_like(grouped)
    out[p] = grouped
    return out
