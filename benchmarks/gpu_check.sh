#!/usr/bin/env bash
# The GPU check in one command (issue 11, goal 5): CUDA figures and a CUDA smoke run of every bundle, one summary.
#
#   bash benchmarks/gpu_check.sh [output_dir]
#
# Runs on a machine with torch + CUDA. Missing pure-Python dependencies (monai, nibabel, pydicom, pytorch-ignite,
# fire, jsonschema, ...) may lie as wheels in .whl/ at the repository root (or $WHEELS): they are installed into a private folder
# first. Without ITK (an 80 MB wheel) the DICOM items of the demo corpus are left out of the smoke run (printed).
# Steps, each logged to <output_dir>/<step>.log, with its exit status in the summary:
#   1. slice attention: fused Triton sampling vs PyTorch reference (check) and vs dense attention, fp32/bf16/fp16
#   2. joint step / encoder and throughput vs plain ResNet-50: demo size (bf16), paper size (bf16 and fp32)
#   3. finetune_heart / finetune_brainseg: train + evaluate + infer through monai.bundle (the end-to-end tests, on
#      CUDA with bf16 autocast since the configs pick the GPU), and the CUDA-only unit tests
#   4. pretrain_joint: one epoch of the cpu_demo preset on CUDA with amp, export, embeddings
# About 5 minutes on one H100.
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
PAPER="--image-size 224 --volumes-per-batch 4 --num-slices 64 --images-per-batch 32 --embed-dim 640"
declare -a NAMES STATUS SECONDS_USED
step() {
    local name=$1; shift
    local start=$SECONDS
    echo "=== $name: $*"
    "$@" > "$OUT_DIR/$name.log" 2>&1
    local status=$?
    NAMES+=("$name"); STATUS+=("$status"); SECONDS_USED+=("$((SECONDS - start))")
    tail -n 60 "$OUT_DIR/$name.log" | grep -v -i "warning" | tail -n 40
}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
step slice_attention python3 benchmarks/slice_attention_gpu.py
step step_demo_bf16 python3 benchmarks/pretrain_step.py --device cuda --sections a --amp bfloat16
step step_paper_bf16 python3 benchmarks/pretrain_step.py --device cuda --sections a --amp bfloat16 $PAPER
step step_paper_fp32 python3 benchmarks/pretrain_step.py --device cuda --sections a $PAPER
step finetune_bundles python3 -m pytest -q -p no:cacheprovider tests/segmentation/test_seg_bundles.py \
    tests/nets/test_nets_slice_sampling.py tests/engines/test_engines_mixed_precision.py
step pretrain_bundle python3 benchmarks/pretrain_smoke.py --output "${TMPDIR:-/tmp}/gpu_check_pretrain_smoke"
echo
echo "| step | exit status | seconds |"
echo "|---|---:|---:|"
failed=0
for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECONDS_USED[$i]} |"
    [ "${STATUS[$i]}" = 0 ] || failed=1
done
grep -h "PASS\|FAIL" "$OUT_DIR"/slice_attention.log "$OUT_DIR"/step_*.log | sed 's/^ */  /'
exit $failed
