"""Reused intermediate buffers for the runtime's CPU forwards, and a linear that writes into one.

A fresh CPU allocation of tens of MB comes as new zeroed pages whose first touch faults: at 8
images of 448 px the vision tower's fresh intermediates cost about 1 s of system time per call
(AMD EPYC, one thread), as much as the GEMM that fills them. :class:`Workspace` keeps named
buffers from call to call, and :func:`linear` computes ``F.linear`` into one of them
(``torch.addmm``/``torch.mm`` with ``out=``: the same ATen GEMM as ``F.linear``).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

__all__ = ["linear", "Workspace"]


def _check_out(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    shape = (*x.shape[:-1], weight.shape[0])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != x.dtype \
            or out.device != x.device or not out.is_contiguous():
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}, contiguous={out.is_contiguous()}"
               if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ValueError(f"out: expected a contiguous {x.dtype} tensor of shape {shape} on {x.device}, got {got}")
    if out.untyped_storage().data_ptr() in (x.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()):
        raise ValueError("out: must not share memory with x or weight")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, written into ``out`` when given.

    ``out``: an optional contiguous output (``[..., N]``, x's dtype and device, sharing no memory
    with x or weight) written in place and returned."""
    if out is None:
        return F.linear(x, weight, bias)
    _check_out(out, x, weight)
    x2, o2 = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])
    if bias is None:
        torch.mm(x2, weight.t(), out=o2)
    else:
        torch.addmm(bias, x2, weight.t(), out=o2)
    return out


class Workspace:
    """Named buffers reused from call to call, one set per thread, each kept at the last shape asked.

    A fresh CPU allocation of tens of MB comes as new zeroed pages whose first touch faults: at
    8 images of 448 px the vision tower's fresh intermediates cost about 1 s of system time a call,
    as much as a GEMM that fills them. Callers take intermediates (never returned tensors) from
    here. Buffers made in inference mode are inference tensors: a call outside it gets new ones.
    :meth:`clear` frees this thread's buffers."""

    def __init__(self):
        self._local = threading.local()

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        bufs = self._local.__dict__.setdefault("bufs", {})
        t = bufs.get(name)
        if (t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != torch.device(device)
                or t.is_inference() != torch.is_inference_mode_enabled()):
            t = bufs[name] = torch.empty(shape, dtype=dtype, device=device)
        return t

    def clear(self) -> None:
        self._local.__dict__.pop("bufs", None)
