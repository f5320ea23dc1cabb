"""Hybrid causal/bidirectional attention over packed sequences: one key interval per query row.

    out[i, h] = softmax_j(scale * q[i, h] . k[j, h // g]) v[j, h // g]   over kv_start[i] <= j < kv_end[i]

for the keys ``j`` of row ``i``'s own sequence (``g = Hq / Hkv``, grouped-query attention).
``q [total_q, Hq, D]`` and ``k, v [total_k, Hkv, D]`` are packed like flash-attn's varlen API;
the intervals come from an :class:`~spar_kernels.AttentionLayout`. Rows with an empty interval
get zeros and ``lse = -inf``.

Implementations (``spar_kernels.backend`` forces one):

- ``"triton"``: FlashAttention-2 style kernel (:mod:`spar_kernels.attention.kernels`) that skips
  empty key tiles and masks only boundary tiles, plus a split-KV decode path for few query rows
  per sequence and a float8_e4m3fn path with per-head descales; its scratch memory (the lse when
  not returned, the decode partials, FP8 descale vectors) comes from a caller-owned ``workspace``
  (:func:`hybrid_attention_workspace`) or is allocated per call;
- ``"cpu"``: fp32 attention through ATen's fused CPU attention, per sequence in query chunks or
  in one of three batched shortcuts, planned on the host from the layout's intervals
  (:mod:`spar_kernels.attention.cpu`);
- ``"reference"``: :mod:`spar_kernels.reference.attention` (one dense mask per sequence).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .._device import same_device
from .._op import spar_op
from .._validate import check_out, check_tensor, host_readable
from ..reference import attention as _ref
from . import kernels as _kernels
from .cpu import _impl_cpu
from .kernels import _impl_triton
from .layout import AttentionLayout, TileWork, validate_intervals

# Head dims every backend takes: any from 8 to 128 (the models' 56, 64, 72, 96, 112, 128 and the
# small test configs' 8 to 48). The kernels pad the head dim to their BLOCK_D (64 or 128) with
# masked loads, never the caller; multiples of 8 keep 16-bit rows 16-byte aligned.
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 128
HEAD_DIMS = range(MIN_HEAD_DIM, MAX_HEAD_DIM + 1)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)

def _impl_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q, max_seqlen_k,
                    softmax_scale, out, lse, q_descale, k_descale, v_descale, workspace):
    o, l = _ref.hybrid_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, softmax_scale,
                                 q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                                 out_dtype=out.dtype)
    out.copy_(o)
    if lse is not None:
        lse.copy_(l)


_IMPLS = {"triton": _impl_triton, "cpu": _impl_cpu, "reference": _impl_reference}


@spar_op("hybrid_attention", mutates_args=("out", "lse", "workspace"), impls=_IMPLS)
def _hybrid_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, out: torch.Tensor,
                         lse: torch.Tensor | None, q_descale: torch.Tensor | None,
                         k_descale: torch.Tensor | None, v_descale: torch.Tensor | None,
                         workspace: torch.Tensor | None) -> None: ...


# ---------------------------------------------------------------------------------------------
# validation

def _check_qkv(q, k, v):
    check_tensor("q", q, ndim=3, dtypes=INPUT_DTYPES, last_contiguous=True)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device, last_contiguous=True)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=q.device, last_contiguous=True)
    total_q, Hq, D = q.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[2] != D:
        raise ValueError(f"k: expected head dim {D} (q's), got shape {tuple(k.shape)}")
    if D not in HEAD_DIMS:
        raise ValueError(f"q: head dim {D} is not supported; expected {MIN_HEAD_DIM} <= head dim <= {MAX_HEAD_DIM} "
                         f"(shape {tuple(q.shape)})")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: the number of query heads ({Hq}) must be a multiple of the number of key/value "
                         f"heads ({Hkv})")


def _check_descale(name: str, t, heads: int, device, fp8: bool, kv_heads: int | None = None):
    """Validate a float32 per-head descale: ``[heads]``, one value, or (q_descale) ``[kv_heads]``
    shared by each query-head group. Returns it unchanged (None stays None)."""
    if t is None:
        return None
    if not fp8:
        raise ValueError(f"{name}: descale factors apply to float8_e4m3fn inputs only")
    check_tensor(name, t, dtypes=(torch.float32,), device=device)
    if t.numel() == 1 or (t.dim() == 1 and t.shape[0] == heads) or (
            kv_heads is not None and t.dim() == 1 and t.shape[0] == kv_heads):
        return t
    want = f"({heads},)" + (f" or ({kv_heads},)" if kv_heads is not None and kv_heads != heads else "")
    raise ValueError(f"{name}: expected a float32 tensor of shape {want} (one factor per head) or a "
                     f"single factor, got shape {tuple(t.shape)}")


def _descale_vector(t, heads: int, buf, device):
    """A contiguous float32 ``[heads]`` descale (no host sync): ``t`` itself when it already is one,
    else written into ``buf`` (a workspace region) or a new tensor; None means 1."""
    if t is not None and t.dim() == 1 and t.shape[0] == heads and t.stride(0) == 1:
        return t
    if buf is None:
        buf = torch.empty(heads, dtype=torch.float32, device=device)
    if t is None:
        return buf.fill_(1.0)
    t = t.detach()  # a descale that requires grad (a Parameter): the kernels take values, nothing to record
    if t.numel() == 1:
        return buf.copy_(t.reshape(1).expand(heads))
    return buf.view(t.shape[0], heads // t.shape[0]).copy_(t.view(-1, 1).expand(-1, heads // t.shape[0])).view(heads)


def hybrid_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, *, softmax_scale: float | None = None,
                            return_lse: bool = False, out: torch.Tensor | None = None,
                            out_lse: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
                            q_descale: torch.Tensor | None = None, k_descale: torch.Tensor | None = None,
                            v_descale: torch.Tensor | None = None):
    """:func:`hybrid_attention` without the layout object.

    ``cu_seqlens_q``, ``cu_seqlens_k``: int32 ``[B+1]``; ``kv_start``, ``kv_end``: int32
    ``[total_q]``; ``max_seqlen_q``/``max_seqlen_k``: at least the longest sequence (they size the
    grid). On CPU every value is validated like :meth:`AttentionLayout.from_intervals` (a
    ValueError). On CUDA only shapes, dtypes and devices are checked (reading values would make the
    host wait for the GPU); the kernels clamp each row's interval to ``[0, seqlen_k]`` of its
    sequence, so intervals outside it cannot read other sequences' keys or memory past ``k``. The
    ``cu_seqlens`` are trusted there: build the layout once with ``from_intervals`` (host data,
    validated) when they come from an untrusted source.
    """
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q, max_seqlen_k,
                      softmax_scale, return_lse, out, out_lse, workspace, q_descale, k_descale, v_descale,
                      check_values=True)


def _workspace_regions(q, k, batch: int, max_seqlen_q: int, max_seqlen_k: int):
    """(descale regions, kernel plan or None): what a call with these shapes takes from a workspace."""
    Hq, Hkv = q.shape[1], k.shape[1]
    descales = {"q_descale": Hq, "k_descale": Hkv, "v_descale": Hkv} if q.dtype == torch.float8_e4m3fn else {}
    plan = None
    if _hybrid_attention_op.backend_for(q.device) == "triton":
        plan = _kernels.plan_for(q, k, batch, max_seqlen_q, max_seqlen_k)
    return descales, plan


def _workspace_numel(q, k, batch, max_seqlen_q, max_seqlen_k) -> int:
    descales, plan = _workspace_regions(q, k, batch, max_seqlen_q, max_seqlen_k)
    return sum(_kernels._round_up(n) for n in descales.values()) + (plan.numel if plan is not None else 0)


def hybrid_attention_workspace(q: torch.Tensor, k: torch.Tensor, layout: AttentionLayout | None = None, *,
                               batch_size: int | None = None, max_seqlen_q: int | None = None,
                               max_seqlen_k: int | None = None) -> torch.Tensor:
    """A float32 workspace for :func:`hybrid_attention` calls with these shapes, dtype and device.

    It holds the scratch memory a call needs besides ``out``/``out_lse``: the log-sum-exp the
    kernels write when the caller does not ask for it, the split-KV decode partials, and FP8
    descale vectors built from single or grouped factors (or ones). Allocate it once (e.g. at the
    largest shape a captured CUDA graph will see: a larger workspace serves every smaller call)
    and pass it as ``workspace=``: the call then allocates nothing. The size depends on q's and k's
    shapes and dtype, the layout's batch size and maximum lengths (or the keyword arguments, for
    :func:`hybrid_attention_varlen`) and the backend that runs on q's device (CPU: only the FP8
    descale vectors).
    """
    _check_qkv(q, k, k)
    if layout is not None:
        if not isinstance(layout, AttentionLayout):
            raise TypeError(f"layout: expected an AttentionLayout or None, got {type(layout).__name__}")
        batch_size, max_seqlen_q, max_seqlen_k = layout.batch_size, layout.max_seqlen_q, layout.max_seqlen_k
    for name, val in (("batch_size", batch_size), ("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name}: expected a non-negative int (or a layout), got {val!r}")
    numel = _workspace_numel(q, k, int(batch_size), int(max_seqlen_q), int(max_seqlen_k))
    return torch.empty(numel, dtype=torch.float32, device=q.device)


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q, max_seqlen_k, softmax_scale,
               return_lse, out, out_lse, workspace, q_descale, k_descale, v_descale, *, check_values: bool):
    _check_qkv(q, k, v)
    dev = q.device
    total_q, Hq, D = q.shape
    Hkv = k.shape[1]
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32,), device=dev)
        if t.shape[0] < 1:
            raise ValueError(f"{name}: expected [B+1] offsets starting at 0, got an empty tensor")
        if t.stride(0) != 1 and t.shape[0] > 1:
            raise ValueError(f"{name}: expected a contiguous tensor, got stride {t.stride()}")
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.shape[0]} entries (as many sequences as "
                         f"cu_seqlens_q), got {cu_seqlens_k.shape[0]}")
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32,), device=dev)
        if t.shape[0] != total_q:
            raise ValueError(f"{name}: expected {total_q} entries (one per query row of q), got {t.shape[0]}")
        if t.stride(0) != 1 and t.shape[0] > 1:
            raise ValueError(f"{name}: expected a contiguous tensor, got stride {t.stride()}")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {val!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) or not softmax_scale > 0 \
            or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: expected a positive finite float or None, got {softmax_scale!r}")
    softmax_scale = float(softmax_scale)
    fp8 = q.dtype == torch.float8_e4m3fn
    q_descale = _check_descale("q_descale", q_descale, Hq, dev, fp8, kv_heads=Hkv)
    k_descale = _check_descale("k_descale", k_descale, Hkv, dev, fp8)
    v_descale = _check_descale("v_descale", v_descale, Hkv, dev, fp8)
    if check_values and host_readable(cu_seqlens_q) and host_readable(kv_start):
        cu_q = cu_seqlens_q.numpy().astype(np.int64)
        cu_k = cu_seqlens_k.numpy().astype(np.int64)
        validate_intervals(cu_q, cu_k, kv_start.numpy().astype(np.int64), kv_end.numpy().astype(np.int64))
        _check_totals(cu_q[-1], cu_k[-1], q, k)
        lq, lk = np.diff(cu_q), np.diff(cu_k)
        for name, given, need in (("max_seqlen_q", max_seqlen_q, lq), ("max_seqlen_k", max_seqlen_k, lk)):
            if need.size and given < int(need.max()):
                raise ValueError(f"{name}: {given} is shorter than the longest sequence ({int(need.max())})")
    out_dtype = torch.bfloat16 if fp8 else q.dtype
    if out is None:
        out = torch.empty((total_q, Hq, D), dtype=out_dtype, device=dev)
    else:
        check_out("out", out, (total_q, Hq, D), out_dtype, dev)
    if out_lse is not None:
        check_out("out_lse", out_lse, (Hq, total_q), torch.float32, dev)
        return_lse = True
    lse = out_lse if out_lse is not None else (
        torch.empty((Hq, total_q), dtype=torch.float32, device=dev) if return_lse else None)
    kernel_ws = None
    descale_bufs = {}
    if workspace is not None:
        B = cu_seqlens_q.shape[0] - 1
        need = _workspace_numel(q, k, B, int(max_seqlen_q), int(max_seqlen_k))
        check_tensor("workspace", workspace, ndim=1, dtypes=(torch.float32,), device=dev)
        if workspace.numel() < need or (workspace.numel() > 1 and workspace.stride(0) != 1):
            raise ValueError(f"workspace: expected a contiguous float32 tensor of at least {need} elements "
                             f"(hybrid_attention_workspace), got shape {tuple(workspace.shape)} and stride "
                             f"{tuple(workspace.stride())}")
        descales, _ = _workspace_regions(q, k, B, int(max_seqlen_q), int(max_seqlen_k))
        off = 0
        for name, n in descales.items():
            descale_bufs[name] = workspace.narrow(0, off, n)
            off += _kernels._round_up(n)
        kernel_ws = workspace.narrow(0, off, workspace.numel() - off)
    if fp8:  # [heads] vectors, from the workspace where they must be built
        q_descale = _descale_vector(q_descale, Hq, descale_bufs.get("q_descale"), dev)
        k_descale = _descale_vector(k_descale, Hkv, descale_bufs.get("k_descale"), dev)
        v_descale = _descale_vector(v_descale, Hkv, descale_bufs.get("v_descale"), dev)
    if total_q > 0:
        _hybrid_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, int(max_seqlen_q),
                             int(max_seqlen_k), float(softmax_scale), out, lse, q_descale, k_descale, v_descale,
                             kernel_ws)
    return (out, lse) if return_lse else out


def _check_totals(total_q, total_k, q, k):
    if int(total_q) != q.shape[0]:
        raise ValueError(f"q: the layout has {int(total_q)} query rows (cu_seqlens_q[-1]) but q has "
                         f"{q.shape[0]} (shape {tuple(q.shape)})")
    if int(total_k) != k.shape[0]:
        raise ValueError(f"k: the layout has {int(total_k)} keys (cu_seqlens_k[-1]) but k has "
                         f"{k.shape[0]} (shape {tuple(k.shape)})")


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, *,
                     softmax_scale: float | None = None, return_lse: bool = False, out: torch.Tensor | None = None,
                     out_lse: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
                     q_descale: torch.Tensor | None = None, k_descale: torch.Tensor | None = None,
                     v_descale: torch.Tensor | None = None):
    """Attention over a packed batch where each query row sees one interval of its sequence's keys.

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]`` with ``Hq % Hkv == 0`` and
            ``8 <= D <= 128`` (:data:`HEAD_DIMS`); float32 / float16 / bfloat16 / float8_e4m3fn, all
            the same dtype and device; the last dimension contiguous (other strides are free).
        layout: an :class:`AttentionLayout` on the tensors' device whose totals match q and k.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        return_lse: also return ``lse`` float32 ``[Hq, total_q]`` (natural log; ``-inf`` on rows
            with an empty interval).
        out: optional contiguous ``[total_q, Hq, D]`` output (q's dtype; bfloat16 for FP8 inputs).
        out_lse: optional contiguous float32 ``[Hq, total_q]`` the lse is written into (implies
            ``return_lse``).
        workspace: optional float32 scratch from :func:`hybrid_attention_workspace`; with it (and
            ``out``, ``out_lse``) the call allocates nothing, so a captured CUDA graph can replay it.
        q_descale, k_descale, v_descale: float32 per-head factors (``[Hq]`` (or ``[Hkv]``, shared by a
            group), ``[Hkv]``, ``[Hkv]``, or one value each) of float8_e4m3fn inputs:
            ``q_real = q.float() * q_descale[h]``; missing factors are 1.

    Returns:
        ``out``, or ``(out, lse)`` with ``return_lse``.
    """
    if not isinstance(layout, AttentionLayout):
        raise TypeError(f"layout: expected an AttentionLayout, got {type(layout).__name__}")
    if isinstance(q, torch.Tensor):
        if not same_device(layout.device, q.device):
            raise ValueError(f"layout: its tensors are on {layout.device} but q is on {q.device}; "
                             "use layout.to(device)")
        if q.dim() == 3 and isinstance(k, torch.Tensor) and k.dim() == 3:
            _check_totals(layout.total_q, layout.total_k, q, k)
    # the layout was validated when it was built: only shapes, dtypes and devices are checked here
    return _attention(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.kv_start, layout.kv_end,
                      layout.max_seqlen_q, layout.max_seqlen_k, softmax_scale, return_lse, out, out_lse,
                      workspace, q_descale, k_descale, v_descale, check_values=False)


__all__ = ["AttentionLayout", "TileWork", "hybrid_attention", "hybrid_attention_varlen", "hybrid_attention_workspace",
           "HEAD_DIMS", "MIN_HEAD_DIM", "MAX_HEAD_DIM"]
