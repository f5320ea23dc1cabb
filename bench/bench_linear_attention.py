"""SANA's ReLU linear attention: spar vs diffusers' ``SanaLinearAttnProcessor2_0`` (on an
``Attention`` whose projections are identities, so only the attention math is timed) vs
torch.compile of it, at the SANA block shapes of :mod:`bench.bench_dit`. spar gets ``out=`` and a
``workspace=`` allocated once, as a runtime's plan holds them."""

from __future__ import annotations

import torch
import torch.nn as nn

import spar_kernels as sk
from bench.bench_dit import B, compiled_unless_quick, no_grad, sana_shapes
from bench.harness import Case


def cases(device: torch.device, quick: bool):
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.tensor([], dtype=dtype).element_size()
    for tag, c, N, _H, _W in sana_shapes(quick):
        C, heads, d = c["dim"], c["heads"], c["head_dim"]
        mk = dict(device=device, dtype=dtype)
        x = torch.randn(B, N, C, **mk)
        attn = Attention(query_dim=C, heads=heads, dim_head=d, processor=SanaLinearAttnProcessor2_0())
        attn.to_q = attn.to_k = attn.to_v = nn.Identity()
        attn.to_out[0] = nn.Identity()
        attn = attn.to(**mk).eval()
        qkv = x.view(B, N, heads, d)
        out = torch.empty(B, N, heads, d, **mk)
        ws = sk.linear_attention_workspace(qkv, qkv, qkv)

        def d_attn(x=x, attn=attn):
            return attn(x)

        yield Case(op="linear_attention", name=f"{tag} {str(dtype)[6:]}", bytes=4 * B * N * C * es,
                   flops=2 * B * heads * N * d * d * 2, baseline="diffusers",
                   providers={"spar": lambda qkv=qkv, out=out, ws=ws: no_grad(
                                  lambda: sk.linear_attention(qkv, qkv, qkv, out=out, workspace=ws)),
                              "diffusers": lambda f=d_attn: no_grad(f),
                              "torch.compile": compiled_unless_quick(no_grad(d_attn), quick)})
