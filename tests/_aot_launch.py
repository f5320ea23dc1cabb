"""Does the AOT registry (``python -m spar_kernels.inspect``) compile what a GPU launch compiles?

:func:`record_launches` wraps a module's Triton kernel so every launch made under the
interpreter is recorded; :func:`launch_key` turns one into the specialization Triton's JIT would
compile on a GPU (argument types, integer arguments equal to 1 turned into constexprs, 16-divisible
integers and 16-byte aligned pointers marked divisible, constexprs, num_warps, num_stages), using
Triton's own specialization function; :func:`matching_spec` finds the registered spec compiling
exactly that, or says what the nearest spec differs in.
"""

from __future__ import annotations

import contextlib

import torch

_TRITON_PTR = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
               torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv"}


class _Recorder:
    def __init__(self, kernel):
        self.kernel = kernel
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, dict(kwargs)))
            return self.kernel[grid](*args, **kwargs)
        return launch

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@contextlib.contextmanager
def record_launches(monkeypatch, module, name: str):
    rec = _Recorder(getattr(module, name))
    monkeypatch.setattr(module, name, rec)
    yield rec
    monkeypatch.setattr(module, name, rec.kernel)


def assert_launches_compiled(rec, specs) -> None:
    """Every launch ``rec`` recorded has an AOT spec among ``specs`` compiling it exactly."""
    if not rec.calls:
        raise AssertionError("the op launched no kernel")
    specs = list(specs)
    for args, kwargs in rec.calls:
        matching_spec(rec.kernel, launch_key(rec.kernel, args, kwargs), specs)


def launch_key(kernel, args: tuple, kwargs: dict) -> dict:
    """The compile-time specialization of one launch, as a GPU would JIT it."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    kwargs = dict(kwargs)
    num_warps, num_stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", None)
    from spar_kernels import _aot

    params = _aot.params(kernel)
    runtime = [n for n, c in params if not c]
    if len(args) != len(runtime):
        raise AssertionError(f"{len(args)} positional args for {len(runtime)} runtime parameters")
    values = dict(zip(runtime, args))
    types, constexprs, aligned = {}, {}, set()
    for name, is_constexpr in params:
        if is_constexpr:
            constexprs[name] = kwargs[name]
            continue
        v = values[name]
        if isinstance(v, torch.Tensor):
            types[name] = "*" + _TRITON_PTR[v.dtype]
            if v.data_ptr() % 16 == 0:
                aligned.add(name)
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, True, True)
        if ty == "constexpr":
            constexprs[name] = v
        else:
            types[name] = ty
            if spec == "D":
                aligned.add(name)
    return {"types": types, "constexprs": constexprs, "aligned": aligned, "num_warps": num_warps,
            "num_stages": num_stages}


def _spec_key(spec) -> dict:
    sig = spec.signature
    return {"types": {n: t for n, t in sig.items() if t != "constexpr"}, "constexprs": dict(spec.constexprs),
            "aligned": set(spec.aligned), "num_warps": spec.num_warps, "num_stages": spec.num_stages}


def matching_spec(kernel, key: dict, specs):
    """The AOT spec of ``kernel`` among ``specs`` (a module's registered generator's output)
    compiling exactly ``key``; AssertionError naming the closest spec's differences when there is none."""
    specs = [s for s in specs if s.fn is kernel]
    if not specs:
        raise AssertionError(f"no AOT spec registered for {kernel}")
    best, best_diff = None, None
    for s in specs:
        sk = _spec_key(s)
        diff = {f: (key[f], sk[f]) for f in key if key[f] != sk[f]}
        if not diff:
            return s
        if best_diff is None or len(diff) < len(best_diff):
            best, best_diff = s, diff
    raise AssertionError(f"no AOT spec compiles this launch; closest [{best.config}] differs in "
                         + "; ".join(f"{f}: launch {a!r} vs spec {b!r}" for f, (a, b) in best_diff.items()))
