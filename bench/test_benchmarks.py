"""Every bench case as a pytest-benchmark test (quick sizes), one test per (case, provider),
for users who track spar's speed in their own CI:  pytest bench --benchmark-only"""

import pytest
import torch

from bench import harness

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_PARAMS = [pytest.param(c, p, id=f"{c.op}-{c.name}-{p}") for c in harness.collect(_DEVICE, quick=True)
           for p in c.providers]


@pytest.mark.parametrize("case, provider", _PARAMS)
def test_bench(benchmark, case, provider):
    try:
        fn = case.providers[provider]()
    except harness.Unavailable as e:
        pytest.skip(str(e))
    if _DEVICE.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    benchmark.extra_info.update(op=case.op, bytes=case.bytes, flops=case.flops, device=harness.device_name(_DEVICE))
    benchmark(run)
