"""The ``"spar"`` attention function for transformers' ``AttentionInterface``.

transformers calls it as ``fn(module, query, key, value, attention_mask, scaling=..., dropout=...,
**kwargs)`` with ``query [B, Hq, Q, D]`` and ``key, value [B, Hkv, K, D]`` (the cache's keys
included when decoding) and expects ``(out [B, Q, Hq, D], None)``. What transformers passes is
mapped to one :class:`spar_kernels.AttentionLayout` per batch row (row ``b``'s queries see an
interval of row ``b``'s keys), built once per mask and reused by every layer:

- no mask: causal (``is_causal`` kwarg, else ``module.is_causal``, default True) with top-left
  alignment as SDPA's ``is_causal`` (a single query row sees every key), or full when not causal;
- ``cu_seq_lens_q`` / ``cu_seq_lens_k`` kwargs (``DataCollatorWithFlattening``) on a batch of one:
  one sequence per packed segment, causal or full;
- a 4-D mask ``[B or 1, 1, Q, K]``, boolean (True = attend, as transformers' ``sdpa_mask`` builds
  it) or additive float (0 = attend, <= -1e4 = masked): each query row must see one contiguous
  interval of keys (padding on either side, packed ``position_ids``, bidirectional blocks...).

Anything else (other masks, additive biases, sinks, softcapping, sliding windows, dropout in
training, attention weights requested, gradients, head dims above the kernels') runs transformers'
own SDPA function, with one warning per reason.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

import spar_kernels as sk
from spar_runtime.qwen2 import attention as _packed_attention

ATTN_NAME = "spar"
_MAX_HEAD_DIM = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASKED_BELOW = -1e4        # additive masks: a value <= this is a masked key (exp underflows to 0)

_warned: set[str] = set()
# the last mask mapped: (key, mask kept alive so its id is not reused, layout or None for fallback)
_last: list = [None, None, None]


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"spar attention: {reason}; using transformers' SDPA attention for it", stacklevel=3)


def _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _rows_layout(start: np.ndarray, end: np.ndarray, B: int, Q: int, K: int, device) -> sk.AttentionLayout:
    """One sequence per batch row: Q queries, K keys, row intervals ``[start, end)`` ([B*Q])."""
    cu_q = np.arange(B + 1, dtype=np.int64) * Q
    cu_k = np.arange(B + 1, dtype=np.int64) * K
    return sk.AttentionLayout.from_intervals(torch.from_numpy(cu_q).to(device), torch.from_numpy(cu_k).to(device),
                                             torch.from_numpy(start).to(device), torch.from_numpy(end).to(device))


def mask_intervals(mask: torch.Tensor, B: int, Q: int, K: int):
    """``(start, end)`` int64 numpy ``[B*Q]`` of a 4-D mask whose query rows each see one
    contiguous interval of keys (empty rows get ``[0, 0)``), or None when some row does not.

    ``mask``: ``[B or 1, 1, Q, >= K]``, boolean (True = attend) or additive float (0 = attend,
    <= -1e4 = masked); other float values give None."""
    m = mask[:, 0, :, :K]
    if m.dtype != torch.bool:
        if not (((m == 0) | (m <= _MASKED_BELOW)).all()):
            return None
        m = m == 0
    m = m.expand(B, Q, K).reshape(B * Q, K)
    count = m.sum(-1)
    first = m.to(torch.uint8).argmax(-1)                      # first True (0 when none)
    last = K - 1 - m.flip(-1).to(torch.uint8).argmax(-1)      # last True
    nonempty = count > 0
    if not bool((~nonempty | (last - first + 1 == count)).all()):
        return None
    start = torch.where(nonempty, first, 0).numpy().astype(np.int64)
    end = torch.where(nonempty, last + 1, 0).numpy().astype(np.int64)
    return start, end


def _build_layout(attention_mask, B, Q, K, causal, kwargs, device):
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and B == 1:
        cq = cu_q.tolist() if isinstance(cu_q, torch.Tensor) else list(cu_q)
        ck = cu_k.tolist() if isinstance(cu_k, torch.Tensor) else list(cu_k)
        if cq[-1] != Q or ck[-1] != K or len(cq) != len(ck):
            return None
        lq, lk = np.diff(cq), np.diff(ck)
        if causal:
            if (lq != lk).any():
                return None
            return sk.AttentionLayout.from_segments([[("causal", int(n))] for n in lq], device=device)
        return sk.AttentionLayout.cross([int(n) for n in lq], [int(n) for n in lk], device=device)
    if attention_mask is None:
        if causal and Q > 1:   # SDPA's is_causal: top-left aligned
            end = np.minimum(np.arange(1, Q + 1, dtype=np.int64), K)
        else:
            end = np.full(Q, K, dtype=np.int64)
        end = np.tile(end, B)
        return _rows_layout(np.zeros_like(end), end, B, Q, K, device)
    iv = mask_intervals(attention_mask, B, Q, K)
    if iv is None:
        return None
    return _rows_layout(iv[0], iv[1], B, Q, K, device)


def _layout_for(attention_mask, B, Q, K, causal, kwargs, device):
    cu = kwargs.get("cu_seq_lens_q")
    key = (id(attention_mask), id(cu), B, Q, K, causal, device)
    if _last[0] == key and _last[1] is not None and _last[1][0] is attention_mask and _last[1][1] is cu:
        return _last[2]
    layout = _build_layout(attention_mask, B, Q, K, causal, kwargs, device)
    _last[:] = [key, (attention_mask, cu), layout]
    return layout


def _packed_mask(cu_q, cu_k, Q, K, causal, device) -> torch.Tensor | None:
    """The block-diagonal (causal) boolean mask ``[1, 1, Q, K]`` of packed sequences (for SDPA)."""
    cu_q = torch.as_tensor(cu_q, device=device).long()
    cu_k = torch.as_tensor(cu_k if cu_k is not None else cu_q, device=device).long()
    if int(cu_q[-1]) != Q or int(cu_k[-1]) != K:
        return None
    seg_q = torch.bucketize(torch.arange(Q, device=device), cu_q[1:], right=True)
    seg_k = torch.bucketize(torch.arange(K, device=device), cu_k[1:], right=True)
    pos_q = torch.arange(Q, device=device) - cu_q[seg_q]
    pos_k = torch.arange(K, device=device) - cu_k[seg_k]
    mask = seg_q[:, None] == seg_k[None, :]
    if causal:
        mask &= pos_k[None, :] <= pos_q[:, None]
    return mask[None, None]


def _fallback_reason(module, query, key, attention_mask, dropout, kwargs) -> str | None:
    if kwargs.get("softcap") is not None:
        return "softcapping is not supported"
    if kwargs.get("sliding_window") is not None:
        return "sliding-window attention is not supported"
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        return "attention sinks and position biases are not supported"
    if kwargs.get("output_attentions"):
        return "output_attentions=True is not supported"
    if dropout and module.training:
        return "dropout in training is not supported"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return "gradients are not supported (inference only)"
    if query.dtype not in _DTYPES or key.dtype != query.dtype:
        return f"dtype {query.dtype} is not supported"
    if query.shape[-1] > _MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} is larger than the kernels' {_MAX_HEAD_DIM}"
    if attention_mask is not None:
        B, Q, K = query.shape[0], query.shape[2], key.shape[2]
        if (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
                or attention_mask.shape[0] not in (1, B) or attention_mask.shape[2] != Q
                or attention_mask.shape[3] < K):
            return "only 4-D masks [B or 1, 1, Q, >= K] shared by all heads are mapped"
    return None


def spar_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract on ``spar_kernels.hybrid_attention`` (see the module doc)."""
    reason = _fallback_reason(module, query, key, attention_mask, dropout, kwargs)
    B, Hq, Q, D = query.shape
    K = key.shape[2]
    layout = None
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    if reason is None:
        layout = _layout_for(attention_mask, B, Q, K, causal, kwargs, query.device)
        if layout is None:
            reason = "the attention mask is not one interval of keys per query row"
    if reason is not None:
        _warn_once(reason)
        if B == 1 and kwargs.get("cu_seq_lens_q") is not None:    # as the mapped path: the segments decide
            attention_mask = _packed_mask(kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k"), Q, K, causal,
                                          query.device)
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    scale = D ** -0.5 if scaling is None else float(scaling)
    q = query.transpose(1, 2).reshape(B * Q, Hq, D)
    k = key.transpose(1, 2).reshape(B * K, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * K, value.shape[1], D)
    out = _packed_attention(q, k, v, layout, scale)
    return out.view(B, Q, Hq, D), None


def register() -> None:
    """Register ``"spar"`` with transformers' ``AttentionInterface`` (and, for its masks,
    ``AttentionMaskInterface``, with transformers' SDPA mask builder: boolean 4-D masks, or None
    where SDPA would take none)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, spar_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
