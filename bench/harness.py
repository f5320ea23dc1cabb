"""The benchmark harness every bench/bench_<op>.py plugs into.

A bench module defines ``cases(device: torch.device, quick: bool) -> Iterable[Case]``. A
:class:`Case` names its op and shape, the bytes and FLOPs the op must move/compute (written in
code, so GB/s and TFLOP/s are derived, not guessed), and its providers: ``{name: factory}``,
where ``factory()`` builds inputs and returns the zero-argument callable to time, or raises
:class:`Unavailable` (a peer not installed, a path not supported on this device). spar and
its peers are timed in the same run, on the same device, one after another.

Timing: CUDA -> CUDA events around each call (after warm-up, with an L2-sized buffer flushed
between calls); CPU -> ``time.perf_counter`` per call. Reported: median, p20, p80 in
microseconds, GB/s and TFLOP/s at the median, and each provider's speedup over the case's
baseline provider.

The standalone runs of the bench modules (``python -m bench.interleaved``, ``python -m
bench.bench_<op>``) time their providers with :func:`time_interleaved`: the providers of a case
called round-robin, with warm-up, the process CPU clock or wall time, and optionally a block of
calls per provider sized to a time budget.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import json
import os
import pkgutil
import platform
import statistics
import time
from typing import Callable, Iterable

import torch


class Unavailable(Exception):
    """Raised by a provider factory when that provider cannot run here (reason in the message)."""


def compiled(fn):
    """A provider factory timing ``torch.compile(fn)`` (Unavailable when compilation fails)."""
    def factory():
        try:
            return torch.compile(fn, dynamic=False)
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"torch.compile: {e}") from e
    return factory


@dataclasses.dataclass
class Case:
    op: str                       # e.g. "rms_norm"
    name: str                     # e.g. "qwen2.5-0.5b prefill 2x330x896 bf16"
    providers: dict[str, Callable[[], Callable[[], object]]]
    bytes: int | None = None      # minimum bytes the op must read + write
    flops: int | None = None      # FLOPs of the op
    baseline: str | None = None   # provider the speedups are relative to (default: the second one)
    note: str = ""
    setup: tuple[str, ...] = ()   # providers timing a setup step, not the op (a mask's creation): time only


@dataclasses.dataclass
class Result:
    op: str
    case: str
    provider: str
    device: str
    median_us: float | None
    p20_us: float | None
    p80_us: float | None
    gbps: float | None
    tflops: float | None
    speedup: float | None
    error: str | None = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def _time_cuda(fn, reps: int, warmup: int) -> list[float]:
    flush = torch.empty(64 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]  # ms -> us


def _time_cpu(fn, reps: int, warmup: int, budget_s: float) -> list[float]:
    for _ in range(warmup):
        fn()
    times, t_end = [], time.perf_counter() + budget_s
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        if i >= 2 and time.perf_counter() > t_end:
            break
    return times


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


@dataclasses.dataclass
class Interleaved:
    """What :func:`time_interleaved` measured: per provider, the seconds per call of every
    repetition (``samples``), the calls timed together per repetition (``calls``) and the last
    call's return value (``last``)."""
    samples: dict[str, list[float]]
    calls: dict[str, int]
    last: dict[str, object]

    def median(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}

    def min(self) -> dict[str, float]:
        return {k: min(v) for k, v in self.samples.items()}

    def quantile(self, q: float) -> dict[str, float]:
        return {k: _quantile(v, q) for k, v in self.samples.items()}


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int, *, warmup: int = 1,
                     clock: str | Callable[[], float] = "cpu", rotate: bool = False,
                     budget_s: float | None = None, sync: Callable[[], object] | None = None) -> Interleaved:
    """Time the zero-argument callables ``fns`` round-robin: every repetition calls each provider
    once (or a block of ``calls`` calls) in turn, so a burst of load on a shared machine hits them
    alike. This is the one timing loop of the standalone (interleaved) bench runs.

    - ``warmup``: rounds of one call per provider, untimed, before anything is timed.
    - ``clock``: ``"cpu"`` (``time.process_time``: this process's CPU seconds, robust on a shared
      machine with one thread), ``"wall"`` (``time.perf_counter``) or any callable returning seconds.
    - ``rotate``: rotate which provider goes first in each repetition, so none always runs on the
      cache state another left.
    - ``budget_s``: calibrate a block of calls per provider whose time is about ``budget_s``
      (after the warm-up, each provider is called until ``budget_s`` has passed, at least twice);
      samples are then the block's time divided by its calls. None: one call per repetition.
    - ``sync``: called before and after each timed block (e.g. ``torch.cuda.synchronize``).
    """
    if not isinstance(reps, int) or reps < 1:
        raise ValueError(f"time_interleaved: reps must be an int >= 1, got {reps!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"time_interleaved: warmup must be an int >= 0, got {warmup!r}")
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"time_interleaved: budget_s must be > 0 seconds or None, got {budget_s!r}")
    if isinstance(clock, str):
        if clock not in CLOCKS:
            raise ValueError(f"time_interleaved: clock must be one of {sorted(CLOCKS)} or a callable, got {clock!r}")
        clock = CLOCKS[clock]
    elif not callable(clock):
        raise TypeError(f"time_interleaved: clock must be a str or a callable, got {type(clock).__name__}")
    sync = sync or (lambda: None)
    last: dict[str, object] = {}
    for _ in range(warmup):
        for k, f in fns.items():
            last[k] = f()
    calls = dict.fromkeys(fns, 1)
    if budget_s is not None:
        for k, f in fns.items():
            sync()
            t0, n = clock(), 0
            while clock() - t0 < budget_s or n < 2:
                last[k] = f()
                n += 1
            sync()
            calls[k] = max(1, int(n * budget_s / max(clock() - t0, 1e-9)))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)] if rotate and names else names
        for k in order:
            f, n = fns[k], calls[k]
            sync()
            t0 = clock()
            for _ in range(n):
                last[k] = f()
            sync()
            samples[k].append((clock() - t0) / n)
    return Interleaved(samples, calls, last)


def run_case(case: Case, device: torch.device, *, quick: bool) -> list[Result]:
    dev = device_name(device)
    reps, warmup, budget = (10, 2, 1.0) if quick else (50, 5, 5.0)
    rows: list[Result] = []
    for prov, factory in case.providers.items():
        try:
            fn = factory()
            times = _time_cuda(fn, reps, warmup) if device.type == "cuda" else _time_cpu(fn, reps, warmup, budget)
        except Unavailable as e:
            rows.append(Result(case.op, case.name, prov, dev, None, None, None, None, None, None, f"unavailable: {e}"))
            continue
        except Exception as e:  # noqa: BLE001 - a broken provider is reported, not fatal
            rows.append(Result(case.op, case.name, prov, dev, None, None, None, None, None, None,
                               f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
            continue
        med = statistics.median(times)
        op_row = prov not in case.setup
        rows.append(Result(case.op, case.name, prov, dev, med, _quantile(times, 0.2), _quantile(times, 0.8),
                           case.bytes / med / 1e3 if case.bytes and op_row else None,
                           case.flops / med / 1e6 if case.flops and op_row else None, None))
    base_name = case.baseline or (list(case.providers)[1] if len(case.providers) > 1 else None)
    base = next((r for r in rows if r.provider == base_name and r.median_us), None)
    for r in rows:
        if base and r.median_us and r.provider not in case.setup:
            r.speedup = base.median_us / r.median_us
    return rows


def discover() -> list[str]:
    """Names of the bench modules (bench/bench_*.py)."""
    here = os.path.dirname(__file__)
    return sorted(m.name for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))


def collect(device: torch.device, quick: bool, only: Iterable[str] | None = None,
            errors: list[tuple[str, Exception]] | None = None) -> list[Case]:
    """The cases of every bench module (of the ops in ``only``). A module whose peer library is
    missing is skipped with a message. When ``errors`` is a list, a module whose ``cases()``
    raises anything else is recorded there as ``(module name, exception)`` and the others are
    still collected; otherwise the exception propagates."""
    cases: list[Case] = []
    wanted = set(only) if only else None
    for mod_name in discover():
        op = mod_name[len("bench_"):]
        if wanted and op not in wanted:
            continue
        try:
            mod = importlib.import_module(f"bench.{mod_name}")
            cases.extend(mod.cases(device, quick))
        except ImportError as e:  # a peer library is missing: say so, run the other modules
            print(f"bench: skipping {mod_name} ({e}); install the bench extra: pip install -e '.[bench]'")
        except Exception as e:  # noqa: BLE001 - reported by the caller (smoke runs)
            if errors is None:
                raise
            errors.append((mod_name, e))
    return cases


def is_spar_provider(name: str) -> bool:
    """Whether a provider runs spar's code (``spar``, ``spar (...)``, ``patched`` models) rather
    than a peer or reference."""
    return name.startswith("spar") or name == "patched"


@dataclasses.dataclass
class SmokeResult:
    op: str
    case: str
    status: str                   # "ok", "error", "unavailable" (no spar provider could run here) or
    #                               "data-dependent" (failed after reading device values back)
    detail: str = ""              # the error, or what ran: providers, and on the simulated GPU the
    #                               launches and host syncs of their calls (setup not counted)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def smoke(device: torch.device, quick: bool = False, only: Iterable[str] | None = None,
          max_cases: int = 0) -> list[SmokeResult]:
    """Every case's setup and one call of each spar provider, untimed: on ``device="cuda"``
    inside ``spar_kernels.testing.fake_cuda()`` (a simulated GPU: nothing computes, so the full
    sizes cost only Python time), so that a crash in a GPU-only path shows up without a GPU.
    A module whose ``cases()`` raises gives one ``error`` result named after the module. A call
    that fails after reading device values back to the host (a recorded host sync: the simulated
    GPU returns zeros there) is reported as ``data-dependent``, not as an error: the code after
    the sync is not what a GPU would run."""
    import contextlib

    from spar_kernels.testing import fake_cuda

    results: list[SmokeResult] = []
    with fake_cuda() if device.type == "cuda" else contextlib.nullcontext() as rec:
        errors: list[tuple[str, Exception]] = []
        cases = collect(device, quick, only, errors)
        results += [SmokeResult(m[len("bench_"):], "cases()", "error", _error(e)) for m, e in errors]
        for i, case in enumerate(cases[:max_cases] if max_cases > 0 else cases):
            ran, problems, unavailable, data_dependent, stats = [], [], [], [], None
            for prov, factory in case.providers.items():
                if not is_spar_provider(prov):
                    continue
                stats = None
                try:
                    fn = factory()  # setup: not counted
                    with rec.region(f"case {i}") if rec is not None else contextlib.nullcontext() as stats:
                        fn()
                    ran.append(prov)
                except Unavailable as e:
                    unavailable.append(f"{prov}: {e}")
                except Exception as e:  # noqa: BLE001 - the point of a smoke run: report and go on
                    if stats is not None and stats.syncs:
                        # the call read device values back to the host first: the simulated GPU
                        # returns zeros there, so what follows is not what a GPU would run
                        first = stats.syncs[0]
                        data_dependent.append(f"{prov}: {_error(e)} after {len(stats.syncs)} host sync(s), "
                                              f"the first {getattr(first, 'op', first)}")
                    else:
                        problems.append(f"{prov}: {_error(e)}")
            if problems:
                results.append(SmokeResult(case.op, case.name, "error", "; ".join(problems)))
            elif data_dependent:
                results.append(SmokeResult(case.op, case.name, "data-dependent", "; ".join(data_dependent)))
            elif not ran:
                results.append(SmokeResult(case.op, case.name, "unavailable",
                                           "; ".join(unavailable) or "no spar provider"))
            else:
                costs = f", {stats.launches} launches, {len(stats.syncs)} host syncs" if stats is not None else ""
                results.append(SmokeResult(case.op, case.name, "ok", f"{', '.join(ran)}{costs}"))
    return results


def markdown(results: list[Result], device: str, quick: bool) -> str:
    lines = [f"# spar benchmarks on {device}", "",
             f"{_dt.datetime.now().isoformat(timespec='seconds')}, {'quick' if quick else 'full'} run, "
             f"torch {torch.__version__}. Times in microseconds (median [p20, p80]); speedup is relative "
             "to the case's baseline provider measured in the same run." +
             (" These are CPU figures." if device.startswith("CPU") else ""), ""]
    lines.append("| op | case | provider | median us | p20-p80 us | GB/s | TFLOP/s | speedup |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        if r.median_us is None:
            lines.append(f"| {r.op} | {r.case} | {r.provider} | - | - | - | - | {r.error} |")
            continue
        lines.append(f"| {r.op} | {r.case} | {r.provider} | {r.median_us:.1f} | {r.p20_us:.1f}-{r.p80_us:.1f} | "
                     f"{'' if r.gbps is None else f'{r.gbps:.1f}'} | {'' if r.tflops is None else f'{r.tflops:.3f}'} | "
                     f"{'' if r.speedup is None else f'{r.speedup:.2f}x'} |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: str) -> bool:
    """Speedup per case and provider as a PNG (when matplotlib is installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    ok = [r for r in results if r.speedup]
    if not ok:
        return False
    labels = sorted({f"{r.op}: {r.case}" for r in ok})
    provs = sorted({r.provider for r in ok})
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) * len(provs) + 1.5))
    h = 0.8 / len(provs)
    for j, p in enumerate(provs):
        ys = [i + j * h for i in range(len(labels))]
        vals = [next((r.speedup for r in ok if f"{r.op}: {r.case}" == l and r.provider == p), 0) for l in labels]
        ax.barh(ys, vals, height=h, label=p)
    ax.set_yticks([i + 0.4 - h / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.5)
    ax.set_xlabel("speedup over baseline (same run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write(results: list[Result], device: str, quick: bool, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = "cuda" if "(CUDA)" in device else "cpu"
    base = os.path.join(out_dir, f"bench-{tag}-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"device": device, "quick": quick, "torch": torch.__version__,
                   "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(results, device, quick))
    paths = {"json": base + ".json", "markdown": base + ".md"}
    if plot(results, base + ".png"):
        paths["png"] = base + ".png"
    return paths
