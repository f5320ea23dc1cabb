"""Plain-PyTorch reference of modality (expert) routing (:mod:`spar_kernels.split_by_expert`):
rows grouped by expert, the per-expert RMSNorm in fp32 (fp64 for fp64 inputs), one rounding to
x's dtype."""

from __future__ import annotations

from typing import Sequence

import torch


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
