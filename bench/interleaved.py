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


def run(cases, reps: int, clock=time.process_time) -> list[dict]:
    rows = []
    for case in cases:
        providers = dict(case.providers)
        if case.bytes:
            providers["copy"] = copy_provider(case.bytes)
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
        for name, ts in times.items():
            gbps = case.bytes / med[name] / 1e9 if case.bytes and med[name] > 0 else None
            rows.append({"op": case.op, "case": case.name, "provider": name, "median_us": med[name] * 1e6,
                         "min_us": min(ts) * 1e6, "gbps": gbps,
                         "speedup": base / med[name] if base and med[name] > 0 else None,
                         "pct_copy": 100 * med["copy"] / med[name] if "copy" in med and med[name] > 0 else None})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| case | provider | median us [min] | GB/s | vs eager | % of copy |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | {r['provider']} | {r['error']} | | | |")
            continue
        gbps = "" if r["gbps"] is None else f"{r['gbps']:.1f}"
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        pct = "" if r["provider"] == "copy" or r["pct_copy"] is None else f"{r['pct_copy']:.0f}%"
        out.append(f"| {r['case']} | {r['provider']} | {r['median_us']:.1f} [{r['min_us']:.1f}] | {gbps} "
                   f"| {speedup} | {pct} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.interleaved", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="rms_norm,row_moves,route_layers,split_by_expert,quantize_fp8",
                   help="comma-separated bench modules (bench/bench_<op>.py)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--providers", default=None, help="only these providers (comma-separated), plus copy")
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
