import pytest
import torch
import torch.nn.functional as F

import spar_kernels as sk
from spar_kernels.reference import adaln as ref
from spar_kernels.testing import assert_close_fa, non_contiguous, poisoned_empty, tolerance

from conftest import requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = [pytest.param("triton", marks=requires_triton), "cpu", "reference"]


def _mods(B, C, dtype, n=6):
    """Per-sample vectors as SanaTransformerBlock makes them: chunks of a [B, 6, C] sum."""
    table = torch.randn(n, C) / C ** 0.5
    t = torch.randn(B, n * C)
    return (table[None] + t.reshape(B, n, C)).to(dtype).chunk(n, dim=1)  # [B, 1, C] strided views


def _torch_same_dtype_adaln(x, shift, scale, eps):
    """diffusers' own computation: nn.LayerNorm in x's dtype, then the modulation in that dtype."""
    B, _, C = x.shape
    n = F.layer_norm(x, (C,), eps=eps)
    return n * (1 + ref.per_sample(scale, B, C).to(x.dtype)) + ref.per_sample(shift, B, C).to(x.dtype)


def _check_adaln(backend, x, shift, scale, eps=1e-6):
    out = poisoned_empty(x.shape, dtype=x.dtype)
    with sk.backend(backend):
        got = sk.adaln_layernorm(x, shift, scale, eps=eps, out=out)
    assert got is out
    want64 = ref.adaln_layernorm(x.double(), shift.double(), scale.double(), eps, compute_dtype=torch.float64)
    assert_close_fa(got, _torch_same_dtype_adaln(x, shift, scale, eps), want64, name="adaln")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 113), (1, 9, 1152), (2, 3, 2240), (1, 2, 9000)])
def test_adaln_layernorm_matches_reference(backend, dtype, shape):
    B, N, C = shape
    x = (torch.randn(shape) * 2 + 0.7).to(dtype)
    shift, scale, *_ = _mods(B, C, dtype)
    _check_adaln(backend, x, shift, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaln_layernorm_shift_scale_forms(backend):
    B, N, C = 2, 9, 96
    x = torch.randn(B, N, C, dtype=torch.bfloat16)
    full = torch.randn(B, C)
    for shift, scale in [(full, full.flip(0)),                       # [B, C]
                         (full[:, None], full[:, None] * 0.5),       # [B, 1, C]
                         (torch.randn(C), torch.randn(1, C)),         # broadcast
                         (torch.randn(1, 1, C), torch.randn(B, 2 * C)[:, ::2])]:  # strided columns
        _check_adaln(backend, x, shift, scale)
        _check_adaln(backend, x, shift.bfloat16(), scale.half())     # mixed modulation dtypes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaln_layernorm_non_contiguous_x_and_eps(backend, dtype):
    B, N, C = 2, 11, 130
    shift, scale, *_ = _mods(B, C, dtype)
    x = non_contiguous(torch.randn(B, N, C).to(dtype), 1)
    _check_adaln(backend, x, shift, scale, eps=1e-5)
    x = non_contiguous(torch.randn(B, N, C).to(dtype), 2)             # channel stride 2: copied
    _check_adaln(backend, x, shift, scale, eps=0.1)
    # a constant row: variance 0, the output is the shift
    x = torch.full((1, 3, C), 2.5, dtype=dtype)
    with sk.backend(backend):
        got = sk.adaln_layernorm(x, shift[:1], scale[:1], eps=1e-6)
    torch.testing.assert_close(got, shift[:1].expand(1, 3, C).to(dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mean", [1e3, -1e4])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_adaln_layernorm_host_large_mean(backend, mean):
    """Rows far from zero (x = mean + randn, fp32): the CPU twin and the reference (their
    corrected two-pass mean and variance; the reference's plain two-pass form had up to 5x torch's
    error at 1e3) stay within the fp32 tolerance table of an fp64 reference, which torch's LayerNorm
    misses there (its error grows with the mean: ~1e-4 at 1e3, ~2e-3 at 1e4) and a one-pass
    E[x^2] - E[x]^2 misses by far. C = 5 takes the scalar loop only, 1163 the 32- and 8-lane steps
    and a scalar tail; the transposed x is staged through the twin's row buffer."""
    B, N = 2, 5
    for C in (5, 1163, 2240):
        shift, scale, *_ = _mods(B, C, torch.float32)
        x = torch.randn(B, N, C) + mean
        for xv in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):
            _check_adaln(backend, xv, shift, scale)
            with sk.backend(backend):
                got = sk.adaln_layernorm(xv, shift, scale, eps=1e-6)
            want64 = ref.adaln_layernorm(xv.double(), shift.double(), scale.double(), 1e-6,
                                         compute_dtype=torch.float64)
            torch.testing.assert_close(got.double(), want64, **tolerance(torch.float32))


@requires_triton
@pytest.mark.parametrize("mean", [1e4, -1e3])
def test_adaln_layernorm_triton_large_mean(mean):
    """The Triton kernel's corrected two-pass variance on rows far from zero (fp32 x = mean +
    randn): within the fp32 tolerance table of an fp64 reference in the single-pass (C = 5, 113)
    and the streamed (C = 8193) form; the plain two-pass form is off by ~ulp(mean) / std (~2e-3
    at 1e4), where the FlashAttention rule against torch's LayerNorm failed ~1 row block in 10."""
    for C in (5, 113, 8193):
        B, N = (2, 3) if C < 8192 else (1, 2)
        shift, scale, *_ = _mods(B, C, torch.float32)
        x = torch.randn(B, N, C) + mean
        with sk.backend("triton"):
            got = sk.adaln_layernorm(x, shift, scale, eps=1e-6)
        want64 = ref.adaln_layernorm(x.double(), shift.double(), scale.double(), 1e-6, compute_dtype=torch.float64)
        torch.testing.assert_close(got.double(), want64, **tolerance(torch.float32))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=requires_triton), "cpu"])
def test_adaln_layernorm_spread_of_a_few_ulps(backend):
    """Rows whose spread is a few fp32 ulps of their mean (x = 1e3 + 1e-3 randn; ulp(1e3) = 6e-5):
    the fp32 mean's rounding error (corr = sum(x - mean) / C, a few % of the std here) must come
    off both the variance (sum(d^2) / C - corr^2) and the centring (d - corr), in the single-pass
    (C = 113) and the streamed (C = 8193) form; an fp64 reference within the fp32 tolerance table
    (the large-mean test's std of 1 leaves corr^2 far below it)."""
    for C in (113, 8193):
        B, N = (2, 8) if C < 8192 else (1, 4)
        shift, scale, *_ = _mods(B, C, torch.float32)
        x = torch.randn(B, N, C) * 1e-3 + 1e3
        with sk.backend(backend):
            got = sk.adaln_layernorm(x, shift, scale, eps=1e-12)
        want64 = ref.adaln_layernorm(x.double(), shift.double(), scale.double(), 1e-12, compute_dtype=torch.float64)
        torch.testing.assert_close(got.double(), want64, **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 2])
def test_adaln_matches_sana_block_norm_and_modulation(dtype, B):
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    dim, N = 64, 35
    blk = SanaTransformerBlock(dim, 2, 32, num_cross_attention_heads=2, cross_attention_head_dim=32,
                               cross_attention_dim=dim).eval()
    x, t = torch.randn(B, N, dim), torch.randn(B, 6 * dim)

    def diffusers_norms(blk, x, t):
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = (blk.scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1)
        h1 = (blk.norm1(x) * (1 + sc_msa) + sh_msa).to(x.dtype)
        h2 = blk.norm2(x) * (1 + sc_mlp) + sh_mlp
        return h1, h2, (sh_msa, sc_msa, sh_mlp, sc_mlp)

    with torch.no_grad():
        w1, w2, _ = diffusers_norms(blk.double(), x.double(), t.double())
        blk = blk.to(dtype)
        b1, b2, (sh_msa, sc_msa, sh_mlp, sc_mlp) = diffusers_norms(blk, x.to(dtype), t.to(dtype))
        g1 = sk.adaln_layernorm(x.to(dtype), sh_msa, sc_msa, eps=blk.norm1.eps)
        g2 = sk.adaln_layernorm(x.to(dtype), sh_mlp, sc_mlp, eps=blk.norm2.eps)
    for got, base, want in ((g1, b1, w1), (g2, b2, w2)):
        if dtype == torch.float32:
            rel = float((got.double() - want).abs().max() / want.abs().max())
            assert rel <= 1e-4, rel
        assert_close_fa(got, base, want)


# ---------------------------------------------------------------------------------------------
# gated_residual

def _check_gr(backend, x, y, gate, out="new"):
    want64 = ref.gated_residual(x.double(), y.double(), gate.double(), compute_dtype=torch.float64)
    B, _, C = x.shape
    base = x + ref.per_sample(gate, B, C).to(x.dtype) * y  # torch in x's dtype, as diffusers
    with sk.backend(backend):
        if out == "new":
            got = sk.gated_residual(x, y, gate)
        elif out == "inplace":
            got = sk.gated_residual(x, y, gate, out=x)
            assert got is x
        else:
            buf = poisoned_empty(x.shape, dtype=x.dtype)
            got = sk.gated_residual(x, y, gate, out=buf)
            assert got is buf
    assert_close_fa(got, base, want64, name="gated_residual")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 113), (2, 3, 2240)])
@pytest.mark.parametrize("out", ["new", "inplace", "buffer"])
def test_gated_residual_matches_reference(backend, dtype, shape, out):
    B, N, C = shape
    x, y = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    gate = _mods(B, C, dtype)[2]
    _check_gr(backend, x.clone(), y, gate, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_residual_strides_and_gate_forms(backend):
    B, N, C = 2, 13, 96
    x = torch.randn(B, N, C, dtype=torch.bfloat16)
    y = non_contiguous(torch.randn(B, N, C, dtype=torch.bfloat16), 1)
    for gate in (torch.randn(B, C), torch.randn(C), torch.randn(B, 1, C).half(), torch.randn(B, 3 * C)[:, ::3]):
        _check_gr(backend, x.clone(), y, gate, "inplace")
        _check_gr(backend, x, y, gate, "buffer")
    xs = non_contiguous(torch.randn(B, N, C), 0)                      # strided batch: in place keeps strides
    before = xs.clone()
    g = torch.randn(B, C)
    with sk.backend(backend):
        sk.gated_residual(xs, y.float(), g, out=xs)
    torch.testing.assert_close(xs, before + g[:, None] * y.float())


def test_gated_residual_in_place_under_torch_compile():
    def f(x, y, g):
        sk.gated_residual(x, y, g, out=x)
        return x * 1
    c = torch.compile(f, fullgraph=True, backend="eager")
    x, y, g = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 16)
    want = x + g[:, None] * y
    torch.testing.assert_close(c(x.clone(), y, g), want)


def test_adaln_opcheck_and_compile():
    x, sh, sc = torch.randn(2, 5, 24), torch.randn(2, 24), torch.randn(2, 24)
    torch.library.opcheck(torch.ops.spar.adaln_layernorm.default, (x, sh, sc, 1e-6, torch.empty_like(x)))
    torch.library.opcheck(torch.ops.spar.gated_residual.default, (x, x.clone(), sh, torch.empty_like(x)))
    f = torch.compile(lambda x, a, b: sk.adaln_layernorm(x, a, b, eps=1e-6) + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, sh, sc), ref.adaln_layernorm(x, sh, sc, 1e-6) + 1)


def _x(*s, dtype=torch.float32):
    return torch.randn(*s, dtype=dtype)


@pytest.mark.parametrize("call, match", [
    (lambda: sk.adaln_layernorm(_x(2, 4, 8).int(), _x(2, 8), _x(2, 8), eps=1e-6), "x: expected dtype"),
    (lambda: sk.adaln_layernorm(_x(4, 8), _x(2, 8), _x(2, 8), eps=1e-6), "x: expected 3 dimensions"),
    (lambda: sk.adaln_layernorm(_x(2, 4, 8), _x(2, 9), _x(2, 8), eps=1e-6), "shift: expected one 8-vector"),
    (lambda: sk.adaln_layernorm(_x(2, 4, 8), _x(2, 8), _x(3, 8), eps=1e-6), "scale: expected one 8-vector"),
    (lambda: sk.adaln_layernorm(_x(2, 4, 8), _x(2, 8), _x(2, 4, 8), eps=1e-6), "scale: expected one 8-vector"),
    (lambda: sk.adaln_layernorm(_x(2, 4, 8), _x(2, 8).int(), _x(2, 8), eps=1e-6), "shift: expected dtype"),
    (lambda: sk.adaln_layernorm(_x(2, 4, 8), "s", _x(2, 8), eps=1e-6), "shift: expected a torch.Tensor"),
    (lambda: sk.adaln_layernorm(_x(2, 4, 8), _x(2, 8), _x(2, 8), eps=-1.0), "eps"),
    (lambda: sk.adaln_layernorm(_x(2, 4, 8), _x(2, 8), _x(2, 8), eps=1e-6, out=_x(2, 4, 8).half()), "out: expected dtype"),
    (lambda: sk.adaln_layernorm(_x(2, 4, 8), _x(2, 8), _x(2, 8), eps=1e-6, out=_x(2, 8, 4).transpose(1, 2)),
     "out: expected a contiguous"),
    (lambda: sk.gated_residual(_x(2, 4, 8), _x(2, 4, 9), _x(2, 8)), "y: expected shape"),
    (lambda: sk.gated_residual(_x(2, 4, 8), _x(2, 4, 8).half(), _x(2, 8)), "y: expected dtype"),
    (lambda: sk.gated_residual(_x(2, 4, 8), _x(2, 4, 8), _x(8, 2)), "gate: expected one 8-vector"),
    (lambda: sk.gated_residual(_x(8), _x(8), _x(8)), "x: expected 3 dimensions"),
    (lambda: sk.gated_residual(_x(2, 4, 8), _x(2, 4, 8), _x(2, 8), out=_x(2, 4, 7)), "out: expected shape"),
])
def test_adaln_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def _strided_views(B, N, C, dtype):
    """x layouts the row kernels must read in place: transposed (token stride 1, channel stride N)
    and every other channel (channel stride 2)."""
    return {"transposed": torch.randn(B, C, N).to(dtype).transpose(1, 2),
            "every other channel": torch.randn(B, N, 2 * C).to(dtype)[..., ::2]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaln_layernorm_any_strides(backend, dtype):
    B, N, C = 2, 7, 130
    shift, scale, *_ = _mods(B, C, dtype)
    for name, x in _strided_views(B, N, C, dtype).items():
        _check_adaln(backend, x, shift, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_any_strides_and_in_place(backend, dtype):
    B, N, C = 2, 7, 130
    gate = _mods(B, C, dtype)[2]
    views = _strided_views(B, N, C, dtype)
    for xname, x in views.items():
        for yname, y in views.items():
            _check_gr(backend, x.clone(), y, gate, "buffer")
            # in place on the strided view itself: only x's elements change, the storage around stays
            storage = torch.randn(B, N, 2 * C).to(dtype) if xname == "every other channel" else None
            xv = storage[..., ::2] if storage is not None else torch.randn(B, C, N).to(dtype).transpose(1, 2)
            untouched = storage[..., 1::2].clone() if storage is not None else None
            before = xv.clone()
            with sk.backend(backend):
                got = sk.gated_residual(xv, y, gate, out=xv)
            assert got is xv
            want64 = ref.gated_residual(before.double(), y.double(), gate.double(), compute_dtype=torch.float64)
            base = before + ref.per_sample(gate, B, C).to(dtype) * y
            assert_close_fa(xv, base, want64, name=f"in place {xname} / {yname}")
            if storage is not None:
                assert torch.equal(storage[..., 1::2], untouched)


# (N, C): full tiles of 16 tokens with a power-of-two channel stride (N = 1024: a 4 KiB stride),
# a partial last tile and a channel tail (C not a multiple of 8), one tile, C < 8
CHANNELS_FIRST = [(1024, 136), (37, 1152), (16, 19), (45, 6)]


@pytest.mark.parametrize("isa", ["base", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, C", CHANNELS_FIRST)
def test_adaln_cpu_channels_first_tiles(N, C, dtype, isa, monkeypatch):
    """A [B, C, N] tensor seen as [B, N, C] (NCHW code's layout) runs in tiles of 16 tokens,
    gathered channel by channel (8 x 8 transposes for fp32); every token is then normalized as a
    contiguous row, so the output equals the contiguous input's bit for bit. gated_residual with
    channels-first operands (and in place on one) holds the accuracy rule."""
    monkeypatch.setenv("SPAR_CPU_ISA", isa)
    B = 2
    g = torch.Generator().manual_seed(N * 100 + C)
    shift, scale, gate, *_ = _mods(B, C, dtype)
    x = (torch.randn(B, C, N, generator=g) * 3 + 5).to(dtype).transpose(1, 2)
    with sk.backend("cpu"):
        got = sk.adaln_layernorm(x, shift, scale, eps=1e-6)
        want = sk.adaln_layernorm(x.contiguous(), shift, scale, eps=1e-6)
    assert torch.equal(got, want)
    _check_adaln("cpu", x, shift, scale)
    y = torch.randn(B, C, N, generator=g).to(dtype).transpose(1, 2)
    for xv, yv in ((x, y), (x.contiguous(), y), (x, y.contiguous())):
        _check_gr("cpu", xv.clone(), yv, gate, "buffer")
        before = xv.clone()
        with sk.backend("cpu"):
            sk.gated_residual(xv, yv, gate, out=xv)   # in place on x's own layout
        want64 = ref.gated_residual(before.double(), yv.double(), gate.double(), compute_dtype=torch.float64)
        assert_close_fa(xv, before + ref.per_sample(gate, B, C).to(dtype) * yv, want64, name="in place")


def test_gated_residual_in_place_rejects_overlapping_x():
    x = _x(2, 1, 8).expand(2, 4, 8)
    with pytest.raises(ValueError, match="out: in-place update"):
        sk.gated_residual(x, _x(2, 4, 8), _x(2, 8), out=x)


def _launch_key(spec):
    return (spec.fn, tuple(sorted(spec.types.items())), tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items())),
            tuple(sorted(spec.aligned)), spec.num_warps, spec.num_stages)


@pytest.mark.parametrize("x_layout", ["contiguous", "transposed", "every other channel", "one token"])
@pytest.mark.parametrize("C", [1152, 2240])
def test_adaln_aot_specs_cover_runtime_specializations(x_layout, C):
    """python -m spar_kernels.inspect compiles what triton specializes at run time for SANA's
    launches (N = 4096 tokens, modulation chunks of [B, 6, C]): channel / token strides equal to 1
    as constants, 16-divisible sizes and strides aligned, i32 strides."""
    import sys

    from spar_kernels import _aot

    mod = sys.modules["spar_kernels.adaln"]
    B, N, bf = 2, 4096, torch.bfloat16
    meta = dict(dtype=bf, device="meta")
    x = {"contiguous": lambda: torch.empty(B, N, C, **meta),
         "transposed": lambda: torch.empty(B, C, N, **meta).transpose(1, 2),
         "every other channel": lambda: torch.empty(B, N, 2 * C, **meta)[..., ::2],
         "one token": lambda: torch.empty(B, 1, C, **meta)}[x_layout]()
    m = torch.empty(B, 6, C, **meta)[:, 0]
    out = torch.empty(x.shape, **meta)
    have = {_launch_key(s) for s in mod._aot_specs()}
    _, args, consts, warps, stages = mod._adaln_launch(x, m, m, 1e-6, out)
    spec = _aot.launch_spec("x", mod._adaln_kernel, "x", args, consts, num_warps=warps, num_stages=stages)
    assert _launch_key(spec) in have, (spec.types, spec.constexprs, spec.aligned)
    if x_layout != "one token":
        _, args, consts, warps, stages = mod._gr_launch(x, out, m, x)
        spec = _aot.launch_spec("x", mod._gated_residual_kernel, "x", args, consts, num_warps=warps,
                                num_stages=stages)
        assert _launch_key(spec) in have, (spec.types, spec.constexprs, spec.aligned)


@requires_triton
def test_adaln_triton_keeps_a_nan_variance():
    """Centred values beyond fp32's range: the variance is inf - inf = NaN, and the row is NaN as in
    the reference (tl.maximum(var, 0) used to drop the NaN)."""
    x = torch.tensor([3e38, -3e38, 3e38, -3e38, 3e38]).view(1, 1, 5)
    sh, sc = torch.zeros(1, 5), torch.zeros(1, 5)
    with sk.backend("triton"):
        got = sk.adaln_layernorm(x, sh, sc, eps=1e-6)
    with sk.backend("reference"):
        want = sk.adaln_layernorm(x, sh, sc, eps=1e-6)
    assert torch.isnan(want).all()
    torch.testing.assert_close(got, want, equal_nan=True)
