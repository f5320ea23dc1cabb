"""The foundation itself: dispatch, the testing helpers, imports without a GPU, the bench harness."""

import os
import subprocess
import sys

import pytest
import torch

import spar_kernels as sk
from spar_kernels import testing

from conftest import record_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, env_extra=None, drop=("TRITON_INTERPRET",)):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    p = _run("import torch, spar_kernels as sk\n"
             "with sk.backend('triton'):\n"
             "    sk.rms_norm(torch.randn(2, 8), torch.ones(8))\n")
    assert p.returncode != 0
    assert "BackendUnavailableError" in p.stderr and "TRITON_INTERPRET=1" in p.stderr


def test_import_without_gpu_and_auto_dispatch_on_cpu():
    p = _run("import torch, spar_kernels as sk\n"
             "assert not torch.cuda.is_available()\n"
             "y = sk.rms_norm(torch.randn(3, 8), torch.ones(8))\n"
             "q, s = sk.quantize_fp8(torch.randn(3, 8))\n"
             "print(sk.build_info())\n", env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr
    assert "cpu_extension" in p.stdout


def test_backend_context_nests_and_restores():
    assert sk.current_backend() == "auto"
    with sk.backend("reference"):
        with sk.backend("cpu"):
            assert sk.current_backend() == "cpu"
        assert sk.current_backend() == "reference"
    assert sk.current_backend() == "auto"
    with pytest.raises(RuntimeError):
        with sk.backend("cpu"):
            raise RuntimeError("boom")
    assert sk.current_backend() == "auto"


def test_assert_close_fa_catches_a_wrong_kernel():
    ref = torch.randn(64, 64, dtype=torch.float64)
    base = ref.to(torch.bfloat16)
    testing.assert_close_fa(base.clone(), base, ref)  # as good as torch: passes
    bad = base.clone()
    bad[3, 5] += 0.5
    with pytest.raises(AssertionError, match=r"at \(3, 5\)"):
        testing.assert_close_fa(bad, base, ref)
    nan = base.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN: 1"):
        testing.assert_close_fa(nan, base, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_assert_close_fa_catches_a_wrong_reference(dtype):
    """A reference computing other math: the kernel and torch's baseline miss it alike, so the
    rule alone would pass; the baseline's own distance to the reference fails the call."""
    x = torch.randn(256, dtype=torch.float64)
    good, wrong = torch.sigmoid(x) * x, x / torch.sigmoid(x)       # silu and a wrong oracle
    base = (torch.sigmoid(x.to(dtype)) * x.to(dtype))
    testing.assert_close_fa(base.clone(), base, good)
    with pytest.raises(AssertionError, match="compute different things"):
        testing.assert_close_fa(base.clone(), base, wrong)
    # a baseline a few percent off (low-precision roundings through a whole model) is within it
    off = (good * 1.03).to(dtype)
    testing.assert_close_fa(off.clone(), off, good)
    with pytest.raises(AssertionError, match="compute different things"):
        testing.assert_close_fa(off.clone(), off, good, baseline_rtol=0.01)


def test_assert_close_and_report():
    a = torch.zeros(4, 4)
    testing.assert_close(a, a.clone())
    b = a.clone()
    b[1, 2] = float("inf")
    with pytest.raises(AssertionError, match="inf: 1"):
        testing.assert_close(b, a)
    with pytest.raises(AssertionError, match="shape"):
        testing.assert_close(a, torch.zeros(4, 5))
    inf = torch.tensor([float("inf"), 1.0])
    testing.assert_close(inf, inf.clone())  # matching infinities are equal


def test_poison_and_non_contiguous():
    t = torch.empty(3, 4)
    testing.poison(t)
    assert torch.isnan(t).all()
    q = torch.empty(5, dtype=torch.float8_e4m3fn)
    testing.poison(q)
    assert torch.isnan(q.float()).all()
    i = torch.empty(3, dtype=torch.int32)
    testing.poison(i)
    assert (i == -0x7FFFFFFF).all()
    x = torch.randn(5, 6)
    v = testing.non_contiguous(x, 1)
    assert not v.is_contiguous() and torch.equal(v, x)


def test_fp64_helper_upcasts_only_floats():
    seen = {}

    def f(a, idx, *, b):
        seen.update(a=a.dtype, idx=idx.dtype, b=b.dtype)
        return a

    testing.fp64(f, torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.int64), b=torch.ones(1))
    assert seen == {"a": torch.float64, "idx": torch.int64, "b": torch.float64}


def test_tolerance_table_covers_claimed_dtypes():
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        tol = testing.tolerance(dt)
        assert tol["atol"] > 0 and tol["rtol"] > 0


def test_bench_quick_runs_and_writes_reports(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--only", "rms_norm",
                        "--max-cases", "1", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| rms_norm |" in p.stdout and "CPU" in p.stdout
    files = os.listdir(tmp_path)
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".md") for f in files)


def test_time_interleaved_round_robin_warmup_rotation_and_calibration():
    from bench.harness import time_interleaved

    now, order = [0.0], []

    def provider(name, cost):
        def call():
            order.append(name)
            now[0] += cost
            return name + str(len(order))
        return call

    fns = {"a": provider("a", 1.0), "b": provider("b", 3.0)}
    t = time_interleaved(fns, 3, warmup=2, clock=lambda: now[0])
    assert order == ["a", "b"] * 5                      # 2 warm-up rounds, then 3 timed, in turn
    assert t.samples == {"a": [1.0] * 3, "b": [3.0] * 3} and t.median() == {"a": 1.0, "b": 3.0}
    assert t.last == {"a": "a9", "b": "b10"} and t.calls == {"a": 1, "b": 1}
    order.clear()
    time_interleaved(fns, 3, warmup=0, clock=lambda: now[0], rotate=True)
    assert order == ["a", "b", "b", "a", "a", "b"]
    order.clear()
    t = time_interleaved(fns, 2, warmup=0, clock=lambda: now[0], budget_s=6.0)
    assert t.calls == {"a": 6, "b": 2}                  # blocks of about 6 s each
    assert order[-16:] == ["a"] * 6 + ["b"] * 2 + ["a"] * 6 + ["b"] * 2
    assert t.samples == {"a": [1.0, 1.0], "b": [3.0, 3.0]}
    with pytest.raises(ValueError, match="reps"):
        time_interleaved(fns, 0)
    with pytest.raises(ValueError, match="clock"):
        time_interleaved(fns, 1, clock="gpu")
    with pytest.raises(ValueError, match="budget_s"):
        time_interleaved(fns, 1, budget_s=0)


def test_interleaved_copy_and_matmul_ceilings_and_roofline():
    """bench.interleaved: the copy and matmul rows, % of copy and % of roofline from them, the
    bound each case falls on, and which rows get which columns (fake clock and ceilings)."""
    from bench.harness import Case
    from bench.interleaved import markdown, roofline, run

    assert roofline(100, 2.0, 1.0, 100) == (2.0, "memory")       # 100 FLOPs take 1 s < copy 2 s
    assert roofline(600, 2.0, 1.0, 100) == (6.0, "compute")      # 600 FLOPs at 100 FLOP/s
    for bad in [(0, 1.0, 1.0, 1), (1, 0.0, 1.0, 1), (1, 1.0, -1.0, 1), (1, 1.0, 1.0, 0)]:
        with pytest.raises(ValueError, match="roofline"):
            roofline(*bad)

    now = [0.0]

    def costs(*seq):  # a provider whose successive calls take these times (then the last one)
        it = iter(seq)
        last = [seq[-1]]

        def factory():
            def call():
                now[0] += next(it, last[0])
            return call
        return factory

    built = []

    def copy(nbytes):
        built.append(("copy", nbytes))
        return costs(4.0)

    def matmul():  # 100 FLOPs a call; its fastest call (1 s) sets the rate, not its median (2 s)
        return costs(9.0, 2.0, 1.0, 2.0, 2.0), 100

    cases = [Case(op="x", name="mem", providers={"spar": costs(8.0), "eager": costs(16.0)}, bytes=400,
                  flops=200, baseline="eager"),
             Case(op="x", name="fma", providers={"spar": costs(10.0), "eager": costs(40.0)}, bytes=400,
                  flops=500, baseline="eager"),
             Case(op="x", name="bytes only", providers={"spar": costs(8.0)}, bytes=400),
             Case(op="x", name="neither", providers={"spar": costs(8.0)}),
             Case(op="x", name="setup", providers={"spar": costs(8.0), "eager": costs(16.0), "mask": costs(2.0)},
                  bytes=400, flops=200, baseline="eager", setup=("mask",))]
    rows = run(cases, 4, clock=lambda: now[0], copy=copy, matmul=matmul)
    by = {(r["case"], r["provider"]): r for r in rows}
    assert built == [("copy", 400)] * 4
    # a setup step's row (a mask's creation) has its time only: no rates, ratios or ceilings
    mask = by[("setup", "mask")]
    assert mask["median_us"] == pytest.approx(2e6)
    assert all(mask[c] is None for c in ("gbps", "gflops", "speedup", "pct_copy", "pct_roof")), mask
    assert by[("setup", "spar")]["speedup"] == pytest.approx(2.0)
    assert sorted(p for c, p in by if c == "mem") == ["copy", "eager", "matmul", "spar"]
    assert sorted(p for c, p in by if c == "bytes only") == ["copy", "spar"]
    assert [p for c, p in by if c == "neither"] == ["spar"]
    mem, fma = by[("mem", "spar")], by[("fma", "spar")]
    # mem: compute 200 FLOPs at 100 FLOP/s = 2 s < copy 4 s: memory-bound, roofline 4 s
    assert mem["bound"] == "memory" and mem["pct_roof"] == pytest.approx(50.0)
    assert mem["pct_copy"] == pytest.approx(50.0) and mem["speedup"] == pytest.approx(2.0)
    assert mem["gbps"] == pytest.approx(400 / 8.0 / 1e9) and mem["gflops"] == pytest.approx(200 / 8.0 / 1e9)
    # fma: 500 FLOPs = 5 s > copy 4 s: compute-bound, roofline 5 s
    assert fma["bound"] == "compute" and fma["pct_roof"] == pytest.approx(50.0)
    assert fma["pct_copy"] == pytest.approx(40.0) and by[("fma", "eager")]["pct_roof"] == pytest.approx(12.5)
    mm = by[("mem", "matmul")]
    assert mm["gflops"] == pytest.approx(100 / 2.0 / 1e9) and mm["speedup"] is None and mm["gbps"] is None
    assert mm["pct_copy"] is None and mm["pct_roof"] is None
    assert by[("mem", "copy")]["pct_copy"] is None and by[("mem", "copy")]["pct_roof"] is None
    assert by[("bytes only", "spar")]["pct_copy"] == pytest.approx(50.0)
    assert by[("bytes only", "spar")]["pct_roof"] is None
    table = markdown(rows)
    assert "| mem | spar | 8000000.0 [8000000.0] |" in table and "| 50% | 50% (memory) |" in table
    assert "| 40% | 50% (compute) |" in table
    with pytest.raises(ValueError, match="reserved"):
        run([Case(op="x", name="clash", providers={"copy": costs(1.0)}, bytes=4)], 1, clock=lambda: now[0],
            copy=copy, matmul=matmul)


# ---------------------------------------------------------------------------------------------
# the build and the op-definition helper (spar_kernels/_op.py)

def test_every_compiled_symbol_is_built():
    """A missing extension or twin symbol must fail here, never fall back silently."""
    from spar_kernels import _ext

    assert _ext.has_cpu_extension(), f"spar_kernels._C_cpu did not import: {_ext._load('_C_cpu')[1]}"
    missing = [n for n in _ext.CPU_TWINS if not hasattr(_ext.cpu_ext(), n)]
    assert not missing, f"_C_cpu lacks {missing}"
    for name in _ext.CPU_TWINS:
        assert callable(_ext.cpu_twin(name))
    with pytest.raises(RuntimeError, match="no 'not_a_twin'"):
        _ext.cpu_twin("not_a_twin")
    import shutil

    if os.environ.get("CI") and shutil.which("nvcc") and os.environ.get("SPAR_BUILD_CUDA", "auto") != "0":
        assert _ext.has_cuda_extension(), f"nvcc is here but _C_cuda did not build: {_ext.cuda_extension_error()}"
    if _ext.has_cuda_extension():
        missing = [n for n in _ext.CUDA_KERNELS if not hasattr(_ext.cuda_ext(), n)]
        assert not missing, f"_C_cuda lacks {missing}"


def test_every_op_is_defined_with_the_helper_and_has_a_cpu_path():
    from spar_kernels import _op

    names = set(dir(torch.ops.spar))
    assert {"rms_norm", "quantize_fp8", "hybrid_attention", "route_layers", "flow_sampler_step",
            "linear_attention", "adaln_layernorm", "gated_residual", "dwconv_glu", "gather_rows",
            "scatter_rows", "pack_sequences", "unpack_sequences", "split_by_expert", "merge_experts"} <= names
    defined = list(_op.REGISTRY.values())
    assert {op.name for op in defined} >= {"rms_norm", "hybrid_attention", "flow_sampler_step", "dwconv_glu"}
    for op in defined:
        assert "cpu" in op.impls and "reference" in op.impls, op.name
        assert op.backend_for(torch.device("cpu")) == "cpu", op.name


def test_eager_calls_skip_the_dispatcher_and_traced_calls_go_through_it():
    from spar_kernels import _op

    x, w = torch.randn(3, 16), torch.randn(16)
    assert not _op.is_tracing(x)
    with record_ops() as rec:
        assert _op.is_tracing(x)
        y = sk.rms_norm(x, w, 1e-6)
    assert any("spar.rms_norm" in n for n in rec.ops), rec.ops
    torch.testing.assert_close(y, sk.reference.rms_norm.rms_norm(x, w, 1e-6))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        assert _op.is_tracing(fx)
    # the default fake reports the backend a real run would select
    seen = []
    with _op.on_fake_dispatch(lambda *a: seen.append(a)), FakeTensorMode():
        sk.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6)
    assert seen and seen[0][:2] == ("rms_norm", "cpu")


def test_inputs_that_require_grad_give_outputs_without_grad_and_one_warning():
    """Ops have no backward: with grad mode on and an input that requires grad, the eager fast path
    records nothing (as through the dispatcher), so the outputs do not require grad, the values
    are the same, and one warning per op says so. The attention chunked path is built from torch
    ops: before, it recorded a graph that its in-place writes broke at backward."""
    import warnings

    from spar_kernels import _op

    lay = sk.AttentionLayout.from_segments([[("causal", 100), ("full", 200)]])
    q, k, v = (torch.randn(300, 2, 32) for _ in range(3))
    x, w = torch.randn(4, 64), torch.rand(64) + 0.5
    want_o, want_y = sk.hybrid_attention(q, k, v, lay), sk.rms_norm(x, w)
    for name in ("hybrid_attention", "rms_norm"):
        _op.REGISTRY[name]._warned_grad = False
    qg, wg = q.clone().requires_grad_(), w.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [(sk.hybrid_attention(qg, k, v, lay), sk.rms_norm(x, wg)) for _ in range(2)]
    msgs = [str(c.message) for c in caught if "has no backward" in str(c.message)]
    assert sorted(m.split()[1] for m in msgs) == ["hybrid_attention", "rms_norm"], msgs
    for o, y in outs:
        assert not o.requires_grad and not y.requires_grad
        torch.testing.assert_close(o, want_o, rtol=0, atol=0)
        torch.testing.assert_close(y, want_y, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="does not require grad"):
        outs[0][0].sum().backward()
    # no warning without grad mode, and none for inputs that do not require grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _op.REGISTRY["rms_norm"]._warned_grad = False
        with torch.no_grad():
            sk.rms_norm(x, wg)
        sk.rms_norm(x, w)


def test_eager_ops_bump_the_versions_of_what_they_write():
    """Backends write through pointers; the eager path bumps the version counters of the op's
    outputs as the dispatcher's ADInplaceOrView kernel does (and only those)."""
    x, w = torch.randn(4, 64), torch.rand(64) + 0.5
    out, res, res_out = torch.empty(4, 64), torch.randn(4, 64), torch.empty(4, 64)
    vx, vw, vo, vr, vro = x._version, w._version, out._version, res._version, res_out._version
    sk.rms_norm(x, w, 1e-6, residual=res, out=out, residual_out=res_out)
    assert (x._version, w._version, res._version) == (vx, vw, vr)
    assert out._version > vo and res_out._version > vro


def test_out_buffers_on_meta_are_not_taken_for_overlapping():
    """Meta tensors have no memory (every data_ptr is 0): calls with out= on meta run the fake, as
    calls without out= do, instead of reporting shared memory."""
    M = "meta"
    sk.quantize_fp8(torch.empty(4, 32, device=M), "token",
                    (torch.empty(4, 32, dtype=torch.float8_e4m3fn, device=M), torch.empty(4, 1, device=M)))
    sk.gather_rows(torch.empty(6, 5, device=M), torch.tensor([1, 0], device=M), out=torch.empty(2, 5, device=M))
    sk.dwconv_glu(torch.empty(1, 12, 16, device=M), torch.empty(16, 3, 3, device=M), None, 3, 4,
                  out=torch.empty(1, 12, 8, device=M))


def test_value_checks_step_aside_under_fake_tracing():
    """The host-side value checks (index ranges, expert counts, attention intervals) read CPU
    values; under make_fx's fake tracing (as under torch.compile) there are none, and each call
    traces to its one spar op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, idx = torch.randn(6, 5), torch.tensor([1, 0, 5])
    q, k, v = torch.randn(8, 2, 32), torch.randn(8, 1, 32), torch.randn(8, 1, 32)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    st, en = torch.zeros(8, dtype=torch.int32), torch.arange(1, 9, dtype=torch.int32)
    cases = {
        "gather_rows": (lambda x, i: sk.gather_rows(x, i), (x, idx)),
        "split_by_expert": (lambda x, i: sk.split_by_expert(x, i, 2).rows, (x, torch.tensor([1, 0, 1, 1, 0, 0]))),
        "hybrid_attention": (lambda q, k, v, cu, st, en: sk.hybrid_attention_varlen(q, k, v, cu, cu, st, en, 8, 8),
                             (q, k, v, cu, st, en)),
    }
    for name, (f, args) in cases.items():
        g = make_fx(f, tracing_mode="fake")(*args)
        assert [str(n.target) for n in g.graph.nodes if "spar" in str(n.target)] == [f"spar.{name}.default"]
    with pytest.raises(ValueError, match="index out of range"):  # eager calls still check
        sk.gather_rows(x, torch.tensor([6]))


def _two_views(inp, out_shape, shift):
    """(a copy of inp, out): two torch.from_numpy views of one array (two storages over the same
    bytes), out starting ``shift`` elements after the input."""
    import numpy as np

    n_out = int(np.prod(out_shape))
    arr = np.zeros(inp.numel() + n_out + abs(shift) + 8, np.float32)
    a0, o0 = (0, shift) if shift >= 0 else (-shift, 0)
    i = torch.from_numpy(arr[a0:a0 + inp.numel()]).view(inp.shape)
    i.copy_(inp)
    return i, torch.from_numpy(arr[o0:o0 + n_out]).view(out_shape)


_X3 = torch.randn(3, 5, 40)
_LAY = sk.AttentionLayout.from_segments([[("causal", 5)], [("full", 7)]])
_OVERLAP_CASES = {
    "rms_norm out/x": (lambda x, w, o: sk.rms_norm(x, w, out=o), [_X3, torch.randn(40)], 0, (3, 5, 40), 40),
    "rms_norm out/weight": (lambda x, w, o: sk.rms_norm(x, w, out=o), [_X3, torch.randn(40)], 1, (3, 5, 40), -7),
    "adaln out/scale": (lambda x, sh, sc, o: sk.adaln_layernorm(x, sh, sc, eps=1e-6, out=o),
                        [_X3, torch.randn(3, 40), torch.randn(3, 40)], 2, (3, 5, 40), 40),
    "gated_residual out/y": (lambda x, y, g, o: sk.gated_residual(x, y, g, o),
                             [_X3, torch.randn(3, 5, 40), torch.randn(3, 40)], 1, (3, 5, 40), 40),
    "linear_attention out/q": (lambda q, k, v, o: sk.linear_attention(q, k, v, out=o),
                               [torch.randn(2, 6, 3, 32), torch.randn(2, 7, 3, 32), torch.randn(2, 7, 3, 32)], 0,
                               (2, 6, 3, 32), 32),
    "hybrid_attention out/k": (lambda q, k, v, o: sk.hybrid_attention(q, k, v, _LAY, out=o),
                               [torch.randn(12, 4, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)], 1,
                               (12, 4, 16), 16),
    "dwconv_glu out/bias": (lambda b, o: sk.dwconv_glu(torch.randn(1, 12, 8), torch.ones(8, 1, 3, 3) / 9, b, 3, 4, o),
                            [torch.randn(8)], 0, (1, 12, 4), -3),
}


@pytest.mark.parametrize("case", list(_OVERLAP_CASES))
def test_an_output_partly_overlapping_an_input_is_refused(case):
    """Every op refuses an output sharing memory with another argument (here through a second
    storage over the same bytes), on its CPU path and on the reference, before writing."""
    fn, inputs, which, out_shape, shift = _OVERLAP_CASES[case]
    for backend in ("auto", "reference"):
        args = list(inputs)
        args[which], out = _two_views(inputs[which], out_shape, shift)
        with sk.backend(backend), pytest.raises(ValueError, match="shares memory|must not share memory"):
            fn(*args, out)


def test_written_tensors_that_overlap_themselves_or_hold_the_index_are_refused():
    idx, src = [1, 4, 6], torch.randn(3, 8)
    with pytest.raises(ValueError, match="x overlaps itself"):
        sk.scatter_rows(torch.randn(1, 8).expand(8, 8), idx, src)
    buf = torch.arange(32, dtype=torch.int64) + 100
    x, index = buf.view(8, 4), buf[:3]
    index.copy_(torch.tensor([0, 5, 7]))
    with pytest.raises(ValueError, match="x shares memory with index"):
        sk.scatter_rows(x, index, torch.zeros(3, 4, dtype=torch.int64))


def test_fp8_outputs_empty_rows_get_the_zero_row_scale_and_the_pair_must_not_overlap():
    """Empty token rows (C = 0, H = 0): scales as quantize_fp8 gives them, not uninitialised; a
    (q, scales) pair sharing memory is refused."""
    want = sk.quantize_fp8(torch.empty(2, 3, 0))[1]
    _, s = sk.adaln_layernorm(torch.randn(2, 3, 0), torch.randn(2, 0), torch.randn(2, 0), eps=1e-6, fp8=True,
                              out=(torch.empty(2, 3, 0, dtype=torch.float8_e4m3fn), torch.full((2, 3, 1), float("nan"))))
    torch.testing.assert_close(s, want)
    _, s = sk.linear_attention(torch.randn(2, 3, 0, 16), torch.randn(2, 4, 0, 16), torch.randn(2, 4, 0, 16), fp8=True)
    torch.testing.assert_close(s, want)
    buf = torch.zeros(2 * 3 * 8 + 16, dtype=torch.uint8)
    q = buf[:48].view(torch.float8_e4m3fn).view(2, 3, 8)
    s = buf[40:64].view(torch.float32).view(2, 3, 1)
    with pytest.raises(ValueError, match="scales\\): must not share memory with out\\[0\\]"):
        sk.adaln_layernorm(torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8), eps=1e-6, fp8=True, out=(q, s))


def test_fp8_attention_descale_parameter_with_a_workspace():
    """A descale that requires grad (an nn.Parameter of an FP8 module) is staged into the workspace
    as a value: no autograd error, the workspace is left as it was."""
    q = torch.randn(_LAY.total_q, 4, 16).to(torch.float8_e4m3fn)
    k, v = (torch.randn(_LAY.total_k, 2, 16).to(torch.float8_e4m3fn) for _ in range(2))
    d = torch.nn.Parameter(torch.tensor([0.5]))
    want = sk.hybrid_attention(q, k, v, _LAY, q_descale=d)
    ws = sk.hybrid_attention_workspace(q, k, _LAY)
    torch.testing.assert_close(sk.hybrid_attention(q, k, v, _LAY, q_descale=d, workspace=ws), want)
    assert not ws.requires_grad


def test_exact_aliasing_only_where_an_op_declares_it():
    """The very same elements as an input are an in-place update only where the op supports one
    (rms_norm's residual_out=residual, the sampler's out=x); attention's out=k and split_by_expert's
    out=norm_weights read the input after writing it and are refused."""
    lay = sk.AttentionLayout.from_segments([[("causal", 6)]])
    q, k, v = (torch.randn(6, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match="out shares memory with k"):
        sk.hybrid_attention(q, k, v, lay, out=k)
    w = torch.rand(3, 8) + 0.5
    with pytest.raises(ValueError, match="out shares memory with norm_weights"):
        sk.split_by_expert(torch.randn(3, 8), [2, 0, 1], 3, w, out=w)
    x, r = torch.randn(4, 8), torch.randn(4, 8)
    want = sk.rms_norm(x, torch.ones(8), residual=r.clone())
    got = sk.rms_norm(x, torch.ones(8), residual=r, residual_out=r)   # documented in place
    torch.testing.assert_close(got, want)


def test_split_by_expert_workspace_must_not_hold_the_ids():
    ws = torch.zeros(2 * 6 + 3 + 1, dtype=torch.int64)
    ids = ws[:6]
    ids.copy_(torch.tensor([1, 0, 2, 2, 0, 1]))
    with pytest.raises(ValueError, match="workspace: must not share memory with expert_ids"):
        sk.split_by_expert(torch.randn(6, 8), ids, 3, workspace=ws)


@pytest.mark.parametrize("portable", [False, True], ids=["torch", "portable"])
def test_layout_guard_sees_every_layout_change_and_not_values(portable):
    """_op.layout_guard (the fast paths' replay check): by layout, not identity or values; any
    change of dtype, size, stride or requires_grad fails it; a wrong count raises."""
    from spar_kernels import _op

    if not portable and _op._TENSOR_GUARDS is None:
        pytest.skip("this torch has no usable C++ tensor check; the portable form is used")
    a, b = torch.randn(4, 6), torch.randn(2, 3, 5)
    g = _op.layout_guard(a, b, portable=portable)
    assert type(g) is (_op._AliasGuard if portable else type(g))
    assert g.check(a, b)
    a.add_(1.0)
    assert g.check(a, b)                                    # values are not layout
    assert not g.check(a.t().contiguous().t(), b)           # same sizes, other strides
    assert not g.check(a.view(6, 4), b)
    assert not g.check(a, b.double())
    assert not g.check(a, b.clone().requires_grad_())
    assert not g.check(a[:, :3], b)
    b.unsqueeze_(0).squeeze_(0)                             # back to the same layout
    assert g.check(a, b)
    b.transpose_(0, 1)                                      # in place, same object
    assert not g.check(a, b)
    with pytest.raises(TypeError):
        g.check(a)
