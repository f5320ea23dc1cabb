"""split_by_expert (with the fused per-expert RMSNorm) and merge_experts: Triton (interpreter), CPU,
reference; the per-expert norm checked against transformers' Qwen2RMSNorm and an fp64 formula."""

import pytest
import torch

import spar_kernels as sk
from spar_kernels.reference import split_by_expert as ref
from spar_kernels.testing import assert_close, assert_close_fa, non_contiguous, poisoned_empty

from conftest import interpreter_ok

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(not interpreter_ok(), reason="needs the interpreter")),
            "cpu", "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _oracle64(x, ids, W, eps):
    """Expected grouped rows in fp64: stable grouping by expert, RMSNorm with each expert's weight."""
    order = torch.cat([torch.nonzero(ids == e).flatten() for e in range(W.shape[0])])
    h = x.double()[order]
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * W.double()[ids[order]], order


def _check_structure(s, ids, E):
    N = ids.shape[0]
    counts = torch.bincount(ids.long(), minlength=E)
    assert torch.equal(s.offsets, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert torch.equal(torch.sort(s.perm).values, torch.arange(N))             # a permutation
    assert bool((ids[s.perm][1:] >= ids[s.perm][:-1]).all())                   # grouped by expert
    for e in range(E):                                                          # stable inside a group
        p = s.perm[s.offsets[e]:s.offsets[e + 1]]
        assert bool((p[1:] > p[:-1]).all())
    assert s.counts == tuple(counts.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,N,D", [(1, 9, 64), (2, 41, 130), (3, 17, 7), (4, 5, 1), (2, 3, 8200)])
def test_split_by_expert_norm(backend, dtype, E, N, D):
    x = (torch.randn(N, D) * 3).to(dtype)
    ids = torch.randint(0, E, (N,))
    W = (torch.randn(E, D) * 0.5 + 1).to(dtype)
    with sk.backend(backend):
        s = sk.split_by_expert(x, ids, E, W, eps=1e-5)
    _check_structure(s, ids, E)
    want64, order = _oracle64(x, ids, W, 1e-5)
    assert torch.equal(s.perm, order)
    if dtype == torch.float32:
        assert_close(s.rows, want64.float(), atol=2e-5, rtol=2e-5)
    else:
        base = ref.split_by_expert(x, ids, E, W, 1e-5, compute_dtype=dtype)[0]
        assert_close_fa(s.rows, base, want64)
        assert_close(s.rows, want64.to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_by_expert_matches_transformers_rmsnorm(backend):
    Qwen2RMSNorm = pytest.importorskip("transformers.models.qwen2.modeling_qwen2").Qwen2RMSNorm
    E, N, D = 2, 33, 96
    x = torch.randn(N, D)
    ids = torch.randint(0, E, (N,))
    norms = []
    for e in range(E):
        n = Qwen2RMSNorm(D, eps=1e-6)
        with torch.no_grad():
            n.weight.copy_(torch.randn(D))
        norms.append(n)
    with sk.backend(backend):
        s = sk.split_by_expert(x, ids, E, [n.weight.detach() for n in norms])
    with torch.no_grad():
        for e in range(E):
            got = s.expert(e)
            assert_close(got, norms[e](x[ids == e]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_split_merge_roundtrip_without_norm(backend, dtype):
    N, D, E = 50, 24, 3
    x = torch.randint(-100, 100, (N, D)).to(dtype)
    ids = torch.randint(0, E, (N,), dtype=torch.int32)
    with sk.backend(backend):
        s = sk.split_by_expert(x, ids, E)
        assert torch.equal(s.rows, x[s.perm])
        back = sk.merge_experts(s.rows, s)
        assert torch.equal(back, x)
        # per-expert outputs of another width (a projection per expert), merged back in token order
        y = torch.cat([s.expert(e).float()[:, :5] * (e + 1) for e in range(E)])
        merged = sk.merge_experts(y, s.perm, out=poisoned_empty(N, 5, dtype=torch.float32))
    want = torch.empty(N, 5)
    for e in range(E):
        want[ids == e] = x[ids == e].float()[:, :5] * (e + 1)
    assert torch.equal(merged, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_by_expert_options(backend):
    N, D, E = 21, 40, 2
    x = non_contiguous(torch.randn(N, D).to(torch.bfloat16), 0)
    ids = [i % 2 for i in range(N)]
    W = non_contiguous(torch.randn(E, D), 0)  # fp32 weights (strided) with bf16 rows
    out = poisoned_empty(N, D, dtype=torch.bfloat16)
    with sk.backend(backend):
        s = sk.split_by_expert(x, ids, E, W, 1e-6, counts=[11, 10], out=out)
    assert s.rows is out and s.counts == (11, 10)
    want64, _ = _oracle64(x, torch.tensor(ids), W, 1e-6)
    assert_close(s.rows, want64.to(torch.bfloat16))
    rows, offsets, perm, counts = s  # a plain tuple too
    assert torch.equal(rows[offsets[1]:], s.expert(1))
    for bad in (-1, 2, 1.0, True):  # no Python-style negative or out-of-range expert index
        with pytest.raises(ValueError, match=r"e: expected an expert index in \[0, 2\)"):
            s.expert(bad)
        with pytest.raises(ValueError, match=r"e: expected an expert index in \[0, 2\)"):
            s._replace(counts=None).expert(bad)  # counts read from offsets
    # strided expert ids, int32
    ids_s = torch.tensor(ids, dtype=torch.int32).repeat_interleave(2)[::2]
    with sk.backend(backend):
        s2 = sk.split_by_expert(x, ids_s, E, W, 1e-6)
    assert torch.equal(s2.rows, s.rows)
    # empty input
    with sk.backend(backend):
        s0 = sk.split_by_expert(torch.zeros(0, D), torch.zeros(0, dtype=torch.long), 3, torch.ones(3, D))
    assert s0.rows.shape == (0, D) and s0.offsets.tolist() == [0, 0, 0, 0] and s0.counts == (0, 0, 0)


@pytest.mark.skipif(not interpreter_ok(), reason="needs the interpreter")
def test_split_kernel_out_of_range_expert_is_safe():
    # unchecked ids (the CUDA path) never index outside the weight table: clamped to [0, E)
    x = torch.randn(4, 16)
    W = torch.randn(2, 16)
    ids = torch.tensor([0, 1, 5, -3])
    perm = torch.arange(4)
    out = torch.empty(4, 16)
    with sk.backend("triton"):
        torch.ops.spar.split_by_expert(x, ids, perm, torch.tensor([0, 1, 2]), W, 1e-6, out)
    assert bool(torch.isfinite(out).all())


def test_split_by_expert_bad_inputs():
    x, ids, W = torch.randn(6, 8), torch.tensor([0, 1, 0, 1, 1, 0]), torch.ones(2, 8)
    with pytest.raises(ValueError, match="expert_ids: index out of range"):
        sk.split_by_expert(x, torch.tensor([0, 1, 2, 0, 0, 0]), 2)
    with pytest.raises(ValueError, match="expert_ids: expected 6 ids"):
        sk.split_by_expert(x, ids[:5], 2)
    with pytest.raises(ValueError, match="expert_ids: expected an int32 or int64"):
        sk.split_by_expert(x, ids.float(), 2)
    with pytest.raises(ValueError, match="num_experts: expected an int >= 1"):
        sk.split_by_expert(x, ids, 0)
    with pytest.raises(ValueError, match=r"norm_weights: expected shape \(2, 8\)"):
        sk.split_by_expert(x, ids, 2, torch.ones(2, 7))
    with pytest.raises(ValueError, match="norm_weights: expected 2 weights"):
        sk.split_by_expert(x, ids, 2, [torch.ones(8)])
    with pytest.raises(ValueError, match="norm_weights: expected a floating-point"):
        sk.split_by_expert(x, ids, 2, torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="norm_weights: expected a tensor on cpu"):
        sk.split_by_expert(x, ids, 2, torch.ones(2, 8, device="meta"))
    with pytest.raises(ValueError, match="x: the fused RMSNorm takes dtype"):
        sk.split_by_expert(x.long(), ids, 2, W)
    with pytest.raises(ValueError, match="x: expected 2 dimensions"):
        sk.split_by_expert(x[0], ids, 2)
    with pytest.raises(ValueError, match="counts: given"):
        sk.split_by_expert(x, ids, 2, counts=[2, 4])
    with pytest.raises(ValueError, match="counts: expected 2 non-negative ints"):
        sk.split_by_expert(x, ids, 2, counts=[3, 4])
    with pytest.raises(ValueError, match="eps: expected a finite float"):
        sk.split_by_expert(x, ids, 2, W, eps=-1.0)
    with pytest.raises(ValueError, match=r"out: expected shape \(6, 8\)"):
        sk.split_by_expert(x, ids, 2, out=torch.empty(6, 9))
    s = sk.split_by_expert(x, ids, 2)
    with pytest.raises(ValueError, match="grouped: expected 6 rows"):
        sk.merge_experts(x[:5], s)
    with pytest.raises(ValueError, match="split.perm: expected an int64"):
        sk.merge_experts(x, s.perm.int())
    with pytest.raises(ValueError, match="split.perm: index out of range"):
        sk.merge_experts(x, torch.tensor([0, 1, 2, 3, 4, 6]))
    with pytest.raises(TypeError, match="split"):
        sk.merge_experts(x, [0, 1, 2, 3, 4, 5])


def test_moe_custom_ops_registration():
    x, ids = torch.randn(5, 8), torch.tensor([1, 0, 1, 1, 0])
    perm = torch.tensor([1, 4, 0, 2, 3])
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.spar.split_by_expert.default,
                          (x, ids, perm, torch.tensor([0, 2, 5]), torch.ones(2, 8), 1e-6, torch.empty(5, 8)),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.spar.merge_experts.default, (x, perm, torch.empty(5, 8)), test_utils=checks)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "every_other"])
@pytest.mark.parametrize("D", [24, 8200])
def test_split_by_expert_any_inner_stride(backend, layout, D):
    N, E = 6, 2
    x = torch.randn(D, N).t() if layout == "transposed" else torch.randn(N, 2 * D)[:, ::2]
    assert x.stride(-1) != 1
    ids = torch.tensor([1, 0, 1, 1, 0, 0])
    W = torch.randn(E, D) * 0.5 + 1
    with sk.backend(backend):
        s = sk.split_by_expert(x, ids, E, W, eps=1e-5)
        plain = sk.split_by_expert(x, ids, E)
    want64, order = _oracle64(x, ids, W, 1e-5)
    assert_close(s.rows, want64.float(), atol=2e-5, rtol=2e-5)
    assert torch.equal(plain.rows, x[order])


@pytest.mark.skipif(not interpreter_ok(), reason="needs the interpreter")
@pytest.mark.parametrize("case", ["aligned", "int32_ids", "ones", "two_pass_aligned"])
def test_split_by_expert_launches_are_aot_compiled(monkeypatch, case):
    # an AOT spec compiles exactly what a GPU JIT-compiles for the launch (ints equal to 1 as
    # constexprs, 16-divisible ones marked, the launcher's num_warps / num_stages)
    import sys

    from _aot_launch import assert_launches_compiled, record_launches

    mod = sys.modules["spar_kernels.split_by_expert"]
    N, D, E, dt, wdt, idt = {"aligned": (37, 896, 3, torch.float32, torch.float32, torch.int64),
                             "int32_ids": (37, 100, 2, torch.bfloat16, torch.bfloat16, torch.int32),
                             "ones": (1, 1, 1, torch.float16, torch.float16, torch.int32),
                             "two_pass_aligned": (3, 16384, 3, torch.bfloat16, torch.float32, torch.int64)}[case]
    x = torch.randn(N, D).to(dt)
    ids = torch.randint(0, E, (N,), dtype=idt)
    with record_launches(monkeypatch, mod, "_split_norm_kernel") as rec, sk.backend("triton"):
        sk.split_by_expert(x, ids, E, torch.randn(E, D).to(wdt))
    assert_launches_compiled(rec, mod._aot_specs())


def test_split_by_expert_list_ids_without_a_host_sync():
    from spar_kernels.testing import fake_cuda

    with fake_cuda() as rec:
        x, W = torch.randn(37, 64, device="cuda"), torch.ones(2, 64, device="cuda")
        with rec.region("split"):
            s = sk.split_by_expert(x, [0, 1] * 18 + [0], 2, W, counts=[19, 18])
            y = sk.merge_experts(s.rows, s)
        assert s.rows.device == y.device == torch.device("cuda", 0)
    rec.assert_no_syncs("split")
    assert rec.stats("split").h2d_copies == 1


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_split_by_expert_workspace_gives_the_same_split(ids_dtype):
    x = torch.randn(13, 24)
    ids = torch.randint(0, 3, (13,), dtype=ids_dtype)
    w = torch.randn(3, 24)
    a = sk.split_by_expert(x, ids, 3, w)
    ws = sk.split_by_expert_workspace(x, 3).fill_(-5)
    b = sk.split_by_expert(x, ids, 3, w, workspace=ws)
    assert torch.equal(a.rows, b.rows) and torch.equal(a.offsets, b.offsets) and torch.equal(a.perm, b.perm)
    assert a.counts == b.counts
    with pytest.raises(ValueError, match="workspace"):
        sk.split_by_expert(x, ids, 3, w, workspace=torch.empty(5, dtype=torch.int64))


def test_merge_experts_refuses_a_perm_with_repeats_and_outputs_sharing_the_input():
    # a perm tensor with a repeated index left rows of out unwritten (torch.empty garbage); an
    # out= sharing x's memory made the CPU twin read rows it had already overwritten
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(6, 8, generator=g), torch.randn(2, 8, generator=g)
    ids = [1, 0, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="split.perm: expected a permutation"):
        sk.merge_experts(x, torch.tensor([0, 0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="out: must not share memory with x"):
        sk.split_by_expert(x, ids, 2, W, out=x)
    s = sk.split_by_expert(x, ids, 2, W)
    with pytest.raises(ValueError, match="out: must not share memory with grouped"):
        sk.merge_experts(s.rows, s, out=s.rows)
    buf = torch.empty(12, 8)  # disjoint slices of one buffer are fine
    buf[:6] = x
    s2 = sk.split_by_expert(buf[:6], ids, 2, W, out=buf[6:])
    assert torch.equal(s2.rows, s.rows)
    assert torch.equal(sk.merge_experts(x, s.perm.flip(0).flip(0)), sk.merge_experts(x, s))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [130, 8200])
def test_split_by_expert_writes_only_its_rows(backend, D):
    """out is the first N rows of a NaN-poisoned buffer: the grouped rows are right and every
    element past them stays NaN (a column mask one element too wide would write the next row's
    first element, past the end of out for the last row). Single-pass and streamed rows."""
    N, E = 5, 2
    x, ids, W = torch.randn(N, D), torch.tensor([1, 0, 1, 1, 0]), torch.randn(E, D) * 0.5 + 1
    buf = torch.full((N + 1, D), float("nan"))
    with sk.backend(backend):
        s = sk.split_by_expert(x, ids, E, W, eps=1e-5, out=buf[:N])
    assert s.rows.data_ptr() == buf.data_ptr()
    assert_close(s.rows, _oracle64(x, ids, W, 1e-5)[0].float(), atol=2e-5, rtol=2e-5)
    assert bool(torch.isnan(buf[N]).all()), "an element past the last row was written"
