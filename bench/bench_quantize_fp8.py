"""quantize_fp8 per token and per tensor: spar (CUDA / CPU twin) vs PyTorch eager vs torch.compile.

Byte counts (the GB/s and ``% of copy`` columns) are what the op has to move: per token x once
(bf16) + the codes + the scales (3 bytes an element); per tensor x twice (the amax pass, then
the encode pass: no code can be written before the tensor-wide amax is known) + the codes
(5 bytes an element). Per tensor at 3 bytes an element, as unique bytes, is 3/5 of the figure.
"""

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
                bytes=_bytes(n, d, g), baseline="torch eager")


def _bytes(n: int, d: int, granularity: str) -> int:
    """The bytes the op has to move: x read, codes and scales written; per tensor x is read twice
    (no code can be written before the tensor-wide amax is known: one pass for the amax, one to
    encode; at the bench shapes x is 1.2-29 MB, so the second read comes from L2/L3 or DRAM)."""
    if granularity == "token":
        return n * d * (2 + 1) + n * 4
    return n * d * (2 * 2 + 1) + 4
