"""Build of afd_fast and its operator library afd_fast._C.

CUDA kernels are compiled when nvcc and a CUDA build of torch are present, otherwise the library
is CPU-only. Environment variables:
  AFD_FAST_CUDA=1|0         force the CUDA kernels on (fail without a toolkit) or off
  AFD_FAST_CUDA_ARCHS="8.0;9.0"  compute capabilities to compile for (default sm_80 and sm_90)
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


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

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# -fopenmp: at::parallel_for runs serially without it. -fno-trapping-math lets GCC turn the
# selects of afd_math.h into vector blends (without it, no class loop vectorises).
CPU_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-DAFD_FAST_PYTHON_MODULE"]


def _want_cuda() -> bool:
    import torch

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


def _nvcc_flags() -> list[str]:
    archs = os.environ.get("AFD_FAST_CUDA_ARCHS", "8.0;9.0")
    # --threads: the per-architecture compilations run in parallel.
    flags = ["-O3", "--use_fast_math", "-lineinfo", "--threads=0"]
    for arch in filter(None, archs.replace(",", ";").split(";")):
        cc = arch.replace(".", "").replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def _extension():
    sources = [os.path.join("csrc", f) for f in ("ops.cpp", "ops_cpu.cpp", "ops_cpu_avx2.cpp")]
    if _want_cuda():
        # The arch flags are ours: keep torch from adding its own list on top.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("AFD_FAST_CUDA_ARCHS", "8.0;9.0"))
        return CUDAExtension(
            "afd_fast._C",
            sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
            include_dirs=[os.path.join(ROOT, "csrc")] + _cuda_include_dirs(),
            extra_compile_args={"cxx": CPU_FLAGS, "nvcc": _nvcc_flags()},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "afd_fast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CPU_FLAGS}, extra_link_args=["-fopenmp"],
    )


setup(
    name="afd_fast",
    version="0.1.0",
    description="Fast online Adversarial Feature-map Distillation: fused loss ops and trainer",
    packages=find_packages(include=["afd_fast", "afd_fast.*"]),
    package_data={"afd_fast": ["recipes/*.yaml"]},  # the --recipe files, read from the installed package
    install_requires=["pyyaml"],  # --config, --recipe and config.yaml
    python_requires=">=3.10",
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
