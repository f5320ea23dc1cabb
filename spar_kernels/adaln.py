"""adaLN-single modulation of SANA / PixArt DiT blocks (Triton).

- :func:`adaln_layernorm`: ``y = LayerNorm(x) * (1 + scale[b]) + shift[b]`` (LayerNorm without
  affine, biased variance, ``eps`` inside the square root), one read of x and one write of y.
- :func:`gated_residual`: ``out = x + gate[b] * y``, in place when ``out is x``.

x is ``[B, N, C]``; shift / scale / gate hold one C-vector per sample: ``[B, C]``, ``[B, 1, C]``
(the chunks of ``scale_shift_table[None] + timestep.reshape(B, 6, C)``, any strides), or a
broadcast ``[C]`` / ``[1, C]`` / ``[1, 1, C]``. fp32 math, one rounding to x's dtype.

adaln_layernorm: one program per token row; rows up to ``ROW_MAX_SINGLE_PASS`` wide stay in
registers (mean and variance from the same registers), wider rows are streamed three times
(mean, variance, write; the re-reads hit L2). gated_residual: a 2-D grid of (row, column block).
"""

from __future__ import annotations

import torch

from . import _aot, _ext
from ._op import device_guard, spar_op
from ._triton import ROW_LAUNCH_WIDTHS, ROW_MIN_BLOCK, row_launch_config, tl, triton
from ._validate import FLOAT_DTYPES, check_out, check_tensor
from .reference import adaln as _ref

_GR_BLOCK = 1024          # columns per gated_residual program


@triton.jit
def _adaln_kernel(X, SHIFT, SCALE, Y, N, C, stride_xb, stride_xn, stride_yb, stride_yn,
                  stride_shb, stride_shc, stride_scb, stride_scc, eps,
                  BLOCK_C: tl.constexpr, SINGLE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: offsets can pass 2^31 elements
    b = row // N
    n = row % N
    x_row = X + b * stride_xb + n * stride_xn
    y_row = Y + b * stride_yb + n * stride_yn
    sh_row = SHIFT + b * stride_shb
    sc_row = SCALE + b * stride_scb
    cols = tl.arange(0, BLOCK_C)
    if SINGLE_PASS:
        mask = cols < C
        h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(h, axis=0) / C
        d = tl.where(mask, h - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=0) / C + eps)
        sc = tl.load(sc_row + cols * stride_scc, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(sh_row + cols * stride_shc, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (d * rstd * (1.0 + sc) + sh).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            c = start + cols
            acc += tl.load(x_row + c, mask=c < C, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / C
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            c = start + cols
            mask = c < C
            d = tl.where(mask, tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            acc += d * d
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / C + eps)
        for start in range(0, C, BLOCK_C):
            c = start + cols
            mask = c < C
            h = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            sc = tl.load(sc_row + c * stride_scc, mask=mask, other=0.0).to(tl.float32)
            sh = tl.load(sh_row + c * stride_shc, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, ((h - mean) * rstd * (1.0 + sc) + sh).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_kernel(X, Yin, G, OUT, N, C, stride_xb, stride_xn, stride_yb, stride_yn,
                           stride_ob, stride_on, stride_gb, stride_gc, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = c < C
    x = tl.load(X + b * stride_xb + n * stride_xn + c, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Yin + b * stride_yb + n * stride_yn + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + b * stride_gb + c * stride_gc, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + b * stride_ob + n * stride_on + c, (x + g * y).to(OUT.dtype.element_ty), mask=mask)


def _gr_config(C: int) -> tuple[int, int]:
    block = min(_GR_BLOCK, max(ROW_MIN_BLOCK, triton.next_power_of_2(C)))
    return block, max(1, block // 256)




def _mod_combos(block_sizes, mixed_sizes):
    """(x dtype, modulation dtype, block) triples to compile: every launch block with matching
    dtypes, plus fp32 modulation next to 16-bit x (the mixed case of bf16 models) at ``mixed_sizes``."""
    dts = (torch.float32, torch.float16, torch.bfloat16)
    for dtype in dts:
        for C in block_sizes:
            yield dtype, dtype, C
    for dtype in dts[1:]:
        for C in mixed_sizes:
            yield dtype, torch.float32, C


@_aot.register
def _aot_specs():
    for dtype, mdtype, C in _mod_combos(ROW_LAUNCH_WIDTHS, (2048, 4096)):
        t, m = _aot.TRITON_DTYPE[dtype], _aot.TRITON_DTYPE[mdtype]
        block, warps, single = row_launch_config(C)
        yield _aot.AOTSpec(
            kernel_name="adaln_layernorm", fn=_adaln_kernel,
            config=f"x={t} mod={m} BLOCK_C={block} {'single' if single else 'streamed'} warps={warps}",
            types={"X": f"*{t}", "SHIFT": f"*{m}", "SCALE": f"*{m}", "Y": f"*{t}", "stride_xb": "i64",
                   "stride_xn": "i64", "stride_yb": "i64", "stride_yn": "i64", "eps": "fp32"},
            constexprs={"BLOCK_C": block, "SINGLE_PASS": single},
            num_warps=warps, num_stages=1, aligned=("X", "SHIFT", "SCALE", "Y"))
    for dtype, mdtype, C in _mod_combos((128, 256, 512, 1024), (1024,)):
        t, m = _aot.TRITON_DTYPE[dtype], _aot.TRITON_DTYPE[mdtype]
        block, warps = _gr_config(C)
        yield _aot.AOTSpec(
            kernel_name="gated_residual", fn=_gated_residual_kernel,
            config=f"x={t} gate={m} BLOCK_C={block} warps={warps}",
            types={"X": f"*{t}", "Yin": f"*{t}", "G": f"*{m}", "OUT": f"*{t}", "stride_xb": "i64",
                   "stride_xn": "i64", "stride_yb": "i64", "stride_yn": "i64", "stride_ob": "i64",
                   "stride_on": "i64"},
            constexprs={"BLOCK_C": block},
            num_warps=warps, num_stages=1, aligned=("X", "Yin", "G", "OUT"))


# ---------------------------------------------------------------------------------------------
# implementations (write into preallocated out); shift/scale/gate arrive as [B, C] views




def _adaln_triton(x, shift, scale, eps, out):
    B, N, C = x.shape
    if B * N == 0:
        return
    block, warps, single = row_launch_config(C)
    with device_guard(x):
        _adaln_kernel[(B * N,)](
            x, shift, scale, out, N, C, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1), eps,
            BLOCK_C=block, SINGLE_PASS=single, num_warps=warps)


def _adaln_reference(x, shift, scale, eps, out):
    out.copy_(_ref.adaln_layernorm(x, shift, scale, eps))


def _adaln_cpu(x, shift, scale, eps, out):
    B, N, C = x.shape
    sc1 = (scale.float() + 1.0).contiguous()   # [B, C]: the same fp32 (1 + scale) the kernels compute
    shf = shift.float().contiguous()
    _ext.cpu_twin("adaln_layernorm")(x.data_ptr(), _ext.dtype_code(x), B, N, C, x.stride(0), x.stride(1),
                                     shf.data_ptr(), sc1.data_ptr(), out.data_ptr(), out.stride(0),
                                     out.stride(1), eps)


def _gr_triton(x, y, gate, out):
    B, N, C = x.shape
    if B * N * C == 0:
        return
    block, warps = _gr_config(C)
    with device_guard(x):
        _gated_residual_kernel[(B * N, triton.cdiv(C, block))](
            x, y, gate, out, N, C, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            out.stride(0), out.stride(1), gate.stride(0), gate.stride(1), BLOCK_C=block, num_warps=warps)


def _gr_reference(x, y, gate, out):
    out.copy_(_ref.gated_residual(x, y, gate))


def _gr_cpu(x, y, gate, out):
    B, N, C = x.shape
    g = gate.float().contiguous()
    _ext.cpu_twin("gated_residual")(x.data_ptr(), _ext.dtype_code(x), B, N, C, x.stride(0), x.stride(1),
                                    y.data_ptr(), y.stride(0), y.stride(1), g.data_ptr(), out.data_ptr(),
                                    out.stride(0), out.stride(1))


_ADALN_IMPLS = {"triton": _adaln_triton, "cpu": _adaln_cpu, "reference": _adaln_reference}
_GR_IMPLS = {"triton": _gr_triton, "cpu": _gr_cpu, "reference": _gr_reference}


@spar_op("adaln_layernorm", mutates_args=("out",), impls=_ADALN_IMPLS)
def _adaln_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out: torch.Tensor) -> None: ...


@spar_op("gated_residual", mutates_args=("out",), impls=_GR_IMPLS)
def _gr_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> None: ...


# the in-place form: the same implementations with out = x
_GR_INPLACE_IMPLS = {name: (lambda x, y, gate, _f=f: _f(x, y, gate, x)) for name, f in _GR_IMPLS.items()}


@spar_op("gated_residual_", mutates_args=("x",), impls=_GR_INPLACE_IMPLS)
def _gr_inplace_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None: ...


# ---------------------------------------------------------------------------------------------
# public API

def _check_x(name: str, x) -> torch.Tensor:
    check_tensor(name, x, ndim=3, dtypes=FLOAT_DTYPES)
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def per_sample_view(name: str, t, B: int, C: int, device: torch.device) -> torch.Tensor:
    """Validate a per-sample modulation vector and return it as a ``[B, C]`` view (no copy)."""
    check_tensor(name, t, ndim=(1, 2, 3), dtypes=FLOAT_DTYPES, device=device)
    shape = tuple(t.shape)
    ok = shape[-1] == C and (
        t.dim() == 1
        or (t.dim() == 2 and shape[0] in (1, B))
        or (t.dim() == 3 and shape[0] in (1, B) and shape[1] == 1))
    if not ok:
        raise ValueError(f"{name}: expected one {C}-vector per sample, shaped [{B}, {C}] or [{B}, 1, {C}] "
                         f"(or broadcast [{C}], [1, {C}], [1, 1, {C}]), got shape {shape}")
    if t.dim() == 3:
        t = t[:, 0, :]
    return t.expand(B, C)


def adaln_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm (no affine) over the last dimension, then ``* (1 + scale) + shift`` per sample.

    Args:
        x: ``[B, N, C]`` float32 / float16 / bfloat16, any strides (a non-unit last stride is copied).
        shift, scale: per-sample vectors: ``[B, C]`` or ``[B, 1, C]`` (any strides), or broadcast
            ``[C]`` / ``[1, C]`` / ``[1, 1, C]``; any float dtype, on x's device.
        eps: added to the variance (diffusers' SANA blocks use 1e-6).
        out: optional contiguous ``[B, N, C]`` output of x's dtype.

    Returns:
        ``out``: fp32 math, rounded once to x's dtype.
    """
    x = _check_x("x", x)
    B, N, C = x.shape
    shift = per_sample_view("shift", shift, B, C, x.device)
    scale = per_sample_view("scale", scale, B, C, x.device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        check_out("out", out, x.shape, x.dtype, x.device)
    if out.numel():
        _adaln_op(x, shift, scale, float(eps), out)
    return out


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``x + gate * y`` with one gate vector per sample (the gated residual of DiT blocks).

    Args:
        x: ``[B, N, C]`` float32 / float16 / bfloat16, any strides (a non-unit last stride is copied).
        y: ``[B, N, C]`` of x's dtype, any strides.
        gate: per-sample vector: ``[B, C]`` or ``[B, 1, C]`` (any strides), or broadcast ``[C]`` /
            ``[1, C]`` / ``[1, 1, C]``; any float dtype, on x's device.
        out: ``None`` (a new tensor), ``x`` itself (in-place update; x's last dimension must then
            be contiguous), or a contiguous ``[B, N, C]`` tensor of x's dtype.

    Returns:
        ``out``: fp32 math, rounded once to x's dtype.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    in_place = out is x
    if in_place and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"out: in-place update (out is x) needs x's last dimension contiguous, "
                         f"got strides {x.stride()}")
    x = _check_x("x", x)
    B, N, C = x.shape
    check_tensor("y", y, ndim=3, dtypes=(x.dtype,), device=x.device)
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"y: expected shape {tuple(x.shape)} (x's shape), got shape {tuple(y.shape)}")
    if y.shape[-1] > 1 and y.stride(-1) != 1:
        y = y.contiguous()
    gate = per_sample_view("gate", gate, B, C, x.device)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif not in_place:
        check_out("out", out, x.shape, x.dtype, x.device)
    if out.numel():
        if in_place:
            _gr_inplace_op(out, y, gate)
        else:
            _gr_op(x, y, gate, out)
    return out
