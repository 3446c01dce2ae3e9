#!/usr/bin/env bash
# One command for a GPU machine (about 8 minutes on one H100/H200-class GPU at the defaults; random weights,
# speed does not depend on them):
#   bash benchmarks/gpu_check.sh                  # MAR-B at 256 px
#   bash benchmarks/gpu_check.sh > gpu_check.txt  # the figures for the README
# It prints, each section from a real run of the benchmarks/ scripts:
#   1. sampling images/s of MAR-B 256 px, 64 MAR steps, CFG 3.0 (one batched forward for cond + uncond), exact
#      (the reference: 100 ancestral steps, fp32) and the fast mode, at batch 64 and 256, with peak memory;
#   2. training images/s of MAR-B in bf16 (and bf16 + gradient checkpointing) and the peak memory;
#   1b. (CUDA only) the fast mode with the head's rows padded to a multiple of 1024 (bucket=1024) and the head
#      compiled as CUDA graphs (torch.compile mode reduce-overhead, static shapes), batch 64;
#   3. the largest sampling batch that fits (fast mode), found by doubling then bisection on OutOfMemoryError.
# Settings (environment): GPU_CHECK_SETTING (mar_base_256), GPU_CHECK_BATCHES ("64 256"), GPU_CHECK_NUM_ITER (64),
# GPU_CHECK_FAST (the fast mode's variant, benchmarks/common.parse_variant), GPU_CHECK_TRAIN_BATCH (64),
# GPU_CHECK_DEVICE (cuda if available, else cpu), PYTHON (the venv's python). On a CPU the last section is
# skipped (no OutOfMemoryError to find); tests/test_benchmark_scripts.py runs the whole script there at tiny sizes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
PY=${PYTHON:-"$here/../.venv/bin/python"}
SETTING=${GPU_CHECK_SETTING:-mar_base_256}
BATCHES=${GPU_CHECK_BATCHES:-"64 256"}
NUM_ITER=${GPU_CHECK_NUM_ITER:-64}
FAST=${GPU_CHECK_FAST:-"sampler=ddim,steps=10,cache=both,refresh=3,precision=bf16"}
TRAIN_BATCH=${GPU_CHECK_TRAIN_BATCH:-64}
DEVICE=${GPU_CHECK_DEVICE:-$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
start=$(date +%s)
echo "# gpu_check: $SETTING, batches $BATCHES, $NUM_ITER MAR steps, CFG 3.0, fast mode: $FAST, device $DEVICE"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== 1. sampling (exact and fast; s/image, images/s, peak memory)"
# shellcheck disable=SC2086
"$PY" bench_sampling.py --setting "$SETTING" --device "$DEVICE" --batch $BATCHES --num-iter "$NUM_ITER" --cfg 3.0 \
    --warmup 1 --warmup-num-iter 2 --variant exact "$FAST"

echo "== 1b. the fast mode with static head shapes: rows padded to a multiple of 1024, the head as CUDA graphs"
if [ "$DEVICE" = cuda ]; then
    # its own process, so a failure here (untested on a GPU so far) leaves the other sections' figures standing
    "$PY" bench_sampling.py --setting "$SETTING" --device "$DEVICE" --batch 64 --num-iter "$NUM_ITER" --cfg 3.0 \
        --warmup 1 --warmup-num-iter 2 --compile --compile-head-mode reduce-overhead --variant "$FAST,bucket=1024" \
        || echo "1b failed (rc $?): see the error above; sections 1, 2 and 3 do not depend on it"
else
    echo "skipped: needs CUDA (CUDA graphs)"
fi

echo "== 2. training (bf16; images/s and peak memory)"
"$PY" bench_training.py --setting "$SETTING" --device "$DEVICE" --batch "$TRAIN_BATCH" --steps 3 --precision bf16 \
    --grad-ckpt 0 1

echo "== 3. largest sampling batch ($FAST)"
if [ "$DEVICE" = cuda ]; then
    "$PY" max_batch.py --setting "$SETTING" --num-iter "$NUM_ITER" --cfg 3.0 --variant "$FAST"
else
    echo "skipped: needs CUDA (the search stops at the first torch.cuda.OutOfMemoryError)"
fi
echo "# gpu_check done in $(( $(date +%s) - start )) s"
