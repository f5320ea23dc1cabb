"""SparPipeline end to end against the reference composition of tests/_spar_ckpt.py (transformers
LLM with output_hidden_states, a bidirectional Qwen2Model connector, the DTR formula, diffusers'
SanaTransformer2DModel + DPMSolverMultistepScheduler / FlowMatchEulerDiscreteScheduler, one
sequence at a time without padding), plus loading, bad checkpoints and bad calls."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from _spar_ckpt import build_checkpoint, reference_context, reference_decode, reference_generate_latents
from spar_runtime import SparPipeline
from spar_runtime.loading import CheckpointError


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny InternVL-based SPAR checkpoint with its mllm folder sharded (index + 5 files)."""
    return build_checkpoint(str(tmp_path_factory.mktemp("spar_tiny")), "tiny", seed=3, shard_mllm=True)


@pytest.fixture(scope="module")
def rpipe():
    """A tiny pipeline with random weights (no files)."""
    return SparPipeline.random("tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(ckpt):
    return SparPipeline.from_pretrained(ckpt.path, device="cpu")


def _prompts(gen, vocab=256):
    # two prompts of different lengths, an unconditional prompt of a third length
    return ([torch.randint(0, vocab, (7,), generator=gen), torch.randint(0, vocab, (12,), generator=gen)],
            torch.randint(0, vocab, (4,), generator=gen))


@pytest.mark.parametrize("sampler, steps, guidance, shift", [("dpmsolver++2m", 5, 4.5, None), ("euler", 4, 3.0, 2.0),
                                                             ("dpmsolver++2m", None, None, None)])
def test_generate_latents_matches_reference(ckpt, pipe, sampler, steps, guidance, shift):
    """steps/guidance None: the interface's defaults (20 steps: DPM-Solver++ keeps 2nd order to the
    end; with 5 it lowers the last step to 1st order), checked against 20 / 4.5 in the reference."""
    gen = torch.Generator().manual_seed(11)
    prompts, uncond = _prompts(gen)
    noise = torch.randn(2, 32, 8, 6, generator=gen)            # a non-square latent
    ref = reference_generate_latents(ckpt, prompts, uncond, noise, num_steps=steps or 20,
                                     guidance=4.5 if guidance is None else guidance, sampler=sampler, shift=shift)
    kw = {k: v for k, v in dict(num_steps=steps, guidance=guidance, sampler=sampler, shift=shift).items()
          if v is not None or k == "shift"}
    out = pipe.generate_latents(prompts, uncond_ids=uncond, noise=noise, **kw)
    assert out.shape == noise.shape and out.dtype == torch.float32
    assert rel_err(out, noise) > 0.05                          # the loop moved the latent
    assert rel_err(out, ref) <= 1e-4, sampler
    assert set(pipe.timings) >= {"prefill", "dtr", "connector", "dit_loop", "total"}


def test_context_matches_reference(ckpt, pipe):
    """LLM -> DTR -> connector -> projector of a packed batch equals the per-sequence reference."""
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 256, (n,), generator=gen) for n in (1, 9, 3)]
    ctx, lengths = pipe.encode_prompts(seqs)
    assert lengths == [n + ckpt.config.num_queries for n in (1, 9, 3)]
    ref = torch.cat([reference_context(ckpt, s) for s in seqs])
    assert rel_err(ctx, ref) <= 1e-5


def test_per_image_uncond_and_guidance_below_one(ckpt, pipe):
    gen = torch.Generator().manual_seed(2)
    prompts, _ = _prompts(gen)
    unconds = [torch.randint(0, 256, (2,), generator=gen), torch.tensor([], dtype=torch.int64)]
    noise = torch.randn(2, 32, 5, 5, generator=gen)
    for g in (0.5, 1.0):
        ref = reference_generate_latents(ckpt, prompts, unconds, noise, num_steps=2, guidance=g, sampler="euler")
        out = pipe.generate_latents(prompts, uncond_ids=unconds, noise=noise, num_steps=2, guidance=g, sampler="euler")
        assert rel_err(out, ref) <= 1e-4, g


def test_decode_matches_autoencoder_dc(ckpt, pipe):
    lat = torch.randn(2, 32, 4, 3)
    img = pipe.decode(lat)
    ref = reference_decode(ckpt, lat)
    assert img.shape == ref.shape == (2, 3, 16, 12)
    assert rel_err(img, ref) <= 1e-4
    pil = pipe.to_pil(img)
    assert len(pil) == 2 and pil[0].size == (12, 16)


def test_text_only_checkpoint(tmp_path):
    """A text-only Qwen2ForCausalLM mllm folder works the same way (and has no vision path)."""
    ref = build_checkpoint(str(tmp_path), "tiny", seed=9, text_only=True)
    pipe = SparPipeline.from_pretrained(str(tmp_path))
    gen = torch.Generator().manual_seed(4)
    prompts, uncond = _prompts(gen)
    noise = torch.randn(2, 32, 4, 4, generator=gen)
    out = pipe.generate_latents(prompts, uncond_ids=uncond, noise=noise, num_steps=3)
    assert rel_err(out, reference_generate_latents(ref, prompts, uncond, noise, num_steps=3)) <= 1e-4
    with pytest.raises(ValueError, match="text-only"):
        pipe.describe(torch.randn(1, 3, 64, 64), [1, 2, 3], max_new_tokens=2)


def test_describe_matches_transformers_generate(ckpt, pipe):
    T = ckpt.config.mllm_config["image_seq_length"]
    img_id = ckpt.config.mllm_config["image_token_id"]
    ids = torch.tensor([5, 17] + [img_id] * T + [40, 41, 42])
    pv = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    ours = pipe.describe(pv, ids, max_new_tokens=6)
    with torch.no_grad():
        theirs = ckpt.mllm.generate(input_ids=ids[None], pixel_values=pv, max_new_tokens=6, do_sample=False,
                                    min_new_tokens=6, eos_token_id=None, pad_token_id=0)[0, ids.numel():]
    assert [int(t) for t in ours] == theirs.tolist()


def test_random_pipeline_needs_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = SparPipeline.random("tiny", seed=1)
    b = SparPipeline.random("tiny", seed=1)
    c = SparPipeline.random("tiny", seed=2)
    assert os.listdir(tmp_path) == []
    noise = torch.randn(1, 32, 4, 4)
    la = a.generate_latents([[1, 2, 3]], uncond_ids=[4], noise=noise, num_steps=2)
    lb = b.generate_latents([[1, 2, 3]], uncond_ids=[4], noise=noise, num_steps=2)
    lc = c.generate_latents([[1, 2, 3]], uncond_ids=[4], noise=noise, num_steps=2)
    assert torch.equal(la, lb) and not torch.allclose(la, lc)
    images = a.generate("a red fox", num_steps=2, seed=0)     # byte-level tokenizer of random pipelines
    assert len(images) == 1 and images[0].size == (32, 32)
    assert len(a.edit(images[0], "make it blue", num_steps=1)) == 1
    assert isinstance(a.describe(images[0], "what is it?", max_new_tokens=3), str)
    assert os.listdir(tmp_path) == []


def test_bf16_pipeline_close_to_fp32():
    p32 = SparPipeline.random("tiny", seed=0)
    p16 = SparPipeline.random("tiny", seed=0, dtype=torch.bfloat16)
    noise = torch.randn(2, 32, 6, 6)
    kw = dict(uncond_ids=[7, 8], noise=noise, num_steps=3)
    a = p32.generate_latents([[1, 2, 3], [9] * 11], **kw)
    b = p16.generate_latents([[1, 2, 3], [9] * 11], **kw)
    assert b.dtype == torch.float32 and rel_err(b, a) <= 5e-2
    assert p16.decode(b).dtype == torch.bfloat16


# ---- bad calls ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(prompt_ids=[[]]), ValueError, "empty prompt"),
    (dict(prompt_ids=[]), TypeError, "prompt_ids"),
    (dict(prompt_ids=[[1, 2], [3]]), ValueError, r"noise: expected shape \[2, 32"),
    (dict(noise=torch.randn(1, 16, 4, 4)), ValueError, "noise"),
    (dict(noise=torch.randn(1, 32, 4)), ValueError, "noise"),
    (dict(noise=torch.zeros(1, 32, 4, 4, dtype=torch.int64)), TypeError, "noise"),
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(sampler="ddim"), ValueError, "sampler"),
    (dict(shift=-1.0), ValueError, "shift"),
    (dict(guidance=float("nan")), ValueError, "guidance"),
    (dict(prompt_ids=[[1, 100000]]), ValueError, "prompt_ids"),
    (dict(prompt_ids=[torch.tensor([1.5])]), ValueError, "prompt_ids"),
    (dict(uncond_ids=[[1], [2]]), ValueError, "uncond_ids"),
    (dict(prompt_ids=[[1, 2.0]]), TypeError, r"prompt_ids\[0\]: expected a list of ints .* item 1 is float"),
    (dict(prompt_ids=[[1], "ab"]), TypeError, r"prompt_ids\[1\]: expected a 1-D token-id sequence"),
])
def test_bad_calls(rpipe, kwargs, exc, match):
    pipe = rpipe
    args = dict(prompt_ids=[[1, 2, 3]], uncond_ids=[4], noise=torch.randn(1, 32, 4, 4), num_steps=2)
    args.update(kwargs)
    prompt_ids = args.pop("prompt_ids")
    with pytest.raises(exc, match=match):
        pipe.generate_latents(prompt_ids, **args)


@pytest.mark.parametrize("steps", [0, -1])
def test_generate_and_edit_refuse_zero_steps_instead_of_the_default(steps):
    """num_steps=0 is an error in the high-level calls too, not the config's default step count."""
    from PIL import Image

    p = SparPipeline.random("tiny", seed=0)
    with pytest.raises(ValueError, match=rf"num_steps: expected an int >= 1, got {steps}"):
        p.generate("a cat", num_steps=steps)
    with pytest.raises(ValueError, match=rf"num_steps: expected an int >= 1, got {steps}"):
        p.edit(Image.new("RGB", (16, 16)), "x", num_steps=steps)


# ---- bad checkpoints ----------------------------------------------------------------------------

@pytest.fixture()
def ckpt_copy(ckpt, tmp_path):
    import shutil

    dst = tmp_path / "ck"
    shutil.copytree(ckpt.path, dst)
    return dst


def test_missing_files(ckpt_copy):
    os.remove(ckpt_copy / "spar.safetensors")
    with pytest.raises(CheckpointError, match="spar.safetensors not found"):
        SparPipeline.from_pretrained(ckpt_copy)


def test_missing_component_folder(ckpt_copy):
    import shutil

    shutil.rmtree(ckpt_copy / "dit")
    with pytest.raises(CheckpointError, match="dit"):
        SparPipeline.from_pretrained(ckpt_copy)


def test_missing_shard(ckpt_copy):
    shard = sorted(p for p in os.listdir(ckpt_copy / "mllm") if p.endswith(".safetensors"))[1]
    os.remove(ckpt_copy / "mllm" / shard)
    with pytest.raises(CheckpointError, match=shard):
        SparPipeline.from_pretrained(ckpt_copy)


def test_pickle_refused(ckpt_copy):
    t = load_file(ckpt_copy / "spar.safetensors")
    os.remove(ckpt_copy / "spar.safetensors")
    torch.save(t, ckpt_copy / "spar.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        SparPipeline.from_pretrained(ckpt_copy)


@pytest.mark.parametrize("edit, match", [
    ("shape", r"mis-shaped keys.*dtr.proj.weight: got \(64, 63\), expected \(64, 64\)"),
    ("unknown", r"unexpected keys.*dtr.extra"),
    ("missing", r"missing keys.*connector.layers.1.mlp.up_proj.weight"),
    ("int", r"not floating-point tensors.*latent_queries: torch.int32"),
    ("bool", r"not floating-point tensors.*dtr.alpha: torch.bool"),
])
def test_bad_spar_tensors(ckpt_copy, edit, match):
    f = ckpt_copy / "spar.safetensors"
    t = load_file(f)
    if edit == "shape":
        t["dtr.proj.weight"] = t["dtr.proj.weight"][:, :63].contiguous()
    elif edit == "unknown":
        t["dtr.extra"] = torch.zeros(3)
    elif edit == "int":
        t["latent_queries"] = t["latent_queries"].to(torch.int32)
    elif edit == "bool":
        t["dtr.alpha"] = t["dtr.alpha"] > 0
    else:
        del t["connector.layers.1.mlp.up_proj.weight"]
    save_file(t, f)
    with pytest.raises(CheckpointError, match=match):
        SparPipeline.from_pretrained(ckpt_copy)


def test_bad_spar_config(ckpt_copy):
    import json

    cfg = json.loads((ckpt_copy / "spar_config.json").read_text())
    del cfg["dtr_layers"]
    (ckpt_copy / "spar_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="dtr_layers"):
        SparPipeline.from_pretrained(ckpt_copy)
    cfg["dtr_layers"] = [1, 2, 99]
    (ckpt_copy / "spar_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="dtr_layers"):
        SparPipeline.from_pretrained(ckpt_copy)


def test_mis_shaped_component(ckpt_copy):
    """A DiT whose caption width disagrees with config.json is reported with the key and shapes."""
    import glob

    f = glob.glob(str(ckpt_copy / "dit" / "*.safetensors"))[0]
    t = load_file(f)
    key = next(k for k in t if k.endswith("weight") and t[k].dim() == 2)
    t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])
    save_file(t, f)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        SparPipeline.from_pretrained(ckpt_copy)


# ---- the spar command line ----------------------------------------------------------------------

def test_cli_generate_random_weights(tmp_path, capsys):
    from spar_runtime.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "--config", "tiny", "--random-weights", "--prompt", "a red fox", "--steps", "2",
                 "--seed", "3", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    from PIL import Image

    assert Image.open(out).size == (32, 32)
    for stage in ("load", "prefill", "dtr", "connector", "dit_loop", "decode", "total"):
        assert f"| {stage}" in captured.out
    assert "2/2" in captured.err                                     # the progress bar reached the end


def test_cli_describe_and_errors(tmp_path, capsys, ckpt):
    from PIL import Image

    from spar_runtime.cli import main

    img = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    assert main(["describe", "--config", "tiny", "--random-weights", "--image", str(img), "--prompt", "what?",
                 "--max-new-tokens", "3"]) == 0
    # a checkpoint without tokenizer.json: a clear error, no traceback
    assert main(["generate", "--checkpoint", ckpt.path, "--prompt", "x", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "y.png")]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--config", "tiny", "--prompt", "x"])       # --config needs --random-weights
    with pytest.raises(SystemExit):
        main(["generate", "--config", "tiny", "--random-weights", "--prompt", "x", "--steps", "0"])
    capsys.readouterr()
    for device, msg in (("bogus", "expected a torch device"), ("meta", "expected cpu or cuda"),
                        ("cuda", "no usable CUDA device")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as e:   # argparse's one-line error, exit status 2
            main(["generate", "--config", "tiny", "--random-weights", "--prompt", "x", "--device", device])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--device" in err and msg in err, err
    for out, msg in ((str(tmp_path / "y.txt"), "no image extension"), (str(tmp_path / "no" / "y.png"), "does not exist")):
        with pytest.raises(SystemExit) as e:   # refused before the model is built
            main(["generate", "--config", "tiny", "--random-weights", "--prompt", "x", "--out", out])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--out" in err and msg in err, err


def _write_tokenizer(folder):
    """A small word-level tokenizer.json (tokenizers library) holding the chat special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "user", "assistant", "a", "red", "fox", "what", "is", "it", "?", "make", "blue"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({"<|im_start|>": 256, "<|im_end|>": 257, "<img>": 258, "</img>": 259})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<img>", "</img>"])
    tok.save(str(folder / "tokenizer.json"))


def test_checkpoint_with_tokenizer(ckpt_copy, tmp_path, capsys):
    """tokenizer.json in mllm/ enables text prompts: generate(prompt) equals generate_latents on the
    chat-formatted ids, and the CLI runs on the checkpoint."""
    _write_tokenizer(ckpt_copy / "mllm")
    pipe = SparPipeline.from_pretrained(ckpt_copy)
    ids = pipe._t2i_ids("a red fox")
    assert ids.tolist() == [256, 1, 3, 4, 5, 257, 256, 2, 258]       # chat layout + image-start tag
    images = pipe.generate("a red fox", num_steps=2, seed=5)
    noise = torch.randn((1, 32, 8, 8), generator=torch.Generator().manual_seed(5))
    lat = pipe.generate_latents([ids], uncond_ids=pipe._t2i_ids("Generate an image."), noise=noise, num_steps=2)
    assert images[0].tobytes() == pipe.to_pil(pipe.decode(lat))[0].tobytes()
    from spar_runtime.cli import main

    assert main(["generate", "--checkpoint", str(ckpt_copy), "--prompt", "a red fox", "--steps", "1",
                 "--no-progress", "--out", str(tmp_path / "z.png")]) == 0
    assert "| dit_loop" in capsys.readouterr().out


def test_edit_takes_one_reference_image(rpipe):
    with pytest.raises(ValueError, match="image: edit takes one reference image, got a batch of 2"):
        rpipe.edit(torch.randn(2, 3, 64, 64), "make it blue", num_steps=1)
    # describe takes several images (their tokens one after the other): the check is edit's alone
    T = rpipe.mllm.image_seq_length
    ids = torch.tensor([1, 2] + [rpipe.mllm.image_token_id] * (2 * T) + [3])
    assert len(rpipe.describe(torch.randn(2, 3, 64, 64), ids, max_new_tokens=2)) == 2


def test_edit_rows_and_bad_image_embeds(rpipe):
    """Editing: the image rows enter the LLM and are written back after DTR; a wrong placeholder
    count or several prompts are refused."""
    pipe = rpipe
    img_id, T = pipe.mllm.image_token_id, pipe.mllm.image_seq_length
    emb = pipe.mllm.encode_images(torch.randn(1, 3, 64, 64))
    ids = torch.tensor([1, 2] + [img_id] * T + [3])
    uncond = torch.tensor([img_id] * T + [5])
    state = pipe.prefill([ids, uncond], torch.cat([emb, emb]))
    routed = pipe.route(state)
    Q = pipe.config.num_queries
    assert torch.equal(routed[2:2 + T], emb) and torch.equal(routed[ids.numel() + Q:ids.numel() + Q + T], emb)
    assert torch.equal(state["hidden"][0, 2:2 + T], emb)
    noise = torch.randn(1, 32, 4, 4)
    pipe.generate_latents([ids], uncond_ids=uncond, noise=noise, num_steps=1, image_embeds=emb)
    with pytest.raises(ValueError, match="uncond_ids: holds 0 image placeholders"):
        pipe.generate_latents([ids], uncond_ids=[5], noise=noise, num_steps=1, image_embeds=emb)
    with pytest.raises(ValueError, match="one prompt"):
        pipe.generate_latents([ids, ids], uncond_ids=uncond, noise=torch.randn(2, 32, 4, 4), num_steps=1,
                              image_embeds=emb)
    with pytest.raises(ValueError, match="image_embeds"):
        pipe.generate_latents([ids], uncond_ids=uncond, noise=noise, num_steps=1, image_embeds=emb[:, :5])


def test_components_must_match_the_pipeline_dtype(rpipe):
    from spar_runtime.pipeline import spar_random_weights

    spar = spar_random_weights(rpipe.config, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"mllm: its weights are torch.float32 on cpu, expected torch.bfloat16"):
        SparPipeline(rpipe.config, rpipe.mllm, spar, rpipe.dit, rpipe.vae, dtype=torch.bfloat16)
    del spar["dtr.alpha"]
    with pytest.raises(ValueError, match="missing keys.*dtr.alpha"):
        SparPipeline(rpipe.config, rpipe.mllm, spar, rpipe.dit, rpipe.vae)


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=2, do_sample=True, top_p=1.7), "top_p"),
    (dict(max_new_tokens=2, do_sample=True, top_p=-0.5), "top_p"),
    (dict(max_new_tokens=2, do_sample=True, top_k=-3), "top_k"),
    (dict(max_new_tokens=2, do_sample=True, temperature=float("inf")), "temperature"),
    (dict(max_new_tokens=2, eos_token_id="x"), "eos_token_id"),
    (dict(max_new_tokens=2, eos_token_id=-1), "eos_token_id"),
    (dict(max_new_tokens=2, eos_token_id=[]), "eos_token_id"),
])
def test_describe_refuses_bad_sampling_arguments(rpipe, kw, match):
    with pytest.raises(ValueError, match=match):
        rpipe.describe(torch.randn(1, 3, 64, 64), "hi", **kw)


def test_a_callback_that_is_not_callable_is_refused_before_any_work(rpipe, monkeypatch):
    ran = []
    monkeypatch.setattr(rpipe, "denoise", lambda *a, **k: ran.append(1))
    monkeypatch.setattr(rpipe.engine, "generate_latents", lambda *a, **k: ran.append(1))
    with pytest.raises(TypeError, match="callback: expected a callable"):
        rpipe.generate_latents([[1]], uncond_ids=[], noise=torch.randn(1, 32, 8, 8), num_steps=2, callback=True)
    assert not ran


def test_fp8_pipeline_does_not_convert_components_another_pipeline_uses():
    """quantization="fp8" converts the MLLM's and DiT's linears in place: refused while another live
    pipeline uses them (its results would change under it), and a non-FP8 pipeline is refused
    components that an FP8 pipeline converted."""
    import gc

    from spar_runtime.pipeline import spar_random_weights

    a = SparPipeline.random("tiny", seed=1)
    spar = spar_random_weights(a.config, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="mllm: already used by another SparPipeline"):
        SparPipeline(a.config, a.mllm, spar, a.dit, a.vae, quantization="fp8")
    assert not any(type(v).__name__ == "Fp8Weight" for v in vars(a.dit.blocks[0]).values())
    shared = SparPipeline(a.config, a.mllm, spar, a.dit, a.vae)     # sharing without FP8 is fine
    mllm, dit, vae, cfg = a.mllm, a.dit, a.vae, a.config
    del a, shared
    gc.collect()
    q = SparPipeline(cfg, mllm, spar, dit, vae, quantization="fp8")  # the only user now
    assert q.quantized
    with pytest.raises(ValueError, match="converted to FP8 in place by another SparPipeline"):
        SparPipeline(cfg, mllm, spar, dit, vae)


def test_inputs_found_by_fuzzing_get_clear_errors_or_work(rpipe, tmp_path):
    """Integer pixel tensors are refused (their 0..255 values would pass as normalized pixels);
    seeds must be ints in torch's range; numpy integer ids and numpy scalar arguments work as
    their Python values; a tiny temperature samples the top token instead of failing; an empty
    latent batch is refused naming latents; 'cpu:0' is the CPU; devices torch cannot use are
    refused naming device."""
    import numpy as np

    with pytest.raises(ValueError, match="image: expected normalized float pixel values.*uint8"):
        rpipe.describe(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "hi", max_new_tokens=1)
    with pytest.raises(ValueError, match="image: expected normalized float"):
        rpipe.preprocess(torch.ones(3, 64, 64, dtype=torch.bool))
    for seed, exc in ((1.9, TypeError), ("7", TypeError), (None, TypeError), (True, TypeError),
                      (2**64, ValueError), (-2**63 - 1, ValueError)):
        with pytest.raises(exc, match="seed"):
            rpipe._noise(1, seed)
    assert torch.equal(rpipe._noise(1, np.int64(5)), rpipe._noise(1, 5))
    a = rpipe.generate_latents([[np.int64(1), np.int64(2)]], uncond_ids=[np.int64(3)], noise=torch.zeros(1, 32, 4, 4),
                               num_steps=np.int64(1))
    b = rpipe.generate_latents([[1, 2]], uncond_ids=[3], noise=torch.zeros(1, 32, 4, 4), num_steps=1)
    assert torch.equal(a, b)
    img = torch.randn(1, 3, 64, 64)
    want = rpipe.describe(img, "hi", max_new_tokens=2)
    got = rpipe.describe(img, "hi", max_new_tokens=np.int64(2), do_sample=True, temperature=1e-45,
                         top_p=np.float32(0.9))
    assert got == want  # a temperature near 0 is greedy
    with pytest.raises(ValueError, match="latents: .*B >= 1"):
        rpipe.decode(torch.zeros(0, 32, 4, 4))
    p = SparPipeline.random("tiny", seed=0, device="cpu:0")
    assert p.device == torch.device("cpu")
    for device, match in (("meta", "device: expected cpu or cuda"), ("bogus", "device: expected a torch device")):
        with pytest.raises(ValueError, match=match):
            SparPipeline.random("tiny", device=device)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: cuda was asked for"):
            SparPipeline.random("tiny", device="cuda")


def test_checkpoint_problems_found_by_fuzzing(ckpt_copy):
    """Both InternVL key spellings of one tensor in the mllm file; a float4 tensor (a float dtype
    torch cannot cast); a VAE error names the file's own keys (with their decoder. prefix)."""
    f = ckpt_copy / "mllm"
    files = sorted(f.glob("*.safetensors"))
    holder = next(x for x in files if "language_model.model.norm.weight" in load_file(x))
    t = load_file(holder)
    t["model.language_model.norm.weight"] = torch.full_like(t["language_model.model.norm.weight"], 7.0)
    save_file(t, holder)
    import json

    index = next(f.glob("*.index.json"))
    meta = json.loads(index.read_text())
    meta["weight_map"]["model.language_model.norm.weight"] = holder.name
    index.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="same tensor .* two key layouts"):
        SparPipeline.from_pretrained(ckpt_copy)
    del t["model.language_model.norm.weight"], meta["weight_map"]["model.language_model.norm.weight"]
    save_file(t, holder)
    index.write_text(json.dumps(meta))

    spar = load_file(ckpt_copy / "spar.safetensors")
    orig = dict(spar)
    spar["dtr.alpha"] = torch.zeros(spar["dtr.alpha"].numel(), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    save_file(spar, ckpt_copy / "spar.safetensors")
    with pytest.raises(CheckpointError, match="'dtr.alpha' is torch.float4_e2m1fn_x2"):
        SparPipeline.from_pretrained(ckpt_copy)
    save_file(orig, ckpt_copy / "spar.safetensors")

    vae = next((ckpt_copy / "vae").glob("*.safetensors"))
    w = load_file(vae)
    key = next(k for k in w if k.startswith("decoder.") and k.endswith(".weight") and w[k].dim() == 4)
    w[key] = w[key][:1].clone()
    save_file(w, vae)
    with pytest.raises(CheckpointError, match=f"mis-shaped keys \\(1\\): {key}: got"):
        SparPipeline.from_pretrained(ckpt_copy)


def test_cli_out_formats_pil_cannot_write_or_read_back(tmp_path, capsys):
    from PIL import Image

    from spar_runtime.cli import main

    with pytest.raises(SystemExit) as e:   # XBM refuses RGB: found before the run
        main(["generate", "--config", "tiny", "--random-weights", "--prompt", "x", "--out", str(tmp_path / "y.xbm")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--out" in err and "XBM" in err, err
    src = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (200, 30, 60)).save(src)
    out = tmp_path / "rec.pdf"   # PIL writes PDF but cannot read it back for the PSNR
    assert main(["reconstruct", "--config", "tiny", "--random-weights", "--image", str(src), "--out", str(out)]) == 0
    assert out.is_file() and "before saving (PIL cannot read this format back)" in capsys.readouterr().out
