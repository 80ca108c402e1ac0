#!/usr/bin/env bash
# Issue 14's GPU figures in one run (one H100/H200, at most about 8.5 minutes): engine vs bare samples/s per ZeRO stage and
# backend, compiled vs eager, GPU vs CPU JPEG decode (data_time share at the step rate), MFU eager and compiled,
# end-to-end samples/s/GPU and the projected hours for 205M samples on 8 GPUs. Every run is
# bench/pretrain_e2e.py (python -m pretrain on the base config, 448-px shards, 14 loader workers).
#
# Here, once (the GPU machine has no deepspeed, webdataset or simplejpeg, and no registry):
#     bash bench/gpu_wheels.sh                       # -> .whl/ (about 6 MB, ignored by git)
# Then one device call from the repo root, carrying .whl:
#     run(command="bash bench/gpu_issue14.sh", carry=[".whl"], timeout_s=600)
# It writes to $OUT (default runs/gpu_issue14): results.jsonl (one JSON object per run), summary.json (the
# figures side by side), all.log (everything printed). Each run has its own time limit, so a slow compile
# cannot take the others' figures with it. On a CPU, `GPU14_CPU=1 bash bench/gpu_issue14.sh` runs the same
# script with tiny settings (a test of the script, not a measurement).
set -uo pipefail
OUT=${OUT:-runs/gpu_issue14}
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
LOG="$OUT/all.log"
: > "$LOG"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 || { echo "wheel install failed" | tee -a "$LOG"; exit 3; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -n "${GPU14_CPU:-}" ]; then            # the script's own test on a CPU: tiny model, few steps
    COMMON=(--device cpu --model tiny --steps 3 --warmup 1 --workers 1 --images 48)
    T_EAGER=300; T_DEC=200; T_COMP=400; COMPILE_EXTRA=(engine.compile_backend=aot_eager)
else
    COMMON=(--device cuda --model base --steps 20 --workers 14 --images 1024)
    T_EAGER=210; T_DEC=70; T_COMP=220; COMPILE_EXTRA=()
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
fi
WORK=$(mktemp -d /tmp/gpu14.XXXX)          # shards and tokenizer built once, shared by the runs

run() {   # name, seconds, bench arguments...
    local name=$1 t=$2; shift 2
    echo "=== $name ($(date +%T), limit ${t}s): $*" | tee -a "$LOG"
    timeout -k 10 "$t" $PY bench/pretrain_e2e.py "${COMMON[@]}" --work "$WORK" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    cat "$WORK/$name.log" >> "$LOG"
    local last
    last=$(tail -n 1 "$WORK/$name.log")
    if [ $rc -eq 0 ] && [[ $last == "{"* ]]; then
        echo "{\"run\": \"$name\", \"result\": $last}" >> "$OUT/results.jsonl"
    else
        echo "{\"run\": \"$name\", \"error\": \"exit $rc\"}" >> "$OUT/results.jsonl"
    fi
    echo "=== $name exit $rc" | tee -a "$LOG"
}

# 1. eager: DeepSpeed ZeRO-0 and ZeRO-2 and the PyTorch engine (one GPU: no DDP wrapper), bare loop (bf16
#    weights, as DeepSpeed's bf16 mode runs; the ddp row's engine uses autocast over fp32 weights)
run eager "$T_EAGER" --backend deepspeed,ddp --zero 0,2 --vs
# 2. GPU JPEG decode on the PyTorch engine (compare data_time_share with run 1's ddp row)
run decode_gpu "$T_DEC" --backend ddp --decode-on gpu
# 3. compiled: DeepSpeed ZeRO-0 with engine.compile=true vs the compiled bare loop at the same precision (their
#    graphs match, so the bare compile mostly hits inductor's cache)
run compiled "$T_COMP" --backend deepspeed --zero 0 --compile --vs "${COMPILE_EXTRA[@]}"

$PY bench/summarize_issue14.py "$OUT/results.jsonl" > "$OUT/summary.json" 2>>"$LOG"
cat "$OUT/summary.json"
rm -rf "$WORK"
