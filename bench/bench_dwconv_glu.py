"""The middle of SANA's Mix-FFN: depthwise 3x3 conv + GLU. spar's ``dwconv_glu`` vs diffusers'
``GLUMBConv`` steps (``conv_depth`` on the NCHW view conv_inverted hands it -> chunk ->
``a * silu(gate)``) vs torch.compile of them, at the SANA block shapes of :mod:`bench.bench_dit` and one power-of-two
width.
Minimum bytes: read the 2C input channels once, write C."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import spar_kernels as sk
from bench.bench_dit import B, MLP_RATIO, compiled_unless_quick, no_grad, sana_shapes
from bench.harness import Case


def _shapes(quick: bool):
    """(tag, GLU channels C, N, H, W): the SANA shapes, and (not --quick) one power-of-two width,
    whose token stride aliases in the CPU's L1 (the CPU twin stages its rows there)."""
    for tag, c, N, H, W in sana_shapes(quick):
        yield tag, int(MLP_RATIO * c["dim"]), N, H, W
    if not quick:
        yield f"C=2048 (power of two) B={B} N=256 (16x16)", 2048, 256, 16, 16


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.tensor([], dtype=dtype).element_size()
    for tag, Ch, N, H, W in _shapes(quick):
        mk = dict(device=device, dtype=dtype)
        u = torch.randn(B, N, 2 * Ch, **mk)
        u_img = u.view(B, H, W, 2 * Ch).permute(0, 3, 1, 2)        # what conv_inverted hands conv_depth
        conv = nn.Conv2d(2 * Ch, 2 * Ch, 3, 1, 1, groups=2 * Ch).to(**mk).requires_grad_(False)
        out = torch.empty(B, N, Ch, **mk)

        def d_glu(u_img=u_img, conv=conv):
            h, g = torch.chunk(conv(u_img), 2, dim=1)
            return h * F.silu(g)

        yield Case(op="dwconv_glu", name=f"{tag} {str(dtype)[6:]}", bytes=B * N * 3 * Ch * es,
                   flops=B * N * 2 * Ch * 9 * 2, baseline="diffusers",
                   providers={"spar": lambda u=u, conv=conv, out=out, H=H, W=W: no_grad(
                                  lambda: sk.dwconv_glu(u, conv.weight, conv.bias, H, W, out=out)),
                              "diffusers": lambda f=d_glu: no_grad(f),
                              "torch.compile": compiled_unless_quick(no_grad(d_glu), quick)})
