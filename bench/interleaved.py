"""Single-thread CPU timing with the providers of each case interleaved, for a shared machine.

    OMP_NUM_THREADS=1 python -m bench.interleaved [--ops rms_norm,row_moves] [--quick] [--reps 15]

Wall time on a machine other people use measures the queue, so every call is timed with the
process CPU clock (``time.process_time``: this process's CPU seconds, one thread), and the
providers of a case take turns call by call (spar, eager, copy, eager, copy, spar, ..., the
order rotated every turn so none always runs on the cache another left), so a burst of load
hits them alike; the median of ``--reps`` turns is reported with the minimum.

Each case with a byte count also gets a ``copy`` row: ``torch.Tensor.copy_`` of the same number
of bytes (half read, half written), this CPU's single-thread copy bandwidth measured in the same
run, the ceiling a memory-bound op is held to (``% of copy`` column). Speedups are against the
case's baseline provider (the eager PyTorch the op replaces).

A case that also counts its FLOPs gets a ``matmul`` row: an fp32 ``[512, 512] @ [512, 512]``
through torch's BLAS, this CPU's single-thread multiply-add rate measured in the same run
(GFLOP/s column; the roofline takes the rate of its fastest call, the ``[min]``). The case's
roofline is then the longer of the copy's median time and its FLOPs at that rate, and ``% of
roofline`` says how close each provider comes to it and which side bounds the op on this CPU:
``memory`` when the copy takes longer, ``compute`` when the FLOPs do (an op above the machine's
FLOP-per-byte balance cannot reach the copy's time, whatever its memory access).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import time

import torch

from bench.harness import time_interleaved


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def copy_provider(nbytes: int):
    """A provider copying ``nbytes`` in total (nbytes/2 read + nbytes/2 written)."""
    def factory():
        n = max(1, nbytes // 2)
        src, dst = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        return lambda: dst.copy_(src)
    return factory


MATMUL_N = 512


def matmul_provider(n: int = MATMUL_N):
    """(factory, FLOPs per call): fp32 ``[n, n] @ [n, n]`` into a preallocated output."""
    def factory():
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        c = torch.empty(n, n)
        return lambda: torch.mm(a, b, out=c)
    return factory, 2 * n ** 3


def roofline(case_flops: int, copy_s: float, matmul_s: float, matmul_flops: int) -> tuple[float, str]:
    """(seconds, bound): the longer of the copy's time and ``case_flops`` at the matmul's rate."""
    if not (copy_s > 0 and matmul_s > 0 and matmul_flops > 0 and case_flops > 0):
        raise ValueError(f"roofline: times and FLOPs must be > 0, got copy_s={copy_s!r}, matmul_s={matmul_s!r}, "
                         f"matmul_flops={matmul_flops!r}, case_flops={case_flops!r}")
    compute_s = case_flops * matmul_s / matmul_flops
    return (compute_s, "compute") if compute_s > copy_s else (copy_s, "memory")


def run(cases, reps: int, clock=time.process_time, *, copy=copy_provider, matmul=matmul_provider) -> list[dict]:
    """Times each case's providers interleaved (plus ``copy`` for a case with bytes and ``matmul``
    for one with bytes and FLOPs); one row per provider. ``copy`` / ``matmul``: the ceiling
    providers' builders (tests pass fakes)."""
    rows = []
    ceilings = ("copy", "matmul")
    for case in cases:
        providers = dict(case.providers)
        clash = [k for k in ceilings if k in providers]
        if clash:
            raise ValueError(f"case {case.name!r}: provider name(s) {clash} are reserved for the ceilings")
        mm_flops = None
        if case.bytes:
            providers["copy"] = copy(case.bytes)
            if case.flops:
                providers["matmul"], mm_flops = matmul()
        fns = {}
        for name, factory in providers.items():
            try:
                fns[name] = factory()
                fns[name]()  # first call (allocation, dispatch caches): a provider that fails is reported
            except Exception as e:  # noqa: BLE001 - a provider that cannot run here is reported
                rows.append({"case": case.name, "provider": name, "error": f"{type(e).__name__}: {e}"[:120]})
                fns.pop(name, None)
        # rotate who goes first: a provider running right after another sees its cache state
        times = time_interleaved(fns, reps, warmup=1, clock=clock, rotate=True).samples
        med = {name: statistics.median(ts) for name, ts in times.items()}
        base = med.get(case.baseline or "torch eager")
        roof = bound = None
        if mm_flops and med.get("copy", 0) > 0 and min(times.get("matmul", [0])) > 0:
            # the matmul's fastest call: the highest rate it reached, the stricter ceiling
            roof, bound = roofline(case.flops, med["copy"], min(times["matmul"]), mm_flops)
        for name, ts in times.items():
            ok = med[name] > 0 and name not in case.setup   # a setup step's row: its time only
            ceiling = name in ceilings
            flops = mm_flops if name == "matmul" else (None if ceiling else case.flops)
            rows.append({"op": case.op, "case": case.name, "provider": name, "median_us": med[name] * 1e6,
                         "min_us": min(ts) * 1e6,
                         "gbps": case.bytes / med[name] / 1e9 if case.bytes and ok and name != "matmul" else None,
                         "gflops": flops / med[name] / 1e9 if flops and ok else None,
                         "speedup": base / med[name] if base and ok and name != "matmul" else None,
                         "pct_copy": 100 * med["copy"] / med[name] if "copy" in med and ok and not ceiling else None,
                         "pct_roof": 100 * roof / med[name] if roof and ok and not ceiling else None,
                         "bound": bound})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| case | provider | median us [min] | GB/s | GFLOP/s | vs eager | % of copy | % of roofline |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | {r['provider']} | {r['error']} | | | | | |")
            continue
        gbps = "" if r["gbps"] is None else f"{r['gbps']:.1f}"
        gflops = "" if r["gflops"] is None else f"{r['gflops']:.1f}"
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        pct = "" if r["pct_copy"] is None else f"{r['pct_copy']:.0f}%"
        roof = "" if r["pct_roof"] is None else f"{r['pct_roof']:.0f}% ({r['bound']})"
        out.append(f"| {r['case']} | {r['provider']} | {r['median_us']:.1f} [{r['min_us']:.1f}] | {gbps} "
                   f"| {gflops} | {speedup} | {pct} | {roof} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.interleaved", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="rms_norm,row_moves,route_layers,split_by_expert,quantize_fp8",
                   help="comma-separated bench modules (bench/bench_<op>.py)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--providers", default=None, help="only these providers (comma-separated), plus the copy and matmul ceilings")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    keep = set(args.providers.split(",")) if args.providers else None
    cases = []
    for op in args.ops.split(","):
        for c in importlib.import_module(f"bench.bench_{op.strip()}").cases(torch.device("cpu"), args.quick):
            if keep:
                c.providers = {k: v for k, v in c.providers.items() if k in keep}
            cases.append(c)
    print(f"{cpu_model()}, 1 thread (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), torch {torch.__version__}; "
          f"process CPU time per call, providers interleaved, median of {args.reps} [min]")
    print(markdown(run(cases, args.reps)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when OpenMP starts (before the first parallel region)
    raise SystemExit(main())
