"""hybrid_attention: every backend against an fp64 reference whose masks are built from the segments
(not from the layout), the FlashAttention accuracy rule, GQA, head dims, dtypes, empty rows, out=,
non-contiguous inputs, FP8, torch.compile / opcheck, FlexAttention as a second oracle, bad inputs.

Triton kernels run under the interpreter with small shapes (tests/test_attention_triton.py holds
the kernel-specific cases); the CPU path and the reference run the larger random layouts here.
"""

import math
import random

import numpy as np
import pytest
import torch

import spar_kernels as sk
from spar_kernels.reference import attention as ref
from spar_kernels.testing import assert_close_fa, non_contiguous, poisoned_empty

from conftest import requires_triton
from test_attention_layout import random_segments

HOST_BACKENDS = ["cpu", "reference"]


def make_qkv(total_q, total_k, hq, hkv, d, dtype, scale=1.0):
    q = (torch.randn(total_q, hq, d) * scale).to(dtype)
    k = (torch.randn(total_k, hkv, d) * scale).to(dtype)
    v = torch.randn(total_k, hkv, d).to(dtype)
    return q, k, v


def expected(q, k, v, masks, cu_q, cu_k, scale, compute_dtype):
    """Per-sequence dense attention with the given masks; fp64 or the inputs' own dtype."""
    out = torch.zeros(q.shape, dtype=compute_dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    for b, mask in enumerate(masks):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if q1 == q0:
            continue
        o, l = ref.masked_attention(q[q0:q1], k[k0:k1], v[k0:k1], mask, scale, compute_dtype)
        out[q0:q1] = o
        lse[:, q0:q1] = l.double()
    return out, lse


def check(backend, q, k, v, layout, masks, *, softmax_scale=None, out=None, fa_atol=None):
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    cu_q, cu_k = layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist()
    with sk.backend(backend):
        got, lse = sk.hybrid_attention(q, k, v, layout, softmax_scale=softmax_scale, return_lse=True, out=out)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    if out is not None:
        assert got is out
    want64, lse64 = expected(q.double(), k.double(), v.double(), masks, cu_q, cu_k, scale, torch.float64)
    base, _ = expected(q, k, v, masks, cu_q, cu_k, scale, q.dtype)  # torch in the same precision
    assert_close_fa(got, base.to(q.dtype), want64, atol=fa_atol)
    # lse: fp32 accumulation of the (rounded) inputs, -inf exactly where the row is empty
    torch.testing.assert_close(lse.double(), lse64, atol=2e-4 if q.dtype != torch.float32 else 2e-5, rtol=1e-5)
    return got, lse, want64


def seg_masks(segments, nq):
    return [ref.segments_mask(s, None if nq is None else nq[b]) for b, s in enumerate(segments)]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("seed", range(5))
def test_random_segment_layouts_fp32_fp64_accuracy(backend, seed):
    rng = random.Random(seed)
    segments = [random_segments(rng) for _ in range(rng.randint(1, 8))]
    nq = [rng.randint(1, sum(n for _, n in s)) for s in segments] if seed % 2 else None
    layout = sk.AttentionLayout.from_segments(segments, num_queries=nq)
    hkv, g = rng.choice([(2, 1), (1, 2), (1, 7), (2, 7)])
    d = rng.choice([64, 72, 80, 96, 112, 128])
    q, k, v = make_qkv(layout.total_q, layout.total_k, hkv * g, hkv, d, torch.float32, scale=2.0)
    masks = seg_masks(segments, nq)
    got, _, want64 = check(backend, q, k, v, layout, masks)
    # fp32 path: ~1e-6 relative to the fp64 result, as accurate as torch's own fp32 attention (whose
    # error grows with the logits: over 3e-6 for about 1% of these random draws, so the bound is relative)
    cu_q, cu_k = layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist()
    base, _ = expected(q, k, v, masks, cu_q, cu_k, 1.0 / math.sqrt(d), torch.float32)
    rel = ((got.double() - want64).abs().max() / want64.abs().max()).item()
    base_rel = ((base.double() - want64).abs().max() / want64.abs().max()).item()
    assert rel < 1.25 * base_rel + 1e-6, f"relative error {rel:.3g} (torch fp32: {base_rel:.3g})"


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [8, 40, 56, 64, 72, 80, 96, 112, 128])
def test_low_precision_every_head_dim(backend, dtype, d):
    rng = random.Random(d)
    segments = [random_segments(rng, 150) for _ in range(3)]
    layout = sk.AttentionLayout.from_segments(segments)
    q, k, v = make_qkv(layout.total_q, layout.total_k, 4, 2, d, dtype)
    check(backend, q, k, v, layout, seg_masks(segments, None))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("g", [1, 2, 7])
def test_cross_attention_gqa(backend, g):
    q_lens, k_lens = [256, 17, 1], [300, 5, 77]
    layout = sk.AttentionLayout.cross(q_lens, k_lens)
    q, k, v = make_qkv(layout.total_q, layout.total_k, 2 * g, 2, 72, torch.bfloat16)
    masks = [torch.ones(a, b, dtype=torch.bool) for a, b in zip(q_lens, k_lens)]
    check(backend, q, k, v, layout, masks)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_decode_rows_against_long_cache(backend):
    segments = [[("causal", 700), ("full", 3)], [("causal", 1000)], [("causal", 33)]]
    nq = [3, 1, 16]
    layout = sk.AttentionLayout.from_segments(segments, num_queries=nq)
    q, k, v = make_qkv(layout.total_q, layout.total_k, 14, 2, 64, torch.float32)
    check(backend, q, k, v, layout, seg_masks(segments, nq))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_empty_intervals_give_zeros_and_minus_inf(backend):
    # rows 1 and 4 see nothing; sequence 1 has queries but no keys; sequence 2 has no queries
    layout = sk.AttentionLayout.from_intervals([0, 4, 6, 6], [0, 40, 40, 45], [0, 3, 5, 0, 0, 0], [40, 3, 9, 1, 0, 0])
    q, k, v = make_qkv(6, 45, 3, 3, 32, torch.float32)
    out = poisoned_empty(6, 3, 32, dtype=torch.float32)
    with sk.backend(backend):
        got, lse = sk.hybrid_attention(q, k, v, layout, return_lse=True, out=out)
    for r in (1, 4, 5):
        assert torch.equal(got[r], torch.zeros(3, 32)) and bool(torch.isneginf(lse[:, r]).all())
    assert torch.isfinite(got).all() and torch.isfinite(lse[:, [0, 2, 3]]).all()
    masks = [ref.interval_mask(layout.kv_start[a:b], layout.kv_end[a:b], n)
             for a, b, n in ((0, 4, 40), (4, 6, 0), (6, 6, 5))]
    check(backend, q, k, v, layout, masks)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_windows_non_contiguous_inputs_scale_and_out(backend):
    # document/window intervals not starting at 0, strided q/k/v, a custom softmax scale
    n = 157
    st = torch.tensor([max(0, i - 40) for i in range(n)], dtype=torch.int32)
    en = torch.tensor([min(n, i + 1 + (i % 5)) for i in range(n)], dtype=torch.int32)
    layout = sk.AttentionLayout.from_intervals(torch.tensor([0, n], dtype=torch.int32),
                                               torch.tensor([0, n], dtype=torch.int32), st, en)
    q, k, v = make_qkv(n, n, 6, 3, 80, torch.bfloat16)
    q, k, v = non_contiguous(q, 0), non_contiguous(k, 1), non_contiguous(v, 0)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = poisoned_empty(n, 6, 80, dtype=torch.bfloat16)
    check(backend, q, k, v, layout, [ref.interval_mask(st, en, n)], softmax_scale=0.3, out=out)
    with sk.backend(backend):   # numpy scalars are numbers too
        torch.testing.assert_close(sk.hybrid_attention(q, k, v, layout, softmax_scale=np.float32(0.25)),
                                   sk.hybrid_attention(q, k, v, layout, softmax_scale=0.25), atol=0, rtol=0)


def test_varlen_entry_point_and_return_values():
    layout = sk.AttentionLayout.from_segments([[("causal", 9), ("full", 4)], [("full", 5)]])
    q, k, v = make_qkv(18, 18, 4, 2, 64, torch.float32)
    a = sk.hybrid_attention(q, k, v, layout)
    b, lse = sk.hybrid_attention_varlen(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.kv_start,
                                        layout.kv_end, layout.max_seqlen_q, layout.max_seqlen_k, return_lse=True)
    assert isinstance(a, torch.Tensor) and torch.equal(a, b) and lse.shape == (4, 18)
    c = sk.hybrid_attention_varlen(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.kv_start, layout.kv_end,
                                   np.int64(20), np.int64(20))  # numpy ints and generous maxima are fine
    assert torch.equal(a, c)


def test_cpu_path_is_chunked(monkeypatch):
    # force many query chunks per sequence: results must not depend on the chunking
    segments = [[("causal", 300), ("full", 100)], [("full", 77)]]
    layout = sk.AttentionLayout.from_segments(segments)
    q, k, v = make_qkv(layout.total_q, layout.total_k, 4, 4, 64, torch.float32)
    with sk.backend("cpu"):
        whole = sk.hybrid_attention(q, k, v, layout)
        monkeypatch.setattr(sk.attention.cpu, "_CPU_CHUNK_BYTES", 4 * 4 * 400 * 7)
        chunked = sk.hybrid_attention(q, k, v, layout)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("segs, heads", [
    ([[("causal", 40), ("full", 300), ("causal", 9)]], (6, 2)),                       # BAGEL-like
    ([[("causal", 7), ("full", 130)], [("full", 129), ("causal", 140)]], (4, 4)),     # runs at the ends
    ([[("causal", 64), ("full", 127), ("causal", 3)]], (4, 1)),                       # a run too short
])
def test_cpu_image_block_runs_are_one_chunk(segs, heads, monkeypatch):
    """A run of >= 128 rows that all see the same keys (an image block between text) goes to the
    fused kernel as one unmasked chunk; the other rows keep their chunks. Against fp64."""
    import spar_kernels.attention.cpu as att

    calls = []
    real = att._cpu_chunk_fused
    monkeypatch.setattr(att, "_cpu_chunk_fused",
                        lambda qc, kc, vc, vis, *a: calls.append((qc.shape[0], vis is None)) or real(qc, kc, vc, vis, *a))
    lay = sk.AttentionLayout.from_segments(segs)
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(sum(n for s in segs for _, n in s))
    q = torch.randn(lay.total_q, Hq, 64, generator=g)
    k, v = (torch.randn(lay.total_k, Hkv, 64, generator=g) for _ in range(2))
    check("cpu", q, k, v, lay, seg_masks(segs, None))
    full_runs = sorted(n for s in segs for kind, n in s if kind == "full" and n >= 128)
    assert sorted(c for c, unmasked in calls if unmasked and c >= 128) == full_runs, calls
    assert all(c <= 128 for c, unmasked in calls if not unmasked), calls


def test_empty_batch():
    layout = sk.AttentionLayout.cross([0], [5])
    q, k, v = make_qkv(0, 5, 2, 2, 64, torch.float32)
    out, lse = sk.hybrid_attention(q, k, v, layout, return_lse=True)
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)


def fp8_reference(q8, k8, v8, qs, ks, vs, layout):
    """fp64 attention of the dequantized FP8 inputs: (out, lse) in float64."""
    return ref.hybrid_attention(q8, k8, v8, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.kv_start,
                                layout.kv_end, compute_dtype=torch.float64, q_descale=qs, k_descale=ks,
                                v_descale=vs, out_dtype=torch.float64)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_fp8_values_match_the_dequantized_reference(backend):
    segments = [[("causal", 90), ("full", 40)], [("full", 50)]]
    layout = sk.AttentionLayout.from_segments(segments)
    q, k, v = make_qkv(layout.total_q, layout.total_k, 4, 2, 64, torch.bfloat16)
    # descales far from 1, so a dropped or misapplied one changes the values by orders of magnitude
    (q8, qs), (k8, ks), (v8, vs) = _per_head_fp8(q * 3.0), _per_head_fp8(k * 0.5), _per_head_fp8(v * 40.0)
    with sk.backend(backend):
        got, lse = sk.hybrid_attention(q8, k8, v8, layout, q_descale=qs, k_descale=ks, v_descale=vs, return_lse=True)
    want, want_lse = fp8_reference(q8, k8, v8, qs, ks, vs, layout)
    assert got.dtype == torch.bfloat16
    # fp32 math on the dequantized inputs, rounded once to bf16
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=8e-3)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-6)
    ref16 = sk.hybrid_attention(q * 3.0, k * 0.5, v * 40.0, layout).double()
    assert float((got.double() - ref16).norm() / ref16.norm()) < 0.08


def test_fp8_descale_shapes_are_equivalent():
    layout = sk.AttentionLayout.from_segments([[("causal", 20), ("full", 9)]])
    q, k, v = (t.to(torch.float8_e4m3fn) for t in make_qkv(29, 29, 4, 2, 64, torch.float32))
    per_head = sk.hybrid_attention(q, k, v, layout, q_descale=torch.tensor([0.5, 0.5, 2.0, 2.0]),
                                   k_descale=torch.full((2,), 0.25), v_descale=torch.tensor([3.0, 3.0]))
    shared = sk.hybrid_attention(q, k, v, layout, q_descale=torch.tensor([0.5, 2.0]),
                                 k_descale=torch.tensor(0.25), v_descale=torch.tensor([3.0]))
    assert torch.equal(per_head, shared)
    plain = sk.hybrid_attention(q, k, v, layout)  # missing factors are 1
    ref_out, _ = ref.hybrid_attention(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.kv_start,
                                      layout.kv_end, compute_dtype=torch.float64)
    torch.testing.assert_close(plain.double(), ref_out.double(), atol=2e-2, rtol=2e-2)


def _per_head_fp8(x):
    amax = x.float().abs().amax(dim=(0, 2)).clamp(min=1e-6)
    scale = amax / 448.0
    return (x.float() / scale.view(1, -1, 1)).to(torch.float8_e4m3fn), scale.float()


def test_flex_attention_second_oracle():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    segments = [[("causal", 21), ("full", 16), ("causal", 9)], [("full", 12), ("causal", 15)]]
    nq = [30, 27]
    layout = sk.AttentionLayout.from_segments(segments, num_queries=nq)
    q, k, v = make_qkv(layout.total_q, layout.total_k, 4, 2, 64, torch.float32)
    # the mask, from the segments: same sequence and (earlier-or-same position, or same full segment)
    seq_k, pos_k, seg_k, full_k = [], [], [], []
    for b, segs in enumerate(segments):
        p = 0
        for s, (kind, n) in enumerate(segs):
            for _ in range(n):
                seq_k.append(b), pos_k.append(p), seg_k.append(s), full_k.append(kind == "full")
                p += 1
    q_rows = [i for b in range(2) for i in range(layout.cu_seqlens_k[b + 1] - nq[b], layout.cu_seqlens_k[b + 1])]
    T = lambda x: torch.tensor(x)  # noqa: E731
    seq_k, pos_k, seg_k, full_k = T(seq_k), T(pos_k), T(seg_k), T(full_k)
    qi = T(q_rows)

    def mask_mod(b, h, q_idx, kv_idx):
        r = qi[q_idx]
        same = seq_k[r] == seq_k[kv_idx]
        return same & ((pos_k[kv_idx] <= pos_k[r]) | ((seg_k[kv_idx] == seg_k[r]) & full_k[r]))

    bm = flex.create_block_mask(mask_mod, 1, 1, layout.total_q, layout.total_k, device="cpu")
    want = flex.flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                               block_mask=bm, enable_gqa=True)[0].transpose(0, 1)
    got = sk.hybrid_attention(q, k, v, layout)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_torch_compile_fullgraph():
    layout = sk.AttentionLayout.from_segments([[("causal", 7), ("full", 5)]])
    q, k, v = make_qkv(12, 12, 2, 1, 64, torch.float32)
    f = torch.compile(lambda q, k, v: sk.hybrid_attention(q, k, v, layout) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(q, k, v), sk.hybrid_attention(q, k, v, layout) * 2)


def test_opcheck():
    layout = sk.AttentionLayout.from_segments([[("causal", 5), ("full", 3)]])
    q, k, v = make_qkv(8, 8, 2, 1, 32, torch.float32)
    out, lse = torch.empty_like(q), torch.empty(2, 8)
    torch.library.opcheck(torch.ops.spar.hybrid_attention.default,
                          (q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.kv_start, layout.kv_end,
                           8, 8, 0.125, out, lse, None, None, None, None))


_L = sk.AttentionLayout.from_segments([[("causal", 6), ("full", 4)]])


def _qkv(hq=4, hkv=2, d=64, dtype=torch.float32, nq=10, nk=10):
    return make_qkv(nq, nk, hq, hkv, d, dtype)


def _varlen(q, k, v, cu_q=None, cu_k=None, st=None, en=None, mq=10, mk=10, **kw):
    return sk.hybrid_attention_varlen(q, k, v, _L.cu_seqlens_q if cu_q is None else cu_q,
                                      _L.cu_seqlens_k if cu_k is None else cu_k,
                                      _L.kv_start if st is None else st, _L.kv_end if en is None else en, mq, mk, **kw)


I32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731


@pytest.mark.parametrize("call, exc, match", [
    (lambda: sk.hybrid_attention(*_qkv(hq=3, hkv=2), _L), ValueError, "multiple of the number of key/value heads"),
    (lambda: sk.hybrid_attention(*_qkv(d=4), _L), ValueError, "head dim 4 is not supported"),
    (lambda: sk.hybrid_attention(*_qkv(d=136), _L), ValueError, "head dim 136 is not supported"),
    (lambda: sk.hybrid_attention(*_qkv(d=256), _L), ValueError, "head dim 256 is not supported"),
    (lambda: sk.hybrid_attention(*[t.to(torch.float8_e4m3fn) for t in _qkv()], _L, workspace=torch.empty(47)), ValueError,
     "workspace: expected a contiguous float32 tensor of at least"),
    (lambda: sk.hybrid_attention(*_qkv(), _L, workspace=torch.empty(64).half()), ValueError,
     "workspace: expected dtype"),
    (lambda: sk.hybrid_attention(*_qkv(), _L, out_lse=torch.empty(10, 4)), ValueError, "out_lse: expected"),
    (lambda: sk.hybrid_attention(_qkv()[0], _qkv()[1].half(), _qkv()[2], _L), ValueError, "k: expected dtype"),
    (lambda: sk.hybrid_attention(*_qkv()[:2], _qkv()[2].bfloat16(), _L), ValueError, "v: expected dtype"),
    (lambda: sk.hybrid_attention(*_qkv(dtype=torch.float64), _L), ValueError, "q: expected dtype"),
    (lambda: sk.hybrid_attention(_qkv()[0], _qkv()[1].to("meta"), _qkv()[2], _L), ValueError, "k: expected a tensor on"),
    (lambda: sk.hybrid_attention(*_qkv(), _L.to("meta")), ValueError, "layout: its tensors are on meta"),
    (lambda: sk.hybrid_attention(torch.randn(10, 4, 128)[:, :, ::2], *_qkv()[1:], _L), ValueError,
     "q: the last dimension must be contiguous"),
    (lambda: sk.hybrid_attention(_qkv()[0], torch.randn(10, 2, 128)[:, :, ::2], _qkv()[2], _L), ValueError,
     "k: the last dimension must be contiguous"),
    (lambda: sk.hybrid_attention(_qkv()[0].flatten(1), *_qkv()[1:], _L), ValueError, "q: expected 3 dimensions"),
    (lambda: sk.hybrid_attention(*_qkv()[:2], torch.randn(10, 2, 32), _L), ValueError, "v: expected the shape of k"),
    (lambda: sk.hybrid_attention(*_qkv(nq=11), _L), ValueError, "q: the layout has 10 query rows"),
    (lambda: sk.hybrid_attention(*_qkv(nk=12), _L), ValueError, "k: the layout has 10 keys"),
    (lambda: sk.hybrid_attention(*_qkv(), "causal"), TypeError, "layout: expected an AttentionLayout"),
    (lambda: sk.hybrid_attention(*_qkv(), _L, softmax_scale=-1.0), ValueError, "softmax_scale"),
    (lambda: sk.hybrid_attention(*_qkv(), _L, out=torch.empty(10, 4, 64).half()), ValueError, "out: expected dtype"),
    (lambda: sk.hybrid_attention(*_qkv(), _L, out=torch.empty(10, 64, 4).transpose(1, 2)), ValueError,
     "out: expected a contiguous"),
    (lambda: sk.hybrid_attention(*_qkv(), _L, q_descale=torch.ones(4)), ValueError, "q_descale: descale"),
    (lambda: sk.hybrid_attention(*[t.to(torch.float8_e4m3fn) for t in _qkv()], _L, k_descale=torch.ones(3)),
     ValueError, r"k_descale: expected a float32 tensor of shape \(2,\)"),
    (lambda: _varlen(*_qkv(), cu_q=I32(1, 10)), ValueError, "cu_seqlens_q: must start at 0"),
    (lambda: _varlen(*_qkv(), cu_q=I32(0, 6, 4, 10), cu_k=I32(0, 4, 6, 10)), ValueError,
     "cu_seqlens_q: must be non-decreasing"),
    (lambda: _varlen(*_qkv(), cu_k=I32(0, 12), mk=12), ValueError, "k: the layout has 12 keys"),
    (lambda: _varlen(*_qkv(), en=I32(*([11] * 10))), ValueError, "outside its sequence"),
    (lambda: _varlen(*_qkv(), st=I32(*([3] * 10)), en=I32(*([2] * 10))), ValueError, "outside its sequence"),
    (lambda: _varlen(*_qkv(), cu_q=_L.cu_seqlens_q.long()), ValueError, "cu_seqlens_q: expected dtype"),
    (lambda: _varlen(*_qkv(), en=_L.kv_end[:9]), ValueError, "kv_end: expected 10 entries"),
    (lambda: _varlen(*_qkv(), cu_k=I32(0, 4, 10)), ValueError, "cu_seqlens_k: expected 2 entries"),
    (lambda: _varlen(*_qkv(), mq=5), ValueError, "max_seqlen_q: 5 is shorter"),
    (lambda: _varlen(*_qkv(), mk=-1), ValueError, "max_seqlen_k: expected a non-negative int"),
    (lambda: _varlen(*_qkv(), mq=10.0), ValueError, "max_seqlen_q: expected a non-negative int"),
    (lambda: _varlen(*_qkv(), cu_k=I32(0, 0, 10, 0)[::2]), ValueError, "cu_seqlens_k: expected a contiguous"),
    (lambda: _varlen(*_qkv(), st=torch.zeros(20, dtype=torch.int32)[::2]), ValueError,
     "kv_start: expected a contiguous"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("kind", ["causal", "full"])
@pytest.mark.parametrize("dtype,heads", [(torch.float32, (4, 2)), (torch.bfloat16, (6, 6)), (torch.float16, (8, 2))])
def test_cpu_uniform_batch_fast_path(kind, dtype, heads, monkeypatch):
    """Equal-length causal / bidirectional sequences take one batched fused call; any other layout
    (unequal lengths, windows) takes the per-sequence path. Both agree with the fp64 reference."""
    import spar_kernels.attention.cpu as att

    taken = []
    real = att._cpu_uniform
    monkeypatch.setattr(att, "_cpu_uniform", lambda *a: taken.append(real(*a)) or taken[-1])
    Hq, Hkv = heads
    # unequal lengths take the per-sequence path (one fused causal call per plain causal sequence)
    for segs, expect in (([[(kind, 19)]] * 3, True), ([[(kind, 19)], [(kind, 7)], [(kind, 1)]], False),
                         ([[("causal", 10), ("full", 9)]] * 2, False)):
        lay = sk.AttentionLayout.from_segments(segs)
        n = lay.total_q
        q, k, v = torch.randn(n, Hq, 64).to(dtype), torch.randn(n, Hkv, 64).to(dtype), torch.randn(n, Hkv, 64).to(dtype)
        taken.clear()
        o, lse = sk.hybrid_attention(q, k, v, lay, return_lse=True)
        assert taken == [expect], (segs, taken)
        with sk.backend("reference"):
            ro, rlse = sk.hybrid_attention(q, k, v, lay, return_lse=True)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(o.float(), ro.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(lse, rlse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_keys, heads, dtype", [((5, 5, 5), (4, 4), torch.float32), ((3, 17, 1, 9), (6, 2), torch.float32),
                                                  ((30, 2), (8, 8), torch.bfloat16), ((64, 64), (8, 4), torch.float16)])
def test_cpu_padded_slots_fast_path(n_keys, heads, dtype, monkeypatch):
    """Equal query blocks over key slots of one stride, each row seeing its slot's first n_r keys
    (the engine's cross-attention over padded context slots), take one batched call with a
    key-padding mask; the padding keys (poisoned here with huge finite values: they get weight 0)
    change nothing. Unequal
    query blocks or unequal slot strides take another path. Both agree with the fp64 reference."""
    import spar_kernels.attention.cpu as att

    taken = []
    real = att._cpu_slots
    monkeypatch.setattr(att, "_cpu_slots", lambda *a: taken.append(real(*a)) or taken[-1])
    Hq, Hkv = heads
    Lq, S, R = 13, 64, len(n_keys)
    for cu_q, cu_k, expect in (([r * Lq for r in range(R + 1)], [r * S for r in range(R + 1)], True),
                               ([0] + [Lq * (r + 1) + r for r in range(R)], [r * S for r in range(R + 1)], False),
                               ([r * Lq for r in range(R + 1)], [0] + [S * (r + 1) + r for r in range(R)], False)):
        st = np.zeros(cu_q[-1], np.int64)
        en = np.repeat(np.asarray(n_keys, np.int64), np.diff(cu_q))
        lay = sk.AttentionLayout.from_intervals(cu_q, cu_k, st, en)
        q = torch.randn(cu_q[-1], Hq, 32).to(dtype)
        k, v = torch.randn(cu_k[-1], Hkv, 32).to(dtype), torch.randn(cu_k[-1], Hkv, 32).to(dtype)
        for r, n in enumerate(n_keys):       # keys past each slot's n_r: weight 0
            k[cu_k[r] + n:cu_k[r + 1]] = 1e4
            v[cu_k[r] + n:cu_k[r + 1]] = 6e4
        taken.clear()
        o, lse = sk.hybrid_attention(q, k, v, lay, return_lse=True)
        assert taken == [expect], (cu_q, cu_k, taken)
        masks = [torch.arange(cu_k[r + 1] - cu_k[r]).expand(cu_q[r + 1] - cu_q[r], -1) < n for r, n in enumerate(n_keys)]
        want, want_lse = expected(q.double(), k.double(), v.double(), masks, cu_q, cu_k, 32 ** -0.5, torch.float64)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(o.double(), want, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend, poison", [(b, p) for b in HOST_BACKENDS for p in (float("nan"), float("inf"), float("-inf"))]
                         + [pytest.param("triton", float("nan"), marks=requires_triton)])
def test_rows_are_independent_of_non_finite_keys_outside_their_window(backend, poison):
    """A non-finite key inside a row's sequence but outside its interval is masked like any other
    key (the reference masks scores by replacement): sliding windows, a causal prefix before a
    full block and a small packed batch of windows, each through a CPU path that masks with an
    additive -inf (NaN + -inf is NaN) before the fix. Rows that see the key are not checked."""
    for lens, window, prefix in (([200], 40, None), ([200], None, 70), ([20, 20], 6, None), ([140, 150], 24, None)):
        st, en = [], []
        for n in lens:
            for i in range(n):
                if window is not None:
                    st.append(max(0, i - window + 1)), en.append(i + 1)
                else:
                    st.append(0), en.append(i + 1 if i < prefix else n)
        cu = [0] + np.cumsum(lens).tolist()
        lay = sk.AttentionLayout.from_intervals(cu, cu, st, en)
        q, k, v = make_qkv(lay.total_q, lay.total_k, 4, 2, 32, torch.float32)
        masks = [ref.interval_mask(lay.kv_start[cu[b]:cu[b + 1]], lay.kv_end[cu[b]:cu[b + 1]], lens[b])
                 for b in range(len(lens))]
        want, want_lse = expected(q.double(), k.double(), v.double(), masks, cu, cu, 32 ** -0.5, torch.float64)
        bad = cu[1] - 5          # a late key of sequence 0: early rows and other sequences do not see it
        k[bad] = poison
        sees = torch.zeros(lay.total_q, dtype=torch.bool)
        sees[cu[0]:cu[1]] = masks[0][:, bad - cu[0]]
        with sk.backend(backend):
            o, lse = sk.hybrid_attention(q, k, v, lay, return_lse=True)
        assert (~sees).any() and sees.any()
        torch.testing.assert_close(o[~sees].double(), want[~sees], atol=1e-5, rtol=1e-5, msg=lambda m: f"{lens}: {m}")
        torch.testing.assert_close(lse[:, ~sees].double(), want_lse[:, ~sees], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_padded_slot_keys_no_row_sees_are_masked_out(backend, poison):
    """Equal query blocks over padded key slots large enough for the CPU's batched slot call (its
    key-padding mask is additive: NaN + -inf is NaN): a non-finite key of sequence 0 that none of
    its rows sees leaves every row exact (the CPU path recomputes such a batch per sequence)."""
    Lq, Sk = 256, 600
    lay = sk.AttentionLayout.from_intervals([0, Lq, 2 * Lq], [0, Sk, 2 * Sk], [0] * (2 * Lq), [590] * Lq + [600] * Lq)
    q, k, v = make_qkv(lay.total_q, lay.total_k, 2, 1, 16, torch.float32)
    masks = [torch.arange(Sk).expand(Lq, -1) < n for n in (590, 600)]
    want, want_lse = expected(q.double(), k.double(), v.double(), masks, [0, Lq, 2 * Lq], [0, Sk, 2 * Sk], 16 ** -0.5,
                              torch.float64)
    k[595] = poison
    with sk.backend(backend):
        o, lse = sk.hybrid_attention(q, k, v, lay, return_lse=True)
    torch.testing.assert_close(o.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_cpu_path_without_the_fused_op_takes_every_chunk_kind(monkeypatch):
    """Where torch lacks ATen's fused CPU attention the CPU path runs an explicit matmul-softmax per
    chunk, also for chunks whose rows all see the same keys (no mask: ``visible`` is None)."""
    from spar_kernels.attention import cpu as cpu_attn
    monkeypatch.setattr(cpu_attn, "_CPU_FUSED", None)
    monkeypatch.setattr(cpu_attn, "_CPU_PLANS", type(cpu_attn._CPU_PLANS)())
    for lay in (sk.AttentionLayout.cross([4, 3], [6, 5]),
                sk.AttentionLayout.from_segments([[("causal", 9), ("full", 140), ("causal", 5)]]),
                sk.AttentionLayout.from_segments([[("causal", 7)], [("full", 6)]])):
        q, k, v = make_qkv(lay.total_q, lay.total_k, 4, 2, 32, torch.float32)
        cq, ck = lay.cu_seqlens_q.tolist(), lay.cu_seqlens_k.tolist()
        masks = [ref.interval_mask(lay.kv_start[cq[b]:cq[b + 1]], lay.kv_end[cq[b]:cq[b + 1]], ck[b + 1] - ck[b])
                 for b in range(lay.batch_size)]
        want, want_lse = expected(q.double(), k.double(), v.double(), masks, cq, ck, 32 ** -0.5, torch.float64)
        with sk.backend("cpu"):
            o, lse = sk.hybrid_attention(q, k, v, lay, return_lse=True)
        torch.testing.assert_close(o.double(), want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{lay}: {m}")
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_sequences_are_independent_of_non_finite_keys_elsewhere(backend, poison):
    """A non-finite key or value in one sequence (an overflow in one sample) leaves the other
    sequences of the packed batch exact, on every CPU path: one masked call over the small packed
    batch (_packed_bias), padded slots, equal-length batches and the per-sequence loop."""
    for segs, cu_q, cu_k, st, en in (
            ([[("causal", 5)], [("causal", 7)], [("full", 3)]], None, None, None, None),          # packed masked call
            (None, [0, 3, 7], [0, 6, 12], [0] * 7, [6] * 3 + [6] * 4),                             # cross, packed
            (None, [0, 20, 40, 60], [0, 40, 80, 120], [0] * 60, [5] * 20 + [40] * 20 + [17] * 20),  # padded slots
            ([[("causal", 6)]] * 3, None, None, None, None),                                         # equal lengths
            ([[("causal", 30), ("full", 10)], [("full", 40)], [("causal", 30)]], None, None, None, None)):  # per sequence
        lay = (sk.AttentionLayout.from_segments(segs) if segs is not None
               else sk.AttentionLayout.from_intervals(cu_q, cu_k, st, en))
        q, k, v = make_qkv(lay.total_q, lay.total_k, 4, 2, 32, torch.float32)
        cq, ck = lay.cu_seqlens_q.tolist(), lay.cu_seqlens_k.tolist()
        masks = [ref.interval_mask(lay.kv_start[cq[b]:cq[b + 1]], lay.kv_end[cq[b]:cq[b + 1]], ck[b + 1] - ck[b])
                 for b in range(lay.batch_size)]
        want, want_lse = expected(q.double(), k.double(), v.double(), masks, cq, ck, 32 ** -0.5, torch.float64)
        k[ck[0]:ck[1]:2], v[ck[0] + 1:ck[1]:2] = poison, poison   # sequence 0's keys and values
        with sk.backend(backend):
            o, lse = sk.hybrid_attention(q, k, v, lay, return_lse=True)
        rest = slice(cq[1], None)
        torch.testing.assert_close(o[rest].double(), want[rest], atol=1e-5, rtol=1e-5, msg=lambda m: f"{lay}: {m}")
        torch.testing.assert_close(lse[:, rest].double(), want_lse[:, rest], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", ["query_row", "only_key_seen"])
def test_cpu_path_keeps_a_nan_row_nan(where):
    """ATen's fused CPU kernel takes a row's max with a NaN-dropping max: a row whose every visible
    score is NaN came out as zeros with lse 0. A non-finite q or k sends the call down the explicit
    path, which agrees with the reference (NaN rows, other rows unchanged)."""
    torch.manual_seed(0)
    S, H, D = 6, 2, 64
    layout = sk.AttentionLayout.from_segments([[("causal", S)]])
    q, k, v = (torch.randn(S, H, D) for _ in range(3))
    if where == "query_row":
        q[2] = float("nan")
    else:
        k[0, 0, 5] = float("nan")          # row 0 sees key 0 only
    out, lse = sk.hybrid_attention(q, k, v, layout, return_lse=True)
    with sk.backend("reference"):
        ro, rl = sk.hybrid_attention(q, k, v, layout, return_lse=True)
    assert torch.isnan(ro).any()
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5, equal_nan=True)
