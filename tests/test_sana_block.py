"""A whole diffusers SanaTransformerBlock against the same block rebuilt from spar's fused ops
(spar_kernels.sana_block.sana_block_forward), same weights, padded-and-masked context on the
diffusers side, unpadded packed context through hybrid_attention on spar's."""

import pytest
import torch

import spar_kernels as sk
from spar_kernels.sana_block import sana_block_forward, sana_cross_kv
from spar_kernels.testing import assert_close_fa

from conftest import requires_triton


def _block(dim, heads, head_dim, cross_heads, cross_head_dim, ctx_dim, seed=0):
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    torch.manual_seed(seed)
    return SanaTransformerBlock(dim, heads, head_dim, num_cross_attention_heads=cross_heads,
                                cross_attention_head_dim=cross_head_dim, cross_attention_dim=ctx_dim).eval()


def _inputs(B, H, W, dim, ctx_dim, lens):
    x = torch.randn(B, H * W, dim)
    t = torch.randn(B, 6 * dim)
    L = max(lens)
    ctx = torch.randn(B, L, ctx_dim)
    keep = torch.zeros(B, L)
    for b, n in enumerate(lens):
        keep[b, :n] = 1
    bias = ((1 - keep) * -10000.0).unsqueeze(1)  # as SanaTransformer2DModel.forward builds it
    packed = torch.cat([ctx[b, :n] for b, n in enumerate(lens)])
    return x, t, ctx, bias, packed


def _diffusers(blk, x, t, ctx, bias, H, W):
    return blk(x, encoder_hidden_states=ctx, encoder_attention_mask=bias.to(x.dtype), timestep=t, height=H, width=W)


# (B, H, W, dim, heads x head_dim, cross heads x cross head dim, context lengths)
CASES = [
    (1, 5, 7, 64, (2, 32), (2, 32), [9]),
    (2, 5, 7, 96, (3, 32), (2, 72), [5, 11]),     # SANA-0.6B's cross head dim 72, H != W
    (2, 1, 13, 64, (2, 32), (1, 112), [1, 7]),    # SANA-1.6B's 112, a 1 x N grid, a 1-token context
    (2, 6, 1, 64, (2, 32), (2, 64), [3, 3]),      # N x 1
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sana_block_matches_diffusers(case, dtype):
    B, H, W, dim, (h1, d1), (h2, d2), lens = case
    blk = _block(dim, h1, d1, h2, d2, dim)
    x, t, ctx, bias, packed = _inputs(B, H, W, dim, dim, lens)
    with torch.no_grad():
        want64 = _diffusers(blk.double(), x.double(), t.double(), ctx.double(), bias.double(), H, W)
        blk = blk.to(dtype)
        xd = x.to(dtype)
        base = _diffusers(blk, xd, t.to(dtype), ctx.to(dtype), bias, H, W)
        x_before = xd.clone()
        got = sana_block_forward(blk, xd, packed.to(dtype), lens, t.to(dtype), H, W)
    assert torch.equal(xd, x_before), "the input hidden states were modified"
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        rel = float((got.double() - want64).abs().max() / want64.abs().max())
        assert rel <= 1e-4, rel
    assert_close_fa(got, base, want64, name="block")


def test_sana_block_cached_cross_kv_and_layout():
    B, H, W, dim, lens = 2, 4, 3, 64, [4, 6]
    blk = _block(dim, 2, 32, 2, 32, 48)
    x, t, ctx, bias, packed = _inputs(B, H, W, dim, 48, lens)
    with torch.no_grad():
        want = _diffusers(blk, x, t, ctx, bias, H, W)
        kv = sana_cross_kv(blk, packed)
        layout = sk.AttentionLayout.cross([H * W] * B, lens)
        for _ in range(2):  # reused across "steps"
            got = sana_block_forward(blk, x, None, lens, t, H, W, cross_kv=kv, cross_layout=layout)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@requires_triton
def test_sana_block_with_triton_kernels(monkeypatch):
    """The fused ops on their Triton kernels (interpreter); cross-attention on whichever path runs."""
    B, H, W, dim, lens = 2, 3, 5, 64, [2, 5]
    blk = _block(dim, 2, 32, 2, 32, dim)
    x, t, ctx, bias, packed = _inputs(B, H, W, dim, dim, lens)
    hybrid = sk.hybrid_attention

    def hybrid_any_backend(*a, **k):
        try:
            with sk.backend("triton"):
                return hybrid(*a, **k)
        except sk.BackendUnavailableError:
            with sk.backend("auto"):
                return hybrid(*a, **k)

    monkeypatch.setattr(sk, "hybrid_attention", hybrid_any_backend)
    with torch.no_grad():
        want = _diffusers(blk, x, t, ctx, bias, H, W)
        with sk.backend("triton"):
            got = sana_block_forward(blk, x, packed, lens, t, H, W)
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= 1e-4, rel


@pytest.mark.parametrize("call, match", [
    (lambda blk, x, t, p: sana_block_forward(blk, x, p, [4, 6], t, 4, 4), "height, width"),
    (lambda blk, x, t, p: sana_block_forward(blk, x, p, [4, 6], t[:, :10], 4, 3), "timestep"),
    (lambda blk, x, t, p: sana_block_forward(blk, x[0], p, [4, 6], t, 4, 3), "hidden_states"),
    (lambda blk, x, t, p: sana_block_forward(blk, x, None, [4, 6], t, 4, 3), "context"),
    (lambda blk, x, t, p: sana_cross_kv(blk, p[None]), "context: expected a packed"),
])
def test_sana_block_bad_inputs(call, match):
    blk = _block(64, 2, 32, 2, 32, 64)
    x, t, ctx, bias, packed = _inputs(2, 4, 3, 64, 64, [4, 6])
    with pytest.raises((ValueError, TypeError), match=match):
        with torch.no_grad():
            call(blk, x, t, packed)
