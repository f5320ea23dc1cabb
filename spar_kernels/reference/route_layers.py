"""Plain-PyTorch reference of :func:`spar_kernels.route_layers` (SPAR's Dynamic Token Routing).

Written for clarity, upcasting exactly where the kernel upcasts: the softmax, the weighted sum over
K layers and the LayerNorm run in ``compute_dtype`` (fp32 by default; fp64 for the oracle), one
rounding to hidden's dtype at the end.
"""

from __future__ import annotations

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
