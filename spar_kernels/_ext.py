"""Loading the compiled extensions and talking to them without torch's C++ ABI.

Both extensions are plain pybind11 modules: they take data pointers (ints), sizes,
strides (in elements), dtype codes and, for CUDA, a stream handle. They never see a
``torch.Tensor``, so one build works with any torch >= 2.4.

- ``spar_kernels._C_cpu``: always built; the CPU twins of the CUDA C++ kernels.
- ``spar_kernels._C_cuda``: built when nvcc is found; imports without a GPU or driver.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType

import torch

# Must match csrc/common/spar_common.h (enum class DType).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float8_e4m3fn: 3,
}


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"dtype {t.dtype} has no code in the compiled extensions") from None


@lru_cache(maxsize=None)
def _load(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(f"spar_kernels.{name}"), ""
    except ImportError as e:
        return None, str(e)


def has_cpu_extension() -> bool:
    return _load("_C_cpu")[0] is not None


def has_cuda_extension() -> bool:
    return _load("_C_cuda")[0] is not None


def cuda_extension_error() -> str:
    return _load("_C_cuda")[1] or "built"


_WHY_MISSING = {  # what a missing extension means, {err}: the import error
    "_C_cpu": "spar was installed without its compiled CPU extension ({err}). Reinstall with "
              "`pip install -e .` from the repository root.",
    "_C_cuda": "spar was built without nvcc or with SPAR_BUILD_CUDA=0 ({err}).",
}


def _ext(name: str) -> ModuleType:
    mod, err = _load(name)
    if mod is None:
        raise RuntimeError(f"spar_kernels.{name} is missing: " + _WHY_MISSING[name].format(err=err))
    return mod


def cpu_ext() -> ModuleType:
    return _ext("_C_cpu")


def cuda_ext() -> ModuleType:
    return _ext("_C_cuda")


# Every symbol each extension must export: a build missing one is broken, never silently slower
# (tests/test_foundation.py checks the installed build against these lists).
CPU_TWINS = ("quantize_fp8", "rms_norm", "route_layers", "flow_sampler_step", "flow_sampler_step_packed",
             "split_by_expert", "adaln_layernorm",
             "gated_residual", "dwconv_glu", "linear_attention", "scatter_rows")
CUDA_KERNELS = ("quantize_fp8", "route_layers", "flow_sampler_step")


def _symbol(ext: ModuleType, name: str):
    fn = getattr(ext, name, None)
    if fn is None:
        raise RuntimeError(f"{ext.__name__} has no {name!r}: the installed build is stale or incomplete; "
                           "reinstall with `pip install -e .` from the repository root")
    return fn


_TWINS: dict[str, object] = {}  # cpu_twin's lookups: the per-call path is one dict hit


def cpu_twin(name: str):
    """The C++ CPU twin ``name`` from ``_C_cpu``; raises RuntimeError naming what is missing."""
    fn = _TWINS.get(name)
    if fn is None:
        fn = _TWINS[name] = _symbol(cpu_ext(), name)
    return fn


def cuda_kernel(name: str):
    """The CUDA C++ entry point ``name`` from ``_C_cuda``; raises RuntimeError naming what is missing."""
    return _symbol(cuda_ext(), name)


def stream_of(t: torch.Tensor) -> int:
    """The raw cudaStream_t of the current stream on t's device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
