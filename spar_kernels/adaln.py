"""adaLN-single modulation of SANA / PixArt DiT blocks (Triton).

- :func:`adaln_layernorm`: ``y = LayerNorm(x) * (1 + scale[b]) + shift[b]`` (LayerNorm without
  affine, biased variance, ``eps`` inside the square root), one read of x and one write of y.
- :func:`gated_residual`: ``out = x + gate[b] * y``, in place when ``out is x``.

x is ``[B, N, C]``; shift / scale / gate hold one C-vector per sample: ``[B, C]``, ``[B, 1, C]``
(the chunks of ``scale_shift_table[None] + timestep.reshape(B, 6, C)``, any strides), or a
broadcast ``[C]`` / ``[1, C]`` / ``[1, 1, C]``. x, y and the in-place output may have any strides
(channel strides are kernel arguments; triton specializes the usual stride 1 into contiguous
accesses). fp32 math, one rounding to x's dtype.

adaln_layernorm: one program per token row; rows up to ``ROW_MAX_SINGLE_PASS`` wide stay in
registers (mean and variance from the same registers), wider rows are streamed three times
(mean, variance, write; the re-reads hit L2). The variance is the C++ twin's corrected two-pass
form, accurate for rows far from zero (see _adaln_kernel). gated_residual: a 2-D grid of (row, column block).
"""

from __future__ import annotations

import torch

from . import _aot, _ext
from . import _fp8_out as _fp8
from ._op import device_guard, spar_op
from ._triton import ROW_LAUNCH_WIDTHS, ROW_MIN_BLOCK, row_launch_config, tl, triton
from ._validate import FLOAT_DTYPES, check_out, check_tensor
from .reference import adaln as _ref

_GR_BLOCK = 1024          # columns per gated_residual program


@triton.jit
def _adaln_chunk(x_row, sh_row, sc_row, c64, mask, stride_xc, stride_shc, stride_scc, mean, corr, rstd,
                 OUT_TY: tl.constexpr):
    """One chunk of a streamed row: ``(((x - mean) - corr) * rstd * (1 + scale) + shift)`` rounded to OUT_TY."""
    h = tl.load(x_row + c64 * stride_xc, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(sc_row + c64 * stride_scc, mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(sh_row + c64 * stride_shc, mask=mask, other=0.0).to(tl.float32)
    return (((h - mean) - corr) * rstd * (1.0 + sc) + sh).to(OUT_TY)


@triton.jit
def _adaln_kernel(X, SHIFT, SCALE, Y, Q, S, N, C, stride_xb, stride_xn, stride_xc, stride_yb, stride_yn, stride_yc,
                  stride_shb, stride_shc, stride_scb, stride_scc, eps,
                  BLOCK_C: tl.constexpr, SINGLE_PASS: tl.constexpr, FP8_OUT: tl.constexpr):
    # Channel offsets are int64 (a transposed x has channel stride N: C * N can pass 2^31). A
    # channel stride of 1 (the usual case) is specialized by triton into a contiguous access.
    # FP8_OUT: instead of y, write its per-token FP8 codes into Q ([B*N, C] contiguous, as bytes)
    # and the row's scale into S[row] (the _fp8_out contract: y rounded to x's dtype first).
    # The corrected two-pass variance (as the C++ twin): with d = x - mean (exact for x near the
    # fp32 mean), corr = sum(d) / C fixes the mean's rounding, var = sum(d^2) / C - corr^2 and
    # y = (d - corr) * rstd * ...: rows far from zero (1e4 + randn) keep fp32 accuracy, where the
    # plain two-pass form loses the mean's rounding error (~ulp(1e4) / std) in every element.
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    x_row = X + b * stride_xb + n * stride_xn
    sh_row = SHIFT + b * stride_shb
    sc_row = SCALE + b * stride_scb
    cols = tl.arange(0, BLOCK_C)
    OUT_TY = X.dtype.element_ty
    if SINGLE_PASS:
        mask = cols < C
        c64 = cols.to(tl.int64)
        h = tl.load(x_row + c64 * stride_xc, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(h, axis=0) / C
        d = tl.where(mask, h - mean, 0.0)
        corr = tl.sum(d, axis=0) / C
        var = tl.sum(d * d, axis=0) / C - corr * corr
        rstd = tl.rsqrt(tl.where(var < 0.0, 0.0, var) + eps)  # a NaN variance stays NaN (maximum drops it)
        sc = tl.load(sc_row + c64 * stride_scc, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(sh_row + c64 * stride_shc, mask=mask, other=0.0).to(tl.float32)
        y = ((d - corr) * rstd * (1.0 + sc) + sh).to(OUT_TY)
        if FP8_OUT:
            yf = tl.where(mask, y.to(tl.float32), 0.0)
            scale = _fp8.fp8_scale(_fp8.row_amax(yf, 0))
            tl.store(Q + row * C + c64, _fp8.quantize_codes(yf, scale), mask=mask)
            tl.store(S + row, scale)
        else:
            tl.store(Y + b * stride_yb + n * stride_yn + c64 * stride_yc, y, mask=mask)
    else:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            c = start + cols
            acc += tl.load(x_row + c.to(tl.int64) * stride_xc, mask=c < C, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / C
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            c = start + cols
            mask = c < C
            d = tl.where(mask, tl.load(x_row + c.to(tl.int64) * stride_xc, mask=mask, other=0.0).to(tl.float32) - mean,
                         0.0)
            acc_d += d
            acc += d * d
        corr = tl.sum(acc_d, axis=0) / C
        var = tl.sum(acc, axis=0) / C - corr * corr
        rstd = tl.rsqrt(tl.where(var < 0.0, 0.0, var) + eps)  # a NaN variance stays NaN (maximum drops it)
        if FP8_OUT:  # one more pass for the row's amax, then the codes (y recomputed: no scratch), in
            # half chunks (elementwise, so the values are the same): full ones spill on sm_90a
            half = tl.arange(0, BLOCK_C // 2)
            amax = tl.full([], 0.0, tl.float32)
            for start in range(0, C, BLOCK_C // 2):
                c = start + half
                mask = c < C
                y = _adaln_chunk(x_row, sh_row, sc_row, c.to(tl.int64), mask, stride_xc, stride_shc, stride_scc,
                                 mean, corr, rstd, OUT_TY)
                amax = _fp8.running_amax(amax, tl.where(mask, y.to(tl.float32), 0.0), 0)
            scale = _fp8.fp8_scale(amax)
            for start in range(0, C, BLOCK_C // 2):
                c = start + half
                mask = c < C
                y = _adaln_chunk(x_row, sh_row, sc_row, c.to(tl.int64), mask, stride_xc, stride_shc, stride_scc,
                                 mean, corr, rstd, OUT_TY)
                tl.store(Q + row * C + c, _fp8.quantize_codes(y.to(tl.float32), scale), mask=mask)
            tl.store(S + row, scale)
        else:
            y_row = Y + b * stride_yb + n * stride_yn
            for start in range(0, C, BLOCK_C):
                c = start + cols
                mask = c < C
                c64 = c.to(tl.int64)
                y = _adaln_chunk(x_row, sh_row, sc_row, c64, mask, stride_xc, stride_shc, stride_scc, mean, corr,
                                 rstd, OUT_TY)
                tl.store(y_row + c64 * stride_yc, y, mask=mask)


@triton.jit
def _gated_residual_kernel(X, Yin, G, OUT, N, C, stride_xb, stride_xn, stride_xc, stride_yb, stride_yn, stride_yc,
                           stride_ob, stride_on, stride_oc, stride_gb, stride_gc, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = c < C
    c64 = c.to(tl.int64)
    x = tl.load(X + b * stride_xb + n * stride_xn + c64 * stride_xc, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Yin + b * stride_yb + n * stride_yn + c64 * stride_yc, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + b * stride_gb + c64 * stride_gc, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + b * stride_ob + n * stride_on + c64 * stride_oc, (x + g * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_fp8_kernel(X, Yin, G, OUT, Q, S, N, C, stride_xb, stride_xn, stride_xc, stride_yb, stride_yn,
                               stride_yc, stride_ob, stride_on, stride_oc, stride_gb, stride_gc,
                               BLOCK_C: tl.constexpr, SINGLE_PASS: tl.constexpr):
    # gated_residual with an FP8 copy of its output: one program per token row (the row's amax
    # needs the whole row); out = x + gate * y as the 2-D kernel computes it, plus its per-token
    # codes in Q ([B*N, C] contiguous bytes) and scale in S[row]. Streamed rows: a read-only pass
    # for the amax, then out and the codes (x is read before it is overwritten: out may be x).
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    x_row = X + b * stride_xb + n * stride_xn
    y_row = Yin + b * stride_yb + n * stride_yn
    o_row = OUT + b * stride_ob + n * stride_on
    g_row = G + b * stride_gb
    cols = tl.arange(0, BLOCK_C)
    if SINGLE_PASS:
        mask = cols < C
        c64 = cols.to(tl.int64)
        o = _gr_chunk(x_row, y_row, g_row, c64, mask, stride_xc, stride_yc, stride_gc, OUT.dtype.element_ty)
        tl.store(o_row + c64 * stride_oc, o, mask=mask)
        of = tl.where(mask, o.to(tl.float32), 0.0)
        scale = _fp8.fp8_scale(_fp8.row_amax(of, 0))
        tl.store(Q + row * C + c64, _fp8.quantize_codes(of, scale), mask=mask)
        tl.store(S + row, scale)
    else:
        amax = tl.full([], 0.0, tl.float32)
        for start in range(0, C, BLOCK_C):
            c = start + cols
            mask = c < C
            o = _gr_chunk(x_row, y_row, g_row, c.to(tl.int64), mask, stride_xc, stride_yc, stride_gc,
                          OUT.dtype.element_ty)
            amax = _fp8.running_amax(amax, tl.where(mask, o.to(tl.float32), 0.0), 0)
        scale = _fp8.fp8_scale(amax)
        for start in range(0, C, BLOCK_C):
            c = start + cols
            mask = c < C
            c64 = c.to(tl.int64)
            o = _gr_chunk(x_row, y_row, g_row, c64, mask, stride_xc, stride_yc, stride_gc, OUT.dtype.element_ty)
            tl.store(o_row + c64 * stride_oc, o, mask=mask)
            tl.store(Q + row * C + c64, _fp8.quantize_codes(o.to(tl.float32), scale), mask=mask)
        tl.store(S + row, scale)


@triton.jit
def _gr_chunk(x_row, y_row, g_row, c64, mask, stride_xc, stride_yc, stride_gc, OUT_TY: tl.constexpr):
    """``x + gate * y`` on one chunk of a row, rounded to OUT_TY (as _gated_residual_kernel)."""
    x = tl.load(x_row + c64 * stride_xc, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_row + c64 * stride_yc, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_row + c64 * stride_gc, mask=mask, other=0.0).to(tl.float32)
    return (x + g * y).to(OUT_TY)


def _gr_config(C: int) -> tuple[int, int]:
    block = min(_GR_BLOCK, max(ROW_MIN_BLOCK, triton.next_power_of_2(C)))
    return block, max(1, block // 256)




def _adaln_launch(x, shift, scale, eps, out, fp8_out=None):
    """(grid, args, constexprs, num_warps, num_stages) of one adaln_layernorm launch: what
    :func:`_adaln_triton` runs and what the AOT specs compile. ``fp8_out``: the ``(q, scales)``
    buffers of the FP8 variant (then ``out`` is None: y itself is not written)."""
    B, N, C = x.shape
    block, warps, single = row_launch_config(C)
    fp8 = fp8_out is not None
    ys = (0, 0, 0) if fp8 else out.stride()
    sh, sc = _mod_strides(shift), _mod_strides(scale)
    args = dict(X=x, SHIFT=shift, SCALE=scale, Y=None if fp8 else out, Q=fp8_out[0].view(torch.uint8) if fp8 else None,
                S=fp8_out[1] if fp8 else None, N=N, C=C, stride_xb=x.stride(0), stride_xn=x.stride(1),
                stride_xc=x.stride(2), stride_yb=ys[0], stride_yn=ys[1], stride_yc=ys[2],
                stride_shb=sh[0], stride_shc=sh[1], stride_scb=sc[0], stride_scc=sc[1], eps=eps)
    return (B * N,), args, dict(BLOCK_C=block, SINGLE_PASS=single, FP8_OUT=fp8), warps, 1


def _gr_launch(x, y, gate, out):
    """(grid, args, constexprs, num_warps, num_stages) of one gated_residual launch."""
    B, N, C = x.shape
    block, warps = _gr_config(C)
    gs = _mod_strides(gate)
    args = dict(X=x, Yin=y, G=gate, OUT=out, N=N, C=C, stride_xb=x.stride(0), stride_xn=x.stride(1),
                stride_xc=x.stride(2), stride_yb=y.stride(0), stride_yn=y.stride(1), stride_yc=y.stride(2),
                stride_ob=out.stride(0), stride_on=out.stride(1), stride_oc=out.stride(2),
                stride_gb=gs[0], stride_gc=gs[1])
    return (B * N, triton.cdiv(C, block)), args, dict(BLOCK_C=block), warps, 1


def _gr_fp8_launch(x, y, gate, out, q, scales):
    """(grid, args, constexprs, num_warps, num_stages) of one gated_residual launch with an FP8
    copy of the output: one program per token row, the row kernels' launch configuration."""
    B, N, C = x.shape
    block, warps, single = row_launch_config(C)
    gs = _mod_strides(gate)
    args = dict(X=x, Yin=y, G=gate, OUT=out, Q=q.view(torch.uint8), S=scales, N=N, C=C, stride_xb=x.stride(0),
                stride_xn=x.stride(1), stride_xc=x.stride(2), stride_yb=y.stride(0), stride_yn=y.stride(1),
                stride_yc=y.stride(2), stride_ob=out.stride(0), stride_on=out.stride(1), stride_oc=out.stride(2),
                stride_gb=gs[0], stride_gc=gs[1])
    return (B * N,), args, dict(BLOCK_C=block, SINGLE_PASS=single), warps, 1


def _aot_inputs():
    """(x, modulation vector as the launcher sees it, label) at the launches that matter, as meta
    tensors: every row width the launch config distinguishes with matching dtypes (SANA's
    modulation: a [B, 1, C] chunk of [B, 6, C], i.e. [B, C] with strides (6C, 1)), fp32 modulation
    next to 16-bit x, and for bf16 at SANA's widths the layouts triton specializes differently: a
    transposed x (token stride 1), every other channel (channel stride 2), one token (N == 1), a
    broadcast modulation vector (batch stride 0) and widths / token counts not divisible by 16."""
    meta = dict(device="meta")
    B, N = 2, 1024

    def mod(C, dtype):
        return torch.empty(B, 6, C, dtype=dtype, **meta)[:, 0]

    dts = (torch.float32, torch.float16, torch.bfloat16)
    for dtype in dts:
        for C in ROW_LAUNCH_WIDTHS:
            yield torch.empty(B, N, C, dtype=dtype, **meta), mod(C, dtype), f"C={C}"
    for dtype in dts[1:]:
        for C in (1152, 2240):
            yield torch.empty(B, N, C, dtype=dtype, **meta), mod(C, torch.float32), f"C={C} fp32 modulation"
    bf = torch.bfloat16
    for C in (1152, 2240):
        yield torch.empty(B, C, N, dtype=bf, **meta).transpose(1, 2), mod(C, bf), f"C={C} transposed x"
        yield torch.empty(B, N, 2 * C, dtype=bf, **meta)[..., ::2], mod(C, bf), f"C={C} x[..., ::2]"
        yield torch.empty(B, 1, C, dtype=bf, **meta), mod(C, bf), f"C={C} N=1"
        yield torch.empty(B, N, C, dtype=bf, **meta), torch.empty(C, dtype=bf, **meta).expand(B, C), \
            f"C={C} broadcast modulation"
    yield torch.empty(B, 300, 113, dtype=bf, **meta), mod(113, bf), "C=113 N=300"


@_aot.register
def _aot_specs():
    specs = []
    for x, m, label in _aot_inputs():
        t, mt = _aot.TRITON_DTYPE[x.dtype], _aot.TRITON_DTYPE[m.dtype]
        out = torch.empty(x.shape, dtype=x.dtype, device="meta")
        _, args, consts, warps, stages = _adaln_launch(x, m, m, 1e-6, out)
        specs.append(_aot.launch_spec(
            "adaln_layernorm", _adaln_kernel,
            f"x={t} mod={mt} {label} BLOCK_C={consts['BLOCK_C']} "
            f"{'single' if consts['SINGLE_PASS'] else 'streamed'} warps={warps}",
            args, consts, num_warps=warps, num_stages=stages))
        if x.shape[-1] > 4096:
            continue  # gated_residual's launch config is the same for every width from 1024 on
        for name, o in (("new", out), ("in place", x)):
            if name == "in place" and x.is_contiguous():
                continue  # contiguous x: the same specialization as a new output
            _, args, consts, warps, stages = _gr_launch(x, out, m, o)
            specs.append(_aot.launch_spec(
                "gated_residual", _gated_residual_kernel,
                f"x={t} gate={mt} {label} out={name} BLOCK_C={consts['BLOCK_C']} warps={warps}",
                args, consts, num_warps=warps, num_stages=stages))
    specs += _aot_fp8_specs()
    return _aot.unique(specs)


def _aot_fp8_specs():
    """The FP8-output variants (adaln_layernorm(fp8=True), gated_residual(fp8=True)): every row
    width the launch config distinguishes in fp32 and bf16 (the FP8 runtime's dtypes), SANA's
    layouts (fp32 modulation next to bf16 x; gated_residual in place on the hidden states)."""
    meta = dict(device="meta")
    B, N = 2, 1024
    cases = [(torch.empty(B, N, C, dtype=dt, **meta), torch.empty(B, 6, C, dtype=dt, **meta)[:, 0], f"C={C}")
             for dt in (torch.float32, torch.bfloat16) for C in ROW_LAUNCH_WIDTHS]
    cases += [(torch.empty(B, N, C, dtype=torch.bfloat16, **meta), torch.empty(B, 6, C, **meta)[:, 0],
               f"C={C} fp32 modulation") for C in (1152, 2240)]
    cases.append((torch.empty(B, 300, 113, dtype=torch.bfloat16, **meta),
                  torch.empty(B, 6, 113, dtype=torch.bfloat16, **meta)[:, 0], "C=113 N=300"))
    specs = []
    for x, m, label in cases:
        t, mt = _aot.TRITON_DTYPE[x.dtype], _aot.TRITON_DTYPE[m.dtype]
        q = torch.empty(x.shape, dtype=_fp8.FP8, **meta)
        sc = torch.empty(x.shape[:-1] + (1,), dtype=torch.float32, **meta)
        _, args, consts, warps, stages = _adaln_launch(x, m, m, 1e-6, None, (q, sc))
        specs.append(_aot.launch_spec(
            "adaln_layernorm_fp8", _adaln_kernel,
            f"x={t} mod={mt} {label} BLOCK_C={consts['BLOCK_C']} "
            f"{'single' if consts['SINGLE_PASS'] else 'streamed'} warps={warps}",
            args, consts, num_warps=warps, num_stages=stages))
        for name, o in (("in place", x), ("new", torch.empty(x.shape, dtype=x.dtype, **meta))):
            _, args, consts, warps, stages = _gr_fp8_launch(x, x, m, o, q, sc)
            specs.append(_aot.launch_spec(
                "gated_residual_fp8", _gated_residual_fp8_kernel,
                f"x={t} gate={mt} {label} out={name} BLOCK_C={consts['BLOCK_C']} "
                f"{'single' if consts['SINGLE_PASS'] else 'streamed'} warps={warps}",
                args, consts, num_warps=warps, num_stages=stages))
    return specs


# ---------------------------------------------------------------------------------------------
# implementations (write into preallocated out); shift/scale/gate arrive as the caller gave them
# ([B, C], [B, 1, C], or broadcast [C], [1, C], [1, 1, C]) and are read in place through
# _mod_strides: no view is made on the way (on a CPU whose caches another op has just evicted, the
# first view op of a call costs ~100 us, more than a SANA-sized adaln_layernorm's arithmetic)


def _mod_strides(t):
    """(row stride, channel stride) of a per-sample modulation tensor in any accepted shape; a row
    stride of 0 broadcasts one row to every sample."""
    return (t.stride(0) if t.dim() > 1 and t.shape[0] != 1 else 0), t.stride(-1)


def _mod_rows(t, B: int):
    """The [B, C] view of a modulation tensor (the reference implementations take that)."""
    return (t[:, 0, :] if t.dim() == 3 else t).expand(B, t.shape[-1])


def _adaln_triton(x, shift, scale, eps, out):
    if x.shape[0] * x.shape[1] == 0:
        return
    grid, args, consts, warps, stages = _adaln_launch(x, shift, scale, eps, out)
    with device_guard(x):
        _adaln_kernel[grid](**args, **consts, num_warps=warps, num_stages=stages)


def _adaln_reference(x, shift, scale, eps, out):
    B = x.shape[0]
    out.copy_(_ref.adaln_layernorm(x, _mod_rows(shift, B), _mod_rows(scale, B), eps))


def _cpu_rows(t):
    """A modulation tensor as fp32 rows with channel stride 1 (read in place when it is one) and
    its row stride."""
    if t.dtype != torch.float32 or t.stride(-1) != 1:
        t = t.float().reshape(-1, t.shape[-1]).contiguous()   # [1 or B, C]
    return t, _mod_strides(t)[0]


def _adaln_cpu(x, shift, scale, eps, out):
    B, N, C = x.shape
    (shf, shb), (scf, scb) = _cpu_rows(shift), _cpu_rows(scale)   # the twin adds 1 to scale in fp32
    _ext.cpu_twin("adaln_layernorm")(x.data_ptr(), _ext.dtype_code(x), B, N, C, *x.stride(), shf.data_ptr(), shb,
                                     scf.data_ptr(), scb, out.data_ptr(), *out.stride(), eps)


def _gr_triton(x, y, gate, out):
    if x.numel() == 0:
        return
    grid, args, consts, warps, stages = _gr_launch(x, y, gate, out)
    with device_guard(x):
        _gated_residual_kernel[grid](**args, **consts, num_warps=warps, num_stages=stages)


def _gr_reference(x, y, gate, out):
    out.copy_(_ref.gated_residual(x, y, _mod_rows(gate, x.shape[0])))


def _gr_cpu(x, y, gate, out):
    B, N, C = x.shape
    g, gsb = _cpu_rows(gate)
    _ext.cpu_twin("gated_residual")(x.data_ptr(), _ext.dtype_code(x), B, N, C, *x.stride(), y.data_ptr(),
                                    *y.stride(), g.data_ptr(), gsb, out.data_ptr(), *out.stride())


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


# FP8-output variants (spar_kernels/_fp8_out.py): the Triton kernels' FP8_OUT epilogues; on CPU the
# C++ twin into a scratch row block, then quantize_fp8's twin, inside the one op.

def _adaln_fp8_triton(x, shift, scale, eps, q, scales):
    if x.shape[0] * x.shape[1] == 0:
        return
    grid, args, consts, warps, stages = _adaln_launch(x, shift, scale, eps, None, (q, scales))
    with device_guard(x):
        _adaln_kernel[grid](**args, **consts, num_warps=warps, num_stages=stages)


def _adaln_fp8_unfused(impl, quantize):
    def run(x, shift, scale, eps, q, scales):
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        impl(x, shift, scale, eps, y)
        quantize(y, q, scales)
    return run


def _gr_fp8_triton(x, y, gate, out, q, scales):
    if x.numel() == 0:
        return
    grid, args, consts, warps, stages = _gr_fp8_launch(x, y, gate, out, q, scales)
    with device_guard(x):
        _gated_residual_fp8_kernel[grid](**args, **consts, num_warps=warps, num_stages=stages)


def _gr_fp8_unfused(impl, quantize):
    def run(x, y, gate, out, q, scales):
        impl(x, y, gate, out)
        quantize(out if out.is_contiguous() else out.contiguous(), q, scales)
    return run


_ADALN_FP8_IMPLS = {"triton": _adaln_fp8_triton, "cpu": _adaln_fp8_unfused(_adaln_cpu, _fp8.quantize_rows_cpu),
                    "reference": _adaln_fp8_unfused(_adaln_reference, _fp8.quantize_rows_reference)}
_GR_FP8_IMPLS = {"triton": _gr_fp8_triton, "cpu": _gr_fp8_unfused(_gr_cpu, _fp8.quantize_rows_cpu),
                 "reference": _gr_fp8_unfused(_gr_reference, _fp8.quantize_rows_reference)}
_GR_FP8_INPLACE_IMPLS = {name: (lambda x, y, gate, q, scales, _f=f: _f(x, y, gate, x, q, scales))
                         for name, f in _GR_FP8_IMPLS.items()}


@spar_op("adaln_layernorm_fp8", mutates_args=("q", "scales"), impls=_ADALN_FP8_IMPLS)
def _adaln_fp8_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, q: torch.Tensor,
                  scales: torch.Tensor) -> None: ...


@spar_op("gated_residual_fp8", mutates_args=("out", "q", "scales"), impls=_GR_FP8_IMPLS)
def _gr_fp8_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, q: torch.Tensor,
               scales: torch.Tensor) -> None: ...


@spar_op("gated_residual_fp8_", mutates_args=("x", "q", "scales"), impls=_GR_FP8_INPLACE_IMPLS)
def _gr_fp8_inplace_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, q: torch.Tensor,
                       scales: torch.Tensor) -> None: ...


# ---------------------------------------------------------------------------------------------
# public API

def check_per_sample(name: str, t, B: int, C: int, device: torch.device) -> torch.Tensor:
    """Validate a per-sample modulation vector and return it as given (the implementations read
    every accepted shape in place, see _mod_strides)."""
    check_tensor(name, t, ndim=(1, 2, 3), dtypes=FLOAT_DTYPES, device=device)
    shape = tuple(t.shape)
    ok = shape[-1] == C and (
        t.dim() == 1
        or (t.dim() == 2 and shape[0] in (1, B))
        or (t.dim() == 3 and shape[0] in (1, B) and shape[1] == 1))
    if not ok:
        raise ValueError(f"{name}: expected one {C}-vector per sample, shaped [{B}, {C}] or [{B}, 1, {C}] "
                         f"(or broadcast [{C}], [1, {C}], [1, 1, {C}]), got shape {shape}")
    return t


def adaln_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float,
                    out=None, fp8: bool = False):
    """LayerNorm (no affine) over the last dimension, then ``* (1 + scale) + shift`` per sample.

    Args:
        x: ``[B, N, C]`` float32 / float16 / bfloat16, any strides (read in place, no copy).
        shift, scale: per-sample vectors: ``[B, C]`` or ``[B, 1, C]`` (any strides), or broadcast
            ``[C]`` / ``[1, C]`` / ``[1, 1, C]``; float32 / float16 / bfloat16 (not necessarily
            x's), on x's device.
        eps: added to the variance (diffusers' SANA blocks use 1e-6).
        out: optional contiguous ``[B, N, C]`` output of x's dtype; with ``fp8=True`` an optional
            ``(q, scales)`` pair of contiguous buffers (float8_e4m3fn ``[B, N, C]``, float32
            ``[B, N, 1]``).
        fp8: return the output quantized per token for ``torch._scaled_mm`` instead, in the same
            launch: ``(q, scales)`` equal to ``quantize_fp8(adaln_layernorm(...))`` (the contract
            in ``spar_kernels/_fp8_out.py``); the output itself is not written.

    Returns:
        ``out``: fp32 math, rounded once to x's dtype; with ``fp8=True`` the ``(q, scales)`` pair.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, N, C = x.shape
    shift = check_per_sample("shift", shift, B, C, x.device)
    scale = check_per_sample("scale", scale, B, C, x.device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    if _fp8.check_flag(fp8):
        q, scales = _fp8.outputs(out, x.shape, x.device)
        if q.numel():
            _adaln_fp8_op(x, shift, scale, float(eps), q, scales)
        return q, scales
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        check_out("out", out, x.shape, x.dtype, x.device)
    if out.numel():
        _adaln_op(x, shift, scale, float(eps), out)
    return out


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, out: torch.Tensor | None = None, *,
                   fp8: bool = False, fp8_out=None):
    """``x + gate * y`` with one gate vector per sample (the gated residual of DiT blocks).

    Args:
        x: ``[B, N, C]`` float32 / float16 / bfloat16, any strides (read in place, no copy).
        y: ``[B, N, C]`` of x's dtype, any strides.
        gate: per-sample vector: ``[B, C]`` or ``[B, 1, C]`` (any strides), or broadcast ``[C]`` /
            ``[1, C]`` / ``[1, 1, C]``; float32 / float16 / bfloat16 (not necessarily x's), on x's device.
        out: ``None`` (a new tensor), ``x`` itself (in-place update, any strides of x; x must not
            overlap itself, e.g. an ``expand``-ed view), or a contiguous ``[B, N, C]`` tensor of x's dtype.
        fp8: also return the output quantized per token for ``torch._scaled_mm`` (the input of the
            GEMM that follows), computed in the same launch: ``(out, q, scales)`` with ``(q, scales)``
            equal to ``quantize_fp8(out)`` (the contract in ``spar_kernels/_fp8_out.py``).
        fp8_out: optional ``(q, scales)`` pair of contiguous buffers for ``fp8=True``
            (float8_e4m3fn ``[B, N, C]``, float32 ``[B, N, 1]``).

    Returns:
        ``out``: fp32 math, rounded once to x's dtype; with ``fp8=True`` ``(out, q, scales)``.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    in_place = out is x
    if in_place and any(st == 0 and n > 1 for n, st in zip(x.shape, x.stride())):
        raise ValueError(f"out: in-place update (out is x) needs x without overlapping elements (not an "
                         f"expanded view), got shape {tuple(x.shape)}, strides {x.stride()}")
    B, N, C = x.shape
    check_tensor("y", y, ndim=3, dtypes=(x.dtype,), device=x.device)
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"y: expected shape {tuple(x.shape)} (x's shape), got shape {tuple(y.shape)}")
    gate = check_per_sample("gate", gate, B, C, x.device)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif not in_place:
        check_out("out", out, x.shape, x.dtype, x.device)
    if _fp8.check_flag(fp8):
        q, scales = _fp8.outputs(fp8_out, x.shape, x.device, "fp8_out")
        if out.numel():
            if in_place:
                _gr_fp8_inplace_op(out, y, gate, q, scales)
            else:
                _gr_fp8_op(x, y, gate, out, q, scales)
        return out, q, scales
    if fp8_out is not None:
        raise ValueError("fp8_out: given without fp8=True")
    if out.numel():
        if in_place:
            _gr_inplace_op(out, y, gate)
        else:
            _gr_op(x, y, gate, out)
    return out
