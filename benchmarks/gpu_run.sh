#!/usr/bin/env bash
# Every GPU measurement of the project, in one prepared run on a machine with a CUDA GPU such as an H100/H200 (about
# 5 minutes there by estimate; each stage has a time limit, 7.5 minutes in all). From the repository root:
#   bash benchmarks/gpu_run.sh
#
#   env        versions and the GPU
#   precision  precision_check.py on DeiT-Small: the bf16/fp16 terms are float32 math and agree with float32, the
#              weight term stays finite above fp16's range, compute_loss + backward make no host sync (sync debug mode)
#   overhead   overhead.py: DeiT-Small 224 px, bf16, batch 128, every variant (the GPU table and its targets)
#   train      run_diverse.py: a bf16 DeiT-Small run of 300 steps on synthetic 256 px JPEGs, cropped to 224 px by
#              the DeiT augmentation, images/s
#   compile    overhead.py --compile, variants a and b (the model-level torch.compile that --torch_compile uses)
#   report     gpu_report.py: all of the above as the Markdown section for benchmarks/RESULTS.md (also printed)
#
# Outputs go to $OUT (benchmarks/gpu_out when unset), 8 files: env.txt, precision.json, overhead.json, train.log,
# train_state.json, compile.json, report.md and stderr.log. Each stage runs even when an earlier one failed or ran out
# of time; the exit code is the number of failed stages. gpu_report.py can be rerun anywhere on what the run left.
#
# For a GPU machine without network access: Python packages it lacks can be put as wheels in .whl/ (the download
# command is in benchmarks/RESULTS.md); they are installed into /tmp/site. This checkout is put on PYTHONPATH. A wheel
# set that does not install or import is dropped (logged in stderr.log), and the stages run on the machine's own
# packages.
#
# GPU_RUN_SMOKE=1 runs the same stages on the CPU with tiny settings (no compile, no wheels): what the test suite checks.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/gpu_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "${GPU_RUN_SMOKE:-0}" = 1 ]; then
    DEVICE=cpu CONFIG=tiny MODEL_CONFIG=deit-tiny BATCH=4 PRECISION_BATCH=4 WARMUP=0 REPEATS=1 COMPILE=0
    STEPS=2 LOG_STEPS=1 NUM_TRAIN=16 NUM_VAL=8 NUM_CLASSES=4 IMAGE_SIZE=32 WORKERS=0 TRAIN_DEVICE_FLAGS=--use_cpu
else
    DEVICE=cuda CONFIG=deit-small MODEL_CONFIG=deit-small BATCH=128 PRECISION_BATCH=32 WARMUP=3 REPEATS=10 COMPILE=1
    STEPS=300 LOG_STEPS=50 NUM_TRAIN=4096 NUM_VAL=512 NUM_CLASSES=100 IMAGE_SIZE=256 WORKERS=12 TRAIN_DEVICE_FLAGS=
fi
export PYTHON WORK MODEL_CONFIG BATCH STEPS LOG_STEPS NUM_TRAIN NUM_VAL NUM_CLASSES IMAGE_SIZE WORKERS TRAIN_DEVICE_FLAGS
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${GPU_RUN_SMOKE:-0}" != 1 ] && compgen -G ".whl/*.whl" > /dev/null; then  # wheels are for the GPU image
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >> "$OUT/stderr.log" 2>&1 \
        && PYTHONPATH=/tmp/site:$PYTHONPATH "$PYTHON" -c "import transformers, datasets, evaluate" >> "$OUT/stderr.log" 2>&1
    then
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    else
        echo "== the wheels in .whl/ did not install or import (stderr.log); running on the image's packages" \
            | tee -a "$OUT/stderr.log"
    fi
fi

failed=0
# stage NAME LIMIT_S STDOUT_FILE COMMAND...: stdout to $OUT/STDOUT_FILE, stderr appended to $OUT/stderr.log, killed
# after LIMIT_S seconds (COMMAND may be one of the exported functions below).
stage() {
    local name=$1 limit=$2 stdout=$3 start=$SECONDS
    shift 3
    echo "== $name: $*" | tee -a "$OUT/stderr.log"
    if timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" > "$OUT/$stdout" 2>> "$OUT/stderr.log"; then
        echo "== $name ok ($((SECONDS - start)) s)"
    else
        local status=$?
        echo "== $name FAILED$([ "$status" -ge 124 ] && echo ", out of its ${limit} s") ($((SECONDS - start)) s); last lines:"
        tail -n 15 "$OUT/stderr.log"
        [ "${stdout##*.}" = log ] && tail -n 15 "$OUT/$stdout"
        failed=$((failed + 1))
    fi
}

environment() {
    date -u +%Y-%m-%dT%H:%M:%SZ
    uname -srm
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" - << 'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "torchvision", "transformers", "accelerate", "datasets", "evaluate", "pyarrow", "huggingface_hub"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # report what is missing, do not stop
        print(name, "MISSING:", type(error).__name__, error)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
EOF
}

train() {
    "$PYTHON" benchmarks/synthetic_imagefolder.py --output "$WORK/synthetic" --num_train "$NUM_TRAIN" \
        --num_val "$NUM_VAL" --num_classes "$NUM_CLASSES" --image_size "$IMAGE_SIZE" || return
    echo "command: run_diverse.py --model_config_name $MODEL_CONFIG, synthetic ${IMAGE_SIZE} px JPEGs, batch $BATCH"
    # shellcheck disable=SC2086  # TRAIN_DEVICE_FLAGS is empty or one flag
    "$PYTHON" examples/run_diverse.py --model_config_name "$MODEL_CONFIG" \
        --train_dir "$WORK/synthetic/train" --validation_dir "$WORK/synthetic/val" --augmentation deit \
        --bf16 --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" --max_steps "$STEPS" \
        --learning_rate 1e-3 --warmup_steps 0.1 --logging_steps "$LOG_STEPS" --eval_strategy no --save_strategy no \
        --dataloader_num_workers "$WORKERS" --output_dir "$WORK/run" $TRAIN_DEVICE_FLAGS 2>&1 || return
    cp "$WORK/run/trainer_state.json" "$OUT/train_state.json"
}
export -f environment train
export OUT

stage env 60 env.txt environment
stage precision 90 precision.json "$PYTHON" benchmarks/precision_check.py --config "$CONFIG" --device "$DEVICE" \
    --batch_size "$PRECISION_BATCH" --json
stage overhead 120 overhead.json "$PYTHON" benchmarks/overhead.py --config "$CONFIG" --device "$DEVICE" --dtype bf16 \
    --batch_size "$BATCH" --warmup "$WARMUP" --repeats "$REPEATS" --json
stage train 150 train.log train
if [ "$COMPILE" = 1 ]; then
    stage compile 120 compile.json "$PYTHON" benchmarks/overhead.py --config "$CONFIG" --device "$DEVICE" \
        --dtype bf16 --batch_size "$BATCH" --warmup "$WARMUP" --repeats "$REPEATS" --only a,b --compile --json
fi
stage report 30 report.md "$PYTHON" benchmarks/gpu_report.py "$OUT"
cat "$OUT/report.md"
echo "== $failed stage(s) failed; outputs in $OUT"
exit "$failed"
