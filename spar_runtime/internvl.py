"""InternVL: the vision tower, pixel shuffle and projector, and the MLLM wrapper SPAR uses.

Computes what transformers' ``InternVLForConditionalGeneration`` computes, from the same
``save_pretrained`` folder (the format of the public "-hf" InternVL3 checkpoints):

    pixel_values [n, 3, S, S]
      -> patch conv (stride = patch) + [CLS] + absolute position embeddings    [n, 1 + P, C]
      -> L x InternViT layer:  h += lambda_1 * Attn(LN1(h));  h += lambda_2 * MLP(LN2(h))
         (full attention within each image via spar_kernels.hybrid_attention; optional q/k RMSNorm)
      -> (final LayerNorm unless use_mean_pooling), drop [CLS]
      -> pixel shuffle (downsample_ratio 0.5: 2x2 neighbouring patches -> one token of 4C channels)
      -> projector LayerNorm(4C) -> Linear(4C, D) -> GELU -> Linear(D, D)           [n * T, D]

On the CPU the patch conv runs as one GEMM over the flattened patches (its stride is its kernel),
the large intermediates are reused buffers (:class:`spar_runtime.buffers.Workspace`: no page
faults from fresh allocations) and the attention takes head-major q/k/v (:func:`split_heads`).

The image features replace the ``image_token_id`` placeholders of the prompt in order; the
Qwen2 LLM (:class:`spar_runtime.qwen2.Qwen2LM`) then runs on the packed embeddings.
A text-only ``Qwen2ForCausalLM`` folder loads too (``vision`` is then None).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

import spar_kernels as sk

from .buffers import Workspace, linear
from .loading import CheckpointError, check_state_dict, load_safetensors_dir, read_json
from .qwen2 import Qwen2Config, Qwen2LM, _check_dtype, _fmt, qwen2_lm_param_shapes

__all__ = ["InternVisionConfig", "InternVisionTower", "MLLM", "internvit_param_shapes", "mllm_param_shapes",
           "random_weights", "pixel_shuffle", "split_heads"]

_ACTS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "relu": F.relu}
# the same, in place (on the vision tower's reused CPU buffers)
_ACTS_INPLACE = {"gelu": torch.ops.aten.gelu_,
                 "gelu_pytorch_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
                 "gelu_new": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
                 "silu": lambda x: F.silu(x, inplace=True), "relu": F.relu_}


def _act(name: str, where: str):
    if name not in _ACTS:
        raise CheckpointError(f"{where}: activation {name!r} is not supported (expected one of {sorted(_ACTS)})")
    return _ACTS[name]


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return int(v[0]), int(v[1])
    raise CheckpointError(f"InternVL vision config: {name} must be an int or a pair of ints, got {v!r}")


# ---------------------------------------------------------------------------------------------
# config

@dataclass(frozen=True)
class InternVisionConfig:
    """The fields of a transformers ``InternVLVisionConfig`` the runtime uses."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_channels: int = 3
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    attention_bias: bool = False
    use_qk_norm: bool = False
    use_absolute_position_embeddings: bool = True
    use_mean_pooling: bool = True
    layer_scale_init_value: float = 0.1

    @classmethod
    def from_dict(cls, d: Mapping) -> "InternVisionConfig":
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if not isinstance(d.get(key), int) or d[key] <= 0:
                raise CheckpointError(f"InternVL vision config: {key} must be a positive integer, got {d.get(key)!r}")
        if d["hidden_size"] % d["num_attention_heads"]:
            raise CheckpointError(f"InternVL vision config: hidden_size ({d['hidden_size']}) must be a multiple of "
                                  f"num_attention_heads ({d['num_attention_heads']})")
        norm = d.get("norm_type", "layer_norm")
        if norm not in ("layer_norm", "rms_norm"):
            raise CheckpointError(f"InternVL vision config: norm_type {norm!r} is not supported")
        cfg = cls(hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
                  num_attention_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
                  image_size=_pair(d.get("image_size", 448), "image_size"),
                  patch_size=_pair(d.get("patch_size", 14), "patch_size"),
                  num_channels=int(d.get("num_channels", 3)), hidden_act=d.get("hidden_act", "gelu"),
                  norm_type=norm, layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
                  attention_bias=bool(d.get("attention_bias", False)), use_qk_norm=bool(d.get("use_qk_norm", False)),
                  use_absolute_position_embeddings=bool(d.get("use_absolute_position_embeddings", True)),
                  use_mean_pooling=bool(d.get("use_mean_pooling", True)),
                  layer_scale_init_value=float(d.get("layer_scale_init_value", 0.1)))
        _act(cfg.hidden_act, "InternVL vision config")
        if any(s % p for s, p in zip(cfg.image_size, cfg.patch_size)):
            raise CheckpointError(f"InternVL vision config: image_size {cfg.image_size} is not a multiple of "
                                  f"patch_size {cfg.patch_size}")
        return cfg

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def internvit_param_shapes(vcfg: InternVisionConfig, prefix: str = "vision_tower.") -> dict[str, tuple[int, ...]]:
    """Names and shapes of an InternVL vision tower as transformers saves them."""
    C, I = vcfg.hidden_size, vcfg.intermediate_size
    ph, pw = vcfg.patch_size
    p = prefix
    shapes = {p + "embeddings.cls_token": (1, 1, C),
              p + "embeddings.patch_embeddings.projection.weight": (C, vcfg.num_channels, ph, pw),
              p + "embeddings.patch_embeddings.projection.bias": (C,)}
    if vcfg.use_absolute_position_embeddings:
        shapes[p + "embeddings.position_embeddings"] = (1, vcfg.num_patches + 1, C)
    norm_names = ("weight", "bias") if vcfg.norm_type == "layer_norm" else ("weight",)
    for i in range(vcfg.num_hidden_layers):
        q = f"{p}encoder.layer.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            shapes[q + f"attention.{proj}.weight"] = (C, C)
            if vcfg.attention_bias:
                shapes[q + f"attention.{proj}.bias"] = (C,)
        if vcfg.use_qk_norm:
            shapes[q + "attention.q_norm.weight"] = (C,)
            shapes[q + "attention.k_norm.weight"] = (C,)
        shapes[q + "attention.projection_layer.weight"] = (C, C)
        shapes[q + "attention.projection_layer.bias"] = (C,)
        for ln in ("layernorm_before", "layernorm_after"):
            for n in norm_names:
                shapes[q + f"{ln}.{n}"] = (C,)
        shapes[q + "lambda_1"] = (C,)
        shapes[q + "lambda_2"] = (C,)
        shapes[q + "mlp.fc1.weight"] = (I, C)
        shapes[q + "mlp.fc1.bias"] = (I,)
        shapes[q + "mlp.fc2.weight"] = (C, I)
        shapes[q + "mlp.fc2.bias"] = (C,)
    if not vcfg.use_mean_pooling:
        shapes[p + "layernorm.weight"] = (C,)
        shapes[p + "layernorm.bias"] = (C,)
    return shapes


def _projector_shapes(C4: int, D: int, prefix: str = "multi_modal_projector.") -> dict[str, tuple[int, ...]]:
    return {prefix + "layer_norm.weight": (C4,), prefix + "layer_norm.bias": (C4,),
            prefix + "linear_1.weight": (D, C4), prefix + "linear_1.bias": (D,),
            prefix + "linear_2.weight": (D, D), prefix + "linear_2.bias": (D,)}


# ---------------------------------------------------------------------------------------------
# vision tower

def pixel_shuffle(x: torch.Tensor, ratio: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """InternVL's pixel shuffle on ``[n, H, W, C]`` features (H, W = the patch grid).

    With ``ratio = 1/r`` every r x r block of neighbouring patches becomes one token of ``r^2 C``
    channels, ordered as transformers orders them: patch (row i, column j) lands in token
    (i // r, j // r) at channels ``(i % r) * r C + (j % r) * C + c``. Returns ``[n, H/r, W/r, r^2 C]``
    (contiguous; written into ``out`` when given), one copy of x.
    """
    n, H, W, C = x.shape
    r = round(1 / ratio)
    if abs(r * ratio - 1) > 1e-6 or H % r or W % r:
        raise ValueError(f"pixel_shuffle: the {H}x{W} patch grid must divide by 1/ratio (ratio {ratio})")
    src = x.reshape(n, H // r, r, W // r, r, C).permute(0, 1, 3, 2, 4, 5)      # [n, i // r, j // r, i % r, j % r, c]
    if out is None:
        return src.reshape(n, H // r, W // r, r * r * C)
    out.view(src.shape).copy_(src)
    return out


def split_heads(qkv: torch.Tensor, H: int, d: int, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, 3 H d]`` fused q/k/v projections -> q, k, v ``[N, H, d]`` for ``hybrid_attention``.

    On the CPU they are views of one head-major ``[3, H, N, d]`` copy (into ``out`` when given):
    ATen's fused CPU attention (spar's CPU path) then reads each head's rows contiguously, about
    12% faster at 1025 tokens than rows ``3 H d`` apart, for a copy of the projections.
    Elsewhere: plain views."""
    N = qkv.shape[0]
    t = qkv.view(N, 3, H, d)
    if qkv.device.type != "cpu":
        return t[:, 0], t[:, 1], t[:, 2]
    src = t.permute(1, 2, 0, 3)
    hm = src.contiguous() if out is None else out.copy_(src)                   # [3, H, N, d]
    hm = hm.transpose(1, 2)                                                     # [3, N, H, d] view
    return hm[0], hm[1], hm[2]


class _VisionLayer:
    __slots__ = ("ln1_w", "ln1_b", "w_qkv", "b_qkv", "q_norm", "k_norm", "w_proj", "b_proj", "lambda_1",
                 "ln2_w", "ln2_b", "w_fc1", "b_fc1", "w_fc2", "b_fc2", "lambda_2", "ln1_s", "ln2_s")


class InternVisionTower:
    """The InternViT encoder of an InternVL checkpoint.

    Args:
        vcfg: its config.
        weights: ``{"embeddings.*", "encoder.layer.{i}.*", ...}`` (the checkpoint's names without
            the ``vision_tower.`` prefix), exactly :func:`internvit_param_shapes` ``(vcfg, prefix="")``.
        feature_layer: which hidden state :meth:`forward` returns (transformers'
            ``vision_feature_layer``): -1 the last one (after the final norm, if any); k >= 0 the
            output after k layers (0 = embeddings); other negatives count from the end.
    """

    def __init__(self, vcfg: InternVisionConfig, weights: Mapping[str, torch.Tensor], feature_layer: int = -1):
        check_state_dict(weights, internvit_param_shapes(vcfg, prefix=""), "InternVL vision tower weights")
        L = vcfg.num_hidden_layers
        if not isinstance(feature_layer, int) or not -(L + 1) <= feature_layer <= L:
            raise CheckpointError(f"vision_feature_layer: expected an int in [{-(L + 1)}, {L}], got {feature_layer!r}")
        self.cfg = vcfg
        self.final_norm = feature_layer == -1
        self.run_layers = L if feature_layer == -1 else (feature_layer if feature_layer >= 0 else L + 1 + feature_layer)
        w = weights
        self.patch_w = w["embeddings.patch_embeddings.projection.weight"]
        self.device, self.dtype = self.patch_w.device, self.patch_w.dtype
        _check_dtype(self.dtype)
        self.patch_b = w["embeddings.patch_embeddings.projection.bias"]
        self.cls = w["embeddings.cls_token"].reshape(1, vcfg.hidden_size)
        self.pos = (w["embeddings.position_embeddings"].reshape(vcfg.num_patches + 1, vcfg.hidden_size)
                    if vcfg.use_absolute_position_embeddings else None)
        self.act = _act(vcfg.hidden_act, "InternVL vision config")
        self.layers: list[_VisionLayer] = []
        for i in range(L):
            g = lambda n: w.get(f"encoder.layer.{i}.{n}")  # noqa: E731
            ly = _VisionLayer()
            ly.ln1_w, ly.ln1_b = g("layernorm_before.weight"), g("layernorm_before.bias")
            ly.ln2_w, ly.ln2_b = g("layernorm_after.weight"), g("layernorm_after.bias")
            ly.w_qkv = torch.cat([g("attention.q_proj.weight"), g("attention.k_proj.weight"),
                                  g("attention.v_proj.weight")])
            ly.b_qkv = (torch.cat([g("attention.q_proj.bias"), g("attention.k_proj.bias"), g("attention.v_proj.bias")])
                        if vcfg.attention_bias else None)
            ly.q_norm, ly.k_norm = g("attention.q_norm.weight"), g("attention.k_norm.weight")
            ly.w_proj, ly.b_proj = g("attention.projection_layer.weight"), g("attention.projection_layer.bias")
            ly.lambda_1, ly.lambda_2 = g("lambda_1"), g("lambda_2")
            ly.w_fc1, ly.b_fc1 = g("mlp.fc1.weight"), g("mlp.fc1.bias")
            ly.w_fc2, ly.b_fc2 = g("mlp.fc2.weight"), g("mlp.fc2.bias")
            # LayerNorm as spar's adaln_layernorm (x_hat * (1 + s) + bias, into a reused buffer): s = weight - 1
            ly.ln1_s, ly.ln2_s = ((ly.ln1_w - 1, ly.ln2_w - 1) if vcfg.norm_type == "layer_norm" else (None, None))
            self.layers.append(ly)
        self.post_w, self.post_b = w.get("layernorm.weight"), w.get("layernorm.bias")
        self._layouts: dict[int, object] = {}
        self.act_inplace = _ACTS_INPLACE[vcfg.hidden_act]
        self.workspace = Workspace()   # the CPU forward's reused intermediates (see Workspace)

    def _norm(self, x, weight, bias, scale_m1=None, out=None):
        """LayerNorm / RMSNorm of ``x [N, C]``; a LayerNorm with ``out`` (and ``scale_m1 = weight - 1``)
        writes into it."""
        if self.cfg.norm_type == "layer_norm":
            if out is not None:
                return sk.adaln_layernorm(x[None], bias, scale_m1, eps=self.cfg.layer_norm_eps, out=out[None])[0]
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.cfg.layer_norm_eps)
        return sk.rms_norm(x, weight, self.cfg.layer_norm_eps)

    def _layout(self, n_images: int):
        if n_images not in self._layouts:   # full attention within each image; built once per batch size
            T = self.cfg.num_patches + 1
            self._layouts[n_images] = sk.AttentionLayout.from_segments([[("full", T)]] * n_images, device=self.device)
        return self._layouts[n_images]

    def embed(self, pixel_values: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
        """Patch + [CLS] + position embeddings: ``[n * (1 + P), C]`` packed (a new tensor; ``ws``
        holds the CPU path's intermediates)."""
        n, c_in = pixel_values.shape[:2]
        C = self.cfg.hidden_size
        pv = pixel_values.to(self.dtype)
        if pv.device.type == "cpu":     # stride = kernel: the conv is one GEMM over the flattened patches
            (gh, gw), (ph, pw) = self.cfg.grid, self.cfg.patch_size
            src = pv.reshape(n, c_in, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
            shape = (n * gh * gw, c_in * ph * pw)
            rows = src.reshape(shape) if ws is None else ws.get("rows", shape, self.dtype, pv.device).view(
                src.shape).copy_(src).view(shape)
            out = None if ws is None else ws.get("patches", (n * gh * gw, C), self.dtype, pv.device)
            patches = linear(rows, self.patch_w.reshape(C, -1), self.patch_b, out=out).view(n, gh * gw, C)
        else:
            patches = F.conv2d(pv, self.patch_w, self.patch_b, stride=self.cfg.patch_size).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(n, 1, C), patches], dim=1)                          # [n, 1 + P, C]
        if self.pos is not None:
            x += self.pos
        return x.reshape(-1, C)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n, 3, H, W]`` (H, W = the config's image size) -> ``[n, 1 + P, C]`` features."""
        cfg = self.cfg
        if (not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4
                or tuple(pixel_values.shape[1:]) != (cfg.num_channels, *cfg.image_size)):
            raise ValueError(f"pixel_values: expected [n, {cfg.num_channels}, {cfg.image_size[0]}, "
                             f"{cfg.image_size[1]}], got {_fmt(pixel_values)}")
        if pixel_values.shape[0] < 1:
            raise ValueError("pixel_values: expected at least one image")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values: expected a floating-point tensor, got {pixel_values.dtype}")
        n = pixel_values.shape[0]
        T, C, H = cfg.num_patches + 1, cfg.hidden_size, cfg.num_attention_heads
        d = C // H
        dev = torch.device(self.device)
        # on the CPU without autograd the intermediates live in reused buffers (see Workspace)
        ws = self.workspace if dev.type == "cpu" and not torch.is_grad_enabled() else None
        h = self.embed(pixel_values.to(self.device), ws)
        h3 = h[None]                                 # [1, n(1 + P), C] view for gated_residual (in place)
        N = h.shape[0]
        layout, scale = self._layout(n), d ** -0.5

        def buf(name, *shape):
            return None if ws is None else ws.get(name, shape, self.dtype, dev)
        for ly in self.layers[:self.run_layers]:
            a = self._norm(h, ly.ln1_w, ly.ln1_b, ly.ln1_s, buf("norm", N, C))
            qkv = linear(a, ly.w_qkv, ly.b_qkv, out=buf("qkv", N, 3 * C))
            if ly.q_norm is None:
                q, k, v = split_heads(qkv, H, d, out=buf("heads", 3, H, N, d))
            else:                       # RMSNorm over all heads together, as transformers does
                q = sk.rms_norm(qkv[:, :C], ly.q_norm, 1e-6).reshape(-1, H, d)
                k = sk.rms_norm(qkv[:, C:2 * C], ly.k_norm, 1e-6).reshape(-1, H, d)
                v = qkv[:, 2 * C:].reshape(-1, H, d)
            o = sk.hybrid_attention(q, k, v, layout, softmax_scale=scale, out=buf("attn", N, H, d))
            attn = linear(o.view(N, C), ly.w_proj, ly.b_proj, out=buf("out", N, C))
            sk.gated_residual(h3, attn[None], ly.lambda_1, out=h3)       # h += lambda_1 * attn
            a = self._norm(h, ly.ln2_w, ly.ln2_b, ly.ln2_s, buf("norm", N, C))
            m = linear(a, ly.w_fc1, ly.b_fc1, out=buf("mlp", N, ly.w_fc1.shape[0]))
            m = self.act(m) if ws is None else self.act_inplace(m)
            m = linear(m, ly.w_fc2, ly.b_fc2, out=buf("out", N, C))
            sk.gated_residual(h3, m[None], ly.lambda_2, out=h3)          # h += lambda_2 * mlp
        if self.final_norm and self.post_w is not None:
            h = F.layer_norm(h, (C,), self.post_w, self.post_b, cfg.layer_norm_eps)
        return h.view(n, T, C)

    __call__ = forward


# ---------------------------------------------------------------------------------------------
# MLLM

_NEW_STYLE_PREFIXES = (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                       ("model.multi_modal_projector.", "multi_modal_projector."),
                       ("lm_head.", "language_model.lm_head."))


def _is_internvl(config: Mapping) -> bool:
    return "vision_config" in config or config.get("model_type") == "internvl"


def _text_config(config: Mapping) -> Qwen2Config:
    if not _is_internvl(config):
        return Qwen2Config.from_dict(config)
    if "text_config" not in config:
        raise CheckpointError("InternVL config: text_config is missing")
    text = dict(config["text_config"])
    # the top-level flag decides, as for transformers' model; absent, it is transformers' default (True)
    text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", True))
    return Qwen2Config.from_dict(text)


def _internvl_fields(config: Mapping) -> tuple[InternVisionConfig, float, int, str, int]:
    vcfg = InternVisionConfig.from_dict(config["vision_config"])
    ratio = float(config.get("downsample_ratio", 0.5))
    r = round(1 / ratio) if ratio > 0 else 0
    if r < 1 or abs(r * ratio - 1) > 1e-6 or any(g % r for g in vcfg.grid):
        raise CheckpointError(f"InternVL config: downsample_ratio {ratio} must be 1/r with r dividing the "
                              f"{vcfg.grid} patch grid")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise CheckpointError(f"InternVL config: vision_feature_select_strategy {strategy!r} is not supported "
                              "(only 'default': the [CLS] token is dropped)")
    layer = config.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise CheckpointError(f"InternVL config: vision_feature_layer must be one int, got {layer!r}")
    image_token_id = config.get("image_token_id", config.get("image_token_index"))
    if not isinstance(image_token_id, int):
        raise CheckpointError(f"InternVL config: image_token_id must be an int, got {image_token_id!r}")
    return vcfg, ratio, layer, config.get("projector_hidden_act", "gelu"), image_token_id


def mllm_param_shapes(config_dict: Mapping) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an MLLM checkpoint: InternVL (``language_model.model.*``,
    ``language_model.lm_head.weight`` unless tied, ``vision_tower.*``, ``multi_modal_projector.*``)
    or a text-only ``Qwen2ForCausalLM`` (``model.*``, ``lm_head.weight`` unless tied)."""
    text = _text_config(config_dict)
    if not _is_internvl(config_dict):
        return qwen2_lm_param_shapes(text)
    vcfg, ratio, _, _, _ = _internvl_fields(config_dict)
    shapes = qwen2_lm_param_shapes(text, prefix="language_model.")
    shapes.update(internvit_param_shapes(vcfg))
    shapes.update(_projector_shapes(vcfg.hidden_size * round(1 / ratio) ** 2, text.hidden_size))
    return shapes


def random_weights(config_dict: Mapping, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random fp32 CPU weights for ``config_dict`` in the checkpoint's names (:func:`mllm_param_shapes`),
    close to transformers' initialization (normal(0, 0.02) matrices and embeddings, unit norm
    weights, ``layer_scale_init_value`` layer scales) except that biases, [CLS] and position
    embeddings get normal(0, 0.02) values instead of zeros."""
    init_std = 0.02
    vision = config_dict.get("vision_config", {}) if _is_internvl(config_dict) else {}
    scale = float(vision.get("layer_scale_init_value", 0.1))
    out = {}
    for name, shape in mllm_param_shapes(config_dict).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lambda_1", "lambda_2"):
            t = torch.full(shape, scale)
        elif leaf == "weight" and len(shape) == 1:            # norms
            t = torch.ones(shape)
        else:                                                 # matrices, embeddings, biases, [CLS], positions
            t = torch.randn(shape, generator=generator) * init_std
        out[name] = t
    return out


def _normalize_keys(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept the InternVL key layout of newer transformers saves (``model.language_model.*``...)."""
    if not any(k.startswith("model.language_model.") for k in weights):
        return dict(weights)
    out, source = {}, {}
    for key, v in weights.items():
        k = key
        for old, new in _NEW_STYLE_PREFIXES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        if k in out:  # both spellings of one tensor: which to load is not ours to guess
            raise CheckpointError(f"weights: {source[k]!r} and {key!r} are the same tensor {k!r} under InternVL's two key "
                             "layouts; a checkpoint must use one")
        out[k], source[k] = v, key
    return out


class MLLM:
    """The MLLM of a SPAR checkpoint: InternVL (vision + Qwen2 LLM) or a text-only Qwen2 LLM.

    Args:
        config_dict: the folder's ``config.json`` as a dict (InternVL or Qwen2).
        weights: the checkpoint's tensors in its own names (see :func:`mllm_param_shapes`);
            device and dtype are taken as given.

    Attributes:
        config: the LLM's :class:`~spar_runtime.qwen2.Qwen2Config`; ``lm``: the
        :class:`~spar_runtime.qwen2.Qwen2LM`; ``vision``: the :class:`InternVisionTower` (None for
        text-only); ``image_token_id`` / ``image_seq_length`` (None for text-only).
    """

    def __init__(self, config_dict: Mapping, weights: Mapping[str, torch.Tensor], *, where: str = "MLLM weights"):
        self.config_dict = dict(config_dict)
        self.config = _text_config(config_dict)
        weights = _normalize_keys(weights)
        expected = mllm_param_shapes(config_dict)
        head = "language_model.lm_head.weight" if _is_internvl(config_dict) else "lm_head.weight"
        if head in weights:             # a stored head is used even when tied (see Qwen2LM)
            expected[head] = (self.config.vocab_size, self.config.hidden_size)
        check_state_dict(weights, expected, where)
        if not _is_internvl(config_dict):
            self.lm = Qwen2LM(self.config, weights, where=where)
            self.vision = None
            self.image_token_id = self.image_seq_length = None
            self.device, self.dtype = self.lm.device, self.lm.dtype
            return
        vcfg, ratio, layer, proj_act, image_token_id = _internvl_fields(config_dict)
        strip = lambda p: {k[len(p):]: v for k, v in weights.items() if k.startswith(p)}  # noqa: E731
        self.lm = Qwen2LM(self.config, strip("language_model."), where=where)
        self.vision = InternVisionTower(vcfg, strip("vision_tower."), feature_layer=layer)
        proj = strip("multi_modal_projector.")
        self.proj_ln_w, self.proj_ln_b = proj["layer_norm.weight"], proj["layer_norm.bias"]
        self.proj_w1, self.proj_b1 = proj["linear_1.weight"], proj["linear_1.bias"]
        self.proj_w2, self.proj_b2 = proj["linear_2.weight"], proj["linear_2.bias"]
        self.proj_act = _act(proj_act, "InternVL config projector_hidden_act")
        self.proj_act_inplace = _ACTS_INPLACE[proj_act]
        self.proj_ln_s = self.proj_ln_w - 1      # the LayerNorm as adaln_layernorm on the CPU (see the tower)
        self.downsample_ratio = ratio
        vocab = self.config.vocab_size
        if isinstance(image_token_id, bool) or not 0 <= image_token_id < vocab:
            raise CheckpointError(f"InternVL config: image_token_id {image_token_id} must be a token of the text "
                                  f"vocabulary [0, {vocab})")
        self.image_token_id = image_token_id
        r = round(1 / ratio)
        self.image_seq_length = (vcfg.grid[0] // r) * (vcfg.grid[1] // r)
        if config_dict.get("image_seq_length", self.image_seq_length) != self.image_seq_length:
            raise CheckpointError(f"InternVL config: image_seq_length {config_dict['image_seq_length']} disagrees "
                                  f"with the tokens one image yields ({self.image_seq_length})")
        self.device, self.dtype = self.lm.device, self.lm.dtype

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> "MLLM":
        """Load an ``InternVLForConditionalGeneration`` or ``Qwen2ForCausalLM`` ``save_pretrained`` folder."""
        folder = os.fspath(folder)
        config = read_json(os.path.join(folder, "config.json"))
        return cls(config, load_safetensors_dir(folder, device=device, dtype=dtype), where=folder)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` token ids -> ``[N, D]`` embeddings (placeholders get the image token's embedding)."""
        return self.lm.embed_tokens(ids)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n, 3, S, S]`` -> ``[n * image_seq_length, D]``: vision tower, pixel shuffle, projector."""
        if self.vision is None:
            raise ValueError("pixel_values: this MLLM is text-only (a Qwen2ForCausalLM folder, no vision tower)")
        feats = self.vision(pixel_values)[:, 1:]                                   # drop [CLS]
        n, P, C = feats.shape
        (gh, gw), r = self.vision.cfg.grid, round(1 / self.downsample_ratio)
        rows, dev = n * self.image_seq_length, torch.device(self.device)
        if dev.type != "cpu":
            x = pixel_shuffle(feats.reshape(n, gh, gw, C), self.downsample_ratio).reshape(rows, -1)
            x = F.layer_norm(x, (x.shape[-1],), self.proj_ln_w, self.proj_ln_b, 1e-5)
            return linear(self.proj_act(linear(x, self.proj_w1, self.proj_b1)), self.proj_w2, self.proj_b2)
        # CPU: the intermediates in the tower's reused buffers (see Workspace)
        ws, dt = self.vision.workspace, feats.dtype
        x = pixel_shuffle(feats.reshape(n, gh, gw, C), self.downsample_ratio,
                          out=ws.get("shuffled", (n, gh // r, gw // r, r * r * C), dt, dev)).view(rows, -1)
        x = sk.adaln_layernorm(x[None], self.proj_ln_b, self.proj_ln_s, eps=1e-5,
                               out=ws.get("proj_norm", (1,) + x.shape, dt, dev))[0]
        x = self.proj_act_inplace(linear(x, self.proj_w1, self.proj_b1,
                                         out=ws.get("proj_hidden", (rows, self.proj_w1.shape[0]), dt, dev)))
        return linear(x, self.proj_w2, self.proj_b2)

    def prompt_embeddings(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of a prompt (1-D ids, ``[1, N]``, or a list of ints) with its image
        placeholders replaced, in order, by the features of ``pixel_values`` (``n *
        image_seq_length`` placeholders expected)."""
        if isinstance(input_ids, (list, tuple)) and all(isinstance(i, int) for i in input_ids):
            input_ids = torch.tensor(input_ids, dtype=torch.int64)
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]                 # transformers-style [1, N]
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.numel() == 0 \
                or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected a non-empty 1-D integer tensor, got {_fmt(input_ids)}")
        V = self.config.vocab_size
        host = input_ids.cpu()  # checked and searched on the host (free for the usual CPU ids)
        if int(host.min()) < 0 or int(host.max()) >= V:
            raise ValueError(f"input_ids: token ids must lie in [0, {V}), got [{int(host.min())}, {int(host.max())}]")
        x = self.embed_tokens(self._to_device(host))
        img_rows = (host == self.image_token_id).nonzero().squeeze(1) if self.image_token_id is not None else None
        n_placeholders = 0 if img_rows is None else img_rows.numel()
        n_expected = 0 if pixel_values is None else pixel_values.shape[0] * (self.image_seq_length or 0)
        if pixel_values is not None and self.vision is None:
            raise ValueError("pixel_values: this MLLM is text-only (no vision tower); pass None")
        if n_placeholders != n_expected:
            raise ValueError(f"input_ids: holds {n_placeholders} image tokens (id {self.image_token_id}) but "
                             f"pixel_values gives {n_expected} ({0 if pixel_values is None else pixel_values.shape[0]} "
                             f"image(s) x {self.image_seq_length} tokens)")
        if n_expected:
            x.index_copy_(0, self._to_device(img_rows), self.encode_images(pixel_values).to(x.dtype))
        return x

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the model's device; on CUDA through pinned memory without blocking."""
        if torch.device(self.device).type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def describe(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor, max_new_tokens: int,
                 do_sample: bool = False, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                 generator: torch.Generator | None = None, **engine) -> list[int]:
        """Image understanding: the prompt (with its image placeholders) prefilled into a KV cache,
        then ``max_new_tokens`` decoded greedily (or sampled). Returns the new token ids (ending with
        the EOS id if one was emitted; the config's EOS ids unless ``eos_token_id`` is given).
        ``engine``: ``plans`` / ``graphs`` of :meth:`Qwen2LM.generate` (the pipeline's engine)."""
        x = self.prompt_embeddings(input_ids, pixel_values)
        return self.lm.generate(x, [x.shape[0]], max_new_tokens, do_sample=do_sample, temperature=temperature,
                                top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
                                **engine)[0]
