"""The execution engine (spar_runtime/engine.py, fp8.py): static plans against eager runs, the
no-host-sync promise on an existing plan, FP8 W8A8 linears."""

import collections
import hashlib
import json
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spar_runtime import SparPipeline
from spar_runtime.engine import BUCKET
from spar_runtime.fp8 import Fp8Weight

aten = torch.ops.aten


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def eager():
    return SparPipeline.random("tiny", seed=1, graphs=False)


@pytest.fixture(scope="module")
def planned():
    return SparPipeline.random("tiny", seed=1, graphs=True)


class OpTrace(TorchDispatchMode):
    """Counts aten/spar ops; records host syncs (scalar reads, nonzero, boolean-mask indexing,
    equal) with the code that caused them."""

    SYNC = {aten._local_scalar_dense, aten.item, aten.nonzero, aten.masked_select, aten.equal, aten.is_nonzero}
    MASKED = {aten.index, aten.index_put, aten.index_put_}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        p = func.overloadpacket
        self.ops[str(p)] += 1
        masked = p in self.MASKED and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                          for i in (args[1] or []))
        if p in self.SYNC or masked:
            self.syncs.append((str(func), traceback.extract_stack()[:-1]))
        return func(*args, **(kwargs or {}))


def _only_cpu_range_checks(syncs):
    """Syncs left after dropping the index range checks spar_kernels runs on CPU tensors only
    (``_validate.check_index_range`` returns at once for CUDA tensors: no sync on a GPU)."""
    return [(op, st) for op, st in syncs if not any(f.name == "check_index_range" for f in st)]


def test_plan_matches_eager_and_is_shared_within_a_bucket(eager, planned):
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 32, 8, 8, generator=gen)
    uncond = torch.randint(0, 256, (5,), generator=gen)
    before = planned.graph_cache_info()
    # prompt + 8 queries: 11 and 48 tokens, one 64-token bucket
    for n in (3, 40):
        ids = torch.randint(0, 256, (n,), generator=gen)
        want = eager.generate_latents([ids], uncond_ids=uncond, noise=noise, num_steps=4)
        got = planned.generate_latents([ids], uncond_ids=uncond, noise=noise, num_steps=4)
        assert got.dtype == torch.float32 and got.shape == noise.shape
        assert rel(got, want) <= 1e-5
    info = planned.graph_cache_info()
    assert info["plans"] - before["plans"] == 1, info
    assert info["replays"] - before["replays"] == 8, info
    assert {k: eager.graph_cache_info()[k] for k in ("plans", "replays")} == {"plans": 0, "replays": 0}


@pytest.mark.parametrize("sampler, guidance", [("euler", 1.0), ("dpmsolver++2m", 0.5)])
def test_plan_batch_and_guidance_without_fused_cfg(eager, planned, sampler, guidance):
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 32, 6, 8, generator=gen)
    prompts = [torch.randint(0, 256, (n,), generator=gen) for n in (2, 61)]  # 10 and 69 tokens: slot 128
    unconds = [torch.randint(0, 256, (4,), generator=gen), []]
    want = eager.generate_latents(prompts, uncond_ids=unconds, noise=noise, num_steps=3, sampler=sampler,
                                  guidance=guidance)
    got = planned.generate_latents(prompts, uncond_ids=unconds, noise=noise, num_steps=3, sampler=sampler,
                                   guidance=guidance)
    assert rel(got, want) <= 1e-5


def test_plan_runs_the_llm_and_connector_on_the_true_tokens(monkeypatch):
    """Only the DiT's context K/V are slot-shaped: the LLM, DTR and connector see the packed true
    tokens of each call (no padding rows), in a plan shared by prompts of different lengths."""
    from spar_runtime.qwen2 import DecoderStack

    pipe = SparPipeline.random("tiny", seed=3, graphs=True)
    names = {id(pipe.mllm.lm.model): "llm", id(pipe.connector): "connector"}
    rows = {"llm": [], "connector": []}
    forward = DecoderStack.forward

    def spy(self, x, *args, **kw):
        rows[names[id(self)]].append(x.shape[0])
        return forward(self, x, *args, **kw)
    monkeypatch.setattr(DecoderStack, "forward", spy)
    monkeypatch.setattr(DecoderStack, "__call__", spy)
    Q = pipe.config.num_queries
    noise = torch.randn(2, 32, 4, 4)
    for call, lens in enumerate(((3, 20), (30, 1))):
        pipe.generate_latents([[5] * n for n in lens], uncond_ids=[[6] * 2, []], noise=noise, num_steps=1)
        # the unconditional rows' K/V stay in their slots after the first call
        want = sum(lens) + 2 * Q + (2 + 2 * Q if call == 0 else 0)
        assert rows["llm"][-1] == want and rows["connector"][-1] == want, rows
        plan, = pipe.engine.plans.values()   # the call's layouts: device tensors = their host intervals
        for lay in (plan.causal, plan.bidirectional, plan.cross):
            host = lay.host_intervals()
            dev = (lay.cu_seqlens_q, lay.cu_seqlens_k, lay.kv_start, lay.kv_end)
            assert [t.tolist() for t in dev] == [h.tolist() for h in host]
    assert pipe.graph_cache_info()["plans"] == 1


def test_plan_reuses_context_slots_and_matches_eager(eager):
    """A row whose slot holds its ids from the last call (the unconditional prompt, call after
    call) or whose ids another row of the call has is not run through the LLM again: results
    equal eager's in every such case, and a changed row is recomputed."""
    planned = SparPipeline.random("tiny", seed=1, graphs=True)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 32, 8, 8, generator=gen)
    ids = lambda n: torch.randint(0, 256, (n,), generator=gen)   # noqa: E731
    a, b, c, u, v = ids(7), ids(12), ids(3), ids(5), ids(9)
    calls = [  # (prompts, uncond_ids, rows computed by the plan)
        ([a, b], u, 3),            # u twice: computed once, copied into the second slot
        ([c, b], u, 1),            # b and both u kept in their slots: only c
        ([b, c], u, 2),            # b and c swap slots: recomputed (a slot holds its own row's ids)
        ([b, c], v, 1),            # a new negative prompt: computed once for two slots
        ([u, v], [v, u], 1),       # slots b c v v -> u v v u: v kept / copied, u computed once, copied
        ([u, u], [u, u], 0),       # every row's ids held somewhere: no LLM run at all
    ]
    for prompts, uncond, computed in calls:
        before = planned.engine.plans and next(iter(planned.engine.plans.values())).rows_encoded or 0
        want = eager.generate_latents(prompts, uncond_ids=uncond, noise=noise, num_steps=2)
        got = planned.generate_latents(prompts, uncond_ids=uncond, noise=noise, num_steps=2)
        plan, = planned.engine.plans.values()
        assert plan.rows_encoded - before == computed, (prompts, uncond)
        assert rel(got, want) <= 1e-5


def test_staged_int32_words_round_trip():
    import numpy as np

    from spar_runtime.engine import _int32_words

    for n in (0, 1, 2, 7):
        a = np.arange(-3, n - 3, dtype=np.int64) * 1000003
        w = torch.from_numpy(_int32_words(a))
        assert w.dtype == torch.int64 and w.numel() == (n + 1) // 2
        assert w.view(torch.int32)[:n].tolist() == a.tolist()


def test_plan_keys():
    pipe = SparPipeline.random("tiny", seed=2, graphs=True)
    noise = torch.randn(1, 32, 8, 8)
    run = lambda ids, **kw: pipe.generate_latents([ids], uncond_ids=[1], noise=kw.pop("noise", noise),  # noqa: E731
                                                  num_steps=kw.pop("num_steps", 1), **kw)
    run([1] * (BUCKET - 8))                      # 64 tokens: bucket 64
    run([2] * 3)
    assert pipe.graph_cache_info()["plans"] == 1
    run([1] * (BUCKET - 7))                      # 65 tokens: bucket 128
    assert pipe.graph_cache_info()["plans"] == 2
    run([2] * 3, num_steps=2)
    run([2] * 3, noise=torch.randn(1, 32, 4, 4))
    run([2] * 3, sampler="euler")
    info = pipe.graph_cache_info()
    assert (info["plans"], info["replays"]) == (5, 1 + 1 + 1 + 2 + 1 + 1)


def test_no_host_sync_on_an_existing_plan(planned):
    noise = torch.randn(1, 32, 8, 8)
    planned.generate_latents([[1, 2, 3]], uncond_ids=[4, 5], noise=noise, num_steps=2)
    plans = planned.graph_cache_info()["plans"]
    # new ids in every row, then a new prompt with the same negative prompt (its slot is kept),
    # then the negative prompt as the prompt too (a slot copied, nothing encoded)
    for prompt, uncond in (([7, 8, 9, 10, 11], [6]), ([12, 13], [6]), ([6], [6])):
        with OpTrace() as trace:
            planned.generate_latents([prompt], uncond_ids=uncond, noise=noise, num_steps=2)
        assert planned.graph_cache_info()["plans"] == plans
        left = _only_cpu_range_checks(trace.syncs)
        assert not left, "host syncs:\n" + "\n".join(f"{op} at\n{''.join(st.format()[-4:])}" for op, st in left)
        # the trace saw the loop (the same call ran through the dispatcher)
        assert trace.ops["spar.flow_sampler_step"] == 2


def test_describe_static_decode_same_tokens(eager, planned):
    S = eager.mllm.vision.cfg.image_size[0]
    pv = torch.randn(1, 3, S, S)
    ids = [1] + [eager.mllm.image_token_id] * eager.mllm.image_seq_length + [5, 6, 7]
    want = eager.describe(pv, ids, max_new_tokens=11)
    got = planned.describe(pv, ids, max_new_tokens=11)
    assert got == want and len(want) >= 1
    info = planned.graph_cache_info()
    assert info["decode_plans"] == 1 and info["decode_steps"] >= len(want) - 1
    again = planned.describe(pv, ids, max_new_tokens=9)              # same capacity bucket: plan reused
    assert again == want[:len(again)]
    assert planned.graph_cache_info()["decode_plans"] == 1


def test_graph_args_are_checked():
    with pytest.raises(TypeError, match="graphs"):
        SparPipeline.random("tiny", graphs="yes")
    with pytest.raises(ValueError, match="quantization"):
        SparPipeline.random("tiny", quantization="int4")


# ---------------------------------------------------------------------------------------------
# FP8

@pytest.fixture(scope="module")
def fp8():
    return SparPipeline.random("tiny", seed=1, graphs=False, quantization="fp8")


def test_fp8_every_linear_within_6_percent(eager, fp8):
    weights = {name: (o[k] if isinstance(o, dict) else getattr(o, k)) for name, o, k in eager._linear_slots()}
    assert len(fp8.quantized) >= 40
    for prefix in ("mllm.", "connector.", "dtr.", "projector.", "dit.blocks.0.w_inv", "dit.blocks.1.w_pt"):
        assert any(n.startswith(prefix) for n in fp8.quantized), prefix
    gen = torch.Generator().manual_seed(0)
    for name, q in fp8.quantized.items():
        assert isinstance(q, Fp8Weight) and q.q.dtype == torch.float8_e4m3fn and q.scale.shape == (1, q.shape[0])
        x = torch.randn(37, q.shape[1], generator=gen)
        want = x @ weights[name].t()
        assert rel(q(x), want) <= 0.06, name


def test_fp8_latent_close_to_fp32(eager, fp8):
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 32, 8, 8, generator=gen)
    ids = torch.randint(0, 256, (20,), generator=gen)
    want = eager.generate_latents([ids], uncond_ids=[1, 2], noise=noise, num_steps=8)
    got = fp8.generate_latents([ids], uncond_ids=[1, 2], noise=noise, num_steps=8)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert float(cos) >= 0.98


def test_fp8_scaled_mm_does_the_dit_linear_work(fp8):
    dit = fp8.dit
    ctx = dit.prepare_context(torch.randn(12, dit.config.caption_channels), [5, 7])
    x = torch.randn(2, 32, 8, 8)
    with OpTrace() as trace:
        dit(x, torch.tensor([500, 500]), ctx)
    per_block = 7        # qkv, out, cross q, cross out, conv_inverted, conv_point, ... (k/v are in ctx)
    assert trace.ops["aten._scaled_mm"] >= per_block * dit.config.num_layers
    # what stays unquantized: none of the blocks' GEMMs
    assert trace.ops["aten.mm"] + trace.ops["aten.addmm"] + trace.ops["aten.linear"] <= 3


def test_fp8_refused_without_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # an A100, as far as the checks see
    with pytest.raises(ValueError, match="quantization: 'fp8' needs FP8 tensor cores"):
        SparPipeline.random("tiny", device="cuda", quantization="fp8")


def test_fp8_checkpoint_unchanged(tmp_path):
    from _spar_ckpt import build_checkpoint

    ck = build_checkpoint(str(tmp_path / "ck"), "tiny", seed=5, text_only=True)

    def digest():
        out = {}
        for root, _, files in os.walk(ck.path):
            for f in files:
                p = os.path.join(root, f)
                out[os.path.relpath(p, ck.path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
        return out

    before = digest()
    pipe = SparPipeline.from_pretrained(ck.path, device="cpu", quantization="fp8")
    assert pipe.quantized and all(q.q.dtype == torch.float8_e4m3fn for q in pipe.quantized.values())
    lat = pipe.generate_latents([[1, 2, 3]], uncond_ids=[4], noise=torch.randn(1, 32, 8, 8), num_steps=1)
    assert torch.isfinite(lat).all()
    assert digest() == before


# ---------------------------------------------------------------------------------------------
# the dry run on the simulated GPU

def test_dryrun_tiny_fp8_graphs_json(capsys):
    from spar_runtime import dryrun

    assert dryrun.main(["--config", "tiny", "--steps", "2", "--quantization", "fp8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"stages", "launches_per_dit_step", "syncs_in_loop", "peak_bytes"} <= set(r)
    assert list(r["stages"]) == ["prefill", "dtr", "connector", "dit_loop", "decode"]
    # the reported (second) call: no host sync anywhere, one staged copy of ids/intervals, the noise
    assert r["syncs_in_loop"] == 0 and all(s["syncs"] == 0 for s in r["stages"].values()), r["stages"]
    assert r["stages"]["prefill"]["h2d_copies"] == 1 and r["stages"]["dit_loop"]["h2d_copies"] == 1
    assert all(s["launches"] > 0 and s["peak_bytes"] > 0 for s in r["stages"].values())
    assert r["peak_bytes"] >= max(s["peak_bytes"] for s in r["stages"].values())
    loop = r["stages"]["dit_loop"]
    assert loop["graph_replays"] == 2 and loop["launches_per_graph"] == r["launches_per_dit_step"]
    assert loop["fp8_flops"] > 0 and loop["floor_ms"] > 0
    blocks = dryrun._configs.get_config("tiny").dit_config["num_layers"]
    assert r["launches_per_dit_step"] > blocks * r["launches_per_sana_block_step"]
    # the FP8 GEMMs' inputs come from the producing ops (fp8=True): issue 11's <= 16 per block
    assert r["launches_per_sana_block_step"] <= 16


def test_dryrun_tiny_bf16_eager_no_sync_in_loop():
    from spar_runtime.dryrun import dry_run

    r = dry_run("tiny", graphs=False, steps=2)
    assert r["graphs"] is False and r["syncs_in_loop"] == 0, r["loop_sync_sites"]
    assert r["launches_per_sana_block_step"] <= 16
    assert "graph_replays" not in r["stages"]["dit_loop"]


def test_dryrun_fp8_on_an_a100_is_refused(capsys):
    from spar_runtime import dryrun

    assert dryrun.main(["--config", "tiny", "--capability", "8.0", "--quantization", "fp8"]) == 2
    assert "needs FP8 tensor cores" in capsys.readouterr().err


def test_kv_cache_and_decode_plans_serve_calls_in_any_mode(eager):
    """A KV cache or decode plans first used under inference_mode keep working under no_grad:
    their lazily made state is made of normal tensors (an inference tensor cannot be written in
    place outside inference mode)."""
    from spar_runtime.engine import generate_tokens

    lm = eager.mllm.lm
    ids = torch.tensor([5, 17, 99, 3])

    def decode(cache, n_new=3):
        cache.reset()
        layout, pos = cache.append([ids.numel()])
        tok = lm.logits(lm.forward(lm.embed_tokens(ids), layout, pos, kv_cache=cache)[-1:]).argmax(-1)
        out = [int(tok)]
        cache.start_decode()
        for _ in range(n_new - 1):
            layout, pos = cache.decode_inputs()
            h = lm.forward(lm.embed_tokens(tok), layout, pos, kv_cache=cache)
            pos.add_(1)
            cache.advance()
            tok = lm.logits(h).argmax(-1)
            out.append(int(tok))
        return out

    cache = lm.new_cache(1, 16)
    with torch.inference_mode():
        first = decode(cache)
    with torch.no_grad():
        assert decode(cache) == first == decode(lm.new_cache(1, 16))
    plans, emb = {}, lm.embed_tokens(ids)

    def pick(logits):
        return logits.argmax(-1)

    with torch.inference_mode():
        a = generate_tokens(lm, emb, [4], 5, pick=pick, eos=(), plans=plans)
    with torch.no_grad():
        assert generate_tokens(lm, emb, [4], 5, pick=pick, eos=(), plans=plans) == a
