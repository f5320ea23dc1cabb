"""gather_rows / scatter_rows / pack_sequences / unpack_sequences: Triton (interpreter), CPU, reference."""

import pytest
import torch

import spar_kernels as sk
from spar_kernels.reference import row_moves as ref
from spar_kernels.testing import non_contiguous, poisoned_empty

from conftest import interpreter_ok

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(not interpreter_ok(), reason="needs the interpreter")),
            "cpu", "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.float8_e4m3fn]


def _rand(shape, dtype):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(-10**6, 10**6, shape, dtype=dtype)
    return torch.randn(shape).mul(3).to(dtype)


def _bits(t):
    return t.view(torch.uint8) if t.dtype in (torch.bool, torch.float8_e4m3fn) else t


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(_bits(a), _bits(b))


# ---- gather_rows ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_dtypes(backend, dtype):
    x = _rand((37, 3, 47), dtype)
    idx = torch.randint(0, 37, (29,))
    with sk.backend(backend):
        _same(sk.gather_rows(x, idx), x[idx])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["dups", "empty", "int32", "list", "strided_rows", "strided_inner", "1d", "wide"])
def test_gather_rows_layouts(backend, case):
    x = _rand((23, 130), torch.bfloat16)
    idx = torch.randint(0, 23, (40,))
    if case == "empty":
        idx = idx[:0]
    elif case == "int32":
        idx = idx.to(torch.int32)
    elif case == "list":
        idx = [22, 0, 0, 5]
    elif case == "strided_rows":
        x = non_contiguous(x, 0)
    elif case == "strided_inner":
        x = non_contiguous(x, 1)
    elif case == "1d":
        x = x[:, 0]
    elif case == "wide":
        x = _rand((5, 2, 1500), torch.float32)
        idx = torch.tensor([4, 1, 1, 0])
    out = poisoned_empty(*((len(idx),) + tuple(x.shape[1:])), dtype=x.dtype)
    with sk.backend(backend):
        y = sk.gather_rows(x, idx, out=out)
    assert y is out
    _same(y, x[torch.as_tensor(idx).long()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_and_gather_roundtrip(backend):
    x = _rand((64, 40), torch.float16)
    perm = torch.randperm(64)
    with sk.backend(backend):
        y = sk.gather_rows(x, perm)
        z = torch.empty_like(x)
        sk.scatter_rows(z, perm, y)
    _same(z, x)


@pytest.mark.skipif(not interpreter_ok(), reason="needs the interpreter")
def test_gather_scatter_kernel_out_of_range_indices_are_safe():
    # What the kernels do on CUDA with unchecked indices (no host sync): reads give zeros, writes are dropped.
    x = torch.randn(6, 20)
    out = torch.full((3, 20), 7.0)
    with sk.backend("triton"):
        torch.ops.spar.gather_rows(x, torch.tensor([1, 6, -1]), out)
        assert torch.equal(out[0], x[1]) and bool((out[1:] == 0).all())
        y = x.clone()
        torch.ops.spar.scatter_rows(y, torch.tensor([2, 99, -5]), torch.ones(3, 20))
    expect = x.clone()
    expect[2] = 1
    assert torch.equal(y, expect)


# ---- scatter_rows ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_rows_dtypes(backend, dtype):
    x = _rand((31, 2, 45), dtype)
    idx = torch.randperm(31)[:13]
    src = _rand((13, 2, 45), dtype)
    want = x.clone()
    want[idx] = src
    with sk.backend(backend):
        y = sk.scatter_rows(x, idx, src)
    assert y is x
    _same(x, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["strided_x_rows", "strided_src", "int32_list", "empty"])
def test_scatter_rows_layouts(backend, case):
    x = _rand((19, 300), torch.bfloat16)
    idx = torch.randperm(19)[:7]
    src = _rand((7, 300), torch.bfloat16)
    if case == "strided_x_rows":
        x = non_contiguous(x, 0)
    elif case == "strided_src":
        src = non_contiguous(src, 1)
    elif case == "int32_list":
        idx = idx.tolist()
    else:
        idx, src = idx[:0], src[:0]
    want = x.clone()
    want[torch.as_tensor(idx).long()] = src
    with sk.backend(backend):
        sk.scatter_rows(x, idx, src)
    _same(x, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_rows_src_sharing_x_reads_every_row_first(backend):
    """src may be rows of x itself (overlapping the rows written, or not): the result is that of
    reading all of src before writing, as x[index] = src.clone()."""
    for src_rows, index in (((0, 2), [1, 2]), ((2, 4), [0, 1]), ((1, 4), [3, 2, 1]), ((0, 3), [0, 1, 2])):
        x = torch.arange(5 * 6, dtype=torch.float32).view(5, 6)
        want = x.clone()
        want[torch.tensor(index)] = x[src_rows[0]:src_rows[1]].clone()
        with sk.backend(backend):
            got = sk.scatter_rows(x, index, x[src_rows[0]:src_rows[1]])
        assert got is x
        assert torch.equal(x, want), (src_rows, index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float8_e4m3fn,
                                   torch.complex128])
@pytest.mark.parametrize("case", ["rows", "wide_threads", "one_column", "strided_x_rows", "strided_src",
                                  "x_not_viewable", "int32_index", "src_view_of_x"])
def test_scatter_rows_cpu_twin_matches_reference(dtype, case):
    """The CPU path (C++ memcpy twin, or index_put_ where x's rows cannot be viewed) vs the reference."""
    shape = {"wide_threads": (40, 4100), "one_column": (23, 1)}.get(case, (23, 3, 17))
    x = _rand(shape, dtype) if dtype != torch.complex128 else torch.randn(shape, dtype=dtype)
    M = 9 if case != "wide_threads" else 30
    idx = torch.randperm(shape[0])[:M]
    src = x[-M:].flip(0) if case == "src_view_of_x" else _rand((M,) + shape[1:], dtype) \
        if dtype != torch.complex128 else torch.randn((M,) + shape[1:], dtype=dtype)
    if case == "strided_x_rows":
        x = non_contiguous(x, 0)
    elif case == "strided_src":
        src = non_contiguous(src, 1)
    elif case == "x_not_viewable":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "int32_index":
        idx = idx.int()
    want = ref.scatter_rows(x.clone(), idx, src.clone())
    with sk.backend("cpu"):
        y = sk.scatter_rows(x, idx, src)
    assert y is x
    _same(x, want)


def test_scatter_rows_cpu_twin_duplicates_last_wins():
    from spar_kernels import _ext

    x = torch.zeros(5, 600, dtype=torch.float32)  # 2400-byte rows: two column chunks with 2 threads
    src = torch.arange(4 * 600, dtype=torch.float32).view(4, 600)
    idx = torch.tensor([3, 1, 3, 9], dtype=torch.int64)  # 9 is out of range: skipped
    _ext.cpu_twin("scatter_rows")(x.data_ptr(), 5, 2400, idx.data_ptr(), True, 4, src.data_ptr(), 2400, 2400)
    want = torch.zeros(5, 600)
    want[1], want[3] = src[1], src[2]
    assert torch.equal(x, want)


# ---- pack / unpack ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("lengths", [[5, 3], [0, 7, 1], [7, 7, 7, 7], [0, 0], []])
def test_pack_unpack_roundtrip(backend, dtype, lengths):
    B, T = len(lengths), 7
    padded = _rand((B, T, 3, 11), dtype)
    lens_t = torch.tensor(lengths, dtype=torch.int32)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    with sk.backend(backend):
        packed = sk.pack_sequences(padded, lens_t)
        _same(packed, ref.pack_sequences(padded, lengths))
        pad = -3 if not dtype.is_floating_point else -1.25
        up = sk.unpack_sequences(packed, cu, T + 2, pad_value=pad)
    _same(up, ref.unpack_sequences(packed, cu, T + 2, pad))
    for b, n in enumerate(lengths):  # an independent check of both directions
        _same(up[b, :n], padded[b, :n])
        assert bool((up[b, n:] == pad).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_unpack_options(backend):
    padded = non_contiguous(_rand((3, 9, 50), torch.float16), 1)
    lengths = [4, 9, 2]
    out = poisoned_empty(15, 50, dtype=torch.float16)
    with sk.backend(backend):
        packed = sk.pack_sequences(padded, lengths, total=15, out=out)
        assert packed is out
        _same(packed, ref.pack_sequences(padded, lengths))
        cu = torch.tensor([0, 4, 13, 15], dtype=torch.int32)
        up_out = poisoned_empty(3, 9, 50, dtype=torch.float16)
        up = sk.unpack_sequences(non_contiguous(packed, 0), cu, 9, out=up_out)
        assert up is up_out
        _same(up, ref.unpack_sequences(packed, cu, 9, 0))
        # a 1-D packed buffer (one scalar per token), float pad
        p1 = torch.randn(15)
        _same(sk.unpack_sequences(p1, [0, 4, 13, 15], 10, float("-inf")), ref.unpack_sequences(p1, cu, 10, float("-inf")))
        # cu_seqlens that do not start at 0 / do not cover all rows
        _same(sk.unpack_sequences(p1, [2, 5, 5], 4), ref.unpack_sequences(p1, [2, 5, 5], 4, 0))


# ---- bad inputs ---------------------------------------------------------------------------------------

def test_row_moves_bad_inputs():
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="index: index out of range"):
        sk.gather_rows(x, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="index: index out of range"):
        sk.scatter_rows(x, torch.tensor([-1]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="index: expected an int32 or int64"):
        sk.gather_rows(x, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="index: expected 1 dimensions"):
        sk.gather_rows(x, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="index: expected a tensor on cpu"):
        sk.gather_rows(x, torch.tensor([0], device="meta"))
    with pytest.raises(ValueError, match="x: expected at least 1 dimension"):
        sk.gather_rows(torch.tensor(1.0), [0])
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 4\)"):
        sk.gather_rows(x, [0, 1], out=torch.empty(2, 5))
    with pytest.raises(ValueError, match=r"src: expected shape \(2, 4\)"):
        sk.scatter_rows(x, [0, 1], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="src: expected dtype"):
        sk.scatter_rows(x, [0, 1], torch.zeros(2, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="src: expected a tensor on cpu"):
        sk.scatter_rows(x, [0, 1], torch.zeros(2, 4, device="meta"))
    with pytest.raises(TypeError, match="index"):
        sk.gather_rows(x, 3)
    padded = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, 5\]"):
        sk.pack_sequences(padded, [6, 1])
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, 5\]"):
        sk.pack_sequences(padded, torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="lengths: expected 2 lengths"):
        sk.pack_sequences(padded, [1, 1, 1])
    with pytest.raises(ValueError, match="total: expected sum"):
        sk.pack_sequences(padded, [1, 1], total=3)
    with pytest.raises(ValueError, match="padded: expected"):
        sk.pack_sequences(torch.randn(5), [1])
    with pytest.raises(ValueError, match="lengths: expected an int32 or int64"):
        sk.pack_sequences(padded, torch.tensor([1.0, 2.0]))
    packed = torch.randn(6, 3)
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing"):
        sk.unpack_sequences(packed, [0, 4, 2], 5)
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing"):
        sk.unpack_sequences(packed, [0, 7], 8)
    with pytest.raises(ValueError, match="max_len: a sequence has 4 rows"):
        sk.unpack_sequences(packed, [0, 4, 6], 3)
    with pytest.raises(ValueError, match="max_len: expected a non-negative int"):
        sk.unpack_sequences(packed, [0, 4, 6], -1)
    with pytest.raises(ValueError, match="cu_seqlens: expected at least one offset"):
        sk.unpack_sequences(packed, torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="pad_value"):
        sk.unpack_sequences(packed, [0, 4, 6], 4, pad_value="x")
    # a pad the dtype cannot hold: a ValueError naming pad_value (not ATen's overflow error)
    for dtype, pad in ((torch.float8_e4m3fn, float("inf")), (torch.float8_e4m3fn, 1e6), (torch.float16, 1e5),
                       (torch.int8, 300), (torch.int8, float("nan")), (torch.uint8, -1), (torch.int32, 0.5),
                       (torch.int32, -2.7), (torch.int64, 2 ** 53 + 1), (torch.int64, 2 ** 63 - 1), (torch.bool, 2)):
        with pytest.raises(ValueError, match="pad_value: .* cannot be represented"):
            sk.unpack_sequences(torch.zeros(6, 3).to(dtype), [0, 4, 6], 4, pad_value=pad)
    for dtype, pad in ((torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, float("-inf")), (torch.int8, -128),
                       (torch.int8, 127), (torch.bool, 1), (torch.int32, 7.0)):
        got = sk.unpack_sequences(torch.zeros(6, 3).to(dtype), [0, 4, 6], 4, pad_value=pad)
        assert got[1, 2:].float().eq(pad).all()
    for pad in (2 ** 53, -(2 ** 53), 2 ** 52 + 1):   # integers the op's fp64 pad argument carries exactly
        got = sk.unpack_sequences(torch.zeros(6, 3, dtype=torch.int64), [0, 4, 6], 4, pad_value=pad)
        assert got[1, 2:].eq(pad).all()


def test_row_move_custom_ops_registration():
    x = torch.randn(6, 5)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.spar.gather_rows.default, (x, torch.tensor([1, 0]), torch.empty(2, 5)),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.spar.scatter_rows.default, (x.clone(), torch.tensor([1, 0]), torch.ones(2, 5)),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.spar.pack_sequences.default,
                          (torch.randn(2, 3, 5), torch.tensor([0, 2, 3]), torch.empty(3, 5)), test_utils=checks)
    torch.library.opcheck(torch.ops.spar.unpack_sequences.default,
                          (torch.randn(3, 5), torch.tensor([0, 2, 3]), 4, 0.0, torch.empty(2, 4, 5)), test_utils=checks)


# ---- what a GPU compiles ------------------------------------------------------------------------------

def _launch_case(case):
    """(kernel attribute, call) of one launch of each row-move kernel (odd row counts, so the
    16-divisibility of sizes is the spec's)."""
    if case.startswith("gather") and case != "gather_int32":
        C = {"gather": 128, "gather_wide": 1536, "gather_odd": 141, "gather_one": 1}[case]
        x, idx = _rand((37, C), torch.float32), torch.randint(0, 37, (29,))
        if case == "gather_one":
            x, idx = x[:1], torch.zeros(1, dtype=torch.int64)
        return "_copy_rows_kernel", lambda: sk.gather_rows(x, idx)
    if case == "gather_int32":
        return "_copy_rows_kernel", lambda: sk.gather_rows(_rand((37, 128), torch.float32),
                                                           torch.randint(0, 37, (29,), dtype=torch.int32))
    if case == "scatter":
        return "_copy_rows_kernel", lambda: sk.scatter_rows(_rand((37, 1536), torch.bfloat16), torch.randperm(37)[:29],
                                                            _rand((29, 1536), torch.bfloat16))
    if case == "pack":
        return "_varlen_rows_kernel", lambda: sk.pack_sequences(_rand((3, 9, 128), torch.float16), [4, 9, 2])
    packed = _rand((15, 128), torch.int32)
    if case == "unpack_pad1":
        return "_varlen_rows_kernel", lambda: sk.unpack_sequences(packed, [0, 4, 13, 15], 9, pad_value=1)
    if case == "unpack_f64_pad":
        return "_varlen_rows_kernel", lambda: sk.unpack_sequences(_rand((15, 128), torch.float64), [0, 4, 13, 15], 9,
                                                                  pad_value=-1.5)
    return "_varlen_rows_kernel", lambda: sk.unpack_sequences(packed[:1, :1], [0, 1], 1, pad_value=1)  # all ones


LAUNCH_CASES = ["gather", "gather_wide", "gather_odd", "gather_one", "gather_int32", "scatter", "pack",
                "unpack_pad1", "unpack_f64_pad", "unpack_ones"]


@pytest.mark.skipif(not interpreter_ok(), reason="needs the interpreter")
@pytest.mark.parametrize("case", LAUNCH_CASES)
def test_row_move_launches_are_aot_compiled(monkeypatch, case):
    # every launch has an AOT spec compiling exactly what a GPU JIT-compiles for it (int args equal
    # to 1 as constexprs, 16-divisible ones marked, the launcher's num_warps / num_stages)
    import sys

    from _aot_launch import assert_launches_compiled, record_launches

    mod = sys.modules["spar_kernels.row_moves"]
    name, call = _launch_case(case)
    with record_launches(monkeypatch, mod, name) as rec, sk.backend("triton"):
        call()
    assert_launches_compiled(rec, mod._aot_specs())


def test_unpack_pad_value_one_compiles_for_a_gpu():
    # pad_value=1 on an integer tensor: Triton passes pad as a constexpr, which has no .to(); the
    # interpreter does not specialize, so only a real compile (no GPU needed) shows it. Compiled
    # in a subprocess: this one runs kernels under TRITON_INTERPRET=1.
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = (
        "import dataclasses, sys, spar_kernels\n"
        "from spar_kernels import inspect as I\n"
        "tool = I.cuobjdump()\n"
        "if tool is None: print('SKIP'); sys.exit(0)\n"
        "m = sys.modules['spar_kernels.row_moves']\n"
        "base = next(s for s in m._aot_specs() if s.kernel_name == 'unpack_sequences')\n"
        "spec = dataclasses.replace(base, constexprs=dict(base.constexprs, pad=1),\n"
        "                           aligned=tuple(a for a in base.aligned if a != 'pad'))\n"
        "row = I._compile_triton(spec, 'sm_90a', tool)\n"
        "print(row.get('error') or 'OK')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    out = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-2000:]
    if out == "SKIP":
        pytest.skip("no cuobjdump")
    assert out == "OK", out


# ---- on a simulated GPU: list indices reach the device without a host sync --------------------------

def test_list_indices_are_copied_without_a_host_sync():
    # torch.tensor(list, device="cuda") copies from pageable memory, which blocks the host: list
    # indices are built in pinned memory and copied with non_blocking=True instead
    from spar_kernels.testing import fake_cuda

    with fake_cuda() as rec:
        x = torch.randn(37, 64, device="cuda")
        src, padded = torch.randn(2, 64, device="cuda"), torch.randn(3, 9, 16, device="cuda")
        with rec.region("ops"):
            y = sk.gather_rows(x, [3, 1, 2])
            sk.scatter_rows(x, [0, 5], src)
            packed = sk.pack_sequences(padded, [4, 9, 2])
            up = sk.unpack_sequences(packed, [0, 4, 13, 15], 9, pad_value=1)
        assert (y.device, packed.shape, up.shape) == (torch.device("cuda", 0), (15, 16), (3, 9, 16))
    rec.assert_no_syncs("ops")
    ops = rec.stats("ops")
    assert ops.h2d_copies == 4  # one index tensor per call
    assert {k: dict(v) for k, v in ops.backends.items()} == {
        n: {"triton": 1} for n in ("gather_rows", "scatter_rows", "pack_sequences", "unpack_sequences")}


def test_pack_sequences_workspace_receives_cu_seqlens():
    padded = torch.randn(3, 8, 5)
    ws = torch.full((4,), -7, dtype=torch.int64)
    out = sk.pack_sequences(padded, torch.tensor([3, 8, 1]), workspace=ws)
    assert ws.tolist() == [0, 3, 11, 12]
    torch.testing.assert_close(out, torch.cat([padded[0, :3], padded[1, :8], padded[2, :1]]))
    with pytest.raises(ValueError, match="workspace"):
        sk.pack_sequences(padded, torch.tensor([3, 8, 1]), workspace=torch.empty(3, dtype=torch.int64))


def test_row_moves_refuse_an_out_sharing_the_input():
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="out: must not share memory with x"):
        sk.gather_rows(x, [3, 2], out=x[2:4])
    with pytest.raises(ValueError, match="out: must not share memory with padded"):
        sk.pack_sequences(x.view(2, 3, 4), [1, 2], out=x[:3])
    with pytest.raises(ValueError, match="out: must not share memory with packed"):
        sk.unpack_sequences(x, [0, 2], 2, out=x[1:3].view(1, 2, 4))
    buf = torch.randn(12, 4)  # disjoint slices of one buffer are fine
    assert torch.equal(sk.gather_rows(buf[:6], [5, 4], out=buf[6:8]), buf[[5, 4]])
    want = buf[[11, 10]].clone()  # and an out that ends where the input starts
    assert torch.equal(sk.gather_rows(buf[6:], [5, 4], out=buf[4:6]), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad_value", [0.0, 1.5, -0.0])
def test_row_moves_on_16_byte_elements(backend, pad_value):
    """complex128 rows (16-byte elements, moved as int64 pairs): gather, scatter, pack and unpack
    (a nonzero pad is (pad, 0): two different words) equal indexing, on every backend; rows of one
    element and of several, a strided x."""
    g = torch.Generator().manual_seed(16)
    for shape in [(6, 3), (6, 1), (6, 2, 5)]:
        x = torch.randn(shape, dtype=torch.complex128, generator=g)
        idx = torch.tensor([5, 0, 2, 2])
        src = torch.randn((4,) + shape[1:], dtype=torch.complex128, generator=g)
        with sk.backend(backend):
            assert torch.equal(sk.gather_rows(x, idx), x[idx])
            assert torch.equal(sk.gather_rows(x[::2], idx[:2] // 2), x[::2][idx[:2] // 2])
            one = x.reshape(-1)[::2]  # rows of one element, strided
            assert torch.equal(sk.gather_rows(one, idx % one.shape[0]), one[idx % one.shape[0]])
            y = x.clone()
            sk.scatter_rows(y, idx[:3], src[:3])
        want = x.clone()
        want[idx[:3]] = src[:3]
        assert torch.equal(y, want)
        lengths = [2, 0, 3]
        padded = torch.randn((3, 4) + shape[1:], dtype=torch.complex128, generator=g)
        with sk.backend(backend):
            packed = sk.pack_sequences(padded, torch.tensor(lengths))
            back = sk.unpack_sequences(packed, torch.tensor([0, 2, 2, 5]), 4, pad_value=pad_value)
        assert torch.equal(packed, torch.cat([padded[b, :n] for b, n in enumerate(lengths)]))
        want = torch.full_like(padded, pad_value)
        for b, n in enumerate(lengths):
            want[b, :n] = padded[b, :n]
        assert torch.equal(back, want)
        assert torch.equal(torch.signbit(back.real), torch.signbit(want.real))  # -0.0 keeps its sign
