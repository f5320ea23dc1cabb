"""Every public op on the simulated CUDA device (spar_kernels.testing.fake_cuda).

For each op and each dtype it supports: the outputs on fake CUDA inputs have the shape, dtype
and strides the op gives on real CPU tensors, live on cuda:0, the GPU backend ('triton' or
'cuda') was selected, and the call made no host sync. ``out=`` variants (with the documented
workspaces) write into the given buffers and allocate nothing; index lists and the other inputs
the docs promise not to sync on do not sync.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import spar_kernels as sk
from spar_kernels.testing import fake_cuda

CUDA0 = torch.device("cuda", 0)
GPU_BACKENDS = {"triton", "cuda"}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
F8 = torch.float8_e4m3fn
ROW_DTYPES = (torch.float32, torch.bfloat16, torch.int64, torch.uint8)  # element sizes 4, 2, 8, 1


def _rand(dev, *shape, dtype=torch.float32):
    t = torch.randn(*shape, device=dev)
    return t if dtype == torch.float32 else t.to(dtype)


def _ints(dev, values):
    return torch.tensor(values, dtype=torch.int64, device=dev)


def _layout(kind, dev):
    """A prefill layout (mixed causal/full segments, two sequences) or a decode-shaped one."""
    if kind == "prefill":
        return sk.AttentionLayout.from_segments([[("causal", 9), ("full", 7)], [("causal", 21)]], device=dev)
    if kind == "decode":  # one query per sequence against a long KV cache: split-KV partials
        return sk.AttentionLayout.from_segments([[("causal", 300)], [("causal", 517)], [("causal", 5)]],
                                                num_queries=1, device=dev)
    if kind == "decode4":  # a few queries per sequence (speculative / multi-token decode)
        return sk.AttentionLayout.from_segments([[("causal", 260)], [("causal", 130)]], num_queries=4,
                                                device=dev)
    return sk.AttentionLayout.cross([5, 11], [77, 20], device=dev)


def _attn_inputs(dev, dtype, kind, hq=4, hkv=2, d=64):
    lay = _layout(kind, dev)
    q = _rand(dev, lay.total_q, hq, d, dtype=dtype)
    k, v = _rand(dev, lay.total_k, hkv, d, dtype=dtype), _rand(dev, lay.total_k, hkv, d, dtype=dtype)
    descales = {}
    if dtype == F8:
        descales = {"q_descale": _rand(dev, hq).abs(), "k_descale": _rand(dev, hkv).abs(),
                    "v_descale": _rand(dev, 1).abs()}
    return lay, q, k, v, descales


# ---- the cases: case(dev, dtype) builds the inputs on dev and returns the call to check --------

def c_rms_norm(dev, dtype):
    x, w = _rand(dev, 3, 5, 96, dtype=dtype), _rand(dev, 96)
    return lambda: sk.rms_norm(x, w, 1e-6)


def c_rms_norm_residual(dev, dtype):
    x, r, w = _rand(dev, 7, 96, dtype=dtype), _rand(dev, 7, 96, dtype=dtype), _rand(dev, 96, dtype=dtype)
    return lambda: sk.rms_norm(x, w, 1e-6, r)


def c_rms_norm_strided(dev, dtype):
    x, w = _rand(dev, 96, 6, dtype=dtype).t(), _rand(dev, 96)  # [6, 96], inner stride 6
    r = _rand(dev, 6, 192, dtype=dtype)[:, ::2]
    return lambda: sk.rms_norm(x, w, 1e-6, r)


def c_quantize_token(dev, dtype):
    x = _rand(dev, 4, 6, 128, dtype=dtype)
    return lambda: sk.quantize_fp8(x, "token")


def c_quantize_tensor(dev, dtype):
    x = _rand(dev, 9, 80, dtype=dtype)
    return lambda: sk.quantize_fp8(x, "tensor")


def _c_attention(kind):
    def case(dev, dtype):
        lay, q, k, v, ds = _attn_inputs(dev, dtype, kind)
        return lambda: sk.hybrid_attention(q, k, v, lay, return_lse=dtype != F8, **ds)
    return case


def _c_varlen(kind):
    def case(dev, dtype):
        lay, q, k, v, ds = _attn_inputs(dev, dtype, kind)
        return lambda: sk.hybrid_attention_varlen(q, k, v, lay.cu_seqlens_q, lay.cu_seqlens_k, lay.kv_start,
                                                  lay.kv_end, lay.max_seqlen_q, lay.max_seqlen_k,
                                                  return_lse=True, **ds)
    return case


def c_attention_strided(dev, dtype):
    """q, k, v as head slices of one fused qkv projection (last dim contiguous, rows strided)."""
    lay = _layout("prefill", dev)
    qkv = _rand(dev, lay.total_q, 8, 32, dtype=dtype)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    return lambda: sk.hybrid_attention(q, k, v, lay)


def c_route_layers(dev, dtype):
    h = _rand(dev, 6, 10, 64, dtype=dtype)
    ids, logits, alpha = _ints(dev, [1, 3, 5]), _rand(dev, 10, 3), _rand(dev, 3)
    lw, lb = _rand(dev, 64), _rand(dev, 64)
    return lambda: sk.route_layers(h, ids, logits, alpha, lw, lb, tau=0.7)


def c_route_layers_rows(dev, dtype):
    h = _rand(dev, 10, 6, 64, dtype=dtype).transpose(0, 1)  # [6, 10, 64], layer-minor buffer
    ids, rows = _ints(dev, [0, 2, 4, 5]), _ints(dev, [9, 0, 0, 3])
    logits, alpha = _rand(dev, 4, 10).t(), _rand(dev, 4)
    return lambda: sk.route_layers(h, ids, logits, alpha, None, None, rows=rows)


def c_gather_rows(dev, dtype):
    x, idx = _rand(dev, 10, 3, 24, dtype=dtype), _ints(dev, [1, 3, 3, 9])
    return lambda: sk.gather_rows(x, idx)


def c_gather_rows_strided(dev, dtype):
    x, idx = _rand(dev, 10, 48, dtype=dtype)[:, ::2], _ints(dev, [0, 7])
    return lambda: sk.gather_rows(x, idx)


def c_scatter_rows(dev, dtype):
    x, idx, src = _rand(dev, 10, 40, dtype=dtype), _ints(dev, [2, 8]), _rand(dev, 2, 40, dtype=dtype)
    return lambda: sk.scatter_rows(x, idx, src)


def c_pack_sequences(dev, dtype):
    padded, lengths = _rand(dev, 3, 8, 2, 16, dtype=dtype), _ints(dev, [3, 8, 0])
    return lambda: sk.pack_sequences(padded, lengths, total=11)


def c_unpack_sequences(dev, dtype):
    packed, cu = _rand(dev, 13, 40, dtype=dtype), _ints(dev, [0, 3, 11, 12])
    return lambda: sk.unpack_sequences(packed, cu, 9, pad_value=1)


def c_split_by_expert(dev, dtype):
    x, ids = _rand(dev, 10, 64, dtype=dtype), _ints(dev, [0, 2, 0, 1, 1, 0, 2, 0, 1, 1])
    return lambda: sk.split_by_expert(x, ids, 3, counts=[4, 4, 2])


def c_split_by_expert_norm(dev, dtype):
    x, ids = _rand(dev, 16, 64, dtype=dtype)[:10], _ints(dev, [0, 1, 0, 1, 1, 0, 0, 0, 1, 1])
    w = _rand(dev, 2, 64)
    return lambda: sk.split_by_expert(x, ids, 2, w, counts=[5, 5])


def c_merge_experts(dev, dtype):
    perm = _ints(dev, [3, 0, 4, 1, 2])
    grouped = _rand(dev, 5, 2, 24, dtype=dtype)
    return lambda: sk.merge_experts(grouped, perm)


def c_linear_attention(dev, dtype):
    q, k = _rand(dev, 2, 20, 4, 32, dtype=dtype), _rand(dev, 2, 24, 4, 32, dtype=dtype)
    v = _rand(dev, 2, 24, 4, 48, dtype=dtype)
    return lambda: sk.linear_attention(q, k, v)


def c_linear_attention_strided(dev, dtype):
    qkv = _rand(dev, 2, 16, 3, 4, 32, dtype=dtype)  # a fused projection viewed per head
    return lambda: sk.linear_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])


def c_adaln_layernorm(dev, dtype):
    x, shift, scale = _rand(dev, 2, 16, 64, dtype=dtype), _rand(dev, 2, 64), _rand(dev, 2, 1, 64)
    return lambda: sk.adaln_layernorm(x, shift, scale, eps=1e-6)


def c_adaln_layernorm_strided(dev, dtype):
    x = _rand(dev, 2, 64, 16, dtype=dtype).transpose(1, 2)
    mod = _rand(dev, 2, 6, 64)
    return lambda: sk.adaln_layernorm(x, mod[:, 0], mod[:, 1], eps=1e-6)


def c_gated_residual(dev, dtype):
    x, y, gate = _rand(dev, 2, 16, 64, dtype=dtype), _rand(dev, 2, 16, 64, dtype=dtype), _rand(dev, 64)
    return lambda: sk.gated_residual(x, y, gate)


def c_dwconv_glu(dev, dtype):
    x, w, b = _rand(dev, 2, 20, 64, dtype=dtype), _rand(dev, 64, 1, 3, 3), _rand(dev, 64)
    return lambda: sk.dwconv_glu(x, w, b, 4, 5)


def c_dwconv_glu_strided(dev, dtype):
    x, w = _rand(dev, 2, 20, 96, dtype=dtype)[..., 16:80], _rand(dev, 64, 3, 3, dtype=dtype)
    return lambda: sk.dwconv_glu(x, w, None, 5, 4)


def _c_flow(method, layout):
    def case(dev, dtype):
        shape = {"nchw": (2, 4, 6, 6), "tokens": (2, 36, 16), "packed": (40, 16)}[layout]
        s = sk.FlowSampler(method, num_steps=3, guidance=4.0, image_guidance=1.5, renorm="global",
                           device=dev)
        x, vc, vu, vi = (_rand(dev, *shape, dtype=dtype) for _ in range(4))

        def call():  # two evaluations: the second reads the history of the first
            y = s.step(x, vc, vu, vi)
            return s.step(y, vc, vu, vi), s.current_timestep()
        return call
    return case


CASES = {
    "rms_norm": (c_rms_norm, FLOATS),
    "rms_norm_residual": (c_rms_norm_residual, FLOATS),
    "rms_norm_strided": (c_rms_norm_strided, FLOATS),
    "quantize_fp8_token": (c_quantize_token, FLOATS),
    "quantize_fp8_tensor": (c_quantize_tensor, FLOATS),
    **{f"hybrid_attention_{k}": (_c_attention(k), FLOATS + (F8,)) for k in ("prefill", "decode", "decode4", "cross")},
    **{f"hybrid_attention_varlen_{k}": (_c_varlen(k), FLOATS + (F8,)) for k in ("prefill", "decode")},
    "hybrid_attention_strided": (c_attention_strided, FLOATS),
    "route_layers": (c_route_layers, FLOATS + (torch.float64,)),
    "route_layers_rows": (c_route_layers_rows, FLOATS),
    "gather_rows": (c_gather_rows, ROW_DTYPES),
    "gather_rows_strided": (c_gather_rows_strided, ROW_DTYPES),
    "scatter_rows": (c_scatter_rows, ROW_DTYPES),
    "pack_sequences": (c_pack_sequences, ROW_DTYPES),
    "unpack_sequences": (c_unpack_sequences, ROW_DTYPES),
    "split_by_expert": (c_split_by_expert, ROW_DTYPES),
    "split_by_expert_norm": (c_split_by_expert_norm, FLOATS),
    "merge_experts": (c_merge_experts, ROW_DTYPES),
    "linear_attention": (c_linear_attention, FLOATS),
    "linear_attention_strided": (c_linear_attention_strided, FLOATS),
    "adaln_layernorm": (c_adaln_layernorm, FLOATS),
    "adaln_layernorm_strided": (c_adaln_layernorm_strided, FLOATS),
    "gated_residual": (c_gated_residual, FLOATS),
    "dwconv_glu": (c_dwconv_glu, FLOATS),
    "dwconv_glu_strided": (c_dwconv_glu_strided, FLOATS),
    **{f"flow_sampler_{m}_{lay}": (_c_flow(m, lay), FLOATS)
       for m in ("euler", "heun", "dpmsolver++2m") for lay in ("nchw", "tokens", "packed")},
}
PARAMS = [pytest.param(name, dt, id=f"{name}-{str(dt).removeprefix('torch.')}")
          for name, (_, dtypes) in CASES.items() for dt in dtypes]
SPAR_OPS = ("rms_norm", "quantize_fp8", "hybrid_attention", "route_layers", "gather_rows", "scatter_rows",
            "pack_sequences", "unpack_sequences", "split_by_expert", "merge_experts", "linear_attention",
            "adaln_layernorm", "gated_residual", "dwconv_glu")


def _op_name(case: str) -> str:  # the spar op a case runs (its name in rec.backends)
    return "flow_sampler_step" if case.startswith("flow_sampler") else next(o for o in SPAR_OPS if case.startswith(o))


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_op_on_fake_cuda_matches_cpu(case, dtype):
    make, _ = CASES[case]
    torch.manual_seed(0)
    want = _tensors(make(torch.device("cpu"), dtype)())
    with fake_cuda() as rec:
        call = make("cuda", dtype)
        with rec.region("op") as op:
            got = _tensors(call())
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert isinstance(g, FakeTensor) and g.device == CUDA0, f"output {i}: {type(g).__name__} on {g.device}"
        assert (g.shape, g.dtype, g.stride()) == (w.shape, w.dtype, w.stride()), f"output {i}"
    backends = op.backends[_op_name(case)]
    assert backends and set(backends) <= GPU_BACKENDS, dict(op.backends)
    rec.assert_no_syncs(region="op")


# ---- index lists and the other documented sync-free inputs --------------------------------------

def _list_calls(dev):
    """Ops given Python index lists (the docs: no host sync; a GPU needs them as device tensors)."""
    x, src = _rand(dev, 10, 32, dtype=torch.bfloat16), _rand(dev, 2, 32, dtype=torch.bfloat16)
    h, logits, alpha = _rand(dev, 6, 10, 32), _rand(dev, 10, 3), _rand(dev, 3)
    padded, packed = _rand(dev, 2, 8, 32), _rand(dev, 11, 32)
    return {
        "gather_rows": lambda: sk.gather_rows(x, [1, 3, 3]),
        "scatter_rows": lambda: sk.scatter_rows(x, [2, 7], src),
        "route_layers": lambda: sk.route_layers(h, [1, 3, 5], logits, alpha, None, None, rows=[0, 4, 4]),
        "pack_sequences": lambda: sk.pack_sequences(padded, [3, 8]),
        "unpack_sequences": lambda: sk.unpack_sequences(packed, [0, 3, 11], 8),
        "split_by_expert": lambda: sk.split_by_expert(x, [0, 1, 0, 1, 1, 0, 0, 0, 1, 1], 2, counts=[5, 5]),
    }


@pytest.mark.parametrize("op", list(_list_calls("cpu")))
def test_index_lists_do_not_sync(op):
    with fake_cuda() as rec:
        call = _list_calls("cuda")[op]
        with rec.region("op") as region:
            out = call()
    assert all(t.device == CUDA0 for t in _tensors(out))
    assert region.h2d_copies >= 1  # the list reached the device ...
    rec.assert_no_syncs(region="op")  # ... without the host waiting (pinned, non_blocking)


def test_documented_syncs_and_their_avoidance():
    with fake_cuda() as rec:
        padded, lengths = _rand("cuda", 2, 8, 32), _ints("cuda", [3, 8])
        x, ids = _rand("cuda", 10, 32), _ints("cuda", [0, 1, 0, 1, 1, 0, 0, 0, 1, 1])
        with rec.region("pack without total"):
            sk.pack_sequences(padded, lengths)  # the one documented sync: sum(lengths) on the host
        with rec.region("pack with total"):
            sk.pack_sequences(padded, lengths, total=11)
        with rec.region("pack into out"):
            sk.pack_sequences(padded, lengths, out=torch.empty(11, 32, device="cuda"))
        with rec.region("split, counts unknown"):
            split = sk.split_by_expert(x, ids, 2)
        with rec.region("expert rows, counts unknown"):
            split.expert(1)  # reads the offsets on the host (documented)
        with rec.region("split, counts known"):
            known = sk.split_by_expert(x, ids, 2, counts=[5, 5])
            rows = known.expert(1)
    assert len(rec.regions["pack without total"].syncs) == 1
    assert len(rec.regions["expert rows, counts unknown"].syncs) == 1
    for region in ("pack with total", "pack into out", "split, counts unknown", "split, counts known"):
        rec.assert_no_syncs(region=region)
    assert split.counts is None and known.counts == (5, 5) and rows.shape == (5, 32)


def test_flow_sampler_steps_and_lookups_do_not_sync():
    with fake_cuda() as rec:
        for method in ("euler", "heun", "dpmsolver++2m"):
            s = sk.FlowSampler(method, num_steps=2, guidance=3.0, guidance_interval=(0.5, 1.0),
                               renorm="channel", device="cuda")
            x = _rand("cuda", 1, 16, 8, dtype=torch.bfloat16)
            v = [_rand("cuda", 1, 16, 8, dtype=torch.bfloat16) for _ in range(2)]
            with rec.region("loop"):
                for _ in range(s.num_evals):
                    t = s.current_timestep()
                    x = s.step(x, *v, out=x)
                s.reset()
            assert x.device == CUDA0 and t.device == CUDA0
    assert rec.regions["loop"].backends["flow_sampler_step"]["cuda"] == 2 + 3 + 2
    rec.assert_no_syncs(region="loop")


# ---- out= variants allocate nothing beyond the documented workspaces -----------------------------

def _out_cases(dev, only: str | None = None):
    """name -> (call, buffers the call must return): inputs, outputs and workspaces made up front
    (only the cases of the op ``only`` names, when given)."""
    bf = torch.bfloat16
    e = lambda *shape, dtype=bf: torch.empty(shape, dtype=dtype, device=dev)  # noqa: E731
    need = lambda *ops: only is None or only.startswith(ops)  # noqa: E731
    cases = {}

    if need("rms_norm"):
        x, w, r = _rand(dev, 7, 96, dtype=bf), _rand(dev, 96), _rand(dev, 7, 96, dtype=bf)
        y = e(7, 96)
        cases["rms_norm"] = (lambda: sk.rms_norm(x, w, 1e-6, out=y), [y])
        cases["rms_norm_residual_in_place"] = (lambda: sk.rms_norm(x, w, 1e-6, r, out=y, residual_out=r), [y, r])

    if need("quantize_fp8"):
        xq = _rand(dev, 9, 128, dtype=bf)
        qt, st = e(9, 128, dtype=F8), e(9, 1, dtype=torch.float32)
        cases["quantize_fp8_token"] = (lambda: sk.quantize_fp8(xq, "token", out=(qt, st)), [qt, st])
        q2, s2, ws1 = e(9, 128, dtype=F8), e(dtype=torch.float32), e(1, dtype=torch.float32)
        cases["quantize_fp8_tensor"] = (lambda: sk.quantize_fp8(xq, "tensor", out=(q2, s2), workspace=ws1), [q2, s2])

    if need("hybrid_attention"):
        for kind in ("prefill", "decode"):
            for dt in (bf, F8):
                lay, q, k, v, ds = _attn_inputs(dev, dt, kind)
                o, lse = e(*q.shape, dtype=bf), e(q.shape[1], q.shape[0], dtype=torch.float32)
                ws = sk.hybrid_attention_workspace(q, k, lay)
                cases[f"hybrid_attention_{kind}_{str(dt)[6:]}"] = (
                    lambda q=q, k=k, v=v, lay=lay, o=o, lse=lse, ws=ws, ds=ds:
                    sk.hybrid_attention(q, k, v, lay, out=o, out_lse=lse, workspace=ws, **ds), [o, lse])
        lay, q, k, v, _ = _attn_inputs(dev, bf, "decode")
        o = e(*q.shape)
        ws = sk.hybrid_attention_workspace(q, k, batch_size=lay.batch_size, max_seqlen_q=lay.max_seqlen_q,
                                           max_seqlen_k=lay.max_seqlen_k)
        cases["hybrid_attention_varlen_decode_no_lse"] = (
            lambda: sk.hybrid_attention_varlen(q, k, v, lay.cu_seqlens_q, lay.cu_seqlens_k, lay.kv_start, lay.kv_end,
                                               lay.max_seqlen_q, lay.max_seqlen_k, out=o, workspace=ws), [o])

    if need("linear_attention"):
        lq, lk = _rand(dev, 2, 20, 4, 32, dtype=bf), _rand(dev, 2, 24, 4, 32, dtype=bf)
        lv = _rand(dev, 2, 24, 4, 48, dtype=bf)
        lo, lws = e(2, 20, 4, 48), sk.linear_attention_workspace(lq, lk, lv)
        cases["linear_attention"] = (lambda: sk.linear_attention(lq, lk, lv, out=lo, workspace=lws), [lo])

    if need("route_layers"):
        h, ids, rows = _rand(dev, 6, 10, 64, dtype=bf), _ints(dev, [1, 3, 5]), _ints(dev, [9, 0, 2])
        logits, alpha = _rand(dev, 10, 3, dtype=bf), _rand(dev, 3, dtype=bf)
        lw, lb, ro = _rand(dev, 64, dtype=bf), _rand(dev, 64, dtype=bf), e(3, 64)
        cases["route_layers"] = (lambda: sk.route_layers(h, ids, logits, alpha, lw, lb, rows=rows, out=ro), [ro])
        cases["route_layers_default_ln"] = (
            lambda: sk.route_layers(h, ids, logits, alpha, None, None, rows=rows, out=ro), [ro])

    if need("gather_rows", "scatter_rows"):
        xr, idx, go = _rand(dev, 10, 3, 24, dtype=bf), _ints(dev, [1, 3, 3, 9]), e(4, 3, 24)
        cases["gather_rows"] = (lambda: sk.gather_rows(xr, idx, out=go), [go])
        src = _rand(dev, 4, 3, 24, dtype=bf)
        cases["scatter_rows"] = (lambda: sk.scatter_rows(xr, idx[:2], src[:2]), [xr])

    if need("pack_sequences"):
        padded, lengths, po = _rand(dev, 3, 8, 16, dtype=bf), _ints(dev, [3, 8, 0]), e(11, 16)
        cu_ws = e(4, dtype=torch.int64)
        cases["pack_sequences"] = (lambda: sk.pack_sequences(padded, lengths, out=po, workspace=cu_ws), [po])

    if need("unpack_sequences"):
        packed, cu, uo = _rand(dev, 13, 40, dtype=bf), _ints(dev, [0, 3, 11, 12]), e(3, 9, 40)
        cases["unpack_sequences"] = (lambda: sk.unpack_sequences(packed, cu, 9, pad_value=1, out=uo), [uo])

    if need("split_by_expert"):
        xe, eids = _rand(dev, 10, 64, dtype=bf), _ints(dev, [0, 1, 0, 1, 1, 0, 0, 0, 1, 1])
        ew, so = _rand(dev, 2, 64), e(10, 64)
        # offsets and perm are outputs of their own (allowed: they are returned)
        sws = sk.split_by_expert_workspace(xe, 2)
        cases["split_by_expert"] = (lambda: sk.split_by_expert(xe, eids, 2, ew, counts=[5, 5], out=so, workspace=sws),
                                    [so])

    if need("merge_experts"):
        perm, grouped, mo = _ints(dev, [3, 0, 4, 1, 2]), _rand(dev, 5, 2, 24, dtype=bf), e(5, 2, 24)
        cases["merge_experts"] = (lambda: sk.merge_experts(grouped, perm, out=mo), [mo])

    if need("adaln_layernorm", "gated_residual"):
        xa, sh, sc, ao = _rand(dev, 2, 16, 64, dtype=bf), _rand(dev, 2, 64), _rand(dev, 2, 64), e(2, 16, 64)
        cases["adaln_layernorm"] = (lambda: sk.adaln_layernorm(xa, sh, sc, eps=1e-6, out=ao), [ao])
        yg, gate = _rand(dev, 2, 16, 64, dtype=bf), _rand(dev, 2, 1, 64)
        cases["gated_residual"] = (lambda: sk.gated_residual(xa, yg, gate, out=ao), [ao])
        cases["gated_residual_in_place"] = (lambda: sk.gated_residual(xa, yg, gate, out=xa), [xa])

    if need("dwconv_glu"):
        xd, wd, bd, do = _rand(dev, 2, 20, 64, dtype=bf), _rand(dev, 64, 1, 3, 3), _rand(dev, 64), e(2, 20, 32)
        cases["dwconv_glu"] = (lambda: sk.dwconv_glu(xd, wd, bd, 4, 5, out=do), [do])

    if need("flow_sampler"):
        for method in ("euler", "heun", "dpmsolver++2m"):
            s = sk.FlowSampler(method, num_steps=3, guidance=4.0, renorm="global", device=dev)
            xs, vc, vu = (_rand(dev, 2, 4, 6, 6, dtype=bf) for _ in range(3))
            s.step(xs, vc, vu, out=xs)  # the first step allocates the solver's state (history, stats)
            cases[f"flow_sampler_{method}"] = (lambda s=s, xs=xs, vc=vc, vu=vu: s.step(xs, vc, vu, out=xs), [xs])

    return cases


OUT_CASES = ["rms_norm", "rms_norm_residual_in_place", "quantize_fp8_token", "quantize_fp8_tensor",
             "hybrid_attention_prefill_bfloat16", "hybrid_attention_prefill_float8_e4m3fn",
             "hybrid_attention_decode_bfloat16", "hybrid_attention_decode_float8_e4m3fn",
             "hybrid_attention_varlen_decode_no_lse", "linear_attention", "route_layers", "route_layers_default_ln",
             "gather_rows", "scatter_rows", "pack_sequences", "unpack_sequences", "split_by_expert",
             "merge_experts", "adaln_layernorm", "gated_residual", "gated_residual_in_place", "dwconv_glu",
             "flow_sampler_euler", "flow_sampler_heun", "flow_sampler_dpmsolver++2m"]
# what still allocates despite out= / workspace= (issue 10: "out= variants allocate nothing
# beyond documented workspaces"); neither is in defect 8's list
NOT_YET: dict[str, str] = {}  # op -> why its out= variant still allocates (none today)


def test_out_cases_are_listed():
    with fake_cuda():
        assert sorted(_out_cases("cuda")) == sorted(OUT_CASES)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=NOT_YET[c]))
                                  if c in NOT_YET else c for c in OUT_CASES])
def test_out_variants_allocate_nothing(case):
    with fake_cuda() as rec:
        call, buffers = _out_cases("cuda", only=case)[case]
        live = rec.live_bytes
        with rec.region("op") as region:
            result = call()
        extra = 0
        if isinstance(result, sk.ExpertSplit):  # offsets and perm are outputs of their own
            extra = sum(t.untyped_storage().nbytes() for t in (result.offsets, result.perm))
            result = result.rows
        got = _tensors(result)
        assert len(got) == len(buffers) and all(g is b for g, b in zip(got, buffers)), \
            f"{case}: the call must return the given buffers"
        assert set(region.backends[_op_name(case)]) <= GPU_BACKENDS, dict(region.backends)
        assert region.peak_bytes - live == extra, \
            f"{case}: allocated {region.peak_bytes - live} bytes besides its outputs"
        rec.assert_no_syncs(region="op")
