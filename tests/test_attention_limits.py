"""hybrid_attention at its limits, without a GPU: 64-bit offsets (head-major views whose head
stride times head index passes 2**31 elements, run under the interpreter over a 2 GiB virtual
buffer of which a few pages are touched), one-axis grids for any batch x heads, caller-owned
workspaces (nothing allocated inside a call: what a captured CUDA graph needs), and AOT specs that
are the launches a GPU compiles (run-time specializations, 64-bit strides, unaligned head dims)."""

import pytest
import torch

import spar_kernels as sk
from spar_kernels import _aot
from spar_kernels.attention import _aot_specs
from spar_kernels.attention import kernels as ak

from conftest import requires_triton
from test_attention import make_qkv

_GAP = 2**30 + 4096  # head stride (elements): head 2 starts past 2**31


def _huge_stride_view(buf: torch.Tensor, x: torch.Tensor, offset: int) -> torch.Tensor:
    """``x [rows, heads, d]`` (uint8 bytes) copied into a view of ``buf`` with head stride _GAP."""
    rows, heads, d = x.shape
    view = buf.as_strided((rows, heads, d), (d, _GAP, 1), offset)
    view.copy_(x)
    return view


@requires_triton
@pytest.mark.parametrize("decode", [False, True])
def test_offsets_past_2_pow_31_elements(monkeypatch, decode):
    if decode:
        monkeypatch.setattr(ak, "DECODE_MIN_KEYS", 128)
        monkeypatch.setattr(ak, "DECODE_KEYS_PER_SPLIT", 64)
        layout = sk.AttentionLayout.from_segments([[("causal", 150)], [("causal", 140)]], num_queries=[2, 1])
    else:
        layout = sk.AttentionLayout.from_segments([[("causal", 20), ("full", 9)], [("full", 7)]])
    d, heads = 16, 3
    q, k, v = (t.to(torch.float8_e4m3fn) for t in make_qkv(layout.total_q, layout.total_k, heads, heads, d,
                                                             torch.float32))
    assert ak.use_decode(layout.max_seqlen_q, layout.max_seqlen_k, 1, q.dtype) == decode
    # one uint8 storage just over 2 GiB: virtual memory, only the pages the views use are written
    buf = torch.empty(2 * _GAP + 3 * 8192, dtype=torch.uint8)
    views = [_huge_stride_view(buf, t.view(torch.uint8), i * 8192).view(torch.float8_e4m3fn)
             for i, t in enumerate((q, k, v))]
    assert views[0].stride(1) * (heads - 1) >= 2**31 and views[0].stride(1) < 2**31
    with sk.backend("triton"):
        got, lse = sk.hybrid_attention(*views, layout, return_lse=True)
    with sk.backend("cpu"):
        want, want_lse = sk.hybrid_attention(q, k, v, layout, return_lse=True)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)


def test_grids_use_one_axis_for_any_batch_and_heads():
    # CUDA grid axes y and z stop at 65535: (query tiles x sequences x heads) all go on axis x
    meta = dict(device="meta")
    for B, hq, hkv, mq, mk, dtype in ((70000, 70, 70, 256, 256, torch.bfloat16),    # prefill
                                      (70000, 32, 8, 1, 4096, torch.bfloat16),      # decode + combine
                                      (3, 2, 1, 40, 40, torch.float32)):
        q = torch.empty(B * mq, hq, 64, dtype=dtype, **meta)
        k = torch.empty(B * mk, hkv, 64, dtype=dtype, **meta)
        plan = ak.plan_for(q, k, B, mq, mk)
        scratch = plan.carve(None, "meta")
        i32 = torch.empty(B + 1, dtype=torch.int32, **meta)
        st = torch.empty(B * mq, dtype=torch.int32, **meta)
        lse = torch.empty(hq, B * mq, **meta)
        launches = plan.launches(q, k, k, i32, i32, st, st, 0.1, q, lse, lse, lse, lse, scratch)
        assert len(launches) == (2 if plan.decode else 1)
        for fn, grid, args, *_ in launches:
            assert len(grid) == 1 and grid[0] < 2**31
        programs = sum(g[0] for _, g, *_ in launches)
        want = (-(-mq // plan.bm) * B * hq) if not plan.decode else plan.splits * B * hkv + B * mq * hq
        assert programs == want
    with pytest.raises(ValueError, match="more than a CUDA grid holds"):
        ak._grid(2**31)


def _allocations(fn):
    """Bytes of every CPU allocation made while ``fn`` runs (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]


@requires_triton
def test_workspace_makes_calls_allocation_free(monkeypatch):
    monkeypatch.setattr(ak, "DECODE_MIN_KEYS", 128)
    monkeypatch.setattr(ak, "DECODE_KEYS_PER_SPLIT", 64)
    layout = sk.AttentionLayout.from_segments([[("causal", 140)]], num_queries=[2])
    q, k, v = (t.to(torch.float8_e4m3fn) for t in make_qkv(layout.total_q, layout.total_k, 2, 1, 16, torch.float32))
    qs, vs = torch.tensor([0.5]), torch.tensor(2.0)  # a factor shared by the group, one value; k's missing
    plan = ak.plan_for(q, k, 1, layout.max_seqlen_q, layout.max_seqlen_k)
    assert plan.decode and plan.splits > 1
    with sk.backend("triton"):
        ws = sk.hybrid_attention_workspace(q, k, layout)
        assert ws.numel() == plan.numel + 3 * 16  # the kernels' regions + three descale vectors
        want = sk.hybrid_attention(q, k, v, layout, q_descale=qs, v_descale=vs)
        out, out_lse = torch.empty_like(want), torch.empty(2, layout.total_q)
        # with the workspace (and out=, out_lse=) nothing is allocated: no descale vectors, lse or
        # decode partials (the profiler does see allocations: the first assert)
        assert _allocations(lambda: torch.empty(3)) == [12]
        assert _allocations(lambda: sk.hybrid_attention(q, k, v, layout, q_descale=qs, v_descale=vs, out=out,
                                                        out_lse=out_lse, workspace=ws)) == []
        assert torch.equal(out, want) and bool(torch.isfinite(out_lse).all())
        # a larger workspace (sized for a bigger batch) serves the smaller call too
        big_ws = torch.empty(ws.numel() * 3)
        assert torch.equal(sk.hybrid_attention(q, k, v, layout, q_descale=qs, v_descale=vs, workspace=big_ws), want)
    with sk.backend("cpu"):  # the CPU path takes only the FP8 descale vectors from it
        ws_cpu = sk.hybrid_attention_workspace(q, k, layout)
        assert ws_cpu.numel() == 3 * 16
        a = sk.hybrid_attention(q, k, v, layout, q_descale=qs, v_descale=vs, workspace=ws_cpu)
        torch.testing.assert_close(a.float(), want.float(), atol=2e-2, rtol=2e-2)


def _key(spec):
    return (spec.fn, tuple(sorted(spec.types.items())), tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items())),
            tuple(sorted(spec.aligned)), spec.num_warps, spec.num_stages)


def test_align_is_what_divides_the_head_dim_and_strides():
    assert [ak.align_of(d) for d in (64, 128, 56, 72, 40, 12, 8)] == [16, 16, 8, 8, 8, 1, 8]
    assert ak.align_of(64, 64 * 14, 64, 8) == 8 and ak.align_of(64, 3) == 1
    q = torch.empty(10, 4, 64, device="meta")
    assert ak.plan_for(q, q, 1, 10, 10).align == 16
    assert ak.plan_for(q, q, 1, 10, 10, v=torch.empty(10, 4, 72, device="meta")[..., :64]).align == 8


def test_aot_specs_are_the_launches_a_gpu_compiles():
    specs = _aot_specs.aot_specs()
    keys = {_key(s) for s in specs}
    # calls at the models' head shapes with other batch sizes, lengths and group sizes (1 included)
    # specialize exactly like the listed ones: the grid sizes, the group and the lse strides are
    # excluded from triton's value-1 / divisible-by-16 specialization
    for dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float32):
        for hq, hkv, d in ((14, 2, 64), (16, 16, 56), (12, 2, 128), (16, 16, 72)):
            for seqlens_q, seqlens_k in (([1], [1]), ([5, 17, 1], [5, 17, 1]), ([1], [9000]), ([3, 1], [600, 700])):
                if max(seqlens_k) >= 512 and (hq, d) not in ((14, 64), (12, 128)):
                    continue  # decode shapes: the LLM heads only
                _, launches = _aot_specs._case(dtype, hq, hkv, d, seqlens_q, seqlens_k)
                for fn, _g, args, consts, warps, stages in launches:
                    kind = _aot_specs._KIND[fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__]
                    consts = dict(consts, DOT_UPCAST=False) if "DOT_UPCAST" in consts else consts
                    spec = _aot_specs._unspecialize(_aot.launch_spec("x", fn, "", args, consts, num_warps=warps,
                                                                     num_stages=stages), args, ak.NO_SPECIALIZE[kind])
                    assert _key(spec) in keys, (dtype, hq, hkv, d, seqlens_q, seqlens_k, kind)
    for s in specs:
        for names in ak.NO_SPECIALIZE.values():
            assert not set(names) & (set(s.constexprs) | set(s.aligned))
    # head dims that are multiples of 8 but not 16 (56, 72) with both BLOCK_D, an odd one (12),
    # 64-bit strides (head-major views past 2**35 elements)
    fwd = [(s.constexprs["BLOCK_D"], s.constexprs["ALIGN"]) for s in specs if s.fn is ak._hybrid_attn_fwd]
    assert {(64, 8), (128, 8), (64, 1), (64, 16), (128, 16)} <= set(fwd)
    assert {s.fn for s in specs if s.types.get("stride_qh") == "i64"} == {ak._hybrid_attn_fwd, ak._hybrid_attn_decode}
    # the launcher's num_stages
    assert {(s.num_warps, s.num_stages) for s in specs if s.fn is ak._hybrid_attn_fwd} == \
        {c[2:] for c in ak._PREFILL_CONFIGS.values()}


def test_decode_split_geometry_covers_every_key_once():
    """The decode plan's key splits, over batch sizes, KV heads, head dims, dtypes and key counts
    (the 512-key threshold, lengths just past a split or tile boundary, 1M keys): between 1 and
    DECODE_MAX_SPLITS splits (the combine kernel reads that many), whole key tiles per split, every
    key in a split and no split empty (splits * per_split covers max_seqlen_k, the last split
    starts before it)."""
    cpu = torch.device("cpu")
    seen = set()
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for d in (64, 128):
            for batch, hkv in ((1, 1), (1, 8), (3, 2), (64, 8), (500, 1)):
                for nk in (512, 513, 700, 1023, 4096, 4097, 16385, 65535, 262143, 1 << 20):
                    plan = ak.Plan(batch, 8 * hkv, hkv, d, batch, 1, nk, dtype, cpu)
                    assert plan.decode, (dtype, d, batch, hkv, nk)
                    s, per, bn = plan.splits, plan.per_split, plan.bn
                    assert 1 <= s <= ak.DECODE_MAX_SPLITS and per % bn == 0 and per > 0, (s, per, bn, nk)
                    assert s * per >= nk and (s - 1) * per < nk, (s, per, nk)
                    seen.add(s)
    assert 1 in seen and ak.DECODE_MAX_SPLITS in seen and len(seen) > 4, sorted(seen)
