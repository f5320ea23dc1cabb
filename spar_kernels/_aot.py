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
    types: dict               # arg name -> triton type ("*bf16", "fp32", "i64") for the args that are not i32
    constexprs: dict          # constexpr name -> value (a plain int arg listed here is value-specialized)
    num_warps: int = 4
    num_stages: int = 2
    aligned: tuple = field(default_factory=tuple)  # args specialized as 16-divisible (pointers, strides)
    expect_mma: bool = False  # the kernel is meant to use tensor cores (wgmma on sm_90a, mma on sm_80)


    @property
    def signature(self) -> dict:
        """arg name -> triton type, derived from the kernel's own parameters (see :func:`signature`)."""
        return signature(self.fn, self.types, self.constexprs)


def signature(fn, types: dict, constexprs: dict) -> dict:
    """The full ``triton.compile`` signature of ``fn`` from its parameters: ``"constexpr"`` for its
    constexpr parameters and any argument given a value in ``constexprs`` (a run-time value
    specialization, e.g. an integer argument equal to 1), ``types[name]`` where given, ``"i32"``
    for every other argument. A name in ``types`` or ``constexprs`` that is not a parameter of
    ``fn`` is an error, so specs cannot drift from the kernel."""
    params = [(p.name, p.is_constexpr) for p in fn.params]
    names = {n for n, _ in params}
    unknown = (set(types) | set(constexprs)) - names
    if unknown:
        raise ValueError(f"AOT spec of {fn.__name__}: {sorted(unknown)} are not parameters of the kernel "
                         f"(it has {[n for n, _ in params]})")
    missing = [n for n, c in params if c and n not in constexprs]
    if missing:
        raise ValueError(f"AOT spec of {fn.__name__}: no value for the constexpr parameters {missing}")
    return {n: "constexpr" if (c or n in constexprs) else types.get(n, "i32") for n, c in params}


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
