"""The dual-stream image tokenizer (spar_runtime.image_tokenizer) and what uses it: encode_image and
reconstruct against transformers' InternVL get_image_features + a tokenizer built from
nn.TransformerEncoderLayer / nn.LayerNorm / nn.Linear holding the same weights (tests/_spar_ckpt.py),
AutoencoderDC.decode; strength edits against diffusers' schedulers started with set_begin_index;
config validation, bad checkpoints, bad inputs and the ``spar reconstruct`` command."""

import copy
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from _spar_ckpt import (ReferenceTokenizer, build_checkpoint, reference_context, reference_decode,
                        reference_encode_image, reference_scheduler)
from spar_runtime import SparPipeline
from spar_runtime.configs import SparConfig, TokenizerConfig, get_config
from spar_runtime.image_tokenizer import ImageTokenizer, noised_start, strength_start_step
from spar_runtime.loading import CheckpointError


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("spar_tok")), "tiny", seed=4)


@pytest.fixture(scope="module")
def pipe(ckpt):
    return SparPipeline.from_pretrained(ckpt.path, device="cpu")


@pytest.fixture
def ckpt_copy(ckpt, tmp_path):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt.path, dst)
    return dst


def _pixels(n, seed, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- the model against its reference composition ------------------------------------------------

def _tokenizer_pair(D, heads, layers, blocks, dtype=torch.float32, seed=0):
    """A ReferenceTokenizer with random weights and an ImageTokenizer holding the same tensors."""
    torch.manual_seed(seed)
    ref = ReferenceTokenizer(D, 32, layers, heads, blocks).eval()
    with torch.no_grad():
        for p in ref.parameters():   # library inits leave biases 0 and norm weights 1
            p.add_(torch.randn(p.shape) * (0.1 if p.dim() == 1 else 0.0))
    tcfg = TokenizerConfig(pixel_layers=layers, pixel_heads=heads, mlp_blocks=blocks)
    ours = ImageTokenizer(tcfg, D, 32, {k: v.detach().to(dtype) for k, v in ref.state_dict().items()})
    return ref, ours


@pytest.mark.parametrize("D, heads, B, T", [
    (112, 2, 3, 16),    # head dim 56 (SPAR-1B's 896 / 16): a multiple of 8, not of 16
    (64, 2, 1, 49),     # head dim 32, a 7x7 grid
    (96, 1, 2, 4),      # head dim 96 (SPAR-3B's 1536 / 16)
])
def test_tokenizer_matches_torch_modules(D, heads, B, T):
    ref, ours = _tokenizer_pair(D, heads, layers=2, blocks=3)
    feats = torch.randn(B, T, D)
    with torch.no_grad():
        want = ref(feats)
    got = ours(feats)
    h = math.isqrt(T)
    assert got.shape == (B, 32, h, h) and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5
    # each image attends only to its own tokens: one image alone gives the same latent
    torch.testing.assert_close(ours(feats[-1:]), got[-1:], rtol=1e-5, atol=1e-5)


def test_tokenizer_bf16_within_the_usual_rule():
    """bf16: error against the fp32 reference at most twice that of the reference run in bf16, + 1e-3."""
    ref, ours = _tokenizer_pair(112, 2, layers=2, blocks=3, dtype=torch.bfloat16, seed=1)
    feats = torch.randn(2, 16, 112)
    with torch.no_grad():
        want = ref(feats)
        base = copy.deepcopy(ref).to(torch.bfloat16)(feats.bfloat16()).float()
    got = ours(feats.bfloat16())
    assert got.dtype == torch.float32
    assert rel_err(got, want) <= 2 * rel_err(base, want) + 1e-3


def test_encode_image_matches_reference(ckpt, pipe):
    pv = _pixels(3, 1)
    got = pipe.encode_image(pv)
    want = reference_encode_image(ckpt, pv)
    assert got.shape == (3, 32, 8, 8) and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got[0], got[1]) > 0.01                  # different images, different latents
    assert "encode_image" in pipe.timings


def test_reconstruct_matches_autoencoder_dc(ckpt, pipe):
    pv = _pixels(2, 2)
    img = pipe.reconstruct(pv)
    want = reference_decode(ckpt, reference_encode_image(ckpt, pv))    # AutoencoderDC.decode(z / scale)
    assert img.shape == want.shape == (2, 3, 32, 32)
    assert rel_err(img, want) <= 1e-4


def test_reused_cpu_buffers_never_reach_results(pipe):
    """Without autograd the CPU forward keeps its intermediates in buffers reused from call to call
    (spar_runtime.buffers.Workspace): earlier results stay intact, batch sizes can change, and the
    buffered path equals the allocating one (autograd on), also outside inference mode."""
    pv1, pv2 = _pixels(2, 7), _pixels(1, 8)
    z1 = pipe.encode_image(pv1)
    keep = z1.clone()
    pipe.encode_image(pv2)
    pipe.encode_image(pv1 * 0.5)
    assert torch.equal(z1, keep)
    vision, tok = pipe.mllm.vision, pipe.image_tokenizer
    with torch.enable_grad():                                   # no reused buffers
        want_v = vision(pv1)
        feats = torch.randn(2, 64, pipe.config.hidden_size)
        want_t = tok(feats)
    with torch.no_grad():                                       # buffers, made outside inference mode
        got_v, got_t = vision(pv1), tok(feats)
    torch.testing.assert_close(got_v, want_v.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_t, want_t.detach(), rtol=1e-5, atol=1e-6)


def test_encode_image_takes_pil_images(pipe):
    from PIL import Image

    a, b = Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (64, 64), (10, 200, 30))
    both = pipe.encode_image([a, b])
    assert both.shape == (2, 32, 8, 8)
    torch.testing.assert_close(pipe.encode_image(b), both[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipe.encode_image(pipe.preprocess(a)), both[:1], rtol=1e-5, atol=1e-5)


# ---- strength: image-to-image starts --------------------------------------------------------------

def _reference_loop_from(ref, ctx_c, ctx_u, x, *, num_steps, begin, guidance, sampler, shift):
    """diffusers' scheduler started at step ``begin`` (set_begin_index), the DiT per branch."""
    sched = reference_scheduler(sampler, num_steps, shift)
    sched.set_begin_index(begin)
    for t in sched.timesteps[begin:]:
        tt = t.reshape(1).long()
        v_c = ref.dit(x, encoder_hidden_states=ctx_c, timestep=tt).sample
        v_u = ref.dit(x, encoder_hidden_states=ctx_u, timestep=tt).sample
        x = sched.step(v_u + guidance * (v_c - v_u), t, x).prev_sample
    return x


@pytest.mark.parametrize("sampler, num_steps, begin", [("dpmsolver++2m", 6, 2), ("dpmsolver++2m", 5, 4),
                                                       ("euler", 5, 3)])
def test_loop_started_late_matches_set_begin_index(ckpt, pipe, sampler, num_steps, begin):
    gen = torch.Generator().manual_seed(7)
    prompt, uncond = torch.randint(0, 256, (6,), generator=gen), torch.randint(0, 256, (3,), generator=gen)
    x0 = torch.randn(1, 32, 8, 8, generator=gen)
    shift = ckpt.config.flow_shift
    got = pipe.generate_latents([prompt], uncond_ids=uncond, noise=x0, num_steps=num_steps, guidance=3.0,
                                sampler=sampler, start_step=begin)
    with torch.no_grad():
        want = _reference_loop_from(ckpt, reference_context(ckpt, prompt)[None], reference_context(ckpt, uncond)[None],
                                    x0, num_steps=num_steps, begin=begin, guidance=3.0, sampler=sampler, shift=shift)
    assert rel_err(got, x0) > 0.01
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("sampler, strengths", [("dpmsolver++2m", (0.5, 0.99)), ("euler", (0.7,))])
def test_edit_strength_starts_from_the_noised_reference(sampler, strengths, monkeypatch):
    """edit(strength=s): skips num_steps - int(num_steps * s) steps and starts from diffusers'
    noised reference latent at that step (add_noise / scale_noise after set_begin_index)."""
    from PIL import Image

    p = SparPipeline.random("tiny", seed=0)
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    calls = []
    real = p.generate_latents

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls.append((kw["noise"], kw["start_step"], out))
        return out

    monkeypatch.setattr(p, "generate_latents", spy)
    steps, seed = 4, 3
    z_ref = p.encode_image(image)
    noise = torch.randn((1, 32, 8, 8), generator=torch.Generator().manual_seed(seed))
    for s in strengths:
        p.edit(image, "make it blue", num_steps=steps, sampler=sampler, seed=seed, strength=s)
        x0, start, _ = calls[-1]
        assert start == steps - int(steps * s) > 0
        sched = reference_scheduler(sampler, steps, p.config.flow_shift)
        sched.set_begin_index(start)
        t = sched.timesteps[start:start + 1]
        want = sched.scale_noise(z_ref, t, noise) if sampler == "euler" else sched.add_noise(z_ref, noise, t)
        assert rel_err(x0, want) <= 1e-6
    if sampler == "dpmsolver++2m":
        plain = p.edit(image, "make it blue", num_steps=steps, sampler=sampler, seed=seed)
        far = (calls[-1][2] - z_ref).norm()
        assert p.edit(image, "make it blue", num_steps=steps, sampler=sampler, seed=seed,
                      strength=1.0)[0].tobytes() == plain[0].tobytes()          # strength 1 is today's edit
        # a small strength ends closer to the reference latent than a full edit
        p.edit(image, "make it blue", num_steps=steps, sampler=sampler, seed=seed, strength=0.25)
        assert (calls[-1][2] - z_ref).norm() < 0.8 * far


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, True, "0.5", 0.1])
def test_bad_strength(strength):
    with pytest.raises(ValueError, match="strength"):
        strength_start_step(8, strength)   # 0.1 of 8 steps runs int(0.8) = 0 steps


def test_strength_checks_num_steps_and_takes_numpy_floats():
    import numpy as np

    assert strength_start_step(4, np.float32(0.5)) == 2 and strength_start_step(8, np.float64(0.25)) == 6
    for steps in (-4, 0, True, 2.5, "4"):
        with pytest.raises(ValueError, match=r"num_steps: expected an int >= 1"):
            strength_start_step(steps, 0.5)


def test_edit_strength_on_the_simulated_gpu():
    """edit(strength) on CUDA (spar_kernels.testing.fake_cuda): the shortened schedule is built on the
    host, not read back from the device (which the simulated GPU cannot do)."""
    from PIL import Image

    from spar_kernels.testing import fake_cuda

    with fake_cuda() as rec:
        p = SparPipeline.random("tiny", device="cuda", dtype=torch.bfloat16)
        out = p.edit(Image.new("RGB", (40, 30), (200, 10, 10)), "make it blue", num_steps=2, strength=0.5)
    assert len(out) == 1 and out[0].size == (p.config.image_size,) * 2
    reads = [s for s in rec.syncs if "tail_sampler" in "".join(s.stack.format()) and not s.kind.startswith("h2d")]
    assert not reads, reads


def test_edit_strength_checks_sampler_and_num_steps_first(monkeypatch):
    """A bad sampler or step count with a strength: the argument's own error, before any latent work."""
    from PIL import Image

    p = SparPipeline.random("tiny", seed=0)
    monkeypatch.setattr(p, "encode_image", lambda *a, **k: pytest.fail("encode_image ran"))
    image = Image.new("RGB", (16, 16), (1, 2, 3))
    with pytest.raises(ValueError, match=r"sampler: expected one of \('dpmsolver\+\+2m', 'euler'\), got 'bogus'"):
        p.edit(image, "x", num_steps=4, sampler="bogus", strength=0.5)
    with pytest.raises(ValueError, match=r"num_steps: expected an int >= 1, got -4"):
        p.edit(image, "x", num_steps=-4, strength=0.5)


def test_noised_start_formula():
    z, n = torch.randn(1, 32, 4, 4), torch.randn(1, 32, 4, 4)
    torch.testing.assert_close(noised_start(z, n, torch.tensor(0.3)), 0.7 * z + 0.3 * n)


# ---- config, checkpoints, bad inputs ---------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    ({"tokenizer": {"pixel_layers": 0, "pixel_heads": 2, "mlp_blocks": 3}}, "pixel_layers"),
    ({"tokenizer": {"pixel_layers": 2, "pixel_heads": 3, "mlp_blocks": 3}}, "pixel_heads = 3 must divide"),
    ({"tokenizer": {"pixel_layers": 2, "pixel_heads": 16, "mlp_blocks": 3}}, r"head dim 64 / 16 = 4 is smaller"),
    ({"tokenizer": {"pixel_layers": 2, "heads": 2}}, "unknown field"),
    ({"tokenizer": [2, 2, 3]}, "tokenizer"),
    ({"latent_size": 4}, r"image-token grid = '8x8', expected the 4x4 latent grid"),
])
def test_bad_tokenizer_configs(change, match):
    with pytest.raises(ValueError, match=match):
        get_config("tiny").replace(**change)


def test_token_grid_must_equal_latent_grid():
    c = get_config("tiny")
    mllm = copy.deepcopy(c.mllm_config)
    mllm["vision_config"].update(image_size=[56, 56], patch_size=[14, 14])   # the old tiny: a 2x2 token grid
    mllm["image_seq_length"] = 4
    with pytest.raises(ValueError, match="image-token grid = '2x2'"):
        c.replace(mllm_config=mllm)
    assert c.replace(mllm_config=mllm, tokenizer=None).tokenizer is None   # fine without a tokenizer
    with pytest.raises(ValueError, match="text-only"):
        c.replace(mllm_config=dict(c.text_config))
    head = get_config("SPAR-1B").replace(tokenizer={"pixel_layers": 1, "pixel_heads": 14, "mlp_blocks": 1})
    assert head.tokenizer["pixel_heads"] == 14
    with pytest.raises(ValueError, match="larger than hybrid_attention takes"):
        get_config("SPAR-1B").replace(tokenizer={"pixel_layers": 1, "pixel_heads": 2, "mlp_blocks": 1})


def test_tokenizer_field_is_optional_in_spar_config_json():
    c = get_config("tiny")
    j = c.spar_json()
    assert j["tokenizer"] == {"pixel_layers": 2, "pixel_heads": 2, "mlp_blocks": 3}
    back = SparConfig.from_json(j, c.mllm_config, c.dit_config, c.vae_config)
    assert back.tokenizer == c.tokenizer and back.tokenizer_param_shapes() == c.tokenizer_param_shapes()
    del j["tokenizer"]
    none = SparConfig.from_json(j, c.mllm_config, c.dit_config, c.vae_config)
    assert none.tokenizer is None and none.tokenizer_param_shapes() == {}


def test_param_shapes_are_the_torch_modules_names(ckpt):
    want = {"tokenizer." + k: tuple(v.shape) for k, v in ckpt.tokenizer.state_dict().items()}
    assert ckpt.config.tokenizer_param_shapes() == want
    assert "tokenizer.pixel.layers.1.self_attn.in_proj_weight" in want and "tokenizer.fusion.fc2.weight" in want


def test_checkpoint_without_tokenizer_keys(tmp_path):
    ref = build_checkpoint(str(tmp_path), "tiny", seed=5, with_tokenizer=False)
    p = SparPipeline.from_pretrained(ref.path)
    assert p.image_tokenizer is None
    with pytest.raises(ValueError, match="no image tokenizer weights"):
        p.encode_image(_pixels(1, 0))
    with pytest.raises(ValueError, match="no image tokenizer"):
        p.reconstruct(_pixels(1, 0))
    p.generate_latents([[1, 2]], uncond_ids=[3], noise=torch.randn(1, 32, 8, 8), num_steps=1)   # the rest works
    q = SparPipeline.random(get_config("tiny").replace(tokenizer=None))
    with pytest.raises(ValueError, match=r"spar_config.json has no \"tokenizer\""):
        q.encode_image(_pixels(1, 0))


@pytest.mark.parametrize("edit, match", [
    ("shape", r"mis-shaped keys \(1\): tokenizer\.pixel\.layers\.0\.linear1\.weight: "
              r"got \(63, 64\), expected \(256, 64\)"),
    ("missing", r"missing keys \(1\): tokenizer\.fusion\.norm\.bias"),
    ("unexpected", r"unexpected keys \(1\): tokenizer\.pixel\.layers\.7\.norm1\.weight"),
])
def test_bad_tokenizer_tensors(ckpt_copy, edit, match):
    f = ckpt_copy / "spar.safetensors"
    t = load_file(f)
    if edit == "shape":
        t["tokenizer.pixel.layers.0.linear1.weight"] = torch.randn(63, 64)
    elif edit == "missing":
        del t["tokenizer.fusion.norm.bias"]
    else:
        t["tokenizer.pixel.layers.7.norm1.weight"] = torch.randn(64)
    save_file(t, f)
    with pytest.raises(CheckpointError, match=match):
        SparPipeline.from_pretrained(ckpt_copy)


def test_tokenizer_tensors_without_tokenizer_config(ckpt_copy):
    import json

    cfg = json.loads((ckpt_copy / "spar_config.json").read_text())
    del cfg["tokenizer"]
    (ckpt_copy / "spar_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"image tokenizer tensors .* configures no \"tokenizer\""):
        SparPipeline.from_pretrained(ckpt_copy)


@pytest.mark.parametrize("image, exc, match", [
    (torch.randn(1, 3, 56, 56), ValueError, r"image: expected .*\[B, 3, 64, 64\].*got shape \(1, 3, 56, 56\)"),
    (torch.randn(2, 4, 64, 64), ValueError, r"image: expected .*3 channels.*got shape \(2, 4, 64, 64\)"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), ValueError, "image: expected .*float"),
    ([torch.randn(3, 64, 64)], TypeError, "image: expected a PIL image"),
    ("x.png", TypeError, "image: expected a PIL image"),
])
def test_bad_images(pipe, image, exc, match):
    with pytest.raises(exc, match=match):
        pipe.encode_image(image)


def test_bad_image_lists_and_empty_images(pipe):
    from PIL import Image

    ok = Image.new("RGB", (8, 8))
    for items in ([ok, torch.randn(3, 56, 56)], [ok, torch.randn(3, 64, 64)], [ok, None]):
        with pytest.raises(TypeError, match=r"image: expected a PIL image, a list of PIL images .*item 1"):
            pipe.encode_image(items)
    for size in ((0, 0), (0, 5), (7, 0)):
        with pytest.raises(ValueError, match=rf"image: an empty {size[0]}x{size[1]} PIL image"):
            pipe.encode_image(Image.new("RGB", size))


def test_pil_images_with_int_image_size_in_the_vision_config(ckpt_copy, pipe):
    """transformers takes "image_size": 64 (an int) in InternVL's vision config as (64, 64)."""
    import json

    from PIL import Image

    f = ckpt_copy / "mllm" / "config.json"
    cfg = json.loads(f.read_text())
    cfg["vision_config"].update(image_size=64, patch_size=4)
    f.write_text(json.dumps(cfg))
    p = SparPipeline.from_pretrained(ckpt_copy, device="cpu")
    im = Image.effect_noise((30, 20), 50).convert("RGB")
    torch.testing.assert_close(p.encode_image(im), pipe.encode_image(im), rtol=0, atol=0)


def test_bad_features():
    _, ours = _tokenizer_pair(64, 2, layers=1, blocks=1)
    with pytest.raises(ValueError, match=r"a square grid.*T = 12"):
        ours(torch.randn(1, 12, 64))
    with pytest.raises(ValueError, match=r"features: expected a float \[B, T, 64\]"):
        ours(torch.randn(1, 16, 63))


# ---- the spar command line ----------------------------------------------------------------------

def test_cli_reconstruct(tmp_path, capsys, ckpt):
    from PIL import Image

    from spar_runtime.cli import main, psnr

    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.effect_noise((48, 40), 60).convert("RGB").save(src)
    assert main(["reconstruct", "--config", "tiny", "--random-weights", "--image", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rec = Image.open(out)
    assert rec.size == (32, 32)
    value = psnr(rec, Image.open(src).convert("RGB").resize((32, 32), Image.BICUBIC))
    assert re.search(rf"PSNR {value:.2f} dB", printed), printed
    assert psnr(rec, rec) == math.inf
    # a lossy format: the PSNR of the file as written, the decoded image's alongside
    jpg = tmp_path / "out.jpg"
    assert main(["reconstruct", "--config", "tiny", "--random-weights", "--image", str(src), "--out", str(jpg)]) == 0
    printed = capsys.readouterr().out
    target = Image.open(src).convert("RGB").resize((32, 32), Image.BICUBIC)
    assert re.search(rf"PSNR {psnr(Image.open(jpg), target):.2f} dB against", printed), printed
    assert "before saving" in printed
    # a checkpoint whose spar.safetensors has no tokenizer.*: a clear error, no traceback
    bare = tmp_path / "bare"
    build_checkpoint(str(bare), "tiny", seed=6, with_tokenizer=False)
    assert main(["reconstruct", "--checkpoint", str(bare), "--image", str(src), "--out", str(out)]) == 2
    assert "no image tokenizer weights" in capsys.readouterr().err
