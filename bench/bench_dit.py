"""The SANA DiT block: its fused non-GEMM work and the whole block, spar vs the diffusers modules
they replace vs torch.compile of those; and the interleaved CPU-time run of every DiT op.

Cases (batch 2 = the CFG batch, SANA-0.6B and SANA-1.6B block shapes, 256 and 1024 image tokens):

- ``nongemm``: all fused non-GEMM work of one block in sequence (2 x adaLN, linear attention,
  2 x gated residual, dwconv-GLU), spar vs diffusers' same ops;
- ``block``: a whole ``SanaTransformerBlock`` (context of 300 + 277 tokens: diffusers pads and
  masks, spar packs) vs the runtime's ``spar_runtime.sana.SanaBlock`` with the same weights,
  with and without the context K/V cached across steps.

The single ops have their own modules (bench_linear_attention.py, bench_adaln.py,
bench_dwconv_glu.py) on the shapes :func:`sana_shapes` gives. ``--quick`` runs 0.6B at 256 tokens
and skips torch.compile (its compile time dominates). GPU timings cannot be taken here (no GPU).

    OMP_NUM_THREADS=1 python -m bench.bench_dit [--reps 9] [--no-block] [--ops a,b] [--isa base|avx2|avx512]

runs spar and diffusers of every DiT case with their calls alternating, timed with the process CPU
clock on one thread (robust on a shared machine), and prints medians.
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


def sana_shapes(quick: bool):
    """(tag, config, N, H, W) of the bench shapes: both SANA sizes at 256 and 1024 tokens
    (--quick: 0.6B at 256)."""
    todo = [("sana-0.6b", 256)] if quick else [(n, t) for n in CONFIGS for t in GRIDS]
    for cfg_name, N in todo:
        H, W = GRIDS[N]
        yield f"{cfg_name} B={B} N={N} ({H}x{W})", CONFIGS[cfg_name], N, H, W


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


def compiled_unless_quick(fn, quick):
    """A provider factory timing torch.compile(fn); Unavailable in --quick (compile time)."""
    def factory():
        if quick:
            raise Unavailable("skipped in --quick (compile time)")
        try:
            c = torch.compile(fn, dynamic=False)
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"torch.compile: {e}") from e
        return c
    return factory


def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _nongemm_case(tag, c, N, H, W, dtype, device, quick):
    C, heads, d = c["dim"], c["heads"], c["head_dim"]
    Ch = int(MLP_RATIO * C)
    es = torch.tensor([], dtype=dtype).element_size()
    mk = dict(device=device, dtype=dtype)
    x = torch.randn(B, N, C, **mk)
    mods = (torch.randn(6, C, **mk)[None] + torch.randn(B, 6, C, **mk)).chunk(6, dim=1)
    norm = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
    u = torch.randn(B, N, 2 * Ch, **mk)
    u_img = u.view(B, H, W, 2 * Ch).permute(0, 3, 1, 2)
    conv_depth = nn.Conv2d(2 * Ch, 2 * Ch, 3, 1, 1, groups=2 * Ch).to(**mk).requires_grad_(False)

    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

    attn = Attention(query_dim=C, heads=heads, dim_head=d, processor=SanaLinearAttnProcessor2_0())
    attn.to_q = attn.to_k = attn.to_v = nn.Identity()
    attn.to_out[0] = nn.Identity()
    attn = attn.to(**mk).eval()

    def d_nongemm():
        h = norm(x) * (1 + mods[1]) + mods[0]
        o = attn(h)
        r = x + mods[2] * o
        h = norm(r) * (1 + mods[4]) + mods[3]
        hh, g = torch.chunk(conv_depth(u_img), 2, dim=1)
        g = hh * F.silu(g)
        return r + mods[5] * g.flatten(2).transpose(1, 2)[..., :C]

    o_attn = torch.empty(B, N, heads, d, **mk)
    o_norm = torch.empty(B, N, C, **mk)
    o_glu = torch.empty(B, N, Ch, **mk)
    xr = x.clone()
    hv = o_norm.view(B, N, heads, d)
    ws = sk.linear_attention_workspace(hv, hv, hv)

    def s_nongemm():
        h = sk.adaln_layernorm(x, mods[0], mods[1], eps=1e-6, out=o_norm).view(B, N, heads, d)
        sk.linear_attention(h, h, h, out=o_attn, workspace=ws)
        sk.gated_residual(xr, o_attn.view(B, N, C), mods[2], out=xr)
        sk.adaln_layernorm(xr, mods[3], mods[4], eps=1e-6, out=o_norm)
        g = sk.dwconv_glu(u, conv_depth.weight, conv_depth.bias, H, W, out=o_glu)
        return sk.gated_residual(xr, g[..., :C], mods[5], out=xr)

    act = B * N * C * es
    glu_bytes = B * N * 3 * Ch * es
    yield Case(op="dit_nongemm", name=f"{tag} {str(dtype)[6:]}", bytes=2 * 2 * act + 2 * 3 * act + 4 * act + glu_bytes,
               baseline="diffusers",
               providers={"spar": lambda: no_grad(s_nongemm), "diffusers": lambda: no_grad(d_nongemm),
                          "torch.compile": compiled_unless_quick(no_grad(d_nongemm), quick)})


def _block_case(cfg_name, N, H, W, dtype, device, quick):
    from spar_runtime.sana import SanaBlock, SanaConfig

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
    rt = SanaBlock(SanaConfig.from_dict({
        "num_attention_heads": c["heads"], "attention_head_dim": c["head_dim"], "num_layers": 1,
        "num_cross_attention_heads": c["cross_heads"], "cross_attention_head_dim": c["cross_head_dim"],
        "cross_attention_dim": C, "mlp_ratio": MLP_RATIO, "attention_bias": True}), blk.state_dict(), "")
    mod = rt.modulation(t.view(B, 6, C))
    hs = torch.empty_like(x)

    def d_block():
        return blk(x, encoder_hidden_states=ctx, encoder_attention_mask=bias, timestep=t, height=H, width=W)

    kv = torch.zeros((2, packed.shape[0], c["cross_heads"], rt.attn_dim), **mk)
    rt.cross_kv(packed, kv)

    def s_block():           # the context K/V recomputed, as for a one-step call
        rt.cross_kv(packed, kv)
        return s_block_cached()

    def s_block_cached():    # the block updates its input in place: start from x each call
        return rt(hs.copy_(x), mod, kv, layout, H, W)

    tok = B * N
    gemm = 2 * tok * (4 * C * C + 2 * C * C + 3 * C * Ch) + 2 * sum(CTX_LENS) * 2 * C * C
    tag = f"{cfg_name} B={B} N={N} ({H}x{W}) ctx={'+'.join(map(str, CTX_LENS))} {str(dtype)[6:]}"
    yield Case(op="dit_block", name=tag, flops=gemm, baseline="diffusers",
               providers={"spar": (lambda: no_grad(s_block)), "spar (ctx K/V cached)": (lambda: no_grad(s_block_cached)),
                          "diffusers": (lambda: no_grad(d_block)), "torch.compile": compiled_unless_quick(no_grad(d_block), quick)},
               note="FLOPs: the block's GEMMs only")


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for cfg_name, c in CONFIGS.items():
        for tag, cc, N, H, W in sana_shapes(quick):
            if cc is c:
                yield from _nongemm_case(tag, c, N, H, W, dtype, device, quick)
                yield from _block_case(cfg_name, N, H, W, dtype, device, quick)


def _cpu_name() -> str:
    from bench.harness import device_name

    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    isa = "AVX-512" if " avx512f" in flags else ("AVX2" if " avx2" in flags else "no AVX2")
    return f"{device_name(torch.device('cpu'))}, {isa}"


def interleaved(reps: int = 9, block: bool = True, ops=None) -> None:
    """spar vs diffusers of every DiT case (the per-op modules' cases, nongemm, block), one call of
    each provider in turn, ``reps`` times, timed with the process CPU clock; medians printed."""
    from bench import bench_adaln, bench_dwconv_glu, bench_linear_attention
    from bench.harness import time_interleaved

    dev = torch.device("cpu")
    mods = (bench_adaln, bench_linear_attention, bench_dwconv_glu)
    by_shape: dict = {}
    for m in mods:
        for c in m.cases(dev, quick=False):
            by_shape.setdefault(c.name, []).append(c)
    for cfg_name, c in CONFIGS.items():
        for tag, cc, N, H, W in sana_shapes(False):
            if cc is not c:
                continue
            name = f"{tag} float32"
            by_shape.setdefault(name, []).extend(_nongemm_case(tag, c, N, H, W, torch.float32, dev, True))
            if block:
                by_shape[name].extend(_block_case(cfg_name, N, H, W, torch.float32, dev, True))
    print("| case | op | spar us | diffusers us | speedup |")
    print("|---|---|---:|---:|---:|")
    for name, cs in by_shape.items():
        for c in cs:
            if ops and c.op not in ops:
                continue
            fs = {k: c.providers[k]() for k in ("spar", "diffusers")}
            med = {k: v * 1e6 for k, v in time_interleaved(fs, reps, warmup=1, clock="cpu").median().items()}
            print(f"| {name} | {c.op} | {med['spar']:.0f} | {med['diffusers']:.0f} | "
                  f"{med['diffusers'] / med['spar']:.2f}x |", flush=True)


def _main(argv=None) -> int:
    import argparse
    import os

    p = argparse.ArgumentParser(prog="python -m bench.bench_dit")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--no-block", action="store_true", help="skip the whole-block rows (the slow ones)")
    p.add_argument("--ops", default=None, help="comma-separated ops to run (default: all)")
    p.add_argument("--isa", choices=["base", "avx2", "avx512"], default=None,
                   help="force the C++ twins' instruction-set variant (SPAR_CPU_ISA; never one this CPU lacks)")
    args = p.parse_args(argv)
    if args.isa:
        os.environ["SPAR_CPU_ISA"] = args.isa
    torch.set_num_threads(1)
    print(f"{_cpu_name()}; twins: {os.environ.get('SPAR_CPU_ISA') or 'widest supported'}; fp32, 1 thread, "
          f"process CPU time, median of {args.reps}, spar and diffusers calls alternating")
    interleaved(args.reps, block=not args.no_block, ops=args.ops.split(",") if args.ops else None)
    return 0


if __name__ == "__main__":
    import os
    import sys

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when the OpenMP runtime starts
    sys.exit(_main())
