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
    torch.uint8: "u8",
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
    ps = params(fn)
    names = {n for n, _ in ps}
    unknown = (set(types) | set(constexprs)) - names
    if unknown:
        raise ValueError(f"AOT spec of {fn.__name__}: {sorted(unknown)} are not parameters of the kernel "
                         f"(it has {[n for n, _ in ps]})")
    missing = [n for n, c in ps if c and n not in constexprs]
    if missing:
        raise ValueError(f"AOT spec of {fn.__name__}: no value for the constexpr parameters {missing}")
    return {n: "constexpr" if (c or n in constexprs) else types.get(n, "i32") for n, c in ps}


def params(fn) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of a kernel's parameters, for a JITFunction or (under
    ``TRITON_INTERPRET=1``) an InterpretedFunction, which has no ``params``."""
    if hasattr(fn, "params"):
        return [(p.name, p.is_constexpr) for p in fn.params]
    import inspect

    return [(n, "constexpr" in str(p.annotation)) for n, p in inspect.signature(fn.fn).parameters.items()]


def int_scalars(fn, types: dict) -> list[str]:
    """The integer scalar parameters of ``fn`` (not constexpr, not a pointer, not a float in
    ``types``): the arguments Triton specializes at launch, into a constexpr when equal to 1
    and as 16-divisible when they are."""
    return [n for n, c in params(fn) if not c and not types.get(n, "i32").startswith(("*", "fp", "bf"))]


def value_one(fn, types: dict, constexprs: dict) -> dict:
    """``constexprs`` plus every integer scalar of ``fn`` equal to 1: the launch where Triton turns
    each of them into a constexpr (a row of 1 element, a unit stride, one sequence, ...). Code
    that treats such an argument as a tensor (``n.to(...)``) fails to compile only there."""
    return dict(constexprs, **{n: 1 for n in int_scalars(fn, types)})


def launch_spec(kernel_name: str, fn, config: str, args: dict, constexprs: dict, *, num_warps: int,
                num_stages: int, expect_mma: bool = False) -> AOTSpec:
    """The spec of the launch ``fn[grid](**args, **constexprs, num_warps=.., num_stages=..)``, each
    argument specialized as triton's JIT does at run time: an int equal to 1 becomes a constant, an
    int is i32 below 2**31 (else i64) and "aligned" when divisible by 16, a float is fp32, a tensor
    a pointer, aligned when its offset into an (aligned) allocation is a multiple of 16 bytes;
    the kernel's ``do_not_specialize`` arguments stay plain. Tensors may be meta tensors: only dtypes, strides and storage offsets are read."""
    types, consts, aligned = {}, dict(constexprs), []
    # the kernel's do_not_specialize / do_not_specialize_on_alignment parameters stay generic
    plain = {p.name for p in getattr(fn, "params", ()) if getattr(p, "do_not_specialize", False)}
    unaligned = plain | {p.name for p in getattr(fn, "params", ()) if getattr(p, "do_not_specialize_on_alignment", False)}
    for name, v in args.items():
        if name in plain and isinstance(v, int) and not isinstance(v, bool):
            types[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            continue
        if isinstance(v, torch.Tensor):
            types[name] = "*" + TRITON_DTYPE[v.dtype]
            if (v.storage_offset() * v.element_size()) % 16 == 0:
                aligned.append(name)
        elif v is None:
            consts[name] = None
        elif isinstance(v, bool):
            types[name] = "u1"
        elif isinstance(v, int):
            if v == 1:
                consts[name] = 1
                continue
            types[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and name not in unaligned:
                aligned.append(name)
        elif isinstance(v, float):
            types[name] = "fp32"
        else:
            raise TypeError(f"launch_spec({kernel_name}): argument {name} has unsupported type {type(v).__name__}")
    return AOTSpec(kernel_name=kernel_name, fn=fn, config=config, types=types, constexprs=consts,
                   num_warps=num_warps, num_stages=num_stages, aligned=tuple(aligned), expect_mma=expect_mma)


def unique(specs: Iterable[AOTSpec]) -> list[AOTSpec]:
    """``specs`` without repeats of the same compilation (kernel, signature, constants, alignment,
    warps, stages): different shapes often specialize identically."""
    seen, out = set(), []
    for s in specs:
        key = (s.fn, tuple(sorted(s.types.items())), tuple(sorted((k, repr(v)) for k, v in s.constexprs.items())),
               tuple(sorted(s.aligned)), s.num_warps, s.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


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
