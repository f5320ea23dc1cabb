"""The middle of SANA's Mix-FFN (diffusers' ``GLUMBConv``), fused (Triton):

    h = depthwise_conv3x3(x; weight, bias, stride 1, zero padding 1)     over the token grid
    a, g = h[..., :C], h[..., C:]                                        (first half, gate half)
    out = a * silu(g)

x is channels-last tokens ``[B, H*W, 2C]`` (token ``i`` at grid row ``i // W``, column ``i % W``),
exactly what the 1x1 "inverted" conv produces as a GEMM; out is ``[B, H*W, C]``, ready for the
1x1 "point" conv GEMM. One read of x (the 9 taps of a tile re-read neighbouring rows from
L1/L2), one write of out, no ``[B, 2C, H, W]`` intermediate. fp32 math, one rounding.

Grid: ``(token tiles x B, channel tiles)`` (the batch folded onto axis x, which has no 65535
limit); each program computes ``BLOCK_P`` tokens x ``BLOCK_C`` output channels, loading the
matching ``a`` and ``g`` channels of the 9 neighbours.
"""

from __future__ import annotations

import torch

from . import _aot, _ext
from . import _fp8_out as _fp8
from ._op import device_guard, spar_op
from ._triton import tl, triton
from ._validate import FLOAT_DTYPES, check_out, check_tensor
from .reference import dwconv_glu as _ref

_BLOCK_P = 16      # tokens per program
_MAX_BLOCK_C = 128  # output channels per program (x2 for the gate half)


@triton.jit
def _dwconv_glu_tile(x_b, Wt, Bias, row, col, p_mask, c, c_mask, Hh, Ww, C, stride_xn, stride_w,
                     HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``a * silu(g)`` (fp32) of the tokens at grid (row, col) and output channels c."""
    acc_a = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in range(9):  # not unrolled: 9 hoisted tile loads would spill
        r = row + (t // 3 - 1)
        cc = col + (t % 3 - 1)
        valid = p_mask & (r >= 0) & (r < Hh) & (cc >= 0) & (cc < Ww)
        src = (r * Ww + cc).to(tl.int64) * stride_xn
        m = valid[:, None] & c_mask[None, :]
        ptr = x_b + src[:, None] + c[None, :]
        xa = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
        xg = tl.load(ptr + C, mask=m, other=0.0).to(tl.float32)
        wa = tl.load(Wt + c * stride_w + t, mask=c_mask, other=0.0).to(tl.float32)
        wg = tl.load(Wt + (c + C) * stride_w + t, mask=c_mask, other=0.0).to(tl.float32)
        # explicit fused multiply-adds: what the GPU compiler contracts these to anyway, and what
        # torch's CPU depthwise conv does, so the interpreter rounds as both do. Taps on the zero
        # padding are skipped, not multiplied (an infinite weight times the padding's 0 is NaN)
        acc_a = tl.where(m, tl.fma(xa, wa[None, :], acc_a), acc_a)
        acc_g = tl.where(m, tl.fma(xg, wg[None, :], acc_g), acc_g)
    if HAS_BIAS:
        acc_a += tl.load(Bias + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(Bias + C + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return acc_a * (acc_g * tl.sigmoid(acc_g))


@triton.jit
def _dwconv_glu_kernel(X, Wt, Bias, O, Hh, Ww, C, n_ptiles, stride_xb, stride_xn, stride_ob, stride_on, stride_w,
                       HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # axis x: (token tile, sample) folded, so the batch never meets the 65535 limit of axes y / z
    pid = tl.program_id(0)
    pid_p = pid % n_ptiles
    b = (pid // n_ptiles).to(tl.int64)
    pid_c = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < Hh * Ww
    c_mask = c < C
    y = _dwconv_glu_tile(X + b * stride_xb, Wt, Bias, p // Ww, p % Ww, p_mask, c, c_mask, Hh, Ww, C, stride_xn,
                         stride_w, HAS_BIAS, BLOCK_P, BLOCK_C)
    tl.store(O + b * stride_ob + p[:, None].to(tl.int64) * stride_on + c[None, :],
             y.to(O.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _dwconv_glu_fp8_kernel(X, Wt, Bias, Q, S, Hh, Ww, C, n_ptiles, stride_xb, stride_xn, stride_w,
                           HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # The FP8-output variant: a program owns whole token rows (their amax spans every channel), so
    # it walks the channel tiles twice: the rows' amax of the outputs rounded to x's dtype, then
    # the codes (Q: [B*H*W, C] contiguous bytes) and the scales (S[token]); the tiles are
    # recomputed, not kept (bit-identical: the same instructions on the same inputs).
    pid = tl.program_id(0)
    pid_p = pid % n_ptiles
    b = (pid // n_ptiles).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < Hh * Ww
    row, col = p // Ww, p % Ww
    x_b = X + b * stride_xb
    OUT_TY = X.dtype.element_ty
    amax = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        y = _dwconv_glu_tile(x_b, Wt, Bias, row, col, p_mask, c, c_mask, Hh, Ww, C, stride_xn, stride_w,
                             HAS_BIAS, BLOCK_P, BLOCK_C).to(OUT_TY).to(tl.float32)
        amax = _fp8.running_amax(amax, tl.where(c_mask[None, :], y, 0.0), 1)
    scale = _fp8.fp8_scale(amax)                                           # [BLOCK_P]
    tok = b * Hh * Ww + p.to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        y = _dwconv_glu_tile(x_b, Wt, Bias, row, col, p_mask, c, c_mask, Hh, Ww, C, stride_xn, stride_w,
                             HAS_BIAS, BLOCK_P, BLOCK_C).to(OUT_TY).to(tl.float32)
        tl.store(Q + tok[:, None] * C + c[None, :], _fp8.quantize_codes(y, scale[:, None]),
                 mask=p_mask[:, None] & c_mask[None, :])
    tl.store(S + tok, scale, mask=p_mask)


def _config(C: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps)."""
    block_c = min(_MAX_BLOCK_C, max(16, triton.next_power_of_2(C)))
    # warps per block width as compiled without spills for sm_80 / sm_90a (python -m
    # spar_kernels.inspect --kernel dwconv_glu: fp16 without bias spilled 8 bytes on sm_90a with 2
    # warps at 16 channels and with 4 warps at 32)
    return _BLOCK_P, block_c, 2 if block_c == 32 else 4


def _launch(x, weight, bias, H, W, out):
    """(grid, args, constexprs, num_warps, num_stages) of one launch: what :func:`_impl_triton`
    runs and what the AOT specs compile."""
    B, HW, C2 = x.shape
    C = C2 // 2
    bp, bc, warps = _config(C)
    n_pt = triton.cdiv(HW, bp)
    args = dict(X=x, Wt=weight, Bias=bias if bias is not None else weight, O=out, Hh=H, Ww=W, C=C, n_ptiles=n_pt,
                stride_xb=x.stride(0), stride_xn=x.stride(1), stride_ob=out.stride(0), stride_on=out.stride(1),
                stride_w=weight.stride(0))
    return ((n_pt * B, triton.cdiv(C, bc)), args, dict(HAS_BIAS=bias is not None, BLOCK_P=bp, BLOCK_C=bc),
            warps, 1)


def _fp8_launch(x, weight, bias, H, W, q, scales):
    """(grid, args, constexprs, num_warps, num_stages) of one FP8-output launch: the token tiles
    of :func:`_launch`, each program over every channel tile."""
    B, HW, C2 = x.shape
    C = C2 // 2
    bp, bc, warps = _config(C)
    # 2 warps at 64 channels: 4 spilled 8 bytes on sm_90a at C=37 and 8 at C=64 (the walk over
    # channel tiles keeps more live than one tile); warps change no value (the amax is a max)
    warps = 2 if bc == 64 else warps
    n_pt = triton.cdiv(HW, bp)
    args = dict(X=x, Wt=weight, Bias=bias if bias is not None else weight, Q=q.view(torch.uint8), S=scales, Hh=H,
                Ww=W, C=C, n_ptiles=n_pt, stride_xb=x.stride(0), stride_xn=x.stride(1), stride_w=weight.stride(0))
    return (n_pt * B,), args, dict(HAS_BIAS=bias is not None, BLOCK_P=bp, BLOCK_C=bc), warps, 1


def _aot_inputs():
    """(x, weight, bias, H, W, label) at the launches that matter, as meta tensors: every channel
    block with matching x / weight dtypes, with and without bias (SANA's Mix-FFN: B=2, 32x32 grid,
    x the [B, N, 2C] output of conv_inverted, weight [2C, 9]); fp32 weights next to 16-bit x; and for
    bf16 a 1-row grid (H == 1), an odd grid and channel count (nothing divisible by 16), and x as
    a channel slice of a wider buffer."""
    meta = dict(device="meta")
    dts = (torch.float32, torch.float16, torch.bfloat16)

    def case(dtype, wdtype, C, has_bias, H=32, W=32, x_width=None):
        x = torch.empty(2, H * W, x_width or 2 * C, dtype=dtype, **meta)[..., :2 * C]
        w = torch.empty(2 * C, 9, dtype=wdtype, **meta)
        b = torch.empty(2 * C, dtype=wdtype, **meta) if has_bias else None
        return x, w, b, H, W

    for dtype in dts:
        for C in (16, 32, 64, 128, 2880):
            for has_bias in (True, False):
                yield case(dtype, dtype, C, has_bias), f"C={C} bias={int(has_bias)}"
    for dtype in dts[1:]:
        yield case(dtype, torch.float32, 2880, True), "C=2880 fp32 weights"
    bf = torch.bfloat16
    yield case(bf, bf, 2880, True, H=1, W=64), "C=2880 grid 1x64"
    yield case(bf, bf, 37, True, H=5, W=7), "C=37 grid 5x7"
    yield case(bf, bf, 2880, True, x_width=3 * 2880), "C=2880 channel slice"


@_aot.register
def _aot_specs():
    specs = []
    for (x, w, b, H, W), label in _aot_inputs():
        out = torch.empty(x.shape[0], x.shape[1], x.shape[2] // 2, dtype=x.dtype, device="meta")
        _, args, consts, warps, stages = _launch(x, w, b, H, W, out)
        t, wt = _aot.TRITON_DTYPE[x.dtype], _aot.TRITON_DTYPE[w.dtype]
        specs.append(_aot.launch_spec(
            "dwconv_glu", _dwconv_glu_kernel,
            f"x={t} w={wt} {label} BLOCK_P={consts['BLOCK_P']} BLOCK_C={consts['BLOCK_C']} warps={warps}",
            args, consts, num_warps=warps, num_stages=stages))
        if x.dtype in (torch.float32, torch.bfloat16):  # the FP8 runtime's dtypes
            q = torch.empty(out.shape, dtype=_fp8.FP8, device="meta")
            sc = torch.empty(out.shape[:-1] + (1,), dtype=torch.float32, device="meta")
            _, args, consts, warps, stages = _fp8_launch(x, w, b, H, W, q, sc)
            specs.append(_aot.launch_spec(
                "dwconv_glu_fp8", _dwconv_glu_fp8_kernel,
                f"x={t} w={wt} {label} BLOCK_P={consts['BLOCK_P']} BLOCK_C={consts['BLOCK_C']} warps={warps}",
                args, consts, num_warps=warps, num_stages=stages))
    return _aot.unique(specs)


# ---------------------------------------------------------------------------------------------
# implementations (write into the preallocated out); weight arrives as [2C, 9]


def _check_grid(x, H, W, out):
    """The op body's own check of what the kernels index by (a direct torch.ops.spar.dwconv_glu
    call skips the public function's validation; a wrong grid would read and write out of bounds)."""
    if H < 1 or W < 1 or H * W != x.shape[1] or tuple(out.shape) != (x.shape[0], x.shape[1], x.shape[2] // 2):
        raise ValueError(f"dwconv_glu: H={H}, W={W} must tile x's {x.shape[1]} tokens and out must be "
                         f"{(x.shape[0], x.shape[1], x.shape[2] // 2)}, got {tuple(out.shape)}")


def _impl_triton(x, weight, bias, H, W, out):
    _check_grid(x, H, W, out)
    grid, args, consts, warps, stages = _launch(x, weight, bias, H, W, out)
    with device_guard(x):
        _dwconv_glu_kernel[grid](**args, **consts, num_warps=warps, num_stages=stages)


def _impl_reference(x, weight, bias, H, W, out):
    out.copy_(_ref.dwconv_glu(x, weight, bias, H, W))


def _impl_cpu(x, weight, bias, H, W, out):
    _check_grid(x, H, W, out)
    B, HW, C2 = x.shape
    C = C2 // 2
    # the C++ twin: one pass, fp32 accumulators per pixel; an fp32 weight ([2C, 9]) and bias are
    # read in place (no per-call copy or view: each costs ~100 us on a cold cache, docs/dit.md)
    w = weight if weight.dtype == torch.float32 else weight.float()
    bf = bias if bias is None or bias.dtype == torch.float32 else bias.float()
    _ext.cpu_twin("dwconv_glu")(x.data_ptr(), _ext.dtype_code(x), B, H, W, C, x.stride(0), x.stride(1),
                                w.data_ptr(), w.stride(0), w.stride(1), bf.data_ptr() if bf is not None else 0,
                                out.data_ptr(), out.stride(0), out.stride(1))


_IMPLS = {"triton": _impl_triton, "cpu": _impl_cpu, "reference": _impl_reference}


@spar_op("dwconv_glu", mutates_args=("out",), impls=_IMPLS)
def _dwconv_glu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, H: int, W: int,
                   out: torch.Tensor) -> None: ...


# FP8 output (spar_kernels/_fp8_out.py): the Triton FP8 kernel; on CPU the twin into a scratch
# output, then quantize_fp8's twin, inside the one op.

def _fp8_triton(x, weight, bias, H, W, q, scales):
    grid, args, consts, warps, stages = _fp8_launch(x, weight, bias, H, W, q, scales)
    with device_guard(x):
        _dwconv_glu_fp8_kernel[grid](**args, **consts, num_warps=warps, num_stages=stages)


def _fp8_unfused(impl, quantize):
    def run(x, weight, bias, H, W, q, scales):
        y = torch.empty(q.shape, dtype=x.dtype, device=x.device)
        impl(x, weight, bias, H, W, y)
        quantize(y, q, scales)
    return run


_FP8_IMPLS = {"triton": _fp8_triton, "cpu": _fp8_unfused(_impl_cpu, _fp8.quantize_rows_cpu),
              "reference": _fp8_unfused(_impl_reference, _fp8.quantize_rows_reference)}


@spar_op("dwconv_glu_fp8", mutates_args=("q", "scales"), impls=_FP8_IMPLS)
def _dwconv_glu_fp8_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, H: int, W: int,
                       q: torch.Tensor, scales: torch.Tensor) -> None: ...


def dwconv_glu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, H: int, W: int,
               out=None, *, fp8: bool = False):
    """Depthwise 3x3 conv (padding 1) over the channels-last token grid, then ``a * silu(g)``.

    Args:
        x: ``[B, H*W, 2C]`` float32 / float16 / bfloat16 (channels last; any strides, a non-unit
            channel stride is copied).
        weight: the depthwise kernel, ``[2C, 1, 3, 3]`` (``GLUMBConv.conv_depth.weight``) or
            ``[2C, 3, 3]``; float32 / float16 / bfloat16.
        bias: ``[2C]`` or ``None``; float32 / float16 / bfloat16.
        H, W: the token grid (``H * W`` must equal x's token count).
        out: optional contiguous ``[B, H*W, C]`` output of x's dtype, sharing no memory with x
            (ValueError otherwise: each output reads a 3x3 window of x); with ``fp8=True`` an optional
            ``(q, scales)`` pair of contiguous buffers (float8_e4m3fn ``[B, H*W, C]``, float32
            ``[B, H*W, 1]``).
        fp8: return the output quantized per token for ``torch._scaled_mm`` (the point-wise conv's
            GEMM) instead, in the same launch: ``(q, scales)`` equal to
            ``quantize_fp8(dwconv_glu(...))`` (the contract in ``spar_kernels/_fp8_out.py``).

    Returns:
        ``out``, with ``a`` the first C channels of the conv result and ``g`` (the gate) the last C,
        as ``torch.chunk(h, 2, dim=channels)`` in ``GLUMBConv``. fp32 math, one rounding. With
        ``fp8=True`` the ``(q, scales)`` pair.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, HW, C2 = x.shape
    for name, val in (("H", H), ("W", W)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    if H * W != HW:
        raise ValueError(f"H, W: expected H * W == x.shape[1] ({HW} tokens), got H={H}, W={W}")
    if C2 % 2 or C2 == 0:
        raise ValueError(f"x: expected an even, non-zero channel count (the a and gate halves), got {_shape(x)}")
    C = C2 // 2
    check_tensor("weight", weight, ndim=(3, 4), dtypes=FLOAT_DTYPES, device=x.device)
    if tuple(weight.shape) not in ((C2, 1, 3, 3), (C2, 3, 3)):
        raise ValueError(f"weight: expected shape ({C2}, 1, 3, 3) or ({C2}, 3, 3) (a depthwise 3x3 kernel for "
                         f"x's {C2} channels), got shape {tuple(weight.shape)}")
    weight = weight.reshape(C2, 9)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        if tuple(bias.shape) != (C2,):
            raise ValueError(f"bias: expected shape ({C2},), got shape {tuple(bias.shape)}")
        if bias.stride(0) != 1:
            bias = bias.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    shape = (B, HW, C)
    if _fp8.check_flag(fp8):
        q, scales = _fp8.outputs(out, shape, x.device)
        if q.numel():
            _dwconv_glu_fp8_op(x, weight, bias, H, W, q, scales)
        return q, scales
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        check_out("out", out, shape, x.dtype, x.device, disjoint_from=("x", x))  # read 3 rows around each
    if out.numel():
        _dwconv_glu_op(x, weight, bias, H, W, out)
    return out


def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"
