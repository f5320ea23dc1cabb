"""Plain-PyTorch references of the row moves (:mod:`spar_kernels.row_moves`): pure copies,
bit-exact in every dtype."""

from __future__ import annotations

import torch


def gather_rows(x: torch.Tensor, index) -> torch.Tensor:
    return x[torch.as_tensor(index, device=x.device).long()]


def scatter_rows(x: torch.Tensor, index, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with ``x[index[i]] = src[i]`` (index without duplicates)."""
    y = x.clone()
    y[torch.as_tensor(index, device=x.device).long()] = src.to(x.dtype)
    return y


def pack_sequences(padded: torch.Tensor, lengths) -> torch.Tensor:
    lens = [int(v) for v in torch.as_tensor(lengths).tolist()]
    parts = [padded[b, :n] for b, n in enumerate(lens)]
    if not parts:
        return padded.new_empty((0,) + tuple(padded.shape[2:]))
    return torch.cat(parts, dim=0)


def unpack_sequences(packed: torch.Tensor, cu_seqlens, max_len: int, pad_value=0) -> torch.Tensor:
    cu = [int(v) for v in torch.as_tensor(cu_seqlens).tolist()]
    B = len(cu) - 1
    out = packed.new_full((B, max_len) + tuple(packed.shape[1:]), pad_value)
    for b in range(B):
        n = cu[b + 1] - cu[b]
        out[b, :n] = packed[cu[b]:cu[b + 1]]
    return out
