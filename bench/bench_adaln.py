"""adaLN modulation of SANA's blocks: ``adaln_layernorm`` (diffusers: ``norm1(x) * (1 + scale) +
shift``) and ``gated_residual`` (``x + gate * y``; spar in place), spar vs diffusers' same ops vs
torch.compile of them, at the SANA block shapes of :mod:`bench.bench_dit`. Minimum bytes: read x
(and y) once, write the result once."""

from __future__ import annotations

import torch
import torch.nn as nn

import spar_kernels as sk
from bench.bench_dit import B, compiled_unless_quick, no_grad, sana_shapes
from bench.harness import Case


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.tensor([], dtype=dtype).element_size()
    for tag, c, N, _H, _W in sana_shapes(quick):
        C = c["dim"]
        mk = dict(device=device, dtype=dtype)
        x = torch.randn(B, N, C, **mk)
        y = torch.randn(B, N, C, **mk)
        mods = (torch.randn(6, C, **mk)[None] + torch.randn(B, 6, C, **mk)).chunk(6, dim=1)
        shift, scale, gate = mods[0], mods[1], mods[2]
        norm = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        o_norm = torch.empty(B, N, C, **mk)
        xr = x.clone()
        act = B * N * C * es
        name = f"{tag} {str(dtype)[6:]}"

        def d_adaln(x=x, norm=norm, shift=shift, scale=scale):
            return norm(x) * (1 + scale) + shift

        def d_gated(x=x, y=y, gate=gate):
            return x + gate * y

        yield Case(op="adaln_layernorm", name=name, bytes=2 * act, baseline="diffusers",
                   providers={"spar": lambda x=x, s=shift, sc=scale, o=o_norm: no_grad(
                                  lambda: sk.adaln_layernorm(x, s, sc, eps=1e-6, out=o)),
                              "diffusers": lambda f=d_adaln: no_grad(f),
                              "torch.compile": compiled_unless_quick(no_grad(d_adaln), quick)})
        yield Case(op="gated_residual", name=name, bytes=3 * act, baseline="diffusers",
                   providers={"spar": lambda xr=xr, y=y, g=gate: no_grad(lambda: sk.gated_residual(xr, y, g, out=xr)),
                              "diffusers": lambda f=d_gated: no_grad(f),
                              "torch.compile": compiled_unless_quick(no_grad(d_gated), quick)})
