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


@pytest.fixture(scope="session", autouse=True)
def _extension_is_built():
    """The suite tests the compiled kernels: a silent fallback to the reference would test nothing."""
    import afd_fast.ops as ops

    if not ops.HAS_EXTENSION and os.environ.get("AFD_FAST_ALLOW_REFERENCE") != "1":
        pytest.exit("afd_fast._C is not built: run `pip install --no-build-isolation -e .` first", returncode=2)
