"""spar_kernels: custom Triton and CUDA C++ kernels for unified multimodal models.

Every public op is a ``torch.library`` custom op (``torch.ops.spar.*``) with a fake
implementation, dispatching CUDA tensors to the Triton/CUDA kernel and CPU tensors to a real
CPU implementation. :func:`backend` forces a path; :mod:`spar_kernels.reference` holds the
plain-PyTorch references; :mod:`spar_kernels.testing` the accuracy helpers the tests use.
"""

from ._backend import BACKENDS, BackendUnavailableError, backend, current_backend
from .quantize_fp8 import quantize_fp8
from .rms_norm import rms_norm

# @ops-imports (one line per op module: from .<op> import <public names>)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend",
    "current_backend",
    "quantize_fp8",
    "rms_norm",
    # @ops-all
]
