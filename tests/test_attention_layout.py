"""AttentionLayout: constructors against masks built independently from the segments, validation
errors, devices, and the tile accounting (tile_work) of the attention kernel."""

import random

import numpy as np
import pytest
import torch

import spar_kernels as sk
from spar_kernels.reference import attention as ref


def random_segments(rng: random.Random, max_len: int = 600, max_segments: int = 5):
    segs, total = [], rng.randint(1, max_len)
    while total > 0:
        n = min(total, rng.randint(1, max(1, max_len // rng.randint(1, max_segments))))
        segs.append((rng.choice(("causal", "full")), n))
        total -= n
    return segs


def layout_masks(layout: sk.AttentionLayout):
    cu_q, cu_k, st, en = layout.host_intervals()
    out = []
    for b in range(layout.batch_size):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        out.append(ref.interval_mask(torch.from_numpy(st[q0:q1]), torch.from_numpy(en[q0:q1]), int(k1 - k0)))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_from_segments_matches_the_definition(seed):
    rng = random.Random(seed)
    segments = [random_segments(rng) for _ in range(rng.randint(1, 8))]
    nq = [rng.randint(0, sum(n for _, n in s)) for s in segments] if seed % 2 else None
    layout = sk.AttentionLayout.from_segments(segments, num_queries=nq)
    lens = [sum(n for _, n in s) for s in segments]
    assert layout.cu_seqlens_k.tolist() == np.concatenate([[0], np.cumsum(lens)]).tolist()
    assert layout.cu_seqlens_q.dtype == layout.kv_end.dtype == torch.int32
    assert layout.max_seqlen_k == max(lens)
    for b, mask in enumerate(layout_masks(layout)):
        want = ref.segments_mask(segments[b], None if nq is None else nq[b])
        assert torch.equal(mask, want), f"sequence {b}: {segments[b]}"
    assert layout.visible_pairs == sum(int(m.sum()) for m in layout_masks(layout))


def test_from_segments_small_cases_by_hand():
    lay = sk.AttentionLayout.from_segments([[("causal", 3), ("full", 2), ("causal", 1)]])
    assert lay.kv_start.tolist() == [0] * 6
    assert lay.kv_end.tolist() == [1, 2, 3, 5, 5, 6]
    dec = sk.AttentionLayout.from_segments([[("causal", 4)], [("full", 3)]], num_queries=1)
    assert dec.cu_seqlens_q.tolist() == [0, 1, 2] and dec.kv_end.tolist() == [4, 3]
    assert dec.max_seqlen_q == 1 and dec.max_seqlen_k == 4


def test_cross_layout():
    lay = sk.AttentionLayout.cross([3, 0, 2], [5, 4, 0])
    assert lay.cu_seqlens_q.tolist() == [0, 3, 3, 5]
    assert lay.cu_seqlens_k.tolist() == [0, 5, 9, 9]
    assert lay.kv_start.tolist() == [0] * 5 and lay.kv_end.tolist() == [5, 5, 5, 0, 0]
    assert lay.visible_pairs == 15


def test_from_intervals_round_trip_and_device():
    base = sk.AttentionLayout.from_segments([[("causal", 5), ("full", 4)], [("full", 3)]], num_queries=[6, 3])
    st = base.kv_start.clone()
    st[2] = 1  # a window that does not start at 0
    lay = sk.AttentionLayout.from_intervals(base.cu_seqlens_q, base.cu_seqlens_k, st, base.kv_end)
    assert lay.kv_start.tolist() == st.tolist() and lay.device == torch.device("cpu")
    lay2 = sk.AttentionLayout.from_intervals([0, 2], [0, 3], [0, 1], [3, 2])
    assert lay2.kv_end.dtype == torch.int32 and lay2.total_q == 2 and lay2.total_k == 3
    assert lay.to("cpu").kv_end.tolist() == lay.kv_end.tolist()
    meta = lay.to("meta")
    assert meta.device == torch.device("meta") and meta.total_q == lay.total_q
    assert "AttentionLayout(batch=2" in repr(lay)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: sk.AttentionLayout.from_intervals([1, 2], [0, 2], [0], [1]), ValueError, "cu_seqlens_q: must start at 0"),
    (lambda: sk.AttentionLayout.from_intervals([0, 2], [0, 3, 2], [0, 0], [1, 1]), ValueError, "cu_seqlens_k"),
    (lambda: sk.AttentionLayout.from_intervals([0, 2, 1], [0, 2, 4], [0, 0], [1, 1]), ValueError,
     "cu_seqlens_q: must be non-decreasing"),
    (lambda: sk.AttentionLayout.from_intervals([0, 2], [0, 3], [0, 0], [1, 4]), ValueError, "outside its sequence"),
    (lambda: sk.AttentionLayout.from_intervals([0, 2], [0, 3], [0, 2], [1, 1]), ValueError, "outside its sequence"),
    (lambda: sk.AttentionLayout.from_intervals([0, 2], [0, 3], [-1, 0], [1, 1]), ValueError, "outside its sequence"),
    (lambda: sk.AttentionLayout.from_intervals([0, 2], [0, 3], [0], [1]), ValueError, "kv_start: expected 2"),
    (lambda: sk.AttentionLayout.from_intervals([0, 2], [0, 3], [0, 0], [1]), ValueError, "kv_end: expected 2"),
    (lambda: sk.AttentionLayout.from_intervals([], [], [], []), ValueError, "cu_seqlens_q: expected at least one"),
    (lambda: sk.AttentionLayout.from_intervals(torch.tensor([0.0, 1.0]), [0, 1], [0], [1]), ValueError,
     "cu_seqlens_q: expected a 1-D integer"),
    (lambda: sk.AttentionLayout.from_intervals(torch.tensor([0, 1]), torch.tensor([0, 1], device="meta"), [0], [1]),
     ValueError, "one device"),
    (lambda: sk.AttentionLayout.from_intervals("0,1", [0, 1], [0], [1]), TypeError, "cu_seqlens_q"),
    (lambda: sk.AttentionLayout.from_segments([[("sliding", 3)]]), ValueError, r"segments\[0\]\[0\]: kind"),
    (lambda: sk.AttentionLayout.from_segments([[("causal", -1)]]), ValueError, "length must be"),
    (lambda: sk.AttentionLayout.from_segments([[("causal", 2.5)]]), ValueError, "length must be"),
    (lambda: sk.AttentionLayout.from_segments([[("causal",)]]), ValueError, "pair"),
    (lambda: sk.AttentionLayout.from_segments("causal"), TypeError, "segments"),
    (lambda: sk.AttentionLayout.from_segments([[("causal", 3)]], num_queries=[4]), ValueError, r"num_queries\[0\]"),
    (lambda: sk.AttentionLayout.from_segments([[("causal", 3)]], num_queries=[1, 1]), ValueError, "num_queries"),
    (lambda: sk.AttentionLayout.from_segments([[("causal", 3)]], device="gpu0"), ValueError, "device"),
    (lambda: sk.AttentionLayout.cross([1, 2], [3]), ValueError, "k_lens: expected 2"),
    (lambda: sk.AttentionLayout.cross([1, -2], [3, 3]), ValueError, r"q_lens\[1\]"),
    (lambda: sk.AttentionLayout.cross([1], [3]).tile_work(0, 16), ValueError, "block_m"),
])
def test_layout_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _brute_force_tile_work(layout, bm, bn):
    """Per (query tile, key tile): visited by the kernel's rule, masked, holding a visible pair."""
    visited = masked = minimum = 0
    for b, mask in enumerate(layout_masks(layout)):
        nq, nk = mask.shape
        cu_q, _, st, en = layout.host_intervals()
        for m0 in range(0, nq, bm):
            rows = mask[m0:m0 + bm]
            s = st[cu_q[b] + m0: cu_q[b] + min(m0 + bm, nq)]
            e = en[cu_q[b] + m0: cu_q[b] + min(m0 + bm, nq)]
            ne = e > s
            for n0 in range(0, nk, bn):
                blk = rows[:, n0:n0 + bn]
                minimum += bool(blk.any())
                if not ne.any():
                    continue
                if n0 + bn > s[ne].min() and n0 < e[ne].max():
                    visited += 1
                    full = blk.shape[1] == bn and bool(blk.all())
                    masked += not full
    return visited, masked, minimum


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bm, bn", [(64, 64), (128, 64), (16, 32), (64, 16)])
def test_tile_work_segment_layouts_visit_the_minimum(seed, bm, bn):
    rng = random.Random(seed)
    segments = [random_segments(rng, 400) for _ in range(rng.randint(1, 6))]
    nq = [rng.randint(1, sum(n for _, n in s)) for s in segments] if seed % 2 else None
    lay = sk.AttentionLayout.from_segments(segments, num_queries=nq)
    tw = lay.tile_work(bm, bn)
    assert tw.visited == tw.minimum
    assert (tw.visited, tw.masked, tw.minimum) == _brute_force_tile_work(lay, bm, bn)
    assert 0 <= tw.masked <= tw.visited


def test_tile_work_cross_and_pure_layouts():
    cross = sk.AttentionLayout.cross([256, 256], [300, 300])
    # 4 query tiles x ceil(300/64)=5 key tiles; only the last key tile (keys 256..299) is partial
    assert cross.tile_work(128, 64) == sk.attention.TileWork(20, 4, 20)
    causal = sk.AttentionLayout.from_segments([[("causal", 256)]])
    tw = causal.tile_work(64, 64)
    assert tw.visited == tw.minimum == 10 and tw.masked == 4  # only the diagonal tiles are masked
    full = sk.AttentionLayout.from_segments([[("full", 256)]])
    assert full.tile_work(64, 64) == (16, 0, 16)


def test_tile_work_gapped_intervals_can_exceed_minimum():
    # two rows of one tile see far-apart windows: the kernel visits the keys between them
    lay = sk.AttentionLayout.from_intervals([0, 2], [0, 256], [0, 200], [10, 256])
    tw = lay.tile_work(16, 32)
    assert tw.minimum == 3 and tw.visited == 8 and tw.masked == 8
    assert (tw.visited, tw.masked, tw.minimum) == _brute_force_tile_work(lay, 16, 32)


def test_tile_work_with_empty_rows():
    lay = sk.AttentionLayout.from_intervals([0, 4, 6], [0, 100, 100], [0, 5, 5, 0, 0, 0], [0, 70, 40, 0, 0, 0])
    tw = lay.tile_work(4, 32)
    assert tw == _brute_force_tile_work(lay, 4, 32)
    assert tw.visited == tw.minimum == 3
