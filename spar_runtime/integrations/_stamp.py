"""Whether a tensor changed in place since it was last seen, for caches keyed on tensor objects."""

from __future__ import annotations

import torch


def stamp(t: torch.Tensor | None):
    """What tells whether ``t`` changed in place: its version counter, or for inference tensors
    (which have none) a copy of its values."""
    if t is None:
        return None
    return ("copy", t.clone()) if t.is_inference() else ("version", t._version)


def unchanged(t: torch.Tensor | None, st) -> bool:
    """True when ``t`` is as it was when ``st = stamp(t)`` was taken."""
    if t is None:
        return st is None
    kind, v = st
    if kind == "version":
        return not t.is_inference() and t._version == v
    return t.is_inference() and torch.equal(t, v)
