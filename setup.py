"""Build of the operator library afd_fast._C; the package's metadata is in pyproject.toml, the
sources, flags, C++ standard and default CUDA architectures in csrc/build.json (which
CMakeLists.txt reads too).

The extension is compiled against the torch already installed (its C++ ABI must match), hence
``pip install --no-build-isolation -e .`` with torch installed first. CUDA kernels are compiled
when nvcc and a CUDA build of torch are present, otherwise the library is CPU-only. Environment:
  AFD_FAST_CUDA=1|0         force the CUDA kernels on (fail without a toolkit) or off
  AFD_FAST_CUDA_ARCHS="8.0;9.0"  compute capabilities to compile for (default: csrc/build.json)
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "csrc", "build.json")) as f:
    BUILD = json.load(f)

try:
    import torch
except ImportError:
    sys.exit("afd_fast builds its operator library against the installed torch: install torch first "
             "(pip install 'torch>=2.11,<2.15'), then pip install --no-build-isolation -e .")


def _cuda_toolkit_root() -> str | None:
    """torch guesses the toolkit as dirname(dirname(which nvcc)); where nvcc is a wrapper or a link
    (e.g. /usr/local/bin/nvcc -> /usr/local/cuda-13.0) that root has no lib64/libcudart.so."""
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += sorted(glob.glob("/usr/local/cuda*"))
    for root in candidates:
        if os.path.exists(os.path.join(root, "lib64", "libcudart.so")) and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and _cuda_toolkit_root():
    os.environ["CUDA_HOME"] = _cuda_toolkit_root()

from torch.utils.cpp_extension import (  # noqa: E402
    COMMON_NVCC_FLAGS, CUDA_HOME, BuildExtension, CppExtension, CUDAExtension)

STD = f"-std=c++{BUILD['cxx_standard']}"
OPENMP = ["-fopenmp"] if BUILD["openmp"] else []
# AFD_FAST_PYTHON_MODULE: ops.cpp adds the PyInit__C that makes the library importable.
CXX_FLAGS = [STD, *BUILD["cxx_flags"], *OPENMP, "-DAFD_FAST_PYTHON_MODULE"]


def _want_cuda() -> bool:
    forced = os.environ.get("AFD_FAST_CUDA")
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if forced == "0":
        return False
    if forced == "1":
        if not available:
            sys.exit("AFD_FAST_CUDA=1 but no CUDA toolkit (nvcc) or no CUDA build of torch was found.")
        return True
    if not available:
        print("afd_fast: no CUDA toolkit or CPU-only torch: building the CPU kernels only.", file=sys.stderr)
    return available


def _cuda_include_dirs() -> list[str]:
    """The pip CUDA 13 wheels keep headers torch includes (cusparse.h, ...) in nvidia/cu13/include."""
    try:
        import nvidia
    except ImportError:
        return []
    return [p for base in nvidia.__path__ for p in glob.glob(os.path.join(base, "cu*", "include"))]


def _cuda_archs() -> list[str]:
    archs = os.environ.get("AFD_FAST_CUDA_ARCHS") or ";".join(BUILD["cuda_archs"])
    return [a for a in archs.replace(",", ";").split(";") if a]


def _nvcc_flags() -> list[str]:
    # --threads: the per-architecture compilations run in parallel. Flags torch adds itself
    # (COMMON_NVCC_FLAGS) are not repeated.
    flags = [STD, *(f for f in BUILD["cuda_flags"] if f not in COMMON_NVCC_FLAGS), "--threads=0"]
    for arch in _cuda_archs():
        cc = arch.replace(".", "").replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def _extension():
    include_dirs = [os.path.join(ROOT, d) for d in BUILD["include_dirs"]]
    if _want_cuda():
        # The arch flags are ours: keep torch from adding its own list on top.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(_cuda_archs()))
        return CUDAExtension(
            "afd_fast._C", BUILD["sources"] + BUILD["cuda_sources"], include_dirs=include_dirs + _cuda_include_dirs(),
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": _nvcc_flags()}, extra_link_args=OPENMP,
        )
    return CppExtension("afd_fast._C", BUILD["sources"], include_dirs=include_dirs,
                        extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=OPENMP)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
