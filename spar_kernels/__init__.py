"""spar_kernels: custom Triton and CUDA C++ kernels for unified multimodal models.

Every public op is a ``torch.library`` custom op (``torch.ops.spar.*``) with a fake
implementation, dispatching CUDA tensors to the Triton/CUDA kernel and CPU tensors to a real
CPU implementation. :func:`backend` forces a path; :mod:`spar_kernels.reference` holds the
plain-PyTorch references; :mod:`spar_kernels.testing` the accuracy helpers the tests use.
"""

from ._backend import BACKENDS, BackendUnavailableError, backend, current_backend
from ._device import resolve_device, same_device
from .quantize_fp8 import quantize_fp8
from .rms_norm import rms_norm

from .route_layers import route_layers
from .attention import AttentionLayout, hybrid_attention, hybrid_attention_varlen, hybrid_attention_workspace
from .linear_attention import linear_attention, linear_attention_workspace
from .adaln import adaln_layernorm, gated_residual
from .dwconv_glu import dwconv_glu
from .flow_sampler import FlowSampler
from .schedules import flow_sigmas
from .row_moves import gather_rows, pack_sequences, scatter_rows, unpack_sequences
from .split_by_expert import ExpertSplit, merge_experts, split_by_expert, split_by_expert_workspace

__version__ = "0.1.0"


def build_info() -> dict:
    """What this installation can run: compiled extensions, triton, interpreter mode."""
    from . import _ext, _triton

    return {
        "version": __version__,
        "cpu_extension": _ext.has_cpu_extension(),
        "cuda_extension": _ext.has_cuda_extension(),
        "cuda_extension_note": _ext.cuda_extension_error(),
        "triton": _triton.HAS_TRITON,
        "triton_interpret": _triton.INTERPRET,
    }

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend",
    "build_info",
    "current_backend",
    "resolve_device",
    "same_device",
    "quantize_fp8",
    "rms_norm",
    "route_layers",
    "AttentionLayout",
    "hybrid_attention",
    "hybrid_attention_varlen",
    "hybrid_attention_workspace",
    "linear_attention",
    "linear_attention_workspace",
    "adaln_layernorm",
    "gated_residual",
    "dwconv_glu",
    "FlowSampler",
    "flow_sigmas",
    "gather_rows",
    "scatter_rows",
    "pack_sequences",
    "unpack_sequences",
    "split_by_expert",
    "merge_experts",
    "split_by_expert_workspace",
    "ExpertSplit",
]
