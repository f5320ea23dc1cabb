"""rms_norm (with and without the fused residual add): spar vs PyTorch eager vs torch.compile."""

from __future__ import annotations

import torch

import spar_kernels as sk
from bench.harness import Case
from spar_kernels.reference import rms_norm as ref

# (label, rows, width): Qwen2.5 prefill of the CFG batch (2 x ~330 tokens) and a long prefill
SHAPES = [("qwen2.5-0.5b 660x896", 660, 896), ("qwen2.5-1.5b 660x1536", 660, 1536),
          ("qwen2.5-7b 4096x3584", 4096, 3584)]


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    esize = torch.tensor([], dtype=dtype).element_size()
    for label, n, d in (SHAPES[:2] if quick else SHAPES):
        for residual in (False, True):
            x = torch.randn(n, d, device=device, dtype=dtype)
            r = torch.randn(n, d, device=device, dtype=dtype) if residual else None
            w = torch.randn(d, device=device, dtype=dtype)
            out = torch.empty_like(x)
            res_out = torch.empty_like(x) if residual else None
            eager = lambda x=x, w=w, r=r: ref.rms_norm(x, w, 1e-6, r)  # noqa: E731
            compiled = torch.compile(lambda x, w, r: ref.rms_norm(x, w, 1e-6, r), dynamic=False)
            moved = (n * d * esize) * (4 if residual else 2) + d * esize
            yield Case(
                op="rms_norm", name=f"{label} {str(dtype)[6:]}{' +residual' if residual else ''}",
                providers={
                    "spar": lambda x=x, w=w, r=r, out=out, ro=res_out: (
                        lambda: sk.rms_norm(x, w, 1e-6, r, out=out, residual_out=ro)),
                    "torch eager": lambda f=eager: f,
                    "torch.compile": (lambda c=compiled, x=x, w=w, r=r: (lambda: c(x, w, r))),
                },
                bytes=moved, baseline="torch eager")
