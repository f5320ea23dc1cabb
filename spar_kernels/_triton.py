"""Triton import guard and interpreter switches.

spar_kernels imports on machines without triton (macOS, a bare CPU box): kernels are then
defined against stand-ins and the "triton" backend reports itself unavailable.

``INTERPRET`` mirrors ``TRITON_INTERPRET=1``, which triton reads when a kernel is
decorated, so it must be set before spar_kernels is imported. Under the interpreter
``tl.dot`` on bfloat16 operands is wrong (it multiplies raw bits), so kernels take a
``DOT_UPCAST`` constexpr, set from :data:`DOT_UPCAST`, and upcast dot operands to fp32
when it is true. This is the one switch for that interpreter limit.

A second interpreter limit: it converts fp32 to bfloat16 by truncation, where the GPU (and
torch) round to nearest even. Under ``TRITON_INTERPRET=1`` spar patches the interpreter's
fp32 -> bf16 cast to round to nearest even, so interpreted kernels store the same bits a GPU
would (:func:`_patch_interpreter_bf16_rounding`).
"""

from __future__ import annotations

import os

# Keep Triton's long-standing default (FP fusion on) explicitly; silences 3.9's warning.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:  # pragma: no cover - exercised by the environment, not by a test
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no triton here"
    HAS_TRITON = False

    class _Constexpr:  # annotations like `BLOCK: tl.constexpr` must still evaluate
        pass

    class _TL:
        constexpr = _Constexpr

    tl = _TL()  # type: ignore[assignment]

    class _Triton:
        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(0, (int(n) - 1).bit_length())

    triton = _Triton()  # type: ignore[assignment]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
DOT_UPCAST = INTERPRET


def _patch_interpreter_bf16_rounding() -> bool:
    """Make the interpreter round fp32 -> bf16 to nearest even, as the hardware does."""
    try:
        import numpy as np
        from triton.runtime import interpreter as _it
    except Exception:  # noqa: BLE001
        return False
    builder = _it.InterpreterBuilder
    if getattr(builder, "_spar_bf16_rne", False):
        return True

    def _rne(data):
        u = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
        r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        return np.where(nan, ((u >> 16) | np.uint32(0x40)).astype(np.uint16), r)

    orig_cast, orig_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return _it.TensorHandle(_rne(src.data), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return _it.TensorHandle(_rne(src.data), tl.bfloat16)
        return orig_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    builder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    builder._spar_bf16_rne = True
    return True


if INTERPRET and HAS_TRITON:
    _patch_interpreter_bf16_rounding()

__all__ = ["triton", "tl", "HAS_TRITON", "INTERPRET", "DOT_UPCAST"]


# ---------------------------------------------------------------------------------------------
# The one launch configuration of the row kernels (rms_norm, adaln_layernorm, split_by_expert):
# one program per row; rows up to ROW_MAX_SINGLE_PASS wide stay in registers (one read, one
# write), wider rows are streamed in ROW_CHUNK pieces.

ROW_MAX_SINGLE_PASS = 8192   # widest row kept in registers (fp32: 32 KB per row across the warps)
ROW_CHUNK = 4096             # chunk of the streamed path for wider rows
ROW_MIN_BLOCK = 128
ROW_NUM_STAGES = 1           # num_stages every row-kernel launch passes (and its AOT specs compile)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def row_launch_config(D: int) -> tuple[int, int, bool]:
    """(BLOCK, num_warps, single_pass) for a row kernel over rows of ``D`` elements."""
    if D <= ROW_MAX_SINGLE_PASS:
        block = max(ROW_MIN_BLOCK, _next_pow2(D))
        return block, min(16, max(1, block // 256)), True
    return ROW_CHUNK, 8, False


# one row width per configuration row_launch_config can pick (what the AOT specs compile)
ROW_LAUNCH_WIDTHS = tuple(1 << p for p in range(ROW_MIN_BLOCK.bit_length() - 1, ROW_MAX_SINGLE_PASS.bit_length())) \
    + (ROW_MAX_SINGLE_PASS + 1,)
ROW_WIDE_ALIGNED = 2 * ROW_MAX_SINGLE_PASS  # a 16-divisible two-pass width (the widths above end with an odd one)
