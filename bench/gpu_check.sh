#!/usr/bin/env bash
# Every measurement of issue 13 that only a GPU can give, in one run that fits in 8 minutes on one H100/H200:
#   1. training step, 124M, T=1024, bf16, compiled (inductor), flash attention, B=64: ours (loss only, chunked CE)
#      and GPT2LMHeadModel: tok/s, MFU, peak CUDA memory (max_memory_allocated), ratios
#   2. the same at B=16
#   3. ours the old way (logits + library loss), B=64: what skip_logits saves, against step 1's rows
#   4. cuDNN attention against step 1's flash row for ours, B=64
#   5. HellaSwag-shaped scoring speed, 124M, the full validation size (10,042 examples)
#   6. batch-1 greedy decode, dynamic and static KV cache, ours and GPT2LMHeadModel
# bench_train.py prints its table when all its models are done, so each step holds few models: a timeout loses
# one step's rows, not the run's.
# Each step runs under its own `timeout` and the whole run under a deadline (GPU_CHECK_BUDGET_S, default 450 s): a
# step that fails or times out is logged and the next one runs; a step that no longer fits is skipped. All output
# goes to $OUT/gpu_check.log (the device tool brings $OUT back; without $OUT, a new /tmp/gpu_check.* folder), each
# step's output also to gpu_check_steps/<step>.txt there, and a summary of every step's tables ends the log. The
# steps run in order of importance: the headline first.
#
#   bash bench/gpu_check.sh                   # from the repository root (or anywhere: it cds there)
#   GPU_CHECK_BUDGET_S=900 bash bench/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh   # no GPU needed: parses every step's flags with its script's parser
#
# Exit status: 0 when every step succeeded, 1 otherwise; 2 when there is no usable GPU (nothing else runs).

set -u
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
LOG_DIR=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$LOG_DIR/gpu_check_steps" || exit 2
LOG="$LOG_DIR/gpu_check.log"
START=$(date +%s)
FAILED=0
SUMMARY=()

log() { echo "$*" | tee -a "$LOG"; }

# step NAME TIMEOUT_S MIN_S COMMAND...: runs COMMAND with its output in the log and in gpu_check_steps/NAME.txt;
# the timeout is cut to what is left of the budget, and the step is skipped when less than MIN_S is left.
step() {
    local name=$1 limit=$2 min_s=$3
    shift 3
    local left=$((BUDGET_S - ($(date +%s) - START)))
    local out="$LOG_DIR/gpu_check_steps/$name.txt"
    if ((left < min_s)); then
        log "=== $name: SKIPPED, ${left}s of the budget left, needs ${min_s}s"
        SUMMARY+=("$name: SKIPPED (budget)")
        FAILED=1
        return
    fi
    ((limit > left)) && limit=$left
    log "=== $name (timeout ${limit}s): $*"
    local t0=$(date +%s)
    if ((DRY_RUN)); then
        shift  # the interpreter; what is left is the script and its flags
        "$PYTHON" - "$@" >"$out" 2>&1 <<'EOF'
import dataclasses, importlib.util, sys
from transformers import HfArgumentParser
path, args = sys.argv[1], sys.argv[2:]
spec = importlib.util.spec_from_file_location("bench_script", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
(options,) = [v for k, v in vars(module).items() if k.endswith("Options") and dataclasses.is_dataclass(v)]
print(HfArgumentParser(options).parse_args_into_dataclasses(args)[0])
EOF
    else
        timeout --kill-after=15 "$limit" "$@" >"$out" 2>&1
    fi
    local rc=$? seconds=$(($(date +%s) - t0))
    cat "$out" >>"$LOG"
    local status="ok"
    if ((rc == 124 || rc == 137)); then
        status="TIMED OUT after ${seconds}s"
    elif ((rc != 0)); then
        status="FAILED (exit $rc)"
    fi
    ((rc == 0)) || FAILED=1
    log "=== $name: $status, ${seconds}s"
    SUMMARY+=("$name: $status, ${seconds}s")
}

# The lines of a step's output worth repeating in the summary: its tables and verdict lines.
summary_of() {
    local file="$LOG_DIR/gpu_check_steps/$1.txt"
    [ -f "$file" ] || return
    if [[ $1 == train* ]]; then
        grep -E '^(\||logits|measured|cuda|NVIDIA|[A-Z].*; torch)' "$file" | grep -v '^|---'
    else
        grep -vE 'Warning|warn|it/s]|^\s*$' "$file" | tail -n 14
    fi
}

log "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$(git status --porcelain 2>/dev/null | grep -q . && echo '(uncommitted changes)')"
((DRY_RUN)) && log "dry run: each step's flags are parsed by its script's options parser; nothing is measured"
((DRY_RUN)) || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
"$PYTHON" - "$DRY_RUN" >"$LOG_DIR/gpu_check_steps/environment.txt" 2>&1 <<'EOF'
import sys
import torch, transformers, accelerate
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), f"bf16 {torch.cuda.is_bf16_supported()}")
elif sys.argv[1] != "1":
    sys.exit("no CUDA device visible to torch")
EOF
rc=$?
tee -a "$LOG" <"$LOG_DIR/gpu_check_steps/environment.txt"
if ((rc != 0)); then
    log "gpu_check.sh: no usable GPU (see above); nothing measured"
    exit 2
fi

# All training rows: 124M, T=1024, bf16, compiled, fused AdamW, clip 1.0, random tokens (bench_train.py's CUDA
# defaults); warm-up 3 steps holds the compilation, 20 timed steps (the median is shown). Models run one after
# the other, each freed first, so peak memory (max_memory_allocated over the timed steps) is each model's own.
TRAIN=("$PYTHON" bench/bench_train.py --device cuda --preset gpt2 --precision bf16 --compile true --warmup 3 --steps 20)
step train_b64_flash 200 90 "${TRAIN[@]}" --micro_batch_size 64 --sdpa_backend flash --models ours,hf
step train_b16_flash 150 60 "${TRAIN[@]}" --micro_batch_size 16 --sdpa_backend flash --models ours,hf
step train_b64_flash_logits 100 50 "${TRAIN[@]}" --micro_batch_size 64 --sdpa_backend flash --models ours_logits
step train_b64_cudnn 100 50 "${TRAIN[@]}" --micro_batch_size 64 --sdpa_backend cudnn --models ours
step hellaswag_124m 90 40 "$PYTHON" bench/bench_hellaswag.py --presets gpt2 --num_examples 10042 \
    --batch_sizes 64 --repeats 1
step decode_b1 100 40 "$PYTHON" bench/bench_decode.py --preset gpt2 --batch_sizes 1 --caches dynamic static \
    --new_tokens 64 --repeats 3

{
    echo
    echo "===================== SUMMARY ($(($(date +%s) - START))s in all, budget ${BUDGET_S}s) ====================="
    for line in "${SUMMARY[@]}"; do
        name=${line%%:*}
        echo "--- $line"
        summary_of "$name"
    done
    echo "log: $LOG"
} | tee -a "$LOG"
exit $FAILED
