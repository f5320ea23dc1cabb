"""One-line acceleration of existing transformers and diffusers models with spar's kernels.

    from spar_runtime.integrations import patch, unpatch, FlowStepScheduler
    patch(model)          # Qwen2ForCausalLM, Qwen2Model, InternVLForConditionalGeneration,
                          # SanaTransformer2DModel, AutoencoderDC, any module containing them,
                          # or a diffusers pipeline (its components)
    unpatch(model)        # the original forward methods and attention implementation, exactly
    pipe.scheduler = FlowStepScheduler.from_scheduler(pipe.scheduler)

Importing this module registers the ``"spar"`` attention function with transformers'
``AttentionInterface`` (when transformers is installed), so ``from_pretrained(...,
attn_implementation="spar")`` and ``model.set_attn_implementation("spar")`` work without
``patch``. diffusers is imported only when a diffusers model or scheduler is handed over.
What each patch swaps in: :mod:`._transformers`, :mod:`._diffusers`, :mod:`._scheduler`,
:mod:`._hf_attention`. Patched models are for inference: calls with gradients enabled on
trainable weights run the original code.
"""

from __future__ import annotations

import importlib.util

import torch

from . import _diffusers, _transformers

__all__ = ["patch", "unpatch", "is_patched", "FlowStepScheduler", "SUPPORTED", "ATTN_NAME"]

ATTN_NAME = "spar"
SUPPORTED = _transformers.SUPPORTED[:3] + _diffusers.SUPPORTED
_STATE = "_spar_patch_undo"


def __getattr__(name):
    if name == "FlowStepScheduler":
        from ._scheduler import FlowStepScheduler
        return FlowStepScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Recorder:
    """Installs instance attributes and records, as plain data, what undoes them, in order:
    ``("attr", obj, name, had, old)`` and ``("config", cfg, name, old)``. Data rather than
    closures, so that ``copy.deepcopy`` of a patched model gives a copy whose records point at the
    copy's own modules and configs."""

    def __init__(self):
        self.undos: list = []

    def __call__(self, obj, name: str, value) -> None:
        self.undos.append(("attr", obj, name, name in obj.__dict__, obj.__dict__.get(name)))
        object.__setattr__(obj, name, value)

    def config(self, cfg, name: str, old) -> None:
        """Record that ``cfg.name`` was ``old`` before the patch changed it."""
        self.undos.append(("config", cfg, name, old))


def _undo(record) -> None:
    if record[0] == "config":
        _, cfg, name, old = record
        setattr(cfg, name, old)
        return
    _, obj, name, had, old = record
    if had:
        object.__setattr__(obj, name, old)
    else:
        object.__delattr__(obj, name)


def _targets(model) -> list:
    """The outermost supported models in ``model``'s module tree (a supported model's own
    supported sub-models, e.g. an InternVL's Qwen2Model, are patched through it)."""
    found, skip = [], set()
    for m in model.modules():
        if id(m) in skip:
            continue
        if _transformers.is_supported(m) or _diffusers.is_supported(m):
            found.append(m)
            skip.update(id(s) for s in m.modules())
    return found


def _modules_of(obj) -> list[torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        return [obj]
    components = getattr(obj, "components", None)   # a diffusers pipeline
    if isinstance(components, dict):
        return [c for c in components.values() if isinstance(c, torch.nn.Module)]
    raise TypeError(f"model: expected a torch.nn.Module (one of {', '.join(SUPPORTED)}, or a module containing "
                    f"them) or a diffusers pipeline, got {type(obj).__name__}")


def is_patched(model) -> bool:
    """Whether :func:`patch` has been applied to ``model`` (and not undone)."""
    return any(_STATE in m.__dict__ for m in _modules_of(model))


def patch(model):
    """Swap spar's ops into ``model`` in place and return it (see the module docstring).

    A diffusers pipeline is patched component by component (each can be unpatched alone).

    Raises:
        TypeError: ``model`` contains none of the supported classes (listed in the message).
        ValueError: a supported model has a configuration spar does not run, or ``model`` (or a
            module inside it) is already patched.
    """
    mods = _modules_of(model)
    work = [(m, _targets(m)) for m in mods]
    work = [(m, ts) for m, ts in work if ts]
    if not work:
        raise TypeError(f"model: {type(model).__name__} is not supported and contains no supported model; "
                        f"supported: {', '.join(SUPPORTED)} (or modules and diffusers pipelines containing them)")
    for m, _ in work:
        if any(_STATE in sub.__dict__ for sub in m.modules()):
            raise ValueError(f"model: this {type(m).__name__} is already patched, or holds a patched module "
                             "(call unpatch first)")
    done = []
    try:
        for m, targets in work:
            rec = _Recorder()
            done.append((m, rec))
            for t in targets:
                (_transformers if _transformers.is_supported(t) else _diffusers).patch_model(t, rec)
            object.__setattr__(m, _STATE, rec.undos)
    except Exception:
        for m, rec in reversed(done):
            for record in reversed(rec.undos):
                _undo(record)
            m.__dict__.pop(_STATE, None)
        raise
    return model


def unpatch(model):
    """Undo :func:`patch`: the original forward methods and attention implementations, exactly.

    Raises:
        ValueError: ``model`` was not patched.
    """
    mods = [m for m in _modules_of(model) if _STATE in m.__dict__]
    if not mods:
        raise ValueError(f"model: this {type(model).__name__} is not patched")
    for m in mods:
        for record in reversed(m.__dict__[_STATE]):
            _undo(record)
        object.__delattr__(m, _STATE)
    return model


if importlib.util.find_spec("transformers") is not None:
    from . import _hf_attention
    _hf_attention.register()
