"""spar_runtime.loading and spar_runtime.qwen2 against transformers (the format's defining library).

Tiny random Qwen2 models are built with transformers, saved with ``save_pretrained`` to a temp
dir, loaded by spar_runtime, and compared on packed batches: every hidden state (fp32 relative
error <= 1e-4), the bidirectional connector stack, greedy decoding with the KV cache, and bf16
under the FlashAttention rule. Bad checkpoints and bad calls raise with clear messages.
"""

import json
import os

import pytest
import torch

from spar_runtime import loading
from spar_runtime.loading import CheckpointError, check_state_dict, load_safetensors_dir, read_json

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from spar_runtime.qwen2 import (  # noqa: E402
    DecoderStack, KVCache, Qwen2Config, Qwen2LM, bidirectional_layout, causal_layout, packed_positions,
    qwen2_lm_param_shapes, qwen2_param_shapes)

RTOL_FP32 = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def hf_qwen2_config(**over):
    kw = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=176, vocab_size=97, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=512)
    kw.update(over)
    rope_theta = kw.pop("rope_theta")
    cfg = transformers.Qwen2Config(**kw)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    return cfg


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a non-trivial value: transformers initializes biases to 0 and norm
    weights to 1, which would leave those paths untested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "lambda" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.2))
    return model.eval()


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    """{name: (hf model, folder)} for an untied GQA model and a tied, different-ratio one."""
    out = {}
    for name, over in {"gqa2": {}, "tied_gqa4_theta1e4": dict(num_attention_heads=8, num_key_value_heads=2,
                                                             head_dim=32, tie_word_embeddings=True,
                                                             rope_theta=1e4, num_hidden_layers=2)}.items():
        model = randomize(transformers.Qwen2ForCausalLM(hf_qwen2_config(**over)), seed=len(out))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, str(folder))
    return out


# ---------------------------------------------------------------------------------------------
# loading

def test_load_single_file_prefix_dtype(tmp_path):
    a, b = torch.randn(3, 5), torch.arange(4)
    save_file({"x.a": a, "x.b": b, "y.c": torch.randn(2)}, str(tmp_path / "model.safetensors"))
    sd = load_safetensors_dir(tmp_path)
    assert set(sd) == {"x.a", "x.b", "y.c"}
    torch.testing.assert_close(sd["x.a"], a, atol=0, rtol=0)
    sd = load_safetensors_dir(tmp_path, prefix="x.", dtype=torch.bfloat16)
    assert set(sd) == {"a", "b"}
    assert sd["a"].dtype == torch.bfloat16 and sd["b"].dtype == torch.int64   # integers keep their dtype
    torch.testing.assert_close(sd["a"], a.to(torch.bfloat16), atol=0, rtol=0)
    one = loading.load_safetensors_file(tmp_path / "model.safetensors", prefix="y.")
    assert set(one) == {"c"}
    assert set(load_safetensors_dir(tmp_path / "model.safetensors")) == {"x.a", "x.b", "y.c"}


def test_load_sharded_index_matches_single(qwen_dirs, tmp_path):
    model, folder = qwen_dirs["gqa2"]
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors.index.json")]
    assert index and len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 2
    single, sharded = load_safetensors_dir(folder), load_safetensors_dir(tmp_path)
    assert set(single) == set(sharded)
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], atol=0, rtol=0)
    lm = Qwen2LM.from_dir(tmp_path)
    assert lm.config.num_hidden_layers == 3
    # a shard named by the index but absent is named in the error
    shard = sorted(n for n in os.listdir(tmp_path) if n.endswith(".safetensors"))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=shard):
        load_safetensors_dir(tmp_path)


def test_diffusers_style_single_file(tmp_path):
    save_file({"w": torch.randn(2)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not read")
    assert set(load_safetensors_dir(tmp_path)) == {"w"}


def test_refuses_pickle(tmp_path):
    torch.save({"w": torch.randn(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*refused"):
        load_safetensors_dir(tmp_path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_safetensors_dir(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        loading.load_safetensors_file(tmp_path / "pytorch_model.bin")
    # an index pointing at a pickle shard
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model.bin"}}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_safetensors_dir(tmp_path)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_safetensors_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no weights found"):
        load_safetensors_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 3 + b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_safetensors_dir(tmp_path)
    with pytest.raises(CheckpointError, match="file not found"):
        read_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON"):
        read_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        read_json(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="config.json"):
        Qwen2LM.from_dir(tmp_path)


def test_index_errors(tmp_path):
    save_file({"a": torch.randn(2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                                   "b": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match="does not hold it"):
        load_safetensors_dir(tmp_path)
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_safetensors_dir(tmp_path)


def test_duplicate_key_across_files(tmp_path):
    save_file({"a": torch.randn(2)}, str(tmp_path / "one.safetensors"))
    save_file({"a": torch.randn(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match="more than one file"):
        load_safetensors_dir(tmp_path)


def test_check_state_dict_lists_everything():
    sd = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "extra": torch.zeros(1)}
    check_state_dict({"a": torch.zeros(2, 3)}, {"a": (2, 3)}, "ok")
    with pytest.raises(CheckpointError) as e:
        check_state_dict(sd, {"a": (2, 4), "b": (4,), "c": (1,)}, "some/folder")
    msg = str(e.value)
    assert msg.startswith("some/folder")
    assert "missing keys (1): c" in msg and "unexpected keys (1): extra" in msg
    assert "a: got (2, 3), expected (2, 4)" in msg
    assert isinstance(e.value, ValueError)


def test_wrong_shapes_and_unknown_keys_in_checkpoint(qwen_dirs, tmp_path):
    model, folder = qwen_dirs["gqa2"]
    sd = load_safetensors_dir(folder)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.randn(5, 128)
    sd["model.layers.7.mlp.up_proj.weight"] = torch.randn(5, 128)
    del sd["model.norm.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    with pytest.raises(CheckpointError) as e:
        Qwen2LM.from_dir(tmp_path)
    msg = str(e.value)
    assert "model.norm.weight" in msg and "model.layers.7.mlp.up_proj.weight" in msg
    assert "model.layers.1.mlp.up_proj.weight: got (5, 128), expected (176, 128)" in msg


# ---------------------------------------------------------------------------------------------
# config

def test_config_from_dict_and_refusals():
    base = hf_qwen2_config().to_dict()
    cfg = Qwen2Config.from_dict(base)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta) == (32, 2, 1e6)
    old_style = dict(base, rope_theta=5e5)
    old_style.pop("rope_parameters")
    assert Qwen2Config.from_dict(old_style).rope_theta == 5e5
    assert transformers.Qwen2Config(**cfg.to_dict()).rope_parameters["rope_theta"] == 1e6
    for bad, match in [(dict(use_sliding_window=True), "sliding"), (dict(hidden_act="gelu"), "hidden_act"),
                       (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope_type"),
                       (dict(num_key_value_heads=3), "multiple"), (dict(hidden_size=0), "hidden_size"),
                       (dict(head_dim=15), "head_dim must be a positive even integer"),
                       (dict(head_dim=-16), "head_dim must be a positive even integer"),
                       (dict(hidden_size=60, num_attention_heads=4, head_dim=None), "positive even integer"),
                       (dict(rms_norm_eps=-1e-6), "rms_norm_eps"), (dict(rms_norm_eps=float("inf")), "rms_norm_eps")]:
        with pytest.raises(CheckpointError, match=match):
            Qwen2Config.from_dict(dict(base, **bad))
    with pytest.raises(TypeError, match="config"):
        Qwen2Config.from_dict([1])


def test_param_shapes():
    cfg = Qwen2Config.from_dict(hf_qwen2_config().to_dict())
    shapes = qwen2_param_shapes(cfg, num_layers=2, prefix="connector.")
    assert shapes["connector.layers.1.self_attn.k_proj.weight"] == (64, 128)
    assert "connector.norm.weight" in shapes and "connector.layers.2.mlp.up_proj.weight" not in shapes
    assert "norm.weight" not in qwen2_param_shapes(cfg, norm=False)
    hf = transformers.Qwen2ForCausalLM(hf_qwen2_config())
    assert {k: tuple(v.shape) for k, v in hf.state_dict().items()} == qwen2_lm_param_shapes(cfg)


# ---------------------------------------------------------------------------------------------
# numerics vs transformers

def _packed_prompts(lens, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lens]


@pytest.mark.parametrize("name", ["gqa2", "tied_gqa4_theta1e4"])
def test_all_hidden_states_packed_vs_transformers(qwen_dirs, name):
    model, folder = qwen_dirs[name]
    lm = Qwen2LM.from_dir(folder)
    L = lm.config.num_hidden_layers
    lens = [13, 6]
    ids = _packed_prompts(lens, lm.config.vocab_size, seed=1)
    N = sum(lens)
    hidden = torch.full((L + 1, N, lm.config.hidden_size), float("nan"))
    hidden[0] = lm.embed_tokens(torch.cat(ids))
    y = lm(hidden[0], causal_layout(lens), packed_positions(lens), hidden_out=hidden)
    assert y.data_ptr() == hidden[L].data_ptr()
    # without the buffer: the same final output
    y2 = lm(lm.embed_tokens(torch.cat(ids)), causal_layout(lens), packed_positions(lens))
    torch.testing.assert_close(y2, hidden[L], atol=1e-6, rtol=1e-6)
    logits = lm.logits(y)
    off = 0
    with torch.no_grad():
        for seq in ids:
            ref = model(seq[None], output_hidden_states=True)
            assert len(ref.hidden_states) == L + 1
            for layer in range(L + 1):
                err = rel_err(hidden[layer, off:off + len(seq)], ref.hidden_states[layer][0])
                assert err <= RTOL_FP32, f"hidden state {layer}: rel err {err:.2e}"
            assert rel_err(logits[off:off + len(seq)], ref.logits[0]) <= RTOL_FP32
            off += len(seq)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(6, 2, 8), (3, 1, 40), (2, 2, 24)])
def test_head_dims_the_kernel_lacks(heads, kv_heads, head_dim):
    """Head dims outside spar_kernels' list are zero-padded for the attention call (still exact)."""
    hf = randomize(transformers.Qwen2ForCausalLM(hf_qwen2_config(
        hidden_size=48, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        num_hidden_layers=2)), seed=head_dim)
    lm = Qwen2LM(Qwen2Config.from_dict(hf.config.to_dict()), hf.state_dict())
    lens = [6, 9]
    ids = _packed_prompts(lens, 97, seed=11)
    hidden = torch.empty(3, 15, 48)
    lm(lm.embed_tokens(torch.cat(ids)), causal_layout(lens), packed_positions(lens), hidden_out=hidden)
    with torch.no_grad():
        for (a, b), seq in zip([(0, 6), (6, 15)], ids):
            ref = hf(seq[None], output_hidden_states=True).hidden_states
            for layer in range(3):
                assert rel_err(hidden[layer, a:b], ref[layer][0]) <= RTOL_FP32


def test_connector_bidirectional_vs_qwen2model(qwen_dirs):
    """The connector: a DecoderStack with fewer layers, weights named like a Qwen2Model's,
    bidirectional within each sequence, against Qwen2Model with a zero 4-D additive mask."""
    cfg_d = hf_qwen2_config(num_hidden_layers=2).to_dict()
    cfg_d.pop("layer_types", None)
    ref = randomize(transformers.Qwen2Model(transformers.Qwen2Config(**cfg_d)), seed=5)
    weights = {k: v for k, v in ref.state_dict().items() if k != "embed_tokens.weight"}
    stack = DecoderStack(Qwen2Config.from_dict(cfg_d), weights, num_layers=2)
    lens = [9, 1, 4]
    x = torch.randn(sum(lens), 128)
    hidden = torch.empty(3, sum(lens), 128)
    stack(x, bidirectional_layout(lens), packed_positions(lens), hidden_out=hidden)
    torch.testing.assert_close(hidden[0], x, atol=0, rtol=0)
    off = 0
    with torch.no_grad():
        for n in lens:
            xs = x[off:off + n][None]
            out = ref(inputs_embeds=xs, attention_mask=torch.zeros(1, 1, n, n), output_hidden_states=True)
            for layer in range(3):
                assert rel_err(hidden[layer, off:off + n], out.hidden_states[layer][0]) <= RTOL_FP32
            causal = ref(inputs_embeds=xs).last_hidden_state[0]
            if n > 1:   # really bidirectional: differs from the causal run
                assert rel_err(hidden[2, off:off + n], causal) > 1e-3
            off += n


def test_stack_without_final_norm(qwen_dirs):
    cfg_d = hf_qwen2_config(num_hidden_layers=2).to_dict()
    cfg_d.pop("layer_types", None)
    ref = randomize(transformers.Qwen2Model(transformers.Qwen2Config(**cfg_d)), seed=6)
    weights = {k: v for k, v in ref.state_dict().items() if k not in ("embed_tokens.weight", "norm.weight")}
    stack = DecoderStack(Qwen2Config.from_dict(cfg_d), weights, norm=False)
    ref.norm = torch.nn.Identity()
    lens = [5, 8]
    x = torch.randn(sum(lens), 128)
    y = stack(x, causal_layout(lens), packed_positions(lens))
    stack.split_gate_up = not stack.split_gate_up        # the other MLP GEMM arrangement (GPU's one)
    torch.testing.assert_close(stack(x, causal_layout(lens), packed_positions(lens)), y, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for (a, b) in [(0, 5), (5, 13)]:
            assert rel_err(y[a:b], ref(inputs_embeds=x[a:b][None]).last_hidden_state[0]) <= RTOL_FP32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_flash_attention_rule(qwen_dirs, dtype):
    """bf16/fp16 weights and activations: error vs the fp32 model at most 2x transformers' own error
    in the same dtype (+1e-3)."""
    model, folder = qwen_dirs["gqa2"]
    lm = Qwen2LM.from_dir(folder, dtype=dtype)
    assert lm.embed_weight.dtype == dtype
    lens = [11, 7]
    ids = _packed_prompts(lens, 97, seed=3)
    y = lm(lm.embed_tokens(torch.cat(ids)), causal_layout(lens), packed_positions(lens))
    model_bf16 = transformers.Qwen2ForCausalLM(model.config).eval()
    model_bf16.load_state_dict(model.state_dict())
    model_bf16 = model_bf16.to(dtype)
    off = 0
    with torch.no_grad():
        for seq in ids:
            ref = model(seq[None], output_hidden_states=True).hidden_states[-1][0]
            base = model_bf16(seq[None], output_hidden_states=True).hidden_states[-1][0]
            ours = y[off:off + len(seq)]
            assert rel_err(ours, ref) <= 2 * rel_err(base, ref) + 1e-3
            off += len(seq)


@pytest.mark.parametrize("name", ["gqa2", "tied_gqa4_theta1e4"])
def test_greedy_decoding_matches_transformers_generate(qwen_dirs, name):
    model, folder = qwen_dirs[name]
    lm = Qwen2LM.from_dir(folder)
    lens = [7, 12]
    ids = _packed_prompts(lens, lm.config.vocab_size, seed=4)
    new = 9
    ours = lm.generate(lm.embed_tokens(torch.cat(ids)), lens, new)
    with torch.no_grad():
        refs = [model.generate(s[None], max_new_tokens=new, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(s):].tolist() for s in ids]
    assert ours == refs
    # stopping: an EOS id that the first prompt emits at step 3 ends that sequence there
    eos = refs[0][3]
    if eos not in refs[0][:3]:
        stopped = lm.generate(lm.embed_tokens(torch.cat(ids)), lens, new, eos_token_id=eos)
        assert stopped[0] == refs[0][:4]
        cut = next((j + 1 for j, t in enumerate(refs[1]) if t == eos), new)
        assert stopped[1] == refs[1][:cut]


def test_kv_cache_decode_equals_prefill(qwen_dirs):
    """Logits of tokens fed one by one through the cache equal the prefill's, per sequence."""
    _, folder = qwen_dirs["gqa2"]
    lm = Qwen2LM.from_dir(folder)
    lens = [6, 3]
    ids = _packed_prompts(lens, 97, seed=8)
    full = lm.logits(lm(lm.embed_tokens(torch.cat(ids)), causal_layout(lens), packed_positions(lens)))
    cache = lm.new_cache(2, 8)
    first = [4, 2]
    layout, pos = cache.append(first)
    x = lm.embed_tokens(torch.cat([ids[0][:4], ids[1][:2]]))
    got = [lm.logits(lm(x, layout, pos, kv_cache=cache))]
    layout, pos = cache.append([2, 0])        # a step where only the first sequence moves
    got.append(lm.logits(lm(lm.embed_tokens(ids[0][4:6]), layout, pos, kv_cache=cache)))
    layout, pos = cache.append([0, 1])
    got.append(lm.logits(lm(lm.embed_tokens(ids[1][2:3]), layout, pos, kv_cache=cache)))
    assert cache.lengths == [6, 3]
    torch.testing.assert_close(got[0][:4], full[:4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0][4:], full[6:8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], full[4:6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], full[8:9], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        cache.append([3, 0])


def test_sampling(qwen_dirs):
    _, folder = qwen_dirs["gqa2"]
    lm = Qwen2LM.from_dir(folder)
    ids = _packed_prompts([5], 97, seed=9)[0]
    x = lm.embed_tokens(ids)
    greedy = lm.generate(x, [5], 6)
    assert lm.generate(x, [5], 6, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0)) == greedy
    a = lm.generate(x, [5], 6, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(1))
    b = lm.generate(x, [5], 6, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(1))
    assert a == b and len(a[0]) == 6
    c = lm.generate(x, [5], 6, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(2))
    assert c == greedy   # a vanishing nucleus keeps only the most likely token


# ---------------------------------------------------------------------------------------------
# bad calls

def test_bad_calls(qwen_dirs):
    _, folder = qwen_dirs["gqa2"]
    lm = Qwen2LM.from_dir(folder)
    lens = [4, 3]
    x = torch.randn(7, 128)
    layout, pos = causal_layout(lens), packed_positions(lens)
    with pytest.raises(ValueError, match=r"x: expected a packed \[N, 128\]"):
        lm(torch.randn(7, 64), layout, pos)
    with pytest.raises(ValueError, match="x: expected dtype"):
        lm(x.double(), layout, pos)
    with pytest.raises(ValueError, match="positions"):
        lm(x, layout, pos[:5])
    with pytest.raises(ValueError, match="hidden_out"):
        lm(x, layout, pos, hidden_out=torch.empty(3, 7, 128))
    with pytest.raises(TypeError, match="kv_cache"):
        lm(x, layout, pos, kv_cache=object())
    with pytest.raises(ValueError, match="kv_cache"):
        lm(x, layout, pos, kv_cache=KVCache(2, 2, 8, 2, 32))
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(x, lens, 0)
    with pytest.raises(ValueError, match="embeds"):
        lm.generate(x, [4, 4], 2)
    with pytest.raises(ValueError, match="lengths"):
        causal_layout([3, 0])
    with pytest.raises(ValueError, match="lengths"):
        packed_positions([])
    with pytest.raises(TypeError, match="ids"):
        lm.embed_tokens(torch.zeros(3))
    with pytest.raises(ValueError, match="num_layers"):
        DecoderStack(lm.config, {}, num_layers=0)
    with pytest.raises(CheckpointError, match="missing keys"):
        DecoderStack(lm.config, {}, num_layers=1)


def test_kv_cache_decode_needs_start_decode_again_after_append(qwen_dirs):
    """The device positions are set from the host lengths by start_decode(); after an append() (or
    reset()) decode_inputs() asks for start_decode() again instead of writing at stale positions."""
    _, folder = qwen_dirs["gqa2"]
    lm = Qwen2LM.from_dir(folder)
    cache = lm.new_cache(1, 16)
    with pytest.raises(ValueError, match="call start_decode"):
        cache.decode_inputs()
    cache.append([4])
    cache.start_decode()
    cache.decode_inputs()
    cache.advance()
    cache.decode_inputs()                      # still decoding: positions advanced by the step
    cache.append([3])
    with pytest.raises(ValueError, match="call start_decode"):
        cache.decode_inputs()
    cache.start_decode()
    assert int(cache.positions[0]) == cache.lengths[0] == 8
    cache.reset()
    with pytest.raises(ValueError, match="call start_decode"):
        cache.decode_inputs()
