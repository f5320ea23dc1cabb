"""Plain-PyTorch reference of :func:`spar_kernels.linear_attention` (SANA's ReLU linear attention).

For q ``[B, Nq, H, d]``, k ``[B, Nk, H, d]``, v ``[B, Nk, H, e]``, per (batch, head)::

    state[d, e]  = sum_n relu(k_n)[d] * v_n[e]          (fp32)
    norm[d]      = sum_n relu(k_n)[d]                   (fp32)
    out_n[e]     = (relu(q_n) @ state)[e] / (relu(q_n) . norm + eps)

which is what diffusers' ``SanaLinearAttnProcessor2_0`` computes by padding v with a row of ones
(its eps is 1e-15). Everything after the loads runs in ``compute_dtype``; one rounding at the end.
"""

from __future__ import annotations

import torch

DEFAULT_EPS = 1e-15  # diffusers' SanaLinearAttnProcessor2_0


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = DEFAULT_EPS,
                     compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qr = torch.relu(q).to(compute_dtype)
    kr = torch.relu(k).to(compute_dtype)
    vf = v.to(compute_dtype)
    state = torch.einsum("bnhd,bnhe->bhde", kr, vf)
    norm = kr.sum(dim=1)                                   # [B, H, d]
    num = torch.einsum("bnhd,bhde->bnhe", qr, state)
    den = torch.einsum("bnhd,bhd->bnh", qr, norm)
    return (num / (den.unsqueeze(-1) + eps)).to(q.dtype)
