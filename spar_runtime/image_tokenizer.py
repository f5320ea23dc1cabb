"""SPAR's asymmetric dual-stream image tokenizer: InternVL image features -> the generation latent.

(Not the text tokenizer: that is :mod:`spar_runtime.tokenizer`.) Input: the image features
``F [B, T, D]`` that :meth:`spar_runtime.internvl.MLLM.encode_images` computes (InternViT, pixel
shuffle, MLP projector; T = 256 at 448 px, D = the LLM width); C = ``latent_channels``.

    block(x)  = x + fc2(gelu(fc1(LN(x))))                LN over D, fc1 / fc2 [D, D]
    head(x)   = fc2(gelu(fc1(LN(x))))                    LN over D, fc1 [C, D], fc2 [C, C]
    semantic  s = head_s(blocks_s(F))                    mlp_blocks residual blocks
    pixel     p = head_p(blocks_p(layers(F)))            pixel_layers pre-norm transformer encoder
                                                         layers (torch.nn.TransformerEncoderLayer's
                                                         computation, norm_first, GELU, FFN 4D,
                                                         full attention over the T tokens of each
                                                         image, no position embedding)
    fusion    z = fc2(gelu(fc1(LN(cat(s, p)))))          LN over 2C, fc1 [2C, 2C], fc2 [C, 2C]
    latent[b, :, t // w, t % w] = z[b, t]                the h x w token grid, row-major

Every LayerNorm has eps 1e-6 and GELU is the exact (erf) one. The latent lives in the space the
DiT generates in: ``pipe.decode(pipe.encode_image(x))`` reconstructs the image.

The images of a call run as one packed batch ``[B * T, D]``: GEMMs over all rows (on the CPU into
reused buffers: :class:`spar_runtime.buffers.Workspace`), the pixel stream's attention through
``spar_kernels.hybrid_attention`` on a layout of one full (bidirectional) segment per image
(head-major q/k/v on the CPU: :func:`spar_runtime.internvl.split_heads`). Weights live in
``spar.safetensors`` under ``tokenizer.*`` (:func:`param_shapes`; the pixel layers keep
``nn.TransformerEncoderLayer``'s own names).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Mapping

import torch
import torch.nn.functional as F

import spar_kernels as sk

from .configs import TokenizerConfig
from .buffers import Workspace, linear
from .internvl import split_heads
from .loading import check_state_dict
from .qwen2 import _fmt

__all__ = ["TokenizerConfig", "ImageTokenizer", "param_shapes", "random_weights", "strength_start_step",
           "noised_start", "LN_EPS", "PREFIX"]

LN_EPS = 1e-6          # every LayerNorm of the tokenizer
PREFIX = "tokenizer."  # the tokenizer's keys in spar.safetensors


# ---------------------------------------------------------------------------------------------
# checkpoint names

def _mlp_shapes(p: str, d_in: int, d_hidden: int, d_out: int) -> dict[str, tuple[int, ...]]:
    return {p + "norm.weight": (d_in,), p + "norm.bias": (d_in,), p + "fc1.weight": (d_hidden, d_in),
            p + "fc1.bias": (d_hidden,), p + "fc2.weight": (d_out, d_hidden), p + "fc2.bias": (d_out,)}


def param_shapes(tcfg: TokenizerConfig, hidden_size: int, latent_channels: int,
                 prefix: str = PREFIX) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tokenizer's tensors (``tokenizer.*`` in spar.safetensors)."""
    D, C = hidden_size, latent_channels
    shapes: dict[str, tuple[int, ...]] = {}
    for stream in ("semantic", "pixel"):
        for i in range(tcfg.mlp_blocks):
            shapes.update(_mlp_shapes(f"{prefix}{stream}.blocks.{i}.", D, D, D))
        shapes.update(_mlp_shapes(f"{prefix}{stream}.head.", D, C, C))
    for i in range(tcfg.pixel_layers):
        p = f"{prefix}pixel.layers.{i}."
        shapes.update({p + "self_attn.in_proj_weight": (3 * D, D), p + "self_attn.in_proj_bias": (3 * D,),
                       p + "self_attn.out_proj.weight": (D, D), p + "self_attn.out_proj.bias": (D,),
                       p + "linear1.weight": (4 * D, D), p + "linear1.bias": (4 * D,),
                       p + "linear2.weight": (D, 4 * D), p + "linear2.bias": (D,),
                       p + "norm1.weight": (D,), p + "norm1.bias": (D,), p + "norm2.weight": (D,),
                       p + "norm2.bias": (D,)})
    shapes.update(_mlp_shapes(prefix + "fusion.", 2 * C, 2 * C, C))
    return shapes


def random_weights(tcfg: TokenizerConfig, hidden_size: int, latent_channels: int,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random fp32 CPU tensors named as in spar.safetensors: matrices ``randn / sqrt(fan_in)``,
    LayerNorm weights ``1 + 0.1 randn``, biases ``0.02 randn``."""
    out = {}
    for name, shape in param_shapes(tcfg, hidden_size, latent_channels).items():
        module = name.rsplit(".", 2)[-2]
        if len(shape) == 2:
            out[name] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        elif module.startswith("norm") and name.endswith(".weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            out[name] = 0.02 * torch.randn(shape, generator=generator)
    return out


# ---------------------------------------------------------------------------------------------
# the model

def _gelu(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    return torch.ops.aten.gelu_(x) if inplace else F.gelu(x)


def _mlp(x: torch.Tensor, w: tuple, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """``fc2(gelu(fc1(LN(x))))``; ``w`` = (norm w, norm b, fc1 w, fc1 b, fc2 w, fc2 b); ``hidden``:
    an optional reused buffer for ``fc1``'s output (GELU then runs in place on it)."""
    nw, nb, w1, b1, w2, b2 = w
    h = F.layer_norm(x, (x.shape[-1],), nw, nb, LN_EPS)
    return linear(_gelu(linear(h, w1, b1, out=hidden), hidden is not None), w2, b2)


@dataclasses.dataclass
class _EncoderLayer:
    norm1: tuple
    in_proj: tuple
    out_proj: tuple
    norm2: tuple
    linear1: tuple
    linear2: tuple


class ImageTokenizer:
    """The dual-stream tokenizer with its weights (device and dtype taken from them).

    Args:
        tcfg: its :class:`TokenizerConfig`.
        hidden_size: D (the LLM width of the image features); latent_channels: C.
        weights: exactly :func:`param_shapes` ``(tcfg, D, C, prefix="")`` (the spar.safetensors
            names without ``tokenizer.``).
        where: named in the error when a tensor is missing, unexpected or mis-shaped.
    """

    def __init__(self, tcfg: TokenizerConfig, hidden_size: int, latent_channels: int,
                 weights: Mapping[str, torch.Tensor], *, where: str = "tokenizer weights"):
        check_state_dict(weights, param_shapes(tcfg, hidden_size, latent_channels, prefix=""), where)
        self.cfg, self.hidden_size, self.latent_channels = tcfg, hidden_size, latent_channels
        self.head_dim = tcfg.check_width(hidden_size)
        w = weights
        first = w["fusion.fc1.weight"]
        self.device, self.dtype = first.device, first.dtype
        odd = [k for k, v in w.items() if v.device != self.device or v.dtype != self.dtype]
        if odd:
            raise ValueError(f"{where}: every tensor must be {self.dtype} on {self.device}, like "
                             f"fusion.fc1.weight; {odd[0]} is {_fmt(w[odd[0]])}")

        def mlp(p):
            return tuple(w[p + n] for n in ("norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight",
                                            "fc2.bias"))

        def pair(p):
            return w[p + "weight"], w[p + "bias"]

        self.blocks = {s: [mlp(f"{s}.blocks.{i}.") for i in range(tcfg.mlp_blocks)] for s in ("semantic", "pixel")}
        self.heads = {s: mlp(f"{s}.head.") for s in ("semantic", "pixel")}
        self.layers = [_EncoderLayer(norm1=pair(f"pixel.layers.{i}.norm1."),
                                     in_proj=(w[f"pixel.layers.{i}.self_attn.in_proj_weight"],
                                              w[f"pixel.layers.{i}.self_attn.in_proj_bias"]),
                                     out_proj=pair(f"pixel.layers.{i}.self_attn.out_proj."),
                                     norm2=pair(f"pixel.layers.{i}.norm2."),
                                     linear1=pair(f"pixel.layers.{i}.linear1."),
                                     linear2=pair(f"pixel.layers.{i}.linear2."))
                       for i in range(tcfg.pixel_layers)]
        self.fusion = mlp("fusion.")
        self._layouts: dict[tuple[int, int], sk.AttentionLayout] = {}
        self.workspace = Workspace()   # the CPU forward's largest intermediates, reused (see Workspace)

    def _buf(self, name: str, *shape: int) -> torch.Tensor | None:
        """A reused buffer on the CPU without autograd, else None (the op allocates)."""
        if self.device.type != "cpu" or torch.is_grad_enabled():
            return None
        return self.workspace.get(name, shape, self.dtype, self.device)

    def _layout(self, B: int, T: int) -> sk.AttentionLayout:
        """One full (bidirectional) segment of T tokens per image; built once per (B, T)."""
        if (B, T) not in self._layouts:
            self._layouts[B, T] = sk.AttentionLayout.from_segments([[("full", T)]] * B, device=self.device)
        return self._layouts[B, T]

    def _blocks(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        for w in self.blocks[stream]:
            x = x + _mlp(x, w, self._buf("hidden", *x.shape[:-1], w[2].shape[0]))
        return x

    def _encoder_layer(self, x: torch.Tensor, ly: _EncoderLayer, layout) -> torch.Tensor:
        """``nn.TransformerEncoderLayer(norm_first=True, activation="gelu")`` on packed rows ``[N, D]``."""
        N, D = x.shape
        H, d = self.cfg.pixel_heads, self.head_dim
        a = F.layer_norm(x, (D,), *ly.norm1, LN_EPS)
        qkv = linear(a, *ly.in_proj, out=self._buf("qkv", N, 3 * D))
        q, k, v = split_heads(qkv, H, d, out=self._buf("heads", 3, H, N, d))
        o = sk.hybrid_attention(q, k, v, layout, softmax_scale=d ** -0.5, out=self._buf("attn", N, H, d))
        x = x + linear(o.view(N, D), *ly.out_proj)
        a = F.layer_norm(x, (D,), *ly.norm2, LN_EPS)
        ffn = self._buf("ffn", N, ly.linear1[0].shape[0])
        return x + linear(_gelu(linear(a, *ly.linear1, out=ffn), ffn is not None), *ly.linear2)

    def pixel_features(self, x: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """The pixel stream's transformer layers on packed ``[B * T, D]`` rows."""
        layout = self._layout(B, T)
        for ly in self.layers:
            x = self._encoder_layer(x, ly, layout)
        return x

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` image features (T = h * w, a square grid) -> the latent, float32 ``[B, C, h, w]``."""
        D, C = self.hidden_size, self.latent_channels
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[2] != D \
                or not features.is_floating_point():
            raise ValueError(f"features: expected a float [B, T, {D}] tensor (T image tokens of width {D}), "
                             f"got {_fmt(features)}")
        B, T, _ = features.shape
        h = math.isqrt(T)
        if B < 1 or T < 1 or h * h != T:
            raise ValueError(f"features: expected B >= 1 images of T = h * h tokens (a square grid), got "
                             f"B = {B}, T = {T}")
        x = features.to(self.device, self.dtype).reshape(B * T, D)
        s = _mlp(self._blocks(x, "semantic"), self.heads["semantic"])                      # [N, C]
        p = _mlp(self._blocks(self.pixel_features(x, B, T), "pixel"), self.heads["pixel"])  # [N, C]
        z = _mlp(torch.cat([s, p], dim=-1), self.fusion)                                 # [N, C]
        return z.view(B, h, h, C).permute(0, 3, 1, 2).float().contiguous()

    __call__ = forward


# ---------------------------------------------------------------------------------------------
# image-to-image starts (pipe.edit(strength=...))

def strength_start_step(num_steps: int, strength) -> int:
    """How many of ``num_steps`` steps an edit of ``strength`` s in (0, 1] skips:
    ``num_steps - int(num_steps * s)`` (at least one step must remain)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ValueError(f"strength: expected a float in (0, 1] (or None), got {strength!r}")
    run = int(num_steps * strength)
    if run < 1:
        raise ValueError(f"strength: {strength} of {num_steps} steps runs int({num_steps} * {strength}) = 0 "
                         f"steps; expected strength >= {1 / num_steps:g} (or more steps)")
    return num_steps - run


def noised_start(z_ref: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow-matching state at ``sigma``: ``(1 - sigma) * z_ref + sigma * noise`` (fp32)."""
    sigma = sigma.to(z_ref.device, torch.float32)
    return (1 - sigma) * z_ref.float() + sigma * noise.to(z_ref.device, torch.float32)


def tail_sampler(solver: sk.FlowSampler, timesteps: torch.Tensor, method: str, start: int, guidance: float):
    """The solver and DiT timesteps of a loop that starts at step ``start`` of ``solver``'s schedule:
    a FlowSampler on the remaining sigmas (its first step is first order, as diffusers' multistep
    solvers run after ``set_begin_index``), read from the solver's host copy (no device read-back),
    and ``timesteps[start:]``."""
    tail = sk.FlowSampler(method, sigmas=solver.step_sigmas_host[start:], guidance=guidance,
                          device=solver.step_sigmas.device)
    return tail, timesteps[start:]


# ---------------------------------------------------------------------------------------------
# pipeline glue: weights, the "no tokenizer" error, image batches

def split_weights(weights: Mapping[str, torch.Tensor], config, where: str):
    """``(the other spar.safetensors tensors, the tokenizer.* ones)``; tokenizer tensors in a
    checkpoint whose config has no ``"tokenizer"`` are an error."""
    tok = {k: v for k, v in weights.items() if k.startswith(PREFIX)}
    if tok and config.tokenizer is None:
        from .loading import CheckpointError

        raise CheckpointError(f"{where}: holds {len(tok)} image tokenizer tensors ({sorted(tok)[0]}, ...) but "
                              "spar_config.json configures no \"tokenizer\"")
    return {k: v for k, v in weights.items() if not k.startswith(PREFIX)}, tok


def build(config, tok_weights: Mapping[str, torch.Tensor], device, dtype, where: str) -> "ImageTokenizer | None":
    """The pipeline's tokenizer from its ``tokenizer.*`` tensors (None when there are none)."""
    if not tok_weights:
        return None
    check_state_dict(tok_weights, config.tokenizer_param_shapes(), where)   # names with the prefix
    w = {k[len(PREFIX):]: v.to(device, dtype) for k, v in tok_weights.items()}
    return ImageTokenizer(TokenizerConfig.from_dict(config.tokenizer), config.hidden_size, config.latent_channels,
                          w, where=where)


def require(tokenizer: "ImageTokenizer | None", config) -> "ImageTokenizer":
    if tokenizer is not None:
        return tokenizer
    if config.tokenizer is None:
        raise ValueError("image: this checkpoint has no image tokenizer (spar_config.json has no \"tokenizer\" "
                         "and spar.safetensors no tokenizer.* tensors); encode_image / reconstruct need one")
    raise ValueError("image: this checkpoint has no image tokenizer weights (spar_config.json configures one, but "
                     "spar.safetensors holds no tokenizer.* tensors); encode_image / reconstruct need them")


def pixel_batch(image, preprocess, config) -> torch.Tensor:
    """PIL image(s) or pixel values ``[B, 3, S, S]`` / ``[3, S, S]`` -> checked ``[B, 3, S, S]``
    (S = the vision tower's image size; ``preprocess`` turns one PIL image into ``[1, 3, S, S]``)."""
    v = config.mllm_config["vision_config"]
    S = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    if isinstance(image, (list, tuple)):
        from PIL import Image

        odd = [i for i, im in enumerate(image) if not isinstance(im, Image.Image)]
        if not image or odd:
            raise TypeError(f"image: expected a PIL image, a list of PIL images or a [B, 3, {S}, {S}] tensor, "
                            + (f"got a list holding a {type(image[odd[0]]).__name__} (item {odd[0]})" if image
                               else "got an empty list"))
        return torch.cat([preprocess(im) for im in image])
    if isinstance(image, torch.Tensor):
        pv = image[None] if image.dim() == 3 else image
        if pv.dim() != 4 or pv.shape[0] < 1 or tuple(pv.shape[1:]) != (3, S, S) or not pv.is_floating_point():
            raise ValueError(f"image: expected InternVL-normalized float pixel values [B, 3, {S}, {S}] (3 channels, "
                             f"the vision tower's {S} px), got {_fmt(image)}")
    return preprocess(image)
