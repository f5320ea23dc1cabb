import pytest
import torch

import spar_kernels as sk
from spar_kernels.reference import linear_attention as ref
from spar_kernels.testing import assert_close_fa, non_contiguous, poisoned_empty

from conftest import build_cpp_harness, requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = [pytest.param("triton", marks=requires_triton), "cpu", "reference"]


def _inputs(B, Nq, Nk, H, d, e, dtype, scale=1.0):
    q = (torch.randn(B, Nq, H, d) * scale).to(dtype)
    k = (torch.randn(B, Nk, H, d) * scale).to(dtype)
    v = torch.randn(B, Nk, H, e).to(dtype)
    return q, k, v


def _check(backend, q, k, v, eps=ref.DEFAULT_EPS, out=None):
    with sk.backend(backend):
        got = sk.linear_attention(q, k, v, eps=eps, out=out)
    if out is not None:
        assert got is out
    want64 = ref.linear_attention(q.double(), k.double(), v.double(), eps, compute_dtype=torch.float64)
    base = ref.linear_attention(q, k, v, eps)  # fp32 math, one rounding: what diffusers does
    assert got.dtype == q.dtype and got.shape == want64.shape
    assert_close_fa(got, base, want64, name="out")


# (B, Nq, Nk, H, d, e): SANA's head dim 32, the non-power-of-two cross dims 72 / 112, odd sizes
SHAPES = [(1, 1, 1, 1, 32, 32), (2, 37, 37, 3, 32, 32), (1, 113, 113, 2, 72, 72),
          (2, 19, 19, 1, 112, 112), (2, 7, 45, 2, 24, 40), (1, 130, 130, 2, 16, 16), (2, 21, 33, 2, 64, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_attention_matches_reference(backend, dtype, shape):
    q, k, v = _inputs(*shape, dtype)
    _check(backend, q, k, v, out=poisoned_empty(q.shape[:3] + (v.shape[-1],), dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_attention_long_sequence_splits(backend):
    # enough key tiles that the state launch splits them over several programs
    q, k, v = _inputs(1, 67, 1100, 1, 32, 32, torch.bfloat16)
    _check(backend, q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_attention_strided_views_of_fused_qkv(backend, dtype):
    # q, k, v as views of one [B, N, 3, H, d] projection output (non-contiguous, shared buffer)
    qkv = torch.randn(2, 29, 3, 2, 32).to(dtype)
    q, k, v = qkv.unbind(2)
    _check(backend, q, k, v)
    q2 = non_contiguous(q, 1)
    _check(backend, q2, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_attention_eps_and_all_negative_rows(backend):
    q, k, v = _inputs(1, 20, 20, 2, 32, 32, torch.float32)
    q[0, :5] = -q[0, :5].abs()             # relu(q) = 0: output 0 / eps = 0
    _check(backend, q, k, v, eps=1e-15)
    with sk.backend(backend):
        got = sk.linear_attention(q, k, v)
    assert torch.all(got[0, :5] == 0)
    _check(backend, q, k, v, eps=0.5)       # eps matters for small normalisers
    assert not torch.allclose(sk.linear_attention(q, k, v, eps=0.5), sk.linear_attention(q, k, v))


@pytest.mark.parametrize("backend", ["cpu", "reference"])  # Triton: test_linear_attention_eps_and_all_negative_rows
@pytest.mark.parametrize("d, e", [(72, 72), (24, 40), (32, 32)])  # the CPU's BLAS fallback, then the twin
def test_linear_attention_zero_denominators_and_eps(backend, d, e):
    # heads whose keys are all negative (normaliser 0, state 0) and query rows that are all negative
    # (relu(q) = 0): the denominator is exactly eps there, the output exactly 0
    q, k, v = _inputs(2, 9, 11, 3, d, e, torch.float32)
    k[0, :, 1] = -k[0, :, 1].abs()
    q[1, :4] = -q[1, :4].abs()
    for eps in (ref.DEFAULT_EPS, 0.5, 3.0, 1e-40):   # 1e-40: below fp32's smallest normal (1 / eps overflows)
        _check(backend, q, k, v, eps=eps)
        with sk.backend(backend):
            got = sk.linear_attention(q, k, v, eps=eps)
        assert torch.all(got[0, :, 1] == 0) and torch.all(got[1, :4] == 0)
    # eps comparable to the normaliser changes the result, as the reference says
    with sk.backend(backend):
        a, b = sk.linear_attention(q, k, v, eps=3.0), sk.linear_attention(q, k, v)
    torch.testing.assert_close(a, ref.linear_attention(q, k, v, 3.0), atol=1e-5, rtol=1e-4)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [16, 24, 32, 64])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_linear_attention_nan_inputs_propagate_as_in_torch(backend, d, where):
    """A NaN in q, k or v reaches the outputs torch's relu(q) relu(k)^T v reaches (relu keeps NaN):
    a NaN query element poisons its row, a NaN key element every row, a NaN value element its
    column. A relu written as max(x, 0) drops it and returns finite, normal-looking outputs."""
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(1, 9, 2, d, generator=g) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][0, 3, 1, 2] = float("nan")
    with sk.backend(backend):
        got = sk.linear_attention(q, k, v)
    want = ref.linear_attention(q.double(), k.double(), v.double())
    assert torch.equal(got.isnan(), want.isnan()), (int(got.isnan().sum()), int(want.isnan().sum()))
    assert want.isnan().any()
    ok = ~want.isnan()
    torch.testing.assert_close(got[ok].double(), want[ok], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, e", [(24, 40), (16, 16), (72, 72), (32, 20)])
@pytest.mark.parametrize("where", ["k", "v"])
def test_linear_attention_inf_inputs_match_torch_with_padded_head_dims(backend, d, e, where):
    """An infinite key or value element with positive q and k: torch gives inf (not NaN) where
    every product is finite or inf of one sign; the head dims a kernel pads (d or e below its
    block) must not turn that into NaN (0 * inf in the padding)."""
    g = torch.Generator().manual_seed(d + e)
    q, k = (torch.rand(1, 9, 2, d, generator=g) + 0.1 for _ in range(2))
    v = torch.rand(1, 9, 2, e, generator=g) + 0.1
    {"k": k, "v": v}[where][0, 3, 1, 2] = float("inf")
    with sk.backend(backend):
        got = sk.linear_attention(q, k, v)
    want = ref.linear_attention(q.double(), k.double(), v.double())
    assert (want.isinf() | want.isnan()).any()
    assert torch.equal(got.isnan(), want.isnan()), (int(got.isnan().sum()), int(want.isnan().sum()))
    assert torch.equal(got.isinf(), want.isinf()), (int(got.isinf().sum()), int(want.isinf().sum()))
    ok = want.isfinite()
    torch.testing.assert_close(got[ok].double(), want[ok], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_attention_empty(backend):
    q, k, v = _inputs(2, 0, 5, 2, 32, 32, torch.float32)
    with sk.backend(backend):
        assert sk.linear_attention(q, k, v).shape == (2, 0, 2, 32)
    q, k, v = _inputs(2, 6, 0, 2, 32, 32, torch.float32)  # no keys: state 0, output 0
    with sk.backend(backend):
        got = sk.linear_attention(q, k, v)
    assert torch.equal(got, torch.zeros(2, 6, 2, 32))


# The C++ twin (csrc/linear_attention/) stages keys in chunks of 2048 / d tokens (d = 16: 128,
# 32: 64, 64: 32) and query rows in chunks of R (6 with AVX2 and the baseline, 8 with AVX-512);
# its micro-kernels take 1..R rows, the state rows in blocks of R then two halves. Key counts on
# both sides of one and two chunks, query counts leaving partial chunks of several sizes.
@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])  # one this CPU lacks runs its widest
def test_linear_attention_cpu_twin_chunk_boundaries(d, isa, monkeypatch):
    monkeypatch.setenv("SPAR_CPU_ISA", isa)
    chunk = 2048 // d
    for Nk, Nq in [(1, 1), (chunk - 1, 5), (chunk, 12), (chunk + 1, 13), (2 * chunk + 5, 31), (3, 2 * chunk + 7)]:
        q, k, v = _inputs(2, Nq, Nk, 3, d, d, torch.float32)
        _check("cpu", q, k, v, out=poisoned_empty(2, Nq, 3, d, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 32, 64])
def test_linear_attention_cpu_twin_low_precision_chunks(dtype, d):
    # fp16 / bf16 rows converted to fp32 while staged; the output rows through one rounding
    chunk = 2048 // d
    q, k, v = _inputs(1, 17, chunk + 3, 5, d, d, dtype)
    _check("cpu", q, k, v, out=poisoned_empty(1, 17, 5, d, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_attention_cpu_twin_independent_strides(dtype):
    # q, k, v and the head slices at unrelated batch / token / head strides (Nq != Nk), several
    # key chunks and a sample boundary inside the threads' ranges of (batch, head)
    B, Nq, Nk, H, d = 3, 29, 150, 5, 32
    q = torch.randn(B, H, Nq, d).to(dtype).transpose(1, 2)                 # token stride d
    k = torch.randn(Nk, B, 2 * H, d).to(dtype).permute(1, 0, 2, 3)[:, :, 1::2]  # batch stride 2Hd, head 2d
    v = non_contiguous(torch.randn(B, Nk, H, d).to(dtype), 1)               # token stride 2Hd
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check("cpu", q, k, v, out=poisoned_empty(B, Nq, H, d, dtype=dtype))
    with sk.backend("cpu"):
        got = sk.linear_attention(q, k, v)
    torch.testing.assert_close(got, sk.linear_attention(q.contiguous(), k.contiguous(), v.contiguous()),
                               atol=0, rtol=0)  # the same loops in the same order: bit-identical


def test_linear_attention_cpu_twin_states_past_the_kept_buffer():
    # B * H states of (d + 1) * d floats above 2^22 (16 MB): allocated for the call, not kept; then
    # a small call again (the kept buffer)
    q, k, v = _inputs(64, 3, 2, 70, 32, 32, torch.float32)
    _check("cpu", q, k, v)
    q, k, v = _inputs(1, 3, 5, 2, 32, 32, torch.float32)
    _check("cpu", q, k, v)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, None), (torch.bfloat16, "fa")])
@pytest.mark.parametrize("B, N, heads", [(1, 1, 1), (2, 45, 3), (2, 64, 2)])
def test_linear_attention_matches_diffusers_processor(dtype, tol, B, N, heads):
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

    d = 32
    C = heads * d
    attn = Attention(query_dim=C, heads=heads, dim_head=d, bias=True, processor=SanaLinearAttnProcessor2_0()).eval()
    x = torch.randn(B, N, C)
    with torch.no_grad():
        want64 = attn.double()(x.double())
        attn = attn.to(dtype)
        xd = x.to(dtype)
        base = attn(xd)
        q = attn.to_q(xd).view(B, N, heads, d)
        k = attn.to_k(xd).view(B, N, heads, d)
        v = attn.to_v(xd).view(B, N, heads, d)
        got = attn.to_out[0](sk.linear_attention(q, k, v).view(B, N, C))
    if tol is None:
        rel = float((got.double() - want64).abs().max() / want64.abs().max())
        assert rel <= 1e-4, rel
        torch.testing.assert_close(got, base, atol=1e-5, rtol=1e-4)
    else:
        assert_close_fa(got, base, want64, name="attn1")


def test_linear_attention_torch_compile_fullgraph():
    f = torch.compile(lambda q, k, v: sk.linear_attention(q, k, v) * 2, fullgraph=True, backend="eager")
    q, k, v = _inputs(1, 9, 9, 2, 32, 32, torch.float32)
    torch.testing.assert_close(f(q, k, v), ref.linear_attention(q, k, v) * 2)


def test_linear_attention_opcheck():
    q, k, v = _inputs(1, 9, 9, 2, 32, 32, torch.float32)
    out = torch.empty(1, 9, 2, 32)
    torch.library.opcheck(torch.ops.spar.linear_attention.default, (q, k, v, 1e-15, out, torch.empty(0)))


def _q(*s, dtype=torch.float32):
    return torch.randn(*s, dtype=dtype)


@pytest.mark.parametrize("call, match", [
    (lambda: sk.linear_attention(_q(2, 5, 2, 32).int(), _q(2, 5, 2, 32), _q(2, 5, 2, 32)), "q: expected dtype"),
    (lambda: sk.linear_attention(_q(5, 2, 32), _q(5, 2, 32), _q(5, 2, 32)), "q: expected 4 dimensions"),
    (lambda: sk.linear_attention(_q(2, 5, 2, 32), _q(2, 5, 2, 32).half(), _q(2, 5, 2, 32)), "k: expected dtype"),
    (lambda: sk.linear_attention(_q(2, 5, 2, 32), _q(2, 5, 3, 32), _q(2, 5, 3, 32)), "k: expected shape"),
    (lambda: sk.linear_attention(_q(2, 5, 2, 32), _q(2, 5, 2, 16), _q(2, 5, 2, 32)), "k: expected shape"),
    (lambda: sk.linear_attention(_q(2, 5, 2, 32), _q(2, 5, 2, 32), _q(2, 6, 2, 32)), "v: expected shape"),
    (lambda: sk.linear_attention(_q(2, 5, 2, 32), _q(2, 5, 2, 32), "v"), "v: expected a torch.Tensor"),
    (lambda: sk.linear_attention(_q(1, 5, 1, 160), _q(1, 5, 1, 160), _q(1, 5, 1, 32)), "head dim"),
    (lambda: sk.linear_attention(_q(1, 5, 1, 32), _q(1, 5, 1, 32), _q(1, 5, 1, 32), eps=-1.0), "eps"),
    (lambda: sk.linear_attention(_q(1, 5, 1, 32), _q(1, 5, 1, 32), _q(1, 5, 1, 32),
                                 out=torch.empty(1, 5, 1, 32).half()), "out: expected dtype"),
    (lambda: sk.linear_attention(_q(1, 5, 1, 32), _q(1, 5, 1, 32), _q(1, 5, 1, 32),
                                 out=torch.empty(1, 5, 32)), "out: expected shape"),
    (lambda: sk.linear_attention(_q(1, 5, 1, 32), _q(1, 5, 1, 32), _q(1, 5, 1, 32),
                                 out=torch.empty(1, 5, 1, 64)[..., ::2]), "out: expected a contiguous"),
])
def test_linear_attention_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---------------------------------------------------------------------------------------------
# GPU launch properties, checked on CPU: caller-owned workspace, grid limits, AOT specializations

def _alloc_counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.allocs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith(("empty", "new_empty", "zeros", "full")):
                self.allocs.append(func.__name__)
            return func(*args, **(kwargs or {}))

    return Count()


@requires_triton
def test_linear_attention_uses_the_callers_workspace():
    q, k, v = _inputs(2, 40, 300, 3, 32, 32, torch.bfloat16)   # several key splits
    with sk.backend("triton"):
        ws = sk.linear_attention_workspace(q, k, v)
        assert ws.dtype == torch.float32 and ws.numel() > 0
        ws.fill_(float("nan"))
        out = poisoned_empty(2, 40, 3, 32, dtype=torch.bfloat16)
        counter = _alloc_counter()
        with counter:
            got = sk.linear_attention(q, k, v, out=out, workspace=ws)
        assert got is out
        assert counter.allocs == []                # out= and workspace=: the call allocates nothing
        assert torch.isfinite(ws).all()            # the partial states went into the given workspace
        _check("triton", q, k, v, out=poisoned_empty(2, 40, 3, 32, dtype=torch.bfloat16))
        torch.testing.assert_close(got, sk.linear_attention(q, k, v))
        small = torch.empty(ws.numel() - 1)
        with pytest.raises(ValueError, match="workspace: expected a contiguous fp32 tensor of at least"):
            sk.linear_attention(q, k, v, workspace=small)
    with pytest.raises(ValueError, match="workspace: expected dtype"):
        sk.linear_attention(q, k, v, workspace=ws.half())
    assert sk.linear_attention_workspace(q, k, v).numel() == 0   # CPU implementation: none needed


def test_linear_attention_grid_axes_y_z_stay_under_65535(monkeypatch):
    """1000 samples x 70 heads (B*H = 70000): no grid axis but x may exceed 65535. Inputs are
    stride-0 views (no big allocation); the kernels are replaced by recorders of the grid."""
    import sys

    mod = sys.modules["spar_kernels.linear_attention"]
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *a, **kw: None

    monkeypatch.setattr(mod, "_la_state_kernel", Recorder())
    monkeypatch.setattr(mod, "_la_out_kernel", Recorder())
    B, N, H, d = 1000, 1, 70, 16
    q = torch.randn(1, N, 1, d).expand(B, N, H, d)
    out = torch.empty(B, N, H, d)
    ws = torch.empty(mod._Plan(B, N, N, H, d, d, q.dtype).numel)  # never touched: no memory committed
    mod._impl_triton(q, q, q, 1e-15, out, ws)
    assert len(grids) == 2
    for g in grids:
        assert all(n <= 65535 for n in g[1:]), g
        assert g[0] < 2 ** 31


def _launch_key(spec):
    return (spec.fn, tuple(sorted(spec.types.items())), tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items())),
            tuple(sorted(spec.aligned)), spec.num_warps, spec.num_stages)


@pytest.mark.parametrize("B, N, H, fused, dtype", [
    (2, 1024, 70, False, torch.bfloat16),   # SANA-1.6B, 1024 tokens
    (2, 256, 36, True, torch.bfloat16),     # SANA-0.6B, 256 tokens, q/k/v views of one projection
    (2, 4096, 36, False, torch.float16),
    (1, 37, 1, False, torch.float32),       # one head (H == 1 is specialized as a constant)
])
def test_linear_attention_aot_specs_cover_runtime_specializations(B, N, H, fused, dtype):
    """The AOT specs (python -m spar_kernels.inspect) compile what triton specializes at run time
    for these launches: integers equal to 1 as constants, 16-divisible ints / pointers aligned,
    strides as i32, the launchers' warps and stages."""
    import sys

    from spar_kernels import _aot

    mod = sys.modules["spar_kernels.linear_attention"]
    d = 32 if H > 1 else 24
    if fused:
        q, k, v = torch.empty(B, N, 3, H, d, dtype=dtype, device="meta").unbind(2)
    else:
        q, k, v = (torch.empty(B, N, H, d, dtype=dtype, device="meta") for _ in range(3))
    out = torch.empty(B, N, H, d, dtype=dtype, device="meta")
    plan = mod._Plan(B, N, N, H, d, d, dtype)
    ws = torch.empty(plan.numel, device="meta")
    have = {_launch_key(s) for s in mod._aot_specs()}
    for fn, _grid, args, consts, warps, stages in plan.launches(q, k, v, out, ws, 1e-15):
        consts = dict(consts, DOT_UPCAST=False) if "DOT_UPCAST" in consts else consts
        spec = _aot.launch_spec("x", fn, "x", args, consts, num_warps=warps, num_stages=stages)
        assert _launch_key(spec) in have, (fn.__name__, spec.types, spec.constexprs, spec.aligned)


# (lanes, flags): the AVX-512 variant's 16 lanes built for AVX2, and the 4 lanes of an SSE-only
# build's baseline variant (built without AVX); neither runs in the extension on this CPU
@pytest.mark.parametrize("lanes,flags", [(16, ["-mavx2", "-mfma", "-mf16c"]), (4, ["-mno-avx"])],
                         ids=["16-lanes-avx2", "4-lanes-sse"])
def test_linear_attention_other_lane_counts_match_reference(tmp_path, lanes, flags):
    # The AVX-512 variant runs the kernels header at 16 fp32 lanes (tiles of up to 8 rows, query
    # chunks of 8); no AVX-512 CPU runs the suite, but GCC's 64-byte vector types compile for AVX2,
    # so tests/cpp/linear_attention_l16.cpp builds the 16-lane loops for AVX2 and this test compares
    # them with the reference (fp32 and bf16, d = 16 / 32 / 64, chunk boundaries, Nq != Nk).
    # The same harness built with 4 lanes and without AVX runs an SSE-only build's baseline variant.
    import os
    import subprocess

    exe = build_cpp_harness(tmp_path, "linear_attention_l16.cpp",
                            ["-O1", "-std=gnu++17", *flags, f"-DLA_LANES={lanes}", "-fopenmp", "-Wno-psabi"])
    torch.manual_seed(1616)
    # (B, Nq, Nk, H, d): keys on both sides of one and two chunks (2048 / d), query counts leaving
    # partial chunks of 8, one key, one query
    cases = [(1, 1, 1, 1, 32), (2, 9, 63, 3, 32), (1, 17, 65, 2, 32), (1, 8, 129, 2, 16), (2, 23, 31, 1, 64),
             (1, 5, 70, 2, 64)]
    for dtype, code in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        for B, Nq, Nk, H, d in cases:
            q, k, v = _inputs(B, Nq, Nk, H, d, d, dtype)
            paths = [tmp_path / n for n in ("q.bin", "k.bin", "v.bin", "out.bin")]
            for t, p in zip((q, k, v), paths):
                (t.view(torch.int16) if dtype == torch.bfloat16 else t).contiguous().numpy().tofile(p)
            eps = 1e-4
            subprocess.run([str(exe), *map(str, (B, Nq, Nk, H, d)), code, repr(eps), *map(str, paths)], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "2"})
            raw = torch.from_file(str(paths[3]), size=B * Nq * H * d,
                                  dtype=torch.int16 if dtype == torch.bfloat16 else torch.float32)
            got = (raw.view(torch.bfloat16) if dtype == torch.bfloat16 else raw).view(B, Nq, H, d)
            want64 = ref.linear_attention(q.double(), k.double(), v.double(), eps, compute_dtype=torch.float64)
            assert_close_fa(got, ref.linear_attention(q, k, v, eps), want64, name=f"{lanes} lanes {code} {(B, Nq, Nk, H, d)}")


@pytest.mark.parametrize("d", [16, 32, 64])
def test_eps_zero_with_a_subnormal_normaliser_stays_finite(d):
    """eps = 0 and a query row whose normaliser relu(q).z is subnormal: num / den is finite; the
    twin's 1 / (den + eps) would overflow, so such an eps takes the dividing path."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1, d) for _ in range(3))
    q[0, 1] = 1e-40
    got = sk.linear_attention(q, k, v, eps=0.0)
    with sk.backend("reference"):
        want = sk.linear_attention(q, k, v, eps=0.0)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
