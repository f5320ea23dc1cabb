"""Which keys each query row of a packed batch attends to: one contiguous interval per row.

Row ``i`` of sequence ``b`` sees the keys ``j`` of sequence ``b`` with
``kv_start[i] <= j < kv_end[i]`` (positions within that sequence's keys). Causal, full,
prefix-LM, Transfusion/omni-attention, block-causal and cross-attention masks are all of this
form, so a layout costs O(total_q) integers and is built once per batch, on the host, then
reused by every layer.

The attention kernel reduces each query tile's intervals to four numbers (the union
``[min start, max end)`` of its non-empty rows and the common part ``[max start, min end)`` of
all its rows): key tiles outside the union are skipped, key tiles inside the common part run
without mask arithmetic, the rest are masked. :meth:`AttentionLayout.tile_work` counts these
tiles on the host with exactly the kernel's rule.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

SEGMENT_KINDS = ("causal", "full")


class TileWork(NamedTuple):
    """Key tiles one head of a layout makes the kernel visit, summed over all query tiles."""

    visited: int   # key tiles the kernel loads (between the union bounds of each query tile)
    masked: int    # of those, tiles that apply the interval mask (boundary tiles)
    minimum: int   # key tiles that hold at least one visible (query, key) pair: a lower bound


def _as_int_list(name: str, values, length: int | None = None) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.is_floating_point() or values.is_complex():
            raise ValueError(f"{name}: expected a 1-D integer tensor or a list of ints, got a tensor of "
                             f"shape {tuple(values.shape)} and dtype {values.dtype}")
        out = [int(x) for x in values.tolist()]
    elif isinstance(values, (list, tuple, np.ndarray)):
        out = []
        for x in values:
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
                raise ValueError(f"{name}: expected a list of ints, got an element {x!r} ({type(x).__name__})")
            out.append(int(x))
    else:
        raise TypeError(f"{name}: expected a list of ints or a 1-D integer tensor, got {type(values).__name__}")
    if length is not None and len(out) != length:
        raise ValueError(f"{name}: expected {length} entries, got {len(out)}")
    return out


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a torch.device or a device string, got {device!r}") from e


class AttentionLayout:
    """Packed-batch attention layout: ``cu_seqlens_q``, ``cu_seqlens_k`` (int32 ``[B+1]``),
    ``kv_start``, ``kv_end`` (int32 ``[total_q]``), ``max_seqlen_q``, ``max_seqlen_k``.

    Build it with :meth:`from_segments`, :meth:`cross` or :meth:`from_intervals` (validated);
    the tensors live on ``layout.device``; a host copy of the intervals is kept for
    :meth:`tile_work`, :attr:`visible_pairs` and the CPU path, so nothing on the hot path syncs.
    """

    __slots__ = ("cu_seqlens_q", "cu_seqlens_k", "kv_start", "kv_end", "max_seqlen_q", "max_seqlen_k",
                 "_host", "_sizes")

    def __init__(self, cu_seqlens_q: np.ndarray, cu_seqlens_k: np.ndarray, kv_start: np.ndarray,
                 kv_end: np.ndarray, device: torch.device):
        """Internal: use the ``from_*`` constructors. Arguments are validated int64 numpy arrays."""
        self._host = (cu_seqlens_q, cu_seqlens_k, kv_start, kv_end)
        # plain ints (batch, total_q, total_k): read on every call, also under torch.compile
        self._sizes = (len(cu_seqlens_q) - 1, int(cu_seqlens_q[-1]), int(cu_seqlens_k[-1]))
        lq, lk = np.diff(cu_seqlens_q), np.diff(cu_seqlens_k)
        self.max_seqlen_q = int(lq.max()) if lq.size else 0
        self.max_seqlen_k = int(lk.max()) if lk.size else 0
        # one host buffer for the four tensors (each starting 16-byte aligned, as its own allocation
        # would); on CUDA pinned and copied without blocking the host (a copy from pageable memory
        # waits for the GPU), so a layout built between kernels costs no host sync
        parts = [cu_seqlens_q, cu_seqlens_k, kv_start, kv_end]
        starts = np.cumsum([0] + [-(-len(a) // 4) * 4 for a in parts])
        buf = np.zeros(int(starts[-1]), np.int32)
        for a, o in zip(parts, starts):
            buf[o:o + len(a)] = a
        host = torch.from_numpy(buf)
        if device.type == "cuda":
            host = host.pin_memory()
        flat = host.to(device, non_blocking=device.type == "cuda")
        self.cu_seqlens_q, self.cu_seqlens_k, self.kv_start, self.kv_end = (
            flat[o:o + len(a)] for a, o in zip(parts, starts))

    # ------------------------------------------------------------------------------------------
    # constructors

    @classmethod
    def from_segments(cls, segments: Sequence[Sequence[tuple[str, int]]], num_queries=None,
                      device=None) -> "AttentionLayout":
        """Sequences made of causal and full (bidirectional) segments.

        ``segments[b]`` is a list of ``(kind, length)``, kind ``"causal"`` or ``"full"``. A token
        of a causal segment sees every earlier token of its sequence and itself; a token of a full
        segment sees every earlier token and its whole segment. ``num_queries[b] = n`` (a list, or
        one int for every sequence) makes the queries the last ``n`` tokens of sequence ``b`` (a KV
        cache holds the rest), each keeping the interval of its position.
        """
        dev = _resolve_device(device)
        if not isinstance(segments, (list, tuple)):
            raise TypeError(f"segments: expected a list (one entry per sequence) of lists of (kind, length), "
                            f"got {type(segments).__name__}")
        lens_k, ends = [], []
        for b, seq in enumerate(segments):
            if not isinstance(seq, (list, tuple)):
                raise TypeError(f"segments[{b}]: expected a list of (kind, length) pairs, got {type(seq).__name__}")
            pos, seq_end = 0, []
            for s, seg in enumerate(seq):
                if not (isinstance(seg, (list, tuple)) and len(seg) == 2):
                    raise ValueError(f"segments[{b}][{s}]: expected a (kind, length) pair, got {seg!r}")
                kind, n = seg
                if kind not in SEGMENT_KINDS:
                    raise ValueError(f"segments[{b}][{s}]: kind must be one of {SEGMENT_KINDS}, got {kind!r}")
                if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
                    raise ValueError(f"segments[{b}][{s}]: length must be a non-negative int, got {n!r}")
                n = int(n)
                if kind == "causal":
                    seq_end.append(np.arange(pos + 1, pos + n + 1, dtype=np.int64))
                else:
                    seq_end.append(np.full(n, pos + n, dtype=np.int64))
                pos += n
            lens_k.append(pos)
            ends.append(np.concatenate(seq_end) if seq_end else np.zeros(0, np.int64))
        B = len(lens_k)
        if num_queries is None:
            nq = lens_k
        elif isinstance(num_queries, (int, np.integer)) and not isinstance(num_queries, bool):
            nq = [int(num_queries)] * B
        else:
            nq = _as_int_list("num_queries", num_queries, B)
        for b, (n, lk) in enumerate(zip(nq, lens_k)):
            if not 0 <= n <= lk:
                raise ValueError(f"num_queries[{b}]: expected 0 <= n <= {lk} (the length of sequence {b}), got {n}")
        kv_end = np.concatenate([e[len(e) - n:] for e, n in zip(ends, nq)]) if B else np.zeros(0, np.int64)
        cu_q = np.concatenate([[0], np.cumsum(nq)]).astype(np.int64)
        cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int64)
        return cls(cu_q, cu_k, np.zeros_like(kv_end), kv_end.astype(np.int64), dev)

    @classmethod
    def cross(cls, q_lens, k_lens, device=None) -> "AttentionLayout":
        """Cross-attention: every query of sequence ``b`` sees all ``k_lens[b]`` keys of sequence ``b``."""
        dev = _resolve_device(device)
        ql = _as_int_list("q_lens", q_lens)
        kl = _as_int_list("k_lens", k_lens, len(ql))
        for name, ls in (("q_lens", ql), ("k_lens", kl)):
            for b, n in enumerate(ls):
                if n < 0:
                    raise ValueError(f"{name}[{b}]: expected a non-negative length, got {n}")
        kv_end = np.repeat(np.asarray(kl, np.int64), ql) if ql else np.zeros(0, np.int64)
        cu_q = np.concatenate([[0], np.cumsum(ql)]).astype(np.int64)
        cu_k = np.concatenate([[0], np.cumsum(kl)]).astype(np.int64)
        return cls(cu_q, cu_k, np.zeros_like(kv_end), kv_end, dev)

    @classmethod
    def from_intervals(cls, cu_seqlens_q, cu_seqlens_k, kv_start, kv_end) -> "AttentionLayout":
        """Any layout: explicit intervals, validated (one host copy of the inputs).

        ``cu_seqlens_q`` / ``cu_seqlens_k``: ``[B+1]``, starting at 0, non-decreasing;
        ``kv_start`` / ``kv_end``: ``[total_q]`` with ``0 <= kv_start <= kv_end <= seqlen_k`` of
        the row's sequence (``kv_start == kv_end`` is an empty row: zeros, lse ``-inf``).
        Tensors or lists; the layout lives on the tensors' device (CPU for lists).
        """
        args = {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k, "kv_start": kv_start, "kv_end": kv_end}
        devices = {n: a.device for n, a in args.items() if isinstance(a, torch.Tensor)}
        if len(set(devices.values())) > 1:
            raise ValueError(f"from_intervals: all tensors must be on one device, got {devices}")
        dev = next(iter(devices.values())) if devices else torch.device("cpu")
        cu_q = np.asarray(_as_int_list("cu_seqlens_q", cu_seqlens_q), np.int64)
        cu_k = np.asarray(_as_int_list("cu_seqlens_k", cu_seqlens_k), np.int64)
        st = np.asarray(_as_int_list("kv_start", kv_start), np.int64)
        en = np.asarray(_as_int_list("kv_end", kv_end), np.int64)
        validate_intervals(cu_q, cu_k, st, en)
        return cls(cu_q, cu_k, st, en, dev)

    # ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.kv_end.device

    @property
    def batch_size(self) -> int:
        return self._sizes[0]

    @property
    def total_q(self) -> int:
        return self._sizes[1]

    @property
    def total_k(self) -> int:
        return self._sizes[2]

    def to(self, device) -> "AttentionLayout":
        """The same layout with its tensors on ``device``."""
        return type(self)(*self._host, _resolve_device(device))

    def host_intervals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(cu_seqlens_q, cu_seqlens_k, kv_start, kv_end) as int64 numpy arrays (host copies)."""
        return self._host

    @property
    def visible_pairs(self) -> int:
        """The exact number of visible (query, key) pairs (per head): the FLOP count's basis."""
        return int((self._host[3] - self._host[2]).sum())

    def tile_work(self, block_m: int, block_n: int) -> TileWork:
        """Key tiles the kernel visits for one head with ``block_m`` x ``block_n`` tiles.

        Query tiles are ``block_m`` rows of one sequence. For each, the kernel visits the key tiles
        meeting ``[min kv_start, max kv_end)`` over its non-empty rows; a visited tile is unmasked
        when it lies inside ``[max kv_start, min kv_end)`` over all its rows, masked otherwise.
        ``minimum`` counts the key tiles holding at least one visible pair. ``visited ==
        minimum`` whenever the union of a query tile's intervals is contiguous (every layout built by
        :meth:`from_segments` or :meth:`cross`).
        """
        for name, v in (("block_m", block_m), ("block_n", block_n)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        cu_q, _, st, en = self._host
        visited = masked = minimum = 0
        for b in range(self.batch_size):
            q0, q1 = int(cu_q[b]), int(cu_q[b + 1])
            for m0 in range(q0, q1, block_m):
                s, e = st[m0:min(m0 + block_m, q1)], en[m0:min(m0 + block_m, q1)]
                nonempty = e > s
                if not nonempty.any():
                    continue
                lo_t = int(s[nonempty].min()) // block_n
                hi_t = -(-int(e[nonempty].max()) // block_n)
                f0 = min(max(-(-int(s.max()) // block_n), lo_t), hi_t)
                f1 = min(max(int(e.min()) // block_n, f0), hi_t)
                visited += hi_t - lo_t
                masked += (hi_t - lo_t) - (f1 - f0)
                # key tiles touched by at least one row: union of [start // bn, ceil(end / bn))
                a = s[nonempty] // block_n
                z = -(-e[nonempty] // block_n)
                order = np.argsort(a, kind="stable")
                a, z = a[order], z[order]
                reach = np.maximum.accumulate(z)
                minimum += int(reach[-1] - a[0]) - int(np.maximum(a[1:] - reach[:-1], 0).sum())
        return TileWork(visited, masked, minimum)

    def __repr__(self) -> str:
        return (f"AttentionLayout(batch={self.batch_size}, total_q={self.total_q}, total_k={self.total_k}, "
                f"max_seqlen_q={self.max_seqlen_q}, max_seqlen_k={self.max_seqlen_k}, "
                f"visible_pairs={self.visible_pairs}, device={self.device})")


def validate_intervals(cu_q: np.ndarray, cu_k: np.ndarray, st: np.ndarray, en: np.ndarray) -> None:
    """Raise ValueError naming the argument when the intervals do not describe a valid layout."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.size < 1:
            raise ValueError(f"{name}: expected at least one entry ([B+1] offsets starting at 0), got none")
        if cu[0] != 0:
            raise ValueError(f"{name}: must start at 0, got {int(cu[0])}")
        d = np.diff(cu)
        if (d < 0).any():
            i = int(np.nonzero(d < 0)[0][0])
            raise ValueError(f"{name}: must be non-decreasing, got {int(cu[i])} then {int(cu[i + 1])} at index {i}")
        if cu[-1] > np.iinfo(np.int32).max:
            raise ValueError(f"{name}: total {int(cu[-1])} does not fit in int32")
    if cu_q.size != cu_k.size:
        raise ValueError(f"cu_seqlens_k: expected {cu_q.size} entries (as many sequences as cu_seqlens_q), "
                         f"got {cu_k.size}")
    total_q = int(cu_q[-1])
    for name, a in (("kv_start", st), ("kv_end", en)):
        if a.size != total_q:
            raise ValueError(f"{name}: expected {total_q} entries (cu_seqlens_q[-1]), got {a.size}")
    if total_q == 0:
        return
    seq = np.repeat(np.arange(cu_q.size - 1), np.diff(cu_q))
    lk = np.diff(cu_k)[seq]
    bad = (st < 0) | (st > en) | (en > lk)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise ValueError(f"kv_start/kv_end: row {i} (sequence {int(seq[i])}) has the interval "
                         f"[{int(st[i])}, {int(en[i])}), outside its sequence of {int(lk[i])} keys "
                         "(need 0 <= kv_start <= kv_end <= seqlen_k)")
