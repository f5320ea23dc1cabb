"""SANA DiT block kernels: spar vs the diffusers modules they replace vs torch.compile of those.

Cases (batch 2 = the CFG batch, SANA-0.6B and SANA-1.6B block shapes, 256 and 1024 image tokens):

- per op: ``linear_attention`` (diffusers: ``SanaLinearAttnProcessor2_0`` on an ``Attention``
  whose projections are identities, so only the attention math is timed), ``adaln_layernorm``
  (``norm1(x) * (1 + scale) + shift``), ``gated_residual`` (``x + gate * y``; spar in place),
  ``dwconv_glu`` (``GLUMBConv``'s ``conv_depth`` -> chunk -> ``a * silu(gate)``);
- ``nongemm``: all fused non-GEMM work of one block in sequence (2 x adaLN, linear attention,
  2 x gated residual, dwconv-GLU), spar vs diffusers' same ops;
- ``block``: a whole ``SanaTransformerBlock`` (context of 300 + 277 tokens: diffusers pads and
  masks, spar packs) vs ``spar_kernels.sana_block.sana_block_forward`` with the same weights,
  with and without the context K/V cached across steps.

Launches per block (spar, CUDA, K/V not cached): 2 adaLN + 3 q/k/v GEMMs + 2 linear attention +
1 out GEMM + 1 gated residual + 1 q GEMM + 2 k/v GEMMs + 1 cross attention + 1 out GEMM + 1 add +
1 GEMM + 1 SiLU + 1 dwconv-GLU + 1 GEMM + 1 gated residual = 20 (18 with K/V cached), against ~35
kernels for diffusers' block. GPU timings cannot be taken here (no GPU): CPU figures only.
``--quick`` runs 0.6B at 256 tokens and skips torch.compile (its compile time dominates).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import spar_kernels as sk
from bench.harness import Case, Unavailable

B = 2
CONFIGS = {  # diffusers SanaTransformer2DModel configs (docs: /work/shared/SPAR_MODEL.md)
    "sana-0.6b": dict(dim=1152, heads=36, head_dim=32, cross_heads=16, cross_head_dim=72),
    "sana-1.6b": dict(dim=2240, heads=70, head_dim=32, cross_heads=20, cross_head_dim=112),
}
GRIDS = {256: (16, 16), 1024: (32, 32)}
CTX_LENS = [300, 277]
MLP_RATIO = 2.5

_blocks: dict = {}
# every case compiles the same closures with new tensors: keep dynamo from giving up after 8
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)


def _block(cfg_name: str):
    if cfg_name not in _blocks:
        from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

        c = CONFIGS[cfg_name]
        torch.manual_seed(0)
        _blocks.clear()  # one block in memory at a time
        _blocks[cfg_name] = SanaTransformerBlock(
            c["dim"], c["heads"], c["head_dim"], num_cross_attention_heads=c["cross_heads"],
            cross_attention_head_dim=c["cross_head_dim"], cross_attention_dim=c["dim"],
            mlp_ratio=MLP_RATIO).eval().requires_grad_(False)
    return _blocks[cfg_name]


def _compiled(fn, quick):
    def factory():
        if quick:
            raise Unavailable("skipped in --quick (compile time)")
        try:
            c = torch.compile(fn, dynamic=False)
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"torch.compile: {e}") from e
        return c
    return factory


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _op_cases(cfg_name, N, H, W, dtype, device, quick):
    c = CONFIGS[cfg_name]
    C, heads, d = c["dim"], c["heads"], c["head_dim"]
    Ch = int(MLP_RATIO * C)
    es = torch.tensor([], dtype=dtype).element_size()
    tag = f"{cfg_name} B={B} N={N} ({H}x{W}) {str(dtype)[6:]}"
    mk = dict(device=device, dtype=dtype)
    x = torch.randn(B, N, C, **mk)
    y = torch.randn(B, N, C, **mk)
    mods = (torch.randn(6, C, **mk)[None] + torch.randn(B, 6, C, **mk)).chunk(6, dim=1)
    shift, scale, gate = mods[0], mods[1], mods[2]
    norm = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
    u = torch.randn(B, N, 2 * Ch, **mk)
    u_img = u.view(B, H, W, 2 * Ch).permute(0, 3, 1, 2)        # what conv_inverted hands conv_depth
    conv_depth = nn.Conv2d(2 * Ch, 2 * Ch, 3, 1, 1, groups=2 * Ch).to(**mk).requires_grad_(False)

    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

    attn = Attention(query_dim=C, heads=heads, dim_head=d, processor=SanaLinearAttnProcessor2_0())
    attn.to_q = attn.to_k = attn.to_v = nn.Identity()
    attn.to_out[0] = nn.Identity()
    attn = attn.to(**mk).eval()
    qkv = x.view(B, N, heads, d)

    def d_adaln(x=x):
        return norm(x) * (1 + scale) + shift

    def d_gated(x=x):
        return x + gate * y

    def d_attn(x=x):
        return attn(x)

    def d_glu():
        h, g = torch.chunk(conv_depth(u_img), 2, dim=1)
        return h * F.silu(g)

    def d_nongemm():
        h = d_adaln()
        o = d_attn(h)
        r = x + gate * o
        h = norm(r) * (1 + mods[4]) + mods[3]
        g = d_glu()
        return r + mods[5] * g.flatten(2).transpose(1, 2)[..., :C]

    o_attn = torch.empty(B, N, heads, d, **mk)
    o_norm = torch.empty(B, N, C, **mk)
    o_glu = torch.empty(B, N, Ch, **mk)
    xr = x.clone()

    def s_adaln():
        return sk.adaln_layernorm(x, shift, scale, eps=1e-6, out=o_norm)

    def s_gated():
        return sk.gated_residual(xr, y, gate, out=xr)

    def s_attn():
        return sk.linear_attention(qkv, qkv, qkv, out=o_attn)

    def s_glu():
        return sk.dwconv_glu(u, conv_depth.weight, conv_depth.bias, H, W, out=o_glu)

    def s_nongemm():
        h = sk.adaln_layernorm(x, shift, scale, eps=1e-6, out=o_norm)
        sk.linear_attention(h.view(B, N, heads, d), h.view(B, N, heads, d), h.view(B, N, heads, d), out=o_attn)
        sk.gated_residual(xr, o_attn.view(B, N, C), gate, out=xr)
        sk.adaln_layernorm(xr, mods[3], mods[4], eps=1e-6, out=o_norm)
        g = sk.dwconv_glu(u, conv_depth.weight, conv_depth.bias, H, W, out=o_glu)
        return sk.gated_residual(xr, g[..., :C], mods[5], out=xr)

    act = B * N * C * es
    glu_bytes = B * N * 3 * Ch * es
    attn_flops = 2 * B * heads * N * d * d * 2
    ops = [
        ("adaln_layernorm", s_adaln, d_adaln, 2 * act, None),
        ("gated_residual", s_gated, d_gated, 3 * act, None),
        ("linear_attention", s_attn, d_attn, 4 * act, attn_flops),
        ("dwconv_glu", s_glu, d_glu, glu_bytes, B * N * 2 * Ch * 9 * 2),
        ("nongemm", s_nongemm, d_nongemm, 2 * 2 * act + 2 * 3 * act + 4 * act + glu_bytes, None),
    ]
    for op, s, dfn, nbytes, flops in ops:
        yield Case(op=f"dit:{op}", name=tag, bytes=nbytes, flops=flops, baseline="diffusers",
                   providers={"spar": (lambda s=s: _no_grad(s)), "diffusers": (lambda f=dfn: _no_grad(f)),
                              "torch.compile": _compiled(_no_grad(dfn), quick)},
                   note="CPU figures" if device.type == "cpu" else "")


def _block_case(cfg_name, N, H, W, dtype, device, quick):
    from spar_kernels.sana_block import sana_block_forward, sana_cross_kv

    c = CONFIGS[cfg_name]
    C = c["dim"]
    Ch = int(MLP_RATIO * C)
    blk = _block(cfg_name).to(device=device, dtype=dtype)
    mk = dict(device=device, dtype=dtype)
    x = torch.randn(B, N, C, **mk)
    t = torch.randn(B, 6 * C, **mk)
    L = max(CTX_LENS)
    ctx = torch.randn(B, L, C, **mk)
    keep = torch.zeros(B, L, **mk)
    for b, n in enumerate(CTX_LENS):
        keep[b, :n] = 1
    bias = ((1 - keep) * -10000.0).unsqueeze(1)
    packed = torch.cat([ctx[b, :n] for b, n in enumerate(CTX_LENS)])
    layout = sk.AttentionLayout.cross([N] * B, CTX_LENS, device=device)

    def d_block():
        return blk(x, encoder_hidden_states=ctx, encoder_attention_mask=bias, timestep=t, height=H, width=W)

    def s_block():
        return sana_block_forward(blk, x, packed, CTX_LENS, t, H, W, cross_layout=layout)

    kv = []

    def s_block_cached():
        if not kv:
            kv.append(sana_cross_kv(blk, packed))
        return sana_block_forward(blk, x, None, CTX_LENS, t, H, W, cross_kv=kv[0], cross_layout=layout)

    tok = B * N
    gemm = 2 * tok * (4 * C * C + 2 * C * C + 3 * C * Ch) + 2 * sum(CTX_LENS) * 2 * C * C
    tag = f"{cfg_name} B={B} N={N} ({H}x{W}) ctx={'+'.join(map(str, CTX_LENS))} {str(dtype)[6:]}"
    yield Case(op="dit:block", name=tag, flops=gemm, baseline="diffusers",
               providers={"spar": (lambda: _no_grad(s_block)), "spar (ctx K/V cached)": (lambda: _no_grad(s_block_cached)),
                          "diffusers": (lambda: _no_grad(d_block)), "torch.compile": _compiled(_no_grad(d_block), quick)},
               note="FLOPs: the block's GEMMs only")


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    todo = [("sana-0.6b", 256)] if quick else [(n, t) for n in CONFIGS for t in GRIDS]
    for cfg_name, N in todo:
        H, W = GRIDS[N]
        yield from _op_cases(cfg_name, N, H, W, dtype, device, quick)
        yield from _block_case(cfg_name, N, H, W, dtype, device, quick)


def interleaved(reps: int = 9, block: bool = True) -> None:
    """spar vs diffusers with the two providers' calls alternating (one call each, ``reps`` times),
    medians printed: on a shared CPU this cancels the load swings that hit one provider's whole
    timing window in the harness. ``python -m bench.bench_dit`` (CPU figures, fp32, 1 thread)."""
    import time

    dev = torch.device("cpu")

    def ab(fs):
        ts = {k: [] for k in fs}
        for f in fs.values():
            f()
        for _ in range(reps):
            for k, f in fs.items():
                t0 = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t0)
        return {k: sorted(v)[len(v) // 2] * 1e6 for k, v in ts.items()}

    for cfg_name in CONFIGS:
        for N, (H, W) in GRIDS.items():
            cs = {c.op: c for c in _op_cases(cfg_name, N, H, W, torch.float32, dev, True)}
            if block:
                cs.update({c.op: c for c in _block_case(cfg_name, N, H, W, torch.float32, dev, True)})
            row = []
            for op, c in cs.items():
                m = ab({k: c.providers[k]() for k in ("spar", "diffusers")})
                row.append(f"{op[4:]} {m['spar']:.0f} / {m['diffusers']:.0f} us ({m['diffusers'] / m['spar']:.2f}x)")
            print(f"{cfg_name} N={N}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("CPU figures (fp32, 1 thread), medians, spar / diffusers (speedup), calls interleaved")
    interleaved()
