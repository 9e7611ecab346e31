#!/usr/bin/env bash
# LongBench-Write evaluation of a trained model (LongWriter's evaluation/: pred.py + eval_length.py + eval_quality.py
# in one evaluate.py run): generate a reply to every prompt, score its length (S_l) and, with a judge endpoint, its
# quality (S_q); scores.json, predictions.jsonl and length_scatter.png land in OUTPUT. A killed run resumes where it
# stopped when started again with the same settings.
#
#   MODEL=output/glm4/longwriter DATA=longbench_write.jsonl bash scripts/eval_longbench_write.sh
#   DATA=longwrite_ruler.jsonl LENGTH_BUCKETS=2000,5000,10000,20000,30000 bash scripts/eval_longbench_write.sh
#   BACKEND=vllm JUDGE_BASE_URL=https://api.openai.com/v1 JUDGE_MODEL=gpt-4o-2024-05-13 \
#       bash scripts/eval_longbench_write.sh        # key from $OPENAI_API_KEY (JUDGE_API_KEY_ENV names another)
#   PREDICTIONS=models/LongWriter-glm4-9b/pred.jsonl bash scripts/eval_longbench_write.sh   # score a pred.jsonl only
#   DRY_RUN=1 bash scripts/eval_longbench_write.sh  # print the command, run nothing
#   bash scripts/eval_longbench_write.sh --max_samples 4    # extra arguments go to evaluate.py
#
# The benchmark files are LongWriter's (github.com/THUDM/LongWriter, evaluation/longbench_write.jsonl: 120 prompts,
# longbench_write_en.jsonl: 60, longwrite_ruler.jsonl: 48); this toolkit ships none of them: download them.
set -euo pipefail

# ---- what you edit (each one can also be set from the environment; relative paths are from the repo root) ---
MODEL=${MODEL:-output/glm4/longwriter}          # main.py output folder (model, merged model or LoRA adapter)
DATA=${DATA:-longbench_write.jsonl}             # {"prompt", "type", "length"} JSON lines
PREDICTIONS=${PREDICTIONS:-}                    # set: score this pred.jsonl instead of generating (MODEL unused)
OUTPUT=${OUTPUT:-eval/$(basename "$MODEL")/$(basename "${PREDICTIONS:-$DATA}" .jsonl)}
BACKEND=${BACKEND:-hf}                          # hf (transformers) | vllm (GPU, long replies much faster)
TEMPLATE=${TEMPLATE:-}                          # empty: the template the model was trained with
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32768}         # LongWriter's settings
TEMPERATURE=${TEMPERATURE:-0.5}
TOP_P=${TOP_P:-0.8}
TOP_K=${TOP_K:-50}
SEED=${SEED:-42}
BATCH_SIZE=${BATCH_SIZE:-4}
LENGTH_BUCKETS=${LENGTH_BUCKETS:-500,2000,4000}
JUDGE_BASE_URL=${JUDGE_BASE_URL:-}              # OpenAI-compatible endpoint for S_q; empty: S_l only
JUDGE_MODEL=${JUDGE_MODEL:-gpt-4o-2024-05-13}
JUDGE_API_KEY_ENV=${JUDGE_API_KEY_ENV:-OPENAI_API_KEY}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python3}

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "$PREDICTIONS" ]]; then
  cmd=("$PYTHON" evaluate.py --predictions "$PREDICTIONS")
else
  cmd=("$PYTHON" evaluate.py --model_dir "$MODEL" --data "$DATA" --backend "$BACKEND"
       --max_new_tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE" --top_p "$TOP_P" --top_k "$TOP_K"
       --seed "$SEED" --batch_size "$BATCH_SIZE")
  [[ -n "$TEMPLATE" ]] && cmd+=(--template "$TEMPLATE")
fi
cmd+=(--output_dir "$OUTPUT" --length_buckets "$LENGTH_BUCKETS")
if [[ -n "$JUDGE_BASE_URL" ]]; then
  cmd+=(--judge_base_url "$JUDGE_BASE_URL" --judge_model "$JUDGE_MODEL" --judge_api_key_env "$JUDGE_API_KEY_ENV")
fi
cmd+=("$@")

echo "[eval_longbench_write] ${cmd[*]}"
if [[ "$DRY_RUN" == 1 ]]; then
  exit 0
fi
if [[ -z "$PREDICTIONS" && ! -e "$DATA" ]]; then
  echo "error: DATA=$DATA: no such file. Download LongWriter's evaluation/longbench_write.jsonl (or" \
       "longwrite_ruler.jsonl) from github.com/THUDM/LongWriter and set DATA=path/to/it" >&2
  exit 2
fi
exec "${cmd[@]}"
