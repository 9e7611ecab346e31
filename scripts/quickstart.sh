#!/usr/bin/env bash
# Quickstart: the whole toolkit on a tiny model, offline, on a CPU, in a few minutes.
#
#   bash scripts/install.sh && bash scripts/quickstart.sh
#   FAMILY=glm4 bash scripts/quickstart.sh            # the GLM-4 path instead of Llama-3.1
#   FAMILY=chatglm3 bash scripts/quickstart.sh        # LongAlign's models: chatglm3, chatglm2, llama2
#   FAMILY=qwen2 bash scripts/quickstart.sh           # transformers' own classes: glm (GLM-Edge), glm4_0414,
#                                                     # qwen2, qwen3, mistral, with the tokenizer's chat template
#   OUT=/tmp/qs EPOCHS=5 bash scripts/quickstart.sh   # another output folder, a longer run
#   SP_SIZE=2 bash scripts/quickstart.sh              # sequence parallelism: the 2 processes share each pack
#                                                     # (DeepSpeed Ulysses: each holds half of its tokens)
#   DRY_RUN=1 FAMILY=qwen2 bash scripts/quickstart.sh # print the commands (the launch: the script's own), run nothing
#
# The same commands as a real run, scaled down:
#   1. tools/make_tiny.py         a tiny random-weight model + tokenizer of the family (no download; the native
#                                 families' tokenizer carries a chat template written after the real model's)
#   2. pre_tokenize_<family>.py   data/sample.jsonl -> a tokenized dataset (report.json, skipped.jsonl), in
#                                 the family's default template (pre_tokenize.py for chatglm3/chatglm2/llama2;
#                                 their round formats skip sample.jsonl's system-prompt records; pre_tokenize.py
#                                 --template auto, the tokenizer's own chat template, for the native families)
#   3. sort_and_group.py          packs of MAX_LENGTH tokens for 2 ranks (for 1 group of 2 ranks with SP_SIZE=2)
#   4. the family's training script: scripts/<family>_longwriter.sh (glm4, llama3; exact token-mean loss over
#                                 each step) or LongAlign's scripts/chatglm_pack.sh / llama_pack.sh (LongAlign's
#                                 per-sequence loss, --pack_loss), or scripts/sft.sh (the native families,
#                                 token-mean loss), through a real 2-process `deepspeed` launch,
#                                 ZeRO-3 (ds_config/stage3.json), gloo on the CPU (on a GPU box: 2 GPUs, NCCL)
#   5. tools/generate.py          reloads the saved model and generates a reply in the training chat format
#                                 (stopping on the template's end-of-turn ids and generation_config.json's eos)
#   6. tools/plot_loss.py         the loss curve as a PNG
# Everything goes to OUT (default quickstart_out/<family>, ignored by git); it is rebuilt on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's longsft for tools/ and bench/ (no install needed)

# ---- settings (environment overrides) ----------------------------------------------------------------------
FAMILY=${FAMILY:-llama3}                 # llama3 | glm4 | chatglm3 | chatglm2 | llama2 | glm | glm4_0414 | qwen2
                                         # | qwen3 | mistral
OUT=${OUT:-quickstart_out/$FAMILY}
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
SP_SIZE=${SP_SIZE:-1}                    # ranks sharing each pack (sequence parallelism); 1 = none
[[ "$SP_SIZE" =~ ^[1-9][0-9]*$ ]] || { echo "[quickstart] SP_SIZE=$SP_SIZE: must be a whole number >= 1" >&2; exit 2; }
NUM_PROCS=${NUM_PROCS:-$(( GPUS == 1 ? 1 : (SP_SIZE > 2 ? SP_SIZE : 2) ))}   # deepspeed ranks: 2 CPU processes, or 2
                                         # GPUs where there are (SP_SIZE of them when SP_SIZE > 2)
MAX_LENGTH=${MAX_LENGTH:-1024}           # tokens per pack (longer samples are cut: --truncate right)
EPOCHS=${EPOCHS:-3}
LR=${LR:-2e-3}                           # a tiny random model learns at a much higher rate than 1e-5
PROMPT=${PROMPT:-Write a short story about a lighthouse keeper.}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}                    # 1: print each command, run none, leave OUT alone

# per family: the pre-tokenization entry and its template flags, the training script, its loss
case "$FAMILY" in
  llama3) PRETOKENIZE=(pre_tokenize_llama3.py --template longwriter); SCRIPT=llama3_longwriter; PACK_LOSS=0 ;;
  glm4) PRETOKENIZE=(pre_tokenize_glm4.py); SCRIPT=glm4_longwriter; PACK_LOSS=0 ;;
  chatglm3|chatglm2) PRETOKENIZE=(pre_tokenize.py); SCRIPT=chatglm_pack; PACK_LOSS=1 ;;
  llama2) PRETOKENIZE=(pre_tokenize.py); SCRIPT=llama_pack; PACK_LOSS=1 ;;
  glm|glm4_0414|qwen2|qwen3|mistral) PRETOKENIZE=(pre_tokenize.py --template auto); SCRIPT=sft; PACK_LOSS=0 ;;
  *) echo "[quickstart] FAMILY=$FAMILY: use llama3, glm4, chatglm3, chatglm2, llama2, glm, glm4_0414, qwen2, qwen3" \
       "or mistral" >&2; exit 2 ;;
esac
if [[ ! "$NUM_PROCS" =~ ^[1-9][0-9]*$ ]] || (( NUM_PROCS % SP_SIZE )); then
  echo "[quickstart] SP_SIZE=$SP_SIZE: NUM_PROCS=$NUM_PROCS processes must be a multiple of it" \
       "$([[ "$GPUS" == 1 ]] && echo "(this machine has 1 GPU: sequence parallelism needs 2 or more)")" >&2
  exit 2
fi
DP_GROUPS=$(( NUM_PROCS / SP_SIZE ))       # data-parallel groups = packs per optimizer step (sort_and_group --group_size)
if [[ -e "$OUT" && ! -f "$OUT/.quickstart" && -n "$(ls -A "$OUT" 2>/dev/null)" ]]; then
  echo "[quickstart] OUT=$OUT exists and was not made by the quickstart; choose another OUT" >&2
  exit 2
fi
if [[ "$DRY_RUN" == 1 ]]; then
  OUT=$(realpath -m "$OUT")
else
  rm -rf "$OUT"
  mkdir -p "$OUT"
  touch "$OUT/.quickstart"
  OUT=$(cd "$OUT" && pwd)
fi
START=$SECONDS
step() { echo; echo "[quickstart] ($((SECONDS - START))s) $*"; }
run() {  # print a command, then run it (DRY_RUN=1: print only)
  echo "[quickstart] \$ $(printf '%q ' "$@")"
  [[ "$DRY_RUN" == 1 ]] || "$@"
}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

step "1/6 tiny $FAMILY model and tokenizer -> $OUT/model"
run "$PYTHON" tools/make_tiny.py model --family "$FAMILY" --out "$OUT/model"

step "2/6 pre-tokenize data/sample.jsonl -> $OUT/data"
run "$PYTHON" "${PRETOKENIZE[@]}" --model_name_or_path "$OUT/model" --input data/sample.jsonl \
  --output_dir "$OUT/data" --max_length "$MAX_LENGTH" --truncate right --num_proc 1

sp_note=""; [[ "$SP_SIZE" -gt 1 ]] && sp_note=", $SP_SIZE of them sharing each pack"
step "3/6 sort and pack for $NUM_PROCS ranks$sp_note"
run "$PYTHON" sort_and_group.py --train_file "$OUT/data" --max_length "$MAX_LENGTH" --group_size "$DP_GROUPS"

where=CPU; [[ "$GPUS" -gt 0 ]] && where=GPU
step "4/6 train: scripts/$SCRIPT.sh, $NUM_PROCS-process deepspeed launch$sp_note, ZeRO-3, $where (log: $OUT/train.log)"
PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# (scripts/sft.sh: PREPARE=0, the data is ready in TOKENIZED; the other scripts read DATA)
MODEL="$OUT/model" DATA="$OUT/data" TOKENIZED="$OUT/data" PREPARE=0 OUTPUT="$OUT/run" NUM_GPUS="$NUM_PROCS" \
  NUM_NODES=1 HOSTFILE= \
  LAUNCHER=deepspeed MASTER_PORT="$PORT" DS_CONFIG=ds_config/stage3.json BATCH_METHOD=pack PACK_LOSS="$PACK_LOSS" \
  EPOCHS="$EPOCHS" LR="$LR" WARMUP=0 BF16=0 GRAD_CKPT=1 SAVE_STEPS=1000000 REPORT_TO=none SP_SIZE="$SP_SIZE" \
  GRAD_ACC=1 DRY_RUN="$DRY_RUN" bash "scripts/$SCRIPT.sh" --weight_decay 0 --save_total_limit 1 2>&1 \
  | { if [[ "$DRY_RUN" == 1 ]]; then cat; else tee "$OUT/train.log"; fi; }
# What DeepSpeed saved: one ZeRO partition per rank, and the stage, read back from the checkpoint itself.
[[ "$DRY_RUN" == 1 ]] || "$PYTHON" - "$OUT/run" <<'PY' | tee -a "$OUT/train.log"
import glob, sys, torch
ckpt = sorted(glob.glob(f"{sys.argv[1]}/checkpoint-*/global_step*"))[-1]
parts = sorted(glob.glob(f"{ckpt}/*_optim_states.pt"))
state = torch.load(parts[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
print(f"[quickstart] deepspeed checkpoint {ckpt}: ZeRO stage {int(state['zero_stage'])}, "
      f"{state['partition_count']} partitions, {len(parts)} rank files")
PY

step "5/6 reload the trained model and generate (a tiny model after a minute of training: expect gibberish)"
run "$PYTHON" tools/generate.py --model_dir "$OUT/run" --data "$OUT/data" --prompt "$PROMPT" \
  --max_new_tokens 48 --output "$OUT/reply.json"

step "6/6 loss curve"
run "$PYTHON" tools/plot_loss.py --run_dir "$OUT/run" --output "$OUT/loss.png" --title "quickstart ($FAMILY)"

[[ "$DRY_RUN" == 1 ]] && exit 0
echo
echo "[quickstart] done in $((SECONDS - START))s. Outputs in $OUT:"
echo "  model/         the tiny $FAMILY model and tokenizer it started from"
echo "  data/          tokenized sample data (report.json, skipped.jsonl) and packs/ (report.json, report.png)"
echo "  run/           the trained model, train_settings.json, trainer_state.json, checkpoint-*/ (DeepSpeed ZeRO-3)"
echo "  train.log      the training log;  reply.json  the generated reply;  loss.png  the loss curve"
