"""spar_runtime.dcae.DCAEDecoder against diffusers' AutoencoderDC.decode (tiny random models saved to tmp dirs)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from _util import perturb, rel as _rel  # noqa: E402
from conftest import requires_triton  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import spar_kernels as sk  # noqa: E402
from spar_runtime.dcae import DCAEDecoder, dcae_param_shapes, random_weights  # noqa: E402
from spar_runtime.loading import CheckpointError  # noqa: E402

_THREE = ("ResBlock", "ResBlock", "EfficientViTBlock")
CONFIGS = {
    # dc-ae-f32c32-sana-1.0's structure (interpolate upsampling, RMSNorm, SiLU), 3 stages
    "sana": dict(in_channels=3, latent_channels=32, attention_head_dim=8, encoder_block_types=_THREE,
                 decoder_block_types=_THREE, encoder_block_out_channels=(8, 16, 32),
                 decoder_block_out_channels=(8, 16, 32), encoder_layers_per_block=(1, 1, 1),
                 decoder_layers_per_block=(1, 1, 2), encoder_qkv_multiscales=((), (), (5,)),
                 decoder_qkv_multiscales=((), (), (5,)), upsample_block_type="interpolate",
                 downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                 scaling_factor=0.41407),
    # the other branches: pixel-shuffle upsampling, BatchNorm + ReLU stages, a first stage with no
    # layers (conv_out is then an upsampling block), two attention scales, no input shortcut
    "shuffle": dict(in_channels=3, latent_channels=16, attention_head_dim=8, encoder_block_types=_THREE,
                    decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                    encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
                    encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(0, 1, 1),
                    encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (3,), (3, 5)),
                    upsample_block_type="pixel_shuffle", decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"),
                    decoder_act_fns=("relu", "relu", "silu"), decoder_in_shortcut=False,
                    decoder_conv_act_fn="silu"),
}
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(200 + i)
        model = diffusers.AutoencoderDC(**cfg).eval()
        perturb(model, batch_norm_stats=True)
        folder = tmp_path_factory.mktemp(f"dcae_{name}")
        model.save_pretrained(folder)
        out[name] = (model, str(folder))
    return out


# grids: 4x4 and 5x7 run the linear-attention branch of the deepest EfficientViT block
# (tokens > head dim 8); 2x3 runs diffusers' quadratic branch (tokens <= head dim)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch, grid", [(1, (4, 4)), (2, (5, 7)), (2, (2, 3)), (1, (1, 9))])
def test_decode_matches_diffusers(saved, name, batch, grid):
    model, folder = saved[name]
    dec = DCAEDecoder.from_dir(folder)
    assert dec.scaling_factor == model.config.scaling_factor
    z = torch.randn(batch, model.config.latent_channels, *grid)
    with torch.no_grad():
        ref = model.decode(z).sample
    got = dec.decode(z)
    assert got.shape == ref.shape and got.is_contiguous()
    assert _rel(got, ref) <= REL_TOL


def test_noncontiguous_latent(saved):
    model, folder = saved["sana"]
    dec = DCAEDecoder.from_dir(folder)
    z = torch.randn(2, 6, 5, 32).permute(0, 3, 1, 2)   # [2, 32, 6, 5], channels-last strides
    with torch.no_grad():
        ref = model.decode(z.contiguous()).sample
    assert _rel(dec(z), ref) <= REL_TOL


@requires_triton
def test_triton_kernels_interpreted(saved):
    """The decoder through the ops' Triton kernels (interpreter) on channels-last views."""
    model, folder = saved["shuffle"]
    z = torch.randn(1, model.config.latent_channels, 3, 4)
    with torch.no_grad():
        ref = model.decode(z).sample
    dec = DCAEDecoder.from_dir(folder)
    with sk.backend("triton"):
        got = dec.decode(z)
    assert _rel(got, ref) <= REL_TOL


def test_random_weights_load_into_diffusers():
    cfg = CONFIGS["shuffle"]
    weights = random_weights(cfg, torch.Generator().manual_seed(1))
    model = diffusers.AutoencoderDC(**cfg).eval()
    model.decoder.load_state_dict(weights, strict=True)
    assert set(dcae_param_shapes(cfg)) == set(model.decoder.state_dict())
    z = torch.randn(1, cfg["latent_channels"], 3, 4)
    with torch.no_grad():
        ref = model.decode(z).sample
    assert _rel(DCAEDecoder(cfg, weights).decode(z), ref) <= REL_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(saved, dtype):
    model, folder = saved["sana"]
    z = torch.randn(2, 32, 4, 5)
    with torch.no_grad():
        ref = model.decode(z).sample
        ref_low = copy.deepcopy(model).to(dtype).decode(z.to(dtype)).sample  # the shared model stays fp32
    got = DCAEDecoder.from_dir(folder, dtype=dtype).decode(z)
    assert got.dtype == dtype
    assert _rel(got, ref) <= 2 * _rel(ref_low, ref) + 5e-3


def test_whole_autoencoder_state_dict(saved):
    """DCAEDecoder(config, AutoencoderDC.state_dict()) keeps decoder.* and drops encoder.*."""
    model, folder = saved["shuffle"]
    config = json.load(open(os.path.join(folder, "config.json")))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    z = torch.randn(2, model.config.latent_channels, 3, 2)
    with torch.no_grad():
        ref = model.decode(z).sample
    assert _rel(DCAEDecoder(config, sd).decode(z), ref) <= REL_TOL
    sd["decoder.bogus"] = torch.ones(1)
    with pytest.raises(CheckpointError, match="unexpected keys.*bogus"):
        DCAEDecoder(config, sd)


def test_encoder_keys_are_not_needed(saved, tmp_path):
    """Only decoder.* tensors are read: a folder without the encoder loads and decodes the same."""
    model, folder = saved["sana"]
    sd = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    save_file({k: v for k, v in sd.items() if k.startswith("decoder.")},
              str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    z = torch.randn(1, 32, 3, 3)
    torch.testing.assert_close(DCAEDecoder.from_dir(tmp_path).decode(z), DCAEDecoder.from_dir(folder).decode(z),
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# bad checkpoints and calls

def _copy(src, dst, edit=None, config_edit=None):
    sd = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    if edit:
        edit(sd)
    save_file(sd, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    config = json.load(open(os.path.join(src, "config.json")))
    if config_edit:
        config_edit(config)
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_bad_checkpoint_keys_and_shapes(saved, tmp_path):
    src = saved["sana"][1]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    with pytest.raises(CheckpointError, match=r"missing keys.*up_blocks\.2\.1\.attn\.to_q\.weight"):
        DCAEDecoder.from_dir(_copy(src, tmp_path / "a",
                                   edit=lambda sd: sd.pop("decoder.up_blocks.2.1.attn.to_q.weight")))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*up_blocks\.9\.conv\.weight"):
        DCAEDecoder.from_dir(_copy(src, tmp_path / "b",
                                   edit=lambda sd: sd.__setitem__("decoder.up_blocks.9.conv.weight", torch.ones(1))))

    def wrong(sd):
        sd["decoder.conv_in.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(CheckpointError, match=r"conv_in\.weight: got \(32, 32, 1, 1\), expected \(32, 32, 3, 3\)"):
        DCAEDecoder.from_dir(_copy(src, tmp_path / "c", edit=wrong))


def test_bad_checkpoint_pickle_missing_and_config(saved, tmp_path):
    src = saved["sana"][1]
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    torch.save({"decoder.conv_in.weight": torch.ones(1)}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        DCAEDecoder.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        DCAEDecoder.from_dir(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="decoder_norm_types"):
        DCAEDecoder.from_dir(_copy(src, tmp_path / "d",
                                   config_edit=lambda c: c.update(decoder_norm_types="layer_norm")))
    for i, (edit, match) in enumerate([(dict(attention_head_dim=0), "attention_head_dim: expected >= 1"),
                                       (lambda c: dict(decoder_block_out_channels=[0] + list(
                                           c["decoder_block_out_channels"][1:])), "expected every stage >= 1")]):
        (tmp_path / f"e{i}").mkdir()
        with pytest.raises(CheckpointError, match=match):
            DCAEDecoder.from_dir(_copy(src, tmp_path / f"e{i}", config_edit=lambda c, e=edit: c.update(
                e(c) if callable(e) else e)))


def test_bad_decode_calls(saved):
    dec = DCAEDecoder.from_dir(saved["sana"][1])
    with pytest.raises(ValueError, match=r"z: expected shape \[B, 32, h, w\]"):
        dec.decode(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match=r"z: expected shape"):
        dec.decode(torch.randn(32, 4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        dec.decode(torch.ones(1, 32, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="z: expected a torch.Tensor"):
        dec.decode([[1.0]])


@pytest.mark.parametrize("cin, cout, h, w", [(8, 4, 5, 7), (6, 6, 1, 3), (4, 8, 3, 2)])
def test_upsampled_conv_is_nearest_up_then_conv(cin, cout, h, w):
    """The up block's nearest x2 + 3x3 conv, run as four 2x2 convs at the input resolution."""
    from spar_runtime.dcae import _phase_weights, _upsampled_conv

    g = torch.Generator().manual_seed(cin * h + w)
    x = torch.randn(2, h, w, cin, generator=g, dtype=torch.float64)
    wt, b = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64), torch.randn(cout, generator=g,
                                                                                         dtype=torch.float64)
    up = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), scale_factor=2, mode="nearest")
    want = torch.nn.functional.conv2d(up, wt, b, padding=1).permute(0, 2, 3, 1)
    got = _upsampled_conv(x, *_phase_weights(wt, b))
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cin, cout", [(8, 2), (8, 4), (4, 4), (2, 4), (1, 4)])
def test_up_shortcut_strided_add_equals_repeat_and_shuffle(cin, cout):
    from spar_runtime.dcae import _add_shuffled_repeat, _pixel_shuffle, _repeat_channels

    r = cout * 4 // cin                         # 1, 2 and 4 read x through a view; 8 and 16 fall back
    x, y = torch.randn(2, 3, 5, cin), torch.randn(2, 6, 10, cout)
    want = y + _pixel_shuffle(_repeat_channels(x, r))
    assert torch.equal(_add_shuffled_repeat(y, x, r), want)
