"""tests/cpp/isa_selftest.cpp: the C++ twins' instruction-set variants against each other.

The program runs every case once per variant the CPU has (base, avx2, avx512) through the twins'
entry points and compares each variant's outputs with the base variant's: base and avx2 on an
AVX2 CPU, all three on an AVX-512 one. tests/cpp/avx512_emulated.sh runs the same program on an
emulated AVX-512 CPU (Bochs' Skylake-X model) for machines without it (README, "What is verified, and what is not"). This test
keeps the program building and passing, and checks that its comparison catches a disagreement.
"""
import re
import subprocess

import pytest

from conftest import build_cpp_harness

SOURCES = ("adaln/adaln_cpu.cpp", "dwconv_glu/dwconv_glu_cpu.cpp", "linear_attention/linear_attention_cpu.cpp",
           "flow_sampler/flow_sampler_cpu.cpp", "quantize_fp8/quantize_fp8_cpu.cpp")
# -O0: the five files, three variants each, compile in seconds; the cases are small
FLAGS = ["-O0", "-std=gnu++17", "-march=x86-64", "-Wno-psabi"]


def _summary(stdout: str) -> tuple[list[str], int, int]:
    variants = re.search(r"variants this CPU runs: (.*)", stdout).group(1).split()
    cases, failures = map(int, re.search(r"(\d+) cases, (\d+) failures", stdout).groups())
    return variants, cases, failures


def test_isa_variants_agree(tmp_path):
    exe = build_cpp_harness(tmp_path, "isa_selftest.cpp", FLAGS, csrc_sources=SOURCES)
    run = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    variants, cases, failures = _summary(run.stdout)
    if variants == ["base"]:
        pytest.skip("this compiler builds the base variant only (the avx2 / avx512 variants need GCC on x86-64)")
    assert variants[:2] == ["base", "avx2"], run.stdout   # build_cpp_harness skips without AVX2
    assert cases == 246 and failures == 0, run.stdout
    # the comparison catches a disagreement: --perturb moves one output of every non-base variant
    # by twice the case's tolerance, so every comparison must fail
    bad = subprocess.run([exe, "--perturb"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1, bad.stdout[-2000:]
    assert _summary(bad.stdout) == (variants, cases, cases * (len(variants) - 1)), bad.stdout[-2000:]
    # --require-avx512 (the emulated run's guard) refuses a CPU without AVX-512
    req = subprocess.run([exe, "--require-avx512"], capture_output=True, text=True, timeout=600)
    if "avx512" in variants:
        assert req.returncode == 0, req.stdout
    else:
        assert req.returncode == 3 and "no AVX-512" in req.stdout, req.stdout
