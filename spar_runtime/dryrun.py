"""A dry run of one SPAR generation on a simulated GPU: what each stage launches, syncs and holds.

    python -m spar_runtime.dryrun --config SPAR-1B --device cuda --dtype bf16 [--quantization fp8]
                                  [--graphs/--no-graphs] [--steps 20] [--json]

Everything runs inside ``spar_kernels.testing.fake_cuda()``: tensors on "cuda" are fake (shapes,
dtypes, devices; no data, no time), weights are allocated without values, and every spar op
dispatches as on a GPU. One generation (a 32-token prompt, the config's latent size) runs twice:
the first builds the plan (with graphs), the second is reported, per stage (prefill, dtr,
connector, dit_loop, decode): kernel launches (with graphs: graph replays, and the launches inside
one captured step), host syncs, host-to-device copies and bytes, peak CUDA memory. The roofline
floor per stage is a MODEL, not a measurement: ``max(FLOP / peak, bytes / bandwidth)`` for an
H100 SXM, with FLOPs and bytes of every GEMM, convolution and attention written below from the
shapes that ran (:class:`_Cost`); elementwise kernels count their operand bytes only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import sys

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from . import configs as _configs
from .dcae import DCAEDecoder, dcae_param_shapes
from .internvl import MLLM, mllm_param_shapes
from .pipeline import SparPipeline
from .sana import SanaDiT, sana_param_shapes

__all__ = ["H100", "dry_run", "main"]

# H100 SXM: dense bf16 and FP8 tensor-core peaks, HBM3 bandwidth
H100 = {"name": "H100 SXM", "bf16_flops": 989e12, "fp8_flops": 1979e12, "bytes_per_s": 3.35e12}
STAGES = ("prefill", "dtr", "connector", "dit_loop", "decode")
PROMPT_TOKENS = 32
UNCOND_TOKENS = 16
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

aten = torch.ops.aten


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class _Cost(TorchDispatchMode):
    """FLOPs (tensor-core work, FP8 apart) and bytes per region, from the shapes of each op."""

    def __init__(self):
        super().__init__()
        self.region = None
        self.flops = collections.Counter()
        self.fp8_flops = collections.Counter()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.region is None or func.is_view:
            return out
        p = str(func.overloadpacket)
        f = 0
        if p in ("aten.mm", "aten.addmm", "aten._scaled_mm", "aten.bmm", "aten.baddbmm"):
            a, b = (args[1], args[2]) if p in ("aten.addmm", "aten.baddbmm") else (args[0], args[1])
            f = 2 * a.numel() * b.shape[-1]
            moved = _bytes(a) + _bytes(b) + _bytes(out)
        elif p == "aten.linear":
            a, b = args[0], args[1]                                     # x [..., K], weight [N, K]
            f = 2 * a.numel() * b.shape[0]
            moved = _bytes(a) + _bytes(b) + _bytes(out)
        elif p in ("aten.convolution", "aten.conv2d"):
            x, w = args[0], args[1]
            f = 2 * out.numel() * math.prod(w.shape[1:])               # per output: Cin/groups * kh * kw MACs
            moved = _bytes(x) + _bytes(w) + _bytes(out)
        elif p == "spar.hybrid_attention":
            q, k, max_k = args[0], args[1], args[8]
            f = 4 * q.shape[0] * q.shape[1] * q.shape[2] * max_k       # every row sees <= max_seqlen_k keys
            moved = _bytes(q) + 2 * _bytes(k) + _bytes(q)
        elif p in ("spar.linear_attention", "spar.linear_attention_fp8"):
            q = args[0]                                                 # [B, N, H, d]: k^T v, then q (k^T v)
            f = 4 * q.numel() * q.shape[-1]
            moved = 3 * _bytes(q) + _bytes(args[4])                    # q, k, v in; out (or its FP8 codes)
        else:
            moved = sum(_bytes(t) for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
        (self.fp8_flops if p == "aten._scaled_mm" else self.flops)[self.region] += f
        self.bytes[self.region] += moved
        return out

    def floor_s(self, region: str) -> float:
        compute = self.flops[region] / H100["bf16_flops"] + self.fp8_flops[region] / H100["fp8_flops"]
        return max(compute, self.bytes[region] / H100["bytes_per_s"])


def _empty(shapes: dict, device, dtype) -> dict:
    return {k: torch.empty(s, device=device, dtype=dtype) for k, s in shapes.items()}


def build_pipeline(config, device, dtype, quantization=None, graphs=None) -> SparPipeline:
    """A pipeline whose weights are allocated but never written (for the simulated device)."""
    from . import image_tokenizer as _itok

    mllm = MLLM(config.mllm_config, _empty(mllm_param_shapes(config.mllm_config), device, dtype))
    spar_shapes = dict(config.spar_param_shapes())
    if config.tokenizer is not None:
        spar_shapes.update(_itok.param_shapes(_configs.TokenizerConfig.from_dict(config.tokenizer),
                                              config.hidden_size, config.latent_channels))
    dit = SanaDiT(config.dit_config, _empty(sana_param_shapes(config.dit_config), device, dtype))
    vae = DCAEDecoder(config.vae_config, _empty(dcae_param_shapes(config.vae_config), device, dtype))
    return SparPipeline(config, mllm, _empty(spar_shapes, device, dtype), dit, vae, device=device, dtype=dtype,
                        where="dry run", quantization=quantization, graphs=graphs)


def dry_run(config="SPAR-1B", *, device="cuda", dtype=torch.bfloat16, quantization=None, graphs=None,
            steps: int | None = None, capability=(9, 0)) -> dict:
    """Run one generation on ``fake_cuda()`` and return the report (see the module docstring)."""
    from spar_kernels.testing import fake_cuda

    config = _configs.get_config(config)
    steps = config.num_steps if steps is None else steps
    s = config.latent_size
    prompt = [torch.arange(PROMPT_TOKENS) % 200 + 1]
    uncond = torch.arange(UNCOND_TOKENS) % 200 + 1
    noise = torch.zeros(1, config.latent_channels, s, s)
    cost = _Cost()
    with fake_cuda(capability) as rec:
        with rec.region("load"):
            pipe = build_pipeline(config, device, dtype, quantization, graphs)
        orig_stage = pipe._stage

        @contextlib.contextmanager
        def stage(name):                     # each pipeline stage is a recorder region
            prev, cost.region = cost.region, (name if measured else None)
            with orig_stage(name), rec.region(name if measured else "warmup." + name):
                yield
            cost.region = prev

        pipe._stage = stage
        measured = False
        with rec.region("warmup"):          # builds the plan (graphs) and every cache
            pipe.decode(pipe.generate_latents(prompt, uncond_ids=uncond, noise=noise, num_steps=steps))
        measured = True
        first = []                                   # (syncs, launches) of dit_loop before the first step

        def mark():
            if not first:
                st = rec.regions.get("dit_loop")
                first.append((len(st.syncs), st.launches) if st is not None else (0, 0))
        for plan in pipe.engine.plans.values():      # one region per denoising step (plan path)
            plan.step = _Counted(plan.step, rec, "dit_step", mark)
        dit = pipe.dit                               # eager path: one region per DiT forward
        pipe.dit = _Counted(dit, rec, "dit_forward", mark)
        dit.blocks = [_Counted(b, rec, "sana_block") for b in dit.blocks]
        # the measured call: new ids of the same lengths in every row, so that no context slot
        # of the warm-up is reused (the whole LLM -> DTR -> connector path runs, as on a plan's
        # first call; later calls with the same negative prompt skip its rows)
        prompt, uncond = [(prompt[0] + 1) % 200 + 1], (uncond + 1) % 200 + 1
        with cost, rec.region("generation"):
            lat = pipe.generate_latents(prompt, uncond_ids=uncond, noise=noise, num_steps=steps)
            pipe.decode(lat)
        info = pipe.graph_cache_info()
        pipe.dit = dit
    loop = rec.stats("dit_loop")
    syncs0, launches0 = first[0] if first else (0, 0)
    loop_syncs = loop.syncs[syncs0:]
    per_step = (rec.stats("dit_step").launches / max(1, rec.stats("dit_step").entries) if pipe.graphs
                else (loop.launches - launches0) / steps)
    stages = {}
    for name in STAGES:
        st = rec.stats(name)
        row = {"launches": st.launches, "syncs": len(st.syncs), "sync_sites": [repr(x) for x in st.syncs[:5]],
               "h2d_copies": st.h2d_copies, "h2d_bytes": st.h2d_bytes, "peak_bytes": st.peak_bytes,
               "flops": cost.flops[name] + cost.fp8_flops[name], "fp8_flops": cost.fp8_flops[name],
               "bytes_moved": cost.bytes[name], "floor_ms": 1e3 * cost.floor_s(name)}
        if name == "dit_loop" and pipe.graphs:   # on a GPU: one replay of the captured step per step
            row.update(graph_replays=steps, launches_per_graph=per_step,
                       host_launches=st.launches - steps * per_step + steps)
        stages[name] = row
    return {
        "config": config.name if hasattr(config, "name") else str(config), "device": str(pipe.device),
        "dtype": str(dtype).replace("torch.", ""), "quantization": quantization, "graphs": pipe.graphs,
        "steps": steps, "prompt_tokens": PROMPT_TOKENS, "latent": list(noise.shape),
        "stages": stages, "launches_per_dit_step": per_step,
        "launches_per_sana_block_step": _per_block(rec, pipe, steps),
        "syncs_in_loop": len(loop_syncs), "loop_sync_sites": [repr(x) for x in loop_syncs[:5]], "peak_bytes": rec.peak_bytes,
        "h2d_bytes": rec.stats("generation").h2d_bytes, "plans": info["plans"],
        "floor_ms_total": sum(r["floor_ms"] for r in stages.values()),
        # the quantized linears: FP8 bytes (weights + scales) against the same weights in bf16
        "fp8_weight_bytes": sum(q.nbytes for q in pipe.quantized.values()),
        "bf16_weight_bytes_of_quantized": sum(2 * q.shape[0] * q.shape[1] for q in pipe.quantized.values()),
        "roofline": {**H100, "note": "a model from FLOP and byte counts of the ops that ran, not a measurement"},
    }


class _Counted:
    """Runs ``fn`` (a step function, the DiT or a SanaBlock) inside recorder region ``name``
    (``on_call()`` first); other attributes are ``fn``'s."""

    def __init__(self, fn, rec, name: str, on_call=None):
        self._fn, self._rec, self._name, self._on_call = fn, rec, name, on_call

    def __getattr__(self, key):
        return getattr(self._fn, key)

    def __call__(self, *args):
        if self._on_call is not None:
            self._on_call()
        with self._rec.region(self._name):
            return self._fn(*args)


def _per_block(rec, pipe, steps) -> float:
    """Launches of one SANA block call (the DiT's blocks ran inside region "sana_block")."""
    st = rec.regions.get("sana_block")
    return st.launches / st.entries if st is not None and st.entries else float("nan")


def _table(r: dict) -> str:
    lines = [f"dry run: {r['config']} on a simulated {r['device']} ({r['dtype']}, quantization={r['quantization']}, "
             f"graphs={r['graphs']}), {r['steps']} steps, {r['prompt_tokens']}-token prompt, latent {r['latent']}",
             f"{'stage':<10} {'launches':>9} {'syncs':>6} {'h2d B':>10} {'peak MiB':>9} {'GFLOP':>9} "
             f"{'floor ms':>9}"]
    for name, s in r["stages"].items():
        lines.append(f"{name:<10} {s['launches']:>9} {s['syncs']:>6} {s['h2d_bytes']:>10} "
                     f"{s['peak_bytes'] / 2**20:>9.1f} {s['flops'] / 1e9:>9.1f} {s['floor_ms']:>9.3f}")
    loop = r["stages"]["dit_loop"]
    if "graph_replays" in loop:
        lines.append(f"with graphs: {loop['graph_replays']} graph replays (one per step), "
                     f"{loop['launches_per_graph']:.0f} launches inside each, {loop['host_launches']:.0f} host launches")
    lines.append(f"launches per DiT step: {r['launches_per_dit_step']:.0f}; per SANA block and step: "
                 f"{r['launches_per_sana_block_step']:.1f}; host syncs in the loop: {r['syncs_in_loop']}; "
                 f"peak CUDA memory {r['peak_bytes'] / 2**30:.2f} GiB")
    lines.append(f"roofline floor (a model, {H100['name']}: {H100['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
                 f"{H100['fp8_flops'] / 1e12:.0f} FP8, {H100['bytes_per_s'] / 1e12:.2f} TB/s): "
                 f"{r['floor_ms_total']:.2f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spar_runtime.dryrun", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="SPAR-1B", choices=sorted(_configs.CONFIGS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--quantization", default=None, choices=["fp8"])
    p.add_argument("--graphs", default=None, action=argparse.BooleanOptionalAction)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--capability", default="9.0", help="compute capability of the simulated GPU (9.0: H100)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = p.parse_args(argv)
    if not args.device.startswith("cuda"):
        p.error(f"--device: the dry run simulates a CUDA device, got {args.device!r}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps: expected a positive int, got {args.steps}")
    try:
        cap = tuple(int(v) for v in args.capability.split("."))
        report = dry_run(args.config, device=args.device, dtype=_DTYPES[args.dtype], quantization=args.quantization,
                         graphs=args.graphs, steps=args.steps, capability=cap)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else _table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
