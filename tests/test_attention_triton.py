"""The Triton kernels of hybrid_attention under the interpreter (small shapes: the interpreter is
slow): prefill and split-KV decode against the fp64 reference with segment-built masks, head dims
from 16 to 128 (multiples of 8 and of 16), GQA 1/2/7, fp16/bf16/fp32, FP8 (values, not only
direction), sliding-window and document layouts whose common key interval starts inside a key tile,
several query tiles per sequence, empty rows, strided inputs, out-of-range intervals (clamped),
P rounded to the dot dtype as on a GPU, and the kernel's own count of visited/masked key tiles
against AttentionLayout.tile_work."""

import random

import pytest
import torch

import spar_kernels as sk
from spar_kernels.attention import kernels as ak
from spar_kernels.reference import attention as ref
from spar_kernels.testing import non_contiguous, poisoned_empty

from conftest import requires_triton
from test_attention import _per_head_fp8, check, expected, fp8_reference, make_qkv, seg_masks
from test_attention_layout import random_segments

pytestmark = requires_triton


# per-dtype seed offsets: fixed, so a failing layout reproduces (str/hash() of a dtype changes per run)
_DTYPE_SEED = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}


@pytest.mark.parametrize("d", [16, 32, 64, 72, 80, 96, 112, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_prefill_random_layouts(d, dtype):
    rng = random.Random(d * 7 + _DTYPE_SEED[dtype])
    segments = [random_segments(rng, 70, 3) for _ in range(rng.randint(1, 3))]
    nq = [rng.randint(1, sum(n for _, n in s)) for s in segments] if rng.random() < 0.5 else None
    layout = sk.AttentionLayout.from_segments(segments, num_queries=nq)
    hkv, g = rng.choice([(2, 1), (1, 2), (1, 7)])
    q, k, v = make_qkv(layout.total_q, layout.total_k, hkv * g, hkv, d, dtype, scale=1.5)
    check("triton", q, k, v, layout, seg_masks(segments, nq))


@pytest.mark.parametrize("d, g", [(72, 1), (112, 2), (56, 1)])
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


@pytest.mark.parametrize("dtype, d, g", [(torch.float16, 64, 7), (torch.bfloat16, 128, 2), (torch.float16, 72, 1),
                                         (torch.bfloat16, 56, 2)])
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
def test_fp8_values_match_the_dequantized_reference(monkeypatch, decode):
    if decode:
        monkeypatch.setattr(ak, "DECODE_MIN_KEYS", 128)
        monkeypatch.setattr(ak, "DECODE_KEYS_PER_SPLIT", 64)
        segments, nq = [[("causal", 200)], [("full", 150)]], [2, 3]
    else:
        segments, nq = [[("causal", 50), ("full", 30)], [("full", 40)]], None
    layout = sk.AttentionLayout.from_segments(segments, num_queries=nq)
    assert ak.use_decode(layout.max_seqlen_q, layout.max_seqlen_k, 2, torch.float8_e4m3fn) == decode
    q, k, v = make_qkv(layout.total_q, layout.total_k, 4, 2, 96, torch.bfloat16, scale=1.5)
    # descales far from 1, so a dropped or misapplied one changes the values by orders of magnitude
    (q8, qs), (k8, ks), (v8, vs) = _per_head_fp8(q * 3.0), _per_head_fp8(k * 0.5), _per_head_fp8(v * 40.0)
    with sk.backend("triton"):
        got, lse = sk.hybrid_attention(q8, k8, v8, layout, q_descale=qs, k_descale=ks, v_descale=vs, return_lse=True)
    want, want_lse = fp8_reference(q8, k8, v8, qs, ks, vs, layout)
    assert got.dtype == torch.bfloat16
    # P is rounded to fp16 before P.V and the output to bf16: ~2^-9 of the values' scale
    torch.testing.assert_close(got.double(), want, atol=0.02 * float(want.abs().max()), rtol=1e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-5)
    # and the FP8 result is the bf16 one up to the quantization of the inputs
    ref16 = sk.hybrid_attention(q * 3.0, k * 0.5, v * 40.0, layout).double()
    assert float((got.double() - ref16).norm() / ref16.norm()) < 0.08


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


@pytest.mark.parametrize("dtype, path", [(torch.float32, "prefill"), (torch.bfloat16, "prefill"),
                                         (torch.float16, "decode"), (torch.bfloat16, "decode")])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_cache_slots_past_every_row_do_not_reach_them(dtype, path, poison):
    """A preallocated KV cache holds garbage (NaN / inf bit patterns of torch.empty) past its valid
    keys, inside the key tile the rows visit: P is 0 there, but 0 * NaN is NaN, so a masked tile
    loads no value outside the union of its rows' intervals. Prefill (20 causal rows over 20 of 40
    keys) and split-KV decode (4 rows over 590 of 600); K is masked after its dot already."""
    Tq, Tk, valid = (20, 40, 20) if path == "prefill" else (4, 600, 590)
    q, k, v = make_qkv(Tq, Tk, 2, 1, 64, dtype)
    st, en = [0] * Tq, [valid - Tq + i + 1 for i in range(Tq)]
    cu_q, cu_k = torch.tensor([0, Tq], dtype=torch.int32), torch.tensor([0, Tk], dtype=torch.int32)
    masks = [ref.interval_mask(torch.tensor(st), torch.tensor(en), Tk)]
    want, _ = expected(q.double(), k.double(), v.double(), masks, [0, Tq], [0, Tk], 64 ** -0.5, torch.float64)
    v[valid:, :, 3] = poison
    k[valid + 1:, :, 5] = poison
    with sk.backend("triton"):
        got = sk.hybrid_attention_varlen(q, k, v, cu_q, cu_k, torch.tensor(st, dtype=torch.int32),
                                         torch.tensor(en, dtype=torch.int32), Tq, Tk)
    assert torch.isfinite(got).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


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
                            lay.max_seqlen_k, 0.25, out, lse, None, None, None, None, tile_counter=counter)
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
    assert set(range(32, 129, 8)) <= set(sk.attention.HEAD_DIMS)
    for d in sk.attention.HEAD_DIMS:
        for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn):
            bm, bn, warps, stages = ak.prefill_config(d, dt)
            assert ak.block_d(d) >= d and bm >= 16 and bn >= 16


def _window_and_document_layout(n: int, window: int, doc: int):
    """Sequence 0: a sliding window (row i sees [i - window + 1, i]); sequence 1: two causal
    documents split at ``doc`` (row i sees [start of its document, i]). Every query tile of more
    than one row has a common key interval that starts inside a key tile, for any tile size that
    does not divide ``doc`` or the window starts."""
    st = [max(0, i - window + 1) for i in range(n)] + [0 if i < doc else doc for i in range(n)]
    en = [i + 1 for i in range(n)] * 2
    return sk.AttentionLayout.from_intervals([0, n, 2 * n], [0, n, 2 * n], st, en)


@pytest.mark.parametrize("dtype, d", [(torch.float32, 40), (torch.float16, 32), (torch.bfloat16, 56),
                                      (torch.float8_e4m3fn, 32)])
def test_windows_and_documents_starting_inside_a_key_tile(dtype, d):
    # 160 rows per sequence: two query tiles of 128 (fp16/bf16/fp8) or five of 32 (fp32); the
    # window (140: the last tile's rows share [20, 129)) and the second document (from 100) start
    # inside 64- and 32-key tiles
    n, window = 160, 140
    layout = _window_and_document_layout(n, window, 100)
    masks = [ref.interval_mask(layout.kv_start[b * n:(b + 1) * n], layout.kv_end[b * n:(b + 1) * n], n)
             for b in range(2)]
    bm, bn, _, _ = ak.prefill_config(d, dtype)
    assert n > bm and 100 % bn and (n - window) % bn
    if dtype != torch.float8_e4m3fn:
        q, k, v = make_qkv(2 * n, 2 * n, 2, 1, d, dtype, scale=1.5)
        check("triton", q, k, v, layout, masks)
        return
    q, k, v = make_qkv(2 * n, 2 * n, 2, 1, d, torch.float32, scale=1.5)
    (q8, qs), (k8, ks), (v8, vs) = _per_head_fp8(q), _per_head_fp8(k), _per_head_fp8(v * 10.0)
    with sk.backend("triton"):
        got = sk.hybrid_attention(q8, k8, v8, layout, q_descale=qs, k_descale=ks, v_descale=vs)
    want, _ = fp8_reference(q8, k8, v8, qs, ks, vs, layout)
    torch.testing.assert_close(got.double(), want, atol=0.02 * float(want.abs().max()), rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_p_is_rounded_to_the_dot_dtype_as_on_a_gpu(dtype):
    # One key tile, so the running max is the final one; v = identity over the keys, so
    # out[i, h, j] = P[i, h, j] / l. The compiled kernel rounds P to the 16-bit dot dtype before
    # P.V (l sums the unrounded P); the interpreter must give the same bits.
    n, nk, d = 48, 40, 64
    q = (torch.randn(n, 2, d) * 2).to(dtype)
    k = (torch.randn(nk, 1, d) * 2).to(dtype)
    v = torch.zeros(nk, 1, d, dtype=dtype)
    v[torch.arange(nk), 0, torch.arange(nk)] = 1
    assert nk <= ak.prefill_config(d, dtype)[1]
    with sk.backend("triton"):
        got = sk.hybrid_attention(q, k, v, sk.AttentionLayout.cross([n], [nk]), softmax_scale=0.3)
    s = torch.einsum("nhd,kd->hnk", q.float(), k[:, 0].float()) * (0.3 * ak.LOG2E)
    p = torch.exp2(s - s.amax(-1, keepdim=True))
    want = (p.to(dtype).float() / p.sum(-1, keepdim=True)).permute(1, 0, 2).to(dtype)
    same = (got[:, :, :nk] == want).float().mean().item()
    assert same >= 0.995, f"only {same:.1%} of the outputs carry the bits of a P rounded to {dtype}"
    assert torch.equal(got[:, :, nk:], torch.zeros_like(got[:, :, nk:]))


@pytest.mark.parametrize("decode", [False, True])
def test_intervals_outside_the_sequence_are_clamped(small_decode, decode):
    # what hybrid_attention_varlen passes to the kernels unchecked on CUDA: kv_start < 0 and
    # kv_end > seqlen_k must not reach the neighbouring sequence's keys (or memory past k)
    nq, nk = (3, 260) if decode else (20, 50)
    st = torch.tensor([-5, 3, -1000] + [-7] * (nq - 3) + [-3, 10, 0] + [2] * (nq - 3), dtype=torch.int32)
    en = torch.tensor([nk + 9, nk + 1000, 7] + [nk] * (nq - 3) + [4, nk + 1, 2**31 - 1] + [nk + 3] * (nq - 3),
                      dtype=torch.int32)
    cu_q = torch.tensor([0, nq, 2 * nq], dtype=torch.int32)
    cu_k = torch.tensor([0, nk, 2 * nk], dtype=torch.int32)
    dtype = torch.float16 if decode else torch.float32
    assert ak.use_decode(nq, nk, 2, dtype) == decode
    q, k, v = make_qkv(2 * nq, 2 * nk, 2, 1, 32, dtype)
    out, lse = torch.empty_like(q), torch.empty(2, 2 * nq)
    with sk.backend("triton"):
        ak._impl_triton(q, k, v, cu_q, cu_k, st, en, nq, nk, 0.2, out, lse, None, None, None, None)
    cst, cen = st.clamp(min=0), en.clamp(max=nk)
    want, want_lse = ref.hybrid_attention(q, k, v, cu_q, cu_k, cst, cen, 0.2)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)


def test_nan_scores_give_nan_rows_and_lse_and_an_all_minus_inf_row_is_empty(monkeypatch):
    """A NaN query row (prefill) or a NaN key in one KV split (decode): the row and its lse are
    NaN, as in the reference (the kernels read a NaN sum as an empty row: lse -inf, or a finite
    lse from the other splits). A -inf query component against positive keys in unmasked key tiles
    makes every score -inf: zeros and lse -inf, not NaN (exp2(-inf - -inf))."""
    torch.manual_seed(0)

    def both(q, k, v, lay):
        with sk.backend("triton"):
            got = sk.hybrid_attention(q, k, v, lay, return_lse=True)
        with sk.backend("reference"):
            want = sk.hybrid_attention(q, k, v, lay, return_lse=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2, equal_nan=True)
        return got

    lay = sk.AttentionLayout.from_segments([[("causal", 6)]])
    q, k, v = (torch.randn(6, 2, 64) for _ in range(3))
    q[2] = float("nan")
    assert torch.isnan(both(q, k, v, lay)[1][:, 2]).all()
    monkeypatch.setattr(ak, "DECODE_MIN_KEYS", 128)
    monkeypatch.setattr(ak, "DECODE_KEYS_PER_SPLIT", 64)
    lay = sk.AttentionLayout.from_intervals([0, 1], [0, 300], [0], [300])
    q, k, v = torch.randn(1, 2, 64, dtype=torch.float16), torch.randn(300, 1, 64, dtype=torch.float16), \
        torch.randn(300, 1, 64, dtype=torch.float16)
    k[250, 0, 3] = float("nan")
    assert torch.isnan(both(q, k, v, lay)[1]).all()
    lay = sk.AttentionLayout.from_segments([[("full", 64)]])
    q, k, v = torch.randn(64, 1, 32), torch.rand(64, 1, 32) + 0.1, torch.randn(64, 1, 32)
    q[0, 0, 0] = float("-inf")
    out, lse = both(q, k, v, lay)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and lse[0, 0] == float("-inf")
