"""Flow-matching noise schedules (sigmas), computed on the host exactly as their sources do.

- ``"diffusers"``: ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps, mu=...)`` with its
  defaults (static shift, or the resolution-dependent dynamic shift with ``mu`` or
  ``image_seq_len``; ``shift_terminal``; Karras / exponential spacing). The same sigmas serve
  ``FlowMatchHeunDiscreteScheduler`` (before its interleaving).
- ``"dpmsolver"``: ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)``:
  ``shift(linspace(1 - 1/T, 0, N + 1)[:-1])`` followed by a final 0 (it starts below 1).
- ``"linear"``: BAGEL's ``linspace(1, 0, N + 1)`` with the shift ``s t / (1 + (s - 1) t)``.

Every schedule is float32, strictly decreasing and ends in 0 (``num_steps + 1`` values). The
arithmetic (float32 torch where the source uses torch, float64 numpy where it uses numpy) is
replayed step by step so the values are bit-identical to the source's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCHEDULES = ("diffusers", "dpmsolver", "linear")
TIME_SHIFT_TYPES = ("exponential", "linear")


def calculate_shift(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """``mu`` of the resolution-dependent shift, as diffusers' Flux/SD3 pipelines compute it:
    linear in the image sequence length between (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    b = base_shift - m * base_image_seq_len
    return image_seq_len * m + b


def _check_positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name}: expected >= 1, got {v}")
    return int(v)


def _check_shift(shift) -> float:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)):
        raise TypeError(f"shift: expected a float, got {type(shift).__name__}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift: expected a finite value > 0, got {shift}")
    return float(shift)


def _diffusers_euler(num_steps: int, shift: float, use_dynamic_shifting: bool, mu, time_shift_type: str,
                     shift_terminal, use_karras_sigmas: bool, use_exponential_sigmas: bool,
                     num_train_timesteps: int) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler(...).set_timesteps(num_steps, mu=mu) without the final 0."""
    T = num_train_timesteps
    # __init__: float32 torch arithmetic; only sigma_max / sigma_min survive into set_timesteps
    train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()).to(torch.float32)
    s_train = train / T
    if not use_dynamic_shifting:
        s_train = shift * s_train / (1 + (shift - 1) * s_train)
    sigma_max, sigma_min = s_train[0].item(), s_train[-1].item()
    # set_timesteps: float64 numpy
    sig = np.linspace(sigma_max * T, sigma_min * T, num_steps) / T
    if use_dynamic_shifting:
        if time_shift_type == "exponential":
            sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1) ** 1.0)
        else:
            sig = mu / (mu + (1 / sig - 1) ** 1.0)
    else:
        sig = shift * sig / (1 + (shift - 1) * sig)
    if shift_terminal:
        one_minus = 1 - sig
        sig = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    if use_karras_sigmas or use_exponential_sigmas:
        lo, hi = float(sig[-1]), float(sig[0])
        ramp = np.linspace(0, 1, num_steps)
        if use_karras_sigmas:
            rho = 7.0
            sig = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        else:
            sig = np.exp(np.linspace(math.log(hi), math.log(lo), num_steps))
    return sig


def dpmsolver_flow_sigmas_f64(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
    """DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift) sigmas in float64,
    without the final 0 (its int64 timesteps are ``(these * T).astype(int64)``)."""
    alphas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)
    sig = 1.0 - alphas
    return np.flip(shift * sig / (1 + (shift - 1) * sig))[:-1].copy()


def flow_sigmas(num_steps: int, *, shift: float = 1.0, schedule: str = "diffusers",
                use_dynamic_shifting: bool = False, mu: float | None = None, image_seq_len: int | None = None,
                base_shift: float = 0.5, max_shift: float = 1.15, base_image_seq_len: int = 256,
                max_image_seq_len: int = 4096, time_shift_type: str = "exponential",
                shift_terminal: float | None = None, use_karras_sigmas: bool = False,
                use_exponential_sigmas: bool = False, num_train_timesteps: int = 1000,
                device=None) -> torch.Tensor:
    """The ``num_steps + 1`` float32 sigmas of a flow-matching schedule, decreasing, ending in 0.

    Args:
        num_steps: number of solver steps (>= 1).
        shift: the static timestep shift ``s`` (``s t / (1 + (s - 1) t)``); diffusers' ``shift``
            / ``flow_shift``, BAGEL's ``timestep_shift``.
        schedule: ``"diffusers"`` (FlowMatchEulerDiscreteScheduler), ``"dpmsolver"``
            (DPMSolverMultistepScheduler with ``use_flow_sigmas=True``) or ``"linear"`` (BAGEL).
        use_dynamic_shifting, mu, image_seq_len, base_shift, max_shift, base_image_seq_len,
            max_image_seq_len, time_shift_type: diffusers' resolution-dependent shift
            (``"diffusers"`` schedule only). ``mu`` is used as given; without it, ``image_seq_len``
            gives ``mu = calculate_shift(image_seq_len, ...)`` as diffusers' Flux pipeline does.
            For ``"dpmsolver"``, a ``mu`` (or ``image_seq_len``) replaces ``shift`` by ``exp(mu)``
            as ``DPMSolverMultistepScheduler.set_timesteps(mu=...)`` does.
        shift_terminal, use_karras_sigmas, use_exponential_sigmas, num_train_timesteps: the
            FlowMatchEulerDiscreteScheduler options of the same names.
        device: where the returned tensor lives.
    """
    num_steps = _check_positive_int("num_steps", num_steps)
    shift = _check_shift(shift)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if time_shift_type not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type: expected one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")
    num_train_timesteps = _check_positive_int("num_train_timesteps", num_train_timesteps)
    if use_karras_sigmas and use_exponential_sigmas:
        raise ValueError("use_karras_sigmas, use_exponential_sigmas: at most one may be True, got both")
    if schedule != "diffusers":
        given = [name for name, v, default in (
            ("use_dynamic_shifting", use_dynamic_shifting, False), ("time_shift_type", time_shift_type, "exponential"),
            ("shift_terminal", shift_terminal, None), ("use_karras_sigmas", use_karras_sigmas, False),
            ("use_exponential_sigmas", use_exponential_sigmas, False)) if v != default]
        if schedule == "linear":
            given += [name for name, v in (("mu", mu), ("image_seq_len", image_seq_len)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: options of the \"diffusers\" schedule, not of {schedule!r}")
    if mu is None and image_seq_len is not None:
        mu = calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)
    if mu is not None:
        if isinstance(mu, bool) or not isinstance(mu, (int, float)):
            raise TypeError(f"mu: expected a float, got {type(mu).__name__}")
        if not -80.0 <= mu <= 80.0:  # exp(mu) scales the sigmas: beyond this they are all 0 or all 1
            raise ValueError(f"mu: expected a finite value in [-80, 80] (the shift is exp(mu)), got {mu}")
    if schedule == "diffusers":
        if use_dynamic_shifting and mu is None:
            raise ValueError("mu: use_dynamic_shifting=True needs mu (or image_seq_len), got None")
        if use_dynamic_shifting and time_shift_type == "linear" and mu <= 0:
            raise ValueError(f"mu: the linear time shift needs mu > 0, got {mu}")
        if shift_terminal is not None and not (0 <= shift_terminal < 1):
            raise ValueError(f"shift_terminal: expected a value in [0, 1), got {shift_terminal}")
        sig = _diffusers_euler(num_steps, shift, use_dynamic_shifting, mu, time_shift_type, shift_terminal,
                               use_karras_sigmas, use_exponential_sigmas, num_train_timesteps)
        out = torch.from_numpy(np.ascontiguousarray(sig)).to(torch.float32)
        if not bool(torch.isfinite(out).all()):
            if shift_terminal is None:
                raise ValueError(f"shift: with shift={shift} the schedule is not finite (the shifted sigmas "
                                 f"underflow), got {out.tolist()}")
            raise ValueError(f"shift_terminal, num_steps: the schedule is not finite (shift_terminal="
                             f"{shift_terminal} with num_steps={num_steps} divides by zero), got {out.tolist()}")
    elif schedule == "dpmsolver":
        s = math.exp(mu) if mu is not None else shift
        out = torch.from_numpy(dpmsolver_flow_sigmas_f64(num_steps, s, num_train_timesteps)).to(torch.float32)
    else:  # BAGEL: float32 torch arithmetic
        t = torch.linspace(1, 0, num_steps + 1)
        t = shift * t / (1 + (shift - 1) * t)
        return t.to(device=device)
    # sigmas pushed together (two of 1 in a row: DPM-Solver's step in log(alpha / sigma) is
    # -inf - -inf, NaN latents), by mu where given, else by a DPM-Solver shift
    if (mu is not None and (use_dynamic_shifting or schedule == "dpmsolver")) or schedule == "dpmsolver":
        if not bool((out[1:] < out[:-1]).all()):
            what = f"mu: with mu={mu}" if mu is not None else f"shift: with shift={shift}"
            raise ValueError(f"{what} the float32 sigmas are not strictly decreasing "
                             f"(the shift pushes them together), got {out.tolist()[:8]}...")
    return torch.cat([out, torch.zeros(1)]).to(device=device)
