"""python -m bench [--device cpu|cuda] [--quick] [--smoke] [--only op1,op2] [--out DIR]

Runs every case of every bench/bench_<op>.py on one device, spar against its reference and
peers in the same run, prints a Markdown table and writes JSON + Markdown (+ PNG) to --out.

--smoke: no timing; every case's setup and one call of each spar provider, on a simulated GPU
for --device cuda (spar_kernels.testing.fake_cuda: no GPU needed); one line per case, exit
status 1 when any case fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench import harness


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions (about a minute on CPU)")
    p.add_argument("--only", default=None, help=f"comma-separated ops among {[m[6:] for m in harness.discover()]}")
    p.add_argument("--max-cases", type=int, default=0, help="stop after this many cases (0: all)")
    p.add_argument("--out", default="bench/results", help="directory for the JSON / Markdown / PNG")
    p.add_argument("--smoke", action="store_true",
                   help="no timing: set up every case and call each spar provider once (on a simulated "
                        "GPU for --device cuda); exit status 1 on any error")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    if args.smoke:
        return smoke(device, args.quick, only, args.max_cases)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    dev = harness.device_name(device)
    print(f"spar bench on {dev}{' (quick)' if args.quick else ''}", flush=True)
    t0 = time.time()
    results = []
    cases = harness.collect(device, args.quick, only)
    for case in cases[:args.max_cases] if args.max_cases > 0 else cases:
        rows = harness.run_case(case, device, quick=args.quick)
        results.extend(rows)
        summary = ", ".join(f"{r.provider} {r.median_us:.1f}us" if r.median_us else f"{r.provider} n/a" for r in rows)
        print(f"  {case.op}: {case.name}: {summary}", flush=True)
    print()
    print(harness.markdown(results, dev, args.quick))
    paths = harness.write(results, dev, args.quick, args.out)
    print(f"wrote {', '.join(paths.values())} in {time.time() - t0:.0f} s")
    return 0


def smoke(device: torch.device, quick: bool, only, max_cases: int) -> int:
    where = "a simulated CUDA device (spar_kernels.testing.fake_cuda)" if device.type == "cuda" else str(device)
    print(f"spar bench smoke run on {where}{' (quick)' if quick else ''}", flush=True)
    t0 = time.time()
    results = harness.smoke(device, quick, only, max_cases)
    for r in results:
        print(f"  {r.status:<11} {r.op}: {r.case}: {r.detail}", flush=True)
    failed = [r for r in results if r.status == "error"]
    print(f"{len(results) - len(failed)} of {len(results)} cases ran without error in {time.time() - t0:.0f} s")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
