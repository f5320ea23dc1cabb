"""The whole SPAR pipeline on the simulated CUDA device (spar_kernels.testing.fake_cuda).

Built with ``device="cuda"`` (and ``"cuda:0"``, ``torch.device("cuda")``): generate_latents,
decode, edit and describe give results on cuda:0 with the right shapes, and nothing in the
denoising loop (from the first DiT call to the end of the last solver step) syncs the host.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensor

from spar_kernels.testing import fake_cuda
from spar_runtime import SparPipeline
from spar_runtime.sana import SanaDiT

CUDA0 = torch.device("cuda", 0)
STEPS = 2


def _random_pipeline(config: str, device):
    """SparPipeline.random on the simulated GPU. For SPAR-1B the random CPU weights are replaced by
    fake CUDA tensors of the same shapes (nothing computes on them; drawing 1B random numbers on the
    CPU would dominate the test)."""
    patch = contextlib.nullcontext()
    if config != "tiny":
        randn = torch.randn

        def fake_randn(*shape, generator=None, **kw):
            return randn(*shape, **kw) if generator is None else torch.empty(*shape, device="cuda", **kw)
        patch = mock.patch.object(torch, "randn", fake_randn)
    with patch:
        return SparPipeline.random(config, device=device, dtype=torch.bfloat16)


class LoopSyncs:
    """The host syncs from the first DiT call of a generation to its last step's callback."""

    def __init__(self, rec):
        self.rec, self.first, self.marks = rec, None, []

    @contextlib.contextmanager
    def watch(self):
        call = SanaDiT.__call__

        def traced(dit, *args, **kwargs):
            if self.first is None:
                self.first = len(self.rec.syncs)
            return call(dit, *args, **kwargs)
        self.first, self.marks = None, []
        with mock.patch.object(SanaDiT, "__call__", traced):
            yield self

    def callback(self, step, steps):
        self.marks.append(len(self.rec.syncs))

    def syncs(self):
        assert self.first is not None and len(self.marks) >= 1, "the DiT and the callback were called"
        return self.rec.syncs[self.first:self.marks[-1]]


def _assert_no_loop_syncs(loop: LoopSyncs):
    syncs = loop.syncs()
    assert not syncs, f"{len(syncs)} host sync(s) in the denoising loop:\n" + "\n".join(s.format() for s in syncs)


def _on_cuda0(t, shape, dtype):
    assert isinstance(t, FakeTensor) and t.device == CUDA0, (type(t).__name__, t.device)
    assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, (tuple(t.shape), t.dtype)


def _generate_and_decode(pipe, rec):
    c = pipe.config
    noise = torch.randn(2, c.latent_channels, c.latent_size, c.latent_size)
    prompts = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 11])]
    loop = LoopSyncs(rec)
    with loop.watch():
        lat = pipe.generate_latents(prompts, uncond_ids=torch.tensor([5]), noise=noise, num_steps=STEPS,
                                    callback=loop.callback)
    assert len(loop.marks) == STEPS
    _on_cuda0(lat, noise.shape, torch.float32)
    _assert_no_loop_syncs(loop)
    img = pipe.decode(lat)
    _on_cuda0(img, (2, 3, c.image_size, c.image_size), torch.bfloat16)


def _edit(pipe, loop):
    with loop.watch():
        out = pipe.edit(Image.new("RGB", (40, 30), (200, 10, 10)), "make it blue", num_steps=STEPS,
                        callback=loop.callback)
    s = pipe.config.image_size
    assert len(loop.marks) == STEPS
    assert len(out) == 1 and isinstance(out[0], Image.Image) and out[0].size == (s, s)


@pytest.mark.parametrize("device", [pytest.param("cuda", id="str cuda"), pytest.param("cuda:0", id="str cuda:0"),
                                    pytest.param(torch.device("cuda"), id="torch.device cuda")])
def test_tiny_generate_decode_edit(device):
    with fake_cuda() as rec:
        pipe = _random_pipeline("tiny", device)
        _generate_and_decode(pipe, rec)
        loop = LoopSyncs(rec)
        _edit(pipe, loop)
        _assert_no_loop_syncs(loop)


def test_tiny_plan_keeps_and_copies_context_slots():
    """A second call on the plan with new prompts and the same negative prompt: the negative
    prompt's slots are kept (one copied within the first call), only the prompts are encoded,
    and the whole call syncs nothing."""
    with fake_cuda() as rec:
        pipe = _random_pipeline("tiny", "cuda")
        c = pipe.config
        noise = torch.randn(2, c.latent_channels, c.latent_size, c.latent_size)
        uncond = torch.tensor([3, 4])
        pipe.generate_latents([torch.tensor([5, 6, 7]), torch.tensor([8])], uncond_ids=uncond, noise=noise,
                              num_steps=STEPS)
        plan, = pipe.engine.plans.values()
        assert plan.rows_encoded == 3                      # two prompts, the negative prompt once
        with rec.region("second call"):
            lat = pipe.generate_latents([torch.tensor([9, 10]), torch.tensor([11, 12, 13])], uncond_ids=uncond,
                                        noise=noise, num_steps=STEPS)
        assert plan.rows_encoded == 5 and pipe.graph_cache_info()["plans"] == 1
        _on_cuda0(lat, noise.shape, torch.float32)
        assert rec.stats("second call").syncs == []


def test_spar_1b_generate_decode():
    with fake_cuda() as rec:
        pipe = _random_pipeline("SPAR-1B", "cuda")
        assert pipe.config.name == "SPAR-1B"
        _generate_and_decode(pipe, rec)


def test_tiny_describe():
    with fake_cuda() as rec:
        pipe = _random_pipeline("tiny", "cuda")
        with rec.region("describe") as region:
            text = pipe.describe(Image.new("RGB", (40, 30)), "what is this?", max_new_tokens=3)
    assert isinstance(text, str)
    # the prompt is checked and its image rows found on the host: only decoding reads the device
    # (the next token of each of the 3 steps; a token read back from the simulated GPU is 0)
    assert region.backends["hybrid_attention"] and set(region.backends["hybrid_attention"]) <= {"triton", "cuda"}
    assert not [s for s in region.syncs if "prompt_embeddings" in "".join(s.stack.format())], region.syncs
