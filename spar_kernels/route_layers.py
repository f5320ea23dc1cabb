"""Dynamic Token Routing: the fused per-token mixture of K layers' hidden states + LayerNorm.

    w      = softmax(logits[r] / tau)                                  (fp32, max-subtracted)
    m      = sum_k w[k] * alpha[k] * hidden[layer_ids[k], r]           (fp32 accumulation)
    out[i] = layer_norm(m) * ln_weight + ln_bias,   r = rows[i] (or i)  (one rounding)

CUDA C++ (csrc/route_layers/route_layers.cu) with its CPU twin (route_layers_cpu.cpp); the
per-row math (softmax coefficients, LayerNorm statistics and affine) lives in
csrc/route_layers/route_layers.h as ``__host__ __device__`` functions both compile. One read
of the selected rows of the K layers, one write of the output. float64 inputs run the
plain-PyTorch reference (in fp64) on every device.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import _ext
from ._op import device_guard, spar_op
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, as_index, check_index_range, check_out, check_shape, check_tensor
from .reference import route_layers as _ref

MAX_K = 16
_CUDA_MAX_D = 8192  # csrc/route_layers/api.h kRouteMaxDCuda: widest row the CUDA kernel keeps in registers
ALL_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)


# ---------------------------------------------------------------------------------------------
# validation

def check_float_param(name: str, t, shape, device) -> None:
    if t is None:
        return
    check_tensor(name, t, ndim=len(shape), device=device)
    if not t.is_floating_point() or t.dtype not in ALL_FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    check_shape(name, t, shape)


# ---------------------------------------------------------------------------------------------
# implementations (all write into a preallocated out)

def _param_pack(hidden, alpha, ln_weight, ln_bias):
    """alpha, ln_weight, ln_bias as the kernels read them, without a copy when they already are:
    alpha contiguous in float32/float16/bfloat16; weight and bias contiguous, both in hidden's
    dtype or both in float32 (None stays None: weight 1, bias 0). Other dtypes or layouts are
    converted here (a small allocation per call)."""
    a = alpha if alpha.dtype in FLOAT_DTYPES else alpha.to(torch.float32)
    a = a.contiguous()
    pdt = hidden.dtype
    ws = [t for t in (ln_weight, ln_bias) if t is not None]
    if any(t.dtype != pdt for t in ws):
        pdt = torch.float32
    w = ln_weight.to(pdt).contiguous() if ln_weight is not None else None
    b = ln_bias.to(pdt).contiguous() if ln_bias is not None else None
    return a, w, b, _ext.DTYPE_CODES[pdt]


def _logits_view(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype in FLOAT_DTYPES else logits.to(torch.float32)


def _launch_args(hidden, layer_ids, logits, alpha, ln_weight, ln_bias, tau, eps, rows, out):
    L, N, D = hidden.shape
    K = layer_ids.shape[0]
    lg = _logits_view(logits)
    a, w, b, pcode = _param_pack(hidden, alpha, ln_weight, ln_bias)
    M = out.shape[0]
    args = (hidden.data_ptr(), _ext.dtype_code(hidden), L, N, D,
            hidden.stride(0), hidden.stride(1), hidden.stride(2),
            layer_ids.data_ptr(), layer_ids.dtype == torch.int64, K,
            lg.data_ptr(), _ext.dtype_code(lg), lg.stride(0), lg.stride(1),
            a.data_ptr(), _ext.dtype_code(a), w.data_ptr() if w is not None else 0,
            b.data_ptr() if b is not None else 0, pcode, float(tau), float(eps),
            rows.data_ptr() if rows is not None else 0, rows is not None and rows.dtype == torch.int64, M,
            out.data_ptr())
    keep = (lg, a, w, b)  # keep converted temporaries alive through the call
    return args, keep


def _impl_reference(hidden, layer_ids, logits, alpha, ln_weight, ln_bias, tau, eps, rows, out):
    out.copy_(_ref.route_layers(hidden, layer_ids, logits, alpha, ln_weight, ln_bias, tau=tau, eps=eps,
                                rows=rows))


def _impl_cpu(hidden, layer_ids, logits, alpha, ln_weight, ln_bias, tau, eps, rows, out):
    if hidden.dtype == torch.float64:  # the twin is fp32/fp16/bf16: fp64 runs the reference
        return _impl_reference(hidden, layer_ids, logits, alpha, ln_weight, ln_bias, tau, eps, rows, out)
    args, keep = _launch_args(hidden, layer_ids, logits, alpha, ln_weight, ln_bias, tau, eps, rows, out)
    _ext.cpu_twin("route_layers")(*args)
    del keep


def _impl_cuda(hidden, layer_ids, logits, alpha, ln_weight, ln_bias, tau, eps, rows, out):
    if hidden.dtype == torch.float64 or hidden.shape[-1] > _CUDA_MAX_D:
        # fp64, or rows wider than the register-resident kernel holds: the (unfused) reference
        return _impl_reference(hidden, layer_ids, logits, alpha, ln_weight, ln_bias, tau, eps, rows, out)
    args, keep = _launch_args(hidden, layer_ids, logits, alpha, ln_weight, ln_bias, tau, eps, rows, out)
    with device_guard(hidden):
        _ext.cuda_kernel("route_layers")(*args, _ext.stream_of(hidden))
    del keep


_IMPLS = {"cuda": _impl_cuda, "cpu": _impl_cpu, "reference": _impl_reference}


@spar_op("route_layers", mutates_args=("out",), impls=_IMPLS)
def _route_layers_op(hidden: torch.Tensor, layer_ids: torch.Tensor, logits: torch.Tensor, alpha: torch.Tensor,
                     ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, tau: float, eps: float,
                     rows: torch.Tensor | None, out: torch.Tensor) -> None: ...


def route_layers(hidden: torch.Tensor, layer_ids: torch.Tensor | Sequence[int], logits: torch.Tensor,
                 alpha: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, *,
                 tau: float = 1.0, eps: float = 1e-5, rows: torch.Tensor | Sequence[int] | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token softmax mixture of K layers' hidden states, then LayerNorm (SPAR's DTR).

    Args:
        hidden: ``[L, N, D]`` float32 / float16 / bfloat16 / float64, any strides (the buffer a
            backbone writes each layer's output into).
        layer_ids: ``[K]`` int32/int64 tensor (or a sequence of ints) of indices into L,
            ``1 <= K <= 16``.
        logits: ``[N, K]`` router logits, any float dtype, any strides.
        alpha: ``[K]`` per-layer scales, any float dtype.
        ln_weight, ln_bias: ``[D]`` LayerNorm affine parameters, any float dtype, or None
            (weight 1 / bias 0).
        tau: softmax temperature (> 0).
        eps: LayerNorm epsilon (>= 0).
        rows: optional ``[M]`` int32/int64 row indices into N (a gather; duplicates allowed).
        out: optional contiguous ``[M or N, D]`` output in hidden's dtype.

    Returns:
        ``out``: ``[M or N, D]`` in hidden's dtype.

    Index values (``layer_ids``, ``rows``) are range-checked on CPU tensors; on CUDA that check
    would cost a host sync, so it is skipped there and the kernel writes NaN rows for
    out-of-range indices instead of reading outside ``hidden``.
    """
    check_tensor("hidden", hidden, ndim=3)
    if hidden.dtype not in ALL_FLOAT_DTYPES:
        raise ValueError(f"hidden: expected a floating-point dtype in {[str(d) for d in ALL_FLOAT_DTYPES]}, "
                         f"got dtype {hidden.dtype}")
    dev = hidden.device
    L, N, D = hidden.shape
    if D == 0:
        raise ValueError(f"hidden: expected a non-empty last dimension D, got shape {tuple(hidden.shape)}")
    layer_ids = as_index("layer_ids", layer_ids, dev)
    K = layer_ids.shape[0]
    if not 1 <= K <= MAX_K:
        raise ValueError(f"layer_ids: expected between 1 and {MAX_K} layers, got K = {K}")
    check_index_range("layer_ids", layer_ids, L, f"hidden has L = {L} layers")
    check_float_param("logits", logits, (N, K), dev)
    if alpha is None:
        raise TypeError(f"alpha: expected a [K] = [{K}] float tensor of per-layer scales, got None "
                        "(pass torch.ones(K) for none)")
    check_float_param("alpha", alpha, (K,), dev)
    check_float_param("ln_weight", ln_weight, (D,), dev)
    check_float_param("ln_bias", ln_bias, (D,), dev)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau: expected a finite float > 0, got {tau!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    if rows is not None:
        rows = as_index("rows", rows, dev)
        check_index_range("rows", rows, N, f"hidden has N = {N} rows")
    M = rows.shape[0] if rows is not None else N
    if out is None:
        out = torch.empty((M, D), dtype=hidden.dtype, device=dev)
    else:
        check_out("out", out, (M, D), hidden.dtype, dev, disjoint_from=("hidden", hidden))
    if M == 0:
        return out
    _route_layers_op(hidden, layer_ids, logits, alpha, ln_weight, ln_bias, float(tau), float(eps), rows, out)
    return out
