#!/usr/bin/env bash
# One-command GPU self-check: builds the extension for this card, runs the CUDA tests, the op, data
# and step benchmarks and a short end-to-end training, and writes one report. Sized for about
# 10 minutes on an H100. Needs PyTorch with CUDA and the CUDA toolkit; without NVIDIA DALI it says
# so and skips only the DALI parts.
#
#   benchmarks/gpu_check.sh [OUTPUT_FOLDER]     (default benchmarks/results/gpu-check)
#   AFD_FAST_IMAGENETTE=/path/imagenette-mini   JPEG folder for the data and end-to-end rows
#                                               (default ../shared/data/imagenette-mini)
#   PYTHON=python3                              the interpreter to use
#   SKIP_BUILD=1                                use the extension already built (e.g. by an earlier call)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-check}
PY=${PYTHON:-python}
DATA=${AFD_FAST_IMAGENETTE:-../shared/data/imagenette-mini}
mkdir -p "$OUT"
REPORT="$OUT/report.md"
FAILED=0

step() {  # step NAME LIMIT_SECONDS COMMAND...: runs it, keeps its log, adds its tail to the report
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name" >&2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
  {
    echo "## $name — exit $rc, $((SECONDS - start)) s"
    echo
    echo "\`$*\`"
    echo
    echo '```'
    tail -n 40 "$OUT/$name.log"
    echo '```'
    echo
  } >>"$REPORT"
}

{
  echo "# afd_fast GPU self-check — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" 2>&1
  nvcc --version 2>&1 | tail -n 1
  echo '```'
  echo
} >"$REPORT"
if $PY -c "import nvidia.dali" 2>/dev/null; then
  echo "NVIDIA DALI: $($PY -c 'import nvidia.dali as d; print(d.__version__)')" >>"$REPORT"
else
  echo "**NVIDIA DALI is not installed: the DALI tests, the DALI rows of the data benchmark and DALI end to end are skipped** (the end-to-end rows use the torchvision DataLoader)." >>"$REPORT"
fi
if [ -d "$DATA" ]; then DATA_ARGS=(--data "$DATA"); else
  echo "**No JPEG folder at $DATA: no JPEG rows** (set AFD_FAST_IMAGENETTE)." >>"$REPORT"
  DATA_ARGS=(--data "")
fi
echo >>"$REPORT"

ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step build 300 env AFD_FAST_CUDA=1 AFD_FAST_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" \
    $PY -m pip install --no-build-isolation --no-deps -e .
fi
step cuda-tests 150 $PY -m pytest -q -m cuda tests
step ops-benchmark 90 $PY benchmarks/ops.py --iters 30 --output "$OUT/ops-cuda.json"
step data-benchmark 60 $PY benchmarks/data.py "${DATA_ARGS[@]}" --output "$OUT/data-cuda.json"
step step-benchmark 180 $PY benchmarks/step.py --iters 15 "${DATA_ARGS[@]}" --output "$OUT/step-cuda.json"
step train 90 $PY -m afd_fast.train --device cuda --epochs 2 --output "$OUT/train"
# the paper's baselines (vanilla, sequential DML, ONE, AFD, offline L1+KD) end to end, 6 steps each: past
# GraphedStep's warm-up, so every method's step is captured and replayed
step accuracy-quick 120 $PY benchmarks/accuracy.py --quick --device cuda --train-args "--max-steps 6" \
  --runs "$OUT/accuracy-runs" --output "$OUT/accuracy-quick-cuda.json"
if grep -rl "capture failed" "$OUT/accuracy-runs" >/dev/null 2>&1; then
  echo "**A CUDA graph capture failed in the accuracy runs (they trained eagerly):** $(grep -rl 'capture failed' "$OUT/accuracy-runs" | tr '\n' ' ')" >>"$REPORT"
  FAILED=$((FAILED + 1))
fi

echo "**$FAILED step(s) failed.** Logs and JSON: \`$OUT/\`." >>"$REPORT"
echo "report: $REPORT ($FAILED failed)" >&2
exit $((FAILED > 0))
