"""spar_runtime.sana.SanaDiT against diffusers' SanaTransformer2DModel (tiny random models saved to tmp dirs).

The oracle is diffusers itself, called the way the reference pipeline calls it: the batch with a
padded context and encoder_attention_mask, and each sample alone with its unpadded context.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from _util import perturb as _perturb, rel as _rel  # noqa: E402
from conftest import requires_triton  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import spar_kernels as sk  # noqa: E402
from spar_runtime.loading import CheckpointError  # noqa: E402
from spar_runtime.sana import SanaContext, SanaDiT, random_weights, sana_param_shapes  # noqa: E402

BASE = dict(in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=48,
            sample_size=8, patch_size=1)
VARIANTS = {
    "base": {},
    # SANA's real head shapes (self 32, cross 72, 16 cross heads x 72 = 1152 in the 0.6B) at a small width
    "sana-heads": dict(num_attention_heads=3, attention_head_dim=32, num_cross_attention_heads=2,
                       cross_attention_head_dim=72, cross_attention_dim=96, caption_channels=40, in_channels=8,
                       out_channels=8, num_layers=3),
    # every optional branch: affine norm2, q/k/v biases, sin-cos position embedding, qk-norm, patch 2,
    # a cross-attention head dim hybrid_attention does not take (12: zero-padded to 16)
    "options": dict(norm_elementwise_affine=True, attention_bias=True, interpolation_scale=1.0,
                    qk_norm="rms_norm_across_heads", patch_size=2, out_channels=16, mlp_ratio=2.0,
                    num_cross_attention_heads=3, cross_attention_head_dim=12),
}
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{variant: (diffusers model, folder)}, each saved with save_pretrained."""
    out = {}
    for i, (name, extra) in enumerate(VARIANTS.items()):
        torch.manual_seed(100 + i)
        model = diffusers.SanaTransformer2DModel(**{**BASE, **extra}).eval()
        _perturb(model)
        folder = tmp_path_factory.mktemp(f"dit_{name}")
        model.save_pretrained(folder)
        out[name] = (model, str(folder))
    return out


def _pack(lens, width, seed):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(sum(lens), width, generator=g)
    padded = torch.zeros(len(lens), max(lens), width)
    mask = torch.zeros(len(lens), max(lens))
    o = 0
    for b, n in enumerate(lens):
        padded[b, :n], mask[b, :n] = ctx[o:o + n], 1
        o += n
    return ctx, padded, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (1, 6)])
def test_matches_diffusers_padded_batch(saved, variant, grid):
    model, folder = saved[variant]
    cfg = model.config
    p = cfg.patch_size
    H, W = grid[0] * p, grid[1] * p
    dit = SanaDiT.from_dir(folder)
    lens = [7, 3] if grid != (1, 6) else [1, 12]
    ctx, padded, mask = _pack(lens, cfg.caption_channels, seed=sum(grid))
    prepared = dit.prepare_context(ctx, lens)
    x = torch.randn(2, cfg.in_channels, H, W)
    for t in ([999, 999], [958, 41], [0, 500]):   # integer timesteps, as DPMSolverMultistepScheduler gives
        t = torch.tensor(t)
        got = dit(x, t, prepared)
        with torch.no_grad():
            ref = model(x, encoder_hidden_states=padded, encoder_attention_mask=mask, timestep=t).sample
        assert got.shape == ref.shape == (2, cfg.out_channels, H, W)
        assert _rel(got, ref) <= REL_TOL, (variant, grid, t)


def test_matches_diffusers_one_sample_at_a_time(saved):
    """The packed call equals diffusers run per sample without padding (float timesteps too)."""
    model, folder = saved["sana-heads"]
    cfg = model.config
    dit = SanaDiT.from_dir(folder)
    lens = [11, 4, 6]
    ctx, _, _ = _pack(lens, cfg.caption_channels, seed=3)
    prepared = dit.prepare_context(ctx, lens)
    x = torch.randn(3, cfg.in_channels, 6, 5)
    t = torch.tensor([812.5, 3.25, 400.0])
    got = dit(x, t, prepared)
    o = 0
    for b, n in enumerate(lens):
        with torch.no_grad():
            ref = model(x[b:b + 1], encoder_hidden_states=ctx[None, o:o + n], timestep=t[b:b + 1]).sample
        o += n
        assert _rel(got[b:b + 1], ref) <= REL_TOL, b


def test_context_kv_computed_once_and_reused(saved):
    """After prepare_context the step never touches the cross-attention K/V weights: removing
    them leaves every step's result unchanged, and the K/V held by the context are the ones used."""
    model, folder = saved["base"]
    dit = SanaDiT.from_dir(folder)
    lens = [4, 9]
    ctx, padded, mask = _pack(lens, model.config.caption_channels, seed=5)
    prepared = dit.prepare_context(ctx, lens)
    assert isinstance(prepared, SanaContext)
    assert prepared.kv.shape == (2, 2, sum(lens), 2, 16)
    x = torch.randn(2, 32, 4, 4)
    before = [dit(x, torch.tensor([t, t]), prepared) for t in (900, 100)]
    for blk in dit.blocks:
        blk.w_kv2 = blk.b_kv2 = None
    after = [dit(x, torch.tensor([t, t]), prepared) for t in (900, 100)]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        ref = model(x, encoder_hidden_states=padded, encoder_attention_mask=mask, timestep=torch.tensor([100, 100]))
    assert _rel(after[1], ref.sample) <= REL_TOL
    prepared.kv[:, 1].mul_(2.0)  # the values the step reads are the context's
    assert _rel(dit(x, torch.tensor([100, 100]), prepared), after[1]) > 1e-3


def test_random_weights_load_into_diffusers():
    """random_weights / sana_param_shapes name exactly diffusers' state dict."""
    config = {**BASE, **VARIANTS["options"]}
    weights = random_weights(config, torch.Generator().manual_seed(0))
    model = diffusers.SanaTransformer2DModel(**config).eval()
    model.load_state_dict(weights, strict=True)
    assert set(sana_param_shapes(config)) == set(model.state_dict())
    dit = SanaDiT(config, weights)
    lens = [3, 5]
    ctx, padded, mask = _pack(lens, config["caption_channels"], seed=1)
    x = torch.randn(2, 32, 6, 4)
    t = torch.tensor([700, 20])
    with torch.no_grad():
        ref = model(x, encoder_hidden_states=padded, encoder_attention_mask=mask, timestep=t).sample
    assert _rel(dit(x, t, dit.prepare_context(ctx, lens)), ref) <= REL_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(saved, dtype):
    model, folder = saved["sana-heads"]
    cfg = model.config
    lens = [6, 9]
    ctx, padded, mask = _pack(lens, cfg.caption_channels, seed=2)
    x = torch.randn(2, cfg.in_channels, 5, 6)
    t = torch.tensor([600, 90])
    with torch.no_grad():
        ref = model(x, encoder_hidden_states=padded, encoder_attention_mask=mask, timestep=t).sample
        ref_low = copy.deepcopy(model).to(dtype)(x.to(dtype), encoder_hidden_states=padded.to(dtype),
                                                 encoder_attention_mask=mask, timestep=t).sample
    dit = SanaDiT.from_dir(folder, dtype=dtype)
    got = dit(x, t, dit.prepare_context(ctx, lens))
    assert got.dtype == dtype
    # within 2x diffusers' own error in that dtype (+ a floor), FlashAttention-style
    assert _rel(got, ref) <= 2 * _rel(ref_low, ref) + 5e-3


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_interpreted(saved, dtype):
    """The same step through every op's Triton kernel (interpreter): the strided q/k/v views,
    per-sample modulation views and packed cross-attention the runtime passes are accepted."""
    model, folder = saved["sana-heads"]
    cfg = model.config
    lens = [5, 3]
    ctx, padded, mask = _pack(lens, cfg.caption_channels, seed=4)
    x, t = torch.randn(2, cfg.in_channels, 3, 4), torch.tensor([10, 900])
    with torch.no_grad():
        ref = model(x, encoder_hidden_states=padded, encoder_attention_mask=mask, timestep=t).sample
    dit = SanaDiT.from_dir(folder, dtype=dtype)
    with sk.backend("triton"):
        got = dit(x, t, dit.prepare_context(ctx, lens))
    assert _rel(got, ref) <= (REL_TOL if dtype == torch.float32 else 2e-2)


def test_sharded_checkpoint(saved, tmp_path):
    model, _ = saved["base"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert any(n.endswith(".safetensors.index.json") for n in os.listdir(tmp_path))
    dit = SanaDiT.from_dir(tmp_path)
    lens = [2, 6]
    ctx, padded, mask = _pack(lens, 48, seed=9)
    x, t = torch.randn(2, 32, 3, 5), torch.tensor([10, 990])
    with torch.no_grad():
        ref = model(x, encoder_hidden_states=padded, encoder_attention_mask=mask, timestep=t).sample
    assert _rel(dit(x, t, dit.prepare_context(ctx, lens)), ref) <= REL_TOL


# ------------------------------------------------------------------------------------------------
# bad checkpoints

def _copy_ckpt(src: str, dst, edit=None, config_edit=None):
    sd = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    if edit:
        edit(sd)
    os.makedirs(dst, exist_ok=True)
    save_file(sd, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config_edit:
        config_edit(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def test_bad_checkpoint_missing_key(saved, tmp_path):
    folder = _copy_ckpt(saved["base"][1], tmp_path, edit=lambda sd: sd.pop("transformer_blocks.1.attn2.to_k.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys.*transformer_blocks\.1\.attn2\.to_k\.bias"):
        SanaDiT.from_dir(folder)


def test_bad_checkpoint_unknown_key(saved, tmp_path):
    folder = _copy_ckpt(saved["base"][1], tmp_path, edit=lambda sd: sd.__setitem__("extra.weight", torch.ones(2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*extra\.weight"):
        SanaDiT.from_dir(folder)


def test_bad_checkpoint_wrong_shape(saved, tmp_path):
    def edit(sd):
        sd["caption_projection.linear_1.weight"] = torch.zeros(32, 47)
    folder = _copy_ckpt(saved["base"][1], tmp_path, edit=edit)
    msg = r"caption_projection\.linear_1\.weight: got \(32, 47\), expected \(32, 48\)"
    with pytest.raises(CheckpointError, match=msg):
        SanaDiT.from_dir(folder)


def test_bad_checkpoint_pickle_and_missing_files(saved, tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "diffusion_pytorch_model.bin")
    with open(os.path.join(saved["base"][1], "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    with pytest.raises(CheckpointError, match="pickle"):
        SanaDiT.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        SanaDiT.from_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("change, match", [
    (dict(guidance_embeds=True), "guidance_embeds"),
    (dict(qk_norm="layer_norm"), "qk_norm"),
    (dict(cross_attention_dim=48), "cross_attention_dim"),
    (dict(_class_name="AutoencoderDC"), "_class_name"),
])
def test_bad_checkpoint_unsupported_config(saved, tmp_path, change, match):
    folder = _copy_ckpt(saved["base"][1], tmp_path, config_edit=lambda c: c.update(change))
    with pytest.raises(CheckpointError, match=match):
        SanaDiT.from_dir(folder)


# ------------------------------------------------------------------------------------------------
# bad calls

@pytest.fixture(scope="module")
def tiny_dit(saved):
    return SanaDiT.from_dir(saved["base"][1])


@pytest.mark.parametrize("context, lens, exc, match", [
    (torch.randn(5, 47), [2, 3], ValueError, r"context: expected shape \[total_tokens, 48\]"),
    (torch.randn(5, 48), [2, 2], ValueError, "ctx_lens: sum 4"),
    (torch.randn(5, 48), [5, 0], ValueError, r"ctx_lens\[1\]: expected a positive int"),
    (torch.randn(5, 48), [], ValueError, "ctx_lens"),
    (torch.ones(5, 48, dtype=torch.int64), [5], ValueError, "floating-point"),
    ([[0.0] * 48], [1], TypeError, "context: expected a torch.Tensor"),
])
def test_bad_prepare_context(tiny_dit, context, lens, exc, match):
    with pytest.raises(exc, match=match):
        tiny_dit.prepare_context(context, lens)


def test_bad_calls(tiny_dit):
    ctx = tiny_dit.prepare_context(torch.randn(5, 48), [2, 3])
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"x: expected shape \[B, 32, H, W\]"):
        tiny_dit(torch.randn(2, 16, 4, 4), t, ctx)
    with pytest.raises(ValueError, match="prepared for 2 samples, but x has batch 3"):
        tiny_dit(torch.randn(3, 32, 4, 4), torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match=r"timestep: expected shape \[2\]"):
        tiny_dit(torch.randn(2, 32, 4, 4), torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(TypeError, match="ctx: expected the SanaContext"):
        tiny_dit(torch.randn(2, 32, 4, 4), t, torch.randn(5, 48))
    with pytest.raises(ValueError, match="x: expected a floating-point"):
        tiny_dit(torch.ones(2, 32, 4, 4, dtype=torch.int64), t, ctx)
