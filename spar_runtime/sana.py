"""SANA DiT (diffusers' ``SanaTransformer2DModel``) for inference on packed, unpadded context.

Two calls per generation::

    ctx = dit.prepare_context(context, ctx_lens)      # once: caption projection + norm, and every
                                                      # block's cross-attention K/V
    v = dit(x, timestep, ctx)                         # every step: velocity [B, C, H, W]

``context`` is ``[sum(ctx_lens), caption_channels]``: the context tokens of the B samples one
after another, no padding. ``dit(x, t, ctx)[b]`` equals diffusers'
``SanaTransformer2DModel(x[b:b+1], encoder_hidden_states=padded context,
encoder_attention_mask=mask, timestep=t[b:b+1]).sample`` for each sample (padded keys get weight
exp(-10000) = 0 there; here they do not exist).

One step, per block (x is ``[B, N, D]`` rows of the patch-embedded latent)::

    shift/scale/gate (6 x [B, D])  = scale_shift_table + t_mod              adaLN-single
    x += gate_msa * to_out(linear_attention(qkv(adaln_layernorm(x, shift_msa, scale_msa))))
    x += to_out(hybrid_attention(to_q(x), K_l, V_l, AttentionLayout.cross))  K/V from prepare_context
    x += gate_mlp * conv_point(dwconv_glu(silu(conv_inverted(adaln_layernorm(x, ...)))))

through ``spar_kernels``' ``adaln_layernorm``, ``linear_attention``, ``hybrid_attention``,
``dwconv_glu``, ``gated_residual`` and ``rms_norm``; the 1x1 convolutions and projections are
GEMMs (``F.linear``); q/k/v of the self-attention are one GEMM.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from spar_kernels import (AttentionLayout, adaln_layernorm, dwconv_glu, gated_residual, hybrid_attention,
                          linear_attention, rms_norm)
from spar_kernels.attention import HEAD_DIMS as _ATTN_HEAD_DIMS
from .fp8 import linear, wants_fp8
from .loading import check_config_class, check_state_dict, load_component

__all__ = ["SanaConfig", "SanaContext", "SanaBlock", "SanaDiT", "sana_param_shapes", "random_weights"]

_TIME_CHANNELS = 256        # Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
_MAX_PERIOD = 10000
_CAPTION_NORM_EPS = 1e-5    # caption_norm = RMSNorm(inner_dim, eps=1e-5)
_QK_NORM_EPS = 1e-5         # Attention's eps for qk_norm="rms_norm_across_heads"
_OUT_NORM_EPS = 1e-6        # norm_out = SanaModulatedNorm(eps=1e-6)
_LINEAR_ATTN_EPS = 1e-15    # SanaLinearAttnProcessor2_0
_QK_NORMS = (None, "rms_norm_across_heads")


@dataclass(frozen=True)
class SanaConfig:
    """The fields of a diffusers ``SanaTransformer2DModel`` config that shape the computation."""

    in_channels: int
    out_channels: int
    num_attention_heads: int
    attention_head_dim: int
    num_layers: int
    num_cross_attention_heads: int
    cross_attention_head_dim: int
    cross_attention_dim: int
    caption_channels: int
    mlp_ratio: float
    attention_bias: bool
    sample_size: int
    patch_size: int
    norm_elementwise_affine: bool
    norm_eps: float
    interpolation_scale: float | None
    qk_norm: str | None

    @classmethod
    def from_dict(cls, d: dict) -> "SanaConfig":
        check_config_class(d, "SanaTransformer2DModel")
        if d.get("guidance_embeds", False):
            raise ValueError("guidance_embeds: True (SANA-Sprint guidance embedding) is not supported")
        qk_norm = d.get("qk_norm")
        if qk_norm not in _QK_NORMS:
            raise ValueError(f"qk_norm: {qk_norm!r} is not supported (expected one of {_QK_NORMS})")
        in_ch = int(d.get("in_channels", 32))
        interp = d.get("interpolation_scale")
        cfg = cls(
            in_channels=in_ch,
            out_channels=int(d.get("out_channels") or in_ch),
            num_attention_heads=int(d.get("num_attention_heads", 70)),
            attention_head_dim=int(d.get("attention_head_dim", 32)),
            num_layers=int(d.get("num_layers", 20)),
            num_cross_attention_heads=int(d.get("num_cross_attention_heads") or 0),
            cross_attention_head_dim=int(d.get("cross_attention_head_dim") or 0),
            cross_attention_dim=int(d.get("cross_attention_dim") or 0),
            caption_channels=int(d.get("caption_channels", 2304)),
            mlp_ratio=float(d.get("mlp_ratio", 2.5)),
            attention_bias=bool(d.get("attention_bias", False)),
            sample_size=int(d.get("sample_size", 32)),
            patch_size=int(d.get("patch_size", 1)),
            norm_elementwise_affine=bool(d.get("norm_elementwise_affine", False)),
            norm_eps=float(d.get("norm_eps", 1e-6)),
            interpolation_scale=None if interp is None else float(interp),
            qk_norm=qk_norm,
        )
        for f in ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
                  "caption_channels", "patch_size", "sample_size"):
            if getattr(cfg, f) < 1:
                raise ValueError(f"{f}: expected a positive int, got {getattr(cfg, f)}")
        if cfg.num_cross_attention_heads < 1 or cfg.cross_attention_head_dim < 1 or cfg.cross_attention_dim < 1:
            raise ValueError("num_cross_attention_heads, cross_attention_head_dim, cross_attention_dim: a SANA DiT "
                             f"without cross-attention is not supported, got {cfg.num_cross_attention_heads}, "
                             f"{cfg.cross_attention_head_dim}, {cfg.cross_attention_dim}")
        if cfg.cross_attention_dim != cfg.inner_dim:
            raise ValueError(f"cross_attention_dim: expected the model width num_attention_heads * "
                             f"attention_head_dim = {cfg.inner_dim} (the projected caption's width), "
                             f"got {cfg.cross_attention_dim}")
        if cfg.ff_hidden < 1:
            raise ValueError(f"mlp_ratio: {cfg.mlp_ratio} gives an empty feed-forward")
        return cfg

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def cross_inner_dim(self) -> int:
        return self.num_cross_attention_heads * self.cross_attention_head_dim

    @property
    def ff_hidden(self) -> int:
        return int(self.mlp_ratio * self.inner_dim)


def sana_param_shapes(config_dict: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a ``SanaTransformer2DModel`` state dict (as ``save_pretrained`` writes it)."""
    c = SanaConfig.from_dict(config_dict)
    D, Dc, Fh, p = c.inner_dim, c.cross_inner_dim, c.ff_hidden, c.patch_size
    s = {"patch_embed.proj.weight": (D, c.in_channels, p, p), "patch_embed.proj.bias": (D,),
         "time_embed.emb.timestep_embedder.linear_1.weight": (D, _TIME_CHANNELS),
         "time_embed.emb.timestep_embedder.linear_1.bias": (D,),
         "time_embed.emb.timestep_embedder.linear_2.weight": (D, D),
         "time_embed.emb.timestep_embedder.linear_2.bias": (D,),
         "time_embed.linear.weight": (6 * D, D), "time_embed.linear.bias": (6 * D,),
         "caption_projection.linear_1.weight": (D, c.caption_channels), "caption_projection.linear_1.bias": (D,),
         "caption_projection.linear_2.weight": (D, D), "caption_projection.linear_2.bias": (D,),
         "caption_norm.weight": (D,),
         "scale_shift_table": (2, D),
         "proj_out.weight": (p * p * c.out_channels, D), "proj_out.bias": (p * p * c.out_channels,)}
    for i in range(c.num_layers):
        b = f"transformer_blocks.{i}"
        s[f"{b}.scale_shift_table"] = (6, D)
        for n in ("to_q", "to_k", "to_v"):
            s[f"{b}.attn1.{n}.weight"] = (D, D)
            if c.attention_bias:
                s[f"{b}.attn1.{n}.bias"] = (D,)
        s[f"{b}.attn1.to_out.0.weight"] = (D, D)
        s[f"{b}.attn1.to_out.0.bias"] = (D,)
        s[f"{b}.attn2.to_q.weight"], s[f"{b}.attn2.to_q.bias"] = (Dc, D), (Dc,)
        for n in ("to_k", "to_v"):
            s[f"{b}.attn2.{n}.weight"], s[f"{b}.attn2.{n}.bias"] = (Dc, c.cross_attention_dim), (Dc,)
        s[f"{b}.attn2.to_out.0.weight"], s[f"{b}.attn2.to_out.0.bias"] = (D, Dc), (D,)
        if c.qk_norm is not None:
            for a, width in (("attn1", D), ("attn2", Dc)):
                s[f"{b}.{a}.norm_q.weight"] = s[f"{b}.{a}.norm_k.weight"] = (width,)
        if c.norm_elementwise_affine:
            s[f"{b}.norm2.weight"], s[f"{b}.norm2.bias"] = (D,), (D,)
        s[f"{b}.ff.conv_inverted.weight"], s[f"{b}.ff.conv_inverted.bias"] = (2 * Fh, D, 1, 1), (2 * Fh,)
        s[f"{b}.ff.conv_depth.weight"], s[f"{b}.ff.conv_depth.bias"] = (2 * Fh, 1, 3, 3), (2 * Fh,)
        s[f"{b}.ff.conv_point.weight"] = (D, Fh, 1, 1)
    return s


def random_weights(config_dict: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random float32 CPU weights of the right names and shapes (fan-in scaled matrices, small
    biases, norm weights near 1, modulation tables ~ N(0, 1/D) as diffusers initialises them)."""
    D = SanaConfig.from_dict(config_dict).inner_dim
    out = {}
    for name, shape in sana_param_shapes(config_dict).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "scale_shift_table":
            out[name] = torch.randn(shape, generator=generator) / D ** 0.5
        elif "norm" in name:
            out[name] = (1.0 if leaf == "weight" else 0.0) + 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            out[name] = 0.02 * torch.randn(shape, generator=generator)
        else:
            out[name] = torch.randn(shape, generator=generator) / math.prod(shape[1:]) ** 0.5
    return out


@dataclass
class SanaContext:
    """What :meth:`SanaDiT.prepare_context` computes once per generation call.

    Attributes:
        ctx_lens: context tokens per sample.
        kv: ``[num_layers, 2, sum(ctx_lens), cross_heads, head_dim]``: every block's
            cross-attention keys (``kv[l, 0]``) and values (``kv[l, 1]``), packed; head_dim is
            ``cross_attention_head_dim``.
        context: ``[sum(ctx_lens), D]``: the projected, normalised context.
    """

    ctx_lens: tuple[int, ...]
    kv: torch.Tensor
    context: torch.Tensor
    _layouts: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.ctx_lens)

    def layout(self, tokens_per_sample: int) -> AttentionLayout:
        """The cross-attention layout for ``tokens_per_sample`` image tokens per sample (built once)."""
        lay = self._layouts.get(tokens_per_sample)
        if lay is None:
            lay = AttentionLayout.cross([tokens_per_sample] * self.batch_size, list(self.ctx_lens),
                                        device=self.kv.device)
            self._layouts[tokens_per_sample] = lay
        return lay


def _cross_attn_dim(c: SanaConfig) -> int:
    """The cross-attention's head dim, checked against what hybrid_attention takes (8 to 128)."""
    dc = c.cross_attention_head_dim
    if dc not in _ATTN_HEAD_DIMS:
        raise ValueError(f"cross_attention_head_dim: {dc} is outside the head dims hybrid_attention takes "
                         f"({min(_ATTN_HEAD_DIMS)} to {max(_ATTN_HEAD_DIMS)})")
    return dc


class SanaBlock:
    """One ``SanaTransformerBlock``: its weights re-laid out for the fused path, and its step.

    Args:
        c: the DiT's :class:`SanaConfig`.
        w: a state dict holding the block's tensors under ``prefix`` (diffusers' names:
            ``{prefix}attn1.to_q.weight``, ...; ``prefix="transformer_blocks.3."`` in a
            ``SanaTransformer2DModel`` state dict, ``""`` for a lone block's).
        attn_dim: the head dim the cross-attention runs with (``cross_attention_head_dim``).
    """

    def __init__(self, c: SanaConfig, w: dict, prefix: str, attn_dim: int | None = None):
        b = prefix
        self.config = c
        self.attn_dim = _cross_attn_dim(c)
        if attn_dim is not None and int(attn_dim) != self.attn_dim:
            raise ValueError(f"attn_dim: expected the config's cross_attention_head_dim {self.attn_dim}, got {attn_dim}")
        self.table = w[f"{b}scale_shift_table"]                                    # [6, D]
        self.w_qkv = torch.cat([w[f"{b}attn1.to_{n}.weight"] for n in "qkv"], 0)    # [3D, D]
        self.b_qkv = (torch.cat([w[f"{b}attn1.to_{n}.bias"] for n in "qkv"], 0) if c.attention_bias else None)
        self.w_o1, self.b_o1 = w[f"{b}attn1.to_out.0.weight"], w[f"{b}attn1.to_out.0.bias"]
        self.w_q2, self.b_q2 = w[f"{b}attn2.to_q.weight"], w[f"{b}attn2.to_q.bias"]
        # the context's keys and values: one GEMM, run once per generation (cross_kv)
        self.w_kv2 = torch.cat([w[f"{b}attn2.to_k.weight"], w[f"{b}attn2.to_v.weight"]], 0)      # [2 Dc, D]
        self.b_kv2 = torch.cat([w[f"{b}attn2.to_k.bias"], w[f"{b}attn2.to_v.bias"]], 0)
        self.w_o2, self.b_o2 = w[f"{b}attn2.to_out.0.weight"], w[f"{b}attn2.to_out.0.bias"]
        self.qk_norm = None
        if c.qk_norm is not None:
            self.qk_norm = {a: (w[f"{b}{a}.norm_q.weight"], w[f"{b}{a}.norm_k.weight"]) for a in ("attn1", "attn2")}
        self.norm2 = (w[f"{b}norm2.weight"], w[f"{b}norm2.bias"]) if c.norm_elementwise_affine else None
        Fh, D = c.ff_hidden, c.inner_dim
        self.w_inv, self.b_inv = w[f"{b}ff.conv_inverted.weight"].reshape(2 * Fh, D), w[f"{b}ff.conv_inverted.bias"]
        self.w_dw, self.b_dw = w[f"{b}ff.conv_depth.weight"], w[f"{b}ff.conv_depth.bias"]
        self.w_pt = w[f"{b}ff.conv_point.weight"].reshape(D, Fh)

    def cross_kv(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """The cross-attention keys and values of the projected context ``x [n, D]`` into
        ``out [2, n, heads, attn_dim]`` (columns past the head dim are left as they are: zero)."""
        c = self.config
        n, Hc, dc = x.shape[0], c.num_cross_attention_heads, c.cross_attention_head_dim
        kv = linear(x, self.w_kv2, self.b_kv2).view(n, 2, Hc, dc)
        if self.qk_norm is not None:
            k = rms_norm(kv[:, 0].reshape(n, Hc * dc), self.qk_norm["attn2"][1], _QK_NORM_EPS)
            kv[:, 0].copy_(k.view(n, Hc, dc))
        out[..., :dc].copy_(kv.transpose(0, 1))

    def modulation(self, t_mod: torch.Tensor) -> torch.Tensor:
        """This block's six modulation vectors ``[B, 6, D]`` from adaLN-single's ``t_mod [B, 6, D]``
        (:class:`SanaDiT` adds every block's table in one op per step instead)."""
        return self.table[None] + t_mod

    def __call__(self, hs: torch.Tensor, mod: torch.Tensor, kv: torch.Tensor, layout: AttentionLayout,
                 h: int, w: int) -> torch.Tensor:
        """One step of the block on ``hs [B, N, D]`` (updated in place and returned).

        ``mod [B, 6, D]``: :meth:`modulation` (shift, scale, gate of the attention, then of the
        feed-forward); ``kv [2, n, heads, attn_dim]``: this block's slice of
        :attr:`SanaContext.kv`; ``layout``: the cross-attention layout (N rows per sample);
        ``h x w = N``: the token grid. 15 kernel launches without qk-norm (two norms with their
        modulation, five GEMMs and a bias-free one, the two attentions, the depthwise conv + GLU,
        two gated residuals, SiLU and the cross-attention residual add). With FP8 weights
        (:func:`~spar_runtime.fp8.wants_fp8`) the ops feeding the qkv, out-projection, cross query,
        conv_inverted and conv_point GEMMs write FP8 (``fp8=True``): one ``quantize_fp8`` launch is
        left (the cross-attention output's), so 16."""
        c = self.config
        B, N, D = hs.shape
        dt = hs.dtype
        Hs, ds = c.num_attention_heads, c.attention_head_dim
        Hc, dc = c.num_cross_attention_heads, c.cross_attention_head_dim
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)
        # 1. self-attention: ReLU linear attention
        y = adaln_layernorm(hs, shift_msa, scale_msa, eps=c.norm_eps, fp8=wants_fp8(self.w_qkv))
        qkv = linear(y, self.w_qkv, self.b_qkv, dtype=dt).view(B, N, 3, D)
        q, k, v = qkv.unbind(2)
        if self.qk_norm is not None:
            q = rms_norm(q, self.qk_norm["attn1"][0], _QK_NORM_EPS)
            k = rms_norm(k, self.qk_norm["attn1"][1], _QK_NORM_EPS)
        a = linear_attention(q.unflatten(-1, (Hs, ds)), k.unflatten(-1, (Hs, ds)), v.unflatten(-1, (Hs, ds)),
                             eps=_LINEAR_ATTN_EPS, fp8=wants_fp8(self.w_o1))
        y = linear(_rows(a, (B, N, D)), self.w_o1, self.b_o1, dtype=dt)
        if hs.dtype == torch.float16:  # as SanaLinearAttnProcessor2_0
            y.clamp_(-65504, 65504)
        if wants_fp8(self.w_q2):  # the cross query's input, FP8, from the residual update
            hs, *hq = gated_residual(hs, y, gate_msa, out=hs, fp8=True)
        else:
            hq = hs = gated_residual(hs, y, gate_msa, out=hs)
        # 2. cross-attention to the packed context (K/V from SanaDiT.prepare_context)
        q2 = linear(_rows(hq, (B * N, D)), self.w_q2, self.b_q2, dtype=dt)
        if self.qk_norm is not None:
            q2 = rms_norm(q2, self.qk_norm["attn2"][0], _QK_NORM_EPS)
        q2 = q2.view(B * N, Hc, dc)
        o = hybrid_attention(q2, kv[0], kv[1], layout, softmax_scale=dc ** -0.5)
        hs.view(B * N, D).add_(linear(o.reshape(B * N, Hc * dc), self.w_o2, self.b_o2))
        # 3. Mix-FFN: 1x1 conv -> SiLU -> depthwise 3x3 + GLU -> 1x1 conv
        if self.norm2 is None:
            sh, sc = shift_mlp, scale_mlp
        else:  # LayerNorm affine folded into the modulation: ln*w*(1+s) + b*(1+s) + shift
            one_s = 1 + scale_mlp.float()
            sc = self.norm2[0].float() * one_s - 1
            sh = self.norm2[1].float() * one_s + shift_mlp.float()
        y = adaln_layernorm(hs, sh, sc, eps=c.norm_eps, fp8=wants_fp8(self.w_inv))
        y = F.silu(linear(y, self.w_inv, self.b_inv, dtype=dt), inplace=True)
        y = dwconv_glu(y, self.w_dw, self.b_dw, h, w, fp8=wants_fp8(self.w_pt))
        y = linear(y, self.w_pt, dtype=dt)
        return gated_residual(hs, y, gate_mlp, out=hs)


def _rows(x, shape: tuple) -> torch.Tensor | tuple:
    """``x`` viewed as ``shape`` (tokens x features), or an FP8 ``(q, scales)`` pair likewise (the
    per-token scales as ``shape[:-1] + (1,)``)."""
    if isinstance(x, (tuple, list)):
        q, s = x
        return q.view(shape), s.view(*shape[:-1], 1)
    return x.view(shape)


class SanaDiT:
    """SANA DiT on packed context (see the module docstring).

    Args:
        config_dict: a ``SanaTransformer2DModel`` config (its ``config.json`` as a dict).
        weights: its state dict (names as :func:`sana_param_shapes`), every tensor on one device
            in one floating dtype (the compute dtype).
    """

    def __init__(self, config_dict: dict, weights: dict[str, torch.Tensor]):
        self.config = c = SanaConfig.from_dict(config_dict)
        check_state_dict(weights, sana_param_shapes(config_dict), "SanaDiT weights")
        first = next(iter(weights.values()))
        self.device, self.dtype = first.device, first.dtype
        for name, t in weights.items():
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError(f"weights[{name!r}]: {t.dtype} on {t.device}, expected every tensor in "
                                 f"{self.dtype} on {self.device}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"weights: expected floating-point tensors, got {self.dtype}")
        w = weights
        D, p = c.inner_dim, c.patch_size
        self.w_patch = w["patch_embed.proj.weight"].reshape(D, c.in_channels * p * p)
        self.b_patch = w["patch_embed.proj.bias"]
        te = "time_embed.emb.timestep_embedder"
        self.w_t1, self.b_t1 = w[f"{te}.linear_1.weight"], w[f"{te}.linear_1.bias"]
        self.w_t2, self.b_t2 = w[f"{te}.linear_2.weight"], w[f"{te}.linear_2.bias"]
        self.w_tmod, self.b_tmod = w["time_embed.linear.weight"], w["time_embed.linear.bias"]
        self.w_c1, self.b_c1 = w["caption_projection.linear_1.weight"], w["caption_projection.linear_1.bias"]
        self.w_c2, self.b_c2 = w["caption_projection.linear_2.weight"], w["caption_projection.linear_2.bias"]
        self.caption_norm = w["caption_norm.weight"]
        self.out_table = w["scale_shift_table"]
        self.w_out, self.b_out = w["proj_out.weight"], w["proj_out.bias"]
        half = _TIME_CHANNELS // 2
        self._freqs = torch.exp(-math.log(_MAX_PERIOD) * torch.arange(half, dtype=torch.float32,
                                                                       device=self.device) / half)
        self._pos_embed: dict[tuple[int, int], torch.Tensor] = {}
        self._attn_dim = _cross_attn_dim(c)
        self.blocks = [SanaBlock(c, w, f"transformer_blocks.{i}.", self._attn_dim) for i in range(c.num_layers)]
        self._tables = torch.stack([blk.table for blk in self.blocks])             # [L, 6, D]: one add per step

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> "SanaDiT":
        """Load a diffusers ``SanaTransformer2DModel`` folder (``config.json`` +
        ``diffusion_pytorch_model.safetensors`` or a sharded index). ``dtype`` defaults to
        float32 on CPU and bfloat16 elsewhere."""
        config, weights = load_component(folder, "SanaTransformer2DModel", SanaConfig.from_dict, sana_param_shapes,
                                         device=device, dtype=dtype)
        return cls(config, weights)

    # -----------------------------------------------------------------------------------------
    # once per generation call

    def kv_shape(self, n_tokens: int) -> tuple[int, ...]:
        """The shape of :attr:`SanaContext.kv` for ``n_tokens`` packed context tokens."""
        c = self.config
        return (c.num_layers, 2, n_tokens, c.num_cross_attention_heads, self._attn_dim)

    @torch.no_grad()
    def prepare_context(self, context: torch.Tensor, ctx_lens, *, out: torch.Tensor | None = None,
                        layouts: dict | None = None) -> SanaContext:
        """Caption projection + caption RMSNorm + every block's cross-attention K/V, once.

        Args:
            context: ``[sum(ctx_lens), caption_channels]``, the samples' context tokens packed.
            ctx_lens: context tokens per sample (list of positive ints, one per sample the DiT
                will be called with, in the order of x's batch).
            out: optional contiguous buffer of :meth:`kv_shape` in the DiT's dtype that receives
                the K/V (the engine's plans keep one per plan).
            layouts: optional ``{tokens_per_sample: AttentionLayout}`` cross-attention layouts to
                use instead of building ``AttentionLayout.cross`` (a plan's, whose intervals
                carry the true context lengths inside padded context slots).
        """
        c = self.config
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"context: expected a torch.Tensor, got {type(context).__name__}")
        if context.dim() != 2 or context.shape[1] != c.caption_channels:
            raise ValueError(f"context: expected shape [total_tokens, {c.caption_channels}], "
                             f"got {tuple(context.shape)}")
        if not context.is_floating_point():
            raise ValueError(f"context: expected a floating-point tensor, got {context.dtype}")
        if context.device != self.device:
            raise ValueError(f"context: expected a tensor on {self.device} (the DiT's device), got {context.device}")
        if isinstance(ctx_lens, torch.Tensor) or hasattr(ctx_lens, "tolist"):
            ctx_lens = ctx_lens.tolist()  # a host copy: lengths are needed on the host once per call
        if not isinstance(ctx_lens, (list, tuple)) or not ctx_lens:
            raise ValueError(f"ctx_lens: expected a non-empty list of context lengths, got {ctx_lens!r}")
        lens = []
        for i, n in enumerate(ctx_lens):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"ctx_lens[{i}]: expected a positive int, got {n!r}")
            lens.append(int(n))
        if sum(lens) != context.shape[0]:
            raise ValueError(f"ctx_lens: sum {sum(lens)} does not match context's {context.shape[0]} tokens")
        x = context.to(self.dtype)
        x = linear(F.gelu(linear(x, self.w_c1, self.b_c1), approximate="tanh"), self.w_c2, self.b_c2)
        x = rms_norm(x, self.caption_norm, _CAPTION_NORM_EPS)
        n_tok = x.shape[0]
        if out is None:
            kv = torch.empty(self.kv_shape(n_tok), dtype=self.dtype, device=self.device)
        elif (not isinstance(out, torch.Tensor) or tuple(out.shape) != self.kv_shape(n_tok) or out.dtype != self.dtype
              or out.device != self.device or not out.is_contiguous()):
            raise ValueError(f"out: expected a contiguous {self.dtype} tensor of shape {self.kv_shape(n_tok)} on "
                             f"{self.device}, got {tuple(out.shape) if isinstance(out, torch.Tensor) else out!r}")
        else:
            kv = out
        for i, blk in enumerate(self.blocks):
            blk.cross_kv(x, kv[i])
        return SanaContext(ctx_lens=tuple(lens), kv=kv, context=x, _layouts=dict(layouts or {}))

    # -----------------------------------------------------------------------------------------
    # every step

    def _time_embedding(self, timestep: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """adaLN-single: (embedded_timestep [B, D], t_mod [B, 6D])."""
        t = timestep.to(device=self.device).reshape(-1).float()
        if t.shape[0] == 1 and B > 1:
            t = t.expand(B)
        arg = t[:, None] * self._freqs[None, :]
        sincos = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1).to(self.dtype)   # flip_sin_to_cos
        emb = linear(F.silu(linear(sincos, self.w_t1, self.b_t1)), self.w_t2, self.b_t2)
        return emb, linear(F.silu(emb), self.w_tmod, self.b_tmod)

    def _pos(self, h: int, w: int) -> torch.Tensor:
        """2-D sin-cos position embedding (only when ``interpolation_scale`` is set), as PatchEmbed."""
        pe = self._pos_embed.get((h, w))
        if pe is None:
            c = self.config
            base = c.sample_size // c.patch_size
            gh = torch.arange(h, dtype=torch.float32) / (h / base) / c.interpolation_scale
            gw = torch.arange(w, dtype=torch.float32) / (w / base) / c.interpolation_scale
            # diffusers: meshgrid(gw, gh, "xy") -> the first half of the channels encodes the
            # column coordinate, the second half the row coordinate; token order is row-major.
            grid_w, grid_h = torch.meshgrid(gw, gh, indexing="xy")
            D = c.inner_dim
            omega = 1.0 / _MAX_PERIOD ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4.0))

            def one(pos):
                out = torch.outer(pos.reshape(-1).double(), omega)
                return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

            pe = torch.cat([one(grid_w), one(grid_h)], dim=1).float().to(self.device)
            self._pos_embed[(h, w)] = pe
        return pe

    def _check_call(self, x, timestep, ctx):
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != c.in_channels or x.shape[0] < 1:
            raise ValueError(f"x: expected shape [B, {c.in_channels}, H, W], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"x: expected a tensor on {self.device} (the DiT's device), got {x.device}")
        H, W = x.shape[2:]
        p = c.patch_size
        if H < p or W < p or H % p or W % p:
            raise ValueError(f"x: height and width must be positive multiples of patch_size {p}, got {H}x{W}")
        if not isinstance(ctx, SanaContext):
            raise TypeError(f"ctx: expected the SanaContext returned by prepare_context, got {type(ctx).__name__}")
        if ctx.batch_size != x.shape[0]:
            raise ValueError(f"ctx: prepared for {ctx.batch_size} samples, but x has batch {x.shape[0]}")
        if ctx.kv.dtype != self.dtype or ctx.kv.device != self.device or ctx.kv.shape[0] != c.num_layers:
            raise ValueError("ctx: was prepared by a different DiT (dtype, device or layer count differ)")
        if not isinstance(timestep, torch.Tensor):
            if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
                timestep = torch.tensor([float(timestep)], device=self.device)
            else:
                raise TypeError(f"timestep: expected a tensor [B] (or a number), got {type(timestep).__name__}")
        if timestep.numel() not in (1, x.shape[0]) or timestep.dim() > 1:
            raise ValueError(f"timestep: expected shape [{x.shape[0]}] (or one value), got {tuple(timestep.shape)}")
        return timestep

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, ctx: SanaContext) -> torch.Tensor:
        """Velocity ``[B, out_channels, H, W]`` (in the weights' dtype) for latents ``x [B, C, H, W]``
        at ``timestep [B]`` (diffusers' timestep scale, 0..1000, ints or floats) with the context
        ``ctx`` that :meth:`prepare_context` built for these B samples."""
        timestep = self._check_call(x, timestep, ctx)
        c = self.config
        B, _, H, W = x.shape
        p = c.patch_size
        h, w = H // p, W // p
        N, D = h * w, c.inner_dim
        # patch embedding as a GEMM on the (C, p, p) patches, tokens row-major over (h, w)
        patches = x.to(self.dtype).reshape(B, c.in_channels, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
        hs = linear(patches.reshape(B, N, c.in_channels * p * p), self.w_patch, self.b_patch)
        if c.interpolation_scale is not None:
            hs = (hs + self._pos(h, w)).to(self.dtype)
        emb, t_mod = self._time_embedding(timestep, B)
        t_mod = t_mod.view(B, 6, D)
        layout = ctx.layout(N)
        mods = self._tables[:, None] + t_mod[None]                              # [L, B, 6, D]
        for i, blk in enumerate(self.blocks):
            hs = blk(hs, mods[i], ctx.kv[i], layout, h, w)
        # final layer: modulated LayerNorm + projection + unpatchify
        shift, scale = (self.out_table[None] + emb[:, None]).unbind(1)
        y = adaln_layernorm(hs, shift, scale, eps=_OUT_NORM_EPS, fp8=wants_fp8(self.w_out))
        y = linear(y, self.w_out, self.b_out, dtype=self.dtype)                 # [B, N, p*p*C_out]
        y = y.view(B, h, w, p, p, c.out_channels).permute(0, 5, 1, 3, 2, 4)
        return y.reshape(B, c.out_channels, H, W)
