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

Host work per call: a layout is kept for the mask (or ``cu_seq_lens``) object of the last call,
which every layer of one forward shares, and layouts without a 4-D mask (no mask, packed
segments) are also kept by value (shapes and segment lengths), so a batch shape seen again maps
nothing. Device reads (host syncs on a GPU): a 4-D mask is reduced to per-row counts and bounds
where it lives and read once, in the first layer (once per forward; a decode step of a padded
batch gets a new mask from transformers each step); ``cu_seq_lens`` given as device tensors
are read once per forward likewise; nothing else reads device values.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

import spar_kernels as sk
from spar_runtime.integrations._stamp import stamp, unchanged
from spar_runtime.qwen2 import attention as _packed_attention

ATTN_NAME = "spar"
_MAX_HEAD_DIM = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASKED_BELOW = -1e4        # additive masks: a value <= this is a masked key (exp underflows to 0)

_warned: set[str] = set()
# The layout of the last mask seen: (its key, the mask and cu_seq_lens objects, kept alive so
# that their ids stay theirs, with their stamps (_stamp: a mask written in place is mapped
# again), layout or None for a fallback). Every layer of one forward gets the
# same mask object: only the first layer maps it.
_last: list = [None, None, None]
# Layouts by value (shapes, cu_seq_lens values), the most recent last: the same padding-free or
# packed batch shape seen again (the next forward, a decode step) maps nothing.
_by_value: dict = {}
_BY_VALUE_MAX = 16


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
    layout = sk.AttentionLayout.from_intervals(cu_q, cu_k, start, end)
    return layout if device.type == "cpu" else layout.to(device)


def mask_intervals(mask: torch.Tensor, B: int, Q: int, K: int):
    """``(start, end)`` int64 numpy ``[B*Q]`` of a 4-D mask whose query rows each see one
    contiguous interval of keys (empty rows get ``[0, 0)``), or None when some row does not.

    ``mask``: ``[B or 1, 1, Q, >= K]``, boolean (True = attend) or additive float (0 = attend,
    <= -1e4 = masked); other float values give None. Each row's first and last visible key and
    visible count are reduced where the mask lives and read to the host at once (one sync for a
    mask on a GPU)."""
    m = mask[:, 0, :, :K]
    bad = None
    if m.dtype != torch.bool:
        bad = ~((m == 0) | (m <= _MASKED_BELOW)).all(-1)          # a row with a value that is not a mask
        m = m == 0
    bm = m.shape[0]
    m = m.reshape(bm * Q, K)
    count = m.sum(-1)
    first = m.to(torch.uint8).argmax(-1)                      # first True (0 when none)
    last = K - 1 - m.flip(-1).to(torch.uint8).argmax(-1)      # last True
    rows = [count, first, last] + ([bad.reshape(bm * Q).long()] if bad is not None else [])
    host = torch.stack(rows).cpu().numpy()
    count, first, last = host[0], host[1], host[2]
    if bad is not None and host[3].any():
        return None
    nonempty = count > 0
    if not (~nonempty | (last - first + 1 == count)).all():
        return None
    start = np.where(nonempty, first, 0).astype(np.int64)
    end = np.where(nonempty, last + 1, 0).astype(np.int64)
    if bm != B:
        start, end = np.tile(start, B), np.tile(end, B)
    return start, end


def _remember(key, layout):
    _by_value.pop(key, None)
    _by_value[key] = layout
    while len(_by_value) > _BY_VALUE_MAX:
        _by_value.pop(next(iter(_by_value)))
    return layout


def _build_layout(attention_mask, B, Q, K, causal, kwargs, device):
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and B == 1:
        # a device tensor is read once here (the layout is kept for every other layer)
        cq = cu_q.tolist() if isinstance(cu_q, torch.Tensor) else list(cu_q)
        ck = cu_k.tolist() if isinstance(cu_k, torch.Tensor) else list(cu_k)
        key = ("packed", tuple(cq), tuple(ck), Q, K, causal, device)
        if key in _by_value:
            return _remember(key, _by_value[key])
        if not cq or cq[-1] != Q or ck[-1] != K or len(cq) != len(ck):
            return None
        lq, lk = np.diff(cq), np.diff(ck)
        if causal:
            if (lq != lk).any():
                return None
            return _remember(key, sk.AttentionLayout.from_segments([[("causal", int(n))] for n in lq],
                                                                   device=device))
        return _remember(key, sk.AttentionLayout.cross([int(n) for n in lq], [int(n) for n in lk], device=device))
    if attention_mask is None:
        key = ("rows", B, Q, K, causal, device)
        if key in _by_value:
            return _remember(key, _by_value[key])
        if causal and Q > 1:   # SDPA's is_causal: top-left aligned
            end = np.minimum(np.arange(1, Q + 1, dtype=np.int64), K)
        else:
            end = np.full(Q, K, dtype=np.int64)
        end = np.tile(end, B)
        return _remember(key, _rows_layout(np.zeros_like(end), end, B, Q, K, device))
    iv = mask_intervals(attention_mask, B, Q, K)
    if iv is None:
        return None
    return _rows_layout(iv[0], iv[1], B, Q, K, device)


def packed_layout(T: int, causal: bool, kwargs, device):
    """The layout of a packed row of ``T`` tokens whose sequences ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` (kwargs) give, causal or bidirectional within each, or None when they do
    not describe one (as the attention function maps them, from the same caches)."""
    return _layout_for(None, 1, T, T, causal, kwargs, device)


def _layout_for(attention_mask, B, Q, K, causal, kwargs, device):
    cu = kwargs.get("cu_seq_lens_q")
    key = (id(attention_mask), id(cu), B, Q, K, causal, device)
    seen = _last[1]
    if (_last[0] == key and seen is not None and seen[0] is attention_mask and seen[1] is cu
            and unchanged(attention_mask, seen[2]) and unchanged(cu, seen[3])):  # the same objects, not written since
        return _last[2]
    layout = _build_layout(attention_mask, B, Q, K, causal, kwargs, device)
    # every layer checks the stamps: an inference-mode mask on a GPU is kept by identity (comparing
    # its values would sync the host once per layer; docs/integrations.md, Limits)
    _last[:] = [key, (attention_mask, cu, stamp(attention_mask, by_value=False), stamp(cu, by_value=False)), layout]
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
