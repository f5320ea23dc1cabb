"""A whole diffusers SanaTransformerBlock against the runtime's block (spar_runtime.sana.SanaBlock)
with the same weights: padded-and-masked context on the diffusers side, unpadded packed context
through hybrid_attention on spar's."""

import pytest
import torch

import spar_kernels as sk
from spar_kernels.testing import assert_close_fa
from spar_runtime.sana import SanaBlock, SanaConfig

from conftest import requires_triton


def _block(dim, heads, head_dim, cross_heads, cross_head_dim, seed=0):
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    torch.manual_seed(seed)
    return SanaTransformerBlock(dim, heads, head_dim, num_cross_attention_heads=cross_heads,
                                cross_attention_head_dim=cross_head_dim, cross_attention_dim=dim).eval()


def _runtime(blk) -> SanaBlock:
    """The runtime block holding ``blk``'s weights (a lone block's state dict: prefix "")."""
    a1, a2 = blk.attn1, blk.attn2
    cfg = SanaConfig.from_dict({
        "in_channels": 32, "num_attention_heads": a1.heads, "attention_head_dim": a1.inner_dim // a1.heads,
        "num_layers": 1, "num_cross_attention_heads": a2.heads, "cross_attention_head_dim": a2.inner_dim // a2.heads,
        "cross_attention_dim": a1.inner_dim, "caption_channels": 16, "mlp_ratio": 2.5, "attention_bias": True})
    w = {k: v.detach() for k, v in blk.state_dict().items()}
    return SanaBlock(cfg, w, "")


def _inputs(B, H, W, dim, lens):
    x = torch.randn(B, H * W, dim)
    t = torch.randn(B, 6 * dim)
    L = max(lens)
    ctx = torch.randn(B, L, dim)
    keep = torch.zeros(B, L)
    for b, n in enumerate(lens):
        keep[b, :n] = 1
    bias = ((1 - keep) * -10000.0).unsqueeze(1)  # as SanaTransformer2DModel.forward builds it
    packed = torch.cat([ctx[b, :n] for b, n in enumerate(lens)])
    return x, t, ctx, bias, packed


def _diffusers(blk, x, t, ctx, bias, H, W):
    return blk(x, encoder_hidden_states=ctx, encoder_attention_mask=bias.to(x.dtype), timestep=t, height=H, width=W)


def _spar(blk: SanaBlock, x, t, packed, lens, H, W, layout=None):
    c = blk.config
    kv = torch.zeros((2, packed.shape[0], c.num_cross_attention_heads, blk.attn_dim), dtype=x.dtype)
    blk.cross_kv(packed.to(x.dtype), kv)
    layout = layout or sk.AttentionLayout.cross([H * W] * x.shape[0], lens)
    return blk(x.clone(), blk.modulation(t.view(x.shape[0], 6, -1)), kv, layout, H, W)


# (B, H, W, dim, heads x head_dim, cross heads x cross head dim, context lengths)
CASES = [
    (1, 5, 7, 64, (2, 32), (2, 32), [9]),
    (2, 5, 7, 96, (3, 32), (2, 72), [5, 11]),     # SANA-0.6B's cross head dim 72, H != W
    (2, 1, 13, 64, (2, 32), (1, 112), [1, 7]),    # SANA-1.6B's 112, a 1 x N grid, a 1-token context
    (2, 6, 1, 64, (2, 32), (2, 48), [3, 3]),      # N x 1; a cross head dim hybrid_attention pads (48 -> 64)
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sana_block_matches_diffusers(case, dtype):
    B, H, W, dim, (h1, d1), (h2, d2), lens = case
    blk = _block(dim, h1, d1, h2, d2)
    x, t, ctx, bias, packed = _inputs(B, H, W, dim, lens)
    with torch.no_grad():
        want64 = _diffusers(blk.double(), x.double(), t.double(), ctx.double(), bias.double(), H, W)
        blk = blk.to(dtype)
        xd = x.to(dtype)
        base = _diffusers(blk, xd, t.to(dtype), ctx.to(dtype), bias, H, W)
        got = _spar(_runtime(blk), xd, t.to(dtype), packed.to(dtype), lens, H, W)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        rel = float((got.double() - want64).abs().max() / want64.abs().max())
        assert rel <= 1e-4, rel
    assert_close_fa(got, base, want64, name="block")


def test_sana_block_reuses_kv_and_layout_across_steps():
    B, H, W, dim, lens = 2, 4, 3, 64, [4, 6]
    blk = _block(dim, 2, 32, 2, 32)
    x, t, ctx, bias, packed = _inputs(B, H, W, dim, lens)
    rt = _runtime(blk)
    with torch.no_grad():
        want = _diffusers(blk, x, t, ctx, bias, H, W)
        kv = torch.zeros((2, packed.shape[0], 2, 32))
        rt.cross_kv(packed, kv)
        layout = sk.AttentionLayout.cross([H * W] * B, lens)
        for _ in range(2):  # reused across "steps"; the block updates its input in place
            hs = x.clone()
            got = rt(hs, rt.modulation(t.view(B, 6, dim)), kv, layout, H, W)
            assert got.data_ptr() == hs.data_ptr()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@requires_triton
def test_sana_block_with_triton_kernels(monkeypatch):
    """The fused ops and the cross-attention on their Triton kernels (interpreter), no fallback."""
    from spar_kernels import attention

    B, H, W, dim, lens = 2, 3, 5, 64, [2, 5]
    blk = _block(dim, 2, 32, 2, 32)
    x, t, ctx, bias, packed = _inputs(B, H, W, dim, lens)
    ran, impl = [], attention._IMPLS["triton"]
    monkeypatch.setitem(attention._IMPLS, "triton", lambda *a: ran.append(a[0].shape) or impl(*a))
    with torch.no_grad():
        want = _diffusers(blk, x, t, ctx, bias, H, W)
        rt = _runtime(blk)
        with sk.backend("triton"):
            got = _spar(rt, x, t, packed, lens, H, W)
    assert ran == [(B * H * W, 2, 32)]  # the cross-attention ran on the Triton kernel
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= 1e-4, rel
