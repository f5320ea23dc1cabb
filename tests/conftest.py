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


requires_triton = pytest.mark.skipif(not interpreter_ok(), reason="needs triton with TRITON_INTERPRET=1")
