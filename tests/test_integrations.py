"""spar_runtime.integrations: patched transformers/diffusers models against the same models unpatched.

Oracles are the stock models themselves (tiny random configs built here, never downloaded) and,
for the mask mapping, transformers' own SDPA attention function on the same masks.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from _util import perturb as _perturb, rel as _rel  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from spar_kernels.testing import assert_close_fa  # noqa: E402
from spar_runtime import integrations as integ  # noqa: E402
from spar_runtime.configs import TINY  # noqa: E402
from spar_runtime.integrations import FlowStepScheduler, patch, unpatch  # noqa: E402
from spar_runtime.integrations import _hf_attention  # noqa: E402

REL = 1e-5


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail when the "spar" attention function hands a call to SDPA."""
    def fail(*args, **kwargs):
        raise AssertionError("spar attention fell back to SDPA")
    monkeypatch.setattr(_hf_attention, "_sdpa", fail)


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


QWEN = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=160, vocab_size=101, max_position_embeddings=256)


def _qwen(dtype=torch.float32, cls=None):
    cfg = transformers.Qwen2Config(**QWEN)
    model = (cls or transformers.Qwen2ForCausalLM)(cfg).eval()
    _perturb(model)
    return model.to(dtype)


def _padded_batch(left: bool, B: int = 3, T: int = 11):
    ids = torch.randint(1, QWEN["vocab_size"], (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate([0, 4, 1][:B]):
        if n:
            if left:
                mask[b, :n] = 0
            else:
                mask[b, T - n:] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# transformers: Qwen2

@pytest.mark.parametrize("use_cache", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
def test_qwen2_patched_matches_stock_fp32(no_fallback, left, use_cache):
    """With a cache the batch runs padded (4-D masks mapped to intervals); without one, unpadded
    (packed with cu_seq_lens); both against stock transformers with SDPA."""
    stock = _qwen()
    patched = patch(copy.deepcopy(stock))
    ids, mask = _padded_batch(left)
    with torch.no_grad():
        a = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=use_cache)
        b = patched(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=use_cache)
    keep = mask.bool()
    if not use_cache:
        assert torch.all(b.logits[~keep] == 0)       # padding positions: zeros when unpadded
    assert _rel(b.logits[keep], a.logits[keep]) < REL
    for i, (x, y) in enumerate(zip(b.hidden_states, a.hidden_states)):
        assert _rel(x[keep], y[keep]) < REL, f"hidden state {i}"
    assert patched.config._attn_implementation == "spar"


def test_qwen2_model_and_packed_position_ids(no_fallback):
    """Qwen2Model (no head); a packed row (position_ids restarting) vs each sequence alone."""
    stock = _qwen(cls=transformers.Qwen2Model)
    patched = patch(copy.deepcopy(stock))
    lens = [5, 7, 4]
    ids = torch.randint(1, QWEN["vocab_size"], (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        # no cache: transformers detects packing from position_ids only then
        a = stock(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        b = patched(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        alone = torch.cat([stock(input_ids=s).last_hidden_state for s in ids.split(lens, dim=1)], dim=1)
    assert _rel(b, a) < REL
    assert _rel(b, alone) < REL     # the packed sequences really are kept apart


def test_qwen2_bf16_flash_attention_rule(no_fallback):
    stock = _qwen()
    ref64 = copy.deepcopy(stock).double()
    base = copy.deepcopy(stock).to(torch.bfloat16)
    patched = patch(copy.deepcopy(stock).to(torch.bfloat16))
    ids, mask = _padded_batch(left=True)
    keep = mask.bool()
    with torch.no_grad():
        r = ref64(input_ids=ids, attention_mask=mask).logits[keep]
        a = base(input_ids=ids, attention_mask=mask).logits[keep]
        b = patched(input_ids=ids, attention_mask=mask).logits[keep]
    assert_close_fa(b.float(), a.float(), r, name="bf16 logits")


def test_qwen2_generate_same_greedy_tokens_left_padded(no_fallback):
    stock = _qwen()
    patched = patch(copy.deepcopy(stock))
    ids, mask = _padded_batch(left=True)
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    a = stock.generate(ids, **kw)
    b = patched.generate(ids, **kw)
    assert torch.equal(a, b)


def test_attn_implementation_spar_from_pretrained(no_fallback, tmp_path):
    """A real client unchanged: from_pretrained(attn_implementation="spar") + generate."""
    stock = _qwen()
    stock.save_pretrained(tmp_path)
    model = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, attn_implementation="spar").eval()
    assert model.config._attn_implementation == "spar"
    ids, mask = _padded_batch(left=True)
    kw = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), stock.generate(ids, **kw))


def test_unpatch_is_bit_identical():
    never = _qwen()
    model = copy.deepcopy(never)
    ids, mask = _padded_batch(left=True)
    patch(model)
    assert integ.is_patched(model)
    unpatch(model)
    assert not integ.is_patched(model)
    assert model.config._attn_implementation == never.config._attn_implementation
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           never(input_ids=ids, attention_mask=mask).logits)
    # a deep copy of a patched model is patched on its own: unpatching it leaves the original alone
    patch(model)
    twin = copy.deepcopy(model)
    unpatch(twin)
    assert integ.is_patched(model) and not integ.is_patched(twin)
    assert model.config._attn_implementation == "spar" != twin.config._attn_implementation


def test_qwen2_unpadded_inputs_embeds_and_position_ids(no_fallback):
    """The unpadded forward with inputs_embeds and explicit position_ids (gathered per kept token)."""
    stock = _qwen(cls=transformers.Qwen2Model)
    patched = patch(copy.deepcopy(stock))
    ids, mask = _padded_batch(left=True)
    emb = stock.embed_tokens(ids).detach()
    pos = (mask.cumsum(1) - 1).clamp(min=0)          # left padding: each prompt starts at position 0
    keep = mask.bool()
    with torch.no_grad():
        a = stock(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        b = patched(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    assert torch.all(b[~keep] == 0)
    assert _rel(b[keep], a[keep]) < REL


def test_qwen2_fused_qkv_follows_weight_updates(no_fallback):
    """The unpadded forward's q/k/v GEMM (concatenated weights) sees in-place weight updates."""
    stock = _qwen(cls=transformers.Qwen2Model)
    patched = patch(copy.deepcopy(stock))
    ids, mask = _padded_batch(left=False)
    keep = mask.bool()
    for step in range(2):
        with torch.no_grad():
            a = stock(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            b = patched(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        assert _rel(b[keep], a[keep]) < REL, step
        with torch.no_grad():
            for m in (stock, patched):
                m.layers[0].self_attn.k_proj.weight.mul_(1.5)
                m.layers[1].self_attn.q_proj.bias.add_(0.25)


def test_qwen2_patched_forward_host_syncs_on_fake_cuda(monkeypatch):
    """On a (simulated) GPU an unpadded forward reads device values once: the 2-D padding mask,
    whose kept-token count sizes the packed batch (none when the mask is on the host, as a
    tokenizer returns it). A padded forward with a cache maps its 4-D mask once (layer 0; the
    other layers reuse the layout): one sync from spar, besides transformers' own."""
    from spar_kernels.testing import fake_cuda
    from spar_runtime.integrations import _transformers

    model = patch(_qwen(cls=transformers.Qwen2Model))
    ids, mask = _padded_batch(left=False)
    host_mask = _transformers._host_mask
    # the simulated GPU reads back zeros: the read (and its sync) happens, with a GPU's values
    monkeypatch.setattr(_transformers, "_host_mask", lambda m: (host_mask(m), mask.numpy() != 0)[1])
    with fake_cuda() as rec, torch.no_grad():
        model.to("cuda")
        gids, gmask = ids.cuda(), mask.cuda()
        with rec.region("device mask"):
            out = model(input_ids=gids, attention_mask=gmask, use_cache=False).last_hidden_state
        with rec.region("host mask"):
            model(input_ids=gids, attention_mask=mask, use_cache=False)
        with rec.region("cache"):
            model(input_ids=gids, attention_mask=gmask, use_cache=True)
    assert out.shape == (*ids.shape, QWEN["hidden_size"]) and out.device.type == "cuda"
    syncs = rec.stats("device mask").syncs
    assert [(s.kind, s.stack[-1].name) for s in syncs] == [("d2h copy", "_host_mask")], syncs
    rec.assert_no_syncs("host mask")
    assert rec.stats("host mask").backends["hybrid_attention"]["triton"] == QWEN["num_hidden_layers"]
    ours = [s for s in rec.stats("cache").syncs if "spar_" in s.stack[-1].filename]
    assert [s.stack[-1].name for s in ours] == ["mask_intervals"], rec.stats("cache").syncs


# ---------------------------------------------------------------------------------------------
# transformers: InternVL

def _internvl():
    text = dict(QWEN, vocab_size=64)
    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, image_size=56,
                  patch_size=14, attention_bias=True, norm_type="rms_norm", use_qk_norm=True)
    cfg = transformers.InternVLConfig(vision_config=transformers.InternVLVisionConfig(**vision),
                                      text_config=transformers.Qwen2Config(**text), image_token_id=5,
                                      downsample_ratio=0.5, image_seq_length=4)
    model = transformers.InternVLForConditionalGeneration(cfg).eval()
    _perturb(model)
    return model


def test_internvl_patched_matches_stock_and_generates_same_tokens(no_fallback):
    stock = _internvl()
    patched = patch(copy.deepcopy(stock))
    pv = torch.randn(1, 3, 56, 56)
    ids = torch.cat([torch.randint(8, 64, (3,)), torch.full((4,), 5), torch.randint(8, 64, (5,))])[None]
    with torch.no_grad():
        a = stock(input_ids=ids, pixel_values=pv).logits
        b = patched(input_ids=ids, pixel_values=pv).logits
        fa = stock.model.get_image_features(pixel_values=pv).pooler_output
        fb = patched.model.get_image_features(pixel_values=pv).pooler_output
    assert patched.config.vision_config._attn_implementation == "spar"
    assert patched.config.text_config._attn_implementation == "spar"
    assert _rel(fb, fa) < REL
    assert _rel(b, a) < REL
    kw = dict(pixel_values=pv, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **kw), stock.generate(ids, **kw))
    unpatch(patched)
    with torch.no_grad():
        assert torch.equal(patched(input_ids=ids, pixel_values=pv).logits, a)


# ---------------------------------------------------------------------------------------------
# the "spar" attention function: mask mapping against SDPA

class _Attn(torch.nn.Module):
    def __init__(self, groups: int, causal: bool = True):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = causal


def _qkv(B, Hq, Hkv, Q, K, D=64):
    return torch.randn(B, Hq, Q, D), torch.randn(B, Hkv, K, D), torch.randn(B, Hkv, K, D)


def _check_against_sdpa(mask, B, Q, K, causal=True, **kwargs):
    q, k, v = _qkv(B, 4, 2, Q, K)
    mod = _Attn(2, causal)
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # a mapped mask must not take the fallback
        out, none = _hf_attention.spar_attention_forward(mod, q, k, v, mask, scaling=0.3, **kwargs)
    ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.3, **{k_: v_ for k_, v_ in kwargs.items()
                                                                         if not k_.startswith("cu_")})
    assert none is None and out.shape == (B, Q, 4, 64)
    if mask is not None:   # rows that see no key: SDPA's value is its own convention, spar's zeros
        m = mask if mask.dtype == torch.bool else mask == 0
        seen = m[:, 0].expand(B, Q, K).any(-1)
        assert torch.all(out[~seen] == 0)
        out, ref = out[seen], ref[seen]
    assert _rel(out, ref) < REL


def _bool_mask(fn, B, Q, K):
    i = torch.arange(Q)[:, None]
    j = torch.arange(K)[None, :]
    return torch.stack([fn(b, i, j) for b in range(B)])[:, None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_mapping_random_padding(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 23
    pads = torch.randint(0, T - 1, (B,), generator=g).tolist()
    left = _bool_mask(lambda b, i, j: (j <= i) & (j >= pads[b]), B, T, T)
    right = _bool_mask(lambda b, i, j: (j <= i) & (j < T - pads[b]), B, T, T)
    _check_against_sdpa(left, B, T, T)
    _check_against_sdpa(right, B, T, T)
    # the additive float form of the same mask
    _check_against_sdpa(torch.zeros(left.shape).masked_fill(~left, torch.finfo(torch.float32).min), B, T, T)
    # decode: one query row over a left-padded cache
    K = T + 5
    _check_against_sdpa(_bool_mask(lambda b, i, j: j >= pads[b], B, 1, K), B, 1, K)


def test_mask_mapping_packed_bidirectional_and_no_mask():
    lens = [6, 1, 9, 4]
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    T = sum(lens)
    packed = _bool_mask(lambda b, i, j: (seg[i] == seg[j]) & (j <= i), 1, T, T)
    _check_against_sdpa(packed, 1, T, T)
    prefix_lm = _bool_mask(lambda b, i, j: (j < 7) | (j <= i), 2, T, T)       # a bidirectional prefix
    _check_against_sdpa(prefix_lm, 2, T, T)
    _check_against_sdpa(None, 2, T, T, causal=True)
    _check_against_sdpa(None, 2, T, T, causal=False)
    _check_against_sdpa(None, 2, 7, 7, is_causal=False)
    # DataCollatorWithFlattening's kwargs on a batch of one: same result as the packed mask
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = _qkv(1, 4, 2, T, T)
    mod = _Attn(2)
    a, _ = _hf_attention.spar_attention_forward(mod, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                max_length_q=max(lens), max_length_k=max(lens))
    ref, _ = sdpa_attention_forward(mod, q, k, v, packed)
    assert _rel(a, ref) < REL
    # the fallback (here: float64) keeps the segments apart too
    with pytest.warns(UserWarning, match="float64"):
        a64, _ = _hf_attention.spar_attention_forward(mod, q.double(), k.double(), v.double(), None,
                                                      cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert _rel(a64, ref) < REL


def test_mask_mapping_non_interval_falls_back_and_warns_once():
    T = 9
    holes = _bool_mask(lambda b, i, j: (j <= i) & (j != i - 2), 2, T, T)    # a hole in the middle
    assert _hf_attention.mask_intervals(holes, 2, T, T) is None
    q, k, v = _qkv(2, 4, 2, T, T)
    mod = _Attn(2)
    _hf_attention._warned.clear()
    with pytest.warns(UserWarning, match="not one interval"):
        out, _ = _hf_attention.spar_attention_forward(mod, q, k, v, holes)
    ref, _ = sdpa_attention_forward(mod, q, k, v, holes)
    assert torch.equal(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _hf_attention.spar_attention_forward(mod, q, k, v, holes.clone())   # no second warning


# ---------------------------------------------------------------------------------------------
# diffusers: SANA DiT, DC-AE, SanaPipeline with FlowStepScheduler

SANA = dict(_clean(TINY.dit_config), num_attention_heads=2, attention_head_dim=32, num_cross_attention_heads=2,
            cross_attention_head_dim=32, cross_attention_dim=64, in_channels=8, out_channels=8)


def _sana(**extra):
    model = diffusers.SanaTransformer2DModel(**dict(SANA, **extra)).eval()
    _perturb(model)
    return model


def _dit_inputs(B=2, L=7, hw=8):
    x = torch.randn(B, SANA["in_channels"], hw, hw)
    ctx = torch.randn(B, L, SANA["caption_channels"])
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    return x, ctx, torch.tensor([937.0, 12.5])[:B], mask


@pytest.mark.parametrize("extra", [{}, dict(qk_norm="rms_norm_across_heads", norm_elementwise_affine=True,
                                            attention_bias=True, interpolation_scale=1.0)],
                         ids=["base", "options"])
def test_sana_dit_patched_matches_stock(extra):
    stock = _sana(**extra)
    patched = patch(copy.deepcopy(stock))
    x, ctx, t, mask = _dit_inputs()
    with torch.no_grad():
        a = stock(x, ctx, t, encoder_attention_mask=mask).sample
        b = patched(x, ctx, t, encoder_attention_mask=mask).sample
        c = patched(x, ctx, t, return_dict=False)[0]
        c_ref = stock(x, ctx, t, return_dict=False)[0]
    assert patched._spar_dit.obj is not None       # the runtime DiT ran (no fallback)
    assert _rel(b, a) < REL
    assert _rel(c, c_ref) < REL
    # the context work is kept between calls with the same tensors, and redone when they change
    with torch.no_grad():
        b1 = patched(x, ctx, t, encoder_attention_mask=mask).sample
        kept = patched._spar_dit.context[-1]
        assert torch.equal(patched(x, ctx, t, encoder_attention_mask=mask).sample, b1)
        assert patched._spar_dit.context[-1] is kept
        ctx.mul_(0.5)
        assert _rel(patched(x, ctx, t, encoder_attention_mask=mask).sample,
                    stock(x, ctx, t, encoder_attention_mask=mask).sample) < REL
        assert patched._spar_dit.context[-1] is not kept
    with torch.inference_mode():   # inference tensors have no version counter: compared by value
        xi, ci, ti, mi = (v.clone() for v in (x, ctx, t, mask))
        b1 = patched(xi, ci, ti, encoder_attention_mask=mi).sample
        kept = patched._spar_dit.context[-1]
        ci.mul_(2.0)
        assert _rel(patched(xi, ci, ti, encoder_attention_mask=mi).sample,
                    stock(xi, ci, ti, encoder_attention_mask=mi).sample) < REL
        assert patched._spar_dit.context[-1] is not kept
    # a weight change after patching is picked up
    with torch.no_grad():
        for m in (stock, patched):
            m.transformer_blocks[0].ff.conv_point.weight.mul_(1.5)
        assert _rel(patched(x, ctx, t).sample, stock(x, ctx, t).sample) < REL


def test_sana_dit_bf16_rule_and_unpatch():
    stock = _sana()
    x, ctx, t, mask = _dit_inputs()
    base = copy.deepcopy(stock).to(torch.bfloat16)
    patched = patch(copy.deepcopy(stock).to(torch.bfloat16))
    with torch.no_grad():
        r = copy.deepcopy(stock).double()(x.double(), ctx.double(), t, encoder_attention_mask=mask).sample
        a = base(x.bfloat16(), ctx.bfloat16(), t, encoder_attention_mask=mask).sample
        b = patched(x.bfloat16(), ctx.bfloat16(), t, encoder_attention_mask=mask).sample
    assert b.dtype == a.dtype == torch.bfloat16
    assert_close_fa(b.float(), a.float(), r, name="bf16 DiT output")
    unpatch(patched)
    with torch.no_grad():
        assert torch.equal(patched(x.bfloat16(), ctx.bfloat16(), t, encoder_attention_mask=mask).sample, a)


def test_dcae_patched_matches_stock():
    stock = diffusers.AutoencoderDC(**_clean(TINY.vae_config)).eval()
    _perturb(stock)
    patched = patch(copy.deepcopy(stock))
    z = torch.randn(2, TINY.vae_config["latent_channels"], 4, 4)
    with torch.no_grad():
        a = stock.decode(z).sample
        b = patched.decode(z).sample
    assert patched.decoder._spar_decoder.obj is not None
    assert _rel(b, a) < REL
    unpatch(patched)
    with torch.no_grad():
        assert torch.equal(patched.decode(z).sample, a)


def _schedulers():
    return {"euler": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            "dpm": diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                         prediction_type="flow_prediction")}


@pytest.mark.parametrize("sched", ["euler", "dpm"])
def test_sana_pipeline_end_to_end(sched):
    """diffusers' SanaPipeline, unchanged, from tiny components with prompt_embeds passed in."""
    torch.manual_seed(3)
    vae = diffusers.AutoencoderDC(**dict(_clean(TINY.vae_config), latent_channels=SANA["in_channels"])).eval()
    stock_sched = _schedulers()[sched]
    pipe = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=_sana(),
                                  scheduler=stock_sched)
    pipe.set_progress_bar_config(disable=True)
    L, C = 6, SANA["caption_channels"]
    neg_mask = torch.ones(1, L, dtype=torch.long)
    neg_mask[0, 3:] = 0
    kw = dict(prompt_embeds=torch.randn(1, L, C), prompt_attention_mask=torch.ones(1, L, dtype=torch.long),
              negative_prompt=None, negative_prompt_embeds=torch.randn(1, L, C),
              negative_prompt_attention_mask=neg_mask, height=32, width=32, num_inference_steps=3,
              guidance_scale=4.5, output_type="pt", use_resolution_binning=False)
    a = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    patch(pipe)
    pipe.scheduler = FlowStepScheduler.from_scheduler(pipe.scheduler)
    assert isinstance(pipe.scheduler, type(stock_sched)) and isinstance(pipe.scheduler, FlowStepScheduler)
    b = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert pipe.scheduler._spar["sampler"] is not None      # the fused step ran
    assert _rel(b, a) < REL
    unpatch(pipe)
    pipe.scheduler = stock_sched
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kw).images, a)


@pytest.mark.parametrize("sched", ["euler", "dpm"])
def test_flow_step_scheduler_matches_step_by_step(sched):
    stock = _schedulers()[sched]
    fused = FlowStepScheduler.from_scheduler(stock)
    for s in (stock, fused):
        s.set_timesteps(6)
    x = torch.randn(2, 4, 5, 3)
    xa, xb = x.clone(), x.clone()
    for t in stock.timesteps:
        v = torch.randn_like(x)
        out_a = stock.step(v, t, xa)
        out_b = fused.step(v, t, xb)
        assert type(out_a) is type(out_b)
        xa, xb = out_a.prev_sample, out_b.prev_sample
        assert _rel(xb, xa) < REL
        assert fused.step_index == stock.step_index
    tup = FlowStepScheduler.from_scheduler(stock)
    tup.set_timesteps(3)
    assert isinstance(tup.step(torch.randn_like(x), tup.timesteps[0], x, return_dict=False), tuple)


# ---------------------------------------------------------------------------------------------
# errors

def test_errors():
    with pytest.raises(TypeError, match="Qwen2ForCausalLM.*SanaTransformer2DModel.*AutoencoderDC"):
        patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch("model")
    model = patch(_qwen())
    with pytest.raises(ValueError, match="already patched"):
        patch(model)
    unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        FlowStepScheduler.from_scheduler(diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        FlowStepScheduler.from_scheduler(diffusers.DPMSolverMultistepScheduler())
    with pytest.raises(ValueError, match="guidance_embeds"):
        patch(_sana(guidance_embeds=True))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_spar_attention_maps_a_mask_written_in_place_again(mode):
    """The layout of a 4-D mask is kept by mask object; a mask written in place between forwards
    (its version counter, or for an inference tensor its values, tell) is mapped again."""
    import copy

    import transformers

    from spar_runtime.integrations import patch

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=96, vocab_size=101, max_position_embeddings=128)
    stock = transformers.Qwen2ForCausalLM(cfg).eval()
    patched = patch(copy.deepcopy(stock))
    T = 8
    ids = torch.randint(1, 101, (1, T))
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None].clone()
        torch.testing.assert_close(patched(ids, attention_mask=mask, use_cache=False).logits,
                                   stock(ids, attention_mask=mask, use_cache=False).logits, atol=1e-5, rtol=1e-5)
        mask[..., :3] = False                  # the same object, new values: keys 0..2 hidden
        mask[..., 3:, 3:] = torch.tril(torch.ones(T - 3, T - 3, dtype=torch.bool))
        mask[..., :3, 0] = True
        torch.testing.assert_close(patched(ids, attention_mask=mask, use_cache=False).logits,
                                   stock(ids, attention_mask=mask, use_cache=False).logits, atol=1e-5, rtol=1e-5)


def test_a_dpm_solver_converted_mid_run_continues_with_its_history():
    """The stock DPM-Solver++'s history (model_outputs) is not the fused sampler's: a scheduler
    converted after a step finishes that run with the stock step (it restarted at first order,
    ~5e-2 off), and the next run is fused again."""
    import copy

    import diffusers

    from spar_runtime.integrations import FlowStepScheduler

    stock = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                  prediction_type="flow_prediction")
    stock.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=g)
    vs = [torch.randn(1, 4, 4, 4, generator=g) for _ in range(6)]
    for k in range(2):
        x = stock.step(vs[k], stock.timesteps[k], x).prev_sample
    fused, ref = FlowStepScheduler.from_scheduler(stock), copy.deepcopy(stock)
    xa, xb = x.clone(), x.clone()
    for k in range(2, 6):
        xa = ref.step(vs[k], ref.timesteps[k], xa).prev_sample
        xb = fused.step(vs[k], fused.timesteps[k], xb).prev_sample
        torch.testing.assert_close(xb, xa, atol=1e-5, rtol=1e-5)
    for s in (fused, ref):                              # a new run: fused from its first step
        s.set_timesteps(6)
    xa, xb = x.clone(), x.clone()
    for k in range(6):
        xa = ref.step(vs[k], ref.timesteps[k], xa).prev_sample
        xb = fused.step(vs[k], fused.timesteps[k], xb).prev_sample
        assert fused._spar["sampler"] is not None
        torch.testing.assert_close(xb, xa, atol=1e-4, rtol=1e-4)


def test_patched_sana_sees_a_replaced_submodule():
    """The runtime DiT is rebuilt when a submodule is replaced (model.proj_out = nn.Linear(...)),
    not only when a parameter changes in place."""
    import copy

    import diffusers

    from spar_runtime.configs import TINY
    from spar_runtime.integrations import patch

    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY.dit_config.items() if not k.startswith("_")}
    stock = diffusers.SanaTransformer2DModel(**cfg).eval()
    for p in stock.parameters():
        torch.nn.init.normal_(p, std=0.05)
    patched = patch(copy.deepcopy(stock))
    x, ctx, t = torch.randn(1, cfg["in_channels"], 8, 8), torch.randn(1, 5, cfg["caption_channels"]), torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(patched(x, ctx, t).sample, stock(x, ctx, t).sample, atol=1e-5, rtol=1e-4)
        torch.manual_seed(1)
        new = torch.nn.Linear(stock.proj_out.in_features, stock.proj_out.out_features)
        torch.nn.init.normal_(new.weight, std=0.05)
        stock.proj_out, patched.proj_out = new, copy.deepcopy(new)
        torch.testing.assert_close(patched(x, ctx, t).sample, stock(x, ctx, t).sample, atol=1e-5, rtol=1e-4)


def test_mask_stamps_never_compare_device_values():
    """The attention checks its cached mask at every layer: an inference-mode mask off the CPU is
    kept by identity (no value comparison, which would sync the host), one on the CPU by value,
    a normal tensor by its version counter."""
    from spar_runtime.integrations._stamp import stamp, unchanged

    with torch.inference_mode():
        dev = torch.ones(4, 4, device="meta")
        cpu = torch.ones(4, 4)
    assert stamp(dev, by_value=False) == ("identity", None) and unchanged(dev, stamp(dev, by_value=False))
    st = stamp(cpu, by_value=False)
    assert st[0] == "copy" and unchanged(cpu, st)
    with torch.inference_mode():
        cpu[0, 0] = 0
    assert not unchanged(cpu, st)
    t = torch.ones(3)
    st = stamp(t, by_value=False)
    t.add_(1)
    assert st[0] == "version" and not unchanged(t, st)
