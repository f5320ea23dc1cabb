"""Whether a GPU can run the CUDA extension (compute capability and driver against the build's
machine code, PTX and CUDA version), the fallback when it cannot, and the PTX in the build."""

import struct
import types
import warnings
from pathlib import Path

import pytest
import torch

import spar_kernels as sk
from spar_kernels import _backend, _device, _ext

R13, R131 = 13000, 13010  # CUDART_VERSION of CUDA 13.0 / 13.1


def test_same_device_resolves_the_index():
    from spar_kernels._validate import check_tensor

    same_device, resolve_device = sk.same_device, sk.resolve_device
    assert same_device("cuda", "cuda:0") and same_device(torch.device("cuda:0"), torch.device("cuda"))
    assert not same_device("cuda", "cuda:1") and not same_device("cpu", "cuda:0")
    assert same_device("cpu", torch.device("cpu")) and resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(1) == torch.device("cuda:1")
    check_tensor("x", torch.zeros(2), device="cpu")
    with pytest.raises(ValueError, match="expected a tensor on meta"):
        check_tensor("x", torch.zeros(2), device="meta")


@pytest.mark.parametrize("cap,driver,runtime,sass,ptx,why", [
    ((8, 0), R13, R13, "80,90a", "80", ""),
    ((8, 9), R13, R13, "80,90a", "80", ""),             # sm_80 machine code runs on 8.x, x >= 0
    ((9, 0), R13, R13, "80,90a", "80", ""),
    ((10, 0), R13, R13, "80,90a", "80", ""),            # JIT from compute_80 PTX
    ((12, 0), R13, R13, "80,90a", "80", ""),
    ((9, 1), R13, R13, "90a", "", "no kernel image for compute capability 9.1"),  # sm_90a: 9.0 only
    ((12, 0), R13, R13, "80,90a", "", "no kernel image for compute capability 12.0"),
    ((7, 5), R13, R13, "80,90a", "80", "no kernel image for compute capability 7.5"),
    ((8, 0), 12080, R13, "80,90a", "80", "the driver supports CUDA 12.8"),
    ((8, 0), 13000, R131, "80,90a", "80", ""),           # minor-version compatibility: machine code
    ((10, 0), 13000, R131, "80,90a", "80", "needs a driver for CUDA >= 13.1"),  # PTX needs the newer driver
    ((10, 0), None, R131, "80,90a", "80", ""),           # driver not checked (simulated device)
])
def test_cuda_build_problem(cap, driver, runtime, sass, ptx, why):
    got = _device.cuda_build_problem(cap, driver, runtime, sass, ptx)
    assert (got == "") == (why == "") and why in got, got


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine whose GPU reports `state["cap"]` and whose driver `state["driver"]`, with an
    extension built by CUDA 13.0 for sm_80 / sm_90a + PTX compute_80."""
    state = {"cap": (8, 0), "driver": R13}
    ext = types.SimpleNamespace(driver_version=lambda: state["driver"], cuda_runtime_version=R13,
                                sass_archs="80,90a", ptx_archs="80")
    monkeypatch.setattr(_ext, "has_cuda_extension", lambda: True)
    monkeypatch.setattr(_ext, "cuda_ext", lambda: ext)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["cap"])
    monkeypatch.setattr(_device, "_REAL_PROBLEMS", {})
    monkeypatch.setattr(_device, "_SIM_PROBLEMS", {})
    monkeypatch.setattr(_device, "_DRIVER", [])
    return state


IMPLS = {"cuda": lambda: "cuda", "triton": lambda: "triton", "reference": lambda: "reference"}


def test_unrunnable_gpu_falls_back_with_one_warning(fake_gpu, monkeypatch):
    from spar_kernels import _triton

    monkeypatch.setattr(_triton, "HAS_TRITON", True)
    fake_gpu["cap"] = (7, 5)
    dev = torch.device("cuda:0")
    with pytest.warns(RuntimeWarning, match=r"cannot run on cuda:0: .*no kernel image for compute capability 7.5"):
        assert _backend.select("op", dev, IMPLS)() == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once per device: no second warning
        assert _backend.select("op", torch.device("cuda"), IMPLS)() == "triton"
        assert _backend.select("op", dev, {"cuda": IMPLS["cuda"], "reference": IMPLS["reference"]})() == "reference"
        with sk.backend("cuda"), pytest.raises(sk.BackendUnavailableError, match="no kernel image"):
            _backend.select("op", dev, IMPLS)


def test_old_driver_falls_back(fake_gpu, monkeypatch):
    from spar_kernels import _triton

    monkeypatch.setattr(_triton, "HAS_TRITON", True)
    fake_gpu["driver"] = 12040
    with pytest.warns(RuntimeWarning, match="the driver supports CUDA 12.4 but spar_kernels._C_cuda was built with "
                                            "CUDA 13.0"):
        assert _backend.select("op", torch.device("cuda:0"), IMPLS)() == "triton"
    ok, why = _backend._runnable("cuda", torch.device("cuda:0"))
    assert not ok and "driver supports CUDA 12.4" in why


def test_runnable_gpu_selects_cuda(fake_gpu):
    fake_gpu["cap"] = (12, 0)  # a newer GPU: the PTX is JIT-compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.select("op", torch.device("cuda:0"), IMPLS)() == "cuda"


def test_simulated_gpu_dispatches_as_a_real_one(fake_gpu, monkeypatch):
    from spar_kernels import _triton

    monkeypatch.setattr(_triton, "HAS_TRITON", True)
    # no driver (driver version 0): CUDA tensors can only be fake; the driver check is skipped,
    # the capability the simulation reports is still checked
    fake_gpu["driver"] = 0
    fake_gpu["cap"] = (9, 0)
    assert _backend.select("op", torch.device("cuda:0"), IMPLS)() == "cuda"
    fake_gpu["cap"] = (7, 5)  # not cached per index for a simulation: a new capability is checked
    with pytest.warns(RuntimeWarning, match=r"cuda:0 \(simulated\)"):
        assert _backend.select("op", torch.device("cuda:0"), IMPLS)() == "triton"


def test_fake_cuda_selects_the_cuda_extension():
    if not _ext.has_cuda_extension():
        pytest.skip(f"the CUDA extension is not built: {_ext.cuda_extension_error()}")
    from spar_kernels.testing import fake_cuda

    with fake_cuda():
        x = torch.randn(4, 8, device="cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend._runnable("cuda", x.device) == (True, "")
    with fake_cuda(capability=(7, 0)):
        with pytest.warns(RuntimeWarning, match="no kernel image for compute capability 7.0"):
            assert not _backend._runnable("cuda", torch.device("cuda:0"))[0]


def _fatbin_entries(so: Path) -> list[tuple[str, int]]:
    """(kind, arch) of every entry of the ELF's .nv_fatbin section: kind "ptx" or "sass"."""
    data = so.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = hdrs[shstrndx][4]
    blob = next(data[h[4]:h[4] + h[5]] for h in hdrs
                if data[names + h[0]:data.index(b"\0", names + h[0])] == b".nv_fatbin")
    out, off = [], 0
    while off + 16 <= len(blob):
        magic, _, hsize, fsize = struct.unpack_from("<IHHQ", blob, off)
        if magic != 0xBA55ED50:  # fatbins are 8-byte aligned in the section
            off += 8
            continue
        e, end = off + hsize, off + hsize + fsize
        while e < end:
            kind, _, ehsize, size = struct.unpack_from("<HHIQ", blob, e)
            arch, = struct.unpack_from("<I", blob, e + 28)
            out.append(({1: "ptx", 2: "sass"}.get(kind, str(kind)), arch))
            e += ehsize + size
        off = end
    return out


def test_cuda_extension_embeds_ptx_for_its_lowest_arch():
    if not _ext.has_cuda_extension():
        pytest.skip(f"the CUDA extension is not built: {_ext.cuda_extension_error()}")
    ext = _ext.cuda_ext()
    assert ext.ptx_archs and ext.cuda_runtime_version >= 11000
    lowest = min(int(a.rstrip("af")) for a in ext.sass_archs.split(","))
    assert ext.ptx_archs == str(lowest)
    entries = set(_fatbin_entries(Path(ext.__file__)))
    assert ("ptx", lowest) in entries
    assert {("sass", int(a.rstrip("af"))) for a in ext.sass_archs.split(",")} <= entries
