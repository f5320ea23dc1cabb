"""The AOT layer: every Triton kernel compiles for sm_80 and sm_90a without spills, and the
CUDA extension's cubins are readable. Runs `python -m spar_kernels.inspect` as users do."""

import json
import os
import subprocess
import sys

import pytest

from spar_kernels import _ext, inspect as sk_inspect


@pytest.fixture(scope="module")
def rows():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # AOT compilation uses the real compiler
    p = subprocess.run([sys.executable, "-m", "spar_kernels.inspect", "--json"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, f"inspect failed:\n{p.stderr[-4000:]}"
    return json.loads(p.stdout)


def test_inspect_rows_have_the_documented_keys(rows):
    for r in rows:
        for k in ("kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "mma"):
            assert k in r
        assert r["arch"] in ("sm_80", "sm_90a")
        assert r["mma"] in ("wgmma", "mma", "none")
        assert r["spill_bytes"] == 0


@pytest.mark.parametrize("kernel", ["rms_norm", "quantize_fp8"])
def test_inspect_lists_each_op_for_both_archs(rows, kernel):
    if kernel == "quantize_fp8" and not _ext.has_cuda_extension():
        pytest.skip("CUDA extension not built (no nvcc)")
    archs = {r["arch"] for r in rows if r["kernel"] == kernel}
    assert archs == {"sm_80", "sm_90a"}


def test_quantize_fp8_uses_128_bit_loads(rows):
    if not _ext.has_cuda_extension():
        pytest.skip("CUDA extension not built (no nvcc)")
    vec = [r for r in rows if r["kernel"] == "quantize_fp8" and r["config"].startswith("quantize_rows_kernel<bf16_t, 8>")]
    assert vec and all(r["ldg128"] for r in vec)


def test_failures_detects_spills_and_errors():
    ok = {"kernel": "k", "config": "c", "arch": "sm_80", "spill_bytes": 0}
    assert sk_inspect.failures([ok]) == []
    assert sk_inspect.failures([dict(ok, spill_bytes=248)])
    assert sk_inspect.failures([dict(ok, error="boom")])
    # shared memory past the arch's per-block maximum fails the launch on a GPU
    assert sk_inspect.failures([dict(ok, shared_bytes=163 * 1024)]) == []
    assert sk_inspect.failures([dict(ok, shared_bytes=163 * 1024 + 1)])
    assert sk_inspect.failures([dict(ok, arch="sm_90a", shared_bytes=227 * 1024)]) == []
    assert sk_inspect.failures([dict(ok, arch="sm_90a", shared_bytes=227 * 1024 + 16)])


def test_res_usage_parser():
    text = """
Fatbin elf code:
================
arch = sm_90a
identifier = /x/csrc/myop/myop.cu

Resource usage:
 Function _Z3fooPf:
  REG:40 STACK:16 SHARED:2048 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    (r,) = sk_inspect._parse_res_usage(text)
    assert (r["arch"], r["registers"], r["stack"], r["shared"]) == ("sm_90a", 40, 16, 2048)
    assert r["source"].endswith("myop/myop.cu")
