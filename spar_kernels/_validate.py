"""Argument checks shared by every launcher. Each raises ValueError/TypeError naming the
argument, what it got and what was expected (never a bare assert)."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ._device import same_device
from ._op import _is_compiling, byte_span, is_tracing

INDEX_DTYPES = (torch.int32, torch.int64)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_STRIDED = torch.strided


def _fmt(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, ndim: int | Iterable[int] | None = None,
                 dtypes: Sequence[torch.dtype] | None = None,
                 device: torch.device | None = None,
                 last_contiguous: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout is not _STRIDED:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if not _is_compiling() and t.is_neg():  # the kernels read and write the memory, which holds the negation
        raise ValueError(f"{name}: a lazily negated view (is_neg(), e.g. the .imag of a conj() view) is not "
                         f"supported; pass {name}.resolve_neg()")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dimensions, got {_fmt(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {_fmt(t)}")
    if device is not None and t.device != device and not same_device(t.device, device):
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the inputs), got {_fmt(t)}")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}")
    return t


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {_fmt(t)}")


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share memory: a conservative test on the byte ranges the two views
    span on one device, whatever storages they belong to (two storages can wrap one buffer, e.g.
    two ``torch.from_numpy`` views of one array); False while tracing and for meta tensors: they
    have no memory."""
    if (is_tracing(a) or is_tracing(b) or a.is_meta or b.is_meta or a.numel() == 0 or b.numel() == 0
            or a.device != b.device):
        return False
    (a0, a1), (b0, b1) = byte_span(a), byte_span(b)
    return a0 < b1 and b0 < a1


def check_no_overlap(out_name: str, out: torch.Tensor, in_name: str, t: torch.Tensor) -> None:
    """ValueError when ``out`` and the input ``t`` share memory (for kernels that read their input
    in an order of their choosing, so writing into it would read overwritten elements); see
    :func:`may_overlap`."""
    if may_overlap(out, t):
        raise ValueError(f"{out_name}: must not share memory with {in_name} (pass a separate buffer)")


def check_out(name: str, out, shape: Sequence[int], dtype: torch.dtype, device: torch.device, *,
              disjoint_from: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Validate a caller-provided output buffer (must be contiguous, exact shape and dtype; with
    ``disjoint_from=(input name, input)``, sharing no memory with that input)."""
    check_tensor(name, out, dtypes=(dtype,), device=device)
    check_shape(name, out, shape)
    if not out.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {out.stride()}")
    if disjoint_from is not None:
        check_no_overlap(name, out, *disjoint_from)
    return out


def out_or_empty(name: str, out, shape: Sequence[int], dtype: torch.dtype, device: torch.device, *,
                 disjoint_from: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``out`` validated by :func:`check_out`, or a new ``torch.empty`` when ``out`` is None."""
    if out is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return check_out(name, out, shape, dtype, device, disjoint_from=disjoint_from)


def as_index(name: str, idx, device: torch.device, *, ndim: int = 1) -> torch.Tensor:
    """An int32/int64 index tensor on ``device`` from a tensor or a sequence of ints."""
    if isinstance(idx, torch.Tensor):
        check_tensor(name, idx, ndim=ndim, device=device)
        if idx.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name}: expected an int32 or int64 tensor, got dtype {idx.dtype}")
        return idx.contiguous()  # the kernels index it densely (a no-op when already contiguous)
    if isinstance(idx, (list, tuple, range)) and all(isinstance(v, int) and not isinstance(v, bool) for v in idx):
        return host_index(idx, device)
    raise TypeError(f"{name}: expected an integer tensor or a sequence of ints, got {type(idx).__name__}")


def host_index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of Python ints on ``device`` without a host sync: for CUDA it is built in
    pinned memory and copied with ``non_blocking=True`` (``torch.tensor(values, device="cuda")``
    copies from pageable memory, which blocks the host until the copy is done); elsewhere a plain
    tensor. PyTorch's pinned-memory allocator keeps the host buffer alive until the copy ran."""
    if device.type != "cuda":
        return torch.tensor(list(values), dtype=torch.int64, device=device)
    host = torch.tensor(list(values), dtype=torch.int64).pin_memory()
    return host.to(device, non_blocking=True)


def host_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read on the host for a check now: a CPU tensor and nothing
    tracing (torch.compile, FakeTensorMode, make_fx or any dispatch mode; fake tensors have no
    values). On CUDA reading them would sync the host; the kernels bounds-check instead."""
    return t.device.type == "cpu" and not is_tracing(t)


def check_index_range(name: str, idx: torch.Tensor, size: int, what: str) -> None:
    """Range check of an index tensor: runs on CPU tensors only (on CUDA it would sync the host;
    the kernels there bounds-check instead and never read outside the buffer)."""
    if idx.numel() == 0 or not host_readable(idx):
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name}: index out of range: values in [{lo}, {hi}], expected within "
                         f"[0, {size}) ({what})")
