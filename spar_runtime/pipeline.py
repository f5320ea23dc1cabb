"""SparPipeline: text-to-image, editing and image understanding for SPAR, top to bottom.

One generation call (:meth:`SparPipeline.generate_latents`):

1. pack the CFG batch without padding: conditional rows ``prompt_b + queries`` for every image,
   then unconditional rows ``uncond_b + queries``; RoPE positions 0..n-1 per row; the causal
   and bidirectional attention layouts are built once for the call;
2. LLM prefill over the packed batch, every layer's hidden state written into one preallocated
   ``[L+1, N, D]`` buffer (transformers' ``output_hidden_states`` convention);
3. DTR (router GEMMs + ``spar_kernels.route_layers`` + projection), the connector (Qwen2 decoder
   layers, bidirectional within each row), the projector: the DiT context ``[N, caption_channels]``;
4. the DiT's context (caption projection, norm and every block's cross-attention keys/values)
   prepared once; then ``num_steps`` DiT calls on the CFG batch of 2B latents, each followed by
   one ``spar_kernels.FlowSampler`` step (guidance ``v_u + g (v_c - v_u)`` and the solver, fp32,
   schedule and step counter on the device).

:meth:`decode` divides by ``vae_scale_factor`` and runs the DC-AE decoder. Per-stage wall times of
the last calls are kept in :attr:`SparPipeline.timings` (seconds).

With ``graphs`` on (the default on CUDA) text-to-image runs the same stages from a static plan of
:mod:`spar_runtime.engine` (the DiT context in fixed slots, persistent buffers, no host sync, the step
captured in a CUDA graph); ``quantization="fp8"`` swaps the linears for :mod:`spar_runtime.fp8`'s
W8A8 weights at load. This module validates arguments and delegates.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import time
import weakref
from typing import Callable, Sequence

import torch

import spar_kernels as sk

from . import configs as _configs
from .configs import SparConfig
from .dcae import DCAEDecoder
from .dcae import random_weights as _vae_random_weights
from .dtr import DynamicTokenRouting
from .engine import Engine, staged_copy
from .fp8 import check_fp8_device, linear, quantize_linears
from . import image_tokenizer as _itok
from .internvl import MLLM
from .internvl import random_weights as _mllm_random_weights
from .loading import PICKLE_SUFFIXES, CheckpointError, check_state_dict, default_dtype, load_safetensors_file
from .qwen2 import DecoderStack, Qwen2Config, bidirectional_layout, causal_layout, packed_positions
from .sana import SanaDiT
from .sana import random_weights as _dit_random_weights
from .tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["SparPipeline", "SAMPLERS", "spar_random_weights"]

SAMPLERS = ("dpmsolver++2m", "euler")
QUANTIZATIONS = (None, "fp8")
STAGES = ("prefill", "dtr", "connector", "dit_loop", "decode")

# The unconditional prompt of the CFG batch: a fixed short instruction (SPAR_MODEL.md), not "".
UNCOND_PROMPT = "Generate an image."


def spar_random_weights(config: SparConfig, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random float32 CPU tensors for ``spar.safetensors`` (fan-in scaled; norms near 1, alpha near 1),
    the image tokenizer's included when the config has one."""
    out = {}
    if config.tokenizer is not None:
        out.update(_itok.random_weights(_configs.TokenizerConfig.from_dict(config.tokenizer), config.hidden_size,
                                        config.latent_channels, generator))
    for name, shape in config.spar_param_shapes().items():
        if name == "latent_queries":
            out[name] = 0.02 * torch.randn(shape, generator=generator)
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight") or name == "dtr.alpha":
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            out[name] = 0.02 * torch.randn(shape, generator=generator)
        else:
            out[name] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
    return out


def _check_seed(seed) -> int:
    """``seed`` as the int torch.Generator.manual_seed takes (any integer type; -2**63 <= seed < 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [-2**63, 2**64), got {seed}")
    return seed


def _default_device_dtype(device, dtype):
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if device.type == "cpu":
        device = torch.device("cpu")  # one CPU device: "cpu:0" is "cpu" (CPU tensors report no index)
    elif device.type != "cuda":
        raise ValueError(f"device: expected cpu or cuda, got {device}")
    elif not torch.cuda.is_available():
        raise ValueError(f"device: {device} was asked for, but this torch has no usable CUDA device")
    if dtype is None:
        dtype = default_dtype(device)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return device, dtype


def _check_engine_args(device: torch.device, quantization, graphs) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: expected one of {QUANTIZATIONS}, got {quantization!r}")
    if graphs is not None and not isinstance(graphs, bool):
        raise TypeError(f"graphs: expected True, False or None (on for CUDA), got {graphs!r}")
    if quantization == "fp8":
        check_fp8_device(device)


def _as_ids(name: str, ids, vocab: int, *, allow_empty: bool) -> torch.Tensor:
    """A 1-D int64 CPU tensor of token ids from a tensor or a list of ints, range-checked."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name}: expected a 1-D integer tensor of token ids, got shape {tuple(ids.shape)} "
                             f"dtype {ids.dtype}")
        t = ids.detach().to("cpu", torch.int64)
    elif isinstance(ids, (list, tuple)):
        bad = [i for i, v in enumerate(ids) if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise TypeError(f"{name}: expected a list of ints (token ids), but item {bad[0]} is "
                            f"{type(ids[bad[0]]).__name__} {ids[bad[0]]!r}")
        t = torch.tensor([int(v) for v in ids], dtype=torch.int64)
    else:
        raise TypeError(f"{name}: expected a 1-D integer tensor or a list of ints, got {type(ids).__name__}")
    if t.numel() == 0 and not allow_empty:
        raise ValueError(f"{name}: empty prompt (no token ids); expected at least one token")
    a = t.numpy()   # host values, read without dispatching tensor ops
    if a.size and (a.min() < 0 or a.max() >= vocab):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab}), got min {int(a.min())} max {int(a.max())}")
    return t


def _check_sampler(sampler) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")


# component (MLLM, SanaDiT) -> the live pipelines built on it (a registry, not an attribute of the
# component: a WeakSet attribute would make the component impossible to deepcopy)
_USERS: "weakref.WeakKeyDictionary[object, weakref.WeakSet]" = weakref.WeakKeyDictionary()


def _claim_components(pipe, quantization) -> None:
    """Record ``pipe`` as a user of its MLLM and DiT, whose linears ``quantization="fp8"`` converts
    in place: refuse that while another live pipeline uses them (its results would change under
    it), and refuse components another pipeline already converted for a pipeline that is not FP8."""
    for name, part in (("mllm", pipe.mllm), ("dit", pipe.dit)):
        users = _USERS.setdefault(part, weakref.WeakSet())
        others = [p for p in users if p is not pipe]
        if quantization == "fp8" and others:
            raise ValueError(f"{name}: already used by another SparPipeline, and quantization='fp8' converts its "
                             "linears in place, which would change that pipeline's results; build this one from "
                             "separate components (loaded or built again)")
        if quantization != "fp8" and any(p.quantization == "fp8" for p in others):
            raise ValueError(f"{name}: its linears were converted to FP8 in place by another SparPipeline "
                             "(quantization='fp8'); pass quantization='fp8' or separate components")
        users.add(pipe)


class SparPipeline:
    """A loaded SPAR model: MLLM (+ latent queries, DTR, connector, projector), SANA DiT, DC-AE decoder.

    Build it with :meth:`from_pretrained` (a checkpoint directory) or :meth:`random` (a config,
    random weights, no files).
    """

    def __init__(self, config: SparConfig, mllm: MLLM, spar_weights: dict[str, torch.Tensor], dit: SanaDiT,
                 vae: DCAEDecoder, *, tokenizer=None, device=None, dtype=None, where: str = "spar.safetensors",
                 quantization: str | None = None, graphs: bool | None = None):
        self.config = config
        self.device, self.dtype = _default_device_dtype(device, dtype)
        _check_engine_args(self.device, quantization, graphs)
        spar_weights, tok_weights = _itok.split_weights(spar_weights, config, where)
        check_state_dict(spar_weights, config.spar_param_shapes(), where)
        w = {k: v.to(self.device, self.dtype) for k, v in spar_weights.items()}
        self.mllm, self.dit, self.vae, self.tokenizer = mllm, dit, vae, tokenizer
        for name, part in (("mllm", mllm), ("dit", dit), ("vae", vae)):
            dev = torch.device(part.device)
            same_device = dev.type == self.device.type and self.device.index in (None, dev.index)
            if not same_device or part.dtype != self.dtype:
                raise ValueError(f"{name}: its weights are {part.dtype} on {part.device}, expected {self.dtype} "
                                 f"on {self.device} (the pipeline's)")
        self.latent_queries = w["latent_queries"]
        self.dtr = DynamicTokenRouting({k[4:]: v for k, v in w.items() if k.startswith("dtr.")}, config.dtr_layers,
                                       tau=config.dtr_tau, eps=config.dtr_norm_eps)
        text_cfg = Qwen2Config.from_dict(config.text_config)
        self.connector = DecoderStack(text_cfg, {k[10:]: v for k, v in w.items() if k.startswith("connector.")},
                                      config.connector_layers, norm=True)
        self.projector_weight, self.projector_bias = w["projector.weight"], w["projector.bias"]
        self.vocab_size = int(config.text_config["vocab_size"])
        # the dual-stream image tokenizer (optional: None when spar.safetensors has no tokenizer.*)
        self.image_tokenizer = _itok.build(config, tok_weights, self.device, self.dtype, where)
        self.timings: dict[str, float] = {}
        self.sync_timings = False  # synchronize the device at stage boundaries (exact per-stage times)
        # FP8: every eligible linear of the LLM, connector, DTR, projector and DiT, quantized here
        _claim_components(self, quantization)
        self.quantization = quantization
        self.quantized = quantize_linears(self._linear_slots()) if quantization == "fp8" else {}
        # graphs: text-to-image runs from static plans (CUDA graphs on CUDA); None = on for CUDA
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        self.engine = Engine(self, graphs=self.graphs)

    def _linear_slots(self):
        """(name, owner, key) of every linear weight FP8 quantization applies to."""
        slots = []
        for prefix, stack in (("mllm.layers", self.mllm.lm.model), ("connector.layers", self.connector)):
            for i, layer in enumerate(stack.layers):
                slots += [(f"{prefix}.{i}.{k}", layer, k) for k in ("w_qkv", "w_o", "w_gate_up", "w_down")]
        slots += [(f"dtr.{k}", self.dtr.w, k) for k in ("router.0.weight", "router.2.weight", "proj.weight")]
        slots.append(("projector.weight", self, "projector_weight"))
        dit = self.dit
        slots += [(f"dit.{k}", dit, k) for k in ("w_patch", "w_t1", "w_t2", "w_tmod", "w_c1", "w_c2", "w_out")]
        for i, blk in enumerate(dit.blocks):
            slots += [(f"dit.blocks.{i}.{k}", blk, k)
                      for k in ("w_qkv", "w_o1", "w_q2", "w_kv2", "w_o2", "w_inv", "w_pt")]
        return slots

    def graph_cache_info(self) -> dict[str, int]:
        """``{"plans": plans built, "replays": denoising steps run from a plan}`` (see engine.py)."""
        return self.engine.info()

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device=None, dtype=None, quantization: str | None = None,
                        graphs: bool | None = None) -> "SparPipeline":
        """Load a SPAR checkpoint directory (layout in docs/runtime.md): ``spar_config.json``,
        ``mllm/``, ``dit/``, ``vae/`` in their public formats, and ``spar.safetensors``.
        ``quantization="fp8"`` quantizes the linears at load (the files are not changed);
        ``graphs`` (None: on for CUDA) runs text-to-image from static plans."""
        path = os.fspath(path)
        config = SparConfig.from_dir(path)
        device, dtype = _default_device_dtype(device, dtype)
        _check_engine_args(device, quantization, graphs)
        spar_file = os.path.join(path, "spar.safetensors")
        if not os.path.isfile(spar_file):
            pickles = [n for n in os.listdir(path) if n.startswith("spar") and n.lower().endswith(PICKLE_SUFFIXES)]
            hint = (f" (found {', '.join(pickles)}: pickle files are refused, convert to safetensors)"
                    if pickles else "")
            raise CheckpointError(f"{path}: spar.safetensors not found{hint}")
        spar = load_safetensors_file(spar_file)
        check_state_dict(_itok.split_weights(spar, config, spar_file)[0], config.spar_param_shapes(), spar_file)
        mllm = MLLM.from_dir(os.path.join(path, config.mllm), device=device, dtype=dtype)
        dit = SanaDiT.from_dir(os.path.join(path, config.dit), device=device, dtype=dtype)
        vae = DCAEDecoder.from_dir(os.path.join(path, config.vae), device=device, dtype=dtype)
        tokenizer = load_tokenizer(os.path.join(path, config.mllm))
        return cls(config, mllm, spar, dit, vae, tokenizer=tokenizer, device=device, dtype=dtype, where=spar_file,
                   quantization=quantization, graphs=graphs)

    @classmethod
    def random(cls, config: str | SparConfig, seed: int = 0, *, device=None, dtype=None,
               quantization: str | None = None, graphs: bool | None = None) -> "SparPipeline":
        """A pipeline with random weights for ``config`` (a :class:`SparConfig` or a name in
        ``spar_runtime.configs.CONFIGS``); reads and writes no files. Its tokenizer is a
        :class:`ByteTokenizer` when the vocabulary holds the 256 byte ids, else None."""
        config = _configs.get_config(config)
        device, dtype = _default_device_dtype(device, dtype)
        _check_engine_args(device, quantization, graphs)
        gen = torch.Generator().manual_seed(_check_seed(seed))

        def place(ws):
            return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in ws.items()}

        mllm = MLLM(config.mllm_config, place(_mllm_random_weights(config.mllm_config, gen)))
        spar = spar_random_weights(config, gen)
        dit = SanaDiT(config.dit_config, place(_dit_random_weights(config.dit_config, gen)))
        vae = DCAEDecoder(config.vae_config, place(_vae_random_weights(config.vae_config, gen)))
        tok = ByteTokenizer(int(config.text_config["vocab_size"])) if ByteTokenizer.fits(config) else None
        return cls(config, mllm, spar, dit, vae, tokenizer=tok, device=device, dtype=dtype, where="random weights",
                   quantization=quantization, graphs=graphs)

    # ---- timing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stage(self, name: str):
        if self.sync_timings and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.sync_timings and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = time.perf_counter() - t0

    # ---- conditioning ---------------------------------------------------------------------------
    def _check_generate_args(self, prompt_ids, uncond_ids, noise, num_steps, guidance, sampler, shift):
        if isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() == 2:
            prompt_ids = list(prompt_ids)             # [B, n]: B prompts of n tokens
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise TypeError("prompt_ids: expected a non-empty list of 1-D token-id sequences (one per image), got "
                            f"{type(prompt_ids).__name__}" + (" (empty)" if isinstance(prompt_ids, (list, tuple)) else ""))
        odd = [b for b, p in enumerate(prompt_ids) if not isinstance(p, (torch.Tensor, list, tuple))]
        if odd:
            raise TypeError(f"prompt_ids[{odd[0]}]: expected a 1-D token-id sequence (a list of ints or an integer "
                            f"tensor), got {type(prompt_ids[odd[0]]).__name__}")
        B = len(prompt_ids)
        prompts = [_as_ids(f"prompt_ids[{b}]", p, self.vocab_size, allow_empty=False) for b, p in enumerate(prompt_ids)]
        if isinstance(uncond_ids, torch.Tensor) and uncond_ids.dim() == 2:
            uncond_ids = list(uncond_ids)             # [B, n]: one per image
        one = isinstance(uncond_ids, torch.Tensor) or (
            isinstance(uncond_ids, (list, tuple)) and all(isinstance(i, numbers.Integral) for i in uncond_ids))
        if one:
            u = _as_ids("uncond_ids", uncond_ids, self.vocab_size, allow_empty=True)
            unconds = [u] * B
        elif isinstance(uncond_ids, (list, tuple)) and len(uncond_ids) == B:
            unconds = [_as_ids(f"uncond_ids[{b}]", u, self.vocab_size, allow_empty=True)
                       for b, u in enumerate(uncond_ids)]
        else:
            raise ValueError(f"uncond_ids: expected one 1-D token-id sequence or one per image ({B}), got "
                             f"{len(uncond_ids) if isinstance(uncond_ids, (list, tuple)) else type(uncond_ids).__name__}"
                             " sequences")
        C = self.config.latent_channels
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f"noise: expected a floating-point tensor [B, {C}, h, w], got "
                            f"{getattr(noise, 'dtype', type(noise).__name__)}")
        if noise.dim() != 4 or noise.shape[0] != B or noise.shape[1] != C or min(noise.shape[2:]) < 1:
            raise ValueError(f"noise: expected shape [{B}, {C}, h, w] ({B} prompts, {C} latent channels), "
                             f"got {tuple(noise.shape)}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance):
            raise ValueError(f"guidance: expected a finite float, got {guidance!r}")
        _check_sampler(sampler)
        shift = self.config.flow_shift if shift is None else shift
        if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not (shift > 0 and math.isfinite(shift)):
            raise ValueError(f"shift: expected a finite float > 0 (or None for the config's flow_shift), got {shift!r}")
        return prompts, unconds, float(shift), int(num_steps), float(guidance)

    def _check_image_embeds(self, image_embeds, prompts, unconds) -> torch.Tensor:
        """Editing: one image, whose [T, D] embeddings fill the T placeholders of the prompt and of
        the unconditional prompt. Returns the rows for both, in packed order."""
        D, img_id = self.config.hidden_size, self.mllm.image_token_id
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 2 or image_embeds.shape[1] != D \
                or not image_embeds.is_floating_point():
            raise ValueError(f"image_embeds: expected a float [T, {D}] tensor, got "
                             f"{tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__}")
        if len(prompts) != 1:
            raise ValueError(f"image_embeds: editing takes one prompt (one image), got {len(prompts)} prompts")
        T = image_embeds.shape[0]
        for name, ids in (("prompt_ids[0]", prompts[0]), ("uncond_ids", unconds[0])):
            n = int((ids == img_id).sum()) if img_id is not None else 0
            if n != T:
                raise ValueError(f"{name}: holds {n} image placeholders (id {img_id}), expected {T} "
                                 "(the rows of image_embeds)")
        emb = image_embeds.to(self.device, self.dtype)
        return torch.cat([emb, emb])

    # The stages of one generation call, each a method so bench/ can time them one by one.
    def prefill(self, sequences: Sequence[torch.Tensor], image_embeds: torch.Tensor | None = None) -> dict:
        """Pack ``sequences`` (1-D CPU int64 ids, checked by the caller) + the latent queries and run the
        LLM over them, every hidden state into one ``[L+1, N, D]`` buffer. ``image_embeds``: the rows
        that replace the image-token placeholders, in order of appearance (editing)."""
        cfg, dev, dt = self.config, self.device, self.dtype
        Q, D, L = cfg.num_queries, cfg.hidden_size, self.mllm.lm.model.num_layers
        lengths = [int(s.numel()) + Q for s in sequences]
        N = sum(lengths)
        ids = torch.cat(list(sequences)).to(dev)
        tok = self.mllm.embed_tokens(ids)                                       # [sum n_b, D]
        image_rows = None
        if image_embeds is not None:
            # editing: the placeholders take the image embeddings; remember their packed rows
            is_img = ids == self.mllm.image_token_id
            tok[is_img] = image_embeds.to(dt)
            starts = [sum(lengths[:b]) for b in range(len(lengths))]
            image_rows = torch.cat([torch.arange(st, st + s.numel()) for st, s in zip(starts, sequences)])
            image_rows = image_rows.to(dev)[is_img]
        hidden = torch.empty((L + 1, N, D), device=dev, dtype=dt)                 # every hidden state
        pieces, start = [], 0
        for s in sequences:
            n = int(s.numel())
            pieces += [tok[start:start + n], self.latent_queries]
            start += n
        torch.cat(pieces, out=hidden[0])                                          # prompt_b + queries, packed
        positions = packed_positions(lengths, device=dev)
        self.mllm.lm.forward(hidden[0], causal_layout(lengths, device=dev), positions, hidden_out=hidden)
        return {"hidden": hidden, "lengths": lengths, "positions": positions, "image_rows": image_rows,
                "image_embeds": image_embeds}

    def route(self, state: dict) -> torch.Tensor:
        """DTR over the hidden-state buffer -> ``[N, D]``; editing puts the raw image embeddings back."""
        routed = self.dtr(state["hidden"])
        if state["image_rows"] is not None:
            routed[state["image_rows"]] = state["image_embeds"].to(self.dtype)
        return routed

    def connect(self, routed: torch.Tensor, state: dict) -> torch.Tensor:
        """Connector (bidirectional within each row) + projector -> DiT context ``[N, caption_channels]``."""
        lengths = state["lengths"]
        c = self.connector(routed, bidirectional_layout(lengths, device=self.device), state["positions"])
        return linear(c, self.projector_weight, self.projector_bias)

    @torch.inference_mode()
    def encode_prompts(self, sequences: Sequence[torch.Tensor], image_embeds: torch.Tensor | None = None):
        """DiT context of packed sequences (LLM -> DTR -> connector -> projector), timed per stage.
        Returns ``(context [N, caption_channels], lengths)``, lengths = len(seq) + num_queries."""
        with self._stage("prefill"):
            state = self.prefill(sequences, image_embeds)
        with self._stage("dtr"):
            routed = self.route(state)
        with self._stage("connector"):
            context = self.connect(routed, state)
        return context, state["lengths"]

    def denoise(self, context: torch.Tensor, lengths: Sequence[int], noise: torch.Tensor, num_steps: int,
                guidance: float, sampler: str, shift: float, callback=None, start_step: int = 0) -> torch.Tensor:
        """The DiT loop on the CFG batch [cond rows; uncond rows] (context rows in that order);
        with ``start_step`` k the first k of ``num_steps`` steps are skipped (``noise`` is then the
        state at the k-th sigma), as diffusers' schedulers run after ``set_begin_index(k)``."""
        B = noise.shape[0]
        ctx = self.dit.prepare_context(context, list(lengths))      # cross-attention K/V, once per call
        solver = self._sampler(sampler, num_steps, shift, guidance)
        timesteps = self._dit_timesteps(solver)
        if start_step:
            solver, timesteps = _itok.tail_sampler(solver, timesteps, sampler, start_step, guidance)
            num_steps -= start_step
        x = torch.empty(noise.shape, device=self.device, dtype=torch.float32)   # the solver state stays fp32
        if noise.device.type == "cpu":
            staged_copy(x, noise.float())                              # pinned, non-blocking on CUDA
        else:
            x.copy_(noise)
        x_in = torch.empty((2 * B,) + tuple(x.shape[1:]), device=self.device, dtype=self.dtype)
        p = self.dit.config.patch_size
        ctx.layout((x.shape[2] // p) * (x.shape[3] // p))          # the cross layout, built before the loop
        fused_cfg = guidance > 1.0
        for i in range(num_steps):
            x_in[:B].copy_(x)
            x_in[B:].copy_(x)
            v = self.dit(x_in, timesteps[i].expand(2 * B), ctx)
            if fused_cfg:
                x = solver.step(x, v[:B], v[B:])
            else:  # FlowSampler guides only when g > 1; the CFG formula holds for every g
                v_u = v[B:].float()
                x = solver.step(x, v_u + guidance * (v[:B].float() - v_u))
            if callback is not None:
                callback(i + 1, num_steps)
        return x

    def _sampler(self, sampler: str, num_steps: int, shift: float, guidance: float):
        return sk.FlowSampler(sampler, num_steps=num_steps, shift=shift, guidance=guidance, device=self.device)

    @staticmethod
    def _dit_timesteps(solver) -> torch.Tensor:
        """The DiT's timesteps: the scheduler's, cast to integers (DPM-Solver++'s already are:
        trunc(sigma * 1000); Euler's float32 sigma * 1000 are truncated the same way)."""
        t = solver.timesteps
        return t.long() if t.is_floating_point() else t

    # ---- generation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_latents(self, prompt_ids, *, uncond_ids, noise, num_steps=20, guidance=4.5,
                         sampler="dpmsolver++2m", shift=None, image_embeds=None,
                         callback: Callable[[int, int], None] | None = None, start_step: int = 0) -> torch.Tensor:
        """Denoise ``noise`` into latents conditioned on ``prompt_ids``.

        Args:
            prompt_ids: a list of 1-D token-id sequences (tensors or lists of ints), one per image
                (a 2-D ``[B, n]`` integer tensor is taken as B sequences).
            uncond_ids: the unconditional sequence: one for every image, or a list of one per image
                (may be empty: the row is then the latent queries alone).
            noise: the initial latent ``[B, latent_channels, h, w]`` (B = len(prompt_ids)).
            num_steps: solver steps (>= 1). guidance: CFG scale g in ``v_u + g (v_c - v_u)``.
            sampler: ``"dpmsolver++2m"`` (the flow DPM-Solver++ 2M of diffusers'
                DPMSolverMultistepScheduler with flow sigmas) or ``"euler"`` (the sigmas of
                FlowMatchEulerDiscreteScheduler).
            shift: the flow shift (None: the config's ``flow_shift``).
            image_embeds: editing only (one prompt): the reference image's ``[T, D]`` embeddings
                (``mllm.encode_images``), placed at the T image placeholders of the prompt and of
                the unconditional prompt, and written back over those rows after DTR.
            callback: called as ``callback(step, steps_run)`` after every step (progress bars).
            start_step: image-to-image: skip the first ``start_step`` steps; ``noise`` is then the
                state at that step's sigma (``(1 - sigma) z + sigma * noise``, see :meth:`edit`).

        Returns:
            the final latent, float32 ``[B, latent_channels, h, w]`` on the pipeline's device.
        """
        prompts, unconds, shift, num_steps, guidance = self._check_generate_args(
            prompt_ids, uncond_ids, noise, num_steps, guidance, sampler, shift)
        img = None if image_embeds is None else self._check_image_embeds(image_embeds, prompts, unconds)
        if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral) \
                or not 0 <= start_step < num_steps:
            raise ValueError(f"start_step: expected an int in [0, num_steps = {num_steps}), got {start_step!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback: expected a callable (step, steps_run) or None, got {type(callback).__name__}")
        t_start = time.perf_counter()
        if self.graphs and img is None and not start_step:
            # text to image from a static plan (engine.py): the DiT context in fixed slots, no host sync
            x = self.engine.generate_latents(prompts + unconds, noise, num_steps, guidance, sampler, shift, callback)
            self.timings["total"] = time.perf_counter() - t_start
            return x
        # 1-3. the CFG batch packed without padding: conditional rows, then unconditional rows
        context, lengths = self.encode_prompts(prompts + unconds, img)
        # 4. the DiT loop
        with self._stage("dit_loop"):
            x = self.denoise(context, lengths, noise, num_steps, guidance, sampler, shift, callback, int(start_step))
        self.timings["total"] = time.perf_counter() - t_start
        return x

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """DC-AE decode of ``latents / vae_scale_factor``: ``[B, 3, H, W]``, unclamped, in the pipeline's dtype."""
        C = self.config.latent_channels
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != C or latents.shape[0] < 1:
            raise ValueError(f"latents: expected a [B, {C}, h, w] tensor with B >= 1, got "
                             f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        with self._stage("decode"):
            z = (latents.to(self.device, torch.float32) / self.config.vae_scale_factor).to(self.dtype)
            return self.vae.decode(z)

    @staticmethod
    def to_pil(images: torch.Tensor):
        """``[B, 3, H, W]`` decoder outputs in [-1, 1] -> a list of PIL RGB images."""
        from PIL import Image

        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected a [B, 3, H, W] tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        arr = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    # ---- text in, images out (needs a tokenizer) ------------------------------------------------
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what}: this checkpoint has no tokenizer (tokenizer.json in the mllm folder); "
                             "pass token ids to generate_latents instead")
        return self.tokenizer

    def _t2i_ids(self, text: str, image_tokens: int = 0) -> torch.Tensor:
        tok = self._need_tokenizer("prompt")
        return torch.tensor(tok.chat_ids(text, image_tokens=image_tokens, image_token_id=self.mllm.image_token_id,
                                         generation=True), dtype=torch.int64)

    def _noise(self, B: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_check_seed(seed))
        s = self.config.latent_size
        return torch.randn((B, self.config.latent_channels, s, s), generator=g)

    def generate(self, prompt: str | Sequence[str], *, negative_prompt: str | None = None, num_steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, sampler: str = "dpmsolver++2m", shift=None,
                 callback=None):
        """Text to image: returns a list of PIL images (one per prompt)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"prompt: expected a non-empty string or list of non-empty strings, got {prompt!r}")
        ids = [self._t2i_ids(p) for p in prompts]
        uncond = self._t2i_ids(negative_prompt if negative_prompt is not None else UNCOND_PROMPT)
        lat = self.generate_latents(ids, uncond_ids=uncond, noise=self._noise(len(ids), seed),
                                    num_steps=self.config.num_steps if num_steps is None else num_steps,
                                    guidance=self.config.guidance if guidance is None else guidance,
                                    sampler=sampler, shift=shift, callback=callback)
        return self.to_pil(self.decode(lat))

    def edit(self, image, instruction: str, *, num_steps: int | None = None, guidance: float | None = None,
             seed: int = 0, sampler: str = "dpmsolver++2m", shift=None, callback=None, strength=None):
        """Image editing: the reference image's ViT tokens sit in both CFG prompts; after DTR their
        positions carry the raw ViT embeddings. Returns a list with one PIL image.

        ``strength`` s in (0, 1] (diffusers' image-to-image name): the first ``num_steps -
        int(num_steps * s)`` steps are skipped and the loop starts from ``(1 - sigma) * z_ref +
        sigma * noise``, z_ref = :meth:`encode_image` of the reference image, sigma = the schedule's
        sigma at the first step run: small s stays close to the input. None or 1 skips nothing and
        starts from pure noise (today's edit, no image tokenizer needed)."""
        if self.mllm.vision is None:
            raise ValueError("image: this checkpoint's MLLM is text-only (no vision tower); editing needs InternVL")
        if not isinstance(instruction, str) or not instruction:
            raise ValueError(f"instruction: expected a non-empty string, got {instruction!r}")
        pixel_values = self.preprocess(image)
        if pixel_values.shape[0] != 1:
            raise ValueError(f"image: edit takes one reference image, got a batch of {pixel_values.shape[0]} "
                             "(call edit once per image)")
        with torch.inference_mode():
            emb = self.mllm.encode_images(pixel_values)                  # [T, D]
        T = emb.shape[0]
        ids = self._t2i_ids(instruction, image_tokens=T)
        uncond = self._t2i_ids(UNCOND_PROMPT, image_tokens=T)
        steps = self.config.num_steps if num_steps is None else num_steps   # 0 is an error, not the default
        guidance = self.config.guidance if guidance is None else guidance
        noise, start = self._noise(1, seed), 0
        if strength is not None:
            start = _itok.strength_start_step(steps, strength)
        if start:   # image-to-image: start from the reference latent noised to the first sigma run
            _check_sampler(sampler)   # before the schedule it names is built
            sched_shift = self.config.flow_shift if shift is None else shift
            sigma = self._sampler(sampler, steps, sched_shift, guidance).step_sigmas[start]
            noise = _itok.noised_start(self.encode_image(pixel_values), noise, sigma)
        lat = self.generate_latents([ids], uncond_ids=uncond, noise=noise, num_steps=steps, guidance=guidance,
                                    sampler=sampler, shift=shift, image_embeds=emb, callback=callback,
                                    start_step=start)
        return self.to_pil(self.decode(lat))

    # ---- image tokenizer: image -> generation latent ---------------------------------------------
    @torch.inference_mode()
    def encode_image(self, image) -> torch.Tensor:
        """The generation latent of image(s): PIL image(s) or InternVL-normalized pixel values
        ``[B, 3, S, S]`` -> float32 ``[B, latent_channels, h, w]`` (vision tower, pixel shuffle,
        projector, then the dual-stream tokenizer, all images in one batch)."""
        tok = _itok.require(self.image_tokenizer, self.config)
        pv = _itok.pixel_batch(image, self.preprocess, self.config)
        with self._stage("encode_image"):
            feats = self.mllm.encode_images(pv)                                   # [B * T, D]
            return tok(feats.view(pv.shape[0], -1, feats.shape[-1]))

    def reconstruct(self, image) -> torch.Tensor:
        """``decode(encode_image(image))``: ``[B, 3, H, W]`` in [-1, 1] (unclamped), the pipeline's dtype."""
        return self.decode(self.encode_image(image))

    # ---- understanding --------------------------------------------------------------------------
    def preprocess(self, image) -> torch.Tensor:
        """A PIL image (or a [3, H, W] / [1, 3, H, W] float tensor already normalized) -> pixel values
        [1, 3, S, S] for the vision tower (resize to S, ImageNet mean/std, as InternVL does)."""
        if isinstance(image, torch.Tensor):
            pv = image[None] if image.dim() == 3 else image
            if pv.dim() != 4 or pv.shape[1] != 3:
                raise ValueError(f"image: expected pixel values [B, 3, H, W], got {tuple(image.shape)}")
            if not pv.is_floating_point():  # raw 0..255 pixels would pass as normalized values
                raise ValueError(f"image: expected normalized float pixel values (ImageNet mean/std, as "
                                 f"InternVL's processor gives), got dtype {image.dtype}; pass a PIL image for "
                                 "raw pixels")
            return pv.to(self.device, self.dtype)
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"image: expected a PIL image or a pixel-value tensor, got {type(image).__name__}")
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image: an empty {image.width}x{image.height} PIL image; expected at least 1x1 pixels")
        size = self.config.mllm_config["vision_config"]["image_size"] if self.config.is_internvl else 448
        size = int(size if isinstance(size, int) else size[0])   # transformers takes an int or [H, W]
        im = image.convert("RGB").resize((size, size), Image.BICUBIC)
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).float() / 255
        mean = torch.tensor([0.485, 0.456, 0.406])
        std = torch.tensor([0.229, 0.224, 0.225])
        return ((x - mean) / std).permute(2, 0, 1)[None].to(self.device, self.dtype)

    def describe(self, image, prompt, *, max_new_tokens: int = 64, do_sample: bool = False, **sampling):
        """InternVL image understanding with a KV cache.

        ``image``: a PIL image or pixel values ``[1, 3, S, S]``. ``prompt``: a string (needs the
        tokenizer; the chat template puts the image tokens first) or the full 1-D token ids,
        image placeholders included. Returns the generated text (or token ids without a tokenizer).
        """
        if self.mllm.vision is None:
            raise ValueError("image: this checkpoint's MLLM is text-only (no vision tower)")
        pixel_values = self.preprocess(image)
        if isinstance(prompt, str):
            tok = self._need_tokenizer("prompt")
            T = self.mllm.image_seq_length * pixel_values.shape[0]
            ids = torch.tensor(tok.chat_ids(prompt, image_tokens=T, image_token_id=self.mllm.image_token_id,
                                            generation=False), dtype=torch.int64)
        else:
            ids = _as_ids("prompt", prompt, self.vocab_size, allow_empty=False)
        if self.tokenizer is not None:
            sampling.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        engine = {"plans": self.engine.decode_plans, "graphs": True} if self.graphs else {}
        out = self.mllm.describe(pixel_values, ids, max_new_tokens, do_sample=do_sample, **sampling, **engine)
        if isinstance(prompt, str):
            return self.tokenizer.decode([int(i) for i in out])
        return out
