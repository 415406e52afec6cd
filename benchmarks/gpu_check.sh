#!/usr/bin/env bash
# The GPU check in one command (issue 11, goal 5): CUDA figures and a CUDA smoke run of every bundle, one summary.
#
#   bash benchmarks/gpu_check.sh [output_dir]
#
# Runs on a machine with torch + CUDA. Missing pure-Python dependencies (monai, nibabel, pydicom, pytorch-ignite,
# fire, jsonschema, ...) may lie as wheels in .whl/ at the repository root (or $WHEELS): they are installed into a private folder
# first. Without ITK (an 80 MB wheel) the DICOM items of the demo corpus are left out of the smoke run (printed).
# Steps, each logged to <output_dir>/<step>.log, with its exit status in the summary:
#   1. figures: `benchmarks/run_all.py --device cuda` into a copy of docs/benchmarks.md (<output_dir>/benchmarks.md):
#      slice attention (Triton sampling checked against the PyTorch reference, timed against it and dense attention
#      in fp32/bf16/fp16), joint step / encoder and throughput vs plain ResNet-50 at demo and paper sizes
#   2. finetune_heart / finetune_brainseg: train + evaluate + infer through monai.bundle (the end-to-end tests, on
#      CUDA with bf16 autocast since the configs pick the GPU), the CUDA-only unit tests, and the NaN guard (also
#      under float16 autocast with a gradient scaler on CUDA)
#   3. pretrain_joint: one epoch of the cpu_demo preset on CUDA with amp and the fast-path switches (pinned memory,
#      channels-last, fused SGD), export, embeddings
# About 6 minutes on one H200 (335 s, 2026-11-28, with 4 of today's 10 figure scripts; 8-10 minutes expected now).
# Each step is stopped after STEP_TIMEOUT seconds (default 300), the figures step after FIGURES_TIMEOUT (default 360;
# run_all.py's CUDA list runs the most informative scripts first), each figure script after half of STEP_TIMEOUT; the
# figures of the scripts that finished are kept.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_check_output}
mkdir -p "$OUT_DIR"
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu_check_site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
declare -a NAMES STATUS SECONDS_USED
STEP_TIMEOUT=${STEP_TIMEOUT:-300}  # seconds per step; a step past it is stopped (exit status 124) and the next one runs
FIGURES_TIMEOUT=${FIGURES_TIMEOUT:-360}  # the figures step: 10 scripts of 25-100 s each on one H200; the last are cut
step() {
    local limit=$1 name=$2; shift 2
    local start=$SECONDS
    echo "=== $name: $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local status=$?
    NAMES+=("$name"); STATUS+=("$status"); SECONDS_USED+=("$((SECONDS - start))")
    grep -v -i "warn" "$OUT_DIR/$name.log" | tail -n 25
}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
cp docs/benchmarks.md "$OUT_DIR/benchmarks.md"
step "$FIGURES_TIMEOUT" figures python3 benchmarks/run_all.py --device cuda --output "$OUT_DIR/benchmarks.md" \
    --script-timeout "$((STEP_TIMEOUT / 2))"
step "$STEP_TIMEOUT" finetune_bundles python3 -m pytest -q -p no:cacheprovider tests/segmentation/test_seg_bundles.py \
    tests/nets/test_nets_slice_sampling.py tests/engines/test_engines_mixed_precision.py tests/engines/test_nan_guard.py
step "$STEP_TIMEOUT" pretrain_bundle python3 benchmarks/pretrain_smoke.py --output "${TMPDIR:-/tmp}/gpu_check_pretrain_smoke" --fast-path
echo
echo "| step | exit status | seconds |"
echo "|---|---:|---:|"
failed=0
for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECONDS_USED[$i]} |"
    [ "${STATUS[$i]}" = 0 ] || failed=1
done
sed -n '/run_all.py cuda: begin/,/run_all.py cuda: end/p' "$OUT_DIR/benchmarks.md" | grep "PASS\|FAIL" | sed 's/^ */  /'
exit $failed
