"""Device identity: the one way spar compares devices.

``torch.device("cuda") == torch.device("cuda:0")`` is False, yet a tensor created on ``"cuda"``
lives on ``cuda:<current device>``. Device checks go through :func:`same_device` (public as
``spar_kernels.same_device``), which compares the type and the *resolved* index: an index-less
CUDA device means the current CUDA device (``torch.cuda.current_device()`` when CUDA is
available, else 0; under the simulated GPU of ``spar_kernels.testing.fake_cuda`` that is 0), an
index-less device of any other type means index 0.

Also here: :func:`cuda_device_problem`, whether a GPU can run the CUDA extension.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["resolve_device", "same_device"]


def _current_index(device_type: str) -> int:
    if device_type == "cuda":
        try:
            if torch.cuda.is_available():
                return int(torch.cuda.current_device())
        except (AssertionError, RuntimeError):  # a CPU build asked for a device it cannot open
            pass
    return 0


def resolve_device(device) -> torch.device:
    """``device`` (a ``torch.device``, a string such as ``"cuda"`` / ``"cuda:1"`` / ``"cpu"``, or an
    int CUDA index) as a ``torch.device`` with an explicit index (``"cpu"`` stays ``cpu``)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", device)
    if not isinstance(device, (torch.device, str)):
        raise TypeError(f"device: expected a torch.device, a device string or a CUDA index, got "
                        f"{type(device).__name__}")
    d = torch.device(device)
    if d.index is not None or d.type == "cpu":
        return d
    return torch.device(d.type, _current_index(d.type))


def same_device(a, b) -> bool:
    """Whether ``a`` and ``b`` name the same device: same type and same resolved index
    (``"cuda"`` and ``"cuda:0"`` are the same device when device 0 is current)."""
    a = a if isinstance(a, torch.device) else torch.device(a)
    b = b if isinstance(b, torch.device) else torch.device(b)
    if a == b:  # the common case, without resolving anything
        return True
    if a.type != b.type:
        return False
    if a.type == "cpu":  # "cpu" and "cpu:0" are one device
        return True
    ia = a.index if a.index is not None else _current_index(a.type)
    ib = b.index if b.index is not None else _current_index(b.type)
    return ia == ib


# ---------------------------------------------------------------------------------------------
# can this device run the CUDA extension?

def _arch(spec: str) -> tuple[int, int, str]:
    """"90a" -> (9, 0, "a"), "80" -> (8, 0, ""), "120f" -> (12, 0, "f")."""
    suffix = spec[-1] if spec and spec[-1].isalpha() else ""
    num = int(spec[:-1] if suffix else spec)
    return num // 10, num % 10, suffix


def _ver(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def cuda_build_problem(capability: tuple[int, int], driver_version: int | None, runtime_version: int,
                       sass_archs: str, ptx_archs: str) -> str:
    """Why a GPU of compute capability ``capability`` under a driver supporting CUDA
    ``driver_version`` (``cudaDriverGetVersion``; None: not checked) cannot run an extension built
    with CUDA ``runtime_version`` (``CUDART_VERSION``, cudart linked statically) holding machine
    code for ``sass_archs`` and PTX for ``ptx_archs`` (comma-separated, e.g. ``"80,90a"``, ``"80"``);
    ``""`` when it can.

    Machine code for sm_XY runs on compute capability X.y with y >= Y (sm_XYa only on X.Y
    exactly); PTX for compute_XY is JIT-compiled by the driver for any capability >= X.Y, which
    needs a driver at least as new as the toolkit that wrote the PTX. Any kernel needs a driver of
    the toolkit's major version or newer.
    """
    major, minor = capability
    sass = [_arch(a) for a in sass_archs.split(",") if a]
    ptx = [_arch(a) for a in ptx_archs.split(",") if a]
    built = ", ".join([f"sm_{a}" for a in sass_archs.split(",") if a]
                      + [f"PTX compute_{a}" for a in ptx_archs.split(",") if a]) or "nothing"
    if driver_version is not None and driver_version // 1000 < runtime_version // 1000:
        return (f"the driver supports CUDA {_ver(driver_version)} but spar_kernels._C_cuda was built with CUDA "
                f"{_ver(runtime_version)} (update the driver, or rebuild spar with an older toolkit)")
    for M, m, suffix in sass:
        if M == major and (m == minor if suffix == "a" else m <= minor):
            return ""
    jit = [(M, m) for M, m, _ in ptx if (M, m) <= (major, minor)]
    if jit:
        if driver_version is not None and driver_version < runtime_version:
            return (f"compute capability {major}.{minor} needs its PTX JIT-compiled, which needs a driver for "
                    f"CUDA >= {_ver(runtime_version)} (the build's toolkit), but the driver supports CUDA "
                    f"{_ver(driver_version)}")
        return ""
    return (f"spar_kernels._C_cuda has no kernel image for compute capability {major}.{minor} (built for "
            f"{built}); rebuild with SPAR_CUDA_ARCHS including {major}{minor}")


_REAL_PROBLEMS: dict[int, str] = {}  # device index -> reason ("" = runnable), real GPUs
_SIM_PROBLEMS: dict = {}  # simulated capability -> reason (the simulation may change it)
_DRIVER: list = []  # [driver version or None], read once


def _driver_version(ext) -> int | None:
    if not _DRIVER:
        _DRIVER.append(ext.driver_version() if hasattr(ext, "driver_version") else None)
    return _DRIVER[0]


def _warn(where: str, why: str) -> None:
    import warnings

    warnings.warn(f"spar_kernels: the CUDA C++ kernels cannot run on {where}: {why}. Ops use their Triton or "
                  "reference implementation there instead.", RuntimeWarning, stacklevel=4)


def cuda_device_problem(device: torch.device) -> str:
    """Why the CUDA extension cannot run on ``device`` (``""`` when it can), checked once per device
    (a :class:`RuntimeWarning` names the reason the first time), from the device's compute
    capability, the driver's CUDA version and the extension's build (machine-code archs, PTX arch,
    CUDA version): see :func:`cuda_build_problem`.

    Inside ``spar_kernels.testing.fake_cuda``, or without a CUDA driver (where CUDA tensors can
    only be fake, e.g. under FakeTensorMode), the device is simulated: the driver check is skipped
    and the capability the simulation reports is checked (not cached per device), so the simulated
    GPU dispatches as a real one with a current driver would; when no capability can be read at
    all, the device counts as runnable.
    """
    index = device.index if device.index is not None else _current_index("cuda")
    fake = sys.modules.get("spar_kernels._fake_cuda")  # loaded only if a simulation may be running
    in_fake_cuda = fake is not None and fake.active_recorder() is not None
    if not in_fake_cuda:
        why = _REAL_PROBLEMS.get(index)
        if why is not None:
            return why
    from . import _ext

    ext = _ext.cuda_ext()
    driver = _driver_version(ext)
    simulated = in_fake_cuda or driver == 0
    try:
        capability = tuple(torch.cuda.get_device_capability(index))
    except (AssertionError, RuntimeError):  # a CPU build of torch: only fake tensors get here
        capability = None
    if simulated:
        why = _SIM_PROBLEMS.get(capability)
        if why is not None:
            return why
    if capability is None or not hasattr(ext, "sass_archs"):
        why = ""  # nothing to check against (simulated without a capability, or an older build)
    else:
        why = cuda_build_problem(capability, None if simulated else driver, ext.cuda_runtime_version,
                                 ext.sass_archs, ext.ptx_archs)
    if simulated:
        _SIM_PROBLEMS[capability] = why
    else:
        _REAL_PROBLEMS[index] = why
    if why:
        _warn(f"cuda:{index}" + (" (simulated)" if simulated else ""), why)
    return why
