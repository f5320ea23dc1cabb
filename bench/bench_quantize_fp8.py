"""quantize_fp8 per token and per tensor: spar (CUDA / CPU twin) vs PyTorch eager vs torch.compile."""

from __future__ import annotations

import torch

import spar_kernels as sk
from bench.harness import Case
from spar_kernels.reference import quantize_fp8 as ref

SHAPES = [("660x896", 660, 896), ("660x4864", 660, 4864), ("4096x3584", 4096, 3584)]


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16
    for label, n, d in (SHAPES[:2] if quick else SHAPES):
        for g in ("token", "tensor"):
            x = torch.randn(n, d, device=device, dtype=dtype)
            q = torch.empty(n, d, device=device, dtype=torch.float8_e4m3fn)
            s = torch.empty((n, 1) if g == "token" else (), device=device, dtype=torch.float32)
            compiled = torch.compile(lambda x, g=g: ref.quantize_fp8(x, g), dynamic=False)
            yield Case(
                op="quantize_fp8", name=f"{label} bf16 per-{g}",
                providers={
                    "spar": lambda x=x, q=q, s=s, g=g: (lambda: sk.quantize_fp8(x, g, out=(q, s))),
                    "torch eager": lambda x=x, g=g: (lambda: ref.quantize_fp8(x, g)),
                    "torch.compile": lambda c=compiled, x=x: (lambda: c(x)),
                },
                bytes=n * d * (2 + 1) + (n * 4 if g == "token" else 4), baseline="torch eager")
