"""Patches for diffusers models: ``SanaTransformer2DModel`` and ``AutoencoderDC``.

Both run the spar runtime's own implementations on the module's current weights:

- ``SanaTransformer2DModel.forward`` -> :class:`spar_runtime.sana.SanaDiT`: per block,
  ``adaln_layernorm`` + ``gated_residual`` for the adaLN-single modulation, ``linear_attention``
  for the ReLU linear self-attention, ``hybrid_attention`` for the cross-attention (the context is
  packed: each sample's unmasked tokens, one key interval per sample, which is exactly what the
  stock model's ``-10000`` bias computes), ``dwconv_glu`` for GLUMBConv's depthwise conv + GLU,
  ``rms_norm`` for the caption norm and qk-norms, the 1x1 convolutions as GEMMs;
- ``AutoencoderDC.decoder.forward`` -> :class:`spar_runtime.dcae.DCAEDecoder` (channels-last;
  ``rms_norm``, ``dwconv_glu``, ``linear_attention``); ``AutoencoderDC.decode`` (tiling included)
  stays diffusers' own and calls it.

The runtime object is built from the module's ``state_dict`` on first use and rebuilt whenever a
parameter or buffer changes (new storage, in-place update, dtype or device move). The DiT's
context work (caption projection, caption norm, every block's cross-attention K/V: the runtime's
``prepare_context``) is kept from one call to the next while the call gets the very same
``encoder_hidden_states`` and ``encoder_attention_mask`` tensors, unmodified (version counters;
for inference-mode tensors, which have none, a kept copy compared by value), as a denoising loop
passes them at every step (the stock model recomputes it at every step); the last context stays
referenced until the next call with other tensors, or ``unpatch``; the cross-attention layout
depends only on the context lengths and the latent size and is kept by those (a new context of
the same shape builds none). Reading the encoder mask's values (one host sync on a GPU) happens
once per new context. Calls the runtime does not cover run the original forward: grad mode on
with trainable weights or an input that requires grad, ``attention_mask`` / ``guidance`` /
``controlnet_block_samples`` / ``attention_kwargs`` given, a pre-built 3-D
``encoder_attention_mask``, a sample with no unmasked context token, mixed dtypes.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import torch

from ._stamp import stamp, unchanged

SUPPORTED = ("SanaTransformer2DModel", "AutoencoderDC")


def _class_names(module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__ if c.__module__.startswith("diffusers.")}


def is_supported(module) -> bool:
    return bool(_class_names(module) & set(SUPPORTED))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:     # an inference tensor: no version counter
        return -1


def _grad_needed(module: torch.nn.Module, *inputs) -> bool:
    """Whether autograd must see this call (grad mode on, and a parameter or a tensor input that
    requires grad): then the stock forward runs, since spar's runtime objects record nothing."""
    return torch.is_grad_enabled() and (any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
                                        or any(p.requires_grad for p in module.parameters()))


class _Cached:
    """A runtime object built from a module's weights, rebuilt when they change.

    The change check reads every parameter and buffer of the module's submodules (listed once:
    walking the tree with ``named_modules`` on every call cost ~2 ms on the tiny models) for
    their storage, version counter, dtype and device, and checks that every listed child is
    still its parent's (a submodule replaced, ``model.proj_out = nn.Linear(...)``, lists them
    again). Weights that are inference tensors have no version counter: their in-place updates
    are not seen (docs/integrations.md)."""

    def __init__(self, build):
        self.build = build
        self.sig = None
        self.obj = None
        self.modules = None
        self.edges = None  # (parent's _modules dict, its length, name, child) of every listed submodule

    def _signature(self) -> tuple:
        return tuple((t.data_ptr(), _version(t), t.dtype, t.device) for m in self.modules
                     for d in (m._parameters, m._buffers) for t in d.values() if t is not None)

    def _same_tree(self) -> bool:
        return all(len(d) == n and d.get(name) is child for d, n, name, child in self.edges)

    def get(self, module):
        if self.modules is None or not self._same_tree():
            self.modules = list(module.modules())
            self.edges = [(m._modules, len(m._modules), name, child) for m in self.modules
                          for name, child in m._modules.items()]
            self.sig = None
        sig = self._signature()
        if self.obj is None or sig != self.sig:
            self.obj = self.build(module)
            self.sig = sig
        return self.obj


def _build_dit(model):
    from spar_runtime.sana import SanaDiT, sana_param_shapes

    config = dict(model.config)
    names = sana_param_shapes(config)
    state = model.state_dict()
    return SanaDiT(config, {k: state[k].detach() for k in names})


def _cached_context(cached, dit, ehs, mask):
    """The SanaContext of the previous call when it had the same DiT weights and the very same
    ``encoder_hidden_states`` and mask tensors, unmodified (a denoising loop's steps)."""
    c = getattr(cached, "context", None)
    if c is None:
        return None
    c_dit, c_ehs, c_stamp, c_mask, c_mstamp, ctx = c
    if c_dit is not dit or c_ehs is not ehs or c_mask is not mask:
        return None
    if not (unchanged(ehs, c_stamp) and unchanged(mask, c_mstamp)):
        return None
    return ctx


def _sana_forward(self, hidden_states, encoder_hidden_states, timestep, guidance=None, encoder_attention_mask=None,
                  attention_mask=None, attention_kwargs=None, controlnet_block_samples=None, return_dict=True):
    stock = type(self).forward
    args = dict(guidance=guidance, encoder_attention_mask=encoder_attention_mask, attention_mask=attention_mask,
                attention_kwargs=attention_kwargs, controlnet_block_samples=controlnet_block_samples,
                return_dict=return_dict)
    mask = encoder_attention_mask
    if (guidance is not None or attention_mask is not None or attention_kwargs or controlnet_block_samples is not None
            or _grad_needed(self, hidden_states, encoder_hidden_states, timestep)
            or encoder_hidden_states.dim() != 3 or (mask is not None and mask.dim() != 2)):
        return stock(self, hidden_states, encoder_hidden_states, timestep, **args)
    cached = self._spar_dit
    dit = cached.get(self)
    if hidden_states.dtype != dit.dtype or encoder_hidden_states.dtype != dit.dtype:  # mixed dtypes: as stock
        return stock(self, hidden_states, encoder_hidden_states, timestep, **args)
    ctx = _cached_context(cached, dit, encoder_hidden_states, mask)
    if ctx is None:
        B, L, _ = encoder_hidden_states.shape
        if mask is None:
            context = encoder_hidden_states.reshape(B * L, -1)
            lens = [L] * B
        else:
            # the mask's values on the host, read once (one sync for a mask on a GPU): the packed
            # context length depends on them
            host = mask.detach().cpu().numpy()
            keep = host != 0
            lens = keep.sum(1).tolist()
            # a sample with no token: the stock model averages over every token there (no packed
            # layout); values other than 0/1: the stock model's bias is not a mask
            if min(lens) == 0 or not (keep | (host == 0)).all() or not (host[keep] == 1).all():
                return stock(self, hidden_states, encoder_hidden_states, timestep, **args)
            context = encoder_hidden_states.reshape(B * L, -1)
            if not keep.all():
                idx = torch.from_numpy(np.flatnonzero(keep))
                if context.device.type != "cpu":
                    idx = idx.pin_memory().to(context.device, non_blocking=True)
                context = context.index_select(0, idx)
        # the cross-attention layout depends only on the lengths: kept by value across contexts
        n_img = (hidden_states.shape[-2] // dit.config.patch_size) * (hidden_states.shape[-1] // dit.config.patch_size)
        layouts = cached.__dict__.setdefault("layouts", {})
        key = (tuple(lens), n_img, dit.device)
        if key not in layouts:
            from spar_kernels import AttentionLayout
            if len(layouts) >= 8:
                layouts.pop(next(iter(layouts)))
            layouts[key] = AttentionLayout.cross([n_img] * len(lens), list(lens), device=dit.device)
        with torch.no_grad():
            ctx = dit.prepare_context(context.to(dit.dtype), lens, layouts={n_img: layouts[key]})
        # kept (with the tensors it came from, so their ids stay theirs) for the next call
        cached.context = (dit, encoder_hidden_states, stamp(encoder_hidden_states), mask, stamp(mask), ctx)
    with torch.no_grad():
        out = dit(hidden_states, timestep, ctx)
    if not return_dict:
        return (out,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    return Transformer2DModelOutput(sample=out)


def _build_decoder(config: dict, decoder):
    from spar_runtime.dcae import DCAEDecoder, dcae_param_shapes

    state = decoder.state_dict()
    return DCAEDecoder(config, {k: state[k].detach() for k in dcae_param_shapes(config)})


def _decoder_forward(self, hidden_states):
    if _grad_needed(self, hidden_states) or hidden_states.dim() != 4:
        return type(self).forward(self, hidden_states)
    dec = self._spar_decoder.get(self)
    if hidden_states.dtype != dec.dtype:  # mixed dtypes: as stock (which raises or promotes)
        return type(self).forward(self, hidden_states)
    return dec.decode(hidden_states)


def patch_model(model, record) -> None:
    names = _class_names(model)
    if "SanaTransformer2DModel" in names:
        from spar_runtime.sana import SanaConfig
        SanaConfig.from_dict(dict(model.config))    # unsupported configurations are refused here
        record(model, "_spar_dit", _Cached(_build_dit))
        record(model, "forward", types.MethodType(_sana_forward, model))
    elif "AutoencoderDC" in names:
        from spar_runtime.dcae import DCAEConfig
        DCAEConfig.from_dict(dict(model.config))
        record(model.decoder, "_spar_decoder", _Cached(functools.partial(_build_decoder, dict(model.config))))
        record(model.decoder, "forward", types.MethodType(_decoder_forward, model.decoder))
