"""FP8 outputs fused into the ops that feed FP8 GEMMs: the shared epilogue and its contract.

``adaln_layernorm``, ``gated_residual``, ``dwconv_glu`` and ``linear_attention`` take ``fp8=True``
and then return their result quantized per token for ``torch._scaled_mm``: ``(q, scales)`` with
``q`` float8_e4m3fn of the op's output shape and ``scales`` float32 ``[..., 1]``, one per token
(the scale spans the whole token row, for linear attention all heads of the token). One launch
instead of the op plus :func:`spar_kernels.quantize_fp8`.

Rounding contract: the fused op quantizes the value the unfused op would have stored. Each
element is computed as the unfused kernel computes it, rounded once to the op's output dtype
(x's dtype), and then exactly as ``quantize_fp8(out, "token")``::

    amax  = max |y| over the token row          (a NaN anywhere in the row gives a NaN amax)
    scale = max(amax, 1e-12) / 448              (IEEE division)
    q     = e4m3fn(y / scale)                   (IEEE division; round to nearest even, saturating at
                                                 +-448; NaN -> NaN)

so ``op(..., fp8=True) == quantize_fp8(op(...))`` bit for bit on the CPU path (the C++ twin of the
op, then the C++ twin of quantize_fp8, inside one op) and on the reference path. On the GPU the
epilogue (:func:`e4m3_codes`, :func:`fp8_scale`, :func:`row_amax`) uses ``div_rn`` and integer
rounding, so it matches quantize_fp8's CUDA kernel on the same values; where the op's fp32 math
can differ in the last bit between two compilations (FMA contraction) a code can differ by one
fp8 ulp. The codes are computed with integer ops and stored as bytes: triton has no fp8e4nv type
before sm_89 and the AOT specs compile for sm_80 too.
"""

from __future__ import annotations

import torch

from . import _ext
from ._triton import HAS_TRITON, tl, triton
from ._validate import check_no_overlap, check_out
from .reference import quantize_fp8 as _ref_q

FP8 = torch.float8_e4m3fn
FP8_MAX = _ref_q.FP8_MAX
MIN_AMAX = _ref_q.MIN_AMAX

# jit globals must be tl.constexpr (plain values where triton is absent and nothing is compiled)
_FP8_MAX = tl.constexpr(FP8_MAX) if HAS_TRITON else FP8_MAX
_MIN_AMAX = tl.constexpr(MIN_AMAX) if HAS_TRITON else MIN_AMAX


@triton.jit
def e4m3_codes(v):
    """fp32 -> float8_e4m3fn bits (uint8), as ``fp8e4m3_from_float_sat`` in csrc/common: round to
    nearest even, saturate at +-448 (infinities too), NaN -> 0x7F with its sign. Integer ops only.
    int32 throughout: every intermediate of the lanes that use it stays below 2^31."""
    u = v.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    # normal results (|v| >= 2^-6): round the mantissa to 3 bits, rebias the exponent 127 -> 7
    r = a + 0x7FFFF + ((a >> 20) & 1)
    normal = tl.minimum((((r >> 23) - 120) << 3) | ((r >> 20) & 7), 0x7E)
    # subnormal results (|v| < 2^-6): round(|v| * 2^9) to nearest even, from the integer significand
    e = a >> 23
    m = (a & 0x7FFFFF) | 0x800000
    s = tl.minimum(tl.maximum(141 - e, 21), 30)    # |v| * 2^9 = m >> s for these lanes (s >= 21)
    sub = m >> s
    rem = m & ((1 << s) - 1)
    half = 1 << (s - 1)
    sub = sub + ((rem > half) | ((rem == half) & ((sub & 1) == 1))).to(tl.int32)
    code = tl.where(a < 0x3C800000, sub, normal)   # 0x3C800000: 2^-6
    code = tl.where(a >= 0x43E00000, 0x7E, code)   # 0x43E00000: 448.0 (and infinities)
    code = tl.where(a > 0x7F800000, 0x7F, code)    # NaN
    return (code | sign).to(tl.uint8)


@triton.jit
def fp8_scale(amax):
    """``max(amax, 1e-12) / 448`` (IEEE division); a NaN amax gives a NaN scale."""
    return tl.where(amax != amax, amax, tl.math.div_rn(tl.maximum(amax, _MIN_AMAX), _FP8_MAX))


@triton.jit
def row_amax(y, axis: tl.constexpr):
    """max |y| along ``axis`` (masked lanes must hold 0); NaN when any element is NaN."""
    amax = tl.max(tl.abs(y), axis=axis)
    nan = tl.max((y != y).to(tl.int32), axis=axis)
    return tl.where(nan > 0, float("nan"), amax)


@triton.jit
def running_amax(acc, y, axis: tl.constexpr):
    """``max(acc, row_amax(y, axis))``: the amax of a row walked in chunks (``acc`` starts at 0;
    masked lanes of y hold 0); a NaN stays."""
    m = row_amax(y, axis)
    return tl.where((m != m) | (acc != acc), float("nan"), tl.maximum(acc, m))


@triton.jit
def quantize_codes(y, scale):
    """The codes of ``y`` (fp32, already rounded to the op's dtype) with its row's ``scale``."""
    return e4m3_codes(tl.math.div_rn(y, scale))


# ---------------------------------------------------------------------------------------------
# host side


def outputs(out, shape: tuple, device: torch.device, name: str = "out",
            scale_shape: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)`` for an fp8 output of ``shape``: new tensors, or the checked ``out`` pair
    (contiguous float8_e4m3fn ``shape`` and float32 ``scale_shape``, by default
    ``shape[:-1] + (1,)``); ``name`` is the argument named in errors."""
    scale_shape = tuple(shape[:-1]) + (1,) if scale_shape is None else tuple(scale_shape)
    if out is None:
        q, scales = (torch.empty(shape, dtype=FP8, device=device),
                     torch.empty(scale_shape, dtype=torch.float32, device=device))
    else:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"{name}: with fp8=True expected a (q, scales) pair of tensors, got {type(out).__name__}")
        q, scales = out
        check_out(f"{name}[0] (q)", q, shape, FP8, device)
        check_out(f"{name}[1] (scales)", scales, scale_shape, torch.float32, device)
        check_no_overlap(f"{name}[1] (scales)", scales, f"{name}[0] (q)", q)
    if q.numel() == 0 and scales.numel():
        # empty token rows: no kernel writes them; the scale quantize_fp8 gives an all-zero row
        scales.fill_(MIN_AMAX / FP8_MAX)
    return q, scales


def check_flag(fp8) -> bool:
    if not isinstance(fp8, bool):
        raise TypeError(f"fp8: expected a bool, got {type(fp8).__name__}")
    return fp8


def quantize_rows_cpu(y: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """quantize_fp8's C++ twin on a contiguous CPU ``y`` viewed as rows of its last dimension."""
    K = y.shape[-1]
    _ext.cpu_twin("quantize_fp8")(y.data_ptr(), _ext.dtype_code(y), y.numel() // K, K, K, q.data_ptr(),
                                  scales.data_ptr(), True)


def quantize_rows_reference(y: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    rq, rs = _ref_q.quantize_fp8(y, "token")
    q.copy_(rq.view(q.shape))
    scales.copy_(rs.reshape(scales.shape))
