"""Plain-PyTorch reference of :func:`spar_kernels.quantize_fp8`.

    scale = max(amax, 1e-12) / 448      per row of the last dimension ("token") or overall ("tensor")
    q     = clamp(x / scale, -448, 448).to(float8_e4m3fn)     (round to nearest even)
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
MIN_AMAX = 1e-12


def quantize_fp8(x: torch.Tensor, granularity: str = "token"):
    xf = x.float()
    if granularity == "token":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    elif granularity == "tensor":
        amax = xf.abs().amax()
    else:
        raise ValueError(f"granularity: expected 'token' or 'tensor', got {granularity!r}")
    scale = amax.clamp(min=MIN_AMAX) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float32)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale
