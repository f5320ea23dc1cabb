"""Fused flow-matching sampler steps with classifier-free guidance, schedules kept on the device.

:class:`FlowSampler` precomputes, at construction and on the host, one row of float32
coefficients per model evaluation (the ``COL_*`` / ``F_*`` constants below define the row) into a
device table; ``step`` runs one fused kernel that picks its row with a device-side int32 counter,
combines the guidance branches (CFG, BAGEL's image branch, renorm, guidance interval), applies the
solver, writes the next state, updates the solver's fp32 history and advances the counter. No host
sync and no Python branching on tensor values, so a whole denoising loop can be captured in one
CUDA graph (a host-side counter only validates, it never feeds the kernel).

The state is viewed as ``[B, P, Q]``: ``[T, C]`` (one packed sample, BAGEL) and ``[B, T, C]`` are
channels-last (P = tokens, Q = channels); ``[B, C, H, W]`` and ``[B, C, F, H, W]`` channels-first
(P = channels, Q = pixels). CUDA C++ in csrc/flow_sampler/ with its CPU twin; the per-element math
is shared through csrc/flow_sampler/flow_sampler.h.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from . import _backend, _ext
from ._device import resolve_device
from ._op import (_any_requires_grad, _grad_enabled, _increment_version, _is_compiling, _len_dispatch_stack,
                  device_guard, is_tracing, layout_guard, normal_tensors, spar_op)
from ._validate import FLOAT_DTYPES, byte_span, check_out, check_tensor
from .schedules import _check_shift, dpmsolver_flow_sigmas_f64, flow_sigmas

METHODS = ("euler", "heun", "dpmsolver++2m")
RENORMS = ("global", "channel", "token", "text_token")
NUM_TRAIN_TIMESTEPS = 1000  # diffusers' num_train_timesteps: timesteps = sigmas * 1000

# The coefficient table: one row per model evaluation, shared with csrc/flow_sampler/flow_sampler.h
# (enum Col / Flag); the reference (spar_kernels.reference.flow_sampler) reads the same names.
COL_SIGMA, COL_CX, COL_CV, COL_C0, COL_C1, COL_C2, COL_G, COL_GI, COL_FLAGS = range(9)
NCOL = 12  # padded to 48 bytes
F_CFG, F_IMG, F_RENORM, F_STORE_H1_X, F_STORE_H1_X0, F_STORE_H2_V, F_READ_H1, F_READ_H2 = (
    1, 2, 4, 8, 16, 32, 64, 128)
F_RENORM_TEXT = 256  # BAGEL's "text_channel": renorm the text-guided velocity, before the image branch
RENORM_NONE, RENORM_GLOBAL, RENORM_ROW, RENORM_COL = 0, 1, 2, 3

from .reference import flow_sampler as _ref  # noqa: E402  (it reads the table constants above)

_current_backend = _backend._current.get  # the name of the backend in force (a ContextVar)


# ---------------------------------------------------------------------------------------------
# dispatch

def _layout(x: torch.Tensor) -> tuple[int, int, int, bool]:
    """(B, P, Q, channels_last) of the [B, P, Q] view of a state."""
    if x.dim() == 2:
        return 1, x.shape[0], x.shape[1], True
    if x.dim() == 3:
        return x.shape[0], x.shape[1], x.shape[2], True
    shape = tuple(x.shape)
    q = 1
    for d in shape[2:]:
        q *= d
    return shape[0], shape[1], q, False


def _view3(t, B, P, Q):
    return None if t is None else t.reshape(B, P, Q)


def _impl_reference(x, v_cond, v_uncond, v_img_uncond, out, h1, h2, table, counter, stats, renorm_mode,
                    renorm_min):
    B, P, Q, _ = _layout(x)
    _ref.flow_step(_view3(x, B, P, Q), _view3(v_cond, B, P, Q), _view3(v_uncond, B, P, Q),
                   _view3(v_img_uncond, B, P, Q), out.view(B, P, Q), h1, h2, table, counter, renorm_mode,
                   renorm_min)


def _branch_args(B, P, Q, x, v_cond, v_uncond, v_img_uncond, keep: list) -> list:
    """(pointer, stride b, stride p, stride q) of each state / branch tensor as [B, P, Q]."""
    args = []
    for t in (x, v_cond, v_uncond, v_img_uncond):
        if t is None:
            args += (0, 0, 0, 0)
        elif t.is_contiguous():  # dense: the [B, P, Q] strides follow from the sizes
            args += (t.data_ptr(), P * Q, Q, 1)
        else:
            t3 = t.reshape(B, P, Q)  # a view whenever the layout allows, else a copy (kept alive by keep)
            keep.append(t3)
            args += (t3.data_ptr(), *t3.stride())
    return args


def _ptr(t):
    return t.data_ptr() if t is not None else 0


def _ext_args(x, v_cond, v_uncond, v_img_uncond, out, h1, h2, table, counter, stats, renorm_mode, renorm_min):
    B, P, Q, _ = _layout(x)
    keep = []
    args = _branch_args(B, P, Q, x, v_cond, v_uncond, v_img_uncond, keep)
    return keep, (_ext.dtype_code(x), _ext.dtype_code(v_cond), B, P, Q, *args, out.data_ptr(), _ptr(h1), _ptr(h2),
                  table.data_ptr(), table.shape[0], counter.data_ptr(), _ptr(stats), renorm_mode, renorm_min)


def _impl_cpu(*a):
    keep, args = _ext_args(*a)
    _ext.cpu_twin("flow_sampler_step")(*args)


def _impl_cuda(*a):
    x = a[0]
    keep, args = _ext_args(*a)
    with device_guard(x):
        _ext.cuda_kernel("flow_sampler_step")(*args, _ext.stream_of(x))


_IMPLS = {"cuda": _impl_cuda, "cpu": _impl_cpu, "reference": _impl_reference}


@spar_op("flow_sampler_step", mutates_args=("out", "h1", "h2", "counter", "stats"), impls=_IMPLS,
         inplace=(("out", "x"),))
def _flow_step_op(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None,
                  v_img_uncond: torch.Tensor | None, out: torch.Tensor, h1: torch.Tensor | None,
                  h2: torch.Tensor | None, table: torch.Tensor, counter: torch.Tensor,
                  stats: torch.Tensor | None, renorm_mode: int, renorm_min: float) -> None: ...


# ---------------------------------------------------------------------------------------------
# coefficient tables (host, float64 math on the float32 sigmas the solver steps between)

def _flow_lambda(s: float) -> float:
    """log(alpha) - log(sigma) with alpha = 1 - sigma (the DPM-Solver half-log-SNR of flow sigmas)."""
    a = 1.0 - s
    la = -math.inf if a <= 0 else math.log(a)
    ls = -math.inf if s <= 0 else math.log(s)
    return la - ls


def _dpm_rows(s: np.ndarray) -> list[tuple]:
    """(sigma, cx, c0, c1, flags) per step of DPM-Solver++ 2M (midpoint), as diffusers runs it:
    first order at step 0 and at the final step (final sigma 0), second order in between."""
    n = len(s) - 1
    rows = []
    for k in range(n):
        st, s0 = float(s[k + 1]), float(s[k])
        at = 1.0 - st
        h = _flow_lambda(st) - _flow_lambda(s0)
        em1 = math.exp(-h) - 1.0  # exp(-inf) - 1 = -1 at the final sigma 0
        cx = st / s0
        if k == 0 or k == n - 1:
            rows.append((s0, cx, -at * em1, 0.0, F_STORE_H1_X0))
        else:
            h0 = _flow_lambda(s0) - _flow_lambda(float(s[k - 1]))
            inv_r0 = h / h0 if math.isfinite(h0) else 0.0  # D1 = (m0 - m1) / r0, r0 = h0 / h
            c0 = -at * em1 * (1.0 + 0.5 * inv_r0)
            c1 = 0.5 * at * em1 * inv_r0
            rows.append((s0, cx, c0, c1, F_STORE_H1_X0 | F_READ_H1))
    return rows


def _build_table(method, s32: np.ndarray, guidance, image_guidance, interval, renorm) -> tuple[np.ndarray, np.ndarray]:
    """The [evals + 1, NCOL] float32 table (the extra last row is the identity) and the sigma
    at which the model is evaluated for each row."""
    n = len(s32) - 1
    R = _ref
    rows = []  # (eval_sigma, dict of columns, flags)
    if method == "euler":
        for k in range(n):
            dt = np.float32(s32[k + 1]) - np.float32(s32[k])  # float32, as diffusers
            rows.append((s32[k], {R.COL_SIGMA: s32[k], R.COL_CX: 1.0, R.COL_CV: dt}, 0))
    elif method == "heun":
        for k in range(n):
            dt = np.float32(s32[k + 1]) - np.float32(s32[k])
            if k == n - 1:  # diffusers ends on an Euler step to sigma 0
                rows.append((s32[k], {R.COL_SIGMA: s32[k], R.COL_CX: 1.0, R.COL_CV: dt}, 0))
                continue
            rows.append((s32[k], {R.COL_SIGMA: s32[k], R.COL_CX: 1.0, R.COL_CV: dt},
                         R.F_STORE_H1_X | R.F_STORE_H2_V))
            half = float(dt) * 0.5
            rows.append((s32[k + 1], {R.COL_SIGMA: s32[k + 1], R.COL_CX: 0.0, R.COL_CV: half, R.COL_C1: 1.0,
                                      R.COL_C2: half}, R.F_READ_H1 | R.F_READ_H2))
    else:
        for sig, cx, c0, c1, fl in _dpm_rows(s32.astype(np.float64)):
            rows.append((np.float32(sig), {R.COL_SIGMA: sig, R.COL_CX: cx, R.COL_C0: c0, R.COL_C1: c1}, fl))
    table = np.zeros((len(rows) + 1, R.NCOL), dtype=np.float32)
    eval_sigmas = np.zeros(len(rows), dtype=np.float32)
    for i, (es, cols, fl) in enumerate(rows):
        for c, v in cols.items():
            table[i, c] = v
        # BAGEL: t > lo and t <= hi with t a float32 tensor, so torch compares in float32
        lo, hi = (np.float32(v) if abs(v) <= 3.4e38 else np.float32(math.copysign(math.inf, v)) for v in interval)
        cfg = guidance > 1.0 and np.float32(es) > lo and np.float32(es) <= hi
        if cfg:
            fl |= R.F_CFG
            if image_guidance is not None and image_guidance > 1.0:
                fl |= R.F_IMG
            if renorm is not None:
                fl |= R.F_RENORM
            if renorm == "text_token":
                fl |= R.F_RENORM_TEXT
        table[i, R.COL_G] = guidance
        table[i, R.COL_GI] = 1.0 if image_guidance is None else image_guidance
        table[i, R.COL_FLAGS] = fl
        eval_sigmas[i] = es
    table[-1, R.COL_CX] = 1.0  # past the end: out = x
    return table, eval_sigmas


# ---------------------------------------------------------------------------------------------
# public API

def _check_float(name, v, *, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite value, got {v}")
    return float(v)


def _as_sigmas(sigmas) -> np.ndarray:
    if isinstance(sigmas, torch.Tensor):
        arr = sigmas.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(sigmas, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError("sigmas: expected a 1-D tensor or sequence of floats, "
                            f"got {type(sigmas).__name__}") from None
    if arr.ndim != 1 or arr.shape[0] < 2:
        raise ValueError(f"sigmas: expected a 1-D sequence of at least 2 values (N steps + final 0), "
                         f"got shape {tuple(arr.shape)}")
    return arr


class FlowSampler:
    """A flow-matching solver with fused guidance, its schedule and step counter on the device.

    Args:
        method: ``"euler"`` (FlowMatchEulerDiscreteScheduler), ``"heun"``
            (FlowMatchHeunDiscreteScheduler: two model evaluations per step, the last step Euler) or
            ``"dpmsolver++2m"`` (DPMSolverMultistepScheduler with ``prediction_type="flow_prediction"``,
            ``use_flow_sigmas=True``, ``solver_order=2``, ``algorithm_type="dpmsolver++"``, midpoint).
        sigmas: the ``N + 1`` sigmas, strictly decreasing, in [0, 1], ending in 0 (a tensor, array or
            list; used as given, ``shift`` is not applied to them). For ``"heun"``, diffusers'
            interleaved ``FlowMatchHeunDiscreteScheduler.sigmas`` are accepted too. For
            ``"dpmsolver++2m"`` the int64 timesteps are ``trunc(sigma * 1000)``; diffusers' own
            float32 flow sigmas are recognized and their float64 originals used, so the timesteps
            match diffusers' exactly.
        num_steps: number of solver steps when ``sigmas`` is None: the schedule is
            ``flow_sigmas(num_steps, shift=shift)`` (``schedule="dpmsolver"`` for
            ``"dpmsolver++2m"``, ``"diffusers"`` otherwise).
        shift: the timestep shift of that schedule.
        guidance: text (or plain) CFG scale ``g``: ``v = v_uncond + g (v_cond - v_uncond)``, applied
            when ``g > 1`` (BAGEL's and diffusers' pipelines' gate); otherwise ``v = v_cond``.
        image_guidance: BAGEL's image scale: ``v = v_img_uncond + g_img (v_txt - v_img_uncond)``
            when ``g_img > 1`` (and text guidance is on).
        guidance_interval: ``(lo, hi)``: guidance (with its image branch and renorm) applies at an
            evaluation whose sigma ``t`` satisfies ``lo < t <= hi`` (BAGEL's ``cfg_interval``),
            compared in float32 as BAGEL's float32 ``t`` is.
        renorm: None, ``"global"`` (one norm per sample), ``"channel"`` (one per channel) or
            ``"token"`` (one per token): ``v *= clamp(|v_cond| / (|v| + 1e-8), renorm_min, 1)``.
            BAGEL's ``"global"`` is ``"global"`` on its packed ``[T, C]`` latents; BAGEL's
            ``"channel"`` (``torch.norm(v, dim=-1)`` on ``[T, C]``) is one norm per token, ``"token"``.
            ``"text_token"`` is BAGEL's ``"text_channel"``: the text-guided velocity is renormed per
            token (against ``v_cond``) before the image branch is applied.
        renorm_min: the lower clamp of the renorm factor, in [0, 1].
        device: where the tables, counter and history live (default: torch's default device);
            stored resolved (``"cuda"`` -> ``cuda:<current device>``), and tensors are checked
            against it by type and resolved index.

    Attributes:
        sigmas: float32 on the device: the sigma of each model evaluation followed by 0, as the
            matching diffusers scheduler's ``sigmas``: ``[N + 1]``, or for ``"heun"`` diffusers'
            interleaved ``[s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0]`` (``2N`` values).
        step_sigmas: float32 ``[N + 1]``: the solver's step boundaries (== ``sigmas`` except Heun).
        step_sigmas_host: ``step_sigmas`` on the host (CPU), for host-side planning without a sync.
        timesteps: the model's timestep per evaluation, on the device: float32 ``sigmas[:-1] * 1000``
            for ``"euler"`` (== FlowMatchEulerDiscreteScheduler.timesteps), the interleaved
            ``[t0, t1, t1, ..., t_{N-1}, t_{N-1}]`` (2N - 1 values) for ``"heun"``
            (== FlowMatchHeunDiscreteScheduler.timesteps), int64 ``trunc(sigma * 1000)`` for
            ``"dpmsolver++2m"`` (== DPMSolverMultistepScheduler.timesteps).
        eval_sigmas: float32 sigma of each evaluation (BAGEL feeds these to its model).
        counter: int32 ``[1]`` device step counter (model evaluations done since ``reset``).
    """

    def __init__(self, method: str, *, sigmas=None, num_steps: int | None = None, shift: float = 1.0,
                 guidance: float = 1.0, image_guidance: float | None = None, guidance_interval=None,
                 renorm: str | None = None, renorm_min: float = 0.0, device=None):
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if renorm is not None and renorm not in RENORMS:
            raise ValueError(f"renorm: expected None or one of {RENORMS}, got {renorm!r}")
        self.method = method
        shift = _check_shift(shift)  # also with sigmas given (DPM-Solver reads it to recover diffusers' timesteps)
        self.guidance = _check_float("guidance", guidance)
        self.image_guidance = _check_float("image_guidance", image_guidance, allow_none=True)
        self.renorm = renorm
        self.renorm_min = _check_float("renorm_min", renorm_min)
        if not 0.0 <= self.renorm_min <= 1.0:
            raise ValueError(f"renorm_min: expected a value in [0, 1], got {renorm_min}")
        if guidance_interval is None:
            interval = (-math.inf, math.inf)
        else:
            if not (isinstance(guidance_interval, (tuple, list)) and len(guidance_interval) == 2):
                raise ValueError(f"guidance_interval: expected a (lo, hi) pair, got {guidance_interval!r}")
            lo = _check_float("guidance_interval[0]", guidance_interval[0])
            hi = _check_float("guidance_interval[1]", guidance_interval[1])
            if lo > hi:
                raise ValueError(f"guidance_interval: expected lo <= hi, got {guidance_interval!r}")
            interval = (lo, hi)
        self.guidance_interval = guidance_interval
        # the resolved device ("cuda" -> cuda:<current>), so it equals the device of tensors made on it
        self.device = resolve_device(device if device is not None else torch.get_default_device())

        s64, t_int = self._schedule(method, sigmas, num_steps, shift)
        s32 = s64.astype(np.float32)
        self.num_steps = len(s32) - 1
        table, eval_sigmas = _build_table(method, s32, self.guidance, self.image_guidance, interval, renorm)
        self.num_evals = table.shape[0] - 1
        # validation only; plain ints so torch.compile treats them as constants
        self._host_flags = tuple(int(f) for f in table[:, COL_FLAGS])
        t32 = torch.from_numpy(s32[:-1].copy()) * NUM_TRAIN_TIMESTEPS  # float32, as diffusers
        if method == "dpmsolver++2m":
            timesteps = torch.from_numpy(t_int)
        elif method == "heun":
            timesteps = torch.cat([t32[:1], t32[1:].repeat_interleave(2)])
        else:
            timesteps = t32
        dev = self.device
        # the sigma of every evaluation, then 0: N + 1 values, or 2N for Heun (diffusers' layout)
        self.sigmas = torch.from_numpy(np.concatenate([eval_sigmas, np.zeros(1, np.float32)])).to(dev)
        self.step_sigmas_host = torch.from_numpy(s32)   # the same on the host (no device read-back)
        self.step_sigmas = self.step_sigmas_host.to(dev)
        self.timesteps = timesteps.to(dev)
        self.eval_sigmas = torch.from_numpy(eval_sigmas).to(dev)
        self.table = torch.from_numpy(table).to(dev)
        # {evaluation index, the CUDA kernel's block-done count}; .counter is the first
        with normal_tensors():  # written by every step, in inference mode or not
            self._state = torch.zeros(2, dtype=torch.int32, device=dev)
        self.counter = self._state[:1]
        self._host_step = 0
        self._shape = None
        self._h1 = self._h2 = self._stats = None
        self._fast = None  # the last eager twin call, replayed by step's fast path (see _fast_entry)
        self._last = None  # weak references to the last twin call's tensors (step builds _fast on a repeat)

    @staticmethod
    def _schedule(method, sigmas, num_steps, shift):
        """float64 sigmas (N + 1, ending in 0) and, for DPM-Solver, its int64 timesteps."""
        if sigmas is None:
            if num_steps is None:
                raise ValueError("num_steps: expected an int when sigmas is None, got None")
            if method == "dpmsolver++2m":
                base = flow_sigmas(num_steps, shift=shift, schedule="dpmsolver")  # validates
                s64 = dpmsolver_flow_sigmas_f64(num_steps, float(shift), NUM_TRAIN_TIMESTEPS)
                t = (s64 * NUM_TRAIN_TIMESTEPS).astype(np.int64)
                return np.concatenate([s64, [0.0]]), t
            s64 = flow_sigmas(num_steps, shift=shift, schedule="diffusers").double().numpy()
            return s64, None
        s = _as_sigmas(sigmas)
        if method == "heun" and len(s) >= 4 and len(s) % 2 == 0 and np.array_equal(s[1:-1:2], s[2:-1:2]):
            s = np.concatenate([s[:1], s[1:-1:2], s[-1:]])  # diffusers' interleaved Heun sigmas
        if not np.all(np.isfinite(s)):
            raise ValueError(f"sigmas: expected finite values, got {s.tolist()}")
        if s[-1] != 0.0:
            raise ValueError(f"sigmas: expected the last value to be 0, got {s[-1]}")
        if not np.all(np.diff(s) < 0):
            raise ValueError(f"sigmas: expected strictly decreasing values, got {s.tolist()}")
        if not np.all(np.diff(s.astype(np.float32)) < 0):
            raise ValueError("sigmas: expected values strictly decreasing as float32 (the sampler steps between "
                             f"the float32 sigmas, and two equal ones make a step of 0), got {s.tolist()}")
        if s[0] > 1.0:
            raise ValueError(f"sigmas: expected values in [0, 1] (flow matching), got first value {s[0]}")
        if num_steps is not None and num_steps != len(s) - 1:
            raise ValueError(f"num_steps: got {num_steps} but sigmas has {len(s)} values ({len(s) - 1} steps)")
        t = None
        if method == "dpmsolver++2m":
            t = (s[:-1] * NUM_TRAIN_TIMESTEPS).astype(np.int64)
            # diffusers' own float32 sigmas: recover its float64 values (and so its exact int64
            # timesteps) when they are DPMSolverMultistepScheduler's flow sigmas for `shift`, or
            # for the shift their first value implies
            n, sig = len(s) - 1, 1.0 - 1.0 / NUM_TRAIN_TIMESTEPS
            s0 = float(s[0])
            shifts = [float(shift)] + ([s0 * (1 - sig) / (sig * (1 - s0))] if 0 < s0 < 1 else [])
            for k in shifts:
                cand = dpmsolver_flow_sigmas_f64(n, k, NUM_TRAIN_TIMESTEPS)
                if np.array_equal(cand.astype(np.float32), s[:-1].astype(np.float32)):
                    t = (cand * NUM_TRAIN_TIMESTEPS).astype(np.int64)
                    break
        return s, t

    # -- state ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """For copy / deepcopy / pickle: everything but the caches of raw pointers into this
        sampler's tensors (the fast path's entry and its weak references), which a copy rebuilds
        from its own tensors on its first step."""
        state = self.__dict__.copy()
        state.update(_fast=None, _last=None)
        # copies of the tensors the twin reaches by pointer: a torch.multiprocessing pickler moves
        # the tensors it is given into shared memory in place, which would leave this sampler's
        # pointers dangling; the counter is a view of the state, remade by __setstate__
        for k in ("_state", "table", "_h1", "_h2", "_stats"):
            if state.get(k) is not None:
                state[k] = state[k].clone()
        del state["counter"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.counter = self._state[:1]

    def reset(self) -> None:
        """Back to the first evaluation (zeroes the device counter; no host sync)."""
        self._state.zero_()
        self._host_step = 0

    def current_timestep(self) -> torch.Tensor:
        """``timesteps[counter]`` as a ``[1]`` device tensor (device-side lookup, capturable)."""
        k = self.counter.long().clamp(max=self.num_evals - 1)
        return self.timesteps.index_select(0, k)

    def current_sigma(self) -> torch.Tensor:
        """``eval_sigmas[counter]`` as a ``[1]`` device tensor (device-side lookup, capturable)."""
        k = self.counter.long().clamp(max=self.num_evals - 1)
        return self.eval_sigmas.index_select(0, k)

    def _buffers(self, x, B, P, Q, mode):
        # the state's [B, P, Q] view and the shape behind it: [B, T, C] and [B, C, H, W] states of the
        # same P and Q put the renorm's token axis on different sides
        key = (B, P, Q, tuple(x.shape))
        if self._shape is not None and self._shape != key:
            raise ValueError(f"x: this sampler's state is for x of shape {self._shape[3]} but got shape "
                             f"{tuple(x.shape)}; use one FlowSampler per latent shape")
        shape = (B, P, Q)
        if self._shape is None:
            dev = self.device
            needs_h1 = self.method != "euler"
            # the CUDA kernel's fixed-order reductions: global keeps per-sample then per-row sums
            n = {RENORM_GLOBAL: B * (P + 1), RENORM_COL: B * Q}.get(mode, 0)
            with normal_tensors():
                self._h1 = torch.zeros(shape, dtype=torch.float32, device=dev) if needs_h1 else None
                self._h2 = torch.zeros(shape, dtype=torch.float32, device=dev) if self.method == "heun" else None
                self._stats = torch.zeros(2 * n, dtype=torch.float32, device=dev) if n else None
            self._shape = key
        return self._h1, self._h2, self._stats

    def _renorm_mode(self, channels_last: bool) -> int:
        if self.renorm is None:
            return RENORM_NONE
        if self.renorm == "global":
            return RENORM_GLOBAL
        per_token = self.renorm in ("token", "text_token")
        along_q = per_token == channels_last  # norm over Q: per token of [T, C]
        return RENORM_ROW if along_q else RENORM_COL

    def step(self, x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None = None,
             v_img_uncond: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Combine the branches, take one solver evaluation step and return the next state.

        ``x``: the state ``[T, C]``, ``[B, T, C]``, ``[B, C, H, W]`` or ``[B, C, F, H, W]`` in fp32 /
        bf16 / fp16; the branches: velocities of x's shape, one dtype among the three. ``out``: an
        optional contiguous buffer of x's shape and dtype (``out=x`` updates in place). For
        ``"heun"`` each call is one model evaluation: call it at ``timesteps[k]`` with the state the
        previous call returned (the odd calls are Heun's corrections). ``v_uncond`` is needed only
        at evaluations where guidance is on, ``v_img_uncond`` only where the image branch is on.
        """
        f = self._fast
        if (f is not None and f[0]() is x and f[1]() is v_cond and f[2]() is v_uncond and f[3]() is v_img_uncond
                and f[4]() is out and not _is_compiling() and not _len_dispatch_stack()
                and _current_backend() == "auto"):
            # the tensors of the last eager twin call: validated then, still valid if their layout
            # and memory are unchanged (a resize_, set_, share_memory_ or .data assignment changes a
            # pointer, dtype, size or stride)
            k = self._host_step
            g, p = f[6], f[7]
            # the guard holds the tensors given (the same objects: the same branches are None)
            if v_img_uncond is not None:
                same = g.check(x, v_cond, v_uncond, v_img_uncond, out)
            else:
                same = g.check(x, v_cond, out) if v_uncond is None else g.check(x, v_cond, v_uncond, out)
            if (same and k < self.num_evals and (not f[5] or not self._host_flags[k] & f[5])
                    and x.data_ptr() == p[0] and v_cond.data_ptr() == p[1]
                    and (v_uncond is None or v_uncond.data_ptr() == p[2])
                    and (v_img_uncond is None or v_img_uncond.data_ptr() == p[3]) and out.data_ptr() == p[4]
                    # the sampler's own counter and table, public attributes (a share_memory_ moves them)
                    and self._state.data_ptr() == p[5] and self.table.data_ptr() == p[6]
                    and (not f[11] or not _grad_enabled())):  # an input requires grad: the warning's path
                # the version first, as the dispatcher bumps it: a tensor that cannot take the write
                # raises before anything is written
                _increment_version((out, self._state))  # the counter (a public view) advances too
                f[9](f[10])
                self._host_step = k + 1
                return out
        dev = self.device
        check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=(2, 3, 4, 5), device=dev)
        check_tensor("v_cond", v_cond, dtypes=FLOAT_DTYPES, device=dev)
        shape = x.shape
        if v_cond.shape != shape:
            raise ValueError(f"v_cond: expected x's shape {tuple(shape)}, got {tuple(v_cond.shape)}")
        if v_uncond is not None:
            self._check_branch("v_uncond", v_uncond, v_cond.dtype, shape)
        if v_img_uncond is not None:
            self._check_branch("v_img_uncond", v_img_uncond, v_cond.dtype, shape)
        k = self._host_step
        if k >= self.num_evals:
            raise ValueError(f"step: stepping past the last step: this sampler has {self.num_evals} model "
                             f"evaluations and all were taken; call reset() to start over")
        row_flags = self._host_flags[k]
        if row_flags & F_CFG and v_uncond is None:
            raise ValueError(f"v_uncond: guidance={self.guidance} > 1 is on at evaluation {k}, "
                             "which needs the unconditional velocity, got None")
        if row_flags & F_IMG and v_img_uncond is None:
            raise ValueError(f"v_img_uncond: image_guidance={self.image_guidance} > 1 is on at evaluation "
                             f"{k}, which needs the image-unconditional velocity, got None")
        if v_img_uncond is not None and v_uncond is None:
            raise ValueError("v_img_uncond: given without v_uncond (BAGEL's image branch guides the "
                             "text-guided velocity)")
        given_out = out
        if out is None:
            out = torch.empty(shape, dtype=x.dtype, device=x.device)
        else:
            check_out("out", out, shape, x.dtype, dev)
            _check_out_aliasing(out, x, v_cond, v_uncond, v_img_uncond)
        B, P, Q, channels_last = _layout(x)
        mode = self._renorm_mode(channels_last)
        h1, h2, stats = self._buffers(x, B, P, Q, mode)
        if x.numel() == 0:
            self.counter.add_(1)
            self._host_step = k + 1
            return out
        if is_tracing(x):
            _flow_step_op(x, v_cond, v_uncond, v_img_uncond, out, h1, h2, self.table, self._state, stats, mode,
                          self.renorm_min)
        elif _flow_step_op.select(x.device) is _impl_cpu:
            # eager on the C++ twin. The sampler's own pointers are read every call: a
            # share_memory_ (or a torch.multiprocessing queue) moves a tensor's bytes in place
            tail = (_ptr(h1), _ptr(h2), self.table.data_ptr(), self.table.shape[0], self._state.data_ptr(),
                    _ptr(stats), mode, self.renorm_min)
            keep = []
            args = _branch_args(B, P, Q, x, v_cond, v_uncond, v_img_uncond, keep)
            args = (_ext.dtype_code(x), _ext.dtype_code(v_cond), B, P, Q, *args, out.data_ptr(), *tail)
            rg = _any_requires_grad(x, v_cond, v_uncond, v_img_uncond, given_out)
            if rg and _grad_enabled():
                _flow_step_op.warn_no_backward(stacklevel=3)  # the twin records nothing, as the op would
            _increment_version((out, self._state))  # first, as the dispatcher (out and the counter)
            _twin()(*args)
            # the fast path's entry, built on the second call in a row with the same objects (a
            # loop over static buffers): a caller passing fresh views each step (the runtime's
            # v[:B], v[B:]) does not pay for an entry it never replays. Weak references, not ids:
            # a fresh view often gets the id of the one that died.
            last, ts = self._last, (x, v_cond, v_uncond, v_img_uncond, given_out)
            replay = (given_out is not None and not keep and last is not None  # nothing to replay for a fresh
                      and all(r() is t for r, t in zip(last, ts)))               # out or a branch copy
            self._last = tuple(_none if t is None else weakref.ref(t) for t in ts)
            self._fast = _fast_entry(self, x, v_cond, v_uncond, v_img_uncond, out, args, rg) if replay else None
        else:  # through the op: grad mode, the no-backward warning and version counters as for any op
            _flow_step_op(x, v_cond, v_uncond, v_img_uncond, out, h1, h2, self.table, self._state, stats, mode,
                          self.renorm_min)
        self._host_step = k + 1  # after the step ran: a step that raised leaves host and device counters as they were
        return out

    def _check_branch(self, name, t, dtype, shape):
        check_tensor(name, t, dtypes=(dtype,), device=self.device)
        if t.shape != shape:
            raise ValueError(f"{name}: expected x's shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_out_aliasing(out, x, v_cond, v_uncond, v_img_uncond):
    """out may be x itself (the same elements: an in-place update) but share no other memory with
    x or any branch: the kernels read and write elements in an order of their choosing. The
    arguments are validated (one device, x's shape); out's byte range is taken once
    (_validate.may_overlap's test, whatever storages the tensors belong to)."""
    ts = (x, v_cond, v_uncond, v_img_uncond)
    if (is_tracing(out) or out.is_meta or out.numel() == 0
            or any(t is not None and type(t) is not torch.Tensor for t in ts)):
        return  # fake and meta tensors have no memory
    o0, o1 = byte_span(out)
    if out is not x:
        x0, x1 = byte_span(x)
        if o0 < x1 and x0 < o1 and not (o0 == x0 and out.stride() == x.stride()):
            raise ValueError("out: must be x itself (an in-place update) or share no memory with x, but it "
                             "overlaps x elsewhere")
    for name, t in (("v_cond", v_cond), ("v_uncond", v_uncond), ("v_img_uncond", v_img_uncond)):
        if t is None:
            continue
        t0, t1 = byte_span(t)
        if o0 < t1 and t0 < o1:
            raise ValueError(f"out: must not share memory with {name} (pass x for an in-place update, or a "
                             "separate buffer)")


def _none():
    return None


def _fast_entry(sampler, x, v_cond, v_uncond, v_img_uncond, out, args, requires_grad):
    """What FlowSampler.step's fast path replays: weak references to the validated tensors (so
    the sampler does not keep a step's velocities alive; when one dies the entry is dropped, so a
    dead reference never matches a None argument), the flags of a row that would need a branch
    that is absent, a layout guard (_op.layout_guard) over the tensors given (x, v_cond, the
    branches that are not None, out), the data pointers of the five (0 for a missing branch) and
    those of the sampler's counter and table, the twin's arguments (all pointers, no copy) packed
    as csrc/flow_sampler/api.h's flow_sampler_step_cpu_packed reads them, that entry point (looked
    up by _twin), the array's address and whether an input requires grad (then a call in grad
    mode takes the full path, which warns)."""
    owner = weakref.ref(sampler)

    def drop(ref):
        s = owner()
        if s is not None and s._fast is not None and any(r is ref for r in s._fast[:5]):
            s._fast = None

    refs = tuple(_none if t is None else weakref.ref(t, drop) for t in (x, v_cond, v_uncond, v_img_uncond, out))
    missing = (F_CFG if v_uncond is None else 0) | (F_IMG if v_img_uncond is None else 0)
    given = [t for t in (x, v_cond, v_uncond, v_img_uncond, out) if t is not None]
    packed = np.array((*args[:-1], 0), dtype=np.int64)
    packed[-1:].view(np.float64)[0] = args[-1]  # renorm_min
    addr = packed.__array_interface__["data"][0]  # (ndarray.ctypes builds a ctypes object: ~5 us)
    ptrs = tuple(0 if t is None else t.data_ptr() for t in (x, v_cond, v_uncond, v_img_uncond, out)) + (
        sampler._state.data_ptr(), sampler.table.data_ptr())
    return (*refs, missing, layout_guard(*given), ptrs, packed, _TWIN[1], addr, requires_grad)


_TWIN = []


def _twin():
    """The C++ twin's entry point (looked up once)."""
    if not _TWIN:
        _TWIN.append(_ext.cpu_twin("flow_sampler_step"))
        _TWIN.append(_ext.cpu_twin("flow_sampler_step_packed"))  # the fast path's (_fast_entry)
    return _TWIN[0]
