"""`python -m bench --device cuda --smoke`: every bench case's setup and one call of each spar
provider on the simulated GPU (spar_kernels.testing.fake_cuda), untimed; exit status 1 on errors."""

import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench import __main__ as bench_main  # noqa: E402
from bench import harness  # noqa: E402

# the runtime, integration and tokenizer benches build whole models (slower: run by hand); every
# other bench module is a kernel bench and runs here
MODEL_BENCHES = {"image_tokenizer", "integrations", "pipeline", "runtime_llm"}
KERNEL_BENCHES = sorted(m[len("bench_"):] for m in harness.discover() if m[len("bench_"):] not in MODEL_BENCHES)


def test_smoke_runs_the_kernel_benches_on_a_simulated_gpu(capsys):
    status = bench_main.main(["--device", "cuda", "--smoke", "--quick", "--only", ",".join(KERNEL_BENCHES)])
    out = capsys.readouterr().out
    lines = [line.split(None, 1) for line in out.splitlines() if line.startswith("  ")]
    assert lines, out
    assert [s for s, _ in lines if s != "ok"] == [], out
    ops = {rest.split(":")[0] for _, rest in lines}  # bench_dit gives dit_block, dit_nongemm, ...
    assert [m for m in KERNEL_BENCHES if not any(op.startswith(m) for op in ops)] == [], out
    assert "simulated CUDA device" in out and " 0 host syncs" in out
    assert status == 0, out


def _fake_module(monkeypatch, cases):
    mod = types.ModuleType("bench.bench_smoketest")
    mod.cases = cases
    monkeypatch.setitem(sys.modules, "bench.bench_smoketest", mod)
    monkeypatch.setattr(harness, "discover", lambda: ["bench_smoketest"])


def test_smoke_reports_each_failing_case_and_exits_1(monkeypatch, capsys):
    import torch

    calls = []

    def boom():
        raise RuntimeError("kernel exploded\nsecond line")

    def ok():
        x = torch.ones(4, device="cuda")
        return lambda: calls.append(x.device)

    def peer():
        raise AssertionError("a peer provider must not run in a smoke run")

    def cases(device, quick):
        yield harness.Case(op="smoketest", name="good", providers={"spar": ok, "peer": peer})
        yield harness.Case(op="smoketest", name="bad", providers={"spar": ok, "spar (variant)": lambda: boom})
        yield harness.Case(op="smoketest", name="no spar here",
                           providers={"spar": lambda: (_ for _ in ()).throw(harness.Unavailable("CPU only"))})

    _fake_module(monkeypatch, cases)
    status = bench_main.main(["--device", "cuda", "--smoke"])
    out = capsys.readouterr().out
    assert status == 1
    assert [str(d) for d in calls] == ["cuda:0", "cuda:0"]  # each spar provider once, on the simulated GPU
    assert "  ok          smoketest: good: spar, " in out
    assert "  error       smoketest: bad: spar (variant): RuntimeError: kernel exploded\n" in out
    assert "  unavailable smoketest: no spar here: spar: CPU only" in out
    assert "2 of 3 cases ran without error" in out


def test_smoke_reports_a_module_whose_cases_raise(monkeypatch, capsys):
    def cases(device, quick):
        raise ValueError("bad shape table")
        yield  # noqa: unreachable - a generator, as bench modules are

    _fake_module(monkeypatch, cases)
    assert bench_main.main(["--device", "cuda", "--smoke"]) == 1
    assert "  error       smoketest: cases(): ValueError: bad shape table" in capsys.readouterr().out


def test_smoke_with_no_cases_fails(monkeypatch, capsys):
    _fake_module(monkeypatch, lambda device, quick: [])
    assert bench_main.main(["--device", "cuda", "--smoke"]) == 1
    assert "0 of 0 cases" in capsys.readouterr().out


def test_smoke_separates_failures_after_a_host_read_from_errors(monkeypatch, capsys):
    """A call that reads device values back (zeros on the simulated GPU) and then fails is
    'data-dependent', not an error; a failure with no host read before it stays an error."""
    import torch

    def reads_then_fails():
        x = torch.ones(4, device="cuda")

        def run():
            n = int(x.sum().item())  # a host sync: 0 on the simulated GPU
            if n == 0:
                raise RuntimeError("empty batch")
        return run

    def cases(device, quick):
        yield harness.Case(op="smoketest", name="reads", providers={"spar": reads_then_fails})

    _fake_module(monkeypatch, cases)
    assert bench_main.main(["--device", "cuda", "--smoke"]) == 0
    out = capsys.readouterr().out
    assert "  data-dependent smoketest: reads: spar: RuntimeError: empty batch after 1 host sync(s)" in out
