"""FlowSampler.step (fused guidance + solver) vs diffusers' scheduler step plus the guidance math
in eager PyTorch, on SPAR latents (CFG batch of 2: the two halves of one DiT output), BAGEL
latents (packed [tokens, 64], three branches, image guidance, global renorm) and a large latent;
Euler, Heun (each call one model evaluation: predictor and corrector alternate) and
DPM-Solver++ 2M.

Bytes per step are the minimum a fused step moves: the state read and written once, every
branch read once, and the solver's fp32 history read and written where the method keeps one.

Standalone (CPU): ``OMP_NUM_THREADS=1 python -m bench.bench_flow_sampler [--quick] [--reps N]``
times every case's providers interleaved (one block of calls per provider per repetition, in
turn) in process CPU time, and prints medians over the repetitions: on a shared machine the
providers then see the same load.
"""

from __future__ import annotations

import argparse

import torch

import spar_kernels as sk
from bench.harness import Case, Unavailable, device_name, time_interleaved

STEPS = 1000  # long schedules, so the timed calls rarely wrap around (the wrap is a host-side reset)


def _spar(sampler: sk.FlowSampler, x, branches, out):
    # the harness's own work kept to a bound method and one host-side compare per call: a small
    # step's whole cost is a few microseconds
    step, n = sampler.step, sampler.num_evals
    vc, vu, vi = (*branches, None, None)[:3]

    def call():
        if sampler._host_step >= n:
            sampler.reset()
        return step(x, vc, vu, vi, out=out)
    return call


def _scheduler(method: str, shift: float):
    try:
        from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                               FlowMatchHeunDiscreteScheduler)
    except ImportError as e:
        raise Unavailable(f"diffusers: {e}") from e
    if method == "euler":
        sc = FlowMatchEulerDiscreteScheduler(shift=shift)
    elif method == "heun":
        sc = FlowMatchHeunDiscreteScheduler(shift=shift)
    else:
        sc = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                         solver_order=2, algorithm_type="dpmsolver++")
    sc.set_timesteps(STEPS)
    return sc


def _diffusers_cfg(method, shift, x, vc, vu, g):
    sc = _scheduler(method, shift)
    t = sc.timesteps[1]

    end = len(sc.timesteps) - 2

    def call():
        if sc.step_index is None or (sc.step_index >= end and getattr(sc, "dt", None) is None):
            # mid-schedule: DPM-Solver takes its second-order path after one call; Heun restarts
            # on a predictor (its corrector state is clear)
            sc._step_index = 1
        v = vu + g * (vc - vu)
        return sc.step(v, t, x, return_dict=False)[0]
    return call


def _diffusers_bagel(x, vc, vu, vi, g, gi, shift):
    sc = _scheduler("euler", shift)
    t = sc.timesteps[1]

    def call():
        if sc.step_index is None or sc.step_index >= STEPS - 2:
            sc._step_index = 1
        # BAGEL's guidance (modeling/bagel/bagel.py, renorm "global") in eager PyTorch
        v_text = vu + g * (vc - vu)
        v = vi + gi * (v_text - vi)
        scale = (torch.norm(vc) / (torch.norm(v) + 1e-8)).clamp(min=0.0, max=1.0)
        return sc.step(v * scale, t, x, return_dict=False)[0]
    return call


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.tensor([], dtype=dtype).element_size()
    shift, g = 3.0, 4.5
    spar_shapes = [("SPAR 2x32x16x16", (1, 32, 16, 16)), ("SPAR 2x32x32x32", (1, 32, 32, 32)),
                   ("large 2x16x256x256", (1, 16, 256, 256))]
    if quick:
        spar_shapes = [spar_shapes[0], spar_shapes[2]]
    for label, shape in spar_shapes:
        for method in ("euler", "heun", "dpmsolver++2m"):
            dit_out = torch.randn((2,) + shape[1:], device=device, dtype=dtype)  # the CFG batch's velocity
            vc, vu = dit_out[:1], dit_out[1:]
            x = torch.randn(shape, device=device, dtype=dtype)
            out = torch.empty_like(x)
            n = x.numel()
            hist = 2 * 4 * n if method != "euler" else 0  # Heun: 2 buffers, written or read per call
            sampler = sk.FlowSampler(method, num_steps=STEPS, shift=shift, guidance=g, device=device)
            yield Case(
                op="flow_sampler", name=f"{label} {method} cfg {str(dtype)[6:]}",
                providers={
                    "spar": lambda s=sampler, x=x, vc=vc, vu=vu, o=out: _spar(s, x, (vc, vu), o),
                    "diffusers step + eager cfg": (
                        lambda m=method, x=x, vc=vc, vu=vu: _diffusers_cfg(m, shift, x, vc, vu, g)),
                },
                bytes=2 * n * es + 2 * n * es + hist, baseline="diffusers step + eager cfg")
    bagel = [("BAGEL 1024x64", 1024), ("BAGEL 4096x64", 4096)]
    for label, tokens in (bagel[1:] if quick else bagel):
        x = torch.randn(tokens, 64, device=device, dtype=dtype)
        vc, vu, vi = (torch.randn(tokens, 64, device=device, dtype=dtype) for _ in range(3))
        out = torch.empty_like(x)
        n = x.numel()
        sampler = sk.FlowSampler("euler", num_steps=STEPS, shift=shift, guidance=4.0, image_guidance=2.0,
                                 renorm="global", device=device)
        yield Case(
            op="flow_sampler", name=f"{label} euler text+image cfg, global renorm {str(dtype)[6:]}",
            providers={
                "spar": lambda s=sampler, x=x, b=(vc, vu, vi), o=out: _spar(s, x, b, o),
                "diffusers step + eager cfg": (
                    lambda x=x, vc=vc, vu=vu, vi=vi: _diffusers_bagel(x, vc, vu, vi, 4.0, 2.0, shift)),
            },
            bytes=2 * n * es + 3 * n * es, baseline="diffusers step + eager cfg")


def interleaved(quick: bool = False, reps: int = 11, budget_s: float = 0.01) -> list[tuple[str, dict]]:
    """Median process-CPU microseconds per call of every provider of every CPU case, the
    providers of a case timed in turn in each repetition, each in a block of calls lasting about
    ``budget_s`` (see the module docstring)."""
    device = torch.device("cpu")
    rows = []
    for case in cases(device, quick):
        fns = {}
        for prov, factory in case.providers.items():
            try:
                fns[prov] = factory()
            except Unavailable:
                continue
        med = time_interleaved(fns, reps, warmup=1, clock="cpu", budget_s=budget_s).median()
        rows.append((case.name, {p: v * 1e6 for p, v in med.items()}))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_flow_sampler", description=__doc__.split("\n\n")[2])
    p.add_argument("--quick", action="store_true", help="the quick case list")
    p.add_argument("--reps", type=int, default=11, help="interleaved repetitions (medians over them)")
    args = p.parse_args(argv)
    print(f"{device_name(torch.device('cpu'))}; process CPU time, median of {args.reps} interleaved repetitions")
    print("| case | spar us | diffusers step + eager cfg us | speedup |")
    print("|---|---:|---:|---:|")
    for name, med in interleaved(args.quick, args.reps):
        sp, base = med.get("spar"), med.get("diffusers step + eager cfg")
        ratio = f"{base / sp:.2f}x" if sp and base else "-"
        print(f"| {name} | {sp:.1f} | {base:.1f} | {ratio} |" if sp and base else f"| {name} | {sp} | {base} | - |",
              flush=True)


if __name__ == "__main__":
    main()
