"""Test-only C++ operators (tests/native/), compiled on first use and cached under build/test_native."""
from __future__ import annotations

import functools
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@functools.cache
def _library() -> None:
    from torch.utils.cpp_extension import load

    # one folder per torch and Python, as tests/cuda_emu: CI builds under torch 2.14 and 2.11
    build_dir = os.path.join(ROOT, "build", "test_native",
                             f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")
    os.makedirs(build_dir, exist_ok=True)
    load(name="afd_fast_test", sources=[os.path.join(HERE, "native", "online_row_stats.cpp")],
         extra_include_paths=[os.path.join(ROOT, "csrc")], extra_cflags=["-O2"], build_directory=build_dir,
         is_python_module=False)


def online_row_stats():
    """torch.ops.afd_fast_test.online_row_stats (see tests/native/online_row_stats.cpp)."""
    _library()
    return torch.ops.afd_fast_test.online_row_stats
