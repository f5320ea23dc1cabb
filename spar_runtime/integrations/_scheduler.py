"""``FlowStepScheduler``: a diffusers flow scheduler whose ``step`` is ``spar_kernels.FlowSampler``'s
fused step.

``FlowStepScheduler.from_scheduler(s)`` returns a copy of ``s`` (same config, same state) whose
class derives from both ``FlowStepScheduler`` and ``type(s)``: ``isinstance`` checks, ``config``,
``set_timesteps``, ``timesteps``, ``sigmas``, ``step_index``, ``scale_model_input``,
``save_config`` are diffusers' own; only ``step`` changes, with the same arguments and return
type (``FlowMatchEulerDiscreteSchedulerOutput`` / ``SchedulerOutput``, or a 1-tuple with
``return_dict=False``).

Supported: ``FlowMatchEulerDiscreteScheduler`` (deterministic) -> ``"euler"``;
``DPMSolverMultistepScheduler`` with ``use_flow_sigmas=True``, ``prediction_type="flow_prediction"``,
``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``,
``final_sigmas_type="zero"``, no thresholding -> ``"dpmsolver++2m"``. Other configurations,
``per_token_timesteps`` and schedules the sampler refuses (not strictly decreasing to 0) call
the original ``step``. A run may start at any index (``set_begin_index``): the sampler is built
for the sigmas from there on, its solver history empty, as diffusers' is at a run's start. The
sampler keeps the solver history itself: the base scheduler's ``step_index`` and
``lower_order_nums`` advance as diffusers' would, its ``model_outputs`` list is not filled.
"""

from __future__ import annotations

import copy
import inspect

import torch

import spar_kernels as sk

_CLASSES: dict[type, type] = {}


def _method(sched) -> str | None:
    names = {c.__name__ for c in type(sched).__mro__}
    cfg = sched.config
    if "FlowMatchEulerDiscreteScheduler" in names:
        if cfg.get("stochastic_sampling", False):
            return None
        return "euler"
    if "DPMSolverMultistepScheduler" in names:
        ok = (cfg.get("use_flow_sigmas") and cfg.get("prediction_type") == "flow_prediction"
              and cfg.get("algorithm_type") == "dpmsolver++" and cfg.get("solver_order") == 2
              and cfg.get("solver_type") == "midpoint" and cfg.get("final_sigmas_type") == "zero"
              and not cfg.get("thresholding") and cfg.get("variance_type") is None)
        return "dpmsolver++2m" if ok else None
    return None


class FlowStepScheduler:
    """Mixin placed before a diffusers scheduler class; build one with :meth:`from_scheduler`."""

    @classmethod
    def from_scheduler(cls, scheduler) -> "FlowStepScheduler":
        """A copy of ``scheduler`` (a diffusers ``FlowMatchEulerDiscreteScheduler`` or a flow-sigma
        ``DPMSolverMultistepScheduler``) stepping with spar's fused flow step."""
        base = type(scheduler)
        if isinstance(scheduler, FlowStepScheduler):
            return copy.deepcopy(scheduler)
        names = {c.__name__ for c in base.__mro__}
        if not names & {"FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler"}:
            raise TypeError(f"scheduler: expected a diffusers FlowMatchEulerDiscreteScheduler or "
                            f"DPMSolverMultistepScheduler (use_flow_sigmas=True), got {base.__name__}")
        if _method(scheduler) is None:
            raise ValueError(f"scheduler: this {base.__name__} configuration has no fused flow step (needs a "
                             "deterministic FlowMatchEulerDiscreteScheduler, or DPMSolverMultistepScheduler with "
                             "use_flow_sigmas=True, prediction_type='flow_prediction', algorithm_type='dpmsolver++', "
                             "solver_order=2, solver_type='midpoint', final_sigmas_type='zero', no thresholding)")
        sub = _CLASSES.get(base)
        if sub is None:
            sub = type(f"FlowStep{base.__name__}", (cls, base), {"__module__": cls.__module__})
            _CLASSES[base] = sub
        new = object.__new__(sub)
        new.__dict__.update(copy.deepcopy(scheduler.__dict__))
        new._spar = None
        return new

    # -- the fused step ------------------------------------------------------------------------

    def _spar_sampler(self, idx: int, sample: torch.Tensor):
        """The FlowSampler for the current schedule, positioned at evaluation ``idx`` (None: no fused step)."""
        st = self.__dict__.get("_spar")
        if (st is not None and st["sigmas"] is self.sigmas and st["next"] == idx and st["shape"] == sample.shape
                and st["device"] == sample.device):
            return st["sampler"]
        sampler = None
        method = _method(self)
        if method == "dpmsolver++2m" and idx > 0 and getattr(self, "lower_order_nums", 0) > 0:
            # a run already under way without a fused sampler following it (a scheduler converted
            # mid-run): its solver history is the stock scheduler's, so the stock step continues it
            method = None
        if method is not None:
            try:
                sampler = sk.FlowSampler(method, sigmas=self.sigmas[idx:].detach().float().cpu(), device=sample.device)
            except (ValueError, TypeError):
                sampler = None
        self._spar = {"sigmas": self.sigmas, "next": idx, "shape": sample.shape, "device": sample.device,
                      "sampler": sampler}
        return sampler

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, generator=None,
             return_dict: bool = True, **kwargs):
        """The base scheduler's ``step`` (same arguments, same return type), fused."""
        if args or kwargs.get("per_token_timesteps") is not None or kwargs.get("variance_noise") is not None:
            return self._stock_step(model_output, timestep, sample, *args, generator=generator,
                                    return_dict=return_dict, **kwargs)
        if getattr(self, "num_inference_steps", 1) is None:
            return self._stock_step(model_output, timestep, sample, generator=generator, return_dict=return_dict,
                                    **kwargs)
        is_euler = _method(self) == "euler"
        if is_euler and (isinstance(timestep, int) or (isinstance(timestep, torch.Tensor)
                                                       and not timestep.is_floating_point())):
            return self._stock_step(model_output, timestep, sample, generator=generator, return_dict=return_dict,
                                    **kwargs)   # diffusers' own error for integer indices
        if self.step_index is None:
            self._init_step_index(timestep)
        idx = self.step_index
        sampler = self._spar_sampler(idx, sample)
        if sampler is None or model_output.shape != sample.shape:
            return self._stock_step(model_output, timestep, sample, generator=generator, return_dict=return_dict,
                                    **kwargs)
        prev = sampler.step(sample, model_output).to(model_output.dtype)
        self._spar["next"] = idx + 1
        self._step_index += 1
        if not is_euler and self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        if not return_dict:
            return (prev,)
        if is_euler:
            from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
            return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput
        return SchedulerOutput(prev_sample=prev)

    def _stock_step(self, model_output, timestep, sample, *args, **kwargs):
        base_step = super().step    # the diffusers scheduler's own
        params = inspect.signature(base_step).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in params or k == "return_dict"}
        self._spar = None           # the sampler's history no longer follows this run
        return base_step(model_output, timestep, sample, *args, **kwargs)
