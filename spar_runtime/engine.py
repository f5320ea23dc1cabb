"""The execution engine: static generation plans, graph capture/replay, FP8 linears.

The model files (qwen2, internvl, dtr, sana, dcae) are definitions: they compute what they are
given, into buffers they are given. This module owns allocation, layouts, loops and capture.

A :class:`GenerationPlan` is built once per shape signature (:func:`plan_key`): batch size,
latent size, steps, sampler (with its shift and guidance, which its coefficient table holds),
and the context slot ``S`` (each CFG row's ``prompt + queries`` rounded up to a multiple of
:data:`BUCKET` tokens). The LLM, DTR and connector run on the TRUE tokens of a call, packed
without padding (N = sum of the R rows' lengths, R = 2B CFG rows), in prefixes of buffers sized
for R*S tokens; only what the denoising step reads is slot-shaped. It holds every persistent
buffer of a text-to-image call::

    stage                  the per-call int64 inputs (ids, query rows, positions, the layouts'
                           intervals), one buffer for one staged copy
    hidden                 room for [L+1, R*S, D]: every LLM hidden state of the N packed tokens
                           ([L+1, N, D], a contiguous prefix; DTR reads K of them)
    queries                the latent queries of every row [R*Q, D]
    kv                     [layers, 2, R*S, heads, head_dim]: the DiT's context K/V, row r's
                           n_r keys at the start of its slot r*S
    cross                  the DiT's cross-attention layout over the slots (keys [0, n_r) of slot
                           r: the intervals carry the true lengths, padding keys are never read)
    x, x_in                the fp32 solver state [B, C, h, w] and the CFG input [2B, C, h, w]
    sampler                a FlowSampler (table, step counter, history on the device)

The LLM's causal and the connector's bidirectional layouts of a call are views of the staged
buffer. Per call the host packs ids,
positions and intervals into one int64 array, which reaches the device in one non-blocking copy
from pinned memory (CUDA); everything after is device work with no host synchronization. The
denoising step (DiT forward + CFG + solver step, timestep read from the sampler's device counter)
is one function: with graphs on CUDA it is captured once per plan in a ``torch.cuda.CUDAGraph``
and replayed per step; on CPU (and on the simulated GPU of ``spar_kernels.testing.fake_cuda``,
which has no graphs) it is called directly.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Sequence

import numpy as np
import torch

import spar_kernels as sk
from spar_kernels._op import normal_tensors

from .fp8 import linear
from .sana import SanaContext

__all__ = ["BUCKET", "plan_key", "staged_copy", "GenerationPlan", "DecodePlan", "Engine", "StepGraph",
           "simulated_device", "generate_tokens"]

BUCKET = 64                    # context slot granularity (tokens per CFG row)


# ---------------------------------------------------------------------------------------------
# graphs

def simulated_device() -> bool:
    """True inside ``spar_kernels.testing.fake_cuda()`` (CUDA tensors are fake; no graphs there)."""
    try:
        from spar_kernels._fake_cuda import active_recorder
    except ImportError:  # pragma: no cover - the simulated device is not installed
        return False
    return active_recorder() is not None


class StepGraph:
    """One function run as a CUDA graph: warmed up on a side stream, captured once, replayed.

    ``reset()`` puts the state the function advances (the sampler's counter) back before each
    warm-up run and after the capture, so capturing leaves no trace in the results."""

    WARMUP = 2

    def __init__(self, fn: Callable[[], None], reset: Callable[[], None]):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP):
                reset()
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn()
        reset()

    def __call__(self) -> None:
        self.graph.replay()


# ---------------------------------------------------------------------------------------------
# plans

def plan_key(rows: Sequence[int], noise_shape: Sequence[int], num_steps: int, sampler: str, shift: float,
             guidance: float) -> tuple:
    """What selects a plan: batch and latent shape, steps, sampler (shift and guidance are in its
    table), and the context slot S = the longest CFG row rounded up to :data:`BUCKET`."""
    slot = BUCKET * math.ceil(max(rows) / BUCKET)
    return (tuple(int(s) for s in noise_shape), int(num_steps), sampler, float(shift), float(guidance), slot)


def staged_copy(dst: torch.Tensor, host: torch.Tensor) -> None:
    """``dst.copy_(host)`` for a CPU ``host`` tensor: on CUDA through a pinned buffer, without
    blocking (torch's caching host allocator keeps that buffer until the copy has run)."""
    if dst.device.type == "cpu":
        dst.copy_(host)
        return
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    dst.copy_(pinned, non_blocking=True)


def _layout_like(layout: sk.AttentionLayout, host: sk.AttentionLayout, staged: dict) -> None:
    """Point a plan's persistent ``layout`` at ``host`` (same batch, totals and longest sequence):
    its host copy now, the device tensors named in ``staged`` (already on the device)."""
    layout._host = host.host_intervals()          # what tile_work / visible_pairs read
    for name in ("cu_seqlens_q", "cu_seqlens_k", "kv_start", "kv_end"):   # (what never changes is not copied)
        if name in staged:
            getattr(layout, name).copy_(staged[name])


def _int32_words(a: np.ndarray) -> np.ndarray:
    """``a`` as int32 values packed two per int64 word (zero-padded to even length): staged with
    the int64 inputs, they are read back on the device as ``words.view(torch.int32)``."""
    b = np.zeros(len(a) + len(a) % 2, np.int32)
    b[:len(a)] = a
    return b.view(np.int64)


def _layout_on(host: sk.AttentionLayout, tensors: Sequence[torch.Tensor]) -> sk.AttentionLayout:
    """``host`` (a validated CPU layout) with its four device tensors replaced by ``tensors``
    (int32 views of the staged buffer holding the same values): no copy, no sync."""
    lay = copy.copy(host)
    lay.cu_seqlens_q, lay.cu_seqlens_k, lay.kv_start, lay.kv_end = tensors
    return lay


class GenerationPlan:
    """Persistent buffers and the step function of one shape signature (see the module docstring).

    Args:
        pipe: the :class:`~spar_runtime.pipeline.SparPipeline` whose components run.
        key: :func:`plan_key`'s tuple.
        graphs: capture the step in a CUDA graph (CUDA only; ignored on CPU and on fake CUDA).
    """

    def __init__(self, pipe, key: tuple, graphs: bool):
        noise_shape, num_steps, sampler, shift, guidance, slot = key
        self.key = key
        self.pipe = pipe
        dev, dt = pipe.device, pipe.dtype
        cfg = pipe.config
        B = noise_shape[0]
        self.B, self.R, self.S = B, 2 * B, slot
        self.h, self.w = noise_shape[2], noise_shape[3]
        self.num_steps, self.guidance = num_steps, guidance
        self.Q, self.D = cfg.num_queries, cfg.hidden_size
        R, S = self.R, self.S
        self.L = pipe.mllm.lm.model.num_layers
        self.n_img = (self.h // pipe.dit.config.patch_size) * (self.w // pipe.dit.config.patch_size)
        # per-call inputs, staged together (int64 words): ids | query rows | positions | cross
        # ends, then the causal / bidirectional layouts' int32 intervals two per word; at most
        # R*S packed tokens
        self.stage = torch.zeros(2 * R * S + R * self.Q + R * self.n_img + (R + 2 + 3 * R * S) // 2,
                                 dtype=torch.int64, device=dev)
        self.queries = pipe.latent_queries.repeat(R, 1)                       # [R*Q, D]
        self.hidden = torch.empty((self.L + 1) * R * S * self.D, device=dev, dtype=dt)
        self.kv = torch.zeros(pipe.dit.kv_shape(R * S), device=dev, dtype=dt)
        # the DiT's cross-attention over the slots: built once, its intervals refilled per call
        self.cross = sk.AttentionLayout.cross([self.n_img] * R, [S] * R, device=dev)
        self.ctx = SanaContext(ctx_lens=(S,) * R, kv=self.kv, context=None, _layouts={self.n_img: self.cross})
        self.x = torch.zeros(tuple(noise_shape), device=dev, dtype=torch.float32)
        self.x_in = torch.empty((2 * B,) + tuple(noise_shape[1:]), device=dev, dtype=dt)
        self.sampler = pipe._sampler(sampler, num_steps, shift, guidance)
        self.graphs = bool(graphs) and dev.type == "cuda" and not simulated_device()
        self.graph: StepGraph | None = None
        self.replays = 0
        # the ids whose context K/V sit in each slot (None: nothing valid there): a row asking for
        # ids its slot already holds (the unconditional prompt, call after call) is not recomputed
        self.slot_ids: list[np.ndarray | None] = [None] * R
        self.rows_encoded = 0          # CFG rows run through LLM -> DTR -> connector, all calls

    def _layouts(self, lens: Sequence[int], row_lens: Sequence[int]):
        """Host layouts (validated): the LLM's causal and the connector's bidirectional one over
        the rows of ``lens[i]`` real tokens packed without padding, and the DiT's cross-attention
        over R samples of the slots' first ``row_lens[r]`` keys."""
        R, S, N = self.R, self.S, self.n_img
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        c_en = np.concatenate([np.arange(1, m + 1) for m in lens] or [np.zeros(0, np.int64)])
        b_en = np.repeat(np.asarray(lens, np.int64), lens)
        zeros = np.zeros(int(cu[-1]), np.int64)
        causal = sk.AttentionLayout.from_intervals(cu, cu, zeros, c_en) if len(lens) else None
        bidir = sk.AttentionLayout.from_intervals(cu, cu, zeros, b_en) if len(lens) else None
        x_en = np.repeat(np.asarray(row_lens, np.int64), N)
        cross = sk.AttentionLayout.from_intervals([r * N for r in range(R + 1)], [r * S for r in range(R + 1)],
                                                  np.zeros_like(x_en), x_en)
        return causal, bidir, cross

    def _reuse(self, ids: Sequence[np.ndarray]) -> tuple[list[int], list[tuple[int, int]]]:
        """Which rows this call computes, and which it fills by copying another slot.

        Returns ``(todo, copies)``: ``todo`` the rows whose ids no slot holds yet (the first row of
        each such id sequence), ``copies`` ``(dst, src)`` pairs for rows whose ids another row
        holds (a kept slot, or a row of ``todo``). Rows whose own slot already holds their ids
        are in neither: their K/V stay as the previous call left them."""
        same = np.array_equal
        kept = [r for r, a in enumerate(ids) if self.slot_ids[r] is not None and same(self.slot_ids[r], a)]
        todo, copies = [], []
        for r, a in enumerate(ids):
            if r in kept:
                continue
            src = next((j for j in todo + kept if same(ids[j], a)), None)
            if src is None:
                todo.append(r)
            else:
                copies.append((r, src))
        return todo, copies

    # ---- per call ---------------------------------------------------------------------------
    def load(self, sequences: Sequence[torch.Tensor], row_lens: Sequence[int] | None = None) -> None:
        """Pack ``sequences`` (the 1-D CPU int64 id tensors of the rows computed this call) + the
        queries into the plan: one staged copy; sets the call's packed views (``self.ids``,
        ``self.positions``, ``self.query_rows``, ``self.causal``, ``self.bidirectional``) and the
        cross layout's lengths ``row_lens`` (every CFG row's prompt + queries; default: the
        sequences', which must then be all R rows)."""
        Q = self.Q
        lens = [int(s.numel()) + Q for s in sequences]
        row_lens = lens if row_lens is None else list(row_lens)
        if len(row_lens) != self.R:
            raise ValueError(f"row_lens: expected {self.R} CFG row lengths, got {len(row_lens)}")
        n_rows, N = len(lens), sum(lens)
        ids = np.zeros(N, np.int64)
        qrows = np.empty(n_rows * Q, np.int64)
        start = 0
        for r, s in enumerate(sequences):
            n = int(s.numel())
            ids[start:start + n] = s.numpy()
            qrows[r * Q:(r + 1) * Q] = np.arange(start + n, start + n + Q)
            start += n + Q
        positions = np.concatenate([np.arange(m, dtype=np.int64) for m in lens] or [np.zeros(0, np.int64)])
        causal, bidir, cross = self._layouts(lens, row_lens)
        if n_rows:
            cu, _, zeros, c_en = causal.host_intervals()
            words = _int32_words(np.concatenate([cu, zeros, c_en, bidir.host_intervals()[3]]))
        else:
            words = np.zeros(0, np.int64)
        host = np.concatenate([ids, qrows, positions, cross.host_intervals()[3], words])
        staged = self.stage[:len(host)]
        staged_copy(staged, torch.from_numpy(host))
        self.ids, self.query_rows, self.positions, x_en, w = staged.split(
            (N, n_rows * Q, N, self.R * self.n_img, len(words)))
        self.causal = self.bidirectional = None
        if n_rows:
            cu_d, zeros_d, c_en_d, b_en_d = w.view(torch.int32)[:n_rows + 1 + 3 * N].split((n_rows + 1, N, N, N))
            self.causal = _layout_on(causal, (cu_d, cu_d, zeros_d, c_en_d))
            self.bidirectional = _layout_on(bidir, (cu_d, cu_d, zeros_d, b_en_d))
        _layout_like(self.cross, cross, {"kv_end": x_en})
        self.lengths = lens
        self.row_lengths = row_lens

    def encode(self, sequences, stage: Callable[[str], contextlib.AbstractContextManager]) -> None:
        """The DiT's context K/V of the R CFG rows ``sequences``, each row's into its slot of
        ``kv``: rows whose slot already holds their ids keep it (:meth:`_reuse`), rows repeating
        another row's ids copy its slot, and the rest run LLM prefill -> DTR -> connector ->
        projector on their true tokens, packed (:meth:`load`)."""
        p = self.pipe
        ids = [s.numpy() for s in sequences]
        todo, copies = self._reuse(ids)
        for r in todo + [dst for dst, _ in copies]:   # invalid until written (an error leaves them so)
            self.slot_ids[r] = None
        row_lens = [a.size + self.Q for a in ids]
        with stage("prefill"):
            self.load([sequences[r] for r in todo], row_lens)
            N = self.ids.shape[0]
            if todo:
                hidden = self.hidden[:(self.L + 1) * N * self.D].view(self.L + 1, N, self.D)
                h0 = hidden[0]
                torch.index_select(p.mllm.lm.embed_weight, 0, self.ids, out=h0)
                h0.index_copy_(0, self.query_rows, self.queries[:len(todo) * self.Q])
                p.mllm.lm.forward(h0, self.causal, self.positions, hidden_out=hidden)
        if todo:
            with stage("dtr"):
                routed = p.dtr(hidden)
            with stage("connector"):
                c = p.connector(routed, self.bidirectional, self.positions)
                context = linear(c, p.projector_weight, p.projector_bias)
                kv = p.dit.prepare_context(context, self.lengths).kv       # [layers, 2, N, heads, dim]
                start = 0
                for r, n in zip(todo, self.lengths):                        # row r's keys into slot r
                    self.kv[:, :, r * self.S:r * self.S + n].copy_(kv[:, :, start:start + n])
                    start += n
        S = self.S
        for dst, src in copies:
            n = row_lens[dst]
            self.kv[:, :, dst * S:dst * S + n].copy_(self.kv[:, :, src * S:src * S + n])
        for r in todo + [dst for dst, _ in copies]:
            self.slot_ids[r] = ids[r].copy()
        self.rows_encoded += len(todo)

    def step(self) -> None:
        """One denoising step on the plan's buffers: CFG batch, DiT, guidance + solver (in place)."""
        B, s = self.B, self.sampler
        self.x_in[:B].copy_(self.x)
        self.x_in[B:].copy_(self.x)
        t = s.current_timestep()                      # the device counter picks the timestep
        if t.is_floating_point():                     # Euler: the DiT takes trunc(sigma * 1000)
            t = t.long()
        v = self.pipe.dit(self.x_in, t.expand(2 * B), self.ctx)
        if self.guidance > 1.0:
            s.step(self.x, v[:B], v[B:], out=self.x)
        else:  # FlowSampler guides only when g > 1; the CFG formula holds for every g
            v_u = v[B:].float()
            s.step(self.x, v_u + self.guidance * (v[:B].float() - v_u), out=self.x)

    def denoise(self, noise: torch.Tensor, callback=None) -> torch.Tensor:
        """The loop from ``noise``; returns a new tensor (the plan's state is reused next call)."""
        if self.graphs and self.graph is None:
            self.graph = StepGraph(self.step, self.sampler.reset)
        if noise.device.type == "cpu":
            staged_copy(self.x, noise.to(torch.float32))
        else:
            self.x.copy_(noise)
        self.sampler.reset()
        run = self.graph if self.graph is not None else self.step
        for i in range(self.num_steps):
            run()
            self.replays += 1
            if callback is not None:
                callback(i + 1, self.num_steps)
        return self.x.clone()


# ---------------------------------------------------------------------------------------------
# token-by-token decoding (describe)

DECODE_BUCKET = 64      # KV-cache capacity granularity (tokens per sequence)
EOS_CHECK_EVERY = 8     # decoded tokens between two host reads of "every sequence stopped"


class DecodePlan:
    """A static KV cache for ``B`` sequences of ``capacity`` tokens and its single-token step
    (embed the last tokens -> decoder over the cache -> logits), captured as a CUDA graph when
    ``graphs`` on CUDA, called directly otherwise. Sampling runs outside the step."""

    def __init__(self, lm, B: int, capacity: int, graphs: bool):
        self.lm = lm
        self.cache = lm.new_cache(B, capacity)
        dev = lm.device
        with normal_tensors():  # written in place by every step, in any mode
            self.tok = torch.zeros(B, dtype=torch.int64, device=dev)
            self.logits = torch.zeros((B, lm.config.vocab_size), dtype=torch.float32, device=dev)
        self.graphs = bool(graphs) and dev.type == "cuda" and not simulated_device()
        self.graph: StepGraph | None = None
        self.steps = 0

    def step(self) -> None:
        layout, pos = self.cache.decode_inputs()
        h = self.lm.forward(self.lm.embed_tokens(self.tok), layout, pos, kv_cache=self.cache)
        self.logits.copy_(self.lm.logits(h))
        pos.add_(1)

    def prefill(self, embeds: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """The prompts into the (reset) cache; returns the logits of their last tokens [B, V]."""
        c = self.cache
        c.reset()
        layout, positions = c.append(lens)
        h = self.lm.forward(embeds.to(self.lm.dtype), layout, positions, kv_cache=c)
        last = torch.empty(len(lens), dtype=torch.int64, device=h.device)
        staged_copy(last, torch.tensor(np.cumsum(lens) - 1))
        c.start_decode()
        return self.lm.logits(h.index_select(0, last))

    def run_step(self) -> None:
        if self.graphs and self.graph is None:
            start = self.cache.positions.clone()
            tok = self.tok.clone()

            def reset():   # warm-up and capture write KV slots past the prompts: overwritten later
                self.cache.positions.copy_(start)
                self.tok.copy_(tok)
            self.graph = StepGraph(self.step, reset)
        (self.graph or self.step)()
        self.cache.advance()
        self.steps += 1


def generate_tokens(lm, embeds: torch.Tensor, lens: list[int], max_new_tokens: int, *, pick, eos: tuple,
                    plans: dict | None = None, graphs: bool = False) -> list[list[int]]:
    """Greedy or sampled decoding after packed prompts (``lm``: a :class:`~spar_runtime.qwen2.Qwen2LM`).

    ``pick(logits) -> [B] token ids``; ``eos``: stop ids. ``plans``: a dict keeping
    :class:`DecodePlan`s by ``(B, capacity)`` across calls (the capacity is rounded up to
    :data:`DECODE_BUCKET`). Stopping is checked on the host every :data:`EOS_CHECK_EVERY` tokens."""
    B = len(lens)
    capacity = DECODE_BUCKET * math.ceil((max(lens) + max_new_tokens) / DECODE_BUCKET)
    plan = None if plans is None else plans.get((B, capacity))
    if plan is None:
        plan = DecodePlan(lm, B, capacity, graphs)
        if plans is not None:
            plans[(B, capacity)] = plan
    logits = plan.prefill(embeds, lens)
    dev = lm.device
    tokens = torch.empty(B, max_new_tokens, dtype=torch.int64, device=dev)
    eos_t = torch.tensor(eos, dtype=torch.int64).to(dev) if eos else None
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    steps = max_new_tokens
    for step in range(max_new_tokens):
        tok = pick(logits)
        tokens[:, step] = tok
        if eos_t is not None:
            done |= torch.isin(tok, eos_t)
            if (step + 1) % EOS_CHECK_EVERY == 0 and bool(done.all()):   # a host read, every few tokens
                steps = step + 1
                break
        if step + 1 == max_new_tokens:
            break
        plan.tok.copy_(tok)
        plan.run_step()
        logits = plan.logits
    out = tokens[:, :steps].tolist()
    return [row[:next((j + 1 for j, t in enumerate(row) if t in eos), len(row))] for row in out]


class Engine:
    """The plans of one pipeline: generation plans by :func:`plan_key`, decode plans by
    ``(sequences, capacity)``."""

    def __init__(self, pipe, graphs: bool):
        self.pipe = pipe
        self.graphs = bool(graphs)
        self.plans: dict[tuple, GenerationPlan] = {}
        self.decode_plans: dict[tuple, DecodePlan] = {}

    def info(self) -> dict:
        return {"plans": len(self.plans), "replays": sum(p.replays for p in self.plans.values()),
                "decode_plans": len(self.decode_plans),
                "decode_steps": sum(p.steps for p in self.decode_plans.values())}

    def plan(self, sequences: Sequence[torch.Tensor], noise_shape, num_steps, sampler, shift, guidance):
        rows = [int(s.numel()) + self.pipe.config.num_queries for s in sequences]
        key = plan_key(rows, noise_shape, num_steps, sampler, shift, guidance)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = GenerationPlan(self.pipe, key, self.graphs)
        return plan

    def generate_latents(self, sequences, noise, num_steps, guidance, sampler, shift, callback=None):
        plan = self.plan(sequences, tuple(noise.shape), num_steps, sampler, shift, guidance)
        plan.encode(sequences, self.pipe._stage)
        with self.pipe._stage("dit_loop"):
            return plan.denoise(noise, callback)
