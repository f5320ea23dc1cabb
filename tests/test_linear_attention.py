import pytest
import torch

import spar_kernels as sk
from spar_kernels.reference import linear_attention as ref
from spar_kernels.testing import assert_close_fa, non_contiguous, poisoned_empty

from conftest import requires_triton

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
          (2, 19, 19, 1, 112, 112), (2, 7, 45, 2, 24, 40), (1, 130, 130, 2, 16, 16)]


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_attention_empty(backend):
    q, k, v = _inputs(2, 0, 5, 2, 32, 32, torch.float32)
    with sk.backend(backend):
        assert sk.linear_attention(q, k, v).shape == (2, 0, 2, 32)
    q, k, v = _inputs(2, 6, 0, 2, 32, 32, torch.float32)  # no keys: state 0, output 0
    with sk.backend(backend):
        got = sk.linear_attention(q, k, v)
    assert torch.equal(got, torch.zeros(2, 6, 2, 32))


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
    torch.library.opcheck(torch.ops.spar.linear_attention.default, (q, k, v, 1e-15, out))


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
