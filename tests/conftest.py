import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny networks: a second thread buys nothing and spins against
    other processes on a shared machine (use: pytestmark = pytest.mark.usefixtures("one_torch_thread"))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _extension_is_built():
    """The suite tests the compiled kernels: a silent fallback to the reference would test nothing."""
    import afd_fast.ops as ops

    if not ops.HAS_EXTENSION and os.environ.get("AFD_FAST_ALLOW_REFERENCE") != "1":
        pytest.exit("afd_fast._C is not built: run `pip install --no-build-isolation -e .` first", returncode=2)


@pytest.fixture(scope="session", autouse=True)
def _no_bf16_strided_conv_on_one_pixel():
    """Every in-process test fails at once if a bfloat16 CPU convolution runs strided on a 1x1 map:
    torch's oneDNN computes garbage weight gradients there on x86 CPUs with native bf16 (tests/test_upstream_bugs.py),
    so such a test would pass on one x86 machine and fail at random on another. Give the network a
    larger image size (tests/test_upstream_bugs.py walks the suite's bf16 cases' shapes too)."""
    from torch._subclasses.fake_tensor import FakeTensor

    from afd_fast.models.base import is_strided_conv_on_one_pixel

    def check(module, args):
        x = args[0] if args else None
        if torch.compiler.is_compiling() or not is_strided_conv_on_one_pixel(module, x):
            return
        if isinstance(x, FakeTensor) or x.device.type != "cpu":
            return
        bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                              and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        if bf16:
            raise AssertionError(f"a bfloat16 CPU convolution with stride {module.stride} on a 1x1 map "
                                 f"({module}, input {tuple(x.shape)}): its weight gradient is garbage on x86 CPUs "
                                 "with native bf16 (AMX, avx512_bf16): give this test's network a larger image size")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    yield
    handle.remove()
