"""Modality routing for mixture-of-transformers (BAGEL's und/gen experts), Triton.

GPU: Triton kernels; CPU: a C++ loop with the gather and the RMSNorm fused
(csrc/split_by_expert/split_by_expert_cpu.cpp, OpenMP + AVX2), ATen index ops without norm.

``split_by_expert`` groups the token rows by expert into one contiguous buffer (expert 0's rows
first, each group in the original token order) and fuses the per-expert RMSNorm every MoT layer
starts with (each expert its own weight); ``merge_experts`` puts grouped rows (e.g. after the
per-expert projections) back in token order.

    perm    = stable argsort(expert_ids)                       (torch.sort, on device)
    offsets = searchsorted(expert_ids[perm], 0..E)             ([E+1], on device, no host sync)
    rows[j] = rmsnorm(x[perm[j]]) * norm_weights[expert_ids[perm[j]]]   (fp32 math, one rounding)
    merge:  out[perm[j]] = grouped[j]

Slicing the grouped buffer per expert needs the counts on the host: pass ``counts=`` when the
caller knows them (the runtime does: it built the sequence), else :meth:`ExpertSplit.expert`
reads ``offsets`` once (one host sync on CUDA). The kernels themselves never sync.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from . import _aot, _ext
from ._op import device_guard, is_tracing, spar_op
from ._triton import ROW_LAUNCH_WIDTHS, ROW_NUM_STAGES, ROW_WIDE_ALIGNED, row_launch_config, tl, triton
from ._validate import (FLOAT_DTYPES, as_index, check_index_range, check_no_overlap, check_out, check_tensor,
                        host_readable)
from .reference import split_by_expert as _ref
from .row_moves import bits_view, copy_rows_triton



class ExpertSplit(NamedTuple):
    """What :func:`split_by_expert` returns (a tuple: ``rows, offsets, perm, counts = split``).

    rows:    ``[N, D]`` the rows grouped by expert (normalized when ``norm_weights`` was given).
    offsets: ``[E+1]`` int64 on x's device; expert e owns ``rows[offsets[e]:offsets[e+1]]``.
    perm:    ``[N]`` int64 on x's device; ``rows[j]`` came from token ``perm[j]``
             (what :func:`merge_experts` needs).
    counts:  per-expert row counts as Python ints when known on the host (CPU inputs or
             ``counts=`` given), else None.
    """
    rows: torch.Tensor
    offsets: torch.Tensor
    perm: torch.Tensor
    counts: tuple | None

    def expert(self, e: int) -> torch.Tensor:
        """Expert ``e``'s rows (a view), ``0 <= e < E``. Reads ``offsets`` on the host when counts
        are unknown."""
        n = len(self.counts) if self.counts is not None else self.offsets.shape[0] - 1
        if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < n:
            raise ValueError(f"e: expected an expert index in [0, {n}), got {e!r}")
        counts = self.counts if self.counts is not None else tuple(
            int(v) for v in (self.offsets[1:] - self.offsets[:-1]).tolist())
        start = sum(counts[:e])
        return self.rows[start:start + counts[e]]


@triton.jit
def _split_norm_kernel(X, PERM, IDS, W, Y, stride_x, stride_w, stride_y, D, E, eps,
                       HAS_NORM: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_PASS: tl.constexpr):
    """Y[j] = rmsnorm(X[PERM[j]]) * W[IDS[PERM[j]]] (or a plain copy without HAS_NORM)."""
    j = tl.program_id(0).to(tl.int64)
    src = tl.load(PERM + j).to(tl.int64)
    x_row = X + src * stride_x
    y_row = Y + j * stride_y
    cols = tl.arange(0, BLOCK_D)
    if HAS_NORM:
        e = tl.load(IDS + src).to(tl.int64)
        e = tl.minimum(tl.maximum(e, 0), E - 1)  # never read outside W (ids are unchecked on CUDA)
        w_row = W + e * stride_w
    if SINGLE_PASS:
        mask = cols < D
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        if HAS_NORM:
            h = x.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
            w = tl.load(w_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)
        else:
            tl.store(y_row + cols, x, mask=mask)
    else:
        rstd = 1.0
        if HAS_NORM:
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for start in range(0, D, BLOCK_D):
                c = start + cols
                h = tl.load(x_row + c, mask=c < D, other=0.0).to(tl.float32)
                acc += h * h
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / D + eps)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            mask = c < D
            x = tl.load(x_row + c, mask=mask, other=0.0)
            if HAS_NORM:
                w = tl.load(w_row + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(y_row + c, (x.to(tl.float32) * rstd * w).to(Y.dtype.element_ty), mask=mask)
            else:
                tl.store(y_row + c, x, mask=mask)


@_aot.register
def _aot_specs():
    """What a GPU compiles (Triton specializes launch ints: 1 -> constexpr, 16-divisible): each
    width with 16-divisible strides and D, plus per dtype int32 expert ids and the launch where
    every integer argument is 1 (one expert, a row of one element)."""
    for dtype in FLOAT_DTYPES:
        t = _aot.TRITON_DTYPE[dtype]
        for wt in sorted({t, "fp32"}):
            types = {"X": f"*{t}", "PERM": "*i64", "IDS": "*i64", "W": f"*{wt}", "Y": f"*{t}", "eps": "fp32"}
            for D in ROW_LAUNCH_WIDTHS + (ROW_WIDE_ALIGNED,):
                block, warps, single = row_launch_config(D)
                yield _aot.AOTSpec(
                    kernel_name="split_by_expert", fn=_split_norm_kernel,
                    config=f"{t} weight={wt} BLOCK_D={block} {'single' if single else 'two-pass'} warps={warps}",
                    types=types, constexprs={"HAS_NORM": True, "BLOCK_D": block, "SINGLE_PASS": single},
                    num_warps=warps, num_stages=ROW_NUM_STAGES,
                    aligned=("X", "PERM", "IDS", "W", "Y") + (("stride_x", "stride_w", "stride_y", "D") if D % 16 == 0 else ()))
        block, warps, single = row_launch_config(1)
        types = {"X": f"*{t}", "PERM": "*i64", "IDS": "*i32", "W": f"*{t}", "Y": f"*{t}", "eps": "fp32"}
        cx = {"HAS_NORM": True, "BLOCK_D": block, "SINGLE_PASS": single}
        yield _aot.AOTSpec(kernel_name="split_by_expert", fn=_split_norm_kernel, config=f"{t} int32 ids",
                           types=types, constexprs=cx, num_warps=warps, num_stages=ROW_NUM_STAGES,
                           aligned=("X", "PERM", "IDS", "W", "Y"))
        yield _aot.AOTSpec(kernel_name="split_by_expert", fn=_split_norm_kernel, config=f"{t} int args = 1",
                           types=types, constexprs=_aot.value_one(_split_norm_kernel, types, cx),
                           num_warps=warps, num_stages=ROW_NUM_STAGES, aligned=("X", "PERM", "IDS", "W", "Y"))


# ---------------------------------------------------------------------------------------------
# split_by_expert implementations: (x, ids, perm, offsets, weights | None, eps, out) -> None

def _split_triton(x, ids, perm, offsets, weights, eps, out):
    N, D = x.shape
    if N == 0 or D == 0:
        return
    if weights is None:
        copy_rows_triton(x, out, perm, None, N)
        return
    xs = x if x.stride(1) == 1 or D == 1 else x.contiguous()
    w = weights if weights.stride(-1) == 1 or D == 1 else weights.contiguous()
    block, warps, single = row_launch_config(D)
    with device_guard(x):
        _split_norm_kernel[(N,)](xs, perm, ids, w, out, xs.stride(0), w.stride(0), out.stride(0), D, w.shape[0],
                                 eps, HAS_NORM=True, BLOCK_D=block, SINGLE_PASS=single, num_warps=warps,
                                 num_stages=ROW_NUM_STAGES)



def _split_cpu(x, ids, perm, offsets, weights, eps, out):
    if weights is None:
        torch.index_select(bits_view(x), 0, perm, out=bits_view(out))
        return
    # the C++ twin: gather + RMSNorm fused, one read and one write per row
    w = weights if weights.dtype in (x.dtype, torch.float32) else weights.float()
    if w.shape[1] > 1 and w.stride(1) != 1:
        w = w.contiguous()
    _ext.cpu_twin("split_by_expert")(x.data_ptr(), _ext.dtype_code(x), x.shape[0], x.shape[1], x.stride(0),
                                     x.stride(1), perm.data_ptr(), ids.data_ptr(), ids.dtype == torch.int64,
                                     w.data_ptr(), _ext.dtype_code(w), w.shape[0], w.stride(0), float(eps),
                                     out.data_ptr())


def _split_reference(x, ids, perm, offsets, weights, eps, out):
    rows, _, _ = _ref.split_by_expert(x, ids, offsets.shape[0] - 1, weights, eps)
    out.copy_(rows)


_SPLIT_IMPLS = {"triton": _split_triton, "cpu": _split_cpu, "reference": _split_reference}


@spar_op("split_by_expert", mutates_args=("out",), impls=_SPLIT_IMPLS)
def _split_op(x: torch.Tensor, expert_ids: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor,
              norm_weights: torch.Tensor | None, eps: float, out: torch.Tensor) -> None: ...


def split_by_expert_workspace(x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The ``workspace=`` of :func:`split_by_expert` for ``x`` ([N, D]) and ``num_experts``."""
    return torch.empty(2 * x.shape[0] + num_experts + 1, dtype=torch.int64, device=x.device)


def split_by_expert(x: torch.Tensor, expert_ids: torch.Tensor | Sequence[int], num_experts: int,
                    norm_weights: torch.Tensor | Sequence[torch.Tensor] | None = None, eps: float = 1e-6, *,
                    counts: Sequence[int] | None = None, out: torch.Tensor | None = None,
                    workspace: torch.Tensor | None = None) -> ExpertSplit:
    """Group token rows by expert, fusing each expert's RMSNorm.

    Args:
        x: ``[N, D]`` token rows, any dtype without ``norm_weights`` (float32/float16/bfloat16
            with it), any strides.
        expert_ids: ``[N]`` int32/int64 (tensor on x's device, or a sequence of ints), values in
            [0, num_experts) (checked on CPU; on CUDA unchecked, without a host sync).
        num_experts: E >= 1.
        norm_weights: optional ``[E, D]`` float tensor (or a sequence of E ``[D]`` tensors): row
            j is ``x[perm[j]] * rsqrt(mean(x^2) + eps) * norm_weights[expert]``, fp32 math, in
            x's dtype. None: the rows are copied unchanged.
        eps: RMSNorm epsilon.
        counts: optional per-expert row counts known on the host (trusted on CUDA), so that
            :meth:`ExpertSplit.expert` slices without a host sync.
        out: optional contiguous ``[N, D]`` buffer for the grouped rows, not sharing memory
            with ``x``.
        workspace: optional contiguous int64 tensor of ``2 * N + num_experts + 1`` elements on x's
            device for the sort's keys and the experts' boundaries (see
            :func:`split_by_expert_workspace`); with ``out=`` and ``workspace=`` the call allocates
            only its returned ``offsets`` and ``perm``.

    Returns:
        :class:`ExpertSplit` ``(rows, offsets, perm, counts)``.
    """
    check_tensor("x", x, ndim=2)
    N, D = x.shape
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: expected an int >= 1, got {num_experts!r}")
    E = num_experts
    ids = as_index("expert_ids", expert_ids, x.device)
    if ids.shape[0] != N:
        raise ValueError(f"expert_ids: expected {N} ids (one per row of x), got {ids.shape[0]}")
    check_index_range("expert_ids", ids, E, f"num_experts = {E}")
    if norm_weights is not None:
        if not isinstance(norm_weights, torch.Tensor):
            if not isinstance(norm_weights, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in norm_weights):
                raise TypeError(f"norm_weights: expected an [E, D] tensor or a sequence of [D] tensors, "
                                f"got {type(norm_weights).__name__}")
            if len(norm_weights) != E:
                raise ValueError(f"norm_weights: expected {E} weights (one per expert), got {len(norm_weights)}")
            for t in norm_weights:
                check_tensor("norm_weights", t, ndim=1, device=x.device)
            norm_weights = torch.stack(list(norm_weights)) if E else norm_weights
        check_tensor("norm_weights", norm_weights, ndim=2, device=x.device)
        if tuple(norm_weights.shape) != (E, D):
            raise ValueError(f"norm_weights: expected shape ({E}, {D}) (num_experts, D), got {tuple(norm_weights.shape)}")
        if not norm_weights.is_floating_point():
            raise ValueError(f"norm_weights: expected a floating-point dtype, got {norm_weights.dtype}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"x: the fused RMSNorm takes dtype in {[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}")
        if norm_weights.dtype not in FLOAT_DTYPES:
            norm_weights = norm_weights.float()
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    if counts is not None:
        counts = tuple(counts)
        if len(counts) != E or any(not isinstance(c, int) or c < 0 for c in counts) or sum(counts) != N:
            raise ValueError(f"counts: expected {E} non-negative ints summing to {N}, got {counts}")
    if out is None:
        out = torch.empty((N, D), dtype=x.dtype, device=x.device)
    else:
        check_out("out", out, (N, D), x.dtype, x.device, disjoint_from=("x", x))
    if workspace is None:
        sorted_ids, perm = torch.sort(ids.to(torch.int64), stable=True)
        bounds = torch.arange(E + 1, device=x.device, dtype=torch.int64)
    else:
        check_out("workspace", workspace, (2 * N + E + 1,), torch.int64, x.device)
        for name, t in (("expert_ids", ids), ("x", x), ("out", out), ("norm_weights", norm_weights)):
            if isinstance(t, torch.Tensor):  # the sort writes the workspace before they are read
                check_no_overlap("workspace", workspace, name, t)
        keys, sorted_ids, bounds = workspace[:N], workspace[N:2 * N], workspace[2 * N:]
        keys.copy_(ids)
        perm = torch.empty(N, dtype=torch.int64, device=x.device)
        torch.sort(keys, stable=True, out=(sorted_ids, perm))
        torch.arange(0, E + 1, 1, out=bounds)
    offsets = torch.searchsorted(sorted_ids, bounds)
    if host_readable(offsets):
        host = tuple(int(v) for v in (offsets[1:] - offsets[:-1]).tolist())
        if counts is not None and counts != host:
            raise ValueError(f"counts: given {counts}, but expert_ids hold {host}")
        counts = host
    if N and D:
        _split_op(x, ids, perm, offsets, norm_weights, float(eps), out)
    return ExpertSplit(out, offsets, perm, counts)


# ---------------------------------------------------------------------------------------------
# merge_experts

def _merge_triton(grouped, perm, out):
    copy_rows_triton(grouped, out, None, perm, perm.shape[0])


def _merge_cpu(grouped, perm, out):
    bits_view(out).index_copy_(0, perm, bits_view(grouped))


def _merge_reference(grouped, perm, out):
    out.copy_(_ref.merge_experts(grouped, perm))


_MERGE_IMPLS = {"triton": _merge_triton, "cpu": _merge_cpu, "reference": _merge_reference}


@spar_op("merge_experts", mutates_args=("out",), impls=_MERGE_IMPLS)
def _merge_op(grouped: torch.Tensor, perm: torch.Tensor, out: torch.Tensor) -> None: ...


def merge_experts(grouped: torch.Tensor, split: ExpertSplit | torch.Tensor, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Restore token order: ``out[perm[j]] = grouped[j]``.

    Args:
        grouped: ``[N, ...]`` rows in the grouped order of a :func:`split_by_expert` call (any
            row shape and dtype: typically the per-expert projections of ``split.rows``).
        split: the :class:`ExpertSplit` (or its ``perm``: ``[N]`` int64 permutation; a perm
            tensor is checked to be one on CPU).
        out: optional contiguous output of grouped's shape and dtype, not sharing memory with
            ``grouped``.
    """
    check_tensor("grouped", grouped)
    if grouped.dim() == 0:
        raise ValueError("grouped: expected at least 1 dimension (rows), got a scalar")
    perm = split.perm if isinstance(split, ExpertSplit) else split
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"split: expected an ExpertSplit or a permutation tensor, got {type(split).__name__}")
    check_tensor("split.perm", perm, ndim=1, device=grouped.device)
    if perm.dtype != torch.int64:
        raise ValueError(f"split.perm: expected an int64 permutation, got dtype {perm.dtype}")
    if perm.shape[0] != grouped.shape[0]:
        raise ValueError(f"grouped: expected {perm.shape[0]} rows (the length of the permutation), "
                         f"got shape {tuple(grouped.shape)}")
    check_index_range("split.perm", perm, grouped.shape[0], "a permutation of the rows")
    if not isinstance(split, ExpertSplit) and perm.device.type == "cpu" and not is_tracing(perm):
        # a caller's tensor (an ExpertSplit's perm comes from a sort): a repeated index would
        # leave rows of out unwritten
        seen = torch.zeros(perm.shape[0], dtype=torch.bool)
        seen[perm] = True
        if not bool(seen.all()):
            raise ValueError(f"split.perm: expected a permutation of 0..{perm.shape[0] - 1}, got repeated indices "
                             f"(missing {int((~seen).sum())} of them)")
    if out is None:
        out = torch.empty(grouped.shape, dtype=grouped.dtype, device=grouped.device)
    else:
        check_out("out", out, tuple(grouped.shape), grouped.dtype, grouped.device,
                  disjoint_from=("grouped", grouped))
    if grouped.numel():
        _merge_op(grouped, perm, out)
    return out
