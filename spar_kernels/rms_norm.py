"""RMSNorm, optionally fused with the residual add of a decoder layer (Triton; C++ CPU twin).

    s = x + residual            (rounded to x's dtype and returned, when residual is given)
    y = s * rsqrt(mean(s^2) + eps) * weight      (fp32 math, one rounding to x's dtype)

GPU: one Triton program per row. Rows up to ``ROW_MAX_SINGLE_PASS`` wide stay in registers (one
read, one write); wider rows are streamed twice (the second read hits L2):
``_triton.row_launch_config``. x and residual may have any strides (the kernel takes the inner
stride; Triton specializes a unit one). CPU: the twin in csrc/rms_norm/ (one pass per row,
AVX2 + F16C, rows over OpenMP threads).
"""

from __future__ import annotations

import torch

from . import _aot, _ext
from ._op import device_guard, spar_op
from ._triton import ROW_LAUNCH_WIDTHS, ROW_NUM_STAGES, ROW_WIDE_ALIGNED, row_launch_config, tl, triton
from ._validate import FLOAT_DTYPES, check_out, check_shape, check_tensor
from .reference import rms_norm as _ref



@triton.jit
def _rms_norm_kernel(X, R, W, Y, S, stride_x, stride_xd, stride_r, stride_rd, stride_y, stride_s, D, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_PASS: tl.constexpr):
    # x and residual take any strides (a reshape(-1, D) view of a transposed or [..., ::2] tensor);
    # Triton specializes an inner stride of 1 at launch, so contiguous rows load as vectors.
    # y and s are contiguous rows (the wrapper checks). int64: row * stride can pass 2^31 elements.
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    s_row = S + row * stride_s
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK_D)
    if SINGLE_PASS:
        mask = cols < D
        h = tl.load(x_row + cols * stride_xd, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(r_row + cols * stride_rd, mask=mask, other=0.0).to(tl.float32)
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
            h = tl.load(x_row + c * stride_xd, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                h += tl.load(r_row + c * stride_rd, mask=mask, other=0.0).to(tl.float32)
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
                h = tl.load(x_row + c * stride_xd, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)


@_aot.register
def _aot_specs():
    """What a GPU compiles: Triton specializes integer arguments at launch (equal to 1 -> a
    constexpr, a multiple of 16 -> divisible), so each launch configuration is compiled as
    contiguous rows launch it (unit inner strides; row strides and D 16-divisible, or not for the
    odd two-pass width), plus per dtype a strided launch (x and residual with inner stride 2,
    odd row strides) and the launch where every integer argument is 1."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = _aot.TRITON_DTYPE[dtype]
        types = {"X": f"*{t}", "R": f"*{t}", "W": f"*{t}", "Y": f"*{t}", "S": f"*{t}", "eps": "fp32"}
        ptrs = ("X", "R", "W", "Y", "S")
        row_strides = ("stride_x", "stride_r", "stride_y", "stride_s")
        for has_res in (False, True):
            for D in ROW_LAUNCH_WIDTHS + (ROW_WIDE_ALIGNED,):
                block, warps, single = row_launch_config(D)
                cx = {"HAS_RESIDUAL": has_res, "BLOCK_D": block, "SINGLE_PASS": single}
                yield _aot.AOTSpec(
                    kernel_name="rms_norm", fn=_rms_norm_kernel,
                    config=f"{t} residual={int(has_res)} BLOCK_D={block} {'single' if single else 'two-pass'} warps={warps}",
                    types=types, constexprs=dict(cx, stride_xd=1, stride_rd=1),
                    num_warps=warps, num_stages=ROW_NUM_STAGES,
                    aligned=ptrs + (row_strides + ("D",) if D % 16 == 0 else ()))
        block, warps, single = row_launch_config(ROW_LAUNCH_WIDTHS[0])
        cx = {"HAS_RESIDUAL": True, "BLOCK_D": block, "SINGLE_PASS": single}
        yield _aot.AOTSpec(kernel_name="rms_norm", fn=_rms_norm_kernel, config=f"{t} residual=1 strided x",
                           types=types, constexprs=cx, num_warps=warps, num_stages=ROW_NUM_STAGES,
                           aligned=ptrs + ("stride_y", "stride_s", "D"))
        yield _aot.AOTSpec(kernel_name="rms_norm", fn=_rms_norm_kernel, config=f"{t} residual=1 int args = 1",
                           types=types, constexprs=_aot.value_one(_rms_norm_kernel, types, cx),
                           num_warps=warps, num_stages=ROW_NUM_STAGES, aligned=ptrs)


# ---------------------------------------------------------------------------------------------
# implementations (all write into preallocated out / residual_out)

def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _row_strides(t: torch.Tensor):
    """(rows, row stride, element stride) of t read as ``[-1, D]`` in place, or None when its
    leading dims do not collapse into one row stride (the caller then reshapes, which copies).
    No view is made: on a CPU whose caches the previous op has just evicted, a call's first view
    op costs about 100 us."""
    shape, strides = t.shape, t.stride()
    rows, row_stride = 1, 0
    for i in range(t.dim() - 2, -1, -1):   # innermost leading dim first
        n = shape[i]
        if n == 1:
            continue
        if rows > 1 and strides[i] != row_stride * rows:
            return None
        if rows == 1:
            row_stride = strides[i]
        rows *= n
    return rows, row_stride, strides[-1]


def _cpu_rows(t: torch.Tensor):
    """(t, (rows, row stride, element stride)): t read in place when _row_strides can, else its
    [-1, D] reshape (a copy)."""
    rs = _row_strides(t)
    if rs is None:
        t = _rows(t)
        rs = (t.shape[0], t.stride(0), t.stride(1))
    return t, rs


def _impl_triton(x, weight, eps, residual, out, residual_out):
    if x.numel() == 0:  # no rows, or rows of zero length (view(-1, 0) is ambiguous): nothing to write
        return
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
            x2, r2, weight, y2, s2, x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1), y2.stride(0),
            s2.stride(0), D, eps, HAS_RESIDUAL=residual is not None, BLOCK_D=block, SINGLE_PASS=single,
            num_warps=warps, num_stages=ROW_NUM_STAGES)


def _impl_reference(x, weight, eps, residual, out, residual_out):
    res = _ref.rms_norm(x, weight, eps, residual)
    if residual is None:
        out.copy_(res)
    else:
        out.copy_(res[0])
        residual_out.copy_(res[1])


def _impl_cpu(x, weight, eps, residual, out, residual_out):
    # the C++ twin (csrc/rms_norm/): one read, one write per row, the residual add fused; ATen's
    # F.rms_norm on CPU is a chain of element-wise ops (pow, mean, rsqrt, mul) several times slower
    if x.numel() == 0:
        return
    D = x.shape[-1]
    x, xs = _cpu_rows(x)
    residual, rs = _cpu_rows(residual) if residual is not None else (None, (0, 0, 0))
    w = weight if weight.dtype in (x.dtype, torch.float32) else weight.float()
    _ext.cpu_twin("rms_norm")(x.data_ptr(), _ext.dtype_code(x), xs[0], D, xs[1], xs[2],
                              residual.data_ptr() if residual is not None else 0, rs[1], rs[2],
                              w.data_ptr(), _ext.dtype_code(w), float(eps), out.data_ptr(),
                              residual_out.data_ptr() if residual_out is not None else 0)


@spar_op("rms_norm", mutates_args=("out", "residual_out"), inplace=(("residual_out", "residual"),),
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
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,), device=x.device,
                 last_contiguous=True)
    check_shape("weight", weight, (D,))
    if weight.dtype not in FLOAT_DTYPES:
        weight = weight.float()  # float64: the fp32 math reads it as float32 (one small copy)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps: expected a finite non-negative float, got {eps!r}")
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
