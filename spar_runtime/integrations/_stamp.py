"""Whether a tensor changed in place since it was last seen, for caches keyed on tensor objects."""

from __future__ import annotations

import torch


def stamp(t: torch.Tensor | None, *, by_value: bool = True):
    """What tells whether ``t`` changed in place: its version counter, or for inference tensors
    (which have none) a copy of its values. ``by_value=False``: an inference tensor off the CPU is
    taken as unchanged (comparing values would sync the host at every check)."""
    if t is None:
        return None
    if not t.is_inference():
        return ("version", t._version)
    return ("copy", t.clone()) if by_value or t.device.type == "cpu" else ("identity", None)


def unchanged(t: torch.Tensor | None, st) -> bool:
    """True when ``t`` is as it was when ``st = stamp(t)`` was taken."""
    if t is None:
        return st is None
    kind, v = st
    if kind == "version":
        return not t.is_inference() and t._version == v
    if kind == "identity":
        return t.is_inference()
    return t.is_inference() and torch.equal(t, v)
