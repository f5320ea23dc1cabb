"""Modality (expert) routing with the per-expert RMSNorm fused (split_by_expert): spar vs the
PyTorch eager sort + gather + RMSNorm. Minimum bytes: read and write every row once."""

from __future__ import annotations

import torch

import spar_kernels as sk
from bench.harness import Case


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.tensor([], dtype=dtype).element_size()
    N, D = (4096, 1536) if quick else (16384, 3584)
    x = torch.randn(N, D, device=device, dtype=dtype)
    E = 2
    ids = torch.randint(0, E, (N,), device=device)
    nw = torch.randn(E, D, device=device, dtype=dtype)
    out = torch.empty(N, D, device=device, dtype=dtype)

    def eager_split():
        order = torch.sort(ids, stable=True).indices
        rows = x[order]
        h = rows.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.float()[ids[order]]).to(dtype)

    yield Case(op="split_by_expert", name=f"split_by_expert+rmsnorm {N}x{D} E={E} {str(dtype)[6:]}",
               providers={"spar": lambda: (lambda: sk.split_by_expert(x, ids, E, nw, out=out)),
                          "torch eager": lambda: eager_split},
               bytes=2 * N * D * es, baseline="torch eager")
