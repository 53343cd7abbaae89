#!/usr/bin/env bash
# One-command GPU self-check: builds the extension for this card, runs the CUDA tests, the op, data
# and step benchmarks, the performance model's steps (measured against predicted) and a short
# end-to-end training, and writes one report. Sized for a 15-minute device budget on an H100/H200
# (build included). Needs PyTorch with CUDA and the CUDA toolkit, and no package from a registry
# (nothing is downloaded); without NVIDIA DALI it says so and skips only the DALI parts.
#
#   benchmarks/gpu_check.sh [OUTPUT_FOLDER]     (default benchmarks/results/gpu-check)
#   benchmarks/gpu_check.sh --dry-run [FOLDER]  every step with the flags it uses on a GPU, plus flags
#                                               for the CPU and tiny sizes appended (CI runs this;
#                                               default folder build/gpu-check-dry); the build only
#                                               resolves (pip --dry-run)
#   AFD_FAST_IMAGENETTE=/path/imagenette-mini   JPEG folder for the data and end-to-end rows
#                                               (default ../shared/data/imagenette-mini)
#   PYTHON=python3                              the interpreter to use
#   SKIP_BUILD=1                                use the extension already built (e.g. by an earlier call)
#   GPU_CHECK_BUDGET_S=780                      seconds for the whole check: a step gets at most what is
#                                               left, and is skipped (and reported) under 30 s; 780 s
#                                               leaves 2 of a 15-minute lease for the machine's start
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = --dry-run ]; then DRY=1; shift; fi
OUT=${1:-$([ $DRY = 1 ] && echo build/gpu-check-dry || echo benchmarks/results/gpu-check)}
PY=${PYTHON:-$(command -v python || echo python3)}  # the GPU image may have python3 only
DATA=${AFD_FAST_IMAGENETTE:-../shared/data/imagenette-mini}
mkdir -p "$OUT"
REPORT="$OUT/report.md"
FAILED=0
SKIPPED=0
BUDGET=${GPU_CHECK_BUDGET_S:-$([ $DRY = 1 ] && echo 3600 || echo 780)}

step() {  # step NAME LIMIT_SECONDS "DRY-RUN FLAGS" COMMAND...: runs it, keeps its log, adds its tail
  local name=$1 limit=$2 tiny=$3  # to the report; a dry run appends the dry-run flags to COMMAND
  shift 3
  local start=$SECONDS left=$((BUDGET - SECONDS))
  if [ $left -lt 30 ]; then
    echo "## $name — skipped: ${left} s left of the ${BUDGET} s budget" >>"$REPORT"
    SKIPPED=$((SKIPPED + 1))
    return
  fi
  [ "$limit" -gt $left ] && limit=$left
  echo "== $name" >&2
  # shellcheck disable=SC2086  # the dry-run flags are a word list
  [ $DRY = 1 ] && set -- "$@" $tiny && limit=$((limit * 4))  # a CPU is slower: the flags count, not the time
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
  echo "# afd_fast GPU self-check — $(date -u '+%Y-%m-%d %H:%M UTC')$([ $DRY = 1 ] && echo ' — DRY RUN on the CPU, tiny sizes')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
           torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1
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

# the card's compute capability (a dry run: the H200's)
ARCH=$([ $DRY = 1 ] && echo 9.0 || $PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  # --no-index: nothing from a registry; on 16 cores the build is about one compilation of ops_cuda.cu
  step build 300 "--dry-run" env AFD_FAST_CUDA=1 AFD_FAST_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e .
fi
CPU="--device cpu"  # what a dry run appends to the device flags (argparse: the last one counts)
step cuda-tests 150 "" $PY -m pytest -q -m cuda tests
# the performance model's steps (benchmarks/results/model.json) timed, measured against predicted
step model 120 "$CPU --quick --iters 1" $PY benchmarks/model.py --measure --ks 2 --iters 10 \
  --output "$OUT/model-measured-cuda.json"
step ops-benchmark 90 "$CPU --quick --no-compile" $PY benchmarks/ops.py --iters 30 --output "$OUT/ops-cuda.json"
step data-benchmark 60 "$CPU --quick" $PY benchmarks/data.py "${DATA_ARGS[@]}" --output "$OUT/data-cuda.json"
step step-benchmark 180 "$CPU --quick --iters 2" $PY benchmarks/step.py --iters 15 "${DATA_ARGS[@]}" \
  --output "$OUT/step-cuda.json"
# with mixup/CutMix: their draws inside the captured graph, end to end
step train 90 "$CPU --max-steps 2" $PY -m afd_fast.train --device cuda --epochs 2 --mixup 0.2 --cutmix 1.0 \
  --output "$OUT/train"
# the paper's baselines (vanilla, sequential DML, ONE, AFD, offline L1+KD) end to end, 6 steps each: past
# GraphedStep's warm-up, so every method's step is captured and replayed
step accuracy-quick 120 "$CPU --seeds 1" $PY benchmarks/accuracy.py --quick --device cuda --train-args "--max-steps 6" \
  --runs "$OUT/accuracy-runs" --output "$OUT/accuracy-quick-cuda.json"
if grep -rl "capture failed" "$OUT/accuracy-runs" "$OUT/train.log" >/dev/null 2>&1; then
  echo "**A CUDA graph capture failed in the training or accuracy runs (they trained eagerly):** $(grep -rl 'capture failed' "$OUT/accuracy-runs" "$OUT/train.log" | tr '\n' ' ')" >>"$REPORT"
  FAILED=$((FAILED + 1))
fi

echo "**$FAILED step(s) failed, $SKIPPED skipped**, $SECONDS s in all. Logs and JSON: \`$OUT/\`." >>"$REPORT"
echo "report: $REPORT ($FAILED failed, $SKIPPED skipped, $SECONDS s)" >&2
exit $((FAILED > 0))
