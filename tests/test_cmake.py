"""CMakeLists.txt builds the operator library for libtorch users, and it loads and computes."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_library_builds_and_loads(tmp_path):
    build = tmp_path / "build"
    configure = ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DPython3_EXECUTABLE={sys.executable}"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"]):
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lib = build / "libafd_fast_ops.so"
    assert lib.exists()
    # A fresh process: the Python extension of this one already registered the same operators.
    code = (
        "import torch\n"
        f"torch.ops.load_library({str(lib)!r})\n"
        "from afd_fast import reference\n"
        "z = torch.randn(2, 5, 11, dtype=torch.float64); y = torch.randint(0, 11, (5,))\n"
        "w = torch.tensor([[0.0, 1.0], [1.0, 0.0]])\n"
        "got = torch.ops.afd_fast.mutual_distillation_forward(z, y, w, 3.0, 1.0, 1.0, 0.0, False)\n"
        "want = reference.mutual_distillation_loss(z, y, w)\n"
        "assert all(torch.allclose(a, b) for a, b in zip(got[:3], want)), (got, want)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
