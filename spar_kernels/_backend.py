"""Backend selection: which implementation of an op runs for a given tensor.

Every public op has up to four implementations, keyed by backend name:

- ``"triton"``: a Triton kernel (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``),
- ``"cuda"``: a CUDA C++ kernel from the ``spar_kernels._C_cuda`` extension (CUDA tensors),
- ``"cpu"``: the CPU implementation (the C++ twin from ``spar_kernels._C_cpu`` or a
  chunked PyTorch implementation) for CPU tensors,
- ``"reference"``: the plain-PyTorch reference in :mod:`spar_kernels.reference` (any device).

``"auto"`` (the default) picks the fastest available one for the tensor's device. ``"cuda"`` is
available on a device when the extension is built and the device can run it (compute capability
against the build's machine code and PTX, driver against the build's CUDA version; checked once
per device, with one warning when it cannot: :func:`spar_kernels._device.cuda_device_problem`).
:func:`backend` forces a path for debugging and tests::

    with spar_kernels.backend("reference"):
        y = spar_kernels.rms_norm(x, w, 1e-6)
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Mapping

import torch

from ._device import cuda_device_problem

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
# Preference order of "auto" on each device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_current: contextvars.ContextVar[str] = contextvars.ContextVar("spar_backend", default="auto")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the given tensors."""


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force every spar op called inside the block onto backend ``name``.

    ``name`` is one of ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"``.
    An op without an implementation for the forced backend, or a backend that cannot
    run on the tensors' device, raises :class:`BackendUnavailableError`.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    token = _current.set(name)
    try:
        yield
    finally:
        _current.reset(token)


def current_backend() -> str:
    """The backend forced by the innermost :func:`backend` block (``"auto"`` if none)."""
    return _current.get()


def _runnable(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``, and why not."""
    if name == "reference":
        return True, ""
    if name == "cpu":
        if device.type != "cpu":
            return False, f"backend 'cpu' needs CPU tensors, got tensors on {device}"
        return True, ""
    if name == "cuda":
        if device.type != "cuda":
            return False, f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
        from . import _ext

        if not _ext.has_cuda_extension():
            return False, ("backend 'cuda': the CUDA extension spar_kernels._C_cuda is not built "
                           f"({_ext.cuda_extension_error()})")
        # the device's arch and driver against the build (once per device; one warning)
        why = cuda_device_problem(device)
        if why:
            return False, f"backend 'cuda': {why}"
        return True, ""
    if name == "triton":
        from . import _triton

        if not _triton.HAS_TRITON:
            return False, "backend 'triton': triton is not installed"
        if device.type == "cpu" and not _triton.INTERPRET:
            return False, ("backend 'triton' got CPU tensors: set TRITON_INTERPRET=1 in the "
                           "environment before spar_kernels (and triton) are imported to run "
                           "Triton kernels on CPU under the interpreter")
        if device.type not in ("cpu", "cuda"):
            return False, f"backend 'triton' does not run on {device}"
        return True, ""
    raise ValueError(f"unknown backend {name!r}")


def select(op: str, device: torch.device, impls: Mapping[str, Callable]) -> Callable:
    """Return the implementation of ``op`` to run on ``device`` under the current backend."""
    forced = _current.get()
    if forced == "auto" and device.type == "cpu":
        # the CPU order ("cpu", "reference") depends on nothing but the table: skip _runnable
        f = impls.get("cpu") or impls.get("reference")
        if f is not None:
            return f
    if forced != "auto":
        if forced not in impls:
            raise BackendUnavailableError(
                f"{op}: no {forced!r} implementation (available: {sorted(impls)})")
        ok, why = _runnable(forced, device)
        if not ok:
            raise BackendUnavailableError(f"{op}: {why}")
        return impls[forced]
    for name in _AUTO_ORDER.get(device.type, ("reference",)):
        if name in impls and _runnable(name, device)[0]:
            return impls[name]
    raise BackendUnavailableError(f"{op}: no implementation runs on {device} (have {sorted(impls)})")
