"""One SANA DiT block (diffusers' ``SanaTransformerBlock``) rebuilt from spar's fused pieces.

    mods = scale_shift_table[None] + timestep.reshape(B, 6, C)           -> 6 per-sample vectors
    h  = adaln_layernorm(x, shift_msa, scale_msa)                          (norm1 + modulation)
    x  = gated_residual(x, to_out(linear_attention(to_q h, to_k h, to_v h)), gate_msa)
    x += to_out(hybrid_attention(to_q x, to_k ctx, to_v ctx, AttentionLayout.cross(...)))
    h  = adaln_layernorm(x, shift_mlp, scale_mlp)                          (norm2 + modulation)
    x  = gated_residual(x, conv_point(dwconv_glu(silu(conv_inverted h), conv_depth)), gate_mlp, out=x)

The cross-attention runs on the unpadded, packed context (``[sum(k_lens), C_ctx]``) through
:func:`spar_kernels.hybrid_attention` with ``AttentionLayout.cross([N] * B, k_lens)``: no padding
mask and no padded keys. Everything left besides the fused ops is GEMMs (``F.linear``).

The weights are read from a diffusers ``SanaTransformerBlock`` (or any object with the same
attribute names), so the runtime can keep loading diffusers checkpoints. The context's key/value
projections do not change across denoising steps: compute them once with :func:`sana_cross_kv`
and pass them as ``cross_kv``, together with a prebuilt ``cross_layout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adaln import adaln_layernorm, gated_residual
from .dwconv_glu import dwconv_glu
from .linear_attention import linear_attention


def _check_block(block) -> None:
    for name in ("attn1", "attn2"):
        attn = getattr(block, name, None)
        if attn is None:
            raise ValueError(f"block: expected a SanaTransformerBlock with {name} (got none)")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise ValueError(f"block.{name}: qk_norm is not supported by sana_block_forward")
    for name in ("norm1", "norm2"):
        if getattr(getattr(block, name), "weight", None) is not None:
            raise ValueError(f"block.{name}: an affine LayerNorm is not supported (SANA uses none)")


def sana_cross_kv(block, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value of the block's cross-attention for a packed context.

    Args:
        block: a diffusers ``SanaTransformerBlock``.
        context: ``[total_k, C_ctx]``: the per-sample contexts concatenated, without padding.

    Returns:
        ``(k, v)``, each ``[total_k, heads, head_dim]`` (constant over the denoising steps).
    """
    attn = block.attn2
    if not isinstance(context, torch.Tensor) or context.dim() != 2:
        raise ValueError(f"context: expected a packed [total_k, C_ctx] tensor, got "
                         f"{tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__}")
    k = attn.to_k(context)
    v = attn.to_v(context)
    return k.view(k.shape[0], attn.heads, -1), v.view(v.shape[0], attn.heads, -1)


def sana_block_forward(block, hidden_states: torch.Tensor, context: torch.Tensor | None, context_lens,
                       timestep: torch.Tensor, height: int, width: int, *, cross_kv=None,
                       cross_layout=None) -> torch.Tensor:
    """``SanaTransformerBlock.forward`` with spar's fused kernels (inference; dropout off).

    Args:
        block: a diffusers ``SanaTransformerBlock`` (its weights are used; the module is not called).
        hidden_states: ``[B, N, C]`` image tokens, ``N == height * width`` (row-major grid).
        context: ``[total_k, C_ctx]`` packed context (sample b's ``context_lens[b]`` rows follow
            sample b-1's), or ``None`` when ``cross_kv`` is given.
        context_lens: ``B`` per-sample context lengths (ints; a list or a CPU tensor).
        timestep: ``[B, 6 * C]``, the block conditioning (``AdaLayerNormSingle``'s first output).
        height, width: the token grid.
        cross_kv: optional ``(k, v)`` from :func:`sana_cross_kv`, reused across steps.
        cross_layout: optional prebuilt ``AttentionLayout.cross([N] * B, context_lens)`` on the
            tensors' device (build it once per image; building it copies lengths to the device).

    Returns:
        the block output ``[B, N, C]`` (a new tensor; ``hidden_states`` is not modified).
    """
    from . import AttentionLayout, hybrid_attention

    _check_block(block)
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        raise ValueError("hidden_states: expected a [B, N, C] tensor")
    B, N, C = hidden_states.shape
    if height * width != N:
        raise ValueError(f"height, width: expected height * width == N ({N}), got {height} x {width}")
    if timestep.numel() != B * 6 * C:
        raise ValueError(f"timestep: expected [B, 6 * C] = [{B}, {6 * C}], got shape {tuple(timestep.shape)}")
    dtype = hidden_states.dtype

    # 1. modulation: six [B, C] views of one small tensor
    mods = block.scale_shift_table[None] + timestep.reshape(B, 6, C)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(1)

    # 2. self-attention: ReLU linear attention
    a1 = block.attn1
    h = adaln_layernorm(hidden_states, shift_msa, scale_msa, eps=block.norm1.eps)
    q = a1.to_q(h).view(B, N, a1.heads, -1)
    k = a1.to_k(h).view(B, N, a1.heads, -1)
    v = a1.to_v(h).view(B, N, a1.heads, -1)
    o = linear_attention(q, k, v).view(B, N, -1)
    o = a1.to_out[0](o)
    if dtype == torch.float16:  # as SanaLinearAttnProcessor2_0
        o = o.clip(-65504, 65504)
    x = gated_residual(hidden_states, o, gate_msa)  # a new tensor: updated in place from here on

    # 3. cross-attention on the unpadded context
    a2 = block.attn2
    if cross_kv is None:
        if context is None:
            raise ValueError("context: expected the packed context when cross_kv is not given")
        cross_kv = sana_cross_kv(block, context)
    k2, v2 = cross_kv
    if cross_layout is None:
        cross_layout = AttentionLayout.cross([N] * B, context_lens, device=x.device)
    q2 = a2.to_q(x).view(B * N, a2.heads, -1)
    o2 = hybrid_attention(q2, k2, v2, cross_layout).view(B, N, -1)
    o2 = a2.to_out[0](o2)
    if a2.rescale_output_factor != 1.0:
        o2 = o2 / a2.rescale_output_factor
    x.add_(o2)

    # 4. Mix-FFN: 1x1 conv (GEMM) -> SiLU -> fused depthwise 3x3 + GLU -> 1x1 conv (GEMM)
    ff = block.ff
    h = adaln_layernorm(x, shift_mlp, scale_mlp, eps=block.norm2.eps)
    ci, cd, cp = ff.conv_inverted, ff.conv_depth, ff.conv_point
    u = F.linear(h, ci.weight.view(ci.out_channels, ci.in_channels), ci.bias)
    F.silu(u, inplace=True)
    g = dwconv_glu(u, cd.weight, cd.bias, height, width)
    f = F.linear(g, cp.weight.view(cp.out_channels, cp.in_channels), cp.bias)
    return gated_residual(x, f, gate_mlp, out=x)
