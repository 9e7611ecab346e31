#!/usr/bin/env bash
# ChatGLM2-6B fine-tuned on Alpaca data on the CPU, the way LL-BaiYang does it: all weights trained (no GPU, no
# quantization), one process, fp32, Alpaca records ({"instruction", "input", "output", "history"}) written as
# ChatGLM2's own "[Round N]\n\n问：...\n\n答：..." prompt (template chatglm2, what model.chat sees at inference).
# Three steps, the same commands as a GPU run: pre_tokenize.py -> sort_and_group.py -> main.py (sorted batching:
# padded batches of samples of similar length, the token-mean loss).
#
#   INPUT=alpaca_data.json bash scripts/chatglm2_alpaca_cpu.sh                  # THUDM/chatglm2-6b
#   INPUT="alpaca_en.json alpaca_zh.json:5000" MODEL=/models/chatglm2-6b bash scripts/chatglm2_alpaca_cpu.sh
#   INPUT=alpaca.json bash scripts/chatglm2_alpaca_cpu.sh --max_steps 20       # extra flags go to main.py
#   DRY_RUN=1 INPUT=alpaca.json bash scripts/chatglm2_alpaca_cpu.sh            # only print the three commands
#   python tools/make_tiny.py model --family chatglm2 --out /tmp/tiny-chatglm2  # a tiny model to try it in minutes:
#   MODEL=/tmp/tiny-chatglm2 INPUT=alpaca.json LR=1e-3 bash scripts/chatglm2_alpaca_cpu.sh --max_steps 20
#
# Memory: full fine-tuning with AdamW keeps fp32 weights, gradients and two optimizer moments, 16 bytes per
# parameter: about 100 GB of RAM for chatglm2-6b's 6.2B parameters (plus activations; gradient checkpointing is
# on).
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- what you edit (each one can also be set from the environment; relative paths are from the repo root) ---
MODEL=${MODEL:-THUDM/chatglm2-6b}            # model folder or hub id (chatglm2 or chatglm3 family)
INPUT=${INPUT:-}                             # Alpaca JSON / JSONL file(s), space-separated, FILE:COUNT for a subset
DATA=${DATA:-data/chatglm2/alpaca}           # the tokenized dataset (written by step 1, replaced on every run)
OUTPUT=${OUTPUT:-output/chatglm2/alpaca_cpu}
MAX_LENGTH=${MAX_LENGTH:-2048}               # longest sample in tokens (longer ones are skipped, see skipped.jsonl)
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-4}      # samples per micro-step
GRAD_ACC=${GRAD_ACC:-4}                      # micro-steps per optimizer step
LR=${LR:-1e-5}
EPOCHS=${EPOCHS:-1}
WARMUP=${WARMUP:-0.03}                       # < 1: fraction of all steps
SAVE_STEPS=${SAVE_STEPS:-500}
NUM_PROC=${NUM_PROC:-}                       # pre-tokenization processes (empty: the CPU count, at most 16)
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python3}

problems=()
[[ -n "$INPUT" ]] || problems+=("INPUT is empty: set it to your Alpaca data file(s), e.g. INPUT=alpaca_data.json")
for v in MAX_LENGTH PER_DEVICE_BATCH GRAD_ACC; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 ]] || problems+=("$v=${!v}: must be a positive whole number")
done
if [[ ${#problems[@]} -gt 0 ]]; then
  echo "[alpaca-cpu] cannot start, fix these settings at the top of $0 or in the environment:" >&2
  for p in "${problems[@]}"; do echo "  - $p" >&2; done
  exit 2
fi
read -ra INPUTS <<< "$INPUT"

PRETOKENIZE=("$PYTHON" pre_tokenize.py --model_name_or_path "$MODEL" --template chatglm2 --input "${INPUTS[@]}"
             --output_dir "$DATA" --max_length "$MAX_LENGTH")
[[ -n "$NUM_PROC" ]] && PRETOKENIZE+=(--num_proc "$NUM_PROC")
GROUP=("$PYTHON" sort_and_group.py --train_file "$DATA" --max_length "$MAX_LENGTH"
       --group_size "$PER_DEVICE_BATCH")  # one micro-batch of similar lengths
TRAIN=("$PYTHON" main.py --model_name_or_path "$MODEL" --train_file "$DATA" --output_dir "$OUTPUT" --use_cpu True
       --batch_method sort --per_device_train_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC"
       --num_train_epochs "$EPOCHS" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps "$WARMUP"
       --weight_decay 0 --gradient_checkpointing True --logging_steps 1 --save_strategy steps
       --save_steps "$SAVE_STEPS" --save_total_limit 2 --report_to none "$@")

for cmd in PRETOKENIZE GROUP TRAIN; do
  declare -n c=$cmd
  echo "[alpaca-cpu] $(printf '%q ' "${c[@]}")"
done
[[ "$DRY_RUN" == 1 ]] && exit 0
export TOKENIZERS_PARALLELISM=false
"${PRETOKENIZE[@]}"
"${GROUP[@]}"
mkdir -p "$OUTPUT"
exec "${TRAIN[@]}"
