"""Row moves (gather_rows): spar vs PyTorch eager index_select. Minimum bytes: read and write
the gathered rows once."""

from __future__ import annotations

import torch

import spar_kernels as sk
from bench.harness import Case


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.tensor([], dtype=dtype).element_size()
    N, D = (4096, 1536) if quick else (16384, 3584)
    x = torch.randn(N, D, device=device, dtype=dtype)
    idx = torch.randperm(N, device=device)[: N // 2]
    out = torch.empty(N // 2, D, device=device, dtype=dtype)
    yield Case(op="row_moves", name=f"gather_rows {N}x{D} -> {N // 2} {str(dtype)[6:]}",
               providers={"spar": lambda: (lambda: sk.gather_rows(x, idx, out=out)),
                          "torch eager": lambda: (lambda: torch.index_select(x, 0, idx))},
               bytes=2 * (N // 2) * D * es, baseline="torch eager")
