"""spar_runtime.internvl against transformers' InternVLForConditionalGeneration.

Tiny random InternVL models (several vision variants: LayerNorm / RMSNorm + q/k norm, with and
without attention biases, final norm, feature layer, pixel-shuffle ratio 1/2 and 1/4) are saved
with ``save_pretrained`` and loaded by spar_runtime: image features (vision tower + pixel shuffle
+ projector), every LLM hidden state with the images in the prompt (fp32 relative error <= 1e-4),
greedy ``describe`` tokens identical to ``generate``; text-only folders; bad inputs.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from spar_runtime.internvl import MLLM, mllm_param_shapes, pixel_shuffle, random_weights  # noqa: E402
from spar_runtime.loading import CheckpointError, load_safetensors_dir  # noqa: E402
from spar_runtime.qwen2 import causal_layout, packed_positions  # noqa: E402

RTOL_FP32 = 1e-4
IMAGE_TOKEN = 7


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "lambda" in name or "cls_token" in name \
                    or "position_embeddings" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model.eval()


VARIANTS = {
    # InternViT-300M style: LayerNorm, q/k/v biases, mean pooling (no final norm), ratio 1/2
    "ln_bias": dict(vision=dict(attention_bias=True), ratio=0.5, image=56),
    # InternViT-6B style: RMSNorm, q/k RMSNorm, no biases, a final LayerNorm, ratio 1/4, 8x8 grid
    "rms_qknorm_r4": dict(vision=dict(norm_type="rms_norm", use_qk_norm=True, use_mean_pooling=False),
                          ratio=0.25, image=112),
    # features of the second-to-last layer
    # features of the second-to-last layer; head dims the attention kernels lack (ViT 24, LLM 8: padded)
    "feature_layer_m2": dict(vision=dict(attention_bias=True, num_hidden_layers=3, hidden_size=48),
                             text=dict(num_attention_heads=8, num_key_value_heads=4), ratio=0.5, image=56,
                             top=dict(vision_feature_layer=-2)),
}


def build(variant: str, tie: bool = False, seed: int = 0):
    spec = VARIANTS[variant]
    tkw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, vocab_size=101, tie_word_embeddings=tie)
    tkw.update(spec.get("text", {}))
    text = transformers.Qwen2Config(**tkw)
    vkw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
               image_size=spec["image"], patch_size=14)
    vkw.update(spec["vision"])
    vision = transformers.InternVLVisionConfig(**vkw)
    grid = spec["image"] // 14
    tokens = int(grid * spec["ratio"]) ** 2
    cfg = transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                                      downsample_ratio=spec["ratio"], image_seq_length=tokens,
                                      tie_word_embeddings=tie, **spec.get("top", {}))
    return randomize(transformers.InternVLForConditionalGeneration(cfg), seed), tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for i, name in enumerate(VARIANTS):
        model, tokens = build(name, tie=(i == 1), seed=i)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, str(folder), tokens)
    return out


def prompt(tokens_per_image: int, n_images: int, before: int, after: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(8, 101, (n,), generator=g)  # noqa: E731  (ids 0..7 kept free)
    parts = [text(before)]
    for _ in range(n_images):
        parts += [torch.full((tokens_per_image,), IMAGE_TOKEN), text(2)]
    parts.append(text(after))
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------

def test_pixel_shuffle_matches_transformers():
    x = torch.randn(2, 8, 8, 5)
    ref_model = transformers.models.internvl.modeling_internvl.InternVLModel
    for ratio in (0.5, 0.25):
        ref = ref_model.pixel_shuffle(None, x.clone(), scale_factor=ratio)
        torch.testing.assert_close(pixel_shuffle(x, ratio), ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="patch grid"):
        pixel_shuffle(torch.randn(1, 6, 6, 2), 0.25)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_image_features_vs_transformers(models, variant):
    model, folder, tokens = models[variant]
    mllm = MLLM.from_dir(folder)
    assert mllm.image_seq_length == tokens and mllm.image_token_id == IMAGE_TOKEN
    S = VARIANTS[variant]["image"]
    pv = torch.randn(3, 3, S, S)
    got = mllm.encode_images(pv)
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=pv).pooler_output
    assert got.shape == (3 * tokens, 64)
    assert rel_err(got, ref.reshape(got.shape)) <= RTOL_FP32
    # one image alone gives the same rows as in the batch of three
    torch.testing.assert_close(mllm.encode_images(pv[1:2]), got[tokens:2 * tokens], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llm_hidden_states_with_images(models, variant):
    """Two prompts with different numbers of images, packed: every hidden state vs transformers."""
    model, folder, tokens = models[variant]
    mllm = MLLM.from_dir(folder)
    S = VARIANTS[variant]["image"]
    pv = [torch.randn(1, 3, S, S), torch.randn(2, 3, S, S)]
    ids = [prompt(tokens, 1, 3, 4, seed=1), prompt(tokens, 2, 1, 2, seed=2)]
    x = torch.cat([mllm.prompt_embeddings(i, p) for i, p in zip(ids, pv)])
    lens = [len(i) for i in ids]
    L = mllm.config.num_hidden_layers
    hidden = torch.empty(L + 1, sum(lens), 64)
    mllm.lm(x, causal_layout(lens), packed_positions(lens), hidden_out=hidden)
    off = 0
    with torch.no_grad():
        for i, p in zip(ids, pv):
            ref = model(input_ids=i[None], pixel_values=p, output_hidden_states=True)
            for layer in range(L + 1):
                err = rel_err(hidden[layer, off:off + len(i)], ref.hidden_states[layer][0])
                assert err <= RTOL_FP32, f"hidden state {layer}: rel err {err:.2e}"
            assert rel_err(mllm.lm.logits(hidden[L, off:off + len(i)]), ref.logits[0]) <= RTOL_FP32
            off += len(i)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_describe_greedy_tokens_match_generate(models, variant):
    model, folder, tokens = models[variant]
    mllm = MLLM.from_dir(folder)
    S = VARIANTS[variant]["image"]
    pv = torch.randn(1, 3, S, S)
    ids = prompt(tokens, 1, 2, 5, seed=3)
    with torch.no_grad():
        ref = model.generate(input_ids=ids[None], pixel_values=pv, max_new_tokens=10, do_sample=False,
                             pad_token_id=0)[0, len(ids):].tolist()
    assert mllm.describe(pv, ids, 10) == ref
    assert mllm.describe(pv, ids[None], 10) == ref and mllm.describe(pv, ids.tolist(), 4) == ref[:4]
    # with an EOS id: both stop at its first occurrence
    eos = ref[2]
    with torch.no_grad():
        ref_eos = model.generate(input_ids=ids[None], pixel_values=pv, max_new_tokens=10, do_sample=False,
                                 pad_token_id=0, eos_token_id=eos)[0, len(ids):].tolist()
    got = mllm.describe(pv, ids, 10, eos_token_id=eos)
    assert got == ref_eos[:len(got)] and got[-1] == eos and len(got) == ref.index(eos) + 1


def test_describe_sampling_is_seeded(models):
    _, folder, tokens = models["ln_bias"]
    mllm = MLLM.from_dir(folder)
    pv, ids = torch.randn(1, 3, 56, 56), prompt(tokens, 1, 2, 2, seed=4)
    run = lambda s: mllm.describe(pv, ids, 6, do_sample=True, temperature=3.0,  # noqa: E731
                                  generator=torch.Generator().manual_seed(s))
    assert run(5) == run(5)
    assert mllm.describe(pv, ids, 6, do_sample=True, top_k=1) == mllm.describe(pv, ids, 6)


def test_bf16_image_features(models):
    model, folder, tokens = models["ln_bias"]
    mllm = MLLM.from_dir(folder, dtype=torch.bfloat16)
    pv = torch.randn(2, 3, 56, 56)
    got = mllm.encode_images(pv)
    assert got.dtype == torch.bfloat16
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=pv).pooler_output.reshape(got.shape)
        model_bf16 = build("ln_bias")[0]
        model_bf16.load_state_dict(model.state_dict())
        base = model_bf16.to(torch.bfloat16).model.get_image_features(pixel_values=pv).pooler_output
    assert rel_err(got, ref) <= 2 * rel_err(base.reshape(got.shape), ref) + 1e-3


def test_text_only_folder(tmp_path):
    cfg = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, vocab_size=101)
    model = randomize(transformers.Qwen2ForCausalLM(cfg), 3)
    model.save_pretrained(tmp_path)
    mllm = MLLM.from_dir(tmp_path)
    assert mllm.vision is None and mllm.image_token_id is None
    ids = prompt(4, 0, 6, 0, seed=5)
    with torch.no_grad():
        ref = model.generate(ids[None], max_new_tokens=7, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert mllm.describe(None, ids, 7) == ref
    with pytest.raises(ValueError, match="text-only"):
        mllm.encode_images(torch.randn(1, 3, 56, 56))
    with pytest.raises(ValueError, match="text-only"):
        mllm.describe(torch.randn(1, 3, 56, 56), ids, 3)
    assert set(mllm_param_shapes(json.loads((tmp_path / "config.json").read_text()))) == set(model.state_dict())


def test_param_shapes_and_random_weights_load_in_transformers(models, tmp_path):
    model, folder, _ = models["rms_qknorm_r4"]      # the tied variant
    config = json.loads(open(f"{folder}/config.json").read())
    shapes = mllm_param_shapes(config)
    saved = load_safetensors_dir(folder)
    assert {k: tuple(v.shape) for k, v in saved.items()} == shapes
    weights = random_weights(config, torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in weights.items()} == shapes
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    mllm = MLLM(config, weights)
    pv = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        want = ref.model.get_image_features(pixel_values=pv).pooler_output.reshape(-1, 64)
    assert rel_err(mllm.encode_images(pv), want) <= RTOL_FP32


@pytest.mark.parametrize("keep_head", [True, False])
def test_tie_flag_absent_matches_transformers(models, tmp_path, keep_head):
    """No top-level ``tie_word_embeddings`` (transformers' default: True): a stored head is still used,
    a missing one is tied to the embeddings, as ``from_pretrained`` does."""
    _, folder, tokens = models["ln_bias"]
    config = json.loads(open(f"{folder}/config.json").read())
    config.pop("tie_word_embeddings")
    sd = load_safetensors_dir(folder)
    if not keep_head:
        del sd["language_model.lm_head.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    mllm = MLLM.from_dir(tmp_path)
    pv, ids = torch.randn(1, 3, 56, 56), prompt(tokens, 1, 2, 3, seed=9)
    x = mllm.prompt_embeddings(ids, pv)
    got = mllm.lm.logits(mllm.lm(x, causal_layout([len(ids)]), packed_positions([len(ids)])))
    with torch.no_grad():
        want = ref(input_ids=ids[None], pixel_values=pv).logits[0]
    assert rel_err(got, want) <= RTOL_FP32


def test_new_style_key_names(models, tmp_path):
    """Checkpoints saved with keys ``model.language_model.*`` / ``model.vision_tower.*`` / ``lm_head.*``."""
    _, folder, tokens = models["ln_bias"]
    sd = load_safetensors_dir(folder)
    renamed = {}
    for k, v in sd.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k.startswith("language_model.lm_head."):
            k = "lm_head." + k[len("language_model.lm_head."):]
        else:
            k = "model." + k
        renamed[k] = v
    save_file(renamed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
    pv, ids = torch.randn(1, 3, 56, 56), prompt(tokens, 1, 1, 1, seed=6)
    assert MLLM.from_dir(tmp_path).describe(pv, ids, 5) == MLLM.from_dir(folder).describe(pv, ids, 5)


# ---------------------------------------------------------------------------------------------
# bad inputs and checkpoints

def test_bad_calls(models):
    _, folder, tokens = models["ln_bias"]
    mllm = MLLM.from_dir(folder)
    ids = prompt(tokens, 1, 1, 1, seed=7)
    with pytest.raises(ValueError, match=r"pixel_values: expected \[n, 3, 56, 56\]"):
        mllm.encode_images(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="pixel_values"):
        mllm.encode_images(torch.zeros(1, 3, 56, 56, dtype=torch.int64))
    with pytest.raises(ValueError, match="image tokens"):
        mllm.describe(torch.randn(2, 3, 56, 56), ids, 3)
    with pytest.raises(ValueError, match="image tokens"):
        mllm.describe(None, ids, 3)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 101\)"):
        mllm.describe(None, torch.tensor([1, 200]), 3)
    with pytest.raises(ValueError, match="input_ids"):
        mllm.describe(None, torch.tensor([], dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        mllm.describe(torch.randn(1, 3, 56, 56), ids, 0)


def test_bad_configs_and_checkpoints(models, tmp_path):
    _, folder, _ = models["ln_bias"]
    config = json.loads(open(f"{folder}/config.json").read())
    weights = load_safetensors_dir(folder)
    for change, match in [(dict(vision_feature_select_strategy="full"), "select_strategy"),
                          (dict(image_seq_length=5), "image_seq_length"),
                          (dict(downsample_ratio=0.3), "downsample_ratio"),
                          (dict(vision_feature_layer=[-1, -2]), "vision_feature_layer"),
                          (dict(projector_hidden_act="swiglu"), "activation")]:
        with pytest.raises(CheckpointError, match=match):
            MLLM(dict(config, **change), weights)
    bad = dict(weights)
    del bad["vision_tower.encoder.layer.1.lambda_2"]
    bad["multi_modal_projector.linear_1.weight"] = torch.randn(64, 100)
    bad["vision_tower.unknown"] = torch.randn(1)
    with pytest.raises(CheckpointError) as e:
        MLLM(config, bad, where="some/mllm")
    msg = str(e.value)
    assert msg.startswith("some/mllm") and "vision_tower.encoder.layer.1.lambda_2" in msg
    assert "multi_modal_projector.linear_1.weight: got (64, 100), expected (64, 128)" in msg
    assert "vision_tower.unknown" in msg
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        MLLM(config, {k: v.double() for k, v in weights.items()})
    torch.save(weights, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="refused"):
        MLLM.from_dir(tmp_path)


def test_device_independent_on_meta(models):
    """Prefill, KV-cache decode steps and image encoding on the meta device: every tensor is created
    on the weights' device and nothing on these paths reads values back to the host."""
    _, folder, tokens = models["ln_bias"]
    config = json.loads(open(f"{folder}/config.json").read())
    weights = {k: v.to("meta") for k, v in random_weights(config, torch.Generator().manual_seed(0)).items()}
    mllm = MLLM(config, weights)
    lens = [5, 7]
    x = mllm.embed_tokens(torch.randint(0, 101, (12,), device="meta"))
    L = mllm.config.num_hidden_layers
    hidden = torch.empty(L + 1, 12, 64, device="meta")
    y = mllm.lm(x, causal_layout(lens, device="meta"), packed_positions(lens, device="meta"), hidden_out=hidden)
    assert y.device.type == "meta" and y.shape == (12, 64)
    cache = mllm.lm.new_cache(2, 10)
    layout, pos = cache.append(lens)
    assert layout.device.type == "meta" and pos.device.type == "meta"
    mllm.lm(x, layout, pos, kv_cache=cache)
    layout, pos = cache.append([1, 1])
    assert mllm.lm(x[:2], layout, pos, kv_cache=cache).shape == (2, 64)
    feats = mllm.encode_images(torch.randn(2, 3, 56, 56, device="meta"))
    assert feats.device.type == "meta" and feats.shape == (2 * tokens, 64)
