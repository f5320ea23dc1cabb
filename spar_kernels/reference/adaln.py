"""Plain-PyTorch references of :func:`spar_kernels.adaln_layernorm` and
:func:`spar_kernels.gated_residual` (the adaLN-single modulation of SANA / PixArt blocks).

    adaln_layernorm:  y = LayerNorm(x; no affine, eps) * (1 + scale[b]) + shift[b]
    gated_residual:   y = x + gate[b] * y_in

x is ``[B, N, C]``; shift/scale/gate hold one ``C``-vector per sample (``[B, C]``,
``[B, 1, C]``, or broadcastable ones such as ``[C]``). The math runs in ``compute_dtype``
(fp32 by default, as the kernels do) and is rounded once to x's dtype.
"""

from __future__ import annotations

import torch


def per_sample(t: torch.Tensor, B: int, C: int) -> torch.Tensor:
    """``t`` as ``[B, 1, C]`` (a broadcast view)."""
    return t.reshape(-1, C).expand(B, C).unsqueeze(1) if t.dim() <= 2 else t.expand(B, 1, C)


def adaln_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                    compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    B, _, C = x.shape
    h = x.to(compute_dtype)
    # corrected two-pass: d = x - RN(mean) keeps x's low bits (rows far from zero), corr is what the
    # rounded mean missed, taken off the centred values and the (biased, as nn.LayerNorm) variance
    d = h - h.mean(dim=-1, keepdim=True)
    corr = d.mean(dim=-1, keepdim=True)
    var = d.pow(2).mean(dim=-1, keepdim=True) - corr * corr
    n = (d - corr) * torch.rsqrt(var.clamp(min=0) + eps)
    sc = per_sample(scale, B, C).to(compute_dtype)
    sh = per_sample(shift, B, C).to(compute_dtype)
    return (n * (1 + sc) + sh).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    B, _, C = x.shape
    g = per_sample(gate, B, C).to(compute_dtype)
    return (x.to(compute_dtype) + g * y.to(compute_dtype)).to(x.dtype)
