"""The Triton kernels of hybrid_attention under the interpreter (small shapes: the interpreter is
slow): prefill and split-KV decode against the fp64 reference with segment-built masks, every
head dim, GQA 1/2/7, fp16/bf16/fp32, FP8, empty rows, strided inputs, and the kernel's own count
of visited/masked key tiles against AttentionLayout.tile_work."""

import random

import pytest
import torch

import spar_kernels as sk
from spar_kernels.attention import kernels as ak
from spar_kernels.reference import attention as ref
from spar_kernels.testing import non_contiguous, poisoned_empty

from conftest import requires_triton
from test_attention import _per_head_fp8, check, make_qkv, seg_masks
from test_attention_layout import random_segments

pytestmark = requires_triton


@pytest.mark.parametrize("d", [16, 32, 64, 72, 80, 96, 112, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_prefill_random_layouts(d, dtype):
    rng = random.Random(d * 7 + hash(str(dtype)) % 97)
    segments = [random_segments(rng, 70, 3) for _ in range(rng.randint(1, 3))]
    nq = [rng.randint(1, sum(n for _, n in s)) for s in segments] if rng.random() < 0.5 else None
    layout = sk.AttentionLayout.from_segments(segments, num_queries=nq)
    hkv, g = rng.choice([(2, 1), (1, 2), (1, 7)])
    q, k, v = make_qkv(layout.total_q, layout.total_k, hkv * g, hkv, d, dtype, scale=1.5)
    check("triton", q, k, v, layout, seg_masks(segments, nq))


@pytest.mark.parametrize("d, g", [(72, 1), (112, 2)])
def test_cross_attention_sana_heads(d, g):
    layout = sk.AttentionLayout.cross([40, 3], [77, 130])
    q, k, v = make_qkv(layout.total_q, layout.total_k, 2 * g, 2, d, torch.bfloat16)
    check("triton", q, k, v, layout, [torch.ones(40, 77, dtype=torch.bool), torch.ones(3, 130, dtype=torch.bool)])


def test_prefill_windows_empty_rows_strided_and_out():
    # windows not starting at 0, rows with nothing to see, a sequence without keys, strided q/k/v
    st = [0, 3, 5, 20, 0, 40, 10] + [0, 0]
    en = [40, 3, 9, 60, 0, 41, 70] + [0, 0]
    layout = sk.AttentionLayout.from_intervals([0, 7, 9], [0, 70, 70], st, en)
    q, k, v = make_qkv(9, 70, 4, 2, 80, torch.float16)
    q, k, v = non_contiguous(q, 1), non_contiguous(k, 0), non_contiguous(v, 0)
    out = poisoned_empty(9, 4, 80, dtype=torch.float16)
    masks = [ref.interval_mask(layout.kv_start[:7], layout.kv_end[:7], 70), torch.zeros(2, 0, dtype=torch.bool)]
    got, lse, _ = check("triton", q, k, v, layout, masks, softmax_scale=0.2, out=out)
    for r in (1, 4, 7, 8):
        assert torch.equal(got[r].float(), torch.zeros(4, 80)) and bool(torch.isneginf(lse[:, r]).all())


@pytest.fixture
def small_decode(monkeypatch):
    """Make the decode path kick in for keys of a few hundred (the interpreter is slow)."""
    monkeypatch.setattr(ak, "DECODE_MIN_KEYS", 128)
    monkeypatch.setattr(ak, "DECODE_KEYS_PER_SPLIT", 64)


@pytest.mark.parametrize("dtype, d, g", [(torch.float16, 64, 7), (torch.bfloat16, 128, 2), (torch.float16, 72, 1)])
def test_decode_split_kv(small_decode, dtype, d, g):
    segments = [[("causal", 300), ("full", 4)], [("causal", 150)], [("full", 20), ("causal", 200)]]
    nq = [5, 1, 8]
    layout = sk.AttentionLayout.from_segments(segments, num_queries=nq)
    assert ak.use_decode(layout.max_seqlen_q, layout.max_seqlen_k, g, dtype)
    assert ak.decode_splits(3, 1, layout.max_seqlen_k, torch.device("cpu")) > 1
    q, k, v = make_qkv(layout.total_q, layout.total_k, g, 1, d, dtype)
    check("triton", q, k, v, layout, seg_masks(segments, nq))


def test_decode_empty_rows_and_splits(small_decode):
    # a row seeing only the first keys (all later splits empty for it), an empty row, a short sequence
    layout = sk.AttentionLayout.from_intervals([0, 3, 4], [0, 260, 270], [0, 5, 7, 0], [3, 5, 260, 10])
    assert ak.use_decode(layout.max_seqlen_q, layout.max_seqlen_k, 2, torch.float16)
    q, k, v = make_qkv(4, 270, 4, 2, 32, torch.float16)
    masks = [ref.interval_mask(layout.kv_start[:3], layout.kv_end[:3], 260),
             ref.interval_mask(layout.kv_start[3:], layout.kv_end[3:], 10)]
    got, lse, _ = check("triton", q, k, v, layout, masks)
    assert torch.equal(got[1].float(), torch.zeros(4, 32)) and bool(torch.isneginf(lse[:, 1]).all())


@pytest.mark.parametrize("decode", [False, True])
def test_fp8_matches_bf16_and_cpu(monkeypatch, decode):
    if decode:
        monkeypatch.setattr(ak, "DECODE_MIN_KEYS", 128)
        monkeypatch.setattr(ak, "DECODE_KEYS_PER_SPLIT", 64)
        segments, nq = [[("causal", 200)], [("full", 150)]], [2, 3]
    else:
        segments, nq = [[("causal", 50), ("full", 30)], [("full", 40)]], None
    layout = sk.AttentionLayout.from_segments(segments, num_queries=nq)
    q, k, v = make_qkv(layout.total_q, layout.total_k, 4, 2, 96, torch.bfloat16, scale=1.5)
    (q8, qs), (k8, ks), (v8, vs) = _per_head_fp8(q), _per_head_fp8(k), _per_head_fp8(v)
    with sk.backend("triton"):
        got, lse = sk.hybrid_attention(q8, k8, v8, layout, q_descale=qs, k_descale=ks, v_descale=vs, return_lse=True)
    with sk.backend("cpu"):
        cpu, cpu_lse = sk.hybrid_attention(q8, k8, v8, layout, q_descale=qs, k_descale=ks, v_descale=vs,
                                           return_lse=True)
    want = sk.hybrid_attention(q, k, v, layout)
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(), want.double().flatten(), dim=0)
    assert got.dtype == torch.bfloat16 and cos >= 0.99
    # same dequantized inputs: the kernel and the CPU path agree to bf16 rounding
    torch.testing.assert_close(got.float(), cpu.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, cpu_lse, atol=1e-4, rtol=1e-5)


def test_fp8_decode_exact_for_all_byte_values():
    # every e4m3fn byte through the kernel's integer decoder: row i sees only key i, so out = v[i]
    vals = torch.arange(256, dtype=torch.uint8)
    vals = vals[(vals & 0x7F) != 0x7F].view(torch.float8_e4m3fn)  # the 254 finite values
    n = vals.numel()
    d = 16
    v = torch.zeros(n, 1, d, dtype=torch.float8_e4m3fn)
    v[:, 0, 0] = vals
    k = torch.zeros(n, 1, d, dtype=torch.float8_e4m3fn)
    q = torch.zeros(n, 1, d, dtype=torch.float8_e4m3fn)
    layout = sk.AttentionLayout.from_intervals([0, n], [0, n], list(range(n)), list(range(1, n + 1)))
    with sk.backend("triton"):
        got = sk.hybrid_attention(q, k, v, layout)  # row i sees only key i: out = v[i]
    torch.testing.assert_close(got[:, 0, 0], vals.to(torch.bfloat16), atol=0, rtol=0)
    # e4m3fn NaN (0x7F / 0xFF) decodes to NaN (a NaN key poisons every row of its tile, as in any
    # tiled attention, so it gets a layout of its own)
    one = sk.AttentionLayout.cross([1], [1])
    for bits in (0x7F, 0xFF):
        vn = torch.full((1, 1, d), bits, dtype=torch.uint8).view(torch.float8_e4m3fn)
        with sk.backend("triton"):
            assert torch.isnan(sk.hybrid_attention(q[:1], k[:1], vn, one)).all()


@pytest.mark.parametrize("bm, bn", [(16, 16), (32, 16), (16, 64)])
def test_kernel_tile_counts_equal_tile_work(bm, bn):
    rng = random.Random(bm * 100 + bn)
    segments = [random_segments(rng, 90, 3) for _ in range(3)]
    layout = sk.AttentionLayout.from_segments(segments, num_queries=[rng.randint(1, sum(n for _, n in s))
                                                                     for s in segments])
    layouts = [layout, sk.AttentionLayout.from_intervals([0, 3, 40], [0, 100, 140], [0, 50, 60] + [0] * 37,
                                                         [10, 50, 100] + list(range(1, 38)))]
    for lay in layouts:
        q, k, v = make_qkv(lay.total_q, lay.total_k, 3, 1, 16, torch.float32)
        out, lse = torch.empty_like(q), torch.empty(3, lay.total_q)
        counter = ak.TileCounter(bm, bn)
        with sk.backend("triton"):
            ak._impl_triton(q, k, v, lay.cu_seqlens_q, lay.cu_seqlens_k, lay.kv_start, lay.kv_end, lay.max_seqlen_q,
                            lay.max_seqlen_k, 0.25, out, lse, None, None, None, tile_counter=counter)
        tw = lay.tile_work(bm, bn)
        assert counter.counts.tolist() == [3 * tw.visited, 3 * tw.masked]
        want, _ = ref.hybrid_attention(q, k, v, lay.cu_seqlens_q, lay.cu_seqlens_k, lay.kv_start, lay.kv_end, 0.25)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert layouts[0].tile_work(bm, bn).visited == layouts[0].tile_work(bm, bn).minimum


def test_fp32_decode_layout_runs_through_prefill_kernel(small_decode):
    layout = sk.AttentionLayout.from_segments([[("causal", 200)], [("full", 150)]], num_queries=[2, 1])
    assert not ak.use_decode(layout.max_seqlen_q, layout.max_seqlen_k, 2, torch.float32)
    q, k, v = make_qkv(3, 350, 2, 1, 72, torch.float32)
    check("triton", q, k, v, layout, seg_masks([[("causal", 200)], [("full", 150)]], [2, 1]))


def test_launch_configs_cover_every_head_dim():
    for d in sk.attention.HEAD_DIMS:
        for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn):
            bm, bn, warps, stages = ak.prefill_config(d, dt)
            assert ak.block_d(d) >= d and bm >= 16 and bn >= 16
