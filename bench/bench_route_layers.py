"""Dynamic Token Routing (route_layers): spar vs PyTorch eager vs torch.compile.

route_layers eager is the obvious formulation (stack K layers, softmax, multiply, sum,
layer_norm: spar_kernels.reference.route_layers.route_layers_eager); torch.compile compiles that same
function. Minimum bytes: read the K selected rows of [N, D] once + logits, write [N, D] once.
"""

from __future__ import annotations

import torch

import spar_kernels as sk
from bench.harness import Case, compiled as compiled_provider
from spar_kernels.reference import route_layers as ref

# (label, L, N, D, layer_ids): SPAR-1B / SPAR-3B prefill of the CFG batch (2 x ~330 tokens),
# BAGEL's 7B width, and a large N.
SHAPES = [
    ("spar-1b 660x896 K=4", 25, 660, 896, [6, 12, 18, 24]),
    ("spar-3b 660x1536 K=4", 29, 660, 1536, [7, 14, 21, 28]),
    ("bagel-7b 660x3584 K=4", 29, 660, 3584, [7, 14, 21, 28]),
    ("large N 16384x1536 K=4", 5, 16384, 1536, [1, 2, 3, 4]),
]


def _route_cases(device, quick):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.tensor([], dtype=dtype).element_size()
    shapes = SHAPES[:1] if quick else SHAPES  # --quick: one case (torch.compile alone takes seconds)
    for label, L, N, D, ids in shapes:
        K = len(ids)
        hidden = torch.randn(L, N, D, device=device, dtype=dtype)
        logits = torch.randn(N, K, device=device, dtype=dtype)
        alpha = torch.rand(K, device=device, dtype=dtype) + 0.5
        w = torch.randn(D, device=device, dtype=dtype)
        b = torch.randn(D, device=device, dtype=dtype)
        lid = torch.tensor(ids, device=device)
        out = torch.empty(N, D, device=device, dtype=dtype)
        moved = (K + 1) * N * D * es + N * K * es + 2 * D * es
        # (every closure binds this case's tensors through default arguments: the cases are
        # generated before they run, so a plain closure would see the last case's tensors)
        eager = lambda hidden=hidden, ids=ids, logits=logits, alpha=alpha, w=w, b=b: (  # noqa: E731
            ref.route_layers_eager(hidden, ids, logits, alpha, w, b))
        compiled = compiled_provider(lambda h, lg, a, w_, b_, ids=ids: ref.route_layers_eager(h, ids, lg, a, w_, b_))
        yield Case(
            op="route_layers", name=f"route_layers {label} {str(dtype)[6:]}",
            providers={
                "spar": lambda hidden=hidden, lid=lid, logits=logits, alpha=alpha, w=w, b=b, out=out: (
                    lambda: sk.route_layers(hidden, lid, logits, alpha, w, b, out=out)),
                "torch eager": lambda eager=eager: eager,
                "torch.compile": lambda compiled=compiled, hidden=hidden, logits=logits, alpha=alpha, w=w, b=b: (
                    lambda c: (lambda: c(hidden, logits, alpha, w, b)))(compiled()),
            },
            bytes=moved, baseline="torch eager")


def cases(device: torch.device, quick: bool):
    yield from _route_cases(device, quick)


def _main(argv=None) -> int:
    """Single-thread CPU-time run, robust on a shared machine (wall time there measures the queue):
        python -m bench.bench_route_layers --clock cpu [--quick] [--reps 7]
    Sets OMP_NUM_THREADS=1 and torch threads to 1, and times each call with the process CPU clock."""
    import argparse

    from bench.harness import time_interleaved

    p = argparse.ArgumentParser(prog="python -m bench.bench_route_layers")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"CPU figures, 1 thread, {'process CPU time' if args.clock == 'cpu' else 'wall time'}, "
          f"median of {args.reps} (min in brackets), providers interleaved")
    print("| case | provider | median ms [min] | GB/s at median | speedup vs eager |")
    print("|---|---|---:|---:|---:|")
    for case in cases(torch.device("cpu"), args.quick):
        fns = {}
        for prov, factory in case.providers.items():
            try:
                fns[prov] = factory()
                fns[prov]()  # first call (torch.compile compiles here): a provider that fails is reported
            except Exception as e:  # noqa: BLE001
                fns.pop(prov, None)
                print(f"| {case.name} | {prov} | {type(e).__name__}: {e} | | |")
        t = time_interleaved(fns, args.reps, warmup=1, clock=args.clock)
        meds, mins = t.median(), t.min()
        res = {prov: (meds[prov], mins[prov]) for prov in fns}
        base = res.get(case.baseline or "torch eager")
        for prov, (med, mn) in res.items():
            gbps = case.bytes / med / 1e9 if case.bytes else float("nan")
            sp = f"{base[0] / med:.2f}x" if base else ""
            print(f"| {case.name} | {prov} | {med * 1e3:.2f} [{mn * 1e3:.2f}] | {gbps:.1f} | {sp} |", flush=True)
    return 0


if __name__ == "__main__":
    import os
    import sys

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when spar_kernels._C_cpu's OpenMP starts
    sys.exit(_main())
