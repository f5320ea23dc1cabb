import pytest
import torch

import spar_kernels as sk
from spar_kernels.reference import rms_norm as ref
from spar_kernels.testing import assert_close_fa, fp64, non_contiguous, poisoned_empty

from conftest import requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = [pytest.param("triton", marks=requires_triton), "cpu", "reference"]


def _check(backend, shape, dtype, with_residual, weight_dtype=None, noncontig=False, eps=1e-6):
    D = shape[-1]
    x = torch.randn(shape, dtype=dtype) * 3 + 0.5
    w = torch.randn(D, dtype=weight_dtype or dtype)
    r = torch.randn(shape, dtype=dtype) if with_residual else None
    if noncontig:
        x = non_contiguous(x, 0)
        r = non_contiguous(r, -1).contiguous() if r is not None else None
    out = poisoned_empty(shape, dtype=dtype)
    with sk.backend(backend):
        got = sk.rms_norm(x, w, eps, residual=r, out=out)
    want64 = fp64(ref.rms_norm, x, w, eps, r, compute_dtype=torch.float64)
    base = ref.rms_norm(x, w, eps, r, compute_dtype=dtype)  # torch in the same low precision
    if with_residual:
        y, s = got
        assert y is out
        # the stored sum is one rounding of x + r, bit-identical to torch's
        torch.testing.assert_close(s, (x.double() + r.double()).to(dtype), atol=0, rtol=0)
        assert_close_fa(y, base[0], want64[0], name="y")
    else:
        assert got is out
        assert_close_fa(got, base, want64, name="y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 113), (3, 5, 257), (2, 896), (4, 1536)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(backend, dtype, shape, with_residual):
    _check(backend, shape, dtype, with_residual)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_wide_rows_two_pass(backend):
    # wider than the single-pass limit: exercises the chunked path
    _check(backend, (3, 9000), torch.bfloat16, True)
    _check(backend, (2, 8193), torch.float32, False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_non_contiguous_and_mixed_weight(backend, dtype):
    _check(backend, (9, 130), dtype, True, weight_dtype=torch.float32, noncontig=True)
    x = torch.randn(6, 200, dtype=dtype)[:, 3:103]  # row stride 200, 100 wide
    w = torch.randn(100, dtype=dtype)
    with sk.backend(backend):
        y = sk.rms_norm(x, w, 1e-5)
    assert_close_fa(y, ref.rms_norm(x, w, 1e-5, compute_dtype=dtype), fp64(ref.rms_norm, x, w, 1e-5, compute_dtype=torch.float64))


def test_rms_norm_in_place_residual_update():
    x = torch.randn(5, 64)
    r = torch.randn(5, 64)
    want_s = x + r
    y, s = sk.rms_norm(x, torch.ones(64), 1e-6, residual=r, residual_out=r)
    assert s is r
    torch.testing.assert_close(r, want_s)


def test_rms_norm_empty_rows():
    y = sk.rms_norm(torch.randn(0, 32), torch.ones(32))
    assert y.shape == (0, 32)


def test_rms_norm_torch_compile_fullgraph():
    f = torch.compile(lambda x, w: sk.rms_norm(x, w, 1e-6) * 2, fullgraph=True, backend="eager")
    x, w = torch.randn(4, 40), torch.randn(40)
    torch.testing.assert_close(f(x, w), ref.rms_norm(x, w, 1e-6) * 2)


def test_rms_norm_opcheck():
    x, w = torch.randn(3, 24), torch.randn(24)
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.spar.rms_norm.default, (x, w, 1e-6, None, out, None))


@pytest.mark.parametrize("call, match", [
    (lambda: sk.rms_norm(torch.randn(4, 8).int(), torch.ones(8)), "x: expected dtype"),
    (lambda: sk.rms_norm(torch.randn(4, 8), torch.ones(9)), "weight: expected shape"),
    (lambda: sk.rms_norm(torch.randn(4, 8), torch.ones(8, 1)), "weight: expected 1 dimensions"),
    (lambda: sk.rms_norm(torch.randn(4, 8), torch.ones(8), -1.0), "eps"),
    (lambda: sk.rms_norm(torch.randn(4, 8), torch.ones(8), float("nan")), "eps: expected a finite"),
    (lambda: sk.rms_norm(torch.randn(4, 8), torch.ones(8), True), "eps: expected a finite"),
    (lambda: sk.rms_norm(torch.randn(4, 8), torch.ones(8), residual=torch.randn(4, 7)), "residual: expected shape"),
    (lambda: sk.rms_norm(torch.randn(4, 8), torch.ones(8), residual=torch.randn(4, 8).half()), "residual: expected dtype"),
    (lambda: sk.rms_norm(torch.randn(4, 8), torch.ones(8), out=torch.empty(4, 8).half()), "out: expected dtype"),
    (lambda: sk.rms_norm(torch.randn(4, 8), torch.ones(8), out=torch.empty(8, 4).t()), "out: expected a contiguous"),
    (lambda: sk.rms_norm(torch.randn(4, 8), torch.ones(8), residual_out=torch.empty(4, 8)), "residual_out"),
    (lambda: sk.rms_norm(torch.tensor(1.0), torch.ones(1)), "x: expected at least 1"),
    (lambda: sk.rms_norm(torch.randn(4, 8), torch.ones(16)[::2]), "weight: the last dimension must be contiguous"),
])
def test_rms_norm_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_backend_errors():
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(sk.BackendUnavailableError, match="no 'cuda' implementation"):
        with sk.backend("cuda"):
            sk.rms_norm(x, w)
    with pytest.raises(ValueError, match="backend: expected one of"):
        with sk.backend("gpu"):
            pass
    with pytest.raises(sk.BackendUnavailableError, match="needs CUDA tensors"):
        with sk.backend("cuda"):
            sk.quantize_fp8(x)
    assert sk.current_backend() == "auto"


def _check_with_and_without_residual(backend, x, w, r):
    """rms_norm of x, and of x + r, on the backend against the reference (FlashAttention rule);
    the residual sum exactly."""
    with sk.backend(backend):
        y = sk.rms_norm(x, w, 1e-5)
        y2, s2 = sk.rms_norm(x, w, 1e-5, residual=r)
    want64 = fp64(ref.rms_norm, x, w, 1e-5, compute_dtype=torch.float64)
    assert_close_fa(y, ref.rms_norm(x, w, 1e-5), want64, name="y")
    want64 = fp64(ref.rms_norm, x, w, 1e-5, r, compute_dtype=torch.float64)
    assert_close_fa(y2, ref.rms_norm(x, w, 1e-5, r)[0], want64[0], name="y (residual)")
    torch.testing.assert_close(s2, x + r, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "every_other", "transposed_wide"])
def test_rms_norm_any_inner_stride(backend, layout):
    # reshape(-1, D) of these is a view whose last stride is not 1: the kernel must follow it
    if layout == "transposed":
        x, r = torch.randn(8, 4).t(), torch.randn(8, 4).t()          # [4, 8], strides (1, 4)
    elif layout == "every_other":
        x, r = torch.randn(2, 3, 32)[..., ::2], torch.randn(2, 3, 32)[..., ::2]  # inner stride 2
    else:
        x, r = torch.randn(9000, 3).t(), torch.randn(9000, 3).t()    # two-pass rows, stride 3
    assert x.stride(-1) != 1
    w = torch.randn(x.shape[-1])
    _check_with_and_without_residual(backend, x, w, r)


@pytest.mark.parametrize("isa", ["base", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, D", [(1024, 100), (37, 1536), (16, 8), (5, 3)])
def test_rms_norm_cpu_column_major_rows_in_tiles(rows, D, dtype, isa, monkeypatch):
    """Column-major rows (the transpose of a [D, rows] tensor) run in tiles of 16 rows copied
    contiguous first, then the contiguous path: the output equals a contiguous x's bit for bit
    (full tiles, a partial last tile, element blocks with a tail of fewer than 8), and the
    accuracy rule against the fp64 reference holds. With a residual the strided row loop runs."""
    monkeypatch.setenv("SPAR_CPU_ISA", isa)
    g = torch.Generator().manual_seed(rows * 10 + D)
    x = (torch.randn(D, rows, generator=g) * 2 + 1).to(dtype).t()
    assert x.stride() == (1, rows)
    for w in (torch.randn(D, generator=g), torch.randn(D, generator=g).to(dtype)):
        with sk.backend("cpu"):
            got = sk.rms_norm(x, w, 1e-6)
            want = sk.rms_norm(x.contiguous(), w, 1e-6)
        assert torch.equal(got, want)
        want64 = fp64(ref.rms_norm, x, w, 1e-6, None, compute_dtype=torch.float64)
        base = ref.rms_norm(x, w, 1e-6, None, compute_dtype=dtype)  # torch in the same precision
        assert_close_fa(got, base, want64, name=f"rms_norm column-major {(rows, D)}")


def _leading_layout(layout, g):
    base = torch.randn(6, 6, 2, 24, generator=g)
    return {"contiguous": lambda: base[:3, :, 0, :].contiguous(),          # [3, 6, 24]
            "rows_sliced": lambda: base[:3, :, 0, :],                      # [3, 6, 24], one row stride: 48
            "size_one_dims": lambda: base[:1, :3, :1],                     # [1, 3, 1, 24], strides 288, 48, 24
            "leading_permuted": lambda: base[:, :3, 1, :].transpose(0, 1), # [3, 6, 24]: no one row stride
            "leading_expanded": lambda: base[:1, :1, 0, :].expand(3, 6, 24),
            # rows (i, j) and (i + 1, j - 1) alias: equal leading strides that do not collapse
            "leading_overlapping": lambda: base.flatten().as_strided((3, 6, 24), (24, 24, 1))}[layout]()


@pytest.mark.parametrize("x_layout", ["contiguous", "rows_sliced", "size_one_dims", "leading_permuted",
                                      "leading_expanded", "leading_overlapping"])
@pytest.mark.parametrize("r_layout", ["contiguous", "rows_sliced", "leading_permuted"])
def test_rms_norm_cpu_leading_dims(x_layout, r_layout):
    # the CPU path reads x / residual as rows in place when their leading dims collapse into one
    # row stride (no view made) and reshapes (copies) otherwise; both must give the rows in order
    g = torch.Generator().manual_seed(11)
    x = _leading_layout(x_layout, g)
    r = _leading_layout(r_layout, g)
    if r.shape != x.shape:
        r = r.reshape(-1, 24)[: x.numel() // 24].reshape(x.shape)
    w = torch.randn(24, generator=g)
    _check_with_and_without_residual("cpu", x, w, r)


@requires_triton
@pytest.mark.parametrize("case", ["aligned", "aligned_residual_bf16", "two_pass", "two_pass_aligned", "ones",
                                  "strided"])
def test_rms_norm_launches_are_aot_compiled(monkeypatch, case):
    # `python -m spar_kernels.inspect` must compile what a GPU JIT-compiles for these launches:
    # Triton turns int args equal to 1 into constexprs and marks 16-divisible ones, and the
    # launcher's num_warps / num_stages must be the spec's
    import sys

    from _aot_launch import assert_launches_compiled, record_launches

    mod = sys.modules["spar_kernels.rms_norm"]
    dtype = torch.bfloat16 if case == "aligned_residual_bf16" else torch.float32
    shape = {"aligned": (4, 896), "aligned_residual_bf16": (3, 2048), "two_pass": (2, 9000),
             "two_pass_aligned": (2, 16384), "ones": (1, 1), "strided": (4, 128)}[case]
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    if case == "strided":  # inner stride 2, odd row stride
        x, r = torch.randn(4, 258)[:, :256:2], torch.randn(4, 258)[:, :256:2]
    residual = None if case in ("aligned", "two_pass") else r
    with record_launches(monkeypatch, mod, "_rms_norm_kernel") as rec, sk.backend("triton"):
        sk.rms_norm(x, torch.randn(shape[-1], dtype=dtype), 1e-6, residual=residual)
    assert_launches_compiled(rec, mod._aot_specs())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_float64_weight(backend):
    # the docstring takes weight in any float dtype: float64 was refused by the dtype check;
    # it is read as float32 (the fp32 math), so the result equals the float32 weight's
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(5, 33, generator=g, dtype=torch.bfloat16), torch.randn(5, 33, generator=g, dtype=torch.bfloat16)
    w64 = torch.randn(33, generator=g, dtype=torch.float64)
    with sk.backend(backend):
        y, s = sk.rms_norm(x, w64, 1e-6, residual=r)
        y32, s32 = sk.rms_norm(x, w64.float(), 1e-6, residual=r)
    assert torch.equal(s, s32) and torch.equal(y, y32)
    s64 = (x.double() + r.double()).to(torch.bfloat16).double()
    want = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    torch.testing.assert_close(y.double(), want, atol=0, rtol=2 ** -8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_normalizes_the_rounded_sum(backend):
    """With a residual, s = x + residual is rounded to x's dtype and s as stored is normalized:
    x = 1 with residual 4.8e-4 (under half an fp16 ulp of 1) on every other column stores s = 1,
    so rstd = 1 and y = weight = 1 + 2^-11 + 2^-16 (fp32), just above the midpoint of 1 and the
    next fp16, rounds to 1 + 2^-10 everywhere. The unrounded sum's mean square (rstd = 1 / 1.00024)
    would round the columns without residual down to 1: one ulp, within every tolerance.
    Single-pass (D = 64) and streamed (D = 9000) rows."""
    for D in (64, 9000):
        x = torch.ones(2, D, dtype=torch.float16)
        r = torch.zeros(2, D, dtype=torch.float16)
        r[:, ::2] = 4.8e-4
        w = torch.full((D,), 1 + 2 ** -11 + 2 ** -16)
        with sk.backend(backend):
            y, s = sk.rms_norm(x, w, 0.0, residual=r)
        assert torch.equal(s, x), "the stored sum is not x + residual rounded to fp16"
        want = torch.full_like(x, 1 + 2 ** -10)
        assert torch.equal(y, want), f"D={D}: {(y != want).sum().item()} of {y.numel()} elements differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_weight_in_the_other_16_bit_dtype(backend):
    """weight may be any float dtype: x in bf16 with an fp16 weight, and the reverse, run the
    fp32 math on the weight's values (the CPU twin takes a weight in x's dtype or fp32 only, so
    the wrapper converts it)."""
    for xd, wd in ((torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)):
        x, w = torch.randn(4, 100, dtype=xd), torch.randn(100, dtype=wd)
        with sk.backend(backend):
            y = sk.rms_norm(x, w, 1e-6)
        assert_close_fa(y, ref.rms_norm(x, w, 1e-6, compute_dtype=xd),
                        fp64(ref.rms_norm, x, w, 1e-6, compute_dtype=torch.float64))


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=requires_triton)])
def test_rows_of_zero_length(backend):
    """x of shape [3, 0]: nothing to normalize; every backend returns the empty result (the Triton
    path's view(-1, 0) raised)."""
    with sk.backend(backend):
        y = sk.rms_norm(torch.randn(3, 0), torch.randn(0))
    assert y.shape == (3, 0)
