"""FP8 (float8_e4m3fn) quantization with float32 scales, per token row or per tensor.

CUDA C++ (csrc/quantize_fp8/) with its CPU twin; the element math lives in
csrc/quantize_fp8/quantize_fp8.h and is shared by both. The outputs are ready for
``torch._scaled_mm``: per-token scales are shaped ``[..., 1]`` (``[M, 1]`` for a 2-D x),
the per-tensor scale is a 0-dim tensor.
"""

from __future__ import annotations

import torch

from . import _ext
from ._backend import _current
from ._op import (_any_requires_grad, _grad_enabled, _increment_version, _is_compiling, _len_dispatch_stack,
                  device_guard, spar_op)
from ._validate import FLOAT_DTYPES, check_no_overlap, check_out, check_tensor
from .reference import quantize_fp8 as _ref

GRANULARITIES = ("token", "tensor")
_F8, _F32, _STRIDED = torch.float8_e4m3fn, torch.float32, torch.strided
_current_backend = _current.get
_TWIN_CODES = {t: c for t, c in _ext.DTYPE_CODES.items() if t in FLOAT_DTYPES}  # x dtypes the twin takes


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] <= 1):
        return x  # already rows (the common case: no reshape on the per-call path)
    x2 = x.reshape(-1, x.shape[-1])  # a view whenever the layout allows, else a copy
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _impl_cpu(x, q, scales, per_token, workspace):
    x2 = _as_rows(x)
    rows, cols = x2.shape
    _ext.cpu_twin("quantize_fp8")(x2.data_ptr(), _ext.DTYPE_CODES[x2.dtype], rows, cols, x2.stride(0),
                                q.data_ptr(), scales.data_ptr(), per_token)


def _out_ok(t, shape, dtype, device) -> bool:
    """True when ``t`` passes check_out (a cheaper test for the per-call path; check_out explains
    a failure)."""
    return (type(t) is torch.Tensor and t.layout is _STRIDED and t.dtype == dtype and t.shape == shape
            and t.device == device and t.is_contiguous() and (_is_compiling() or not t.is_neg()))


def _impl_cuda(x, q, scales, per_token, workspace):
    x2 = _as_rows(x)
    with device_guard(x):
        _ext.cuda_kernel("quantize_fp8")(x2.data_ptr(), _ext.dtype_code(x2), x2.shape[0], x2.shape[1],
                                     x2.stride(0), q.data_ptr(), scales.data_ptr(), per_token,
                                     workspace.data_ptr() if workspace is not None else 0, _ext.stream_of(x))


def _impl_reference(x, q, scales, per_token, workspace):
    rq, rs = _ref.quantize_fp8(x, "token" if per_token else "tensor")
    q.copy_(rq)
    scales.copy_(rs.reshape(scales.shape))


_IMPLS = {"cuda": _impl_cuda, "cpu": _impl_cpu, "reference": _impl_reference}


@spar_op("quantize_fp8", mutates_args=("q", "scales", "workspace"), impls=_IMPLS)
def _quantize_fp8_op(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, per_token: bool,
                     workspace: torch.Tensor | None) -> None: ...


def quantize_fp8(x: torch.Tensor, granularity: str = "token", out=None, *, workspace: torch.Tensor | None = None):
    """Quantize ``x`` to float8_e4m3fn, saturating at +-448.

    Args:
        x: ``[..., K]`` float32 / float16 / bfloat16, at least 1-D.
        granularity: ``"token"`` (one scale per row of the last dimension) or ``"tensor"``.
        out: optional ``(q, scales)`` pair of preallocated contiguous buffers: ``q`` float8_e4m3fn
            of x's shape, ``scales`` float32 of shape ``x.shape[:-1] + (1,)`` (token) or ``()``
            (tensor).
        workspace: optional float32 tensor of at least one element on x's device: the scratch
            float of the tensor-wide amax on CUDA (``"tensor"`` granularity). With ``out`` and
            ``workspace`` a call allocates nothing (a captured CUDA graph can reuse both);
            without it, a CUDA per-tensor call allocates that one float. Unused elsewhere.

    Returns:
        ``(q, scales)`` with ``x ~= q.float() * scales``. NaN propagates as in the reference: a
        NaN in a row (token) or anywhere (tensor) gives a NaN scale and NaN codes there.
    """
    if out is not None and workspace is None and type(out) is tuple and len(out) == 2:
        q, scales = out
        # The eager CPU call into given buffers, checked in one expression and run on the twin:
        # each Python step and each distinct torch call costs a few us when a call finds its code
        # out of cache, more than this op's small cases take. Anything else, every error
        # included, takes the full path below, which explains it.
        if (type(x) is torch.Tensor and type(q) is torch.Tensor and type(scales) is torch.Tensor
                and not _is_compiling() and not _len_dispatch_stack() and _current_backend() == "auto"
                and x.is_cpu and x.layout is _STRIDED and x.dim() == 2 and x.stride(1) == 1
                and (code := _TWIN_CODES.get(x.dtype)) is not None and x.numel() > 0
                and q.dtype is _F8 and q.is_cpu and q.shape == x.shape and q.is_contiguous()
                and scales.dtype is _F32 and scales.is_cpu and scales.is_contiguous()
                and (scales.shape == (x.shape[0], 1) if granularity == "token"
                     else granularity == "tensor" and scales.dim() == 0)
                and not (x.is_neg() or q.is_neg() or scales.is_neg())
                and not (_grad_enabled() and _any_requires_grad(x, q, scales))):  # the full path warns
            rows, cols = x.shape
            xp, qp, sp = x.data_ptr(), q.data_ptr(), scales.data_ptr()
            # the byte ranges x's rows, q and scales span: disjoint, or the full path explains
            x_end = xp + ((rows - 1) * x.stride(0) + cols) * x.element_size()
            q_end, s_end = qp + rows * cols, sp + 4 * scales.numel()
            if (x_end <= qp or q_end <= xp) and (x_end <= sp or s_end <= xp) and (q_end <= sp or s_end <= qp):
                _increment_version((q, scales))  # first, as the dispatcher (see _op.SparOp._written)
                _ext.cpu_twin("quantize_fp8")(xp, code, rows, cols, x.stride(0), qp, sp, granularity == "token")
                return q, scales
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    per_token = granularity == "token"
    scale_shape = tuple(x.shape[:-1]) + (1,) if per_token else ()
    if out is None:
        q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        scales = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    else:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"out: expected a (q, scales) pair of tensors, got {type(out).__name__}")
        q, scales = out
        if not _out_ok(q, x.shape, torch.float8_e4m3fn, x.device):  # the fast check; then the one that explains
            check_out("out[0] (q)", q, x.shape, torch.float8_e4m3fn, x.device)
        if not _out_ok(scales, scale_shape, torch.float32, x.device):
            check_out("out[1] (scales)", scales, scale_shape, torch.float32, x.device)
        check_no_overlap("out[0] (q)", q, "x", x)
        check_no_overlap("out[1] (scales)", scales, "x", x)
        check_no_overlap("out[1] (scales)", scales, "out[0] (q)", q)
    if workspace is not None:
        check_tensor("workspace", workspace, dtypes=(torch.float32,), device=x.device)
        if workspace.numel() < 1 or not workspace.is_contiguous():
            raise ValueError(f"workspace: expected a contiguous float32 tensor of at least 1 element, "
                             f"got shape {tuple(workspace.shape)}, strides {workspace.stride()}")
    elif x.is_cuda and not per_token:
        # one float for the tensor-wide amax of the CUDA path; the CPU twin and per-token need none
        workspace = torch.empty(1, dtype=torch.float32, device=x.device)
    if x.numel() == 0:  # amax of nothing is 0: the scale of an all-zero input
        scales.fill_(_ref.MIN_AMAX / _ref.FP8_MAX)
        return q, scales
    _quantize_fp8_op(x, q, scales, per_token, workspace if (x.is_cuda and not per_token) else None)
    return q, scales
