"""spar_kernels.testing.fake_cuda: the simulated CUDA device and its recorder."""

import collections

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import spar_kernels as sk
from spar_kernels.testing import FakeCudaRecorder, fake_cuda

CUDA0 = torch.device("cuda", 0)


def _is_fake_cuda(t):
    return isinstance(t, FakeTensor) and t.device == CUDA0


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_factories_give_fake_tensors_on_cuda0(device):
    available = torch.cuda.is_available()
    with fake_cuda() as rec:
        made = [torch.empty(3, 5, device=device), torch.randn(2, 7, device=device, dtype=torch.bfloat16),
                torch.arange(11, device=device), torch.zeros(4, device=device, dtype=torch.float16)]
        assert torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    assert isinstance(rec, FakeCudaRecorder)
    assert all(_is_fake_cuda(t) for t in made), [(type(t).__name__, t.device) for t in made]
    assert [tuple(t.shape) for t in made] == [(3, 5), (2, 7), (11,), (4,)]
    assert [t.dtype for t in made] == [torch.float32, torch.bfloat16, torch.int64, torch.float16]
    assert torch.cuda.is_available() == available  # torch.cuda is restored on exit


def test_host_to_device_copies_are_counted_with_bytes():
    a, b = torch.randn(3, 5), torch.ones(4, dtype=torch.float64)
    with fake_cuda() as rec:
        ga = a.to("cuda")
        gb = b.cuda()
        gh = a.to("cuda", torch.float16)              # converts on the way: 60 bytes copied
        gt = torch.tensor([1, 2, 3], device="cuda")
        dst = torch.empty(3, 5, device="cuda")
        dst.copy_(a)
        same = ga.to("cuda:0")                        # already there: no copy
    assert all(_is_fake_cuda(t) for t in (ga, gb, gh, gt, dst))
    assert (ga.shape, ga.dtype, gb.dtype, gh.dtype, gt.dtype) == ((3, 5), torch.float32, torch.float64,
                                                                  torch.float16, torch.int64)
    assert same is ga
    assert rec.h2d_copies == 5
    assert rec.h2d_bytes == 60 + 32 + 60 + 24 + 60
    # every one of them was a blocking copy: a host sync each
    assert [s.kind for s in rec.syncs] == ["h2d copy (blocking)"] * 5
    assert [s.op for s in rec.syncs] == ["to", "cuda", "to", "tensor", "copy_"]


def test_only_non_blocking_copies_from_pinned_memory_are_not_syncs():
    with fake_cuda() as rec:
        pinned = torch.empty(16, pin_memory=True)
        also_pinned = torch.ones(8).pin_memory()
        pageable = torch.ones(8)
        pinned.to("cuda", non_blocking=True)
        also_pinned.cuda(non_blocking=True)
        assert pinned.is_pinned() and not pageable.is_pinned()
        pageable.to("cuda", non_blocking=True)
    assert rec.h2d_copies == 3 and rec.h2d_bytes == 64 + 32 + 32
    assert [s.kind for s in rec.syncs] == ["h2d copy (pageable)"]


INDICES = [
    (slice(1, 3), slice(None, None, 2)), (Ellipsis, 1), (None, 2), (1, slice(None), None),
    (slice(None), slice(2, None)), (-1,), (Ellipsis,), (slice(None), [0, 2]), ([1, 0],),
    (slice(None), [2, 0], slice(1, 3)),
]


@pytest.mark.parametrize("idx", INDICES, ids=str)
def test_getitem_matches_cpu(idx):
    x = torch.randn(4, 6, 5)
    want = x[idx]
    with fake_cuda():
        g = torch.empty(4, 6, 5, device="cuda")
        got = g[idx]
    assert _is_fake_cuda(got)
    assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype)
    if want._base is x:  # a view: same place in the same storage
        assert got.untyped_storage()._cdata == g.untyped_storage()._cdata
        assert got.storage_offset() == want.storage_offset()


def test_setitem_and_copy_write_in_place():
    host = torch.randn(6)
    with fake_cuda() as rec:
        x = torch.empty(4, 6, device="cuda")
        ones, zeros = torch.ones(4, 3, device="cuda"), torch.zeros(2, 6, device="cuda")
        live, peak = rec.live_bytes, rec.peak_bytes
        x[1:3] = 0.5
        x[0] = host                              # host -> device into a view
        x[:, ::2] = ones
        x[2:].copy_(zeros)
        assert (rec.live_bytes, rec.peak_bytes) == (live, peak)  # the writes allocated nothing
        x[torch.tensor([0, 3], device="cuda")] = 2.0
    assert rec.ops["aten.fill_"] == 1
    assert rec.ops["aten.copy_"] == 3  # host row, strided columns, x[2:]
    assert rec.ops["aten.index_put_"] == 1
    assert rec.h2d_copies == 2 and rec.h2d_bytes == 6 * 4 + 2 * 8


def _reads_back(x):
    mask = x > 0
    return (x.sum().item(), x[0].tolist(), bool(x[0, 0]), x.cpu(), x.nonzero(), x[mask],
            torch.equal(x, x), int(x[1, 1]))


def test_syncs_are_recorded_with_stack_and_give_zeros():
    with fake_cuda() as rec:
        x = torch.randn(3, 4, device="cuda")
        item, row, truth, host, nz, masked, eq, as_int = _reads_back(x)
        torch.cuda.synchronize()
    assert [s.op for s in rec.syncs] == ["item", "tolist", "__bool__", "cpu", "nonzero", "__getitem__",
                                         "equal", "__int__", "torch.cuda.synchronize"]
    assert rec.syncs[5].kind == "boolean mask index" and rec.syncs[3].kind == "d2h copy"
    assert (item, row, truth, eq, as_int) == (0.0, [0.0] * 4, False, False, 0)
    assert type(host) is torch.Tensor and host.shape == (3, 4) and not host.any()
    assert nz.shape == (0, 2) and _is_fake_cuda(nz)
    assert masked.shape == (0,) and _is_fake_cuda(masked)
    for s in rec.syncs[:-1]:
        assert s.stack[-1].name == "_reads_back" and s.stack[-1].filename == __file__, s.format()
    with pytest.raises(AssertionError, match=r"9 host synchronization\(s\)") as err:
        rec.assert_no_syncs()
    assert "_reads_back" in str(err.value) and "x.sum().item()" in str(err.value)


def test_scalar_reads_of_many_elements_fail_as_in_torch():
    with fake_cuda() as rec:
        x = torch.randn(3, device="cuda")
        with pytest.raises(RuntimeError, match="ambiguous"):
            bool(x)
        with pytest.raises(RuntimeError, match="cannot be converted"):
            x.item()
    assert rec.syncs == []


def test_host_work_stays_real():
    with fake_cuda() as rec:
        ids = torch.tensor([3, 1, 2])
        order = ids.sort().values.tolist()
        lengths = [int(v) for v in torch.cumsum(ids, 0)]
    assert type(ids) is torch.Tensor
    assert order == [1, 2, 3] and lengths == [3, 4, 6]
    assert rec.syncs == [] and rec.launches == 0


def test_peak_and_live_bytes_follow_storages():
    with fake_cuda() as rec:
        a = torch.empty(1000, device="cuda")                       # 4000 bytes
        b = torch.empty(250, device="cuda", dtype=torch.float64)   # 2000
        assert rec.live_bytes == 6000
        view = b[10:].view(-1, 2)                                  # a view allocates nothing
        del a
        assert rec.live_bytes == 2000
        c = torch.empty(3000, device="cuda", dtype=torch.uint8)    # 3000
        del b
        assert rec.live_bytes == 5000                              # the view keeps b's storage
        del view
        assert rec.live_bytes == 3000
        d = c.float()                                              # 12000
        del c, d
    assert rec.live_bytes == 0
    assert rec.peak_bytes == 3000 + 12000


def test_op_counts_exclude_views_and_allocations():
    with fake_cuda() as rec:
        x = torch.empty(4, 8, device="cuda")
        x.view(8, 4), x.t(), x[1:], x.reshape(2, 16), x.unsqueeze(0), x.permute(1, 0), x.detach()
        assert rec.launches == 0, rec.ops
        x + 1
        x.t().contiguous()
        x @ x.t()
        torch.add(x, 1, out=torch.empty(4, 8, device="cuda"))
    assert rec.ops == collections.Counter({"aten.add": 2, "aten.clone": 1, "aten.mm": 1})
    assert rec.launches == 4


def test_sdpa_counts_as_one_fused_kernel():
    q = torch.randn(1, 2, 16, 8)
    want = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with fake_cuda() as rec:
        g = torch.randn(1, 2, 16, 8, device="cuda", dtype=torch.bfloat16)
        base = rec.live_bytes
        out = torch.nn.functional.scaled_dot_product_attention(g, g, g, is_causal=True)
    assert _is_fake_cuda(out) and out.shape == want.shape and out.dtype == torch.bfloat16
    assert rec.ops == collections.Counter({"aten.randn": 1, "aten.scaled_dot_product_attention": 1})
    assert rec.peak_bytes == base + out.numel() * 2  # no [16, 16] score matrix counted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_on_fake_cuda_selects_triton(dtype, residual):
    shape = (3, 5, 96)
    x, w = torch.randn(shape, dtype=dtype), torch.randn(96)
    want = sk.rms_norm(x, w, 1e-6, x.clone() if residual else None)
    want = want if residual else (want,)
    with fake_cuda() as rec:
        gx = torch.randn(shape, device="cuda", dtype=dtype)
        gw = w.cuda()
        got = sk.rms_norm(gx, gw, 1e-6, gx.clone() if residual else None)
        with sk.backend("reference"):
            sk.rms_norm(gx, gw)
    got = got if residual else (got,)
    for g, e in zip(got, want):
        assert _is_fake_cuda(g)
        assert (g.shape, g.dtype, g.stride()) == (e.shape, e.dtype, e.stride())
    assert rec.backends["rms_norm"] == collections.Counter({"triton": 1, "reference": 1})
    assert rec.ops["spar.rms_norm"] == 2


def test_modules_moved_to_or_built_on_cuda():
    lin = torch.nn.Linear(8, 4)
    with fake_cuda() as rec:
        lin_gpu = lin.to("cuda")
        y = lin_gpu(torch.randn(5, 8, device="cuda"))
        copied = rec.h2d_bytes
        conv = torch.nn.Conv2d(4, 6, 3, device="cuda", dtype=torch.bfloat16)  # initializes on the device
        z = conv(torch.randn(2, 4, 9, 9, device="cuda", dtype=torch.bfloat16))
    assert _is_fake_cuda(lin_gpu.weight) and _is_fake_cuda(y) and y.shape == (5, 4)
    assert copied == rec.h2d_bytes == (8 * 4 + 4) * 4
    assert _is_fake_cuda(conv.weight) and z.shape == (2, 6, 7, 7) and z.dtype == torch.bfloat16
    assert rec.ops["aten.addmm"] == 1 and rec.ops["aten.convolution"] == 1


def test_data_dependent_shapes_are_recorded_and_refused():
    with fake_cuda() as rec:
        r = torch.full((4,), 2, device="cuda")
        with pytest.raises(NotImplementedError, match="depends on the data"):
            torch.unique(r)
        assert torch.randn(4, 3, device="cuda").repeat_interleave(r, dim=0, output_size=8).shape == (8, 3)
    assert [s.op for s in rec.syncs] == ["unique"]


def test_regions_count_their_own_work():
    with fake_cuda() as rec:
        x = torch.randn(16, device="cuda")                # 64 bytes, outside every region
        with rec.region("prefill") as prefill:
            y = torch.empty(256, device="cuda")           # 1024
            y.copy_(torch.ones(256))                      # H2D 1024 bytes, blocking
            del y
        for _ in range(3):
            with rec.region("step"):
                x.mul_(2)
                with rec.region("inner"):
                    x.add_(1)
        with rec.region("readback"):
            x.sum().item()
    assert prefill is rec.regions["prefill"]
    step, inner, read = rec.regions["step"], rec.regions["inner"], rec.regions["readback"]
    assert (step.entries, step.launches, inner.entries, inner.launches) == (3, 6, 3, 3)
    assert step.ops == collections.Counter({"aten.mul_": 3, "aten.add_": 3})
    assert (prefill.h2d_copies, prefill.h2d_bytes, step.h2d_bytes) == (1, 1024, 0)
    assert (prefill.peak_bytes, step.peak_bytes, rec.peak_bytes) == (64 + 1024, 64, 64 + 1024)
    assert [s.op for s in read.syncs] == ["item"] and read.syncs[0].regions == ("readback",)
    assert rec.launches == 1 + 1 + 6 + 1  # randn, copy_ (empty: none), mul_/add_, sum
    rec.assert_no_syncs(region="step")
    with pytest.raises(AssertionError, match="region 'readback'"):
        rec.assert_no_syncs(region="readback")
    with pytest.raises(ValueError, match="no region named 'decode'"):
        rec.assert_no_syncs(region="decode")
    summary = rec.summary()
    assert summary["regions"]["step"]["launches"] == 6 and summary["peak_bytes"] == rec.peak_bytes


def test_default_dtype_is_float16_before_ampere():
    """Weights default to bf16 on CUDA, fp16 on sm_70 / sm_75 (no bf16 tensor cores: Triton's bf16
    dots do not compile there), fp32 on the CPU."""
    from spar_runtime.loading import default_dtype

    for cap, want in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                      ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)):
        with fake_cuda(capability=cap):
            assert default_dtype(torch.device("cuda")) == want, cap
    assert default_dtype(torch.device("cpu")) == torch.float32


def test_bad_use_is_refused():
    with pytest.raises(ValueError, match="capability"):
        with fake_cuda(capability=9):
            pass
    with fake_cuda(capability=(8, 0)) as rec:
        assert torch.cuda.get_device_capability() == (8, 0)
        with pytest.raises(RuntimeError, match="cannot run inside"):
            with fake_cuda():
                pass
        with pytest.raises(ValueError, match="non-empty"):
            with rec.region(""):
                pass
