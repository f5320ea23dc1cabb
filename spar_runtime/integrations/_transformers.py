"""Patches for transformers models: Qwen2 (``Qwen2ForCausalLM``, ``Qwen2Model``) and InternVL
(``InternVLForConditionalGeneration``).

- attention: every config of the model is switched to the ``"spar"`` attention function (see
  :mod:`._hf_attention`), as ``model.set_attn_implementation("spar")`` does;
- RMSNorm (``Qwen2RMSNorm``, ``InternVLVisionRMSNorm``): ``spar_kernels.rms_norm``;
- ``Qwen2DecoderLayer``: the residual add after attention is fused into the post-attention
  RMSNorm (``rms_norm(attn, w, eps, residual=h)``), as the runtime's decoder does;
- ``Qwen2Attention`` on a packed row without a cache (the unpadded forward below, or a batch
  packed by ``DataCollatorWithFlattening``): q/k/v as one GEMM (concatenated weights, a copy
  kept while the weights are unchanged), RoPE on q and k at once, ``hybrid_attention`` on
  strided views; with a cache or a padded batch transformers' own forward runs, with the
  ``"spar"`` attention function;
- ``Qwen2Model`` called without a cache (``use_cache=False``) on a padded batch (a 2-D
  ``attention_mask`` with zeros): the padding is dropped before the first layer, the batch runs
  as one packed row (``cu_seq_lens_*`` for the attention, each token keeping the position stock
  transformers gives it) and the outputs are padded again, as FlashAttention-2 does in
  transformers. Outputs at padding positions are then zeros (stock transformers computes values
  there that no valid token depends on). No mask is built for the packed row (transformers'
  forward gets prepared ``None`` masks; the segments are in ``cu_seq_lens``). The mask's values
  are read to the host once per forward, before the first layer (:func:`_host_mask`: one sync
  when the mask lives on a GPU, none when it is a host tensor as a tokenizer returns it): the
  packed length they give sizes every tensor after it, so this read cannot be deferred to the
  device; positions, ``cu_seq_lens``, the layout and the gather index all come from that copy.
  With a cache (``generate``) the batch stays padded.

A module whose input and weight dtypes differ (where transformers' own type promotion decides
the output dtype) runs its original forward.
"""

from __future__ import annotations

import types

import numpy as np
import torch

import spar_kernels as sk

from . import _hf_attention

SUPPORTED = ("Qwen2ForCausalLM", "Qwen2Model", "InternVLForConditionalGeneration", "InternVLModel")
_RMS_NORMS = ("Qwen2RMSNorm", "InternVLVisionRMSNorm")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _class_names(module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__ if c.__module__.startswith("transformers.")}


def is_supported(module) -> bool:
    return bool(_class_names(module) & set(SUPPORTED))


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if (hidden_states.dtype != w.dtype or w.dtype not in _DTYPES
            or (torch.is_grad_enabled() and (w.requires_grad or hidden_states.requires_grad))):
        return type(self).forward(self, hidden_states)
    return sk.rms_norm(hidden_states, w, self.variance_epsilon)


def _decoder_layer_forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                           use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
    post = self.post_attention_layernorm
    w = post.weight
    if (hidden_states.dtype != w.dtype or w.dtype not in _DTYPES
            or (torch.is_grad_enabled() and (w.requires_grad or hidden_states.requires_grad))):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    # s = residual + attn; a = RMSNorm(s): one fused op
    hidden_states, residual = sk.rms_norm(hidden_states, w, post.variance_epsilon, residual=residual)
    hidden_states = self.mlp(hidden_states)
    return residual.add_(hidden_states)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:     # an inference tensor: no version counter
        return -1


class _FusedQKV:
    """The q/k/v projections of one ``Qwen2Attention`` as one GEMM: their weights and biases
    concatenated (a copy: the q/k/v weights' memory once more), rebuilt whenever one of them
    changes (new storage, in-place update, dtype or device move)."""

    def __init__(self):
        self.sig = self.w = self.b = None

    def get(self, attn) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias), or None when a projection is not a plain ``nn.Linear`` without hooks
        (an adapter-wrapped or quantized layer, whose own forward must run)."""
        lins = [attn._modules.get(n) for n in ("q_proj", "k_proj", "v_proj")]
        if any(type(m) is not torch.nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in lins):
            return None
        ws = [m._parameters["weight"] for m in lins]
        bs = [m._parameters.get("bias") for m in lins]
        sig = tuple((t.data_ptr(), _version(t), t.dtype, t.device) if t is not None else None for t in ws + bs)
        if sig != self.sig:
            with torch.no_grad():
                self.w = torch.cat(ws)
                # a missing bias is zeros (k and v of a model whose q has one, or the other way round)
                self.b = None if all(b is None for b in bs) else torch.cat(
                    [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(ws, bs)])
            self.sig = sig
        return self.w, self.b


def _attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                       **kwargs):
    """``Qwen2Attention`` on a packed row without a cache (the unpadded forward, or a
    ``DataCollatorWithFlattening`` batch): q/k/v as one GEMM, RoPE on q and k at once (the same
    operations as transformers' ``apply_rotary_pos_emb``, so the same rounding), then
    ``hybrid_attention`` on strided views of them (no copy into a [B, H, T, D] layout). Any other
    call runs the original forward."""
    w = self.o_proj.weight
    cu = kwargs.get("cu_seq_lens_q")
    if (cu is None or cache is not None or position_embeddings is None or hidden_states.dim() != 3
            or hidden_states.shape[0] != 1 or hidden_states.dtype != w.dtype or w.dtype not in _DTYPES
            or kwargs.get("output_attentions") or getattr(self, "sliding_window", None) is not None
            or (self.training and getattr(self, "attention_dropout", 0.0))
            or (torch.is_grad_enabled() and (w.requires_grad or hidden_states.requires_grad))
            or self.config._attn_implementation != _hf_attention.ATTN_NAME):
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, cache=cache, **kwargs)
    fused = self._spar_qkv.get(self)
    T, hd = hidden_states.shape[1], self.head_dim
    causal = kwargs.get("is_causal")
    causal = getattr(self, "is_causal", True) if causal is None else bool(causal)
    layout = None if fused is None else _hf_attention.packed_layout(T, causal, kwargs, hidden_states.device)
    if layout is None or not sk.attention.MIN_HEAD_DIM <= hd <= sk.attention.MAX_HEAD_DIM or hd % 2:
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, cache=cache, **kwargs)
    wqkv, bqkv = fused
    Hq, Hkv = self.q_proj.out_features // hd, self.k_proj.out_features // hd
    qkv = torch.nn.functional.linear(hidden_states[0], wqkv, bqkv)            # [T, (Hq + 2 Hkv) hd]
    qk = qkv[:, :(Hq + Hkv) * hd].view(T, Hq + Hkv, hd)
    cos, sin = position_embeddings                                            # [1, T, hd]
    h = hd // 2
    c1, c2 = cos[0, :, None, :h], cos[0, :, None, h:]
    s1, s2 = sin[0, :, None, :h], sin[0, :, None, h:]
    x1, x2 = qk[..., :h], qk[..., h:]
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): exactly transformers' roundings
    qk = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
    v = qkv[:, (Hq + Hkv) * hd:].view(T, Hkv, hd)
    out = sk.hybrid_attention(qk[:, :Hq], qk[:, Hq:], v, layout, softmax_scale=self.scaling)
    return self.o_proj(out.view(1, T, Hq * hd)), None


def _unpad_ok(self, input_ids, attention_mask, cache, inputs_embeds, use_cache, kwargs) -> bool:
    """Whether a call may drop its padding (decided without reading the mask's values)."""
    use = use_cache if use_cache is not None else getattr(self.config, "use_cache", True)
    w = self.norm.weight
    return (not use and cache is None and w.dtype in _DTYPES and not (torch.is_grad_enabled() and w.requires_grad)
            and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and not kwargs.get("output_attentions") and kwargs.get("return_dict", True) is not False
            and getattr(self.config, "return_dict", True) and not getattr(self, "has_sliding_layers", False)
            and "cu_seq_lens_q" not in kwargs and (input_ids is None) != (inputs_embeds is None))


def _host_mask(attention_mask: torch.Tensor) -> np.ndarray:
    """The 2-D padding mask on the host, as booleans: the one read of device values in an
    unpadded forward. The packed length (how many tokens the mask keeps) sizes every tensor after
    it, so a mask on a GPU is copied to the host here (one sync; none for a mask on the CPU, as a
    tokenizer returns it); positions, cu_seqlens and the gather index all come from this copy."""
    return attention_mask.detach().cpu().numpy() != 0


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``; to a GPU from pinned memory without blocking the host."""
    t = torch.from_numpy(a)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


_TAKES_MASK_DICT: dict[type, bool] = {}


def _stock_forward_takes_mask_dict(self) -> bool:
    """Whether the forward that runs is transformers' own ``Qwen2Model.forward``, which takes a
    prepared ``{layer type: mask}`` dict in place of ``attention_mask`` and then builds no mask
    (known per class)."""
    cls = type(self)
    if cls not in _TAKES_MASK_DICT:
        own = next((c for c in cls.__mro__ if c.__name__ == "Qwen2Model" and c.__module__.startswith("transformers.")),
                   None)
        _TAKES_MASK_DICT[cls] = own is not None and cls.forward is own.forward
    return _TAKES_MASK_DICT[cls]


def _qwen2_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                         inputs_embeds=None, use_cache=None, **kwargs):
    stock = type(self).forward
    if not _unpad_ok(self, input_ids, attention_mask, cache, inputs_embeds, use_cache, kwargs):
        return stock(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                     inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    keep = _host_mask(attention_mask)
    B, T = keep.shape
    flat = np.flatnonzero(keep)                    # kept (row, column) pairs, row-major, as b * T + t
    if flat.size == B * T or flat.size == 0:       # nothing to drop, or nothing to keep
        return stock(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                     inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    src = input_ids if inputs_embeds is None else inputs_embeds
    device = src.device
    lens = keep.sum(1)
    idx = _to_device(flat, device)
    if position_ids is None:   # what stock transformers uses without a cache: the column
        pos = _to_device(flat % T, device)[None]
    else:
        pos = position_ids.expand(B, T).reshape(B * T).index_select(0, idx)[None]
    cu = torch.from_numpy(np.concatenate(([0], np.cumsum(lens))).astype(np.int32))   # host: read by the attention
    longest = int(lens.max())
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    # transformers' own forward takes prepared masks; none is needed (the segments are in cu_seq_lens)
    masks = dict.fromkeys(set(getattr(self.config, "layer_types", None) or ("full_attention",))) \
        if _stock_forward_takes_mask_dict(self) else None
    if inputs_embeds is not None:
        out = stock(self, inputs_embeds=inputs_embeds.reshape(B * T, -1).index_select(0, idx)[None],
                    attention_mask=masks, position_ids=pos, use_cache=False, **packed, **kwargs)
    else:
        out = stock(self, input_ids=input_ids.reshape(B * T).index_select(0, idx)[None], attention_mask=masks,
                    position_ids=pos, use_cache=False, **packed, **kwargs)

    def pad(h):
        return h.new_zeros(B * T, h.shape[-1]).index_copy_(0, idx, h[0]).view(B, T, h.shape[-1])
    out.last_hidden_state = pad(out.last_hidden_state)
    if getattr(out, "hidden_states", None) is not None:
        out.hidden_states = tuple(pad(h) for h in out.hidden_states)
    return out


def _configs(model) -> list:
    """Every config object (sub-configs included) of the PreTrainedModels in ``model``'s tree."""
    seen, out = set(), []

    def add(cfg):
        if cfg is None or id(cfg) in seen:
            return
        seen.add(id(cfg))
        out.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            add(getattr(cfg, key, None))

    for m in model.modules():
        add(getattr(m, "config", None) if hasattr(m, "set_attn_implementation") else None)
    return out


def patch_model(model, record) -> None:
    """Patch one supported transformers model in place; ``record(obj, name, value)`` installs an
    instance attribute undoably; ``record.config(cfg, name, old)`` records a config field's old value."""
    _hf_attention.register()
    before = [(cfg, cfg._attn_implementation) for cfg in _configs(model)]
    model.set_attn_implementation(_hf_attention.ATTN_NAME)     # every sub-config too; validates the name
    for cfg, old in before:
        record.config(cfg, "_attn_implementation", old)
    for m in model.modules():
        names = {c.__name__ for c in type(m).__mro__}
        if names & set(_RMS_NORMS) and hasattr(m, "variance_epsilon"):
            record(m, "forward", types.MethodType(_rms_norm_forward, m))
        elif "Qwen2DecoderLayer" in names and hasattr(m, "post_attention_layernorm"):
            record(m, "forward", types.MethodType(_decoder_layer_forward, m))
        elif "Qwen2Attention" in names and all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            record(m, "_spar_qkv", _FusedQKV())
            record(m, "forward", types.MethodType(_attention_forward, m))
        elif "Qwen2Model" in names and hasattr(m, "layers"):
            record(m, "forward", types.MethodType(_qwen2_model_forward, m))
