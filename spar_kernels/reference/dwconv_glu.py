"""Plain-PyTorch reference of :func:`spar_kernels.dwconv_glu`: the middle of SANA's Mix-FFN
(diffusers' ``GLUMBConv``): a depthwise 3x3 convolution (stride 1, zero padding 1, bias) over the
token grid, then the GLU ``a * silu(g)`` with ``a`` the first and ``g`` the second channel half.

x is channels-last tokens ``[B, H*W, 2C]`` (token ``i`` at row ``i // W``, column ``i % W``);
the result is ``[B, H*W, C]``. Math in ``compute_dtype``, one rounding to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dwconv_glu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, H: int, W: int,
               compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    B, _, C2 = x.shape
    img = x.to(compute_dtype).reshape(B, H, W, C2).permute(0, 3, 1, 2)       # NCHW view
    w = weight.to(compute_dtype).reshape(C2, 1, 3, 3)
    b = bias.to(compute_dtype) if bias is not None else None
    h = F.conv2d(img, w, b, stride=1, padding=1, groups=C2)
    a, g = h.chunk(2, dim=1)
    y = a * F.silu(g)
    return y.permute(0, 2, 3, 1).reshape(B, H * W, C2 // 2).to(x.dtype)
