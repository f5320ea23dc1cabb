"""spar_runtime.configs and spar_runtime.dtr: the configs build the public libraries' models with the
sizes of SPAR_MODEL.md, their spar.safetensors names match a Qwen2Model connector, and DTR equals
its formula."""

import pytest
import torch
import torch.nn.functional as F

from spar_runtime.configs import CONFIGS, SparConfig, get_config
from spar_runtime.dtr import DynamicTokenRouting, dtr_param_shapes

# SPAR_MODEL.md: (LLM layers, hidden, q heads, kv heads, head dim, FFN), SANA (blocks, width, self heads x dim,
# cross heads x dim), DTR layers
SIZES = {
    "SPAR-1B": ((24, 896, 14, 2, 64, 4864), (28, 1152, 36, 32, 16, 72), (6, 12, 18, 24)),
    "SPAR-3B": ((28, 1536, 12, 2, 128, 8960), (20, 2240, 70, 32, 20, 112), (7, 14, 21, 28)),
}


@pytest.mark.parametrize("name", list(SIZES))
def test_named_configs_have_the_documented_sizes(name):
    c = get_config(name)
    t = c.text_config
    (L, D, hq, hkv, hd, ffn), (blocks, width, sh, sd, ch, cd), dtr = SIZES[name]
    assert (t["num_hidden_layers"], t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"],
            t["head_dim"], t["intermediate_size"]) == (L, D, hq, hkv, hd, ffn)
    assert t["rope_theta"] == 1e6
    dit = c.dit_config
    assert (dit["num_layers"], dit["num_attention_heads"] * dit["attention_head_dim"], dit["num_attention_heads"],
            dit["attention_head_dim"], dit["num_cross_attention_heads"], dit["cross_attention_head_dim"]) == \
        (blocks, width, sh, sd, ch, cd)
    assert dit["caption_channels"] == 2304 and dit["in_channels"] == 32 and dit["patch_size"] == 1
    assert c.dtr_layers == dtr and c.num_queries == 256 and c.connector_layers == 6
    assert c.latent_size == 16 and c.image_size == 512 and c.vae_config["latent_channels"] == 32
    assert c.mllm_config["image_seq_length"] == 256  # 448 px, patch 14, pixel-shuffle 0.5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_configs_build_the_public_models(name):
    """The component configs are valid transformers/diffusers configs (built on the meta device),
    and spar.safetensors' connector names/shapes are a Qwen2Model's."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config, Qwen2Model

    c = get_config(name)
    with torch.device("meta"):
        mllm = InternVLForConditionalGeneration(InternVLConfig.from_dict(c.mllm_config))
        dit = SanaTransformer2DModel.from_config(c.dit_config)
        vae = AutoencoderDC.from_config(c.vae_config)
        d = {k: v for k, v in c.text_config.items() if k != "architectures"}
        d["num_hidden_layers"] = c.connector_layers
        conn = Qwen2Model(Qwen2Config(**d))
    text = mllm.config.text_config
    assert text.hidden_size == c.hidden_size and text.num_hidden_layers == c.num_llm_layers
    assert mllm.config.image_seq_length == c.mllm_config["image_seq_length"]
    assert dit.config.caption_channels == c.caption_channels
    assert vae.config.latent_channels == c.latent_channels
    expected = {"connector." + k: tuple(p.shape) for k, p in conn.state_dict().items()
                if not k.startswith("embed_tokens")}
    got = {k: v for k, v in c.spar_param_shapes().items() if k.startswith("connector.")}
    assert got == expected
    assert {k: v for k, v in c.spar_param_shapes().items() if k.startswith("dtr.")} == \
        dtr_param_shapes(c.hidden_size, len(c.dtr_layers))


def test_spar_json_round_trip_and_with_layers():
    c = get_config("SPAR-1B")
    j = c.spar_json()
    assert set(j) == {"num_queries", "dtr_layers", "dtr_tau", "dtr_norm_eps", "connector_layers", "latent_channels",
                      "latent_size", "vae_scale_factor", "flow_shift", "num_steps", "guidance", "mllm", "dit", "vae",
                      "tokenizer"}
    assert j["tokenizer"] == {"pixel_layers": 6, "pixel_heads": 16, "mlp_blocks": 3}
    back = SparConfig.from_json(j, c.mllm_config, c.dit_config, c.vae_config, name="SPAR-1B")
    assert back.spar_json() == j and back.text_config == c.text_config
    small = c.with_layers(llm_layers=4, dit_layers=3, connector_layers=2)
    assert small.num_llm_layers == 4 and small.dtr_layers == (1, 2, 3, 4) and small.dit_config["num_layers"] == 3
    assert small.hidden_size == c.hidden_size and c.num_llm_layers == 24  # the original is untouched
    assert get_config("tiny") is not get_config("tiny")


@pytest.mark.parametrize("change, match", [
    ({"dtr_layers": (1, 2, 9)}, "dtr_layers"),
    ({"dtr_layers": ()}, "dtr_layers"),
    ({"num_queries": 0}, "num_queries"),
    ({"connector_layers": 0}, "connector_layers"),
    ({"latent_channels": 16}, "in_channels"),
    ({"dtr_tau": 0.0}, "dtr_tau"),
    ({"num_steps": 0}, "num_steps"),
    # types, checked before anything converts them (a string dtr_layers read as its digits, a float
    # count reaching torch.empty, an infinite scale dividing the latents to zeros)
    ({"num_queries": 8.0}, "num_queries = 8.0, expected an int"),
    ({"num_queries": "8"}, "num_queries = '8', expected an int"),
    ({"connector_layers": 1.5}, "connector_layers"),
    ({"num_steps": True}, "num_steps"),
    ({"dtr_layers": "124"}, "dtr_layers = '124', expected a list of ints"),
    ({"dtr_layers": [1.5, 2, 4]}, "dtr_layers"),
    ({"dtr_layers": [True, 2, 4]}, "dtr_layers"),
    ({"dtr_tau": None}, "dtr_tau = None, expected a finite number"),
    ({"dtr_tau": float("inf")}, "dtr_tau"),
    ({"vae_scale_factor": float("inf")}, "vae_scale_factor"),
    ({"flow_shift": float("nan")}, "flow_shift"),
    ({"guidance": "4.5"}, "guidance"),
    ({"dit_config": {**get_config("tiny").dit_config, "out_channels": 16}}, "out_channels"),
])
def test_bad_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        get_config("tiny").replace(**change)


@pytest.mark.parametrize("vision, ratio, match", [
    ({"image_size": 62}, None, r"image_size'\] = 62, expected a multiple of patch_size"),
    ({"image_size": [64, 66]}, None, "expected a multiple of patch_size"),
    ({}, 0.3, r"downsample_ratio'\] = 0.3, expected a ratio that turns the 16-patch side"),
])
def test_vision_grids_the_tower_cannot_run_are_refused(vision, ratio, match):
    """An image size that is not a whole number of patches, or a pixel-shuffle ratio that does not
    give whole tokens, is refused by the config (the InternVL loader failed later, or the token
    grid check rounded it away)."""
    import copy

    c = get_config("tiny")
    m = copy.deepcopy(c.mllm_config)
    m["vision_config"].update(vision)
    if ratio is not None:
        m["downsample_ratio"] = ratio
    with pytest.raises(ValueError, match=match):
        c.replace(mllm_config=m)


def test_unknown_config_name():
    with pytest.raises(ValueError, match="SPAR-1B"):
        get_config("SPAR-7B")


def _dtr_formula(hidden, layer_ids, w, tau, eps):
    H = hidden[list(layer_ids)].double()
    h = F.linear(hidden[layer_ids[-1]].double(), w["router.0.weight"].double(), w["router.0.bias"].double())
    logits = F.linear(F.silu(h), w["router.2.weight"].double(), w["router.2.bias"].double())
    p = torch.softmax(logits / tau, dim=-1)
    m = torch.einsum("nk,k,knd->nd", p, w["alpha"].double(), H)
    m = F.layer_norm(m, (m.shape[-1],), w["norm.weight"].double(), w["norm.bias"].double(), eps)
    return F.linear(m, w["proj.weight"].double(), w["proj.bias"].double())


@pytest.mark.parametrize("L1, N, D, layer_ids, tau", [(5, 37, 64, (1, 2, 4), 1.0), (25, 9, 90, (6, 12, 18, 24), 0.7),
                                                      (3, 1, 34, (2,), 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtr_matches_its_formula(L1, N, D, layer_ids, tau, dtype):
    shapes = dtr_param_shapes(D, len(layer_ids), prefix="")
    w = {k: torch.randn(s) / (s[1] ** 0.5 if len(s) == 2 else 3) for k, s in shapes.items()}
    w["router.2.weight"] *= 10                                  # decisive softmax weights
    w["alpha"] = 1 + 0.3 * torch.randn(len(layer_ids))
    w["norm.weight"] = 1 + 0.1 * torch.randn(D)
    hidden = torch.randn(L1, N, D) * torch.linspace(0.5, 3, L1)[:, None, None]
    ref = _dtr_formula(hidden, layer_ids, w, tau, 1e-5)
    dtr = DynamicTokenRouting({k: v.to(dtype) for k, v in w.items()}, layer_ids, tau=tau, eps=1e-5)
    out = dtr(hidden.to(dtype))
    assert out.dtype == dtype and out.shape == (N, D)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    rows = torch.tensor([N - 1, 0, N - 1])
    sub = dtr(hidden.to(dtype), rows=rows)
    torch.testing.assert_close(sub.float(), out[rows].float(), rtol=tol, atol=tol * ref.abs().max().item())
    buf = torch.empty(N, D, dtype=dtype)
    assert dtr(hidden.to(dtype), out=buf) is buf and torch.allclose(buf, out)


def test_dtr_bad_inputs():
    w = {k: torch.randn(s) for k, s in dtr_param_shapes(16, 2, prefix="").items()}
    with pytest.raises(ValueError, match="layer_ids"):
        DynamicTokenRouting(w, [])
    dtr = DynamicTokenRouting(w, [1, 3])
    with pytest.raises(ValueError, match="hidden"):
        dtr(torch.randn(3, 4, 16))  # only 3 hidden states, layer 3 routed
