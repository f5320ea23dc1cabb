"""Patches for transformers models: Qwen2 (``Qwen2ForCausalLM``, ``Qwen2Model``) and InternVL
(``InternVLForConditionalGeneration``).

- attention: every config of the model is switched to the ``"spar"`` attention function (see
  :mod:`._hf_attention`), as ``model.set_attn_implementation("spar")`` does;
- RMSNorm (``Qwen2RMSNorm``, ``InternVLVisionRMSNorm``): ``spar_kernels.rms_norm``;
- ``Qwen2DecoderLayer``: the residual add after attention is fused into the post-attention
  RMSNorm (``rms_norm(attn, w, eps, residual=h)``), as the runtime's decoder does;
- ``Qwen2Model`` called without a cache (``use_cache=False``) on a padded batch (a 2-D
  ``attention_mask`` with zeros): the padding is dropped before the first layer, the batch runs
  as one packed row (``cu_seq_lens_*`` for the attention, each token keeping the position stock
  transformers gives it) and the outputs are padded again, as FlashAttention-2 does in
  transformers. Outputs at padding positions are then zeros (stock transformers computes values
  there that no valid token depends on). With a cache (``generate``) the batch stays padded.

A module whose input and weight dtypes differ (where transformers' own type promotion decides
the output dtype) runs its original forward.
"""

from __future__ import annotations

import types

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


def _unpad_ok(self, input_ids, attention_mask, cache, inputs_embeds, use_cache, kwargs) -> bool:
    use = use_cache if use_cache is not None else getattr(self.config, "use_cache", True)
    w = self.norm.weight
    return (not use and cache is None and w.dtype in _DTYPES and not (torch.is_grad_enabled() and w.requires_grad)
            and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and not kwargs.get("output_attentions") and kwargs.get("return_dict", True) is not False
            and getattr(self.config, "return_dict", True) and not getattr(self, "has_sliding_layers", False)
            and "cu_seq_lens_q" not in kwargs and (input_ids is None) != (inputs_embeds is None)
            and not bool(attention_mask.to(torch.bool).all()))


def _qwen2_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                         inputs_embeds=None, use_cache=None, **kwargs):
    stock = type(self).forward
    if not _unpad_ok(self, input_ids, attention_mask, cache, inputs_embeds, use_cache, kwargs):
        return stock(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                     inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    keep = attention_mask.to(torch.bool)
    B, T = keep.shape
    if position_ids is None:   # what stock transformers uses without a cache
        position_ids = torch.arange(T, device=keep.device)[None]
    pos = position_ids.expand(B, T)[keep][None]
    lens = keep.sum(1)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0).cpu()
    longest = int(lens.max())
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    if inputs_embeds is not None:
        out = stock(self, inputs_embeds=inputs_embeds[keep][None], position_ids=pos, use_cache=False,
                    **packed, **kwargs)
    else:
        out = stock(self, input_ids=input_ids[keep][None], position_ids=pos, use_cache=False, **packed, **kwargs)

    def pad(h):
        full = h.new_zeros(B, T, h.shape[-1])
        full[keep] = h[0]
        return full
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
        elif "Qwen2Model" in names and hasattr(m, "layers"):
            record(m, "forward", types.MethodType(_qwen2_model_forward, m))
