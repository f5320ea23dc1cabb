"""FP8 W8A8 linears: float8_e4m3fn weights with per-output-channel scales, per-token activations.

The model files call :func:`linear` for every GEMM with a weight matrix; it is ``F.linear``
unless the weight is an :class:`Fp8Weight`, which ``SparPipeline(..., quantization="fp8")``
puts in place at load (:func:`quantize_linears`): the checkpoint on disk is never changed.
Where a spar op produces a GEMM's input (the SANA block's norms, linear attention, gated residual,
depthwise conv + GLU), the model asks it for FP8 output when :func:`wants_fp8` says the weight is
FP8 and passes the ``(q, scales)`` pair to :func:`linear`: no separate ``quantize_fp8`` launch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

import spar_kernels as sk

__all__ = ["Fp8Weight", "linear", "wants_fp8", "fp8_eligible", "quantize_linears", "check_fp8_device", "FP8_MIN_CAPABILITY"]

FP8_MAX = 448.0                # float8_e4m3fn's largest finite value
_FP8_MIN_AMAX = 1e-12          # an all-zero weight row gets a tiny scale instead of 0
FP8_MIN_CAPABILITY = (8, 9)    # FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards



class Fp8Weight:
    """A linear weight ``[N, K]`` held as float8_e4m3fn with one fp32 scale per output channel.

    ``w ~= q.float() * scale[:, None]``; called on ``x [..., K]`` it quantizes the activations
    per token (:func:`spar_kernels.quantize_fp8`) and multiplies with ``torch._scaled_mm``
    (rowwise scales), output in ``x``'s dtype.
    """

    __slots__ = ("q", "scale", "shape")

    def __init__(self, w: torch.Tensor):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"w: expected a floating-point [N, K] weight, got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
        w32 = w.float()
        scale = w32.abs().amax(dim=1, keepdim=True).clamp(min=_FP8_MIN_AMAX) / FP8_MAX      # [N, 1]
        self.q = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)             # [N, K]
        self.scale = scale.t().contiguous()                                                  # [1, N]
        self.shape = tuple(w.shape)

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * 4

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight the FP8 product uses: ``q * scale``."""
        return self.q.float() * self.scale.t()

    def __call__(self, x, bias: torch.Tensor | None = None, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ w.T + bias`` for ``x [..., K]``, or for ``x = (q, scales)`` already quantized per
        token (``q`` float8_e4m3fn ``[..., K]``, ``scales`` float32 ``[..., 1]``: an op's
        ``fp8=True`` output), then with ``dtype`` the output dtype (the activations' dtype)."""
        N, K = self.shape
        if isinstance(x, tuple):
            qx, sx = _check_prequantized(x, K, dtype)
            lead, device = qx.shape[:-1], qx.device
            qx, sx = qx.reshape(-1, K), sx.reshape(-1, 1)
        else:
            if x.shape[-1] != K:
                raise ValueError(f"x: expected last dimension {K} (the weight's input width), got {tuple(x.shape)}")
            lead, device, dtype = x.shape[:-1], x.device, x.dtype
            qx, sx = sk.quantize_fp8(x.reshape(-1, K))           # per-token scales [M, 1]
        # rowwise-scaled FP8 GEMMs on CUDA write bf16; other dtypes are cast after
        out_dtype = dtype if device.type == "cpu" else torch.bfloat16
        if bias is not None:
            bias = bias.to(out_dtype)
        y = torch._scaled_mm(qx, self.q.t(), scale_a=sx, scale_b=self.scale, bias=bias, out_dtype=out_dtype)
        return y.to(dtype).view(*lead, N)


def _check_prequantized(x: tuple, K: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) != 2 or not all(isinstance(t, torch.Tensor) for t in x):
        raise TypeError(f"x: expected a tensor or a (q, scales) pair of tensors, got a tuple of {len(x)}")
    q, s = x
    if q.dtype != torch.float8_e4m3fn or q.shape[-1] != K:
        raise ValueError(f"x: expected q of dtype float8_e4m3fn with last dimension {K}, got {q.dtype} "
                         f"{tuple(q.shape)}")
    if s.dtype != torch.float32 or tuple(s.shape) != tuple(q.shape[:-1]) + (1,):
        raise ValueError(f"x: expected float32 per-token scales of shape {tuple(q.shape[:-1]) + (1,)}, got "
                         f"{s.dtype} {tuple(s.shape)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: a pre-quantized x needs the output dtype, got {dtype!r}")
    return q, s


def linear(x, w, b: torch.Tensor | None = None, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)``, or the FP8 product when ``w`` is an :class:`Fp8Weight`; then ``x``
    may be the ``(q, scales)`` pair of an op's ``fp8=True`` output (see :func:`wants_fp8`), with
    ``dtype`` the output dtype."""
    if isinstance(w, Fp8Weight):
        return w(x, b, dtype=dtype)
    if isinstance(x, tuple):
        raise TypeError("x: a pre-quantized (q, scales) pair needs an Fp8Weight, got a plain weight")
    return F.linear(x, w, b)


def wants_fp8(w) -> bool:
    """Whether the GEMM with weight ``w`` takes FP8 activations: the op producing its input can
    then write them directly (``fp8=True``: one launch instead of the op plus ``quantize_fp8``)."""
    return isinstance(w, Fp8Weight)


def fp8_eligible(w) -> bool:
    """A weight that quantizes: 2-D, floating, both sizes multiples of 16 (``_scaled_mm``'s rule)."""
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point()
            and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0)


def check_fp8_device(device: torch.device) -> None:
    """Raise ValueError when ``device`` cannot run FP8 GEMMs (CUDA below sm_89; CPU is fine)."""
    if device.type != "cuda":
        return
    cap = tuple(torch.cuda.get_device_capability(device))
    if cap < FP8_MIN_CAPABILITY:
        raise ValueError(f"quantization: 'fp8' needs FP8 tensor cores (compute capability >= "
                         f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}, Ada or Hopper); {device} is "
                         f"sm_{cap[0]}{cap[1]}; load with quantization=None")


def quantize_linears(slots: Sequence[tuple[str, object, object]]) -> dict[str, Fp8Weight]:
    """Replace every eligible weight named in ``slots`` (``(name, owner, key)``: ``owner[key]`` for
    a dict, ``getattr(owner, key)`` otherwise) by an :class:`Fp8Weight`; returns them by name."""
    done = {}
    for name, owner, key in slots:
        w = owner[key] if isinstance(owner, dict) else getattr(owner, key)
        if not fp8_eligible(w):
            continue
        q = Fp8Weight(w)
        if isinstance(owner, dict):
            owner[key] = q
        else:
            setattr(owner, key, q)
        done[name] = q
    return done


