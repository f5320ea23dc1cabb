import pytest
import torch

import spar_kernels as sk
from spar_kernels.reference import quantize_fp8 as ref
from spar_kernels.testing import non_contiguous, poison

from conftest import build_cpp_harness

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 113), (3, 5, 257), (16, 896), (2, 4096)])
def test_quantize_fp8_bit_exact_vs_reference(backend, dtype, granularity, shape):
    x = (torch.randn(shape) * torch.logspace(-3, 3, shape[-1])).to(dtype)
    q = torch.empty(shape, dtype=torch.float8_e4m3fn)
    s = torch.empty(tuple(shape[:-1]) + (1,) if granularity == "token" else (), dtype=torch.float32)
    poison(q, s)
    with sk.backend(backend):
        got_q, got_s = sk.quantize_fp8(x, granularity, out=(q, s))
    want_q, want_s = ref.quantize_fp8(x, granularity)
    assert got_q is q and got_s is s
    assert torch.equal(_bits(got_q), _bits(want_q))
    assert torch.equal(got_s, want_s.reshape(got_s.shape))
    # dequantized error is within half an fp8 ulp (3 mantissa bits) of each value
    deq = ref.dequantize_fp8(got_q, got_s)
    assert bool(((deq - x.float()).abs() <= x.float().abs() * 2**-4 + got_s * 2**-9 + 1e-30).all())


def test_quantize_fp8_encoding_every_code():
    # Every finite e4m3fn value, the midpoints between neighbours (ties to even), and values
    # beyond the range (saturate to +-448) must encode exactly as torch does.
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = codes[torch.isfinite(codes)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    x = torch.cat([finite, mids, torch.tensor([500.0, -1e6, 448.0, 464.0, -464.0, 1e-7])])
    # per tensor with amax 448 * s -> scale 1 exactly when we scale the input by 1
    scale = float(x.abs().max()) / 448.0
    xs = x * scale  # so that x / scale reproduces x (scale is a power-of-two-free exact factor here)
    got_q, got_s = sk.quantize_fp8(xs, "tensor")
    want_q, want_s = ref.quantize_fp8(xs, "tensor")
    assert torch.equal(_bits(got_q), _bits(want_q))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_fp8_non_contiguous(dtype):
    x = non_contiguous(torch.randn(33, 70).to(dtype), 0)
    for g in ("token", "tensor"):
        got_q, got_s = sk.quantize_fp8(x, g)
        want_q, want_s = ref.quantize_fp8(x.contiguous(), g)
        assert torch.equal(_bits(got_q), _bits(want_q))
        assert torch.equal(got_s, want_s.reshape(got_s.shape))
    xt = torch.randn(40, 24).to(dtype).t()  # last dim strided: copied to rows
    got_q, _ = sk.quantize_fp8(xt, "token")
    assert torch.equal(_bits(got_q), _bits(ref.quantize_fp8(xt, "token")[0]))


def test_quantize_fp8_zero_and_empty_inputs():
    q, s = sk.quantize_fp8(torch.zeros(3, 16), "token")
    assert torch.equal(_bits(q), torch.zeros(3, 16, dtype=torch.uint8))
    assert bool((s > 0).all())
    q, s = sk.quantize_fp8(torch.zeros(0, 16), "tensor")
    assert q.shape == (0, 16) and s.shape == ()


def test_quantize_fp8_feeds_scaled_mm():
    a, b = torch.randn(32, 64), torch.randn(48, 64)
    qa, sa = sk.quantize_fp8(a, "token")
    qb, sb = sk.quantize_fp8(b, "token")
    y = torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.float32)
    rel = (y - a @ b.t()).norm() / (a @ b.t()).norm()
    assert rel < 0.05
    qa, sa = sk.quantize_fp8(a, "tensor")
    qb, sb = sk.quantize_fp8(b, "tensor")
    y = torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    assert (y - a @ b.t()).norm() / (a @ b.t()).norm() < 0.05


def test_quantize_fp8_opcheck_and_compile():
    x = torch.randn(4, 32)
    q = torch.empty(4, 32, dtype=torch.float8_e4m3fn)
    s = torch.empty(4, 1)
    # test_schema compares fp8 outputs with arithmetic fp8 lacks on CPU; the rest applies
    torch.library.opcheck(torch.ops.spar.quantize_fp8.default, (x, q, s, True, None),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
    f = torch.compile(lambda x: sk.quantize_fp8(x, "token")[1] * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), ref.quantize_fp8(x, "token")[1] * 2)
    # with given buffers too (the eager lane's is_neg check used to break the graph)
    g = torch.compile(lambda x, q, s: sk.quantize_fp8(x, "token", out=(q, s))[1] * 2, fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(g(x, q, s), ref.quantize_fp8(x, "token")[1] * 2)


@pytest.mark.parametrize("call, match, exc", [
    (lambda: sk.quantize_fp8(torch.ones(4, 8, dtype=torch.int32)), "x: expected dtype", ValueError),
    (lambda: sk.quantize_fp8(torch.ones(4, 8), "channel"), "granularity", ValueError),
    (lambda: sk.quantize_fp8(torch.tensor(1.0)), "x: expected at least 1", ValueError),
    (lambda: sk.quantize_fp8(torch.ones(4, 8), out=torch.empty(4, 8)), "out: expected a \\(q, scales\\)", TypeError),
    (lambda: sk.quantize_fp8(torch.ones(4, 8), out=(torch.empty(4, 8, dtype=torch.float8_e4m3fn),)),
     "out: expected a \\(q, scales\\)", TypeError),
    (lambda: sk.quantize_fp8(torch.ones(4, 8), out=(torch.empty(4, 8), torch.empty(4, 1))), "out\\[0\\]", ValueError),
    (lambda: sk.quantize_fp8(torch.ones(4, 8), out=(torch.empty(4, 8, dtype=torch.float8_e4m3fn), torch.empty(4))),
     "out\\[1\\]", ValueError),
])
def test_quantize_fp8_bad_inputs(call, match, exc):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_quantize_fp8_nan_gives_nan_scales(backend, dtype, granularity):
    # the C++ amax once used fmaxf / std::max, which drop NaN: a NaN input gave a finite scale
    x = torch.randn(5, 300).to(dtype)
    x[1, 7] = float("nan")
    x[3, 299] = -float("nan")  # a negative NaN, in the scalar tail of a vectorized row
    with sk.backend(backend):
        q, s = sk.quantize_fp8(x, granularity)
    want_q, want_s = ref.quantize_fp8(x, granularity)
    nan_rows = torch.tensor([False, True, False, True, False])
    if granularity == "token":
        assert torch.equal(s.isnan().flatten(), nan_rows)
    else:
        assert bool(s.isnan())
    assert torch.equal(s.isnan(), want_s.reshape(s.shape).isnan())
    assert torch.equal(_bits(q), _bits(want_q))  # NaN codes where the reference has them, same finite codes


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_fp8_every_cpu_variant_is_bit_exact(monkeypatch, isa, dtype):
    # SPAR_CPU_ISA picks the twin's variant (a CPU without the set runs its widest one): the
    # 32-wide vector loop, its scalar tail (200 = 6 * 32 + 8), e4m3 subnormal and zero codes,
    # an all-zero row and values at rounding midpoints, per token and per tensor
    monkeypatch.setenv("SPAR_CPU_ISA", isa)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(6, 200, generator=g) * torch.logspace(-6, 0, 200)
    x[2] = 0.0
    x[4, :64] = torch.tensor([0.0, 2.0**-10, 3 * 2.0**-10, 2.0**-6, 1.0625, 1.1875, 448.0, -448.0] * 8)
    x = x.to(dtype)
    for granularity in ("token", "tensor"):
        q, s = sk.quantize_fp8(x, granularity)
        want_q, want_s = ref.quantize_fp8(x, granularity)
        assert torch.equal(_bits(q), _bits(want_q)), (isa, granularity)
        assert torch.equal(s, want_s.reshape(s.shape))


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_fp8_per_token_row_tasks(monkeypatch, isa, dtype):
    # per token the twin takes rows in tasks of 16, each row's encode also taking the next row's
    # amax: 37 rows (tasks of 16, 16, 5), a scalar tail, rows of 31 (no vector step), and NaN / inf
    # rows at a task's first row, in its middle and at its end (NaN scale: the scalar encode)
    monkeypatch.setenv("SPAR_CPU_ISA", isa)
    g = torch.Generator().manual_seed(21)
    for cols in (200, 31):
        x = torch.randn(37, cols, generator=g) * torch.logspace(-4, 2, 37)[:, None]
        x[16, 3] = float("nan")
        x[20, -1] = float("nan")
        x[31, 0] = float("inf")
        x[33] = 0.0
        x = x.to(dtype)
        q, s = sk.quantize_fp8(x, "token")
        want_q, want_s = ref.quantize_fp8(x, "token")
        assert torch.equal(s.isnan(), want_s.isnan()), (isa, cols)
        assert torch.equal(s[~s.isnan()], want_s[~want_s.isnan()]), (isa, cols)
        assert torch.equal(_bits(q), _bits(want_q)), (isa, cols)


def test_quantize_fp8_avx512_division_runs_bit_exact(tmp_path):
    # The AVX-512 variant replaces the IEEE division by a reciprocal and two Markstein corrections;
    # no AVX-512 CPU runs the suite, but that variant's loops use only 256-bit AVX2/FMA/F16C
    # intrinsics, so tests/cpp/quantize_fp8_avx512_div.cpp compiles them for AVX2 and checks every
    # bf16 value (and those values as fp32) over ~2.6k scales against the scalar encode.
    import re
    import subprocess

    exe = build_cpp_harness(tmp_path, "quantize_fp8_avx512_div.cpp", ["-O2", "-std=c++17", "-mavx2", "-mfma", "-mf16c"])
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=120).stdout
    checked, bad, baseline = map(int, re.fullmatch(r"checked (\d+) mismatches (\d+) baseline (\d+)\s*", out).groups())
    assert checked > 100_000_000, out
    assert baseline > 0, f"the inputs do not separate x * (1/s) from x / s: {out}"
    assert bad == 0, out


@pytest.mark.skipif(not __import__("spar_kernels")._ext.has_cuda_extension(), reason="no CUDA extension built")
def test_quantize_fp8_out_and_workspace_allocate_nothing_on_a_gpu():
    from spar_kernels.testing import fake_cuda

    with fake_cuda() as rec:
        x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
        q = torch.empty(16, 256, device="cuda", dtype=torch.float8_e4m3fn)
        s_tok, s_ten = torch.empty(16, 1, device="cuda"), torch.empty((), device="cuda")
        ws = torch.empty(1, device="cuda")
        live = rec.live_bytes
        with rec.region("out"):
            sk.quantize_fp8(x, "token", out=(q, s_tok))
            sk.quantize_fp8(x, "tensor", out=(q, s_ten), workspace=ws)
        assert rec.stats("out").peak_bytes == live
        with rec.region("no workspace"):  # the documented one float
            sk.quantize_fp8(x, "tensor", out=(q, s_ten))
        assert rec.stats("no workspace").peak_bytes == live + 4
    rec.assert_no_syncs()
    assert dict(rec.backends["quantize_fp8"]) == {"cuda": 3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_quantize_fp8_eager_cpu_lane_runs_the_twin_bit_exact(monkeypatch, dtype, granularity):
    """An eager CPU call into given buffers (2-D x, last dim contiguous, rows at any stride) runs the
    twin straight from the public function; it must agree bit for bit with the reference, and a
    forced backend, an input that requires grad or a buffer of the wrong shape leave it."""
    from spar_kernels import _ext

    calls = []
    twin = _ext.cpu_twin("quantize_fp8")
    monkeypatch.setitem(_ext._TWINS, "quantize_fp8", lambda *a: (calls.append(a), twin(*a))[1])
    g = torch.Generator().manual_seed(7)
    for rows, cols, pad in [(1, 1, 0), (5, 33, 3), (64, 896, 0), (3, 4100, 17)]:
        big = (torch.randn(rows, cols + pad, generator=g) * 10.0 ** torch.randint(-3, 4, (rows, 1), generator=g)).to(dtype)
        x = big[:, :cols]                                       # rows at stride cols + pad
        q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
        s = torch.empty((rows, 1) if granularity == "token" else (), dtype=torch.float32)
        poison(q, s)
        n = len(calls)
        got = sk.quantize_fp8(x, granularity, out=(q, s))
        assert len(calls) == n + 1 and got[0] is q and got[1] is s
        want_q, want_s = ref.quantize_fp8(x, granularity)
        assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(s, want_s.reshape(s.shape))
    with sk.backend("reference"):
        n = len(calls)
        sk.quantize_fp8(x, granularity, out=(q, s))
        assert len(calls) == n                                  # the forced backend is honoured
    with pytest.raises(ValueError, match="out\\[1\\]"):        # a wrong scales shape is explained
        sk.quantize_fp8(x, granularity, out=(q, torch.empty((rows, 2) if granularity == "token" else (1,))))
    xg = x.float().requires_grad_() if dtype == torch.float32 else None
    if xg is not None:
        from spar_kernels import _op
        _op.REGISTRY["quantize_fp8"]._warned_grad = False
        with pytest.warns(UserWarning, match="has no backward"):
            sk.quantize_fp8(xg, granularity, out=(q, s))


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_quantize_fp8_writes_bump_versions_so_autograd_sees_them(backend):
    """A scales buffer saved for backward and then overwritten: every backend bumps the version
    counters of q and scales (the twin writes through pointers), so backward raises instead of
    returning a gradient computed from the overwritten values."""
    x = torch.randn(4, 40)
    w = torch.ones(4, 1, requires_grad=True)
    s = torch.full((4, 1), 2.0)
    q = torch.empty(4, 40, dtype=torch.float8_e4m3fn)
    y = (w * s).sum()
    vq, vs = q._version, s._version
    with sk.backend(backend):
        sk.quantize_fp8(x, "token", out=(q, s))
    assert q._version > vq and s._version > vs
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_quantize_fp8_refuses_overlap_negated_views_and_sparse():
    """Buffers sharing memory with x or with each other, lazily negated views (whose memory holds
    the negation) and sparse tensors get a clear error on every path, before anything is written."""
    f8 = torch.float8_e4m3fn
    x = torch.randn(6, 64)
    base = torch.zeros(6 * 64 * 4 + 64, dtype=torch.uint8)
    xa = base[:6 * 64 * 4].view(torch.float32).view(6, 64)
    xa.copy_(x)
    q_over_x = base[:6 * 64].view(f8).view(6, 64)
    s = torch.empty(6, 1)
    for backend in ("auto", "cpu"):
        with sk.backend(backend):
            with pytest.raises(ValueError, match="out\\[0\\] \\(q\\): must not share memory with x"):
                sk.quantize_fp8(xa, "token", out=(q_over_x, s))
            qs = torch.zeros(6 * 64 + 32, dtype=torch.uint8)
            q = qs[:6 * 64].view(f8).view(6, 64)
            s_over_q = qs[6 * 64 - 8:6 * 64 + 16].view(torch.float32).view(6, 1)
            with pytest.raises(ValueError, match="out\\[1\\] \\(scales\\): must not share memory with out\\[0\\]"):
                sk.quantize_fp8(x, "token", out=(q, s_over_q))
            s_over_x = xa[:, :1]
            with pytest.raises(ValueError, match="out\\[1\\]"):
                sk.quantize_fp8(xa, "token", out=(torch.empty(6, 64, dtype=f8), s_over_x))
    neg = torch.randn(6, 64, dtype=torch.complex64).conj().imag   # a lazily negated view
    assert neg.is_neg()
    with pytest.raises(ValueError, match="x: a lazily negated view"):
        sk.quantize_fp8(neg, "token", out=(torch.empty(6, 64, dtype=f8), torch.empty(6, 1)))
    s_neg = torch.zeros((), dtype=torch.complex64).conj().imag
    with pytest.raises(ValueError, match="out\\[1\\]"):
        sk.quantize_fp8(x, "tensor", out=(torch.empty(6, 64, dtype=f8), s_neg))
    with pytest.raises(ValueError, match="x: expected a dense"):
        sk.quantize_fp8(x.to_sparse(), "token")


def test_quantize_fp8_lane_warns_when_an_output_requires_grad():
    from spar_kernels import _op

    x, q = torch.randn(3, 32), torch.empty(3, 32, dtype=torch.float8_e4m3fn)
    s = torch.empty(3, 1, requires_grad=True)
    _op.REGISTRY["quantize_fp8"]._warned_grad = False
    with pytest.warns(UserWarning, match="has no backward"):
        sk.quantize_fp8(x, "token", out=(q, s))


def _every_bf16_up_to(amax_bits: int, g: torch.Generator) -> torch.Tensor:
    """Every finite bf16 magnitude up to the one with bits amax_bits, amax itself twice, random
    signs, shuffled: one row whose amax is that value."""
    mags = torch.arange(0, amax_bits + 1, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    row = torch.cat([mags, mags[-1:]])
    sign = torch.randint(0, 2, row.shape, generator=g).bool()
    row = torch.where(sign, -row, row)
    return row[torch.randperm(row.numel(), generator=g)]


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_quantize_fp8_bf16_every_value_under_many_scales(monkeypatch, isa):
    """Every bf16 magnitude up to a row's amax, for amaxes that make the scale 1, a power of two,
    3 (x / s exactly at e4m3 midpoints), random, at kMinAmax's clamp and a bf16 subnormal: the
    twin's codes equal the reference's bit for bit, per token and per tensor. On a CPU with
    AVX512-VBMI the avx512 variant codes bf16 rows by a per-scale table (quantize_fp8_kernels.h),
    whose cases (zeros, e4m3 subnormals, bf16 subnormals, the carry into the next binade,
    saturation at 448) all occur here; the avx2 variant divides."""
    monkeypatch.setenv("SPAR_CPU_ISA", isa)
    g = torch.Generator().manual_seed(1402)
    bits = lambda v: int(torch.tensor([v]).to(torch.bfloat16).view(torch.int16))  # noqa: E731
    amaxes = [bits(448.0), bits(448.0 * 2**-7), bits(448.0 * 2**5), bits(448.0 * 3), bits(1e-13), bits(1e-39),
              bits(1.0), bits(3.0e38)]
    amaxes += torch.randint(0x0080, 0x7F7F, (10,), generator=g).tolist()
    for a in amaxes:
        row = _every_bf16_up_to(a, g)
        n = row.numel() // 32 * 32  # also whole rows of 32-element blocks, two per tensor
        batch = row[:n].reshape(2, -1) if n >= 64 and (n // 2) % 32 == 0 else row[None, :n]
        for x in (row[None], batch) if n else (row[None],):
            for granularity in ("token", "tensor"):
                q, s = sk.quantize_fp8(x, granularity)
                want_q, want_s = ref.quantize_fp8(x, granularity)
                assert torch.equal(s, want_s.reshape(s.shape)), (hex(a), granularity)
                assert torch.equal(_bits(q), _bits(want_q)), (hex(a), granularity, x.shape)
