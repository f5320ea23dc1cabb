"""Test setup: Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton (and spar_kernels) are imported, which is why it
is set here, at the top of the first file pytest loads.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh but reproducible seed per test (derived from the test id)."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF)
    yield


def interpreter_ok() -> bool:
    from spar_kernels import _triton

    return _triton.HAS_TRITON and _triton.INTERPRET


# On a developer's machine without triton the Triton tests skip; in CI (CI set) a missing triton or
# interpreter is a broken environment, so the session fails instead of skipping silently.
if os.environ.get("CI") and not interpreter_ok():
    raise pytest.UsageError("CI is set but triton or TRITON_INTERPRET=1 is unavailable: the Triton tests "
                            "would be skipped; install triton (pip install -e '.[test]')")

requires_triton = pytest.mark.skipif(not interpreter_ok(), reason="needs triton with TRITON_INTERPRET=1")


def build_cpp_harness(tmp_path, source: str, flags, csrc_sources=()) -> str:
    """Compile ``tests/cpp/<source>`` (with ``-I csrc`` and ``flags``) into ``tmp_path`` and return
    the executable's path; ``csrc_sources`` (paths under csrc/) are compiled with it, each file in
    its own compiler process, all at once, then linked together. These harnesses run a twin's instruction-set variant that this CPU
    would not pick (the AVX-512 width built for AVX2, an SSE-only baseline), so they need AVX2:
    the test skips on a CPU without it or without a C++ compiler (CXX, c++, g++), except under
    CI, where a missing compiler fails (the package's own build needs one)."""
    import shlex
    import shutil
    import subprocess

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2: the harness's loops, built for AVX2, cannot run here")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        if os.environ.get("CI"):
            pytest.fail("no C++ compiler (CXX, c++, g++) under CI: the package's own build needs one")
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = os.path.join(str(tmp_path), os.path.splitext(source)[0])
    cmd = [*shlex.split(cxx), *flags, f"-I{root}/csrc", f"-I{root}/tests/cpp"]
    if not csrc_sources:
        subprocess.run([*cmd, f"{root}/tests/cpp/{source}", "-o", exe], check=True)
        return exe
    srcs = [f"{root}/tests/cpp/{source}", *(f"{root}/csrc/{s}" for s in csrc_sources)]
    objs = [os.path.join(str(tmp_path), f"{i}_{os.path.basename(s)}.o") for i, s in enumerate(srcs)]
    procs = [subprocess.Popen([*cmd, "-c", s, "-o", o]) for s, o in zip(srcs, objs)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"compiling {source} and {list(csrc_sources)} failed (exit codes {codes})")
    subprocess.run([*shlex.split(cxx), *flags, *objs, "-o", exe], check=True)
    return exe


def record_ops():
    """A TorchDispatchMode whose ``ops`` lists the name of every op dispatched while it is active
    (``with record_ops() as rec: ...``): which ops went through the dispatcher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    return RecordOps()
