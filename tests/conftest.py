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
