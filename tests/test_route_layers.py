"""route_layers (Dynamic Token Routing): the C++ CPU twin and the reference against fp64 oracles."""

import math

import pytest
import torch
import torch.nn.functional as F

import spar_kernels as sk
from spar_kernels import _ext
from spar_kernels.reference import route_layers as ref
from spar_kernels.testing import assert_close, assert_close_fa, non_contiguous, poisoned_empty

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["cpu", "reference"]


def _inputs(L, N, D, K, dtype, *, seed, logit_scale=3.0, param_dtype=None, gen_ids=None):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(L, N, D, generator=g) * 2 + 0.5).to(dtype)
    ids = torch.randperm(L, generator=g)[:K] if gen_ids is None else torch.tensor(gen_ids)
    logits = (torch.randn(N, K, generator=g) * logit_scale).to(dtype)
    alpha = (torch.rand(K, generator=g) + 0.5).to(param_dtype or dtype)
    w = (torch.randn(D, generator=g) * 0.5 + 1).to(param_dtype or dtype)
    b = (torch.randn(D, generator=g) * 0.1).to(param_dtype or dtype)
    return hidden, ids, logits, alpha, w, b


def _oracle(hidden, ids, logits, alpha, w, b, tau, eps, rows):
    """An independent fp64 formulation: explicit exp/sum softmax, einsum mixture, nn.LayerNorm."""
    h = hidden.double()[ids.long()]
    lg = logits.double()
    if rows is not None:
        h, lg = h[:, torch.as_tensor(rows).long()], lg[torch.as_tensor(rows).long()]
    z = lg / tau
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    wts = e / e.sum(-1, keepdim=True) * alpha.double()
    m = torch.einsum("mk,kmd->md", wts, h)
    ln = torch.nn.LayerNorm(hidden.shape[-1], eps=eps, elementwise_affine=w is not None, dtype=torch.float64)
    if w is not None:
        with torch.no_grad():
            ln.weight.copy_(w.double())
            ln.bias.copy_(b.double() if b is not None else torch.zeros_like(ln.bias))
    elif b is not None:
        return ln(m) + b.double()
    with torch.no_grad():
        return ln(m)


def _check(y, hidden, ids, logits, alpha, w, b, tau, eps, rows):
    want64 = _oracle(hidden, ids, logits, alpha, w, b, tau, eps, rows)
    if y.dtype == torch.float32:
        assert_close(y, want64.float(), atol=2e-5, rtol=2e-5)
    else:
        # FlashAttention rule against PyTorch's own same-dtype computation
        base = ref.route_layers(hidden, ids, logits, alpha, w, b, tau=tau, eps=eps, rows=rows,
                                compute_dtype=y.dtype)
        assert_close_fa(y, base, want64)
        assert_close(y, want64.to(y.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2, 4, 7, 16])
def test_route_layers_k_and_dtypes(backend, dtype, K):
    for seed, (N, D) in enumerate([(37, 896), (5, 1003)]):
        hidden, ids, logits, alpha, w, b = _inputs(18, N, D, K, dtype, seed=seed * 31 + K)
        with sk.backend(backend):
            y = sk.route_layers(hidden, ids, logits, alpha, w, b)
        assert y.shape == (N, D) and y.dtype == dtype
        _check(y, hidden, ids, logits, alpha, w, b, 1.0, 1e-5, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [1, 2, 7, 8, 113, 257, 1536, 3584, 8192, 8199])
def test_route_layers_widths(backend, D):
    dtype = torch.bfloat16 if D % 2 else torch.float16
    N = 9 if D >= 3584 else 41
    hidden, ids, logits, alpha, w, b = _inputs(6, N, D, 4, dtype, seed=D)
    with sk.backend(backend):
        y = sk.route_layers(hidden, ids, logits, alpha, w, b, tau=0.7, eps=1e-6)
    _check(y, hidden, ids, logits, alpha, w, b, 0.7, 1e-6, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows_kind", ["subset", "duplicates", "empty", "int32", "list", "all", "strided"])
def test_route_layers_rows(backend, rows_kind):
    N = 53
    hidden, ids, logits, alpha, w, b = _inputs(7, N, 130, 3, torch.float32, seed=7)
    g = torch.Generator().manual_seed(3)
    rows = {"subset": torch.randperm(N, generator=g)[:17],
            "duplicates": torch.randint(0, N, (40,), generator=g),
            "empty": torch.zeros(0, dtype=torch.long),
            "int32": torch.randperm(N, generator=g)[:11].to(torch.int32),
            "list": [N - 1, 0, 5, 5],
            "strided": torch.randint(0, N, (30,), generator=g)[::3],
            "all": torch.arange(N)}[rows_kind]
    with sk.backend(backend):
        y = sk.route_layers(hidden, ids, logits, alpha, w, b, rows=rows)
    M = len(rows)
    assert y.shape == (M, 130)
    if M:
        _check(y, hidden, ids, logits, alpha, w, b, 1.0, 1e-5, rows)
    if rows_kind == "duplicates":  # duplicate rows are computed identically
        r = torch.as_tensor(rows)
        same = (r[:, None] == r[None, :])
        i, j = torch.nonzero(same & ~torch.eye(M, dtype=torch.bool), as_tuple=True)
        assert i.numel() and torch.equal(y[i], y[j])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows_strided", "layer_major_permuted", "d_strided", "d_transposed", "logits_t"])
def test_route_layers_strided(backend, dtype, layout):
    L, N, D, K = 5, 29, 136, 4
    hidden, ids, logits, alpha, w, b = _inputs(L, N, D, K, dtype, seed=11)
    if layout == "rows_strided":
        hidden = non_contiguous(hidden, 1)
    elif layout == "layer_major_permuted":  # [N, L, D] buffer viewed as [L, N, D]
        hidden = hidden.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    elif layout == "d_strided":  # [..., ::2]
        hidden = non_contiguous(hidden, 2)
    elif layout == "d_transposed":  # an [L, D, N] buffer viewed as [L, N, D]: stride_d = N
        hidden = hidden.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        logits = logits.t().contiguous().t()
    with sk.backend(backend):
        y = sk.route_layers(hidden, ids, logits, alpha, w, b, rows=[3, 0, 28])
    _check(y, hidden, ids, logits, alpha, w, b, 1.0, 1e-5, [3, 0, 28])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_layers_large_logits(backend, dtype):
    big = 6e4 if dtype == torch.float16 else 1e30
    hidden, ids, logits, alpha, w, b = _inputs(4, 23, 64, 4, torch.float32, seed=5)
    logits = (torch.sign(logits) * big * torch.rand(logits.shape)).to(dtype)
    hidden, w, b, alpha = hidden.to(dtype), w.to(dtype), b.to(dtype), alpha.to(dtype)
    with sk.backend(backend):
        y = sk.route_layers(hidden, ids, logits, alpha, w, b, tau=0.25)
    assert bool(torch.isfinite(y).all())
    # (PyTorch's own fp16 computation overflows logits / tau here, so no FA baseline: the fp64 oracle)
    want64 = _oracle(hidden, ids, logits, alpha, w, b, 0.25, 1e-5, None)
    assert_close(y, want64.to(dtype), **({"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_layers_out_and_params(backend):
    hidden, ids, logits, alpha, w, b = _inputs(6, 31, 200, 3, torch.bfloat16, seed=2, param_dtype=torch.float32)
    out = poisoned_empty(31, 200, dtype=torch.bfloat16)
    with sk.backend(backend):
        y = sk.route_layers(hidden, ids.to(torch.int32), logits.float(), alpha, w, b, tau=1.5, eps=1e-3, out=out)
        assert y is out
        _check(y, hidden, ids, logits.float(), alpha, w, b, 1.5, 1e-3, None)
        y2 = sk.route_layers(hidden, ids.tolist(), logits, alpha.half(), None, None)
        _check(y2, hidden, ids, logits, alpha.half(), None, None, 1.0, 1e-5, None)
        y3 = sk.route_layers(hidden.double(), ids, logits.double(), alpha, w, b)
        assert y3.dtype == torch.float64
        torch.testing.assert_close(y3, _oracle(hidden.double(), ids, logits.double(), alpha, w, b, 1.0, 1e-5, None))


def test_route_layers_no_tokens():
    hidden, ids, logits, alpha, w, b = _inputs(3, 0, 16, 2, torch.float32, seed=8)
    for backend in BACKENDS:
        with sk.backend(backend):
            assert sk.route_layers(hidden, ids, logits, alpha, w, b).shape == (0, 16)


def test_route_layers_cpu_twin_matches_reference_closely():
    # the twin and the fp32 reference do the same fp32 math: they agree to a few fp32 ulps
    hidden, ids, logits, alpha, w, b = _inputs(8, 301, 1536, 4, torch.float32, seed=9)
    with sk.backend("cpu"):
        y = sk.route_layers(hidden, ids, logits, alpha, w, b)
    r = ref.route_layers(hidden, ids, logits, alpha, w, b)
    assert_close(y, r, atol=1e-5, rtol=1e-5)


def test_route_layers_twin_nan_rows_for_bad_indices():
    # What the CUDA kernel does for out-of-range indices (no host sync there), seen through the twin.
    hidden, ids, logits, alpha, w, b = _inputs(4, 10, 16, 2, torch.float32, seed=1)
    rows = torch.tensor([0, 10, -1, 3])
    out = torch.zeros(4, 16)
    a = alpha.float().contiguous()
    _ext.cpu_ext().route_layers(hidden.data_ptr(), 0, 4, 10, 16, *hidden.stride(), ids.data_ptr(), True, 2,
                                logits.data_ptr(), 0, *logits.stride(), a.data_ptr(), 0, w.data_ptr(), b.data_ptr(), 0,
                                1.0, 1e-5, rows.data_ptr(), True, 4, out.data_ptr())
    assert bool(out[1:3].isnan().all()) and bool(torch.isfinite(out[[0, 3]]).all())
    bad_ids = torch.tensor([0, 4])
    out2 = torch.zeros(10, 16)
    _ext.cpu_ext().route_layers(hidden.data_ptr(), 0, 4, 10, 16, *hidden.stride(), bad_ids.data_ptr(), True, 2,
                                logits.data_ptr(), 0, *logits.stride(), a.data_ptr(), 0, w.data_ptr(), b.data_ptr(), 0,
                                1.0, 1e-5, 0, False, 10, out2.data_ptr())
    assert bool(out2.isnan().all())


def test_route_layers_custom_op_registration():
    hidden, ids, logits, alpha, w, b = _inputs(4, 6, 24, 2, torch.float32, seed=4)
    out = torch.empty(6, 24)
    torch.library.opcheck(torch.ops.spar.route_layers.default,
                          (hidden, ids, logits, alpha, w, b, 1.0, 1e-5, None, out),
                          test_utils=("test_schema", "test_faketensor"))


# ---- bad inputs ---------------------------------------------------------------------------------

def _good():
    return dict(zip(["hidden", "layer_ids", "logits", "alpha", "ln_weight", "ln_bias"],
                    _inputs(5, 8, 16, 3, torch.float32, seed=0)))


@pytest.mark.parametrize("name,mutate,match", [
    ("layer_ids", lambda a: a.update(layer_ids=torch.tensor([0, 5, 1])), "layer_ids: index out of range"),
    ("layer_ids", lambda a: a.update(layer_ids=torch.tensor([0, -1, 1])), "layer_ids: index out of range"),
    ("layer_ids", lambda a: a.update(layer_ids=torch.tensor([0.0, 1.0, 2.0])), "layer_ids: expected an int32"),
    ("layer_ids", lambda a: a.update(layer_ids=torch.zeros(0, dtype=torch.long), logits=torch.zeros(8, 0),
                                     alpha=torch.zeros(0)), "layer_ids: expected between 1 and 16"),
    ("layer_ids", lambda a: a.update(layer_ids=torch.zeros(17, dtype=torch.long), logits=torch.zeros(8, 17),
                                     alpha=torch.zeros(17)), "layer_ids: expected between 1 and 16"),
    ("rows", lambda a: a.update(rows=torch.tensor([0, 8])), "rows: index out of range"),
    ("rows", lambda a: a.update(rows=torch.tensor([-1])), "rows: index out of range"),
    ("rows", lambda a: a.update(rows=torch.tensor([[0]])), "rows: expected 1 dimensions"),
    ("hidden", lambda a: a.update(hidden=a["hidden"][0]), "hidden: expected 3 dimensions"),
    ("hidden", lambda a: a.update(hidden=torch.ones(5, 8, 16, dtype=torch.int32)), "hidden: expected a floating"),
    ("logits", lambda a: a.update(logits=torch.zeros(8, 4)), r"logits: expected shape \(8, 3\)"),
    ("logits", lambda a: a.update(logits=torch.zeros(7, 3)), r"logits: expected shape \(8, 3\)"),
    ("logits", lambda a: a.update(logits=torch.zeros(8, 3, dtype=torch.int64)), "logits: expected a floating"),
    ("alpha", lambda a: a.update(alpha=torch.ones(2)), r"alpha: expected shape \(3,\)"),
    ("alpha", lambda a: a.update(alpha=torch.ones(3, dtype=torch.int32)), "alpha: expected a floating"),
    ("ln_weight", lambda a: a.update(ln_weight=torch.ones(15)), r"ln_weight: expected shape \(16,\)"),
    ("ln_bias", lambda a: a.update(ln_bias=torch.ones(16, 1)), "ln_bias: expected 1 dimensions"),
    ("ln_bias", lambda a: a.update(ln_bias=torch.ones(16, dtype=torch.int64)), "ln_bias: expected a floating"),
    ("logits", lambda a: a.update(logits=torch.zeros(8, 3, device="meta")), "logits: expected a tensor on cpu"),
    ("ln_weight", lambda a: a.update(ln_weight=torch.ones(16, device="meta")), "ln_weight: expected a tensor on cpu"),
    ("layer_ids", lambda a: a.update(layer_ids=torch.tensor([0, 1, 2], device="meta")), "layer_ids: expected a tensor on"),
    ("tau", lambda a: a.update(tau=0.0), "tau: expected a finite float > 0"),
    ("tau", lambda a: a.update(tau=math.inf), "tau: expected a finite float > 0"),
    ("eps", lambda a: a.update(eps=-1.0), "eps: expected a finite float >= 0"),
    ("out", lambda a: a.update(out=torch.empty(8, 15)), r"out: expected shape \(8, 16\)"),
    ("out", lambda a: a.update(out=torch.empty(8, 16, dtype=torch.float16)), "out: expected dtype"),
    ("out", lambda a: a.update(out=torch.empty(16, 8).t()), "out: expected a contiguous"),
    ("out", lambda a: a.update(out=a["hidden"][1]), "out: must not share memory with hidden"),
])
def test_route_layers_bad_inputs(name, mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        sk.route_layers(**args)


def test_route_layers_bad_input_types():
    a = _good()
    with pytest.raises(TypeError, match="layer_ids"):
        sk.route_layers(a["hidden"], "0,1,2", a["logits"], a["alpha"], a["ln_weight"], a["ln_bias"])
    with pytest.raises(TypeError, match="hidden"):
        sk.route_layers(a["hidden"].numpy(), a["layer_ids"], a["logits"], a["alpha"], a["ln_weight"], a["ln_bias"])
    with pytest.raises(TypeError, match="alpha: expected a"):
        sk.route_layers(a["hidden"], a["layer_ids"], a["logits"], None, a["ln_weight"], a["ln_bias"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, offset, strided", [(4096, 100.0, False), (8192, 100.0, True), (1024, 10.0, True),
                                                (3000, -300.0, False), (1536, 1000.0, False)])
def test_route_layers_rows_far_from_zero(backend, dtype, D, offset, strided):
    """Mixtures whose mean is far from zero (offset >> the spread): the mean must be exact enough
    that LayerNorm's centered values keep their few significant bits (an fp32 running sum of the row
    was 26x torch's error at D = 4096, offset 100). fp32: held to the accuracy rule against
    PyTorch's own fp32 computation; fp16 / bf16 inputs (computed in fp32 by every backend; PyTorch
    in their own dtype loses the whole spread here) to the fp64 result rounded to their dtype."""
    hidden, ids, logits, alpha, w, b = _inputs(4, 12, D, 3, torch.float32, seed=D)
    hidden = (hidden + offset).to(dtype)
    if strided:
        hidden = non_contiguous(hidden, 2)   # stride_d = 2: the twin's scalar loop
    with sk.backend(backend):
        y = sk.route_layers(hidden, ids, logits.to(dtype), alpha.to(dtype), w.to(dtype), b.to(dtype))
    want64 = _oracle(hidden, ids, logits.to(dtype), alpha.to(dtype), w.to(dtype), b.to(dtype), 1.0, 1e-5, None)
    if dtype != torch.float32:
        assert_close(y, want64.to(dtype))
        return
    base = ref.route_layers(hidden, ids, logits, alpha, w, b, compute_dtype=dtype)
    assert_close_fa(y, base, want64, name=f"route_layers offset {offset} D {D}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [7, 2048, 4099])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_route_layers_constant_rows_give_the_bias(backend, D, eps):
    """A row whose mixture is constant has variance 0: LayerNorm gives exactly the bias (the
    centered values are 0), also where an fp32 sum of the row misses the mean by a few ulps."""
    hidden, ids, logits, alpha, w, b = _inputs(3, 5, D, 2, torch.float32, seed=3)
    hidden = torch.full_like(hidden, 3.3) * torch.arange(1, 6).view(1, 5, 1)
    with sk.backend(backend):
        y = sk.route_layers(hidden, ids, logits, alpha, w, b, eps=eps)
    assert_close(y, b.expand(5, D), atol=1e-6, rtol=0)


def test_route_layers_cubins_vectorized_and_spill_free():
    from spar_kernels import inspect as sk_inspect

    if not _ext.has_cuda_extension() or sk_inspect.cuobjdump() is None:
        pytest.skip("needs the CUDA extension and cuobjdump")
    rows = sk_inspect.cuda_rows({"sm_80", "sm_90a"}, "route_layers")
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90a"}
    assert all(r["spill_bytes"] == 0 for r in rows), [r for r in rows if r["spill_bytes"]]
    vec = [r for r in rows if int(r["config"].split("<", 1)[1].rstrip(">").split(", ")[2]) > 1]
    assert len(vec) == len(rows) // 2 and all(r["ldg128"] for r in vec), [r["config"] for r in vec if not r["ldg128"]]


@pytest.mark.skipif(not __import__("spar_kernels")._ext.has_cuda_extension(), reason="no CUDA extension built")
def test_route_layers_on_a_simulated_gpu_no_sync_no_allocation():
    # list indices are copied from pinned memory without blocking; with out= the CUDA call allocates
    # nothing: absent LayerNorm parameters are not materialized and alpha is read in its own dtype
    from spar_kernels.testing import fake_cuda

    with fake_cuda() as rec:
        hidden = torch.randn(5, 37, 64, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(37, 3, device="cuda", dtype=torch.bfloat16)
        alpha = torch.ones(3, device="cuda", dtype=torch.bfloat16)
        w, b = torch.ones(64, device="cuda", dtype=torch.bfloat16), torch.zeros(64, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(2, 64, device="cuda", dtype=torch.bfloat16)
        lid, rows = torch.tensor([0, 2, 4], device="cuda"), torch.tensor([1, 2], device="cuda")
        with rec.region("lists"):
            y = sk.route_layers(hidden, [0, 2, 4], logits, alpha, w, b, rows=[1, 2])
        assert y.shape == (2, 64) and y.device == torch.device("cuda", 0)
        for name, (lw, lb) in {"none": (None, None), "params": (w, b)}.items():
            live = rec.live_bytes
            with rec.region(name):
                assert sk.route_layers(hidden, lid, logits, alpha, lw, lb, rows=rows, out=out) is out
            assert rec.stats(name).peak_bytes == live, f"{name}: the call allocated device memory"
    rec.assert_no_syncs("lists")
    assert rec.stats("lists").h2d_copies == 2
    assert dict(rec.backends["route_layers"]) == {"cuda": 3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps_over_var", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("D", [64, 1536])
def test_route_layers_eps_comparable_to_the_variance(backend, eps_over_var, D):
    # With eps far below the variance, rstd = 1/sqrt(v + eps) and a wrong 1/(sqrt(v) + eps) differ
    # by ~eps/(2v) * sqrt(v) relative: invisible at the default eps. Here eps ~ v, and the output
    # is held to the suite's own fp32 tolerance (spar_kernels.testing.TOLERANCES) against fp64.
    from spar_kernels.testing import tolerance

    hidden, ids, logits, alpha, w, b = _inputs(6, 40, D, 3, torch.float32, seed=21)
    hidden = hidden * 1e-2  # mixture variance ~ 1e-4
    h = hidden.double()[ids.long()]
    wts = torch.softmax(logits.double(), -1) * alpha.double()
    var = float(torch.einsum("nk,knd->nd", wts, h).var(-1, unbiased=False).mean())
    eps = eps_over_var * var
    with sk.backend(backend):
        y = sk.route_layers(hidden, ids, logits, alpha, w, b, eps=eps)
    assert_close(y, _oracle(hidden, ids, logits, alpha, w, b, 1.0, eps, None).float(), **tolerance(torch.float32))


def test_route_layers_eager_provider_matches_the_reference():
    """The benchmark's eager provider (ref.route_layers_eager, the PyTorch code the op is timed
    against) computes the op's function: a provider that drifted would make the bench compare
    against other work."""
    hidden, ids, logits, alpha, w, b = _inputs(6, 37, 96, 4, torch.float32, seed=11)
    got = ref.route_layers_eager(hidden, ids.tolist(), logits, alpha, w, b, tau=0.7, eps=1e-5)
    _check(got, hidden, ids, logits, alpha, w, b, 0.7, 1e-5, None)


def test_a_nan_variance_stays_nan():
    """Centred values beyond fp32's range make the LayerNorm variance inf - inf = NaN; the twin's
    clamp at 0 used to turn it into 0 (rstd = 1/sqrt(eps), the row +-inf) where the reference is NaN."""
    row = torch.tensor([3e38, -3e38, 3e38, -3e38, 3e38])
    D = row.numel()
    args = (row.view(1, 1, D), torch.tensor([0]), torch.zeros(1, 1), torch.ones(1), None,
            torch.arange(D, dtype=torch.float32))
    got = sk.route_layers(*args, eps=1e-5)
    with sk.backend("reference"):
        want = sk.route_layers(*args, eps=1e-5)
    assert torch.isnan(want).all()
    torch.testing.assert_close(got, want, equal_nan=True)
