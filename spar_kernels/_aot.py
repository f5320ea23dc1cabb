"""Registry of Triton kernels for ahead-of-time compilation (``python -m spar_kernels.inspect``).

Each kernel module registers a generator of :class:`AOTSpec`: one per configuration the
launcher can pick (tile sizes, warps, dtypes, constexpr switches). ``inspect`` compiles every
spec for sm_80 and sm_90a without a GPU and reads registers, spills, shared memory and the
matrix instructions from the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

TRITON_DTYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass(frozen=True)
class AOTSpec:
    kernel_name: str          # the public op / kernel name shown in the table
    fn: Any                   # the @triton.jit function
    config: str               # human-readable configuration (tiles, warps, dtype, switches)
    signature: dict           # arg name -> triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict          # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 2
    aligned: tuple = field(default_factory=tuple)  # args specialized as 16-divisible (pointers, strides)
    expect_mma: bool = False  # the kernel is meant to use tensor cores (wgmma on sm_90a, mma on sm_80)


_REGISTRY: list[Callable[[], Iterable[AOTSpec]]] = []


def register(gen: Callable[[], Iterable[AOTSpec]]) -> Callable[[], Iterable[AOTSpec]]:
    """Register a generator of AOT specs (usable as a decorator)."""
    _REGISTRY.append(gen)
    return gen


def all_specs() -> list[AOTSpec]:
    import spar_kernels  # noqa: F401  - importing the package registers every kernel

    specs: list[AOTSpec] = []
    for gen in _REGISTRY:
        specs.extend(gen())
    return specs
