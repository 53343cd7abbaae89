#!/usr/bin/env bash
# CI's second environment: the software of the GPU machine that benchmarks/gpu_check.sh runs on
# (Python 3.12, torch 2.11.0 with CUDA 13.0, torchvision 0.26.0, no DALI, nothing downloadable
# there), so that an incompatibility with it fails here rather than in a GPU session. In
# ./.venv-gpu-image: builds the extension with its CUDA kernels for sm_90 (as gpu_check.sh builds it
# for an H100/H200), checks that they are in it, runs the op, emulated-kernel and capture-safety
# tests, and then gpu_check.sh --dry-run: every step of the GPU check with its GPU flags, on the CPU
# at tiny sizes.
#
#   .ci/gpu_image_env.sh          (PYTHON312=/path/to/python3.12 when it is not on the PATH)
#
# Measured on the 2-core CI VM (2026-12-04): the install downloads 2.6 GB (38 wheels, torch 530 MB,
# the CUDA 13.0 libraries) and takes 4.7 GB on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=""  # the first Python 3.12 that runs (a pyenv shim on the PATH may not)
for candidate in ${PYTHON312:-} python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
    PY312=$candidate
    break
  fi
done
if [ -z "$PY312" ]; then
  echo "gpu_image_env: no Python 3.12 found: install it or set PYTHON312=/path/to/python3.12" >&2
  exit 1
fi
if ! command -v nvcc >/dev/null; then
  echo "gpu_image_env: nvcc is not on the PATH: the CUDA kernels cannot be built (install the CUDA 13 toolkit)" >&2
  exit 1
fi
start=$SECONDS
"$PY312" -m venv .venv-gpu-image
. .venv-gpu-image/bin/activate
# the image has setuptools, pytest, matplotlib and timm ([dev]); DALI it has not
pip install torch==2.11.0 torchvision==0.26.0 "setuptools>=70.1" ninja
echo "gpu_image_env: torch installed after $((SECONDS - start)) s" >&2
# the editable install puts _C.cpython-312-*.so beside the first environment's _C.cpython-311-*.so
AFD_FAST_CUDA=1 AFD_FAST_CUDA_ARCHS=9.0 pip install --no-build-isolation -e ".[dev]"
echo "gpu_image_env: built in $((SECONDS - start)) s" >&2
python - <<'EOF'
import torch
import afd_fast._C  # noqa: F401  (the extension, built above)
# the CUDA kernels are registered for the CUDA dispatch key: a CPU-only build would have none
assert torch._C._dispatch_has_kernel_for_dispatch_key("afd_fast::mutual_distillation_forward", "CUDA"), \
    "the extension was built without its CUDA kernels"
print("torch", torch.__version__, "CUDA", torch.version.cuda, ": afd_fast._C has its CUDA kernels")
EOF
python -m pytest -q tests/test_ops.py tests/test_cuda_emulated.py tests/test_capture_safety.py
echo "gpu_image_env: tests done after $((SECONDS - start)) s" >&2
PYTHON=python benchmarks/gpu_check.sh --dry-run build/gpu-check-dry
echo "gpu_image_env: gpu_check.sh --dry-run done after $((SECONDS - start)) s" >&2
