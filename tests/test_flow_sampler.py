"""FlowSampler / flow_sigmas against diffusers' schedulers (trajectory by trajectory), BAGEL's
guidance code (rewritten here from its definition), the plain-PyTorch reference and bad input."""

import math

import numpy as np
import pytest
import torch

import spar_kernels as sk
from spar_kernels import flow_sampler as sp_mod
from spar_kernels.schedules import calculate_shift

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)

BACKENDS = ["cpu", "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
METHODS = ["euler", "dpmsolver++2m", "heun"]


def _diffusers_scheduler(method, shift):
    if method == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    if method == "heun":
        return FlowMatchHeunDiscreteScheduler(shift=shift)
    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                       solver_order=2, algorithm_type="dpmsolver++")


def _field(x, t, k, w):
    """A deterministic synthetic velocity field, different per branch k (fp32 math, x's dtype out)."""
    xf = x.float()
    return (torch.sin(xf * (1.0 + 0.15 * k) + t / 1000.0) + w[k] * xf + 0.1 * k).to(x.dtype)


def _weights():
    return [float(v) for v in (torch.rand(3) * 0.6 - 0.3)]


# ------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("n", [1, 2, 7, 20, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.7, 6.0])
def test_flow_sigmas_match_diffusers_static(n, shift):
    sc = FlowMatchEulerDiscreteScheduler(shift=shift)
    sc.set_timesteps(n)
    got = sk.flow_sigmas(n, shift=shift)
    assert got.dtype == torch.float32 and torch.equal(got, sc.sigmas)
    dp = _diffusers_scheduler("dpmsolver++2m", shift)
    dp.set_timesteps(n)
    assert torch.equal(sk.flow_sigmas(n, shift=shift, schedule="dpmsolver"), dp.sigmas)


@pytest.mark.parametrize("n", [1, 4, 28])
@pytest.mark.parametrize("kw", [
    dict(use_dynamic_shifting=True),
    dict(use_dynamic_shifting=True, time_shift_type="linear"),
    dict(use_dynamic_shifting=True, base_shift=0.3, max_shift=1.5, base_image_seq_len=128, max_image_seq_len=8192),
    dict(shift=3.0, shift_terminal=0.05),
    dict(shift=3.0, use_karras_sigmas=True),
    dict(shift=2.0, use_exponential_sigmas=True),
])
def test_flow_sigmas_match_diffusers_options(n, kw):
    if n == 1 and "shift_terminal" in kw:
        pytest.skip("diffusers divides by zero here (covered by the error test)")
    sc = FlowMatchEulerDiscreteScheduler(**kw)
    seq = int(torch.randint(64, 8192, ()).item())
    mu = None
    if kw.get("use_dynamic_shifting"):
        mu = calculate_shift(seq, kw.get("base_image_seq_len", 256), kw.get("max_image_seq_len", 4096),
                             kw.get("base_shift", 0.5), kw.get("max_shift", 1.15))
    sc.set_timesteps(n, mu=mu)
    assert torch.equal(sk.flow_sigmas(n, mu=mu, **kw), sc.sigmas)
    if mu is not None:  # the same through image_seq_len
        assert torch.equal(sk.flow_sigmas(n, image_seq_len=seq, **kw), sc.sigmas)


@pytest.mark.parametrize("n", [1, 5, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_linear_is_bagel(n, shift):
    t = torch.linspace(1, 0, n + 1)
    t = shift * t / (1 + (shift - 1) * t)
    got = sk.flow_sigmas(n, shift=shift, schedule="linear")
    assert torch.equal(got, t) and got[-1] == 0 and bool((got[1:] < got[:-1]).all())


def test_flow_sigmas_dpmsolver_mu():
    mu = 0.8
    dp = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, use_dynamic_shifting=True)
    dp.set_timesteps(9, mu=mu)
    assert torch.equal(sk.flow_sigmas(9, schedule="dpmsolver", mu=mu), dp.sigmas)


# -------------------------------------------------------------------- trajectories vs diffusers

def _run_diffusers(method, sc, x, g, w, dtype):
    xs = x.to(dtype)
    for t in sc.timesteps:
        tf = t.float()
        vc, vu = _field(xs, tf, 0, w), _field(xs, tf, 1, w)
        v = vu + g * (vc - vu)
        xs = sc.step(v, t, xs).prev_sample
    return xs


def _run_spar(sampler, x, g, w, dtype, backend, *, in_place=False):
    xs = x.to(dtype)
    with sk.backend(backend):
        for t in sampler.timesteps:
            tf = t.float()
            vc, vu = _field(xs, tf, 0, w), _field(xs, tf, 1, w)
            xs = sampler.step(xs, vc, vu, out=xs if in_place else None)
    return xs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,shift,shape", [
    (1, 1.0, (2, 4, 5, 7)),
    (2, 3.0, (1, 37, 16)),
    (9, 3.0, (2, 8, 16, 16)),
    (20, 3.0, (2, 32, 16, 16)),
    (28, 1.5, (113, 64)),
])
def test_trajectory_matches_diffusers_fp32(backend, method, n, shift, shape):
    g = 4.5
    w = _weights()
    x = torch.randn(shape)
    sc = _diffusers_scheduler(method, shift)
    sc.set_timesteps(n)
    sampler = sk.FlowSampler(method, num_steps=n, shift=shift, guidance=g)
    assert torch.equal(sampler.timesteps, sc.timesteps)
    assert sampler.timesteps.dtype == sc.timesteps.dtype
    assert torch.equal(sampler.sigmas, sc.sigmas)
    schedule = "dpmsolver" if method == "dpmsolver++2m" else "diffusers"
    assert torch.equal(sampler.step_sigmas, sk.flow_sigmas(n, shift=shift, schedule=schedule))
    want = _run_diffusers(method, sc, x, g, w, torch.float32)
    got = _run_spar(sampler, x, g, w, torch.float32, backend, in_place=(n % 2 == 0))
    # fp32 rounding: DPM-Solver's coefficients are folded in fp64 here, diffusers evaluates them
    # in fp32; states reach |x| ~ 10 on this field, where one fp32 ulp is 1e-6
    torch.testing.assert_close(got, want, atol=1e-5, rtol=5e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_diffusers_sigmas_as_given_reproduce_trajectory(backend, method):
    # 12 steps at shift 1: one float32 DPM sigma * 1000 truncates one below diffusers' timestep
    n, g, w = 12, 3.0, _weights()
    x = torch.randn(2, 16, 9, 11)
    sc = _diffusers_scheduler(method, 1.0)
    sc.set_timesteps(n)
    sampler = sk.FlowSampler(method, sigmas=sc.sigmas, guidance=g)
    assert torch.equal(sampler.timesteps, sc.timesteps)
    assert torch.equal(sampler.sigmas, sc.sigmas)
    # the model sees diffusers' timesteps in both runs
    xs = x.clone()
    with sk.backend(backend):
        for t in sc.timesteps:
            vc, vu = _field(xs, t.float(), 0, w), _field(xs, t.float(), 1, w)
            xs = sampler.step(xs, vc, vu)
    want = _run_diffusers(method, sc, x, g, w, torch.float32)
    torch.testing.assert_close(xs, want, atol=1e-5, rtol=5e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trajectory_low_precision_fa_rule(backend, method, dtype):
    """Half-precision states: our error against diffusers' fp32 trajectory is within twice the
    error of diffusers run in the same dtype (the FlashAttention rule), plus one ulp."""
    n, g, w, shift = 10, 4.0, _weights(), 3.0
    x = torch.randn(2, 8, 12, 12)
    sc = _diffusers_scheduler(method, shift)
    sc.set_timesteps(n)
    exact = _run_diffusers(method, sc, x, g, w, torch.float32).double()
    sc.set_timesteps(n)
    theirs = _run_diffusers(method, sc, x, g, w, dtype).double()
    ours = _run_spar(sk.FlowSampler(method, num_steps=n, shift=shift, guidance=g), x, g, w, dtype, backend)
    assert ours.dtype == dtype
    err_theirs = (theirs - exact).abs().max().item()
    err_ours = (ours.double() - exact).abs().max().item()
    # the field amplifies each step's rounding of the state, so allow one ulp at the largest value
    atol = torch.finfo(dtype).eps * exact.abs().max().item()
    assert err_ours <= 2 * err_theirs + atol, (err_ours, err_theirs, atol)


# --------------------------------------------------------------------------- BAGEL's guidance

def _bagel_velocity(v_t, cfg_text_v_t, cfg_img_v_t, cfg_text_scale, cfg_img_scale, cfg_renorm_type, cfg_renorm_min):
    """BAGEL's _forward_flow guidance on packed [tokens, C] latents (modeling/bagel/bagel.py)."""
    if cfg_text_scale > 1.0:
        v_t_text_ = cfg_text_v_t + cfg_text_scale * (v_t - cfg_text_v_t)
        if cfg_img_scale > 1.0:
            v_t_ = cfg_img_v_t + cfg_img_scale * (v_t_text_ - cfg_img_v_t)
        else:
            v_t_ = v_t_text_
        if cfg_renorm_type == "text_channel":  # renorm the text-guided velocity, then the image branch
            scale = (torch.norm(v_t, dim=-1, keepdim=True)
                     / (torch.norm(v_t_text_, dim=-1, keepdim=True) + 1e-8)).clamp(min=cfg_renorm_min, max=1.0)
            v_t_text = v_t_text_ * scale
            return cfg_img_v_t + cfg_img_scale * (v_t_text - cfg_img_v_t) if cfg_img_scale > 1.0 else v_t_text
        if cfg_renorm_type == "global":
            norm_v_t, norm_v_t_ = torch.norm(v_t), torch.norm(v_t_)
        else:  # "channel": over the last (channel) dimension of each token
            norm_v_t = torch.norm(v_t, dim=-1, keepdim=True)
            norm_v_t_ = torch.norm(v_t_, dim=-1, keepdim=True)
        scale = (norm_v_t / (norm_v_t_ + 1e-8)).clamp(min=cfg_renorm_min, max=1.0)
        return v_t_ * scale
    return v_t


def _bagel_generate(x, num_timesteps, shift, interval, g, gi, renorm_type, renorm_min, w):
    timesteps = torch.linspace(1, 0, num_timesteps)
    timesteps = shift * timesteps / (1 + (shift - 1) * timesteps)
    dts = timesteps[:-1] - timesteps[1:]
    for i, t in enumerate(timesteps[:-1]):
        on = t > interval[0] and t <= interval[1]
        v = _bagel_velocity(_field(x, t * 1000, 0, w), _field(x, t * 1000, 1, w), _field(x, t * 1000, 2, w),
                            g if on else 1.0, gi if on else 1.0, renorm_type, renorm_min)
        x = x - v * dts[i]
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bagel_renorm,ours", [("global", "global"), ("channel", "token"),
                                               ("text_channel", "text_token")])
@pytest.mark.parametrize("gi,interval,renorm_min", [(1.5, (0.4, 1.0), 0.0), (1.0, (0.0, 1.0), 0.3),
                                                     (2.0, (0.0, 0.7), 0.0)])
def test_bagel_generate_image_loop(backend, bagel_renorm, ours, gi, interval, renorm_min):
    n, shift, g, w = 12, 3.0, 4.0, _weights()
    x = torch.randn(257, 64)  # one packed sample: [tokens, C]
    want = _bagel_generate(x, n + 1, shift, interval, g, gi, bagel_renorm, renorm_min, w)
    sigmas = sk.flow_sigmas(n, shift=shift, schedule="linear")
    sampler = sk.FlowSampler("euler", sigmas=sigmas, guidance=g, image_guidance=gi, guidance_interval=interval,
                             renorm=ours, renorm_min=renorm_min)
    xs = x.clone()
    with sk.backend(backend):
        for t in sampler.eval_sigmas:
            xs = sampler.step(xs, _field(xs, t * 1000, 0, w), _field(xs, t * 1000, 1, w), _field(xs, t * 1000, 2, w))
    torch.testing.assert_close(xs, want, atol=1e-5, rtol=5e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, interval", [(5, (0.4, 1.0)), (5, (0.1, 0.8)), (10, (0.4, 1.0)), (20, (0.2, 0.6))])
def test_bagel_interval_bounds_compare_in_float32(backend, n, interval):
    """With shift 1 the linear schedule's float32 sigmas fall exactly on float32(lo) or
    float32(hi): BAGEL compares its float32 t with the Python bounds in float32 (0.4f > 0.4 is
    False there, True in float64), and the sampler's gate follows."""
    g, w = 4.0, _weights()
    x = torch.randn(33, 64)
    want = _bagel_generate(x, n + 1, 1.0, interval, g, 1.0, "global", 0.0, w)
    sigmas = sk.flow_sigmas(n, shift=1.0, schedule="linear")
    assert any(float(s) == float(torch.tensor(b, dtype=torch.float32)) for s in sigmas for b in interval)
    sampler = sk.FlowSampler("euler", sigmas=sigmas, guidance=g, guidance_interval=interval, renorm="global")
    xs = x.clone()
    with sk.backend(backend):
        for t in sampler.eval_sigmas:
            xs = sampler.step(xs, _field(xs, t * 1000, 0, w), _field(xs, t * 1000, 1, w))
    torch.testing.assert_close(xs, want, atol=1e-5, rtol=5e-6)


# --------------------------------------------------------- renorm modes from their definitions

def _renorm_def(vc, v, mode, layout, rmin):
    """|.| over the whole sample / each channel / each token, written per layout."""
    if mode == "global":
        dims = tuple(range(1, v.dim()))
    elif layout == "nchw":
        dims = (1,) if mode == "token" else tuple(range(2, v.dim()))
    else:  # [B, T, C]
        dims = (2,) if mode == "token" else (1,)
    s = (torch.linalg.vector_norm(vc, dim=dims, keepdim=True)
         / (torch.linalg.vector_norm(v, dim=dims, keepdim=True) + 1e-8)).clamp(rmin, 1.0)
    return v * s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["global", "channel", "token"])
@pytest.mark.parametrize("shape,layout", [((2, 16, 9, 13), "nchw"), ((3, 113, 24), "btc"), ((1, 4, 3, 5, 7), "nchw")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_renorm_image_guidance_one_step(backend, mode, shape, layout, dtype):
    g, gi, rmin = 5.0, 1.7, 0.25
    x = torch.randn(shape).to(dtype)
    vc, vu, vi = (torch.randn(shape) * s for s in (1.0, 1.3, 0.8))
    vc, vu, vi = vc.to(dtype), vu.to(dtype), vi.to(dtype)
    sampler = sk.FlowSampler("euler", num_steps=4, shift=2.0, guidance=g, image_guidance=gi, renorm=mode,
                             renorm_min=rmin)
    with sk.backend(backend):
        got = sampler.step(x, vc, vu, vi)
    c, u, i = vc.double(), vu.double(), vi.double()
    v = i + gi * ((u + g * (c - u)) - i)
    v = _renorm_def(c, v, mode, layout, rmin)
    s = sampler.sigmas.double()
    want = x.double() + (s[1] - s[0]) * v
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert got.dtype == dtype
    assert (got.double() - want).abs().max().item() <= tol * (1 + want.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["global", "channel", "token"])
def test_renorm_eps_with_velocities_near_zero(backend, mode):
    """Velocity norms of the order of the renorm's 1e-8: the factor is |v_cond| / (|v| + 1e-8), the
    epsilon added to the norm (sqrt(|v|^2 + 1e-8) would give ~1e-4 here), with renorm_min 0 so that
    nothing clamps; x = 0 so that the step is the renormed velocity alone."""
    shape, g = (2, 16, 9, 13), 3.0
    gen = torch.Generator().manual_seed(11)
    vc, vu = (torch.randn(shape, generator=gen) * 1e-10 for _ in range(2))
    x = torch.zeros(shape)
    sampler = sk.FlowSampler("euler", num_steps=4, shift=2.0, guidance=g, renorm=mode, renorm_min=0.0)
    with sk.backend(backend):
        got = sampler.step(x, vc, vu)
    c, u = vc.double(), vu.double()
    v = _renorm_def(c, u + g * (c - u), mode, "nchw", 0.0)
    s = sampler.sigmas.double()
    want = (s[1] - s[0]) * v
    assert (got.double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_interval_off_uses_v_cond(backend):
    # interval (0.5, 1]: guidance applies while sigma > 0.5, then v = v_cond exactly
    sampler = sk.FlowSampler("euler", num_steps=6, guidance=3.0, guidance_interval=(0.5, 1.0), renorm="global")
    x = torch.randn(2, 33, 8)
    with sk.backend(backend):
        for k in range(6):
            vc, vu = torch.randn_like(x), torch.randn_like(x)
            s = sampler.sigmas
            got = sampler.step(x, vc, vu)
            on = 0.5 < float(s[k]) <= 1.0
            v = vu + 3.0 * (vc - vu) if on else vc
            if on:
                v = v * (vc.norm(dim=(1, 2), keepdim=True) / (v.norm(dim=(1, 2), keepdim=True) + 1e-8)).clamp(0, 1)
            torch.testing.assert_close(got, x + (s[k + 1] - s[k]) * v, atol=2e-6, rtol=2e-6)
            x = got


# ----------------------------------------------------------------------- backends and layouts

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("xdtype", DTYPES)
@pytest.mark.parametrize("vdtype", DTYPES)
@pytest.mark.parametrize("renorm", [None, "global", "channel", "token", "text_token"])
def test_cpu_twin_matches_reference(method, xdtype, vdtype, renorm):
    shape = (2, 7, 5, 9) if renorm in (None, "channel") else (3, 29, 12)
    kw = dict(num_steps=5, shift=3.0, guidance=4.0, image_guidance=1.5, renorm=renorm, renorm_min=0.1)
    a, b = sk.FlowSampler(method, **kw), sk.FlowSampler(method, **kw)
    xa = torch.randn(shape).to(xdtype)
    xb = xa.clone()
    for _ in range(a.num_evals):
        vs = [torch.randn(shape).to(vdtype) for _ in range(3)]
        with sk.backend("cpu"):
            xa = a.step(xa, *vs)
        with sk.backend("reference"):
            xb = b.step(xb, *vs)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[xdtype]
        torch.testing.assert_close(xa.float(), xb.float(), atol=tol, rtol=tol)
        xb = xa.clone()  # compare step by step, not the accumulated rounding
    torch.testing.assert_close(a._h1, b._h1) if a._h1 is not None else None
    assert int(a.counter) == int(b.counter) == a.num_evals


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_out(backend):
    base = torch.randn(2, 9, 6, 10)
    x = base.permute(0, 1, 3, 2)  # [2, 9, 10, 6], not contiguous
    vc = torch.randn(2, 9, 6, 10).transpose(2, 3)
    vu = torch.randn(2, 9, 10, 12)[..., ::2]
    kw = dict(num_steps=3, guidance=2.0, renorm="channel")
    a, b = sk.FlowSampler("dpmsolver++2m", **kw), sk.FlowSampler("dpmsolver++2m", **kw)
    out = torch.full(x.shape, float("nan"))
    with sk.backend(backend):
        got = a.step(x, vc, vu, out=out)
    with sk.backend("reference"):
        want = b.step(x.contiguous(), vc.contiguous(), vu.contiguous())
    assert got is out
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_replays_and_counter_on_device(backend):
    x0 = torch.randn(1, 21, 16)
    vs = [torch.randn(1, 21, 16) for _ in range(8)]
    s = sk.FlowSampler("heun", num_steps=4, guidance=1.0)
    assert s.num_evals == 7 and s.counter.device == s.sigmas.device

    def run():
        x = x0.clone()
        with sk.backend(backend):
            for k in range(s.num_evals):
                assert int(s.current_timestep()) == int(s.timesteps[k])
                x = s.step(x, vs[k])
        return x
    first = run()
    assert int(s.counter) == 7
    s.reset()
    assert int(s.counter) == 0
    assert torch.equal(run(), first)


# -------------------------------------------------------------------------------- bad inputs

def test_error_unknown_method_and_renorm():
    with pytest.raises(ValueError, match="method"):
        sk.FlowSampler("ddim", num_steps=4)
    with pytest.raises(ValueError, match="renorm"):
        sk.FlowSampler("euler", num_steps=4, renorm="pixel")
    with pytest.raises(ValueError, match="schedule"):
        sk.flow_sigmas(4, schedule="cosine")


@pytest.mark.parametrize("sigmas,match", [
    ([1.0, 0.5, 0.6, 0.0], "decreasing"),
    ([1.0, 0.5, 0.5, 0.0], "decreasing"),
    ([1.0, 0.5, 0.1], "last value"),
    ([1.5, 0.5, 0.0], r"\[0, 1\]"),
    ([1.0, float("nan"), 0.0], "finite"),
    ([0.0], "at least 2"),
    ([0.5, 0.5 - 1e-12, 0.0], "strictly decreasing as float32"),
    ([0.9, 0.3 + 1e-10, 0.3, 0.0], "strictly decreasing as float32"),
    ([0.5, 1e-50, 0.0], "strictly decreasing as float32"),
])
def test_error_bad_sigmas(sigmas, match):
    with pytest.raises(ValueError, match="sigmas.*" + match):
        sk.FlowSampler("euler", sigmas=sigmas)


def test_error_schedule_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        sk.FlowSampler("euler")
    with pytest.raises(ValueError, match="num_steps"):
        sk.FlowSampler("euler", sigmas=[1.0, 0.5, 0.0], num_steps=3)
    with pytest.raises(ValueError, match="num_steps"):
        sk.flow_sigmas(0)
    with pytest.raises(TypeError, match="num_steps"):
        sk.flow_sigmas(2.5)
    with pytest.raises(ValueError, match="shift"):
        sk.flow_sigmas(4, shift=-1.0)
    with pytest.raises(ValueError, match="mu"):
        sk.flow_sigmas(4, use_dynamic_shifting=True)
    for schedule in ("diffusers", "dpmsolver"):
        for mu in (float("nan"), float("inf"), 800.0, -800.0):
            with pytest.raises(ValueError, match="mu: expected a finite value"):
                sk.flow_sigmas(4, schedule=schedule, use_dynamic_shifting=schedule == "diffusers", mu=mu)
        with pytest.raises(TypeError, match="mu: expected a float"):
            sk.flow_sigmas(4, schedule=schedule, use_dynamic_shifting=schedule == "diffusers", mu="1.0")
    for schedule in ("dpmsolver", "linear"):   # the diffusers schedule's own options are not ignored
        for kw in (dict(use_karras_sigmas=True), dict(shift_terminal=0.1), dict(use_dynamic_shifting=True, mu=0.5),
                   dict(time_shift_type="linear"), dict(use_exponential_sigmas=True)):
            with pytest.raises(ValueError, match=f"options of the \"diffusers\" schedule, not of '{schedule}'"):
                sk.flow_sigmas(4, schedule=schedule, **kw)
    with pytest.raises(ValueError, match="mu, image_seq_len: options"):
        sk.flow_sigmas(4, schedule="linear", mu=0.5, image_seq_len=1024)
    for bad in (0.0, -1.0, float("nan")):   # shift is validated also where sigmas are given
        with pytest.raises(ValueError, match="shift"):
            sk.FlowSampler("dpmsolver++2m", sigmas=[1.0, 0.5, 0.0], shift=bad)
    with pytest.raises(TypeError, match="shift"):
        sk.FlowSampler("euler", sigmas=[1.0, 0.5, 0.0], shift="x")
    with pytest.raises(ValueError, match="mu: with mu=30.0 the float32 sigmas are not strictly decreasing"):
        sk.flow_sigmas(4, use_dynamic_shifting=True, mu=30.0)
    with pytest.raises(ValueError, match="shift_terminal"):
        sk.flow_sigmas(1, shift=3.0, shift_terminal=0.1)
    with pytest.raises(ValueError, match="guidance_interval"):
        sk.FlowSampler("euler", num_steps=4, guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="renorm_min"):
        sk.FlowSampler("euler", num_steps=4, renorm="global", renorm_min=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_infinite_velocity_gives_infinities_as_diffusers(backend, method):
    """An infinite velocity element: the solvers' x0 = x - sigma v is infinite there, and a term
    whose coefficient is 0 (Euler's and Heun's x0 term) must not turn it into 0 * inf = NaN; the
    other elements are unaffected. diffusers' scheduler step on the same inputs is the oracle.
    (DPM-Solver++ uses x0 itself, and its inf - inf differs from diffusers' arithmetic.)"""
    n, shift = 3, 3.0
    a = sk.FlowSampler(method, num_steps=n, shift=shift)
    sc = _diffusers_scheduler(method, shift)
    sc.set_timesteps(n)
    x = torch.randn(1, 4, 3, 3)
    xs, xd = x.clone(), x.clone()
    with sk.backend(backend):
        for i in range(a.num_evals):
            v = torch.randn_like(x)
            v[0, 1, 2, 0] = float("inf")
            xs = a.step(xs, v)
            xd = sc.step(v, sc.timesteps[i], xd, return_dict=False)[0]
            assert torch.equal(xs.isnan(), xd.isnan()) and torch.equal(xs.isinf(), xd.isinf()), (i, xs, xd)
            ok = torch.isfinite(xd)
            torch.testing.assert_close(xs[ok], xd[ok], atol=1e-5, rtol=1e-5)
            if not torch.isfinite(xs).all():
                break


def test_error_out_overlapping_the_inputs():
    """out=x (the same elements) updates in place; an out that overlaps x elsewhere, or any
    branch, is refused (the kernels read and write in an order of their choosing)."""
    s = sk.FlowSampler("euler", num_steps=4, guidance=3.0)
    buf = torch.randn(2 * 40 + 1)
    x, vc, vu = buf[:40].view(2, 4, 5), torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="out: must be x itself"):
        s.step(x, vc, vu, out=buf[1:41].view(2, 4, 5))
    with pytest.raises(ValueError, match="out: must not share memory with v_cond"):
        s.step(x, vc, vu, out=vc)
    with pytest.raises(ValueError, match="out: must not share memory with v_uncond"):
        s.step(x, vc, vu, out=vu)
    assert s._host_step == 0
    want = x + (s.sigmas[1] - s.sigmas[0]) * (vu + 3.0 * (vc - vu))
    got = s.step(x, vc, vu, out=buf[:40].view(2, 4, 5))   # x's elements through another view: in place
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x, want, atol=1e-6, rtol=1e-6)


def test_error_mismatched_branches():
    s = sk.FlowSampler("euler", num_steps=4, guidance=3.0, image_guidance=2.0)
    x = torch.randn(2, 4, 8, 8)
    v = torch.randn_like(x)
    with pytest.raises(ValueError, match="v_cond"):
        s.step(x, torch.randn(2, 4, 8, 9), v)
    with pytest.raises(ValueError, match="v_uncond"):
        s.step(x, v, torch.randn(2, 4, 8, 7), v)
    with pytest.raises(ValueError, match="v_img_uncond"):
        s.step(x, v, v, torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="v_uncond"):
        s.step(x, v, v.half(), v)
    with pytest.raises(ValueError, match="v_uncond"):
        s.step(x, v)  # guidance > 1 needs the unconditional branch
    with pytest.raises(ValueError, match="v_img_uncond"):
        s.step(x, v, v)  # image_guidance > 1 needs the image branch
    with pytest.raises(ValueError, match="x"):
        s.step(x.double(), v, v, v)
    with pytest.raises(ValueError, match="x"):
        s.step(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="out"):
        s.step(x, v, v, v, out=torch.empty(2, 4, 8, 8, dtype=torch.float16))
    s.step(x, v, v, v)
    with pytest.raises(ValueError, match="x"):  # the state shape is fixed after the first step
        s.step(torch.randn(2, 4, 8, 10), *(torch.randn(2, 4, 8, 10) for _ in range(3)))


def test_error_same_view_other_shape():
    # [2, 8, 16] and [2, 8, 4, 4] are both [B, P, Q] = [2, 8, 16], but a per-token renorm runs over
    # the last axis of the first and over the channels of the second: one sampler takes one shape
    s = sk.FlowSampler("heun", num_steps=4, guidance=3.0, renorm="token")
    x = torch.randn(2, 8, 16)
    s.step(x, torch.randn_like(x), torch.randn_like(x))
    y = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"state is for x of shape \(2, 8, 16\) but got shape \(2, 8, 4, 4\)"):
        s.step(y, torch.randn_like(y), torch.randn_like(y))


def test_error_stepping_past_the_end():
    s = sk.FlowSampler("dpmsolver++2m", num_steps=2)
    x = torch.randn(1, 8, 4)
    for _ in range(2):
        x = s.step(x, torch.randn_like(x))
    with pytest.raises(ValueError, match="past the last step"):
        s.step(x, torch.randn_like(x))
    s.reset()
    s.step(x, torch.randn_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_gate_and_identity_past_the_end(backend):
    # guidance <= 1: v = v_cond even when v_uncond is given (BAGEL's / diffusers' pipelines' gate)
    s = sk.FlowSampler("euler", num_steps=2, guidance=1.0)
    x, vc, vu = (torch.randn(2, 3, 5, 5) for _ in range(3))
    with sk.backend(backend):
        got = s.step(x, vc, vu)
    assert torch.equal(got, x + (s.sigmas[1] - s.sigmas[0]) * vc)
    # the device counter past the last evaluation selects the identity row (out = x), and keeps counting
    s._state.fill_(5)
    out = torch.full_like(x, float("nan"))
    with sk.backend(backend):
        sp_mod._flow_step_op(x, vc, vu, None, out, None, None, s.table, s._state, None, 0, 0.0)
    assert torch.equal(out, x) and int(s.counter) == 6


def test_custom_op_opcheck():
    s = sk.FlowSampler("dpmsolver++2m", num_steps=3, guidance=2.0)
    x = torch.randn(1, 4, 3, 5)
    h1 = torch.zeros(1, 4, 15)
    args = (x, torch.randn_like(x), torch.randn_like(x), None, torch.empty_like(x), h1, None, s.table, s._state.clone(),
            None, 0, 0.0)
    torch.library.opcheck(torch.ops.spar.flow_sampler_step.default, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_traces_the_step():
    kw = dict(num_steps=4, guidance=3.0, renorm="token")
    s, s_eager = sk.FlowSampler("dpmsolver++2m", **kw), sk.FlowSampler("dpmsolver++2m", **kw)
    x, vc, vu = (torch.randn(1, 7, 16) for _ in range(3))
    compiled = torch.compile(lambda x, vc, vu: s.step(x, vc, vu), fullgraph=True, backend="aot_eager")
    y, y_eager = x, x
    for _ in range(2):
        y, y_eager = compiled(y, vc, vu), s_eager.step(y_eager, vc, vu)
        assert torch.equal(y, y_eager)
    assert int(s.counter) == 2


# ------------------------------------------------ devices, branches by step, the C++ twin's paths

@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_sampler_on_cuda_device_steps_cuda0_tensors(device):
    # torch.device("cuda") != torch.device("cuda:0"): the sampler resolves its device, and every
    # device check compares type and resolved index (spar_kernels._device.same_device)
    from spar_kernels import _ext
    from spar_kernels.testing import fake_cuda

    with fake_cuda() as rec:
        s = sk.FlowSampler("heun", num_steps=2, guidance=3.0, renorm="global", device=device)
        assert s.device == torch.device("cuda:0") and s.table.device == torch.device("cuda:0")
        x = torch.randn(2, 4, 8, 8, device="cuda")
        for _ in range(s.num_evals):
            x = s.step(x, torch.randn_like(x), torch.randn_like(x), out=x)
        assert x.device == torch.device("cuda:0") and x.shape == (2, 4, 8, 8)
    want = "cuda" if _ext.has_cuda_extension() else "reference"
    assert dict(rec.backends["flow_sampler_step"]) == {want: s.num_evals}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renorm", ["global", "channel", "token"])
def test_unconditional_branch_only_where_the_step_guides(backend, renorm):
    # BAGEL skips the unconditional pass outside its guidance interval: v_uncond is needed only
    # at evaluations that guide, for every renorm mode
    kw = dict(num_steps=4, guidance=3.0, guidance_interval=(0.6, 1.0), renorm=renorm)
    a, b = sk.FlowSampler("euler", **kw), sk.FlowSampler("euler", **kw)
    guided = [0.6 < float(t) <= 1.0 for t in a.eval_sigmas]
    assert guided == [True, True, False, False]
    x = torch.randn(2, 3, 4, 5)
    xa = xb = x
    with sk.backend(backend):
        for k in range(4):
            vc, vu = torch.randn_like(x), torch.randn_like(x)
            xa = a.step(xa, vc, vu if guided[k] else None)
            xb = b.step(xb, vc, vu)  # given but unused where the step does not guide
            assert torch.equal(xa, xb)
    c = sk.FlowSampler("euler", **kw)
    with sk.backend(backend), pytest.raises(ValueError, match="v_uncond: guidance=3.0 > 1 is on at evaluation 0"):
        c.step(x, torch.randn_like(x))
    d = sk.FlowSampler("euler", num_steps=2, guidance=1.0, renorm=renorm)  # never guides
    with sk.backend(backend):
        d.step(x, torch.randn_like(x))


def test_cuda_launcher_needs_v_uncond_only_where_the_step_guides():
    # the CUDA host launcher cannot see the device-side row: it must not demand v_uncond for a
    # renorm mode (the kernels check flow::missing_input, shared with the CPU twin). Sizes 0: the
    # launcher validates its arguments and returns without touching a GPU.
    from spar_kernels import _ext

    if not _ext.has_cuda_extension():
        pytest.skip(f"the CUDA extension is not built: {_ext.cuda_extension_error()}")
    fn = _ext.cuda_kernel("flow_sampler_step")
    args = lambda stats, mode: (0, 0, 0, 0, 0, *([0] * 16), 0, 0, 0, 0, 13, 0, stats, mode, 0.0, 0)  # noqa: E731
    for mode in (sp_mod.RENORM_GLOBAL, sp_mod.RENORM_COL):
        fn(*args(256, mode))  # no v_uncond (pointer 0), a stats workspace: fine
        with pytest.raises(ValueError, match="needs the stats workspace"):
            fn(*args(0, mode))
    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "csrc" / "flow_sampler"
    for src in ("flow_sampler.cu", "flow_sampler_cpu.cpp"):  # one condition, in the shared header
        assert "flow::missing_input(" in (root / src).read_text()


def test_cuda_sampler_reductions_have_a_fixed_order():
    # bitwise-reproducible renorm on the GPU: no float atomics in the sampler's kernels (the only
    # atomic is the integer done count of the last-block pattern)
    import re
    from pathlib import Path

    src = (Path(__file__).resolve().parents[1] / "csrc" / "flow_sampler" / "flow_sampler.cu").read_text()
    calls = re.findall(r"atomic\w+\(([^,]*),", src)
    assert calls and all("unsigned*" in first for first in calls), calls
    assert "atomicAdd(a.stats" not in src and "cudaMemsetAsync" not in src


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("method,renorm,shape", [
    ("heun", None, (1, 3, 40, 30)),               # rows of 1,200 (a strided branch, so not merged): two
                                                  # update chunks, the last partial
    ("dpmsolver++2m", "global", (2, 300, 9)),     # many short rows, one factor per sample
    ("euler", "channel", (2, 5, 70, 9)),          # per-(b, q) factors over chunks
    ("euler", "token", (2, 3, 520)),              # per-row factors over chunks
    ("euler", "text_token", (2, 3, 260)),
    ("euler", "global", (300, 256)),              # from 65,536 elements: rows over OpenMP threads
    ("heun", "channel", (1, 8, 100, 90)),
])
def test_cpu_twin_chunks_and_instruction_sets(monkeypatch, isa, method, renorm, shape):
    # every instruction-set variant the CPU runs (SPAR_CPU_ISA picks one, never one it lacks),
    # rows longer than the twin's 256-element sums chunk, strided branches
    monkeypatch.setenv("SPAR_CPU_ISA", isa)
    kw = dict(num_steps=3, shift=3.0, guidance=4.0, image_guidance=1.5, renorm=renorm, renorm_min=0.1)
    a, b = sk.FlowSampler(method, **kw), sk.FlowSampler(method, **kw)
    for dtype in (torch.float32, torch.bfloat16):
        a.reset(), b.reset()
        x = torch.randn(shape).to(dtype)
        for _ in range(a.num_evals):
            big = torch.randn((2,) + shape).to(dtype)
            vs = [big[0], torch.randn(shape).to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2),
                  big[1]]
            with sk.backend("cpu"):
                xa = a.step(x, *vs)
            with sk.backend("reference"):
                xb = b.step(x, *vs)
            tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
            torch.testing.assert_close(xa.float(), xb.float(), atol=tol, rtol=tol)
            x = xa


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_twin_converts_every_16bit_value(monkeypatch, isa, dtype):
    # every bit pattern (subnormals, inf, nan included) in and out of the twin's branch-free
    # conversions: out = 0 + dt * v in v's dtype, as torch rounds it
    monkeypatch.setenv("SPAR_CPU_ISA", isa)
    v = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    x = torch.zeros(256, 256, dtype=dtype)
    got = {}
    for backend in BACKENDS:
        s = sk.FlowSampler("euler", sigmas=[1.0, 0.75, 0.0])
        with sk.backend(backend):
            got[backend] = s.step(x, v)
    a, b = got["cpu"], got["reference"]
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    assert torch.equal(a[~nan].view(torch.int16), b[~nan].view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_interval_bounds_and_unit_image_guidance(backend):
    """BAGEL's rule at the interval's bounds: guidance is on for lo < sigma <= hi, so with the
    interval (0.5, 1.0] and evaluation sigmas 1.0, 0.75, 0.5, 0.25 the steps at 1.0 and 0.75 are
    guided and the one at exactly 0.5 is not. image_guidance = 1.0 is no image guidance (BAGEL
    applies it when cfg_img_scale > 1): the steps run without v_img_uncond."""
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    sampler = sk.FlowSampler("euler", sigmas=sigmas, guidance=3.0, image_guidance=1.0, guidance_interval=(0.5, 1.0))
    x = torch.randn(2, 9, 8)
    with sk.backend(backend):
        for k in range(4):
            vc, vu = torch.randn_like(x), torch.randn_like(x)
            got = sampler.step(x, vc, vu)
            v = vu + 3.0 * (vc - vu) if k < 2 else vc
            torch.testing.assert_close(got, x + (sigmas[k + 1] - sigmas[k]) * v, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("method", METHODS)
def test_step_sigmas_host_is_the_schedule_on_the_host(method):
    s = sk.FlowSampler(method, num_steps=7, shift=3.0)
    assert s.step_sigmas_host.device.type == "cpu"
    assert torch.equal(s.step_sigmas_host, s.step_sigmas.cpu()) and s.step_sigmas_host.shape == (8,)


@pytest.mark.parametrize("renorm", ["global", "token", "channel", "text_token"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e20])
def test_renorm_of_a_non_finite_norm_stays_nan_as_in_the_reference(renorm, bad):
    """One inf / NaN in a renorm group (or a finite value whose square overflows fp32) makes the
    group's factor NaN, as torch.clamp keeps it (BAGEL's renorm); the twin's fmaxf used to turn it
    into renorm_min, which with renorm_min = 0 silently returned x."""
    torch.manual_seed(0)
    x, vc, vu = (torch.randn(1, 4, 8) for _ in range(3))
    vc[0, 0, 0] = bad
    kw = dict(num_steps=4, guidance=3.0, renorm=renorm, renorm_min=0.0)
    twin = sk.FlowSampler("euler", **kw).step(x, vc, vu)
    with sk.backend("reference"):
        ref = sk.FlowSampler("euler", **kw).step(x, vc, vu)
    assert ref.isnan().any()
    torch.testing.assert_close(twin, ref, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_extreme_shifts_are_refused_naming_shift():
    """A shift that pushes DPM-Solver's float32 sigmas together at 1 (two sigmas of 1 in a row
    made NaN latents) and one whose Euler schedule underflows are errors naming shift (the latter
    used to name shift_terminal, which the caller never passed); a large shift that keeps them
    strictly decreasing steps to finite values."""
    with pytest.raises(ValueError, match="shift: with shift=100000000.0 the float32 sigmas are not strictly decreasing"):
        sk.FlowSampler("dpmsolver++2m", num_steps=20, shift=1e8)
    with pytest.raises(ValueError, match="shift: with shift=1e-13 the schedule is not finite"):
        sk.FlowSampler("euler", num_steps=20, shift=1e-13)
    s = sk.FlowSampler("dpmsolver++2m", num_steps=20, shift=1e6, guidance=1.0)
    x = torch.randn(1, 4, 8, 8)
    for _ in range(s.num_evals):
        x = s.step(x, torch.randn(1, 4, 8, 8))
    assert bool(torch.isfinite(x).all())
