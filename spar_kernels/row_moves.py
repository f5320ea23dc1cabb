"""Row moves on the critical path (Triton): gather, in-place scatter, and padded <-> packed.

- ``gather_rows(x, index)``: ``x[index]`` (pulling out the 256 query rows after DTR).
- ``scatter_rows(x, index, src)``: ``x[index] = src`` in place (overwriting positions with image
  embeddings when editing).
- ``pack_sequences(padded, lengths)`` / ``unpack_sequences(packed, cu_seqlens, max_len)``: the
  CFG batch's variable-length rows without padding, and back.

A row is everything after the first dimension (``C`` elements). The kernels move rows as raw
bits (the rows are viewed as int8/16/32/64 of the element size), so every dtype moves bit-exactly.
One program per (row, column block); int64 row offsets. CUDA tensors run the Triton kernels (CPU
tensors too under ``TRITON_INTERPRET=1``, with ``backend("triton")``); CPU tensors (``"cpu"``) run
ATen's index ops, except ``scatter_rows``, which runs the C++ twin ``_C_cpu.scatter_rows`` (a memcpy
per row, csrc/row_moves/) when x's rows view as ``[N, C]`` with unit inner stride and src does not
share x's memory (``index_put_`` otherwise); ``"reference"`` runs the plain-PyTorch references.

Host syncs: index values are range-checked on CPU tensors only (that check would sync a CUDA
device); on CUDA an out-of-range gather index reads zeros and an out-of-range scatter index is
dropped, never touching memory outside the buffers. ``pack_sequences`` needs the packed length
on the host to allocate its output: pass ``total=`` (or ``out=``) or give ``lengths`` as a
Python list / CPU tensor, else it reads ``sum(lengths)`` from the device (one sync).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import _aot, _ext
from ._op import device_guard, spar_op
from ._triton import ROW_NUM_STAGES, tl, triton
from ._validate import as_index, check_index_range, check_tensor, host_readable, may_overlap, out_or_empty
from .reference import row_moves as _ref

_BLOCK_SMALL = 128    # column block for rows of <= 128 elements
_BLOCK_LARGE = 1024   # column block otherwise (several programs per row)
_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_rows_kernel(X, Y, SRC, DST, n_src, n_dst, stride_x, stride_y, C,
                      HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr, BLOCK_C: tl.constexpr):
    """Y[dst(i)] = X[src(i)]; src(i) = SRC[i] or i, dst(i) = DST[i] or i. Rows outside
    [0, n_src) read as zeros, rows outside [0, n_dst) are not written."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_SRC:
        src = tl.load(SRC + i).to(tl.int64)
    else:
        src = i
    if HAS_DST:
        dst = tl.load(DST + i).to(tl.int64)
    else:
        dst = i
    # (row conditions broadcast over the column block explicitly: the interpreter wants block masks)
    src_b = tl.zeros([BLOCK_C], dtype=tl.int64) + src
    dst_b = tl.zeros([BLOCK_C], dtype=tl.int64) + dst
    v = tl.load(X + src * stride_x + cols, mask=cmask & (src_b >= 0) & (src_b < n_src), other=0)
    tl.store(Y + dst * stride_y + cols, v, mask=cmask & (dst_b >= 0) & (dst_b < n_dst))


@triton.jit
def _varlen_rows_kernel(SRC, DST, CU, T, n_packed, stride_src, stride_dst, C, pad,
                        PACK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row p = b * T + t of the padded layout <-> row CU[b] + t of the packed one (t < CU[b+1] - CU[b]).
    PACK: padded -> packed (rows past a length are skipped); else packed -> padded (they get `pad`)."""
    p = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    b = p // T
    t = p % T
    start = tl.load(CU + b).to(tl.int64)
    end = tl.load(CU + b + 1).to(tl.int64)
    q = start + t
    t_b = tl.zeros([BLOCK_C], dtype=tl.int64) + t
    q_b = tl.zeros([BLOCK_C], dtype=tl.int64) + q
    valid = (t_b < end - start) & (q_b >= 0) & (q_b < n_packed)
    if PACK:
        v = tl.load(SRC + p * stride_src + cols, mask=cmask & valid)
        tl.store(DST + q * stride_dst + cols, v, mask=cmask & valid)
    else:
        v = tl.load(SRC + q * stride_src + cols, mask=cmask & valid, other=0)
        # tl.full, not pad.to(): a launch with pad == 1 makes `pad` a constexpr, which has no .to()
        v = tl.where(valid, v, tl.full([BLOCK_C], pad, v.dtype))
        tl.store(DST + p * stride_dst + cols, v, mask=cmask)


def _block(C: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps) for rows of C elements."""
    return (_BLOCK_SMALL, 1) if C <= _BLOCK_SMALL else (_BLOCK_LARGE, 4)


@_aot.register
def _aot_specs():
    """What a GPU compiles: the Python ints of a launch (sizes, row strides, the pad bits) are i32
    unless they exceed it, 16-divisible ones are specialized as such and ones equal to 1 become
    constexprs. Per element size: both column blocks with 16-divisible row strides and C, the wide
    block with odd ones, the launch where every integer argument is 1 (one row of one element,
    pad_value=1); int32 indices; for 8-byte elements a pad bit pattern that needs i64."""
    for size in _BITS_DTYPE:
        t = {1: "i8", 2: "i16", 4: "i32", 8: "i64"}[size]
        for C in (_BLOCK_SMALL, _BLOCK_LARGE + 16, _BLOCK_LARGE + 1, 1):
            block, warps = _block(C)
            kind = "int args = 1" if C == 1 else f"BLOCK_C={block} warps={warps}{'' if C % 16 == 0 else ' odd C'}"
            for idx in ("i64", "i32") if (size == 4 and C == _BLOCK_SMALL) else ("i64",):
                copy_types = {"X": f"*{t}", "Y": f"*{t}", "SRC": f"*{idx}", "DST": f"*{idx}"}
                for has_src in (True, False):
                    cx = {"HAS_SRC": has_src, "HAS_DST": not has_src, "BLOCK_C": block}
                    yield _aot.AOTSpec(
                        kernel_name="gather_rows" if has_src else "scatter_rows", fn=_copy_rows_kernel,
                        config=f"{t} {idx} index {kind}", types=copy_types,
                        constexprs=_aot.value_one(_copy_rows_kernel, copy_types, cx) if C == 1 else cx,
                        num_warps=warps, num_stages=ROW_NUM_STAGES,
                        aligned=("X", "Y", "SRC", "DST") + (("stride_x", "stride_y", "C") if C % 16 == 0 else ()))
            # pad: the bits of pad_value as launched (i32; i64 for float64 bit patterns; 1 -> constexpr)
            pads = ("i32", "i64", 1) if size == 8 and C == _BLOCK_SMALL else ("i32", 1) if C % 16 == 0 else ("i32",)
            for pad in pads:
                var_types = {"SRC": f"*{t}", "DST": f"*{t}", "CU": "*i64", "pad": pad if pad != 1 else "i32"}
                for pack in (True, False) if pad == "i32" else (False,):
                    cx = {"PACK": pack, "BLOCK_C": block} | ({"pad": 1} if pad == 1 else {})
                    yield _aot.AOTSpec(
                        kernel_name="pack_sequences" if pack else "unpack_sequences", fn=_varlen_rows_kernel,
                        config=f"{t} {kind}{' pad=1' if pad == 1 and C != 1 else ''}"
                               f"{' i64 pad bits' if pad == 'i64' else ''}", types=var_types,
                        constexprs=_aot.value_one(_varlen_rows_kernel, var_types, cx) if C == 1 else cx,
                        num_warps=warps, num_stages=ROW_NUM_STAGES,
                        aligned=("SRC", "DST", "CU") + (("stride_src", "stride_dst", "C") if C % 16 == 0 else ())
                        + (("pad",) if pad != 1 and C != 1 else ()))  # pad 0 (pack, default), float bits: 16-divisible


# ---------------------------------------------------------------------------------------------
# layout helpers

def _rows_view(t: torch.Tensor, name: str, *, writable: bool = False) -> torch.Tensor:
    """``t`` as [rows, C] with unit inner stride, viewed as an int type of its element size, or as
    int64 pairs ([rows, 2C]) for 16-byte elements (complex128) (a view when the layout allows;
    read-only inputs are copied otherwise). Callers take C and the element size from the view."""
    n = t.shape[0]
    C = math.prod(t.shape[1:])
    try:
        v = t.view(n, C)
    except RuntimeError:
        if writable:
            raise ValueError(f"{name}: the rows of a tensor written in place must be viewable as "
                             f"[{n}, {C}] with unit inner stride, got strides {t.stride()}") from None
        v = t.reshape(n, C).contiguous()
    if C > 1 and v.stride(1) != 1:
        if writable:
            raise ValueError(f"{name}: the rows of a tensor written in place need unit inner stride, "
                             f"got strides {t.stride()}")
        v = v.contiguous()
    es = t.element_size()
    if es in _BITS_DTYPE:
        return v.view(_BITS_DTYPE[es])
    if es == 16:
        if C <= 1 and v.stride(-1) != 1:  # rows of one element: any column stride names the same element
            v = v.as_strided((n, C), (v.stride(0), 1))
        return v.view(torch.int64)  # [rows, 2C]: the kernels move rows of 8-byte words
    return v


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as the int type of its element size (any strides): ATen's index ops then move
    every dtype (float8, bool, ...) bit-exactly."""
    return t.view(_BITS_DTYPE[t.element_size()]) if t.element_size() in _BITS_DTYPE and t.dim() else t


def _grid_launch(kernel, n_rows, C, *args, **constexprs):
    block, warps = _block(C)
    with device_guard(args[0]):
        kernel[(n_rows, triton.cdiv(C, block))](*args, BLOCK_C=block, num_warps=warps, num_stages=ROW_NUM_STAGES,
                                                **constexprs)



def copy_rows_triton(x: torch.Tensor, y: torch.Tensor, src: torch.Tensor | None, dst: torch.Tensor | None,
                     n_launch: int) -> None:
    """y[dst[i]] = x[src[i]] for i < n_launch, any dtype (rows moved as bits)."""
    if n_launch == 0 or x.shape[0] == 0 or y.shape[0] == 0 or x[0].numel() == 0:
        return
    xv, yv = _rows_view(x, "x"), _rows_view(y, "out", writable=True)
    C = xv.shape[1]
    dummy = src if src is not None else dst
    _grid_launch(_copy_rows_kernel, n_launch, C, xv, yv, src if src is not None else dummy,
                 dst if dst is not None else dummy, xv.shape[0], yv.shape[0], xv.stride(0), yv.stride(0), C,
                 HAS_SRC=src is not None, HAS_DST=dst is not None)


# ---------------------------------------------------------------------------------------------
# gather_rows

def _gather_triton(x, index, out):
    if x.shape[0] == 0:  # nothing can be read: every (out-of-range) row reads as zeros
        out.zero_()
        return
    copy_rows_triton(x, out, index, None, index.shape[0])


def _gather_cpu(x, index, out):
    torch.index_select(bits_view(x), 0, index, out=bits_view(out))


def _gather_reference(x, index, out):
    out.copy_(_ref.gather_rows(x, index))


_GATHER_IMPLS = {"triton": _gather_triton, "cpu": _gather_cpu, "reference": _gather_reference}


@spar_op("gather_rows", mutates_args=("out",), impls=_GATHER_IMPLS)
def _gather_rows_op(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None: ...


def _check_rows_input(name: str, x) -> None:
    check_tensor(name, x)
    if x.dim() == 0:
        raise ValueError(f"{name}: expected at least 1 dimension (rows), got a scalar")


def gather_rows(x: torch.Tensor, index: torch.Tensor | Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i] = x[index[i]]`` (rows along the first dimension; duplicates allowed).

    Args:
        x: ``[N, ...]`` any dtype, any strides.
        index: ``[M]`` int32/int64 (tensor on x's device, or a sequence of ints), values in [0, N).
        out: optional contiguous ``[M, ...]`` of x's dtype, not sharing memory with ``x``.

    Returns:
        ``out``.
    """
    _check_rows_input("x", x)
    index = as_index("index", index, x.device)
    check_index_range("index", index, x.shape[0], f"x has {x.shape[0]} rows")
    out = out_or_empty("out", out, (index.shape[0],) + tuple(x.shape[1:]), x.dtype, x.device, disjoint_from=("x", x))
    if out.numel() == 0:
        return out
    _gather_rows_op(x, index, out)
    return out


# ---------------------------------------------------------------------------------------------
# scatter_rows

def _scatter_triton(x, index, src):
    copy_rows_triton(src, x, None, index, index.shape[0])


def _scatter_cpu(x, index, src):
    # the C++ twin (a memcpy per row) when x's rows are [N, C] with unit inner stride and src does
    # not share x's memory; ATen's index_put_ otherwise
    if x[0].numel() and src.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
        try:
            xv = _rows_view(x, "x", writable=True)
        except ValueError:
            xv = None
        if xv is not None:
            sv, idx = _rows_view(src, "src"), index.contiguous()
            es, ses = xv.element_size(), sv.element_size()  # the views' (int64 pairs for complex128)
            _ext.cpu_twin("scatter_rows")(xv.data_ptr(), xv.shape[0], xv.stride(0) * es, idx.data_ptr(),
                                          idx.dtype == torch.int64, idx.shape[0], sv.data_ptr(),
                                          sv.stride(0) * ses, xv.shape[1] * es)
            return
    _scatter_index_put(x, index, src)


def _scatter_index_put(x, index, src):
    # exactly what eager `x[index] = src` runs: index_put_ in x's own dtype (an int view of the
    # bits only for dtypes ATen cannot index_put_ on CPU, e.g. float8)
    idx = (index.long() if index.dtype != torch.int64 else index,)
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.bool):
        x.index_put_(idx, src)
    else:
        bits_view(x).index_put_(idx, bits_view(src))


def _scatter_reference(x, index, src):
    x.copy_(_ref.scatter_rows(x, index, src))


_SCATTER_IMPLS = {"triton": _scatter_triton, "cpu": _scatter_cpu, "reference": _scatter_reference}


@spar_op("scatter_rows", mutates_args=("x",), impls=_SCATTER_IMPLS)
def _scatter_rows_op(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None: ...


def scatter_rows(x: torch.Tensor, index: torch.Tensor | Sequence[int], src: torch.Tensor) -> torch.Tensor:
    """Overwrite rows in place: ``x[index[i]] = src[i]``; returns ``x``.

    Args:
        x: ``[N, ...]`` any dtype; its rows must be viewable as ``[N, C]`` with unit inner stride
            (any row stride) when the Triton kernel writes it.
        index: ``[M]`` int32/int64 (or a sequence of ints), values in [0, N). With duplicate
            indices one of the source rows wins (which one is unspecified).
        src: ``[M, ...]`` with x's dtype and trailing shape, any strides; it may share memory
            with x (rows of x itself): every source row is then read before any row is written.
    """
    _check_rows_input("x", x)
    index = as_index("index", index, x.device)
    check_index_range("index", index, x.shape[0], f"x has {x.shape[0]} rows")
    check_tensor("src", src, dtypes=(x.dtype,), device=x.device)
    want = (index.shape[0],) + tuple(x.shape[1:])
    if tuple(src.shape) != want:
        raise ValueError(f"src: expected shape {want} (len(index) rows of x's row shape), got {tuple(src.shape)}")
    if src.numel() == 0:
        return x
    if x.is_cuda:
        _rows_view(x, "x", writable=True)  # raises a ValueError for layouts the kernel cannot write
    if may_overlap(src, x):
        src = src.clone()  # the kernels read each source row as they write: read them all first
    _scatter_rows_op(x, index, src)
    return x


# ---------------------------------------------------------------------------------------------
# pack_sequences / unpack_sequences

def _pack_triton(padded, cu, out):
    B, T = padded.shape[0], padded.shape[1]
    C = math.prod(padded.shape[2:])
    if B * T == 0 or C == 0 or out.shape[0] == 0:
        return
    src = _rows_view(padded.reshape((B * T,) + tuple(padded.shape[2:])), "padded")
    dst = _rows_view(out, "out", writable=True)
    C = src.shape[1]  # in the view's elements
    _grid_launch(_varlen_rows_kernel, B * T, C, src, dst, cu, T, out.shape[0], src.stride(0), dst.stride(0), C, 0,
                 PACK=True)


def _pack_cpu(padded, cu, out):
    lens = (cu[1:] - cu[:-1]).tolist()  # CPU tensor: no device sync
    T = padded.shape[1]
    idx = torch.cat([torch.arange(n, dtype=torch.int64) + b * T for b, n in enumerate(lens)]) if lens else \
        torch.zeros(0, dtype=torch.int64)
    flat = padded.reshape((-1,) + tuple(padded.shape[2:]))
    torch.index_select(bits_view(flat), 0, idx, out=bits_view(out))


def _pack_reference(padded, cu, out):
    out.copy_(_ref.pack_sequences(padded, (cu[1:] - cu[:-1])))


_PACK_IMPLS = {"triton": _pack_triton, "cpu": _pack_cpu, "reference": _pack_reference}


@spar_op("pack_sequences", mutates_args=("out",), impls=_PACK_IMPLS)
def _pack_op(padded: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor) -> None: ...


def cu_seqlens_from_lengths(lengths: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[B+1]`` int64 cumulative offsets ``[0, l0, l0+l1, ...]`` (device op, no host sync),
    written into ``out`` when given (a contiguous ``[B+1]`` int64 tensor on lengths' device)."""
    out = out_or_empty("workspace", out, (lengths.shape[0] + 1,), torch.int64, lengths.device)
    out[:1].zero_()
    torch.cumsum(lengths, 0, out=out[1:])
    return out


def pack_sequences(padded: torch.Tensor, lengths: torch.Tensor | Sequence[int], *, total: int | None = None,
                   out: torch.Tensor | None = None, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Padded ``[B, T, ...]`` -> packed ``[sum(lengths), ...]``: the first ``lengths[b]`` rows of
    every sequence, in order (sequence b starts at row ``cu_seqlens[b]``, see
    :func:`cu_seqlens_from_lengths`).

    Args:
        padded: ``[B, T, ...]`` any dtype, any strides.
        lengths: ``[B]`` int32/int64 tensor on padded's device, or a sequence of ints; each in [0, T].
        total: optional ``sum(lengths)`` known on the host (avoids the one host sync a CUDA
            ``lengths`` tensor otherwise costs; it is trusted, not checked, on CUDA).
        out: optional contiguous ``[total, ...]`` output (its first dimension gives ``total``),
            not sharing memory with ``padded``.
        workspace: optional contiguous ``[B+1]`` int64 tensor on padded's device that receives the
            sequences' row offsets (``cu_seqlens``); with ``out=`` and ``workspace=`` (and
            ``total=`` or host lengths) the call allocates nothing, so a captured graph can reuse them.
    """
    check_tensor("padded", padded)
    if padded.dim() < 2:
        raise ValueError(f"padded: expected [B, T, ...] (at least 2 dimensions), got shape {tuple(padded.shape)}")
    B, T = padded.shape[0], padded.shape[1]
    host_lengths = None if isinstance(lengths, torch.Tensor) else lengths
    lengths = as_index("lengths", lengths, padded.device)
    if lengths.shape[0] != B:
        raise ValueError(f"lengths: expected {B} lengths (one per sequence of padded), got {lengths.shape[0]}")
    if host_readable(lengths) or host_lengths is not None:
        lv = lengths.cpu() if host_lengths is None else torch.tensor(list(host_lengths), dtype=torch.int64)
        if B and (int(lv.min()) < 0 or int(lv.max()) > T):
            raise ValueError(f"lengths: expected values in [0, {T}] (T of padded), got {lv.tolist()}")
        known = int(lv.sum())
        if total is not None and total != known:
            raise ValueError(f"total: expected sum(lengths) = {known}, got {total}")
        total = known
    if out is not None and total is None:
        total = out.shape[0]
    if total is None:
        total = int(lengths.sum())  # the one host sync (CUDA lengths without total= / out=)
    if not isinstance(total, int) or total < 0:
        raise ValueError(f"total: expected a non-negative int, got {total!r}")
    out = out_or_empty("out", out, (total,) + tuple(padded.shape[2:]), padded.dtype, padded.device,
                       disjoint_from=("padded", padded))
    if out.numel() == 0:
        return out
    _pack_op(padded, cu_seqlens_from_lengths(lengths, out=workspace), out)
    return out


_NO_INF = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)}


def _pad_fits(pad_value, dtype: torch.dtype) -> bool:
    """Whether dtype holds pad_value (floats: within its range, inf only where it has one; NaN
    wherever floats are; ints and bool: the exact value, an integer in range that the op's float
    (fp64) pad argument carries exactly: up to 2^53 in magnitude)."""
    if dtype.is_complex:
        return True
    if dtype.is_floating_point:
        if math.isnan(pad_value):
            return True
        if math.isinf(pad_value):
            return dtype not in _NO_INF
        return abs(pad_value) <= torch.finfo(dtype).max
    if not math.isfinite(pad_value) or float(pad_value) != pad_value or not float(pad_value).is_integer():
        return False
    lo, hi = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    return lo <= pad_value <= hi


def _pad_bits(pad_value, dtype: torch.dtype):
    """pad_value as the int of dtype's bit pattern (host-side, no device involved)."""
    t = torch.tensor(pad_value, dtype=dtype)
    return int(t.view(_BITS_DTYPE[t.element_size()]).item()) if t.element_size() in _BITS_DTYPE else pad_value


def _unpack_triton(packed, cu, max_len, pad_value, out):
    B = out.shape[0]
    n = B * max_len
    if n == 0:
        return
    dst = _rows_view(out.view((n,) + tuple(out.shape[2:])), "out", writable=True)
    C = dst.shape[1]
    if C == 0:
        return
    if packed.shape[0] == 0:
        out.fill_(pad_value)
        return
    src = _rows_view(packed, "packed")
    pad = _pad_bits(pad_value, packed.dtype)
    # complex128: (pad, 0) is two different words unless pad is +0.0 (-0.0 has its sign bit)
    split_pad = packed.element_size() == 16 and (pad != 0 or math.copysign(1.0, pad) < 0)
    _grid_launch(_varlen_rows_kernel, n, C, src, dst, cu, max_len, packed.shape[0], src.stride(0), dst.stride(0), C,
                 0 if split_pad else pad, PACK=False)
    if split_pad:  # the rows past each length, written as zeros, get the pad (device ops, no sync)
        lens = (cu[1:] - cu[:-1]).view((B, 1) + (1,) * (out.dim() - 2))
        t = torch.arange(max_len, device=out.device).view((1, max_len) + (1,) * (out.dim() - 2))
        out.copy_(torch.where(t >= lens, torch.full((), pad_value, dtype=out.dtype, device=out.device), out))


def _unpack_cpu(packed, cu, max_len, pad_value, out):
    out.fill_(pad_value)
    B = out.shape[0]
    flat = out.view((B * max_len,) + tuple(out.shape[2:]))
    cl = cu.tolist()  # CPU tensor: no device sync
    for b in range(B):
        n = min(cl[b + 1] - cl[b], max_len)
        if n > 0:
            flat[b * max_len: b * max_len + n].copy_(packed[cl[b]: cl[b] + n])


def _unpack_reference(packed, cu, max_len, pad_value, out):
    out.copy_(_ref.unpack_sequences(packed, cu, max_len, pad_value))


def _int_pad(f):
    """The op's schema carries pad_value as a float; an integer output gets it back as an int."""
    def run(packed, cu_seqlens, max_len, pad_value, out):
        if not (out.is_floating_point() or out.is_complex()) and float(pad_value).is_integer():
            pad_value = int(pad_value)
        f(packed, cu_seqlens, max_len, pad_value, out)
    return run


_UNPACK_IMPLS = {"triton": _int_pad(_unpack_triton), "cpu": _int_pad(_unpack_cpu),
                 "reference": _int_pad(_unpack_reference)}


@spar_op("unpack_sequences", mutates_args=("out",), impls=_UNPACK_IMPLS)
def _unpack_op(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, pad_value: float,
               out: torch.Tensor) -> None: ...


def unpack_sequences(packed: torch.Tensor, cu_seqlens: torch.Tensor | Sequence[int], max_len: int,
                     pad_value=0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed ``[total, ...]`` -> padded ``[B, max_len, ...]`` with ``B = len(cu_seqlens) - 1``;
    sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``; positions past its length hold ``pad_value``.

    Args:
        packed: ``[total, ...]`` any dtype, any strides.
        cu_seqlens: ``[B+1]`` int32/int64 (tensor on packed's device, or a sequence of ints),
            non-decreasing, ``cu_seqlens[-1] <= total``.
        max_len: padded length T; every sequence must fit (checked on CPU; on CUDA longer
            sequences are truncated to max_len, without a host sync).
        pad_value: fill value of the padding, one packed's dtype can hold (ValueError otherwise;
            integer and bool dtypes take integers, of magnitude up to 2^53).
        out: optional contiguous ``[B, max_len, ...]`` output, not sharing memory with ``packed``.
    """
    check_tensor("packed", packed)
    if packed.dim() == 0:
        raise ValueError("packed: expected at least 1 dimension (rows), got a scalar")
    cu = as_index("cu_seqlens", cu_seqlens, packed.device)
    if cu.shape[0] < 1:
        raise ValueError("cu_seqlens: expected at least one offset ([B+1] with B >= 0), got an empty tensor")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
        raise ValueError(f"max_len: expected a non-negative int, got {max_len!r}")
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)):
        raise TypeError(f"pad_value: expected an int or float, got {type(pad_value).__name__}")
    if not _pad_fits(pad_value, packed.dtype):  # inf in float8_e4m3fn, 1e10 in int8: say so here
        raise ValueError(f"pad_value: {pad_value!r} cannot be represented in packed's dtype {packed.dtype}"
                         + ("" if packed.is_floating_point() else
                            " (integer dtypes take integers, exactly: up to 2^53 in magnitude)"))
    if host_readable(cu):
        cl = cu.tolist()
        lens = [cl[b + 1] - cl[b] for b in range(len(cl) - 1)]
        if cl[0] < 0 or any(n < 0 for n in lens) or cl[-1] > packed.shape[0]:
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets from >= 0 up to at most "
                             f"{packed.shape[0]} (rows of packed), got {cl}")
        if lens and max(lens) > max_len:
            raise ValueError(f"max_len: a sequence has {max(lens)} rows, more than max_len = {max_len}")
    out = out_or_empty("out", out, (cu.shape[0] - 1, max_len) + tuple(packed.shape[1:]), packed.dtype, packed.device,
                       disjoint_from=("packed", packed))
    if out.numel() == 0:
        return out
    _unpack_op(packed, cu.to(torch.int64), max_len, float(pad_value), out)
    return out
