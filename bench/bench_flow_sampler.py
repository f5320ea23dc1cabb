"""FlowSampler.step (fused guidance + solver) vs diffusers' scheduler step plus the guidance math
in eager PyTorch, on SPAR latents (CFG batch of 2: the two halves of one DiT output), BAGEL
latents (packed [tokens, 64], three branches, image guidance, global renorm) and a large latent.

Bytes per step are the minimum a fused step moves: the state read and written once, every
branch read once, and the solver's fp32 history read and written where the method keeps one.
"""

from __future__ import annotations

import torch

import spar_kernels as sk
from bench.harness import Case, Unavailable

STEPS = 1000  # long schedules, so the timed calls rarely wrap around (the wrap is a host-side reset)


def _spar(sampler: sk.FlowSampler, x, branches, out):
    def call():
        if sampler._host_step >= sampler.num_evals:
            sampler.reset()
        return sampler.step(x, *branches, out=out)
    return call


def _scheduler(method: str, shift: float):
    try:
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    except ImportError as e:
        raise Unavailable(f"diffusers: {e}") from e
    if method == "euler":
        sc = FlowMatchEulerDiscreteScheduler(shift=shift)
    else:
        sc = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                         solver_order=2, algorithm_type="dpmsolver++")
    sc.set_timesteps(STEPS)
    return sc


def _diffusers_cfg(method, shift, x, vc, vu, g):
    sc = _scheduler(method, shift)
    t = sc.timesteps[1]

    def call():
        if sc.step_index is None or sc.step_index >= STEPS - 2:
            sc._step_index = 1  # mid-schedule: DPM-Solver takes its second-order path after one call
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
        for method in ("euler", "dpmsolver++2m"):
            dit_out = torch.randn((2,) + shape[1:], device=device, dtype=dtype)  # the CFG batch's velocity
            vc, vu = dit_out[:1], dit_out[1:]
            x = torch.randn(shape, device=device, dtype=dtype)
            out = torch.empty_like(x)
            n = x.numel()
            hist = 2 * 4 * n if method != "euler" else 0
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
