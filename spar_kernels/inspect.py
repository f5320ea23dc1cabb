"""Compile every GPU kernel ahead of time and report its resources, without a GPU.

    python -m spar_kernels.inspect [--json] [--kernel NAME] [--arch sm_80,sm_90a]

Triton kernels: every registered configuration (spar_kernels._aot) is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))``; registers, stack
(spill) bytes and shared memory are read from the cubin with ``cuobjdump -res-usage``, the
matrix instructions from the PTX (``wgmma`` / ``mma.sync``).
CUDA C++ kernels: the cubins embedded in ``spar_kernels._C_cuda`` are read the same way, plus
their SASS (``HGMMA``/``HMMA`` for tensor cores, ``LDG.E.128`` for 16-byte loads).

One row per kernel x config x arch. Exit status is non-zero when a kernel fails to compile,
spills (stack > 0), needs more shared memory per block than the arch allows (a launch would fail
with "out of resource: shared memory"; A100 163 KiB, H100 227 KiB), or a kernel meant for tensor
cores does not use them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ARCHS = {"sm_80": 80, "sm_90a": 90}
# the most shared memory one block may use (opt-in dynamic maximum, CUDA programming guide's
# compute capability table): 8.0 (A100) 163 KiB, 9.0 (H100) 227 KiB
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}
_RES_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump() -> str | None:
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(p):
            return p
    except Exception:  # noqa: BLE001
        pass
    return shutil.which("cuobjdump") or (
        "/usr/local/cuda/bin/cuobjdump" if os.path.isfile("/usr/local/cuda/bin/cuobjdump") else None)


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _parse_res_usage(text: str) -> list[dict]:
    """Rows {arch, function, registers, stack, shared, local} from `cuobjdump -res-usage`."""
    rows, arch, fn, source = [], None, None, ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("identifier = "):
            source = line.split("=", 1)[1].strip()
        elif line.startswith("Function ") and line.endswith(":"):
            fn = line[len("Function "):-1]
        else:
            m = _RES_RE.search(line)
            if m and fn:
                reg, stack, shared, local = map(int, m.groups())
                rows.append({"arch": arch, "function": fn, "registers": reg, "stack": stack,
                             "shared": shared, "local": local, "source": source})
                fn = None
    return rows


def _sass_features(text: str) -> dict[tuple[str, str], dict]:
    """(arch, function) -> {"mma": .., "ldg128": ..} from `cuobjdump -sass`."""
    feats, arch, fn = {}, None, None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("arch = "):
            arch, fn = s.split("=", 1)[1].strip(), None
        elif s.startswith("Function : "):
            fn = s[len("Function : "):]
            feats[(arch, fn)] = {"mma": "none", "ldg128": False}
        elif fn is not None:
            f = feats[(arch, fn)]
            if "HGMMA" in s:
                f["mma"] = "wgmma"
            elif "HMMA" in s and f["mma"] == "none":
                f["mma"] = "mma"
            if "LDG.E.128" in s:
                f["ldg128"] = True
    return feats


# ---------------------------------------------------------------------------------------------
# Triton

def _compile_triton(spec, arch: str, tool: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": spec.kernel_name, "config": spec.config, "arch": arch, "source": "triton"}
    names = list(spec.signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
    try:
        src = ASTSource(fn=spec.fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as e:  # noqa: BLE001 - any compiler error is a failed row
        row.update(registers=None, spill_bytes=None, shared_bytes=None, mma=None,
                   error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        return row
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = _parse_res_usage(subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout)
    r = res[0] if res else {"registers": None, "stack": None, "shared": 0, "local": 0}
    mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none")
    row.update(registers=r["registers"], spill_bytes=(r["stack"] or 0) + (r["local"] or 0),
               shared_bytes=max(int(compiled.metadata.shared), r["shared"] or 0), mma=mma)
    if spec.expect_mma and mma != ("wgmma" if arch == "sm_90a" else "mma"):
        row["error"] = f"expected {'wgmma' if arch == 'sm_90a' else 'mma'} instructions, found {mma}"
    return row


def triton_rows(archs, kernel_filter=None, jobs=None) -> list[dict]:
    from . import _aot

    tool = cuobjdump()
    if tool is None:
        raise SystemExit("inspect: cuobjdump not found (it ships in the triton wheel)")
    specs = [s for s in _aot.all_specs() if kernel_filter is None or s.kernel_name == kernel_filter]
    work = [(s, a) for s in specs for a in archs]
    with ThreadPoolExecutor(max_workers=jobs or max(1, os.cpu_count() or 1)) as ex:
        return list(ex.map(lambda sa: _compile_triton(sa[0], sa[1], tool), work))


# ---------------------------------------------------------------------------------------------
# CUDA C++

def cuda_extension_path() -> str | None:
    spec = importlib.util.find_spec("spar_kernels._C_cuda")
    return spec.origin if spec and spec.origin else None


def _split_cuda_name(demangled: str) -> tuple[str, str]:
    """'void spar::(anon)::route_rows_kernel<spar::bf16_t, 8>(...)' -> ('route_rows_kernel', 'bf16_t, 8')."""
    head = demangled.replace("(anonymous namespace)::", "").split("(", 1)[0]
    tmpl = ""
    if head.endswith(">"):
        depth, i = 0, len(head) - 1
        while i >= 0:
            depth += head[i] == ">"
            depth -= head[i] == "<"
            if depth == 0:
                break
            i -= 1
        tmpl, head = head[i + 1:-1], head[:i]
    name = head.split("::")[-1].split(" ")[-1]
    tmpl = tmpl.replace("spar::", "").replace("(anonymous namespace)::", "")
    return name, tmpl or "-"


def cuda_rows(archs, kernel_filter=None) -> list[dict]:
    so = cuda_extension_path()
    tool = cuobjdump()
    if so is None or tool is None:
        return []
    res = _parse_res_usage(subprocess.run([tool, "-res-usage", so], capture_output=True, text=True).stdout)
    feats = _sass_features(subprocess.run([tool, "-sass", so], capture_output=True, text=True).stdout)
    demangled = _demangle([r["function"] for r in res])
    rows = []
    for r, dm in zip(res, demangled):
        if r["arch"] not in archs:
            continue
        name, tmpl = _split_cuda_name(dm)
        # the op is the csrc/<op>/ folder of the kernel's source file
        op = os.path.basename(os.path.dirname(r["source"])) or name
        cfg = f"{name}<{tmpl}>" if tmpl != "-" else name
        if kernel_filter is not None and kernel_filter not in (op, name):
            continue
        f = feats.get((r["arch"], r["function"]), {"mma": "none", "ldg128": False})
        rows.append({"kernel": op, "config": cfg, "arch": r["arch"], "source": "cuda",
                     "registers": r["registers"], "spill_bytes": r["stack"] + r["local"],
                     "shared_bytes": r["shared"], "mma": f["mma"], "ldg128": f["ldg128"]})
    return rows


# ---------------------------------------------------------------------------------------------

def failures(rows: list[dict]) -> list[str]:
    bad = []
    for r in rows:
        if r.get("error"):
            bad.append(f"{r['kernel']} [{r['config']}] {r['arch']}: {r['error']}")
        elif r["spill_bytes"]:
            bad.append(f"{r['kernel']} [{r['config']}] {r['arch']}: spills {r['spill_bytes']} bytes")
        elif (r.get("shared_bytes") or 0) > SMEM_LIMIT.get(r["arch"], float("inf")):
            bad.append(f"{r['kernel']} [{r['config']}] {r['arch']}: needs {r['shared_bytes']} bytes of shared "
                       f"memory per block, more than the {SMEM_LIMIT[r['arch']]} it allows")
    return bad


def format_table(rows: list[dict]) -> str:
    cols = ["kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "mma", "ldg128"]
    head = ["kernel", "config", "arch", "regs", "spill", "smem", "mma", "ldg128"]
    cells = [[("" if r.get(c) is None else str(r.get(c))) if not r.get("error") or c in ("kernel", "config", "arch")
              else "ERROR" for c in cols] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*c) for c in cells])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spar_kernels.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    p.add_argument("--kernel", help="only this kernel (Triton op name or CUDA kernel name substring)")
    p.add_argument("--arch", default="sm_80,sm_90a", help="comma-separated subset of sm_80,sm_90a")
    p.add_argument("--jobs", type=int, default=None, help="parallel Triton compilations")
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if a not in ARCHS:
            p.error(f"--arch: unknown arch {a!r}; expected a subset of {sorted(ARCHS)}")
    rows = triton_rows(archs, args.kernel, args.jobs) + cuda_rows(archs, args.kernel)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        if cuda_extension_path() is None:
            print("\n(no CUDA extension built: CUDA C++ kernels not listed)")
    bad = failures(rows)
    for b in bad:
        print("FAIL:", b, file=sys.stderr)
    if not rows:
        print("FAIL: no kernels found", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
