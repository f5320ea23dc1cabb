"""Tiny SPAR checkpoints built with transformers/diffusers, and the reference composition.

:func:`build_checkpoint` writes a SPAR checkpoint directory (the layout of docs/runtime.md) from
randomly initialized public-library models:

    spar_config.json
    mllm/   InternVLForConditionalGeneration.save_pretrained (or Qwen2ForCausalLM for text-only)
    dit/    SanaTransformer2DModel.save_pretrained
    vae/    AutoencoderDC.save_pretrained
    spar.safetensors   latent queries, DTR, connector (Qwen2Model layer names), projector, and the
                       image tokenizer (tokenizer.*) when the config has one

and returns a :class:`Reference` holding those same library modules. :func:`reference_generate_latents`
is the reference pipeline the issue defines, assembled only from transformers, diffusers and the DTR
formula written out in plain torch, run one sequence at a time without padding: spar_runtime must
reproduce it within fp32 rounding. :class:`ReferenceTokenizer` is the image tokenizer the issue
defines, built from ``nn.TransformerEncoderLayer`` / ``nn.LayerNorm`` / ``nn.Linear``;
:func:`reference_encode_image` runs it on transformers' ``get_image_features``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from spar_runtime.configs import SparConfig, TokenizerConfig, get_config


def _perturb(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Make every parameter random: library inits leave biases at 0 and norm weights at 1,
    which would let a wrong bias or norm go unnoticed."""
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif bool((p == 0).all()):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _connector_config(config: SparConfig):
    from transformers import Qwen2Config

    d = {k: v for k, v in config.text_config.items() if k not in ("architectures", "layer_types")}
    d["num_hidden_layers"] = config.connector_layers
    return Qwen2Config(**d)


@dataclasses.dataclass
class Reference:
    path: str | None
    config: SparConfig
    mllm: torch.nn.Module        # InternVLForConditionalGeneration or Qwen2ForCausalLM
    llm: torch.nn.Module         # its Qwen2Model
    connector: torch.nn.Module   # a Qwen2Model holding the connector layers (embeddings unused)
    dit: torch.nn.Module         # SanaTransformer2DModel
    vae: torch.nn.Module         # AutoencoderDC
    spar: dict                   # the tensors of spar.safetensors
    tokenizer: torch.nn.Module | None = None   # ReferenceTokenizer (its weights are spar's tokenizer.*)


def spar_tensors(config: SparConfig, connector: torch.nn.Module, gen: torch.Generator) -> dict:
    D, K, C, Q = config.hidden_size, len(config.dtr_layers), config.caption_channels, config.num_queries

    def lin(o, i):
        return (torch.rand(o, i, generator=gen) * 2 - 1) / i ** 0.5, (torch.rand(o, generator=gen) * 2 - 1) / i ** 0.5

    t = {"latent_queries": torch.randn(Q, D, generator=gen) * 0.5}
    t["dtr.router.0.weight"], t["dtr.router.0.bias"] = lin(D // 2, D)
    t["dtr.router.2.weight"], t["dtr.router.2.bias"] = lin(K, D // 2)
    t["dtr.router.2.weight"] *= 8  # large enough logits that the softmax weights are far from uniform
    t["dtr.alpha"] = 1 + 0.3 * torch.randn(K, generator=gen)
    t["dtr.norm.weight"] = 1 + 0.1 * torch.randn(D, generator=gen)
    t["dtr.norm.bias"] = 0.1 * torch.randn(D, generator=gen)
    t["dtr.proj.weight"], t["dtr.proj.bias"] = lin(D, D)
    t["projector.weight"], t["projector.bias"] = lin(C, D)
    for name, p in connector.state_dict().items():
        if not name.startswith("embed_tokens"):
            t["connector." + name] = p.detach().clone()
    return {k: v.contiguous() for k, v in t.items()}


class _MLP(torch.nn.Module):
    """``fc2(gelu(fc1(norm(x))))``, LayerNorm eps 1e-6, exact GELU."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d_in, eps=1e-6)
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.fc2 = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class _Stream(torch.nn.Module):
    def __init__(self, D: int, C: int, blocks: int, layers: int = 0, heads: int = 1):
        super().__init__()
        if layers:
            self.layers = torch.nn.ModuleList(
                torch.nn.TransformerEncoderLayer(d_model=D, nhead=heads, dim_feedforward=4 * D, activation="gelu",
                                                 norm_first=True, batch_first=True, layer_norm_eps=1e-6, dropout=0.0)
                for _ in range(layers))
        self.blocks = torch.nn.ModuleList(_MLP(D, D, D) for _ in range(blocks))
        self.head = _MLP(D, C, C)

    def forward(self, x):
        for layer in getattr(self, "layers", ()):
            x = layer(x)
        for blk in self.blocks:
            x = x + blk(x)
        return self.head(x)


class ReferenceTokenizer(torch.nn.Module):
    """The dual-stream tokenizer of issue 12 from plain torch modules; its state_dict names are
    spar.safetensors' ``tokenizer.*`` names without the prefix."""

    def __init__(self, D: int, C: int, pixel_layers: int, pixel_heads: int, mlp_blocks: int):
        super().__init__()
        self.semantic = _Stream(D, C, mlp_blocks)
        self.pixel = _Stream(D, C, mlp_blocks, pixel_layers, pixel_heads)
        self.fusion = _MLP(2 * C, 2 * C, C)

    def forward(self, feats):                       # [B, T, D] -> [B, C, h, w]
        z = self.fusion(torch.cat([self.semantic(feats), self.pixel(feats)], dim=-1))
        B, T, C = z.shape
        h = int(T ** 0.5)
        return z.reshape(B, h, h, C).permute(0, 3, 1, 2)


def build_reference(config: str | SparConfig = "tiny", *, seed: int = 0, text_only: bool = False,
                    with_tokenizer: bool = True) -> Reference:
    """Random transformers/diffusers modules (and spar tensors) for ``config``, in memory (path None)."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import (InternVLConfig, InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM,
                              Qwen2Model)

    config = get_config(config)
    if text_only:
        config = config.replace(mllm_config=dict(config.text_config), tokenizer=None)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if config.is_internvl:
        mllm = InternVLForConditionalGeneration(InternVLConfig.from_dict(config.mllm_config))
        llm = mllm.model.language_model
    else:
        mllm = Qwen2ForCausalLM(Qwen2Config.from_dict(config.mllm_config))
        llm = mllm.model
    connector = Qwen2Model(_connector_config(config))
    dit = SanaTransformer2DModel.from_config(config.dit_config)
    vae = AutoencoderDC.from_config(config.vae_config)
    tok = None
    if config.tokenizer is not None:
        tok = ReferenceTokenizer(config.hidden_size, config.latent_channels,
                                 **TokenizerConfig.from_dict(config.tokenizer).to_dict())
    for m in (mllm, connector, dit, vae) + ((tok,) if tok is not None else ()):
        _perturb(m, gen)
        m.eval().float()
    spar = spar_tensors(config, connector, gen)
    if tok is not None and with_tokenizer:
        spar.update({"tokenizer." + k: v.detach().clone().contiguous() for k, v in tok.state_dict().items()})
    return Reference(None, config, mllm, llm, connector, dit, vae, spar, tok)


def build_checkpoint(root: str, config: str | SparConfig = "tiny", *, seed: int = 0, text_only: bool = False,
                     shard_mllm: bool = False, with_tokenizer: bool = True) -> Reference:
    """Write a random SPAR checkpoint to ``root`` and return the library modules that hold its weights
    (``with_tokenizer=False``: spar.safetensors without the optional tokenizer.* tensors)."""
    ref = build_reference(config, seed=seed, text_only=text_only, with_tokenizer=with_tokenizer)
    config = ref.config
    os.makedirs(root, exist_ok=True)
    ref.mllm.save_pretrained(os.path.join(root, config.mllm), **({"max_shard_size": "200KB"} if shard_mllm else {}))
    ref.dit.save_pretrained(os.path.join(root, config.dit))
    ref.vae.save_pretrained(os.path.join(root, config.vae))
    save_file(ref.spar, os.path.join(root, "spar.safetensors"))
    with open(os.path.join(root, "spar_config.json"), "w") as f:
        json.dump(config.spar_json(), f, indent=1)
    ref.path = root
    return ref


# ---- the reference composition ------------------------------------------------------------------

@torch.no_grad()
def reference_prefill(ref: Reference, ids: torch.Tensor):
    """All L+1 hidden states of ONE sequence (prompt + latent queries), as transformers returns them."""
    emb = ref.llm.get_input_embeddings()(ids.long()[None])                    # [1, n, D]
    x = torch.cat([emb, ref.spar["latent_queries"][None].to(emb.dtype)], dim=1)  # queries after the prompt
    return ref.llm(inputs_embeds=x, output_hidden_states=True).hidden_states  # L+1 x [1, n, D]


@torch.no_grad()
def reference_dtr(ref: Reference, hs) -> torch.Tensor:
    """DTR written from its definition (SPAR_MODEL.md), fp32 mixture and LayerNorm."""
    cfg, s = ref.config, ref.spar
    H = torch.stack([hs[i][0] for i in cfg.dtr_layers])                       # [K, n, D]
    h = F.linear(hs[cfg.dtr_layers[-1]][0], s["dtr.router.0.weight"], s["dtr.router.0.bias"])
    logits = F.linear(F.silu(h), s["dtr.router.2.weight"], s["dtr.router.2.bias"])
    w = torch.softmax(logits.float() / cfg.dtr_tau, dim=-1)                   # [n, K]
    m = torch.einsum("nk,k,knd->nd", w, s["dtr.alpha"].float(), H.float())
    m = F.layer_norm(m, (m.shape[-1],), s["dtr.norm.weight"].float(), s["dtr.norm.bias"].float(), cfg.dtr_norm_eps)
    return F.linear(m.to(H.dtype), s["dtr.proj.weight"], s["dtr.proj.bias"])


@torch.no_grad()
def reference_connector(ref: Reference, routed: torch.Tensor) -> torch.Tensor:
    """The connector run bidirectionally through a zero 4-D additive mask, then the projector."""
    n, s = routed.shape[0], ref.spar
    mask = torch.zeros(1, 1, n, n, dtype=routed.dtype)
    c = ref.connector(inputs_embeds=routed[None], attention_mask=mask).last_hidden_state[0]
    return F.linear(c, s["projector.weight"], s["projector.bias"])


@torch.no_grad()
def reference_context(ref: Reference, ids: torch.Tensor) -> torch.Tensor:
    """DiT context [n + Q, caption_channels] of ONE sequence: LLM -> DTR -> connector -> projector."""
    return reference_connector(ref, reference_dtr(ref, reference_prefill(ref, ids)))


def reference_scheduler(sampler: str, num_steps: int, shift: float):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if sampler == "dpmsolver++2m":
        sched = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=shift, solver_order=2, algorithm_type="dpmsolver++")
    elif sampler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    else:
        raise ValueError(sampler)
    sched.set_timesteps(num_steps)
    return sched


@torch.no_grad()
def reference_denoise(ref: Reference, ctx_c: torch.Tensor, ctx_u: torch.Tensor, noise: torch.Tensor, *,
                      num_steps: int, guidance: float, sampler: str, shift: float) -> torch.Tensor:
    """One image: the scheduler driven from Python, the DiT called once per branch and step with the
    scheduler's timesteps cast to integers (DPM-Solver++ makes them int64 already; Euler's float
    sigma * 1000 are truncated), guidance in fp32."""
    sched = reference_scheduler(sampler, num_steps, shift)
    x = noise.clone()
    dtype = next(ref.dit.parameters()).dtype
    for t in sched.timesteps:
        tt = t.reshape(1).long()
        v_c = ref.dit(x.to(dtype), encoder_hidden_states=ctx_c, timestep=tt).sample.float()
        v_u = ref.dit(x.to(dtype), encoder_hidden_states=ctx_u, timestep=tt).sample.float()
        v = v_u + guidance * (v_c - v_u)
        x = sched.step(v, t, x).prev_sample
    return x


@torch.no_grad()
def reference_generate_latents(ref: Reference, prompt_ids, uncond_ids, noise, *, num_steps=20, guidance=4.5,
                               sampler="dpmsolver++2m", shift=None):
    """The reference pipeline, one image and one sequence at a time, the scheduler driven from Python."""
    cfg = ref.config
    shift = cfg.flow_shift if shift is None else shift
    if isinstance(uncond_ids, torch.Tensor) and uncond_ids.dim() == 1:
        uncond_ids = [uncond_ids] * len(prompt_ids)
    outs = []
    for b, (pc, pu) in enumerate(zip(prompt_ids, uncond_ids)):
        ctx_c, ctx_u = reference_context(ref, pc)[None], reference_context(ref, pu)[None]
        outs.append(reference_denoise(ref, ctx_c, ctx_u, noise[b:b + 1].float(), num_steps=num_steps,
                                      guidance=guidance, sampler=sampler, shift=shift))
    return torch.cat(outs)


@torch.no_grad()
def reference_decode(ref: Reference, latents: torch.Tensor) -> torch.Tensor:
    dtype = next(ref.vae.parameters()).dtype
    return ref.vae.decode((latents / ref.config.vae_scale_factor).to(dtype)).sample


@torch.no_grad()
def reference_encode_image(ref: Reference, pixel_values: torch.Tensor) -> torch.Tensor:
    """transformers' get_image_features, then the ReferenceTokenizer: the latent [B, C, h, w]."""
    feats = ref.mllm.get_image_features(pixel_values=pixel_values).pooler_output      # [B, T, D]
    return ref.tokenizer(feats)
