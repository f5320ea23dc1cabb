"""Build spar: setup.py drives CMake (see CMakeLists.txt).

Environment:
  SPAR_BUILD_CUDA = auto (default) | 1 | 0   build the CUDA extension when nvcc is found / always / never
  SPAR_CUDA_ARCHS = "80;90a" (default)        archs of the CUDA extension's machine code
  SPAR_CUDA_PTX_ARCH = "" (default)           arch of its embedded PTX ("": the lowest of SPAR_CUDA_ARCHS;
                                              "none": no PTX); newer GPUs JIT-compile it
  SPAR_CPU_ARCH   = native (default)          -march of the CPU extension ("" for the compiler default)
  CUDA_HOME                                   where to look for nvcc besides PATH and /usr/local/cuda
"""

import os
import shutil
import subprocess
import sys
import time

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_nvcc():
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def want_cuda():
    mode = os.environ.get("SPAR_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"SPAR_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        print("spar: SPAR_BUILD_CUDA=0: building the CPU extension only", flush=True)
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            raise SystemExit("spar: SPAR_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        print("spar: nvcc not found; building the CPU extension only (set CUDA_HOME to build CUDA kernels)",
              flush=True)
        return None
    return nvcc


class CMakeExtension(Extension):
    def __init__(self, name, target):
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    def run(self):
        self.nvcc = want_cuda()
        if self.nvcc is None:
            self.extensions = [e for e in self.extensions if e.target != "_C_cuda"]
        self._configured = False
        super().run()

    def _configure(self, extdir):
        import pybind11

        os.makedirs(self.build_temp, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DSPAR_BUILD_CUDA={'ON' if self.nvcc else 'OFF'}",
            f"-DSPAR_CUDA_ARCHS={os.environ.get('SPAR_CUDA_ARCHS', '80;90a')}",
            f"-DSPAR_CUDA_PTX_ARCH={os.environ.get('SPAR_CUDA_PTX_ARCH', '')}",
            f"-DSPAR_CPU_ARCH={os.environ.get('SPAR_CPU_ARCH', 'native')}",
        ]
        if self.nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={self.nvcc}")
        if shutil.which("ninja"):
            args.append("-GNinja")
        subprocess.run(["cmake", "-S", ROOT, "-B", self.build_temp, *args], check=True)
        self._configured = True

    def build_extension(self, ext):
        extdir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        if not self._configured:
            self._configure(extdir)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        t0 = time.time()
        subprocess.run(["cmake", "--build", self.build_temp, "--target", ext.target, "-j", jobs], check=True)
        print(f"spar: built {ext.target} in {time.time() - t0:.0f} s", flush=True)


setup(
    name="spar",
    version="0.1.0",
    description="Fast inference kernels and runtime for unified multimodal models (SPAR, BAGEL, Show-o2, ...)",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["spar_kernels", "spar_kernels.*", "spar_runtime", "spar_runtime.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "triton>=3.1; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=7", "transformers>=4.56", "diffusers>=0.35", "pillow"],
        # the benchmarks time diffusers / transformers modules as peers of spar's ops
        "bench": ["pytest-benchmark>=4", "transformers>=4.56", "diffusers>=0.35", "pillow"],
        "runtime": ["tokenizers>=0.19", "pillow", "tqdm"],
    },
    ext_modules=[CMakeExtension("spar_kernels._C_cpu", "_C_cpu"), CMakeExtension("spar_kernels._C_cuda", "_C_cuda")],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["spar=spar_runtime.cli:main"]},
    zip_safe=False,
)
