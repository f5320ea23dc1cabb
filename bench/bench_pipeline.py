"""spar_runtime's SparPipeline against the reference composition, per stage and in total.

The reference composition is the one the tests check spar_runtime against (tests/_spar_ckpt.py):
transformers' Qwen2 LLM with ``output_hidden_states`` and a Qwen2Model connector (zero 4-D mask,
bidirectional), the DTR formula in plain torch, diffusers' SanaTransformer2DModel driven by
DPMSolverMultistepScheduler (flow sigmas), AutoencoderDC's decoder; one sequence at a time without
padding, the DiT's cross-attention K/V recomputed at every step. Both sides hold the same weights.

Stages: prefill (LLM, all hidden states), dtr, connector (+ projector), dit_loop (context
preparation + every step), decode (DC-AE), total (generate_latents + decode).

Models:
- ``tiny``: spar_runtime.configs' tiny (2 images, prompts of 7 / 12 tokens, 8 queries, 8x8 latent).
- ``SPAR-1B-shaped``: SPAR-1B widths (Qwen2.5-0.5B LLM, SANA-0.6B DiT, DC-AE f32c32, 256 queries,
  16x16 latent = 512 px) with FEWER LAYERS so that it runs on a CPU in seconds: LLM 4 of 24 layers,
  connector 2 of 6, DiT 4 of 28 blocks, DC-AE decoder 1 layer per stage instead of 3, vocabulary
  32000 (embedding lookup only), text-only MLLM (the vision tower is not on the text-to-image path),
  20 solver steps (``--steps 4`` for a faster run); one image: a CFG batch of 2 rows of 330 and 276
  tokens. The bench also prints a projection to the full-size model (each stage scaled by its
  layers x steps ratio), labeled as an estimate.

Run ``python -m bench.bench_pipeline`` (add ``--quick`` for tiny only) for the per-stage table with
accuracy (latent relative error vs the reference, bf16 vs fp32); ``python -m bench --only pipeline``
runs the same stages through the common harness.

The execution engine (spar_runtime/engine.py), with ``--engine``: per model, fp32 on the CPU,
``generate_latents`` eager (``graphs=False``) against the static plan (``graphs=True``: on a CPU
the captured step is called directly), interleaved; kernel launches per DiT step and per SANA
block, eager vs plan, counted from the dispatch trace; FP8 weight memory of the quantized linears
against bf16. ``--dryrun`` adds ``python -m spar_runtime.dryrun`` on the full SPAR-1B config
(simulated H100: launches per step and block, syncs in the loop, peak memory, modeled floor), bf16
and FP8, graphs on.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import functools
import importlib.util
import itertools
import json
import os
import sys
import time

import torch

from bench.harness import Case, Unavailable, device_name, time_interleaved

_HERE = os.path.dirname(os.path.abspath(__file__))
_TESTS = os.path.join(os.path.dirname(_HERE), "tests")
STAGES = ("prefill", "dtr", "connector", "dit_loop", "decode", "total")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ref_module():
    """tests/_spar_ckpt.py: the reference composition shared with the tests."""
    mod = sys.modules.get("_spar_ckpt")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_spar_ckpt", os.path.join(_TESTS, "_spar_ckpt.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_spar_ckpt"] = mod
        spec.loader.exec_module(mod)
    return mod


@dataclasses.dataclass(frozen=True)
class Model:
    label: str
    prompt_lens: tuple[int, ...]     # one conditional prompt per image
    uncond_len: int
    latent: int
    steps: int
    note: str
    # per-stage factors from this model to the full-size one (layers x steps), for a labeled projection
    full_scale: dict | None = None


MODELS = {
    "tiny": Model("tiny", (7, 12), 4, 8, 4, "tiny config, 2 images, 4 steps"),
    "SPAR-1B-shaped": Model("SPAR-1B-shaped", (74,), 20, 16, 20,
                            "SPAR-1B widths, LLM 4/24 layers, connector 2/6, DiT 4/28 blocks, DC-AE decoder "
                            "1 layer/stage (of 3), vocab 32000, 1 image (CFG rows 330 + 276 tokens), 16x16 "
                            "latent, 20 steps",
                            full_scale={"prefill": 24 / 4, "dtr": 1.0, "connector": 6 / 2, "dit_loop": 28 / 4,
                                        "decode": 3.0, "steps": 20}),
}


def shrunk_config(name: str, mllm_config, layers: dict, **replace):
    """``tiny``, or SPAR-1B's widths with the DC-AE at one layer per stage, ``mllm_config(c)`` as
    the MLLM config, other fields ``replace``d, and the component layer counts ``layers``
    (:meth:`SparConfig.with_layers`)."""
    from spar_runtime.configs import get_config

    if name == "tiny":
        return get_config("tiny")
    c = get_config("SPAR-1B")
    vae = copy.deepcopy(c.vae_config)
    vae["decoder_layers_per_block"] = [1] * 6
    vae["encoder_layers_per_block"] = [1] * 6
    return c.replace(mllm_config=mllm_config(c), vae_config=vae, **replace).with_layers(**layers)


def _config(name: str):
    # text-only MLLM (no image tokenizer), vocabulary 32000
    return shrunk_config(name, lambda c: {**c.text_config, "vocab_size": 32000},
                         dict(llm_layers=4, connector_layers=2, dit_layers=4), tokenizer=None)


@functools.lru_cache(maxsize=None)
def _reference_fp32(name: str):
    torch.manual_seed(0)
    return _ref_module().build_reference(_config(name), seed=0, text_only=name != "tiny")


@functools.lru_cache(maxsize=None)
def _reference(name: str, dtype_name: str):
    ref = _reference_fp32(name)
    if dtype_name == "fp32":
        return ref
    dt = DTYPES[dtype_name]
    out = copy.copy(ref)
    out.mllm = copy.deepcopy(ref.mllm).to(dt)
    out.llm = out.mllm.model.language_model if ref.config.is_internvl else out.mllm.model
    out.connector = copy.deepcopy(ref.connector).to(dt)
    out.dit = copy.deepcopy(ref.dit).to(dt)
    out.vae = copy.deepcopy(ref.vae).to(dt)
    out.spar = {k: v.to(dt) for k, v in ref.spar.items()}
    return out


def pipeline_from_reference(ref, dtype: torch.dtype, *, copy: bool = False, **kwargs):
    """A CPU SparPipeline holding the reference's weights in ``dtype``, built from the modules' state
    dicts (no files); ``copy``: its own copies of the tensors even where ``dtype`` is theirs (FP8
    quantizes in place); ``kwargs`` go to SparPipeline (graphs=, quantization=)."""
    from spar_runtime.dcae import DCAEDecoder
    from spar_runtime.internvl import MLLM
    from spar_runtime.pipeline import SparPipeline
    from spar_runtime.sana import SanaDiT

    cfg = ref.config
    sd = lambda m: {k: v.detach().to(dtype, copy=copy) for k, v in m.state_dict().items()}  # noqa: E731
    mllm = MLLM(cfg.mllm_config, sd(ref.mllm))   # in-memory InternVL names are accepted too
    dit = SanaDiT(cfg.dit_config, sd(ref.dit))
    vae = DCAEDecoder(cfg.vae_config, {k[len("decoder."):]: v for k, v in sd(ref.vae).items() if k.startswith("decoder.")})
    return SparPipeline(cfg, mllm, ref.spar, dit, vae, device="cpu", dtype=dtype, **kwargs)


@functools.lru_cache(maxsize=None)
def _pipeline(name: str, dtype_name: str):
    return pipeline_from_reference(_reference_fp32(name), DTYPES[dtype_name])


@functools.lru_cache(maxsize=None)
def _inputs(name: str):
    m = MODELS[name]
    g = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in m.prompt_lens]
    uncond = torch.randint(0, 256, (m.uncond_len,), generator=g)
    noise = torch.randn(len(prompts), 32, m.latent, m.latent, generator=g)
    return prompts, uncond, noise


class _Stages:
    """Zero-argument callables per stage for spar and the reference, with every stage's input
    precomputed by the stage before it (same inputs on both sides)."""

    def __init__(self, name: str, dtype_name: str):
        m, mod = MODELS[name], _ref_module()
        self.pipe, self.ref = _pipeline(name, dtype_name), _reference(name, dtype_name)
        prompts, uncond, noise = _inputs(name)
        cfg = self.ref.config
        self.kw = dict(num_steps=m.steps, guidance=cfg.guidance, sampler="dpmsolver++2m", shift=cfg.flow_shift)
        B = len(prompts)
        self.seqs = prompts + [uncond] * B
        self.noise = noise
        with torch.inference_mode():
            self.state = self.pipe.prefill(self.seqs)
            self.routed = self.pipe.route(self.state)
            self.context = self.pipe.connect(self.routed, self.state)
            self.latent = self.pipe.denoise(self.context, self.state["lengths"], noise, **self.kw)
        self.ref_hs = [mod.reference_prefill(self.ref, s) for s in self.seqs]
        self.ref_routed = [mod.reference_dtr(self.ref, hs) for hs in self.ref_hs]
        self.ref_ctx = [mod.reference_connector(self.ref, r)[None] for r in self.ref_routed]

    def spar(self, stage: str):
        p, kw = self.pipe, self.kw

        def run():
            with torch.inference_mode():
                if stage == "prefill":
                    return p.prefill(self.seqs)
                if stage == "dtr":
                    return p.route(self.state)
                if stage == "connector":
                    return p.connect(self.routed, self.state)
                if stage == "dit_loop":
                    return p.denoise(self.context, self.state["lengths"], self.noise, **kw)
                if stage == "decode":
                    return p.decode(self.latent)
            lat = p.generate_latents(self.seqs[:len(self.noise)], uncond_ids=self.seqs[-1], noise=self.noise, **kw)
            return p.decode(lat)
        return run

    def reference(self, stage: str):
        mod, ref, kw, B = _ref_module(), self.ref, self.kw, len(self.noise)

        def run():
            if stage == "prefill":
                return [mod.reference_prefill(ref, s) for s in self.seqs]
            if stage == "dtr":
                return [mod.reference_dtr(ref, hs) for hs in self.ref_hs]
            if stage == "connector":
                return [mod.reference_connector(ref, r) for r in self.ref_routed]
            if stage == "dit_loop":
                return [mod.reference_denoise(ref, self.ref_ctx[b], self.ref_ctx[B + b], self.noise[b:b + 1], **kw)
                        for b in range(B)]
            if stage == "decode":
                return mod.reference_decode(ref, self.latent)
            lat = mod.reference_generate_latents(ref, self.seqs[:B], self.seqs[-1], self.noise, **kw)
            return mod.reference_decode(ref, lat)
        return run


@functools.lru_cache(maxsize=None)
def _stages(name: str, dtype_name: str) -> _Stages:
    return _Stages(name, dtype_name)


def cases(device: torch.device, quick: bool):
    """Harness cases: one per (model, dtype, stage), providers spar and reference (baseline)."""
    models = ["tiny"] if quick else list(MODELS)
    dtypes = ["fp32"] if quick else list(DTYPES)
    for name in models:
        for dt in dtypes:
            for stage in (("total",) if quick else STAGES):
                def spar(name=name, dt=dt, stage=stage):
                    if device.type != "cpu":
                        raise Unavailable("this bench builds its models on the CPU")
                    return _stages(name, dt).spar(stage)

                def reference(name=name, dt=dt, stage=stage):
                    if device.type != "cpu":
                        raise Unavailable("this bench builds its models on the CPU")
                    return _stages(name, dt).reference(stage)

                yield Case(op="pipeline", name=f"{name} {dt} {stage}", providers={"spar": spar, "reference": reference},
                           baseline="reference", note=MODELS[name].note)


# ---- standalone run: interleaved timing, accuracy, Markdown + JSON ----------------------------

def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run(models, dtypes, reps: int, warmup: int, clock=time.perf_counter) -> tuple[list[dict], list[dict]]:
    rows, acc = [], []
    for name in models:
        n_reps = reps if name == "tiny" else max(1, reps - 1)   # the 512 px DC-AE decode alone takes seconds
        latents = {}
        for dt in dtypes:
            st = _stages(name, dt)
            for stage in STAGES:
                # non-tiny models: _Stages already ran every stage but decode once on both sides
                # interleaved (reference, spar, reference, ...) so a noisy shared machine hits both alike
                t = time_interleaved({"reference": st.reference(stage), "spar": st.spar(stage)}, n_reps,
                                     warmup=warmup if name == "tiny" else 0, clock=clock)
                med, last = t.median(), t.last
                rows.append({"model": name, "dtype": dt, "stage": stage, "reference_ms": 1e3 * med["reference"],
                             "spar_ms": 1e3 * med["spar"], "speedup": med["reference"] / med["spar"],
                             "reps": n_reps})
                print(f"  {name} {dt} {stage}: reference {1e3 * med['reference']:.1f} ms, spar {1e3 * med['spar']:.1f} ms,"
                      f" {med['reference'] / med['spar']:.2f}x", flush=True)
                if stage == "dit_loop":   # the final latent, each side from its own conditioning
                    latents["spar", dt] = last["spar"].float()
                    latents["reference", dt] = torch.cat(last["reference"]).float()
        for dt in dtypes:
            acc.append({"model": name, "what": f"spar {dt} vs reference {dt}",
                        "rel_err": _rel(latents["spar", dt], latents["reference", dt])})
        if "fp32" in dtypes and "bf16" in dtypes:
            acc.append({"model": name, "what": "spar bf16 vs reference fp32",
                        "rel_err": _rel(latents["spar", "bf16"], latents["reference", "fp32"])})
            acc.append({"model": name, "what": "reference bf16 vs reference fp32",
                        "rel_err": _rel(latents["reference", "bf16"], latents["reference", "fp32"])})
    return rows, acc


# ---- the execution engine: plans vs eager, launches, FP8 memory, the simulated H100 -----------

def _variant(name: str, *, graphs: bool, quantization=None):
    """A new fp32 SparPipeline with the reference's weights (its own components: FP8 quantizes in place)."""
    return pipeline_from_reference(_reference_fp32(name), torch.float32, copy=True, graphs=graphs,
                                   quantization=quantization)


def _op_count(fn) -> int:
    """Kernel-launching ops of ``fn()`` in the dispatch trace (views and allocations excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.detach", "aten._unsafe_view"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and str(func.overloadpacket) not in free:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Count():
        fn()
    return Count.n


def engine_rows(models, reps: int, clock) -> list[dict]:
    """graphs=True vs eager end to end, launches per step / block, FP8 weight memory (fp32 CPU)."""
    rows = []
    for name in models:
        m = MODELS[name]
        prompts, uncond, noise = _inputs(name)
        kw = dict(uncond_ids=uncond, noise=noise, guidance=_config(name).guidance)
        eager, plan = _variant(name, graphs=False), _variant(name, graphs=True)
        # new prompt ids every call (two sets of the same lengths, alternating), the same negative
        # prompt: as in use, the plan keeps only the unconditional rows' context K/V between calls
        g = torch.Generator().manual_seed(99)
        sets = [prompts] + [[torch.randint(0, 256, (p.numel(),), generator=g) for p in prompts] for _ in range(3)]

        def generate(p, order):
            return p.generate_latents(next(order), num_steps=m.steps, **kw)
        gen = {"eager": functools.partial(generate, eager, itertools.cycle(sets[:2])),
               "graphs=True": functools.partial(generate, plan, itertools.cycle(sets[:2]))}
        t = time_interleaved(gen, reps, warmup=1, clock=clock)
        med, last = t.median(), t.last
        row = {"model": name, "eager_ms": 1e3 * med["eager"], "plan_ms": 1e3 * med["graphs=True"],
               "plan_vs_eager": med["eager"] / med["graphs=True"], "latent_rel": _rel(last["graphs=True"], last["eager"])}
        for label, p in (("eager", eager), ("plan", plan)):   # launches per DiT step: (3 steps - 1 step) / 2
            one, three = (_op_count(lambda n=n, i=i: p.generate_latents(sets[i], num_steps=n, **kw))
                          for n, i in ((1, 2), (3, 3)))   # fresh prompts: both calls encode the same rows
            row[f"{label}_launches_per_step"] = (three - one) / 2
        blk, dit = eager.dit.blocks[0], eager.dit
        N, B = (m.latent // dit.config.patch_size) ** 2, 2 * len(prompts)
        ctx = dit.prepare_context(torch.randn(B * 5, dit.config.caption_channels), [5] * B)
        hs, tm = torch.randn(B, N, dit.config.inner_dim), torch.randn(B, 6, dit.config.inner_dim)
        mod = blk.modulation(tm)
        row["launches_per_block"] = _op_count(lambda: blk(hs, mod, ctx.kv[0], ctx.layout(N), m.latent, m.latent))
        fp8 = _variant(name, graphs=False, quantization="fp8")
        fblk = fp8.dit.blocks[0]   # FP8 GEMM inputs from their producers (fp8=True): issue 11's <= 16
        row["fp8_launches_per_block"] = _op_count(lambda: fblk(hs, mod, ctx.kv[0], ctx.layout(N), m.latent, m.latent))
        q = fp8.quantized.values()
        row["fp8_weight_bytes"] = sum(w.nbytes for w in q)
        row["bf16_weight_bytes"] = sum(2 * w.shape[0] * w.shape[1] for w in q)
        rows.append(row)
        print(f"  engine {name}: eager {row['eager_ms']:.1f} ms, plan {row['plan_ms']:.1f} ms "
              f"({row['plan_vs_eager']:.2f}x), launches/step {row['eager_launches_per_step']:.0f} -> "
              f"{row['plan_launches_per_step']:.0f}, per block {row['launches_per_block']} "
              f"(FP8 {row['fp8_launches_per_block']})", flush=True)
    return rows


def dryrun_rows(steps: int | None) -> list[dict]:
    from spar_runtime.dryrun import dry_run

    out = []
    for quant in (None, "fp8"):
        r = dry_run("SPAR-1B", dtype=torch.bfloat16, quantization=quant, graphs=True, steps=steps)
        out.append(r)
        print(f"  dryrun SPAR-1B bf16 fp8={quant}: {r['launches_per_dit_step']:.0f} launches/step, "
              f"{r['launches_per_sana_block_step']:.1f}/block, syncs in loop {r['syncs_in_loop']}, "
              f"peak {r['peak_bytes'] / 2**30:.2f} GiB, floor {r['floor_ms_total']:.1f} ms", flush=True)
    return out


def engine_markdown(rows, dry) -> str:
    lines = ["## The execution engine (fp32, CPU)", "",
             "| model | eager ms | graphs=True ms | plan vs eager | latent rel. diff | launches/step eager | "
             "launches/step plan | launches/SANA block | FP8 / bf16 weight bytes (quantized linears) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['eager_ms']:.1f} | {r['plan_ms']:.1f} | {r['plan_vs_eager']:.2f}x | "
                     f"{r['latent_rel']:.1e} | {r['eager_launches_per_step']:.0f} | {r['plan_launches_per_step']:.0f} | "
                     f"{r['launches_per_block']} | {r['fp8_weight_bytes'] / 2**20:.1f} / "
                     f"{r['bf16_weight_bytes'] / 2**20:.1f} MiB ({r['fp8_weight_bytes'] / r['bf16_weight_bytes']:.1%}) |")
    if dry:
        lines += ["", "### SPAR-1B on a simulated H100 (python -m spar_runtime.dryrun; counts, and a MODELED floor)", "",
                  "| quantization | steps | launches/DiT step (inside the graph) | launches/SANA block | syncs in loop | "
                  "peak GiB | modeled floor ms |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in dry:
            lines.append(f"| {r['quantization'] or 'bf16'} | {r['steps']} | {r['launches_per_dit_step']:.0f} | "
                         f"{r['launches_per_sana_block_step']:.1f} | {r['syncs_in_loop']} | "
                         f"{r['peak_bytes'] / 2**30:.2f} | {r['floor_ms_total']:.1f} |")
    return "\n".join(lines) + "\n"


def markdown(rows, acc, dev: str, reps: int) -> str:
    lines = [f"# SparPipeline vs the reference composition ({dev})", "",
             f"{_dt.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, median of {reps} "
             "interleaved runs (SPAR-1B-shaped: one fewer, no warm-up beyond the setup's own run of each stage). These are CPU figures, measured on a shared machine.", ""]
    for name in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {name}: {MODELS[name].note}", "",
                  "| dtype | stage | reference ms | spar ms | speedup |", "|---|---|---:|---:|---:|"]
        for r in rows:
            if r["model"] == name:
                lines.append(f"| {r['dtype']} | {r['stage']} | {r['reference_ms']:.1f} | {r['spar_ms']:.1f} | "
                             f"{r['speedup']:.2f}x |")
        tot = {r["dtype"]: r for r in rows if r["model"] == name and r["stage"] == "total"}
        if "fp32" in tot and "bf16" in tot:
            lines.append(f"| bf16 spar vs fp32 reference | total | {tot['fp32']['reference_ms']:.1f} | "
                         f"{tot['bf16']['spar_ms']:.1f} | {tot['fp32']['reference_ms'] / tot['bf16']['spar_ms']:.2f}x |")
        scale = dict(MODELS[name].full_scale or {})
        if scale:
            steps_full = scale.pop("steps")
            scale["dit_loop"] *= steps_full / MODELS[name].steps
            lines += ["", "Projection to the full-size model (NOT a measurement): each stage's measured time "
                      f"times the ratio of layers x steps (prefill x6, connector x3, DiT loop x{scale['dit_loop']:g}, "
                      "decode about x3 for 3 layers per DC-AE stage, DTR x1):", "",
                      "| dtype | projected reference s | projected spar s | projected speedup |", "|---|---:|---:|---:|"]
            proj = {}
            for dt in dict.fromkeys(r["dtype"] for r in rows if r["model"] == name):
                st = {r["stage"]: r for r in rows if r["model"] == name and r["dtype"] == dt}
                ref_s = sum(st[k]["reference_ms"] * f for k, f in scale.items()) / 1e3
                spar_s = sum(st[k]["spar_ms"] * f for k, f in scale.items()) / 1e3
                proj[dt] = (ref_s, spar_s)
                lines.append(f"| {dt} | {ref_s:.1f} | {spar_s:.1f} | {ref_s / spar_s:.2f}x |")
            if "fp32" in proj and "bf16" in proj:
                lines.append(f"| bf16 spar vs fp32 reference | {proj['fp32'][0]:.1f} | {proj['bf16'][1]:.1f} | "
                             f"{proj['fp32'][0] / proj['bf16'][1]:.2f}x |")
        lines += ["", "| latent after the DiT loop | max abs err / max abs ref |", "|---|---:|"]
        lines += [f"| {a['what']} | {a['rel_err']:.2e} |" for a in acc if a["model"] == name]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_pipeline", description="SparPipeline vs reference, per stage")
    p.add_argument("--quick", action="store_true", help="tiny only, fp32, 3 reps")
    p.add_argument("--models", default=None, help=f"comma-separated among {list(MODELS)}")
    p.add_argument("--dtypes", default=None, help="comma-separated among fp32,bf16")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: process CPU time (with --threads 1: robust on a shared machine)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--steps", type=int, default=None, help="solver steps of the SPAR-1B-shaped model (default 20)")
    p.add_argument("--out", default=os.path.join(_HERE, "results"))
    p.add_argument("--engine", action="store_true", help="add the engine rows (plans vs eager, launches, FP8 memory)")
    p.add_argument("--engine-only", action="store_true", help="only the engine rows (skip the reference comparison)")
    p.add_argument("--dryrun", action="store_true", help="add SPAR-1B on the simulated H100 (minutes on a CPU)")
    args = p.parse_args(argv)
    if args.steps:
        m = MODELS["SPAR-1B-shaped"]
        MODELS["SPAR-1B-shaped"] = dataclasses.replace(m, steps=args.steps,
                                                       note=m.note.replace(f"{m.steps} steps", f"{args.steps} steps"))
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models.split(",") if args.models else (["tiny"] if args.quick else list(MODELS))
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32"] if args.quick else list(DTYPES))
    reps = args.reps or 3
    dev = device_name(torch.device("cpu"))
    print(f"bench_pipeline on {dev}: {models} {dtypes}, {reps} reps", flush=True)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        p.error("--clock cpu measures process CPU time: use it with --threads 1")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows, acc = ([], []) if args.engine_only else run(models, dtypes, reps, warmup=1, clock=clock)
    md = markdown(rows, acc, dev + (", process CPU time" if args.clock == "cpu" else ", wall time"), reps)
    eng = engine_rows(models, reps, clock) if (args.engine or args.engine_only) else []
    dry = dryrun_rows(args.steps) if args.dryrun else []
    if eng or dry:
        md += "\n" + engine_markdown(eng, dry)
    print()
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"pipeline-cpu-{stamp}")
    with open(base + ".md", "w") as f:
        f.write(md)
    with open(base + ".json", "w") as f:
        json.dump({"device": dev, "torch": torch.__version__, "reps": reps, "timings": rows, "accuracy": acc,
                   "engine": eng, "dryrun": dry,
                   "models": {k: dataclasses.asdict(v) for k, v in MODELS.items() if k in models}}, f, indent=1)
    print(f"wrote {base}.md, {base}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
