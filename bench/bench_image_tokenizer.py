"""SparPipeline.encode_image / reconstruct against the reference composition, batch 1 and 8.

The reference composition is the one tests/test_image_tokenizer.py checks spar_runtime against
(tests/_spar_ckpt.py): transformers' ``InternVLForConditionalGeneration.get_image_features``
(InternViT, pixel shuffle, projector), then the dual-stream tokenizer built from
``nn.TransformerEncoderLayer`` (its fused inference fast path runs under ``no_grad`` in eval
mode), ``nn.LayerNorm`` and ``nn.Linear``; reconstruct adds diffusers' ``AutoencoderDC.decode`` of
``latent / vae_scale_factor``. Both sides hold the same weights.

Models:
- ``tiny``: spar_runtime.configs' tiny (64 px images -> 8x8 tokens, 2 pixel layers).
- ``SPAR-1B-shaped``: SPAR-1B widths (InternViT-300M at 448 px: 1025 tokens of 1024; projector
  and tokenizer at D = 896 with 16 heads of 56, 256 tokens per image; DC-AE f32c32 decoding
  16x16x32 to 512 px) with FEWER LAYERS so that it runs on a CPU: InternViT 1 of 24 layers,
  tokenizer pixel stream 2 of 6 layers (3 MLP blocks per stream as in SPAR-1B), DC-AE decoder
  1 layer per stage instead of 3. (The LLM, connector and DiT are built but not on this path.)

Run ``python -m bench.bench_image_tokenizer --threads 1 --clock cpu`` (process CPU time of one
thread: robust on a shared machine) for the table; ``--quick`` for tiny only; ``python -m bench
--only image_tokenizer`` runs the encode cases through the common harness.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import functools
import json
import os
import sys
import time

import torch

from bench.bench_pipeline import _ref_module, pipeline_from_reference, shrunk_config
from bench.harness import Case, Unavailable, device_name, time_interleaved

_HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ("encode", "reconstruct")
BATCHES = (1, 8)
NOTES = {
    "tiny": "tiny config: 64 px images, 8x8 tokens, D 64, 2 pixel layers",
    "SPAR-1B-shaped": "SPAR-1B widths (InternViT-300M 448 px, D 896, 16 heads of 56, 16x16x32 latent, 512 px "
                      "DC-AE f32c32) with InternViT 1/24 layers, pixel stream 2/6 layers, DC-AE decoder "
                      "1 layer/stage (of 3)",
}


def _mllm_config(c) -> dict:
    mllm = copy.deepcopy(c.mllm_config)
    mllm["text_config"]["vocab_size"] = 32000      # the LLM is not on this path: keep its embedding small
    mllm["image_token_id"] = 31999
    return mllm


def _config(name: str):
    return shrunk_config(name, _mllm_config, dict(llm_layers=1, connector_layers=1, dit_layers=1, vision_layers=1,
                                                  pixel_layers=2))


@functools.lru_cache(maxsize=None)
def _reference_fp32(name: str):
    torch.manual_seed(0)
    return _ref_module().build_reference(_config(name), seed=0)


@functools.lru_cache(maxsize=None)
def _reference(name: str, dtype_name: str):
    ref = _reference_fp32(name)
    if dtype_name == "fp32":
        return ref
    out = copy.copy(ref)
    dt = DTYPES[dtype_name]
    out.mllm, out.vae, out.tokenizer = (copy.deepcopy(m).to(dt) for m in (ref.mllm, ref.vae, ref.tokenizer))
    return out


@functools.lru_cache(maxsize=None)
def _pipeline(name: str, dtype_name: str):
    return pipeline_from_reference(_reference_fp32(name), DTYPES[dtype_name])


@functools.lru_cache(maxsize=None)
def _pixels(name: str, batch: int) -> torch.Tensor:
    S = _config(name).mllm_config["vision_config"]["image_size"][0]
    return torch.randn(batch, 3, S, S, generator=torch.Generator().manual_seed(batch))


def providers(name: str, dtype_name: str, op: str, batch: int) -> dict:
    """Zero-argument callables for ``{"reference", "spar"}`` on the same pixels and weights."""
    mod, pipe, ref = _ref_module(), _pipeline(name, dtype_name), _reference(name, dtype_name)
    dt = DTYPES[dtype_name]
    pv = _pixels(name, batch)

    def reference():
        with torch.no_grad():
            z = mod.reference_encode_image(ref, pv.to(dt))
            return z if op == "encode" else mod.reference_decode(ref, z.float())

    def spar():
        with torch.inference_mode():
            return pipe.encode_image(pv) if op == "encode" else pipe.reconstruct(pv)
    return {"reference": reference, "spar": spar}


def cases(device: torch.device, quick: bool):
    """Harness cases (encode; reconstruct is in the standalone run): spar vs reference (baseline)."""
    todo = [("tiny", 1)] if quick else [(n, b) for n in NOTES for b in BATCHES]
    for name, batch in todo:
        def factory(provider, name=name, batch=batch):
            def make():
                if device.type != "cpu":
                    raise Unavailable("this bench builds its models on the CPU")
                return providers(name, "fp32", "encode", batch)[provider]
            return make

        yield Case(op="image_tokenizer", name=f"{name} encode fp32 batch {batch}",
                   providers={"spar": factory("spar"), "reference": factory("reference")}, baseline="reference",
                   note=NOTES[name])


# ---- standalone run: interleaved timing, accuracy, Markdown + JSON ----------------------------

def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run(models, dtypes, batches, ops, reps: int, warmup: int, clock) -> list[dict]:
    rows = []
    for name in models:
        for dt in dtypes:
            for op in ops:
                for batch in batches:
                    heavy = name != "tiny" and (op == "reconstruct" or batch > 1)   # seconds to minutes a call
                    n_reps, n_warm = (max(1, reps - 1), 0) if heavy else (reps, warmup)
                    # interleaved (reference, spar, reference, ...) so a noisy shared machine hits both alike
                    t = time_interleaved(providers(name, dt, op, batch), n_reps, warmup=n_warm, clock=clock)
                    med, last = t.median(), t.last
                    row = {"model": name, "dtype": dt, "op": op, "batch": batch, "reps": n_reps,
                           "reference_ms": 1e3 * med["reference"], "spar_ms": 1e3 * med["spar"],
                           "speedup": med["reference"] / med["spar"],
                           "rel_err": _rel(last["spar"].float(), last["reference"].float())}
                    rows.append(row)
                    print(f"  {name} {dt} {op} batch {batch}: reference {row['reference_ms']:.1f} ms, spar "
                          f"{row['spar_ms']:.1f} ms, {row['speedup']:.2f}x, rel err {row['rel_err']:.1e}", flush=True)
    return rows


def markdown(rows, dev: str, reps: int) -> str:
    lines = [f"# encode_image / reconstruct vs the reference composition ({dev})", "",
             f"{_dt.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, median of {reps} "
             "interleaved runs after one warm-up (SPAR-1B-shaped reconstruct and batch 8: one run fewer, no "
             "warm-up). These are CPU figures, measured on a shared machine.", ""]
    for name in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {name}: {NOTES[name]}", "",
                  "| dtype | op | batch | reference ms | spar ms | speedup | max abs err / max abs ref |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['dtype']} | {r['op']} | {r['batch']} | {r['reference_ms']:.1f} | {r['spar_ms']:.1f} | "
                  f"{r['speedup']:.2f}x | {r['rel_err']:.1e} |" for r in rows if r["model"] == name]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_image_tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny only")
    p.add_argument("--models", default=None, help=f"comma-separated among {list(NOTES)}")
    p.add_argument("--dtypes", default="fp32", help="comma-separated among fp32,bf16 (default fp32)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated among {OPS}")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: process CPU time (with --threads 1: robust on a shared machine)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=os.path.join(_HERE, "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        p.error("--clock cpu measures process CPU time: use it with --threads 1")
    models = args.models.split(",") if args.models else (["tiny"] if args.quick else list(NOTES))
    dtypes, ops = args.dtypes.split(","), args.ops.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    dev = device_name(torch.device("cpu"))
    print(f"bench_image_tokenizer on {dev}: {models} {dtypes} {ops} batches {batches}, {args.reps} reps", flush=True)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = run(models, dtypes, batches, ops, args.reps, warmup=1, clock=clock)
    md = markdown(rows, dev + (", process CPU time" if args.clock == "cpu" else ", wall time"), args.reps)
    print()
    print(md)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"image_tokenizer-cpu-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    with open(base + ".md", "w") as f:
        f.write(md)
    with open(base + ".json", "w") as f:
        json.dump({"device": dev, "torch": torch.__version__, "reps": args.reps, "clock": args.clock,
                   "rows": rows, "notes": {k: v for k, v in NOTES.items() if k in models}}, f, indent=1)
    print(f"wrote {base}.md, {base}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
