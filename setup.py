"""Builds fsdfm._C: the CPU kernels always, the CUDA kernels when a CUDA torch and nvcc are there.

FSDFM_CUDA=auto (default) | 0 (CPU only) | 1 (require CUDA).
TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0.
Build with `python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`.
"""

import os
import sys

try:
    import torch
except ImportError:  # pip's isolated build environment, or torch not installed yet
    raise SystemExit(
        "fsdfm builds its kernels against the installed PyTorch, which this Python lacks: install "
        "torch first (e.g. pip install torch==2.13.0), then pip install --no-build-isolation ."
    ) from None
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

mode = os.environ.get("FSDFM_CUDA", "auto")
if mode not in ("auto", "0", "1"):
    raise SystemExit(f"FSDFM_CUDA must be auto, 0 or 1, got {mode!r}")
cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
if mode == "1" and not cuda_possible:
    raise SystemExit("FSDFM_CUDA=1 needs a CUDA build of torch and nvcc (set CUDA_HOME)")
with_cuda = mode == "1" or (mode == "auto" and cuda_possible)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

sources = ["csrc/bindings.cpp", "csrc/cpu/ops_cpu.cpp", "csrc/cpu/head_cpu.cpp"]
# The language standard is torch's own (C++17 for torch 2.11, C++20 for 2.13); the sources are
# C++17, which CI checks by building against torch 2.11 and with CMake.
# -fno-trapping-math lets GCC if-convert the selects of the CPU loops and so vectorise them.
# -fopenmp: at::parallel_for is an inline header that runs on OpenMP threads only where _OPENMP
# is defined; without it every row runs on one thread whatever torch.get_num_threads() says.
# The OpenMP runtime is torch's own (the libgomp.so.1 that libtorch_cpu already loaded).
flags = {"cxx": ["-O3", "-fno-math-errno", "-fno-trapping-math"]}
link = []
if sys.platform.startswith("linux"):
    flags["cxx"].append("-fopenmp")
    link.append("-fopenmp")
Extension = CppExtension
if with_cuda:
    sources += ["csrc/cuda/ops_cuda.cu", "csrc/cuda/head_cuda.cu"]
    flags["nvcc"] = ["-O3", "-lineinfo"]
    Extension = CUDAExtension

setup(
    ext_modules=[
        Extension(
            "fsdfm._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=flags,
            extra_link_args=link,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
