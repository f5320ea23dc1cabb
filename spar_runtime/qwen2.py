"""Qwen2 / Qwen2.5 decoder on packed sequences: the SPAR LLM, its connector, and text decoding.

Computes what transformers' ``Qwen2Model`` / ``Qwen2ForCausalLM`` compute (same weights, same
names), on a PACKED batch: the tokens of every sequence are concatenated into one ``[N, D]``
tensor and an :class:`spar_kernels.AttentionLayout` says which keys each token sees (causal for
the LLM, bidirectional for the connector, a KV cache for decoding). No padding, no dense mask.

Per layer (pre-norm)::

    a = RMSNorm(s)                         s: the residual stream
    q, k, v = a Wqkv^T + bqkv              one GEMM (q/k/v weights concatenated at load time)
    q, k = RoPE(q, k, positions)           rotate-half convention, theta = rope_theta
    s = s + hybrid_attention(q, k, v) Wo^T      grouped-query attention, scale head_dim^-0.5
    a = RMSNorm(s)                         fused with the residual add (spar_kernels.rms_norm)
    s = s + (silu(a Wg^T) * (a Wu^T)) Wd^T      gate and up weights concatenated: one GEMM

and a final RMSNorm. ``hidden_out`` receives exactly what transformers returns with
``output_hidden_states=True``: [0] the input embeddings, [1..L-1] raw layer outputs, [L] the
final normed output (the raw output of the last layer is not kept).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

import spar_kernels as sk
from spar_kernels._op import normal_tensors

from .fp8 import Fp8Weight, linear
from .loading import CheckpointError, check_state_dict, load_safetensors_dir, read_json

__all__ = ["Qwen2Config", "qwen2_param_shapes", "qwen2_lm_param_shapes", "packed_positions",
           "causal_layout", "bidirectional_layout", "attention", "DecoderStack", "KVCache", "Qwen2LM"]


# ---------------------------------------------------------------------------------------------
# config

@dataclass(frozen=True)
class Qwen2Config:
    """The fields of a transformers ``Qwen2Config`` the runtime uses (see :meth:`from_dict`)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> "Qwen2Config":
        """From a transformers Qwen2 config dict (``config.json``, or an InternVL ``text_config``).

        Reads ``rope_theta`` from ``rope_parameters`` (transformers 5) or the top level (older
        files); ``head_dim`` defaults to ``hidden_size // num_attention_heads``. Refused with
        :class:`CheckpointError`: sliding-window attention, RoPE scaling other than "default",
        activations other than SiLU, head counts that do not divide.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"config: expected a dict, got {type(d).__name__}")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if not isinstance(d.get(key), int) or d[key] <= 0:
                raise CheckpointError(f"Qwen2 config: {key} must be a positive integer, got {d.get(key)!r}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise CheckpointError(f"Qwen2 config: num_attention_heads ({heads}) must be a multiple of "
                                  f"num_key_value_heads ({kv_heads})")
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if d.get("head_dim") is None and d["hidden_size"] % heads:
            raise CheckpointError(f"Qwen2 config: hidden_size ({d['hidden_size']}) is not a multiple of "
                                  f"num_attention_heads ({heads}) and head_dim is not given")
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise CheckpointError(f"Qwen2 config: head_dim must be a positive even integer (RoPE rotates pairs "
                                  f"of channels), got {head_dim!r}")
        eps = d.get("rms_norm_eps", 1e-6)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
            raise CheckpointError(f"Qwen2 config: rms_norm_eps must be a finite number >= 0, got {eps!r}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(f"Qwen2 config: rope_type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if d.get("use_sliding_window"):
            raise CheckpointError("Qwen2 config: use_sliding_window=true is not supported")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise CheckpointError(f"Qwen2 config: hidden_act {act!r} is not supported (only 'silu')")
        eos = d.get("eos_token_id")
        return cls(hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=int(head_dim),
                   intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"],
                   rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   max_position_embeddings=int(d.get("max_position_embeddings", 32768)), hidden_act="silu",
                   bos_token_id=d.get("bos_token_id"),
                   eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                   pad_token_id=d.get("pad_token_id"))

    def to_dict(self) -> dict:
        """A transformers-compatible Qwen2 config dict (``Qwen2Config(**cfg.to_dict())`` builds)."""
        d = dataclasses.asdict(self)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d["model_type"] = "qwen2"
        return d

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)


def qwen2_param_shapes(cfg: Qwen2Config, num_layers: int | None = None, prefix: str = "", *,
                       norm: bool = True) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a decoder stack as transformers names a ``Qwen2Model``'s: ``layers.{i}.*``
    and ``norm.weight`` (when ``norm``), each prefixed with ``prefix``. No embeddings (see
    :func:`qwen2_lm_param_shapes`)."""
    L = cfg.num_hidden_layers if num_layers is None else num_layers
    D, F_, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(L):
        p = f"{prefix}layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q, D), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, D), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (D, q),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F_, D), p + "mlp.up_proj.weight": (F_, D),
            p + "mlp.down_proj.weight": (D, F_),
        })
    if norm:
        shapes[prefix + "norm.weight"] = (D,)
    return shapes


def qwen2_lm_param_shapes(cfg: Qwen2Config, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Names and shapes of a ``Qwen2ForCausalLM`` checkpoint (``model.*`` and, unless the
    embeddings are tied, ``lm_head.weight``), each prefixed with ``prefix``."""
    shapes = {prefix + "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    shapes.update(qwen2_param_shapes(cfg, prefix=prefix + "model."))
    if not cfg.tie_word_embeddings:
        shapes[prefix + "lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


# ---------------------------------------------------------------------------------------------
# layouts and positions of packed batches

def _lengths(name: str, lengths: Sequence[int]) -> list[int]:
    lens = [int(n) for n in lengths]
    if not lens or any(n < 1 for n in lens):
        raise ValueError(f"{name}: expected a non-empty list of positive lengths, got {list(lengths)!r}")
    return lens


def packed_positions(lengths: Sequence[int], device=None) -> torch.Tensor:
    """RoPE positions ``0..n-1`` of each sequence, concatenated: int64 ``[sum(lengths)]``."""
    lens = _lengths("lengths", lengths)
    return torch.cat([torch.arange(n, dtype=torch.int64) for n in lens]).to(device)


def causal_layout(lengths: Sequence[int], device=None):
    """Causal attention within each packed sequence (the LLM prefill)."""
    return sk.AttentionLayout.from_segments([[("causal", n)] for n in _lengths("lengths", lengths)], device=device)


def bidirectional_layout(lengths: Sequence[int], device=None):
    """Full attention within each packed sequence (the connector)."""
    return sk.AttentionLayout.from_segments([[("full", n)] for n in _lengths("lengths", lengths)], device=device)


# ---------------------------------------------------------------------------------------------
# attention

RUNTIME_DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # what the spar_kernels ops take


def _fmt(t) -> str:
    """shape, dtype and device of a tensor (or the type of anything else) for error messages."""
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return type(t).__name__


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in RUNTIME_DTYPES:
        raise ValueError(f"weights: dtype {dtype} is not supported; load with dtype in "
                         f"{[str(d) for d in RUNTIME_DTYPES]}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, scale: float) -> torch.Tensor:
    """``spar_kernels.hybrid_attention`` with the softmax scale of the real head dim (it takes every
    head dim from 8 to 128 as it is)."""
    return sk.hybrid_attention(q, k, v, layout, softmax_scale=scale)


# ---------------------------------------------------------------------------------------------
# rotary embedding

class _Rope:
    """cos/sin of the default Qwen2 RoPE, computed as transformers computes them (fp32)."""

    def __init__(self, head_dim: int, theta: float, device):
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        self.inv_freq = (1.0 / (theta ** exponents)).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]   # [N, d/2]
        return freqs.cos().to(dtype)[:, None, :], freqs.sin().to(dtype)[:, None, :]


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``x [N, H, d]``: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---------------------------------------------------------------------------------------------
# KV cache

class KVCache:
    """Static per-layer key/value buffers for ``batch_size`` sequences of up to ``capacity`` tokens.

    Sequence b owns the slots ``[b * capacity, (b + 1) * capacity)`` of every layer's
    ``[batch_size * capacity, Hkv, head_dim]`` buffer, so appending never moves anything.
    :meth:`append` reserves the next slots and returns the layout and positions of the new
    tokens (each sees every cached key of its sequence up to and including itself); it builds
    them on the host (a prefill, once per call). Token-by-token decoding uses :meth:`start_decode`
    and :meth:`decode_inputs` / :meth:`advance` instead: one token per sequence per step, with the
    positions, slots and layout intervals advanced on the device (no host copy, no sync, the
    same tensors every step, so a CUDA graph can capture the step).
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int, *,
                 device=None, dtype: torch.dtype = torch.float32):
        for name, v in (("num_layers", num_layers), ("batch_size", batch_size), ("capacity", capacity)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        shape = (num_layers, batch_size * capacity, num_kv_heads, head_dim)
        # zeros, not empty: a kernel's boundary tile may load (and multiply by 0) unused slots;
        # normal tensors even in inference mode: later calls in any mode write them in place
        with normal_tensors():
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.batch_size = batch_size
        self.lengths = [0] * batch_size      # host-side: known without reading the device
        self._slots: torch.Tensor | None = None
        self._decode = None                  # (positions, slot base, slots, layout) of static decoding
        self._decoding = False               # the device positions match the host lengths (start_decode)

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept; stale values are never attended to)."""
        self.lengths = [0] * self.batch_size
        self._slots = None
        self._decoding = False

    def start_decode(self) -> None:
        """Static decoding from the current lengths: the device positions are set once (one
        staged copy); each step then appends one token to every sequence on the device."""
        dev, B, cap = self.k.device, self.batch_size, self.capacity
        if self._decode is None:
            with normal_tensors():  # written in place by later decoding steps, in any mode
                base = torch.arange(B, device=dev, dtype=torch.int64) * cap
                layout = sk.AttentionLayout.from_intervals(list(range(B + 1)), [b * cap for b in range(B + 1)],
                                                           [0] * B, [1] * B)
                self._decode = (torch.zeros(B, dtype=torch.int64, device=dev), base,
                                torch.zeros(B, dtype=torch.int64, device=dev), layout.to(dev))
        pos = torch.tensor(self.lengths, dtype=torch.int64)
        self._decoding = True
        if dev.type == "cpu":
            self._decode[0].copy_(pos)
        else:
            self._decode[0].copy_(pos.pin_memory(), non_blocking=True)

    @property
    def positions(self) -> torch.Tensor:
        """The device positions of the next decoded token of each sequence (after :meth:`start_decode`)."""
        return self._decode[0]

    def decode_inputs(self):
        """``(layout, positions)`` of one new token per sequence at the device positions (device
        work only). After the forward pass the caller adds 1 to ``positions`` (device) and calls
        :meth:`advance` (host)."""
        if not self._decoding:
            raise ValueError("kv_cache: call start_decode() before decode_inputs() (again after append() or "
                             "reset(): the device positions are set from the host lengths there)")
        if any(n + 1 > self.capacity for n in self.lengths):
            raise ValueError(f"kv_cache: one more token does not fit: cached {self.lengths}, capacity "
                             f"{self.capacity} per sequence")
        pos, base, slots, layout = self._decode
        torch.add(pos, base, out=slots)
        layout.kv_end.copy_(pos + 1)
        self._slots = slots
        return layout, pos

    def advance(self) -> None:
        """The host lengths move on by one token per sequence (the device positions were
        advanced by the step)."""
        self.lengths = [n + 1 for n in self.lengths]

    def append(self, q_lens: Sequence[int]):
        """Reserve ``q_lens[b]`` slots after sequence b's cached tokens.

        Returns ``(layout, positions)`` for a forward pass over the new tokens (packed in order).
        """
        lens = [int(n) for n in q_lens]
        if len(lens) != self.batch_size or any(n < 0 for n in lens):
            raise ValueError(f"q_lens: expected {self.batch_size} non-negative lengths, got {list(q_lens)!r}")
        if any(self.lengths[b] + n > self.capacity for b, n in enumerate(lens)):
            raise ValueError(f"q_lens: {lens} more tokens do not fit: cached {self.lengths}, capacity "
                             f"{self.capacity} per sequence")
        pos = [torch.arange(self.lengths[b], self.lengths[b] + n, dtype=torch.int64) for b, n in enumerate(lens)]
        positions = torch.cat(pos)
        slots = torch.cat([p + b * self.capacity for b, p in enumerate(pos)])
        cu_q = [0]
        for n in lens:
            cu_q.append(cu_q[-1] + n)
        cu_k = [b * self.capacity for b in range(self.batch_size + 1)]
        kv_end = (positions + 1).tolist()
        # built from host lists (validated there, no device sync), then moved once
        layout = sk.AttentionLayout.from_intervals(cu_q, cu_k, [0] * len(kv_end), kv_end)
        device = self.k.device
        if device.type != "cpu":
            layout = layout.to(device)
        self._slots = slots.to(device)
        self.lengths = [self.lengths[b] + n for b, n in enumerate(lens)]
        self._decoding = False
        return layout, positions.to(device)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' keys/values of ``layer``; return the layer's whole buffers."""
        if self._slots is None or self._slots.numel() != k.shape[0]:
            raise ValueError(f"kv_cache: {k.shape[0]} new tokens, but append() reserved "
                             f"{0 if self._slots is None else self._slots.numel()}")
        self.k[layer].index_copy_(0, self._slots, k)
        self.v[layer].index_copy_(0, self._slots, v)
        return self.k[layer], self.v[layer]


# ---------------------------------------------------------------------------------------------
# decoder stack

class _Layer:
    __slots__ = ("in_norm", "w_qkv", "b_qkv", "w_o", "post_norm", "w_gate_up", "w_down")


class DecoderStack:
    """``num_layers`` Qwen2 decoder layers (+ the final RMSNorm when ``norm``) on packed sequences.

    Args:
        cfg: the model config (the connector uses the LLM's).
        weights: ``{"layers.{i}.<transformers name>": tensor, ..., "norm.weight": tensor}``, exactly
            :func:`qwen2_param_shapes` ``(cfg, num_layers, norm=norm)`` (checked; the tensors' device
            and dtype are the stack's).
        num_layers: layers to run (``cfg.num_hidden_layers`` when None).
        norm: apply the final RMSNorm.
    """

    def __init__(self, cfg: Qwen2Config, weights: Mapping[str, torch.Tensor], num_layers: int | None = None,
                 norm: bool = True):
        self.cfg = cfg
        self.num_layers = cfg.num_hidden_layers if num_layers is None else int(num_layers)
        if self.num_layers < 1:
            raise ValueError(f"num_layers: expected at least 1, got {num_layers!r}")
        check_state_dict(weights, qwen2_param_shapes(cfg, self.num_layers, norm=norm), "DecoderStack weights")
        first = weights["layers.0.input_layernorm.weight"]
        self.device, self.dtype = first.device, first.dtype
        _check_dtype(self.dtype)
        self.layers: list[_Layer] = []
        for i in range(self.num_layers):
            w = lambda n: weights[f"layers.{i}.{n}"]  # noqa: E731
            layer = _Layer()
            layer.in_norm = w("input_layernorm.weight")
            layer.w_qkv = torch.cat([w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"),
                                     w("self_attn.v_proj.weight")])
            layer.b_qkv = torch.cat([w("self_attn.q_proj.bias"), w("self_attn.k_proj.bias"),
                                     w("self_attn.v_proj.bias")])
            layer.w_o = w("self_attn.o_proj.weight")
            layer.post_norm = w("post_attention_layernorm.weight")
            layer.w_gate_up = torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")])
            layer.w_down = w("mlp.down_proj.weight")
            self.layers.append(layer)
        self.norm_weight = weights["norm.weight"] if norm else None
        self.rope = _Rope(cfg.head_dim, cfg.rope_theta, self.device)
        self.scale = cfg.head_dim ** -0.5
        # gate/up weights are stored fused. On GPUs one GEMM (one launch) is the better choice for
        # the few rows of decoding; on CPU two GEMMs over the halves ran ~10% faster in fp32 than
        # the one twice as wide (Qwen2.5-0.5B MLP, 630 rows, MKL), with contiguous SiLU inputs.
        self.split_gate_up = self.device.type == "cpu"

    def _check(self, x, positions, hidden_out, kv_cache):
        D = self.cfg.hidden_size
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != D:
            raise ValueError(f"x: expected a packed [N, {D}] tensor, got {_fmt(x)}")
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"x: expected dtype {self.dtype} on {self.device} (the weights'), got {_fmt(x)}")
        N = x.shape[0]
        if (not isinstance(positions, torch.Tensor) or positions.shape != (N,)
                or positions.dtype not in (torch.int64, torch.int32) or positions.device != x.device):
            raise ValueError(f"positions: expected an int64 tensor of shape ({N},) on {x.device}, "
                             f"got {_fmt(positions)}")
        if hidden_out is not None:
            shape = (self.num_layers + 1, N, D)
            if (not isinstance(hidden_out, torch.Tensor) or tuple(hidden_out.shape) != shape
                    or hidden_out.dtype != x.dtype or hidden_out.device != x.device or not hidden_out.is_contiguous()):
                raise ValueError(f"hidden_out: expected a contiguous {x.dtype} tensor of shape {shape} on {x.device}, "
                                 f"got {_fmt(hidden_out)}")
        if kv_cache is not None:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"kv_cache: expected a KVCache, got {type(kv_cache).__name__}")
            expect = (self.num_layers, self.cfg.num_key_value_heads, self.cfg.head_dim)
            got = (kv_cache.k.shape[0], kv_cache.k.shape[2], kv_cache.k.shape[3])
            if got != expect or kv_cache.k.dtype != x.dtype or kv_cache.k.device != x.device:
                raise ValueError(f"kv_cache: expected (layers, kv heads, head dim) {expect} in {x.dtype} on "
                                 f"{x.device}, got {got} in {kv_cache.k.dtype} on {kv_cache.k.device}")

    def forward(self, x: torch.Tensor, layout, positions: torch.Tensor, *, hidden_out: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Run the stack on packed tokens.

        Args:
            x: ``[N, D]`` input embeddings of every sequence, concatenated.
            layout: ``spar_kernels.AttentionLayout`` over the N tokens (queries) and the keys
                (the same tokens, or the cache's slots when ``kv_cache`` is given).
            positions: int64 ``[N]`` RoPE positions.
            hidden_out: optional contiguous ``[L+1, N, D]`` buffer receiving every hidden state
                (transformers' ``output_hidden_states`` convention; ``x`` may already be ``hidden_out[0]``).
            kv_cache: optional :class:`KVCache` whose :meth:`KVCache.append` produced ``layout``
                and ``positions``; the new keys/values are written into it.

        Returns:
            ``[N, D]``: the final (normed) output, a view of ``hidden_out[L]`` when given.
        """
        self._check(x, positions, hidden_out, kv_cache)
        eps = self.cfg.rms_norm_eps
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        scratch = torch.empty_like(x)            # the residual stream after attention
        if hidden_out is not None:
            if hidden_out[0].data_ptr() != x.data_ptr():
                hidden_out[0].copy_(x)
            resid = hidden_out[0]
        else:
            resid = x
        a = sk.rms_norm(resid, self.layers[0].in_norm, eps)
        last = self.num_layers - 1
        for i, layer in enumerate(self.layers):
            attn = self._attention(i, layer, a, cos, sin, layout, kv_cache)
            a, resid = sk.rms_norm(attn, layer.post_norm, eps, residual=resid, residual_out=scratch)
            mlp = self._mlp(layer, a)
            if i < last:
                dst = hidden_out[i + 1] if hidden_out is not None else scratch
                a, resid = sk.rms_norm(mlp, self.layers[i + 1].in_norm, eps, residual=resid, residual_out=dst)
        out = hidden_out[self.num_layers] if hidden_out is not None else None
        if self.norm_weight is not None:
            y, _ = sk.rms_norm(mlp, self.norm_weight, eps, residual=resid, out=out, residual_out=scratch)
            return y
        return torch.add(resid, mlp, out=out)

    __call__ = forward

    def _attention(self, i, layer, a, cos, sin, layout, kv_cache):
        cfg = self.cfg
        N, d, hq, hkv = a.shape[0], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = linear(a, layer.w_qkv, layer.b_qkv)
        qk = _apply_rope(qkv[:, :(hq + hkv) * d].view(N, hq + hkv, d), cos, sin)
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, (hq + hkv) * d:].view(N, hkv, d)
        if kv_cache is not None:
            k, v = kv_cache.store(i, k, v)
        o = attention(q, k, v, layout, self.scale)
        return linear(o.reshape(N, hq * d), layer.w_o)

    def _mlp(self, layer, a):
        f = self.cfg.intermediate_size
        if self.split_gate_up and not isinstance(layer.w_gate_up, Fp8Weight):   # two GEMMs on weight views
            h = F.silu(F.linear(a, layer.w_gate_up[:f]), inplace=True).mul_(F.linear(a, layer.w_gate_up[f:]))
        else:                    # one GEMM
            gate_up = linear(a, layer.w_gate_up)
            h = F.silu(gate_up[:, :f], inplace=True).mul_(gate_up[:, f:])
        return linear(h, layer.w_down)


# ---------------------------------------------------------------------------------------------
# causal LM

def _split_prefix(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


class Qwen2LM:
    """``Qwen2ForCausalLM``: token embeddings, a :class:`DecoderStack` and the LM head.

    Args:
        cfg: the config.
        weights: ``{"model.embed_tokens.weight", "model.layers.{i}.*", "model.norm.weight",
            "lm_head.weight"}`` as transformers saves them (:func:`qwen2_lm_param_shapes`).
            The head is ``lm_head.weight`` when the checkpoint holds one; without it, the
            embedding matrix when ``tie_word_embeddings`` (else it is a missing key). This is
            what transformers 5 loads: it does not tie a stored head that differs.
    """

    def __init__(self, cfg: Qwen2Config, weights: Mapping[str, torch.Tensor], *, where: str = "Qwen2LM weights"):
        weights = dict(weights)
        expected = qwen2_lm_param_shapes(cfg)
        if "lm_head.weight" in weights:   # a stored head is used even when tied (as transformers 5 does)
            expected["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
        check_state_dict(weights, expected, where)
        self.config = cfg
        self.embed_weight = weights["model.embed_tokens.weight"]
        self.lm_head = weights.get("lm_head.weight", self.embed_weight)
        stack = _split_prefix(weights, "model.")
        stack.pop("embed_tokens.weight")
        self.model = DecoderStack(cfg, stack)
        self.device, self.dtype = self.model.device, self.model.dtype

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> "Qwen2LM":
        """Load a ``Qwen2ForCausalLM.save_pretrained`` folder (config.json + safetensors)."""
        cfg = Qwen2Config.from_dict(read_json(os.path.join(os.fspath(folder), "config.json")))
        weights = load_safetensors_dir(folder, device=device, dtype=dtype)
        return cls(cfg, weights, where=os.fspath(folder))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` token ids -> ``[N, D]`` embeddings."""
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids: expected an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        return F.embedding(ids.to(self.device), self.embed_weight)

    def forward(self, x: torch.Tensor, layout, positions: torch.Tensor, *, hidden_out: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """The decoder on packed embeddings (see :meth:`DecoderStack.forward`); returns the normed output."""
        return self.model.forward(x, layout, positions, hidden_out=hidden_out, kv_cache=kv_cache)

    __call__ = forward

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[n, D]`` normed hidden states -> fp32 ``[n, vocab]`` logits."""
        return F.linear(h, self.lm_head).float()

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(self.model.num_layers, batch_size, capacity, c.num_key_value_heads, c.head_dim,
                       device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def generate(self, embeds: torch.Tensor, lengths: Sequence[int], max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                 plans: dict | None = None, graphs: bool = False) -> list[list[int]]:
        """Decode after packed prompts, with a static KV cache and a single-token step
        (:func:`spar_runtime.engine.generate_tokens`).

        Args:
            embeds: ``[sum(lengths), D]`` prompt embeddings (token embeddings, image features...).
            lengths: the prompts' lengths.
            max_new_tokens: tokens to generate per prompt (>= 1).
            do_sample: sample from ``softmax(logits / temperature)`` restricted to ``top_k`` /
                ``top_p`` (nucleus); greedy (argmax) otherwise.
            eos_token_id: stop a sequence after it emits one of these (default: the config's).
            generator: the random generator used for sampling.
            plans, graphs: the engine's decode plans to reuse (a dict) and whether to capture the
                step in a CUDA graph (CUDA only).

        Returns:
            the new token ids of each prompt (an emitted EOS is included as the last id).
        """
        lens = _lengths("lengths", lengths)
        # any integer / real type (numpy scalars included), never a bool
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
            raise ValueError(f"top_k: expected None or an integer >= 0 (0: no top-k filter), got {top_k!r}")
        top_k = None if top_k is None else int(top_k)
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                                  or not 0 < top_p <= 1):
            raise ValueError(f"top_p: expected None or a number in (0, 1] (1: no nucleus filter), got {top_p!r}")
        top_p = None if top_p is None else float(top_p)
        if embeds.dim() != 2 or embeds.shape[0] != sum(lens):
            raise ValueError(f"embeds: expected [{sum(lens)}, {self.config.hidden_size}] (sum of lengths), "
                             f"got {tuple(embeds.shape)}")
        if do_sample and not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
                              and 0 < temperature < float("inf")):
            raise ValueError(f"temperature: expected a finite number > 0 when sampling, got {temperature!r}")
        temperature = float(temperature) if isinstance(temperature, numbers.Real) else temperature
        eos = self.config.eos_ids if eos_token_id is None else _eos_ids(eos_token_id, self.config.vocab_size)
        from .engine import generate_tokens   # the loop lives in the execution layer

        pick = lambda logits: _pick(logits, do_sample, temperature, top_k, top_p, generator)  # noqa: E731
        return generate_tokens(self, embeds, lens, max_new_tokens, pick=pick, eos=eos, plans=plans, graphs=graphs)


def _eos_ids(eos_token_id, vocab: int) -> tuple[int, ...]:
    """``eos_token_id`` (one id or a sequence of ids, each in [0, vocab)) as a tuple of ints."""
    ids = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else eos_token_id
    try:
        ids = list(ids)
    except TypeError:
        ids = None
    if (ids is None or isinstance(eos_token_id, (str, bytes)) or not ids
            or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < vocab for i in ids)):
        raise ValueError(f"eos_token_id: expected None, a token id or a sequence of token ids in [0, {vocab}), "
                         f"got {eos_token_id!r}")
    return tuple(int(i) for i in ids)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """Next token per row: argmax, or a sample after temperature / top-k / top-p filtering."""
    if not do_sample:
        return logits.argmax(dim=-1)
    # the row's max subtracted first: a tiny temperature then sends the others to -inf, not the
    # max to +inf (inf - inf in the softmax would be NaN)
    scores = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) > top_p      # keep the smallest prefix reaching top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
