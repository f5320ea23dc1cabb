"""RMSNorm, optionally fused with the residual add of a decoder layer (Triton).

    s = x + residual            (rounded to x's dtype and returned, when residual is given)
    y = s * rsqrt(mean(s^2) + eps) * weight      (fp32 math, one rounding to x's dtype)

One program per row. Rows up to ``ROW_MAX_SINGLE_PASS`` wide stay in registers (one read, one
write); wider rows are streamed twice (the second read hits L2): ``_triton.row_launch_config``.
"""

from __future__ import annotations

import torch

from . import _aot
from ._op import device_guard, spar_op
from ._triton import ROW_LAUNCH_WIDTHS, row_launch_config, tl, triton
from ._validate import FLOAT_DTYPES, check_out, check_shape, check_tensor
from .reference import rms_norm as _ref



@triton.jit
def _rms_norm_kernel(X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, D, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 elements
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    s_row = S + row * stride_s
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK_D)
    if SINGLE_PASS:
        mask = cols < D
        h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
            s = h.to(S.dtype.element_ty)  # the stored sum is what gets normalized
            tl.store(s_row + cols, s, mask=mask)
            h = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            mask = c < D
            h = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                h += tl.load(r_row + c, mask=mask, other=0.0).to(tl.float32)
                s = h.to(S.dtype.element_ty)
                tl.store(s_row + c, s, mask=mask)
                h = s.to(tl.float32)
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / D + eps)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            mask = c < D
            if HAS_RESIDUAL:
                h = tl.load(s_row + c, mask=mask, other=0.0).to(tl.float32)
            else:
                h = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)


@_aot.register
def _aot_specs():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = _aot.TRITON_DTYPE[dtype]
        for has_res in (False, True):
            for D in ROW_LAUNCH_WIDTHS:
                block, warps, single = row_launch_config(D)
                yield _aot.AOTSpec(
                    kernel_name="rms_norm", fn=_rms_norm_kernel,
                    config=f"{t} residual={int(has_res)} BLOCK_D={block} {'single' if single else 'two-pass'} warps={warps}",
                    types={"X": f"*{t}", "R": f"*{t}", "W": f"*{t}", "Y": f"*{t}", "S": f"*{t}", "eps": "fp32"},
                    constexprs={"HAS_RESIDUAL": has_res, "BLOCK_D": block, "SINGLE_PASS": single},
                    num_warps=warps, num_stages=1, aligned=("X", "R", "W", "Y", "S"))


# ---------------------------------------------------------------------------------------------
# implementations (all write into preallocated out / residual_out)

def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _impl_triton(x, weight, eps, residual, out, residual_out):
    x2, y2 = _rows(x), out.view(-1, x.shape[-1])
    n_rows, D = x2.shape
    if n_rows == 0:
        return
    if residual is not None:
        r2, s2 = _rows(residual), residual_out.view(-1, D)
    else:
        r2, s2 = x2, y2  # unused (HAS_RESIDUAL=False); any valid pointers
    block, warps, single = row_launch_config(D)
    with device_guard(x):
        _rms_norm_kernel[(n_rows,)](
            x2, r2, weight, y2, s2, x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0), D, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_D=block, SINGLE_PASS=single, num_warps=warps)


def _impl_reference(x, weight, eps, residual, out, residual_out):
    res = _ref.rms_norm(x, weight, eps, residual)
    if residual is None:
        out.copy_(res)
    else:
        out.copy_(res[0])
        residual_out.copy_(res[1])


def _impl_cpu(x, weight, eps, residual, out, residual_out):
    if residual is not None:
        torch.add(x, residual, out=residual_out)  # fp32 add, one rounding: the stored sum
        x = residual_out
    if weight.dtype != x.dtype:  # ATen's fused kernel wants one dtype; keep the fp32 weight exact
        _impl_reference(x, weight, eps, None, out, None)
        return
    # ATen's fused CPU RMSNorm: fp32 math, one pass over each row
    out.copy_(torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps))


@spar_op("rms_norm", mutates_args=("out", "residual_out"),
         impls={"triton": _impl_triton, "cpu": _impl_cpu, "reference": _impl_reference})
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                 out: torch.Tensor, residual_out: torch.Tensor | None) -> None: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, *, residual_out: torch.Tensor | None = None):
    """RMSNorm over the last dimension, optionally adding ``residual`` first.

    Args:
        x: ``[..., D]`` float32 / float16 / bfloat16; any strides (rows that are not a view
            of a 2-D layout are copied).
        weight: ``[D]``, any float dtype.
        eps: added to the mean square.
        residual: optional, same shape and dtype as ``x``; ``s = x + residual`` is normalized.
        out: optional contiguous output of x's shape and dtype.
        residual_out: optional contiguous buffer for ``s`` (may be ``residual`` itself when it
            is contiguous, for the in-place update decoder layers do).

    Returns:
        ``y``, or ``(y, s)`` when ``residual`` is given.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    D = x.shape[-1]
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device, last_contiguous=True)
    check_shape("weight", weight, (D,))
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        check_shape("residual", residual, x.shape)
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        else:
            check_out("residual_out", residual_out, x.shape, x.dtype, x.device)
    elif residual_out is not None:
        raise ValueError("residual_out: only meaningful together with residual")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        check_out("out", out, x.shape, x.dtype, x.device)
    _rms_norm_op(x, weight, float(eps), residual, out, residual_out)
    return out if residual is None else (out, residual_out)
