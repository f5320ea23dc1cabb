"""Plain-PyTorch reference of :func:`spar_kernels.rms_norm`.

Upcasts exactly where the kernel does: the residual sum is rounded to x's dtype (it is a
stored tensor), the normalization and the weight multiply run in fp32, the result is
rounded once to x's dtype.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             compute_dtype: torch.dtype = torch.float32):
    s = None
    if residual is not None:
        s = (x.to(compute_dtype) + residual.to(compute_dtype)).to(x.dtype)
        x = s
    h = x.to(compute_dtype)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = (h * rstd * weight.to(compute_dtype)).to(x.dtype)
    return y if residual is None else (y, s)
