"""DC-AE pixel decoder: the decoder half of diffusers' ``AutoencoderDC``, for inference.

``DCAEDecoder.decode(z)`` computes what ``AutoencoderDC.decode(z).sample`` returns (no tiling, no
latent scaling: the pipeline divides by ``scaling_factor`` first), on the weights of a diffusers
``AutoencoderDC`` folder. Only the ``decoder.*`` tensors are read; the encoder's are skipped
without being loaded.

Activations stay channels-last (``[B, H, W, C]`` contiguous) from the first convolution to the
last, so every 1x1 convolution is a plain GEMM on ``[B*H*W, C]`` rows, every channel norm is a row
norm (``spar_kernels.rms_norm``), the Mix-FFN middle runs ``spar_kernels.dwconv_glu`` on
``[B, H*W, 2C]`` and the multi-scale attention runs ``spar_kernels.linear_attention`` on views of
the projected rows; the 3x3 and depthwise 5x5 convolutions go to ``torch.nn.functional.conv2d``
on channels-last views (oneDNN on CPU, cuDNN on GPU). Weights are re-laid out once at load time
(1x1 convs as matrices, q/k/v concatenated, BatchNorm folded into a per-channel scale and shift).

Block structure, as diffusers defines it (``autoencoder_dc.py``)::

    h = conv_in(z) + repeat_interleave(z, C_last / C_latent, channel)       (in_shortcut)
    for stage in deepest .. 0:
        [DCUpBlock2d: conv3x3 -> pixel_shuffle (or nearest x2 -> conv3x3, run as four 2x2 convs at the
         input resolution: _upsampled_conv) + shuffled channel repeat]
        ResBlock:          h + norm(conv3x3(act(conv3x3(h) + b)))
        EfficientViTBlock: h + norm(to_out(multiscale ReLU linear attention(h)))
                           h + rmsnorm(conv1x1(dwconv3x3_glu(silu(conv1x1(h)))))
    image = conv_out(act(rmsnorm(h)))
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spar_kernels import dwconv_glu, linear_attention, rms_norm, same_device
from .loading import check_config_class, check_state_dict, load_component

__all__ = ["DCAEConfig", "DCAEDecoder", "dcae_param_shapes", "random_weights"]

_BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
_NORM_TYPES = ("rms_norm", "batch_norm")
_UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")
_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu, "mish": F.mish}
_NORM_EPS = 1e-5            # diffusers' get_normalization default and the decoder's norm_out eps
_ATTN_EPS = 1e-15           # SanaMultiscaleLinearAttention's eps
_GLU_EXPAND = 4             # EfficientViTBlock's GLUMBConv expand_ratio
_UP = 2                     # DCUpBlock2d factor


def _per_stage(value, n: int, name: str) -> tuple:
    if isinstance(value, str) or value is None:
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name}: expected one entry per stage ({n}), got {len(value)}: {value!r}")
    return value


@dataclass(frozen=True)
class DCAEConfig:
    """The decoder-side fields of a diffusers ``AutoencoderDC`` config (its defaults when absent)."""

    in_channels: int
    latent_channels: int
    attention_head_dim: int
    block_types: tuple[str, ...]
    block_out_channels: tuple[int, ...]
    layers_per_block: tuple[int, ...]
    qkv_multiscales: tuple[tuple[int, ...], ...]
    norm_types: tuple[str, ...]
    act_fns: tuple[str | None, ...]
    upsample_block_type: str
    in_shortcut: bool
    conv_act_fn: str
    scaling_factor: float

    @classmethod
    def from_dict(cls, d: dict) -> "DCAEConfig":
        check_config_class(d, "AutoencoderDC")
        channels = tuple(int(c) for c in d.get("decoder_block_out_channels", (128, 256, 512, 512, 1024, 1024)))
        n = len(channels)
        if n < 1:
            raise ValueError("decoder_block_out_channels: expected at least one stage")
        cfg = cls(
            in_channels=int(d.get("in_channels", 3)),
            latent_channels=int(d.get("latent_channels", 32)),
            attention_head_dim=int(d.get("attention_head_dim", 32)),
            block_types=_per_stage(d.get("decoder_block_types", "ResBlock"), n, "decoder_block_types"),
            block_out_channels=channels,
            layers_per_block=tuple(int(v) for v in _per_stage(
                d.get("decoder_layers_per_block", (3,) * n), n, "decoder_layers_per_block")),
            qkv_multiscales=tuple(tuple(int(k) for k in s) for s in _per_stage(
                d.get("decoder_qkv_multiscales", ((), (), (), (5,), (5,), (5,))), n, "decoder_qkv_multiscales")),
            norm_types=_per_stage(d.get("decoder_norm_types", "rms_norm"), n, "decoder_norm_types"),
            act_fns=_per_stage(d.get("decoder_act_fns", "silu"), n, "decoder_act_fns"),
            upsample_block_type=d.get("upsample_block_type", "pixel_shuffle"),
            in_shortcut=bool(d.get("decoder_in_shortcut", True)),
            conv_act_fn=d.get("decoder_conv_act_fn", "relu"),
            scaling_factor=float(d.get("scaling_factor", 1.0)),
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.attention_head_dim < 1:
            raise ValueError(f"attention_head_dim: expected >= 1, got {self.attention_head_dim}")
        if any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"decoder_block_out_channels: expected every stage >= 1, got {self.block_out_channels}")
        for i, t in enumerate(self.block_types):
            if t not in _BLOCK_TYPES:
                raise ValueError(f"decoder_block_types[{i}]: {t!r} is not supported (expected one of {_BLOCK_TYPES})")
        for i, t in enumerate(self.norm_types):
            if t not in _NORM_TYPES:
                raise ValueError(f"decoder_norm_types[{i}]: {t!r} is not supported (expected one of {_NORM_TYPES})")
        for i, a in enumerate(self.act_fns):
            if a is not None and a not in _ACTIVATIONS:
                raise ValueError(f"decoder_act_fns[{i}]: {a!r} is not supported (expected one of {list(_ACTIVATIONS)})")
        if self.conv_act_fn not in _ACTIVATIONS:
            raise ValueError(f"decoder_conv_act_fn: {self.conv_act_fn!r} is not supported "
                             f"(expected one of {list(_ACTIVATIONS)})")
        if self.upsample_block_type not in _UPSAMPLE_TYPES:
            raise ValueError(f"upsample_block_type: {self.upsample_block_type!r} is not supported "
                             f"(expected one of {_UPSAMPLE_TYPES})")
        if any(v < 1 for v in self.layers_per_block[1:]) or self.layers_per_block[0] < 0:
            raise ValueError(f"decoder_layers_per_block: {self.layers_per_block} (only the first stage may have "
                             "0 layers)")
        if self.layers_per_block[0] == 0 and len(self.block_out_channels) < 2:
            raise ValueError("decoder_layers_per_block: a single stage cannot have 0 layers")
        if self.in_shortcut and self.block_out_channels[-1] % self.latent_channels:
            raise ValueError(f"decoder_block_out_channels[-1] ({self.block_out_channels[-1]}) must be a multiple of "
                             f"latent_channels ({self.latent_channels}) for the input shortcut")
        for i, (c, t) in enumerate(zip(self.block_out_channels, self.block_types)):
            if t == "EfficientViTBlock" and self.layers_per_block[i] and c // self.attention_head_dim < 1:
                raise ValueError(f"decoder_block_out_channels[{i}] ({c}) is smaller than attention_head_dim "
                                 f"({self.attention_head_dim})")

    @property
    def num_stages(self) -> int:
        return len(self.block_out_channels)

    @property
    def out_norm_channels(self) -> int:
        return self.block_out_channels[0] if self.layers_per_block[0] > 0 else self.block_out_channels[1]

    @property
    def upsample_factor(self) -> int:
        ups = sum(1 for i in range(self.num_stages - 1) if self.layers_per_block[i] > 0)
        return _UP ** (ups + (0 if self.layers_per_block[0] > 0 else 1))


def _norm_shapes(prefix: str, kind: str, c: int) -> dict:
    shapes = {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}
    if kind == "batch_norm":
        shapes.update({f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
                       f"{prefix}.num_batches_tracked": ()})
    return shapes


def _up_shapes(prefix: str, cin: int, cout: int, interpolate: bool) -> dict:
    conv_out = cout if interpolate else cout * _UP * _UP
    return {f"{prefix}.conv.weight": (conv_out, cin, 3, 3), f"{prefix}.conv.bias": (conv_out,)}


def dcae_param_shapes(config_dict: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the decoder's tensors, named as in an ``AutoencoderDC`` state dict
    without the ``decoder.`` prefix (``conv_in.weight``, ``up_blocks.3.1.attn.to_q.weight``, ...)."""
    cfg = DCAEConfig.from_dict(config_dict)
    C = cfg.block_out_channels
    interp = cfg.upsample_block_type == "interpolate"
    shapes = {"conv_in.weight": (C[-1], cfg.latent_channels, 3, 3), "conv_in.bias": (C[-1],)}
    for i in range(cfg.num_stages):
        c, n_layers = C[i], cfg.layers_per_block[i]
        j0 = 0
        if i < cfg.num_stages - 1 and n_layers > 0:
            shapes.update(_up_shapes(f"up_blocks.{i}.0", C[i + 1], c, interp))
            j0 = 1
        for j in range(j0, j0 + n_layers):
            p = f"up_blocks.{i}.{j}"
            if cfg.block_types[i] == "ResBlock":
                shapes.update({f"{p}.conv1.weight": (c, c, 3, 3), f"{p}.conv1.bias": (c,),
                               f"{p}.conv2.weight": (c, c, 3, 3)})
                shapes.update(_norm_shapes(f"{p}.norm", cfg.norm_types[i], c))
            else:
                hd = cfg.attention_head_dim
                heads = int(c // hd * 1.0)
                inner = heads * hd
                scales = cfg.qkv_multiscales[i]
                for name in ("to_q", "to_k", "to_v"):
                    shapes[f"{p}.attn.{name}.weight"] = (inner, c)
                for s, k in enumerate(scales):
                    shapes[f"{p}.attn.to_qkv_multiscale.{s}.proj_in.weight"] = (3 * inner, 1, k, k)
                    shapes[f"{p}.attn.to_qkv_multiscale.{s}.proj_out.weight"] = (3 * inner, hd, 1, 1)
                shapes[f"{p}.attn.to_out.weight"] = (c, inner * (1 + len(scales)))
                shapes.update(_norm_shapes(f"{p}.attn.norm_out", cfg.norm_types[i], c))
                hidden = int(_GLU_EXPAND * c)
                shapes.update({f"{p}.conv_out.conv_inverted.weight": (2 * hidden, c, 1, 1),
                               f"{p}.conv_out.conv_inverted.bias": (2 * hidden,),
                               f"{p}.conv_out.conv_depth.weight": (2 * hidden, 1, 3, 3),
                               f"{p}.conv_out.conv_depth.bias": (2 * hidden,),
                               f"{p}.conv_out.conv_point.weight": (c, hidden, 1, 1),
                               f"{p}.conv_out.norm.weight": (c,), f"{p}.conv_out.norm.bias": (c,)})
    co = cfg.out_norm_channels
    shapes.update({"norm_out.weight": (co,), "norm_out.bias": (co,)})
    if cfg.layers_per_block[0] > 0:
        shapes.update({"conv_out.weight": (cfg.in_channels, co, 3, 3), "conv_out.bias": (cfg.in_channels,)})
    else:
        shapes.update(_up_shapes("conv_out", co, cfg.in_channels, interp))
    return shapes


def random_weights(config_dict: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random float32 CPU weights of the right names and shapes (fan-in scaled; norms near 1,
    BatchNorm running variances positive), for tests and ``SparPipeline.random``."""
    out = {}
    for name, shape in dcae_param_shapes(config_dict).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[name] = torch.zeros((), dtype=torch.int64)
        elif leaf == "running_var":
            out[name] = 0.5 + torch.rand(shape, generator=generator)
        elif ".norm" in name or name.startswith("norm_out"):
            base = 1.0 if leaf == "weight" else 0.0
            out[name] = base + 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            out[name] = 0.02 * torch.randn(shape, generator=generator)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            out[name] = torch.randn(shape, generator=generator) / fan_in ** 0.5
    return out


# ---------------------------------------------------------------------------------------------
# channels-last building blocks (x is [B, H, W, C] contiguous)

def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
    pad = w.shape[-1] // 2
    y = F.conv2d(x.permute(0, 3, 1, 2), w, b, padding=(pad, pad), groups=groups)
    return y.permute(0, 2, 3, 1).contiguous()  # no copy: conv keeps the channels-last input format


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, b)


def _pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """F.pixel_shuffle(., 2) in channels-last: channel c*4 + i*2 + j goes to pixel (2h+i, 2w+j)."""
    B, H, W, C4 = x.shape
    C = C4 // (_UP * _UP)
    x = x.view(B, H, W, C, _UP, _UP).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(B, H * _UP, W * _UP, C)


# nearest x2 then a 3x3 conv (padding 1) = four 2x2 convs on the low-resolution input, one per
# output phase (a, b) = (row, column) parity: output row 2i + a reads input rows i - 1 + a and
# i + a, with the 3x3 kernel's rows summed as {0}, {1, 2} (a = 0) or {0, 1}, {2} (a = 1); columns
# alike. 16 taps per input pixel instead of 36, and the upsampled input is never built.
_PHASE_TAPS = torch.tensor([[[1., 0., 0.], [0., 1., 1.]], [[1., 1., 0.], [0., 0., 1.]]])   # [a, tap, k]


def _phase_weights(w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 3x3 conv's weight [C_out, C_in, 3, 3] (and bias) as the 2x2 convs of the four phases:
    ``[4 * C_out, C_in, 2, 2]``, phase 2a + b's output channels together (sums in fp32 or wider)."""
    acc = torch.promote_types(w.dtype, torch.float32)
    taps = _PHASE_TAPS.to(w.device, acc)
    k = torch.einsum("atk,bul,oikl->aboitu", taps, taps, w.to(acc))
    return k.reshape(4 * w.shape[0], w.shape[1], 2, 2).to(w.dtype), (None if b is None else b.repeat(4))


def _upsampled_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The 3x3 conv (``w3``, ``b3``) of ``x`` upsampled x2 (nearest), from :func:`_phase_weights`'
    ``(w, b)``: one 2x2 conv (padding 1) at the input resolution, each phase's output read into place."""
    B, H, W, _ = x.shape
    C = w.shape[0] // 4
    y = _conv(x, w, b)                                                      # [B, H+1, W+1, 4C]
    sB, sH, sW, _ = y.stride()
    # output (2i + a, 2j + c) = phase 2a + c's channels at (i + a, j + c)
    phases = y.as_strided((B, H, _UP, W, _UP, C), (sB, sH, sH + 2 * C, sW, sW + C, 1), y.storage_offset())
    return phases.reshape(B, H * _UP, W * _UP, C)


def _repeat_channels(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """repeat_interleave over channels: output channel c reads input channel c // repeats."""
    if repeats == 1:
        return x
    return x[..., :, None].expand(*x.shape, repeats).reshape(*x.shape[:-1], x.shape[-1] * repeats)


def _add_shuffled_repeat(y: torch.Tensor, x: torch.Tensor, repeats: int) -> torch.Tensor:
    """``y += _pixel_shuffle(_repeat_channels(x, repeats))`` (the up block's shortcut), read from
    ``x`` through a strided view when ``repeats`` is 1, 2 or 4 (output channel c of pixel
    (2i + a, 2j + b) reads input channel (4c + 2a + b) // repeats: linear in a, b, c), without
    building the repeated and shuffled copies."""
    B, H, W, C = x.shape
    Cout = y.shape[-1]
    strides = {1: (2, 1, 4), 2: (1, 0, 2), 4: (0, 0, 1)}.get(repeats)
    if strides is None or not (x.is_contiguous() and y.is_contiguous()):
        return y.add_(_pixel_shuffle(_repeat_channels(x, repeats)))
    sa, sb, sc = strides
    src = x.as_strided((B, H, _UP, W, _UP, Cout), (H * W * C, W * C, sa, C, sb, sc), x.storage_offset())
    y.view(B, H, _UP, W, _UP, Cout).add_(src)
    return y


class _Norm:
    """Channel norm on the last dim: RMSNorm(eps 1e-5, weight, bias) or an eval BatchNorm folded
    into ``x * scale + shift``."""

    def __init__(self, kind: str, w: dict, prefix: str):
        self.kind = kind
        if kind == "rms_norm":
            self.weight, self.bias = w[f"{prefix}.weight"], w[f"{prefix}.bias"]
        else:
            mean = w[f"{prefix}.running_mean"].float()
            var = w[f"{prefix}.running_var"].float()
            scale = w[f"{prefix}.weight"].float() * torch.rsqrt(var + _NORM_EPS)
            dtype = w[f"{prefix}.weight"].dtype
            self.scale = scale.to(dtype)
            self.shift = (w[f"{prefix}.bias"].float() - mean * scale).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms_norm":
            return rms_norm(x, self.weight, _NORM_EPS).add_(self.bias)
        return torch.addcmul(self.shift, x, self.scale)


class _UpBlock:
    def __init__(self, w: dict, prefix: str, cin: int, cout: int, interpolate: bool, shortcut: bool):
        self.weight, self.bias = w[f"{prefix}.conv.weight"], w[f"{prefix}.conv.bias"]
        self.interpolate, self.shortcut = interpolate, shortcut
        self.repeats = cout * _UP * _UP // cin
        self.phase = _phase_weights(self.weight, self.bias) if interpolate else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            y = _upsampled_conv(x, *self.phase)
        else:
            y = _pixel_shuffle(_conv(x, self.weight, self.bias))
        if self.shortcut:
            y = _add_shuffled_repeat(y, x, self.repeats)
        return y


class _ResBlock:
    def __init__(self, w: dict, p: str, norm: str, act: str | None):
        self.w1, self.b1, self.w2 = w[f"{p}.conv1.weight"], w[f"{p}.conv1.bias"], w[f"{p}.conv2.weight"]
        self.act = _ACTIVATIONS[act] if act is not None else None
        self.norm = _Norm(norm, w, f"{p}.norm")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = _conv(x, self.w1, self.b1)
        if self.act is not None:
            h = self.act(h)
        h = self.norm(_conv(h, self.w2, None))
        return h.add_(x)


class _EfficientViTBlock:
    """Multi-scale ReLU linear attention + GLU Mix-FFN, both residual (channels-last)."""

    def __init__(self, w: dict, p: str, c: int, head_dim: int, scales: tuple[int, ...], norm: str):
        a = f"{p}.attn"
        self.head_dim = head_dim
        self.heads = int(c // head_dim * 1.0)
        inner = self.heads * head_dim
        self.w_qkv = torch.cat([w[f"{a}.to_q.weight"], w[f"{a}.to_k.weight"], w[f"{a}.to_v.weight"]], 0)
        self.scales = []
        for s, k in enumerate(scales):
            m = f"{a}.to_qkv_multiscale.{s}"
            dw = w[f"{m}.proj_in.weight"]                                   # [3*inner, 1, k, k]
            pw = w[f"{m}.proj_out.weight"].reshape(3 * self.heads, head_dim, head_dim)  # per group [out, in]
            self.scales.append((dw, pw.transpose(1, 2).contiguous()))       # [groups, in, out] for bmm
        self.w_out = w[f"{a}.to_out.weight"]
        self.attn_norm = _Norm(norm, w, f"{a}.norm_out")
        f = f"{p}.conv_out"
        hidden = int(_GLU_EXPAND * c)
        self.w_inv, self.b_inv = w[f"{f}.conv_inverted.weight"].reshape(2 * hidden, c), w[f"{f}.conv_inverted.bias"]
        self.w_dw, self.b_dw = w[f"{f}.conv_depth.weight"], w[f"{f}.conv_depth.bias"]
        self.w_point = w[f"{f}.conv_point.weight"].reshape(c, hidden)
        self.ff_norm_w, self.ff_norm_b = w[f"{f}.norm.weight"], w[f"{f}.norm.bias"]
        self.inner = inner

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N, hd = H * W, self.head_dim
        qkv = _linear(x, self.w_qkv)                                        # [B, H, W, 3*inner] = q|k|v
        parts = [qkv]
        for dw, pw in self.scales:
            y = _conv(qkv, dw, None, groups=dw.shape[0])                    # depthwise k x k
            g = pw.shape[0]
            y = torch.bmm(y.view(B * N, g, hd).transpose(0, 1), pw)         # grouped 1x1: [g, B*N, hd]
            parts.append(y.transpose(0, 1).reshape(B, H, W, g * hd))
        qkv = torch.cat(parts, dim=-1) if len(parts) > 1 else qkv
        # diffusers views the concatenated channels as heads of 3*head_dim: [q | k | v] per head
        qkv = qkv.view(B, N, -1, 3 * hd)
        q, k, v = qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:]
        if N > hd:
            out = linear_attention(q, k, v, eps=_ATTN_EPS)                   # [B, N, heads', hd]
        else:
            out = self._quadratic(q, k, v)
        out = _linear(out.reshape(B, H, W, -1), self.w_out)
        return self.attn_norm(out).add_(x)

    @staticmethod
    def _quadratic(q, k, v):
        """diffusers' small-grid branch (H*W <= head_dim): ReLU scores normalised over the keys."""
        q, k = F.relu(q).transpose(1, 2), F.relu(k).transpose(1, 2)        # [B, h, N, d]
        v = v.transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)).float()               # [B, h, Nq, Nk]
        scores = scores / (scores.sum(dim=-1, keepdim=True) + _ATTN_EPS)
        return torch.matmul(scores.to(v.dtype), v).transpose(1, 2)           # [B, Nq, h, d]

    def _mix_ffn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        h = F.silu(_linear(x.view(B, H * W, C), self.w_inv, self.b_inv))
        h = dwconv_glu(h, self.w_dw, self.b_dw, H, W)                       # [B, H*W, hidden]
        h = _linear(h, self.w_point)
        h = rms_norm(h, self.ff_norm_w, _NORM_EPS).add_(self.ff_norm_b)
        return h.view(B, H, W, C).add_(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix_ffn(self._attention(x))


class DCAEDecoder:
    """The DC-AE decoder on channels-last activations.

    Args:
        config_dict: an ``AutoencoderDC`` config (its ``config.json`` as a dict).
        weights: the decoder's tensors named as :func:`dcae_param_shapes` names them (the
            ``decoder.*`` keys of an ``AutoencoderDC`` state dict without that prefix), all on
            one device in one floating dtype. A whole ``AutoencoderDC`` state dict is accepted
            too: its ``decoder.*`` tensors are used and its ``encoder.*`` tensors dropped.
    """

    def __init__(self, config_dict: dict, weights: dict[str, torch.Tensor]):
        self.config = DCAEConfig.from_dict(config_dict)
        if any(k.startswith("decoder.") for k in weights):
            # a whole AutoencoderDC state dict: keep the decoder, drop the encoder
            weights = {k[len("decoder."):] if k.startswith("decoder.") else k: v
                       for k, v in weights.items() if not k.startswith("encoder.")}
        check_state_dict(weights, dcae_param_shapes(config_dict), "DCAEDecoder weights")
        floats = [t for t in weights.values() if t.is_floating_point()]
        self.device, self.dtype = floats[0].device, floats[0].dtype
        for name, t in weights.items():
            if t.is_floating_point() and (t.dtype != self.dtype or not same_device(t.device, self.device)):
                raise ValueError(f"weights[{name!r}]: {t.dtype} on {t.device}, expected every tensor "
                                 f"in {self.dtype} on {self.device}")
        cfg, w = self.config, weights
        C = cfg.block_out_channels
        interp = cfg.upsample_block_type == "interpolate"
        self.conv_in_w, self.conv_in_b = w["conv_in.weight"], w["conv_in.bias"]
        self.in_repeats = C[-1] // cfg.latent_channels if cfg.in_shortcut else 0
        self.stages = []  # run deepest first
        for i in reversed(range(cfg.num_stages)):
            ops, j = [], 0
            if i < cfg.num_stages - 1 and cfg.layers_per_block[i] > 0:
                ops.append(_UpBlock(w, f"up_blocks.{i}.0", C[i + 1], C[i], interp, shortcut=True))
                j = 1
            for j in range(j, j + cfg.layers_per_block[i]):
                p = f"up_blocks.{i}.{j}"
                if cfg.block_types[i] == "ResBlock":
                    ops.append(_ResBlock(w, p, cfg.norm_types[i], cfg.act_fns[i]))
                else:
                    ops.append(_EfficientViTBlock(w, p, C[i], cfg.attention_head_dim, cfg.qkv_multiscales[i],
                                                  cfg.norm_types[i]))
            self.stages.extend(ops)
        self.norm_out_w, self.norm_out_b = w["norm_out.weight"], w["norm_out.bias"]
        self.conv_act = _ACTIVATIONS[cfg.conv_act_fn]
        if cfg.layers_per_block[0] > 0:
            self.conv_out_w, self.conv_out_b = w["conv_out.weight"], w["conv_out.bias"]
            self.conv_out_up = None
        else:
            self.conv_out_up = _UpBlock(w, "conv_out", cfg.out_norm_channels, cfg.in_channels, interp, shortcut=False)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> "DCAEDecoder":
        """Load from a diffusers ``AutoencoderDC`` folder (``config.json`` + safetensors weights,
        sharded index too). Only ``decoder.*`` tensors are read; ``dtype`` defaults to float32 on
        CPU and bfloat16 elsewhere."""
        config, weights = load_component(folder, "AutoencoderDC", DCAEConfig.from_dict, dcae_param_shapes,
                                         prefix="decoder.", device=device, dtype=dtype)
        return cls(config, weights)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents ``z [B, latent_channels, h, w]`` (already divided by ``scaling_factor``)
        to images ``[B, in_channels, h*f, w*f]`` (contiguous, unclamped, in the weights' dtype)."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z: expected a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels or z.shape[0] < 1 or min(z.shape[2:]) < 1:
            raise ValueError(f"z: expected shape [B, {self.config.latent_channels}, h, w], got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"z: expected a floating-point tensor, got {z.dtype}")
        if not same_device(z.device, self.device):
            raise ValueError(f"z: expected a tensor on {self.device} (the decoder's device), got {z.device}")
        x = z.to(self.dtype).permute(0, 2, 3, 1).contiguous()              # [B, h, w, C_latent]
        h = _conv(x, self.conv_in_w, self.conv_in_b)
        if self.in_repeats:
            h = h.add_(_repeat_channels(x, self.in_repeats))
        for op in self.stages:
            h = op(h)
        h = self.conv_act(rms_norm(h, self.norm_out_w, _NORM_EPS).add_(self.norm_out_b))
        if self.conv_out_up is None:
            h = _conv(h, self.conv_out_w, self.conv_out_b)
        else:
            h = self.conv_out_up(h)
        return h.permute(0, 3, 1, 2).contiguous()

    __call__ = decode
