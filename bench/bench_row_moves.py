"""Row moves (gather_rows, scatter_rows): spar vs PyTorch eager indexing. Minimum bytes: read and
write the moved rows once."""

from __future__ import annotations

import torch

import spar_kernels as sk
from bench.harness import Case


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.tensor([], dtype=dtype).element_size()
    N, D = (4096, 1536) if quick else (16384, 3584)
    M = N // 2
    x = torch.randn(N, D, device=device, dtype=dtype)
    idx = torch.randperm(N, device=device)[:M]
    out = torch.empty(M, D, device=device, dtype=dtype)
    src = torch.randn(M, D, device=device, dtype=dtype)
    yield Case(op="row_moves", name=f"gather_rows {N}x{D} -> {M} {str(dtype)[6:]}",
               providers={"spar": lambda: (lambda: sk.gather_rows(x, idx, out=out)),
                          "torch eager": lambda: (lambda: x[idx])},
               bytes=2 * M * D * es, baseline="torch eager")

    def eager_scatter():
        x[idx] = src

    yield Case(op="row_moves", name=f"scatter_rows {M} -> {N}x{D} {str(dtype)[6:]}",
               providers={"spar": lambda: (lambda: sk.scatter_rows(x, idx, src)),
                          "torch eager": lambda: eager_scatter},
               bytes=2 * M * D * es, baseline="torch eager")
