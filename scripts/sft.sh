#!/usr/bin/env bash
# Supervised fine-tuning of any registered model family (patch/families.py: glm4, chatglm3, llama3, glm (GLM-Edge),
# glm4_0414, qwen2, qwen3, mistral, ...), from raw chat files to a trained model in three steps:
#   pre_tokenize.py (TEMPLATE, default auto = the tokenizer's own chat template) -> sort_and_group.py (packs) ->
#   main.py through scripts/_launch.sh (the same launchers, checks and DRY_RUN as the other scripts).
#
#   MODEL=THUDM/glm-edge-4b-chat DATA="chat.jsonl long.jsonl" bash scripts/sft.sh      # one node, all its GPUs
#   USE_LORA=1 MODEL=Qwen/Qwen2.5-7B-Instruct DATA=chat.jsonl bash scripts/sft.sh --max_steps 20  # extra: main.py
#   PREPARE=0 TOKENIZED=data/sft/mine bash scripts/sft.sh     # the tokenized folder exists: train only
#   SP_SIZE=2 MODEL=THUDM/glm-edge-4b-chat DATA=long.jsonl bash scripts/sft.sh  # 2 GPUs share each pack
#   DRY_RUN=1 bash scripts/sft.sh                             # print the three commands, run nothing
#   STAGE=dpo MODEL=output/sft/glm-edge-4b-chat DATA=pairs.jsonl bash scripts/sft.sh   # preference training (DPO)
#     on pairs (pre_tokenize.py --stage dpo: chosen / rejected records), packed; DPO_LOSS, DPO_BETA, DPO_SFT_WEIGHT,
#     PRECOMPUTE_REF (1: reference log-probs computed once, one model in memory), REF_MODEL (README "Preference")
# Multi-node settings (HOSTFILE, LAUNCHER=torchrun, NUM_NODES, NODE_RANK, MASTER_ADDR) as in glm4_longwriter.sh.
set -euo pipefail

# ---- what you edit (each one can also be set from the environment; relative paths are from the repo root) ---
MODEL=${MODEL:-THUDM/glm-edge-4b-chat}          # model folder or hub id of any registered family
DATA=${DATA:-data/sample.jsonl}                 # raw chat files (JSONL / JSON; space-separated; FILE:COUNT ok)
TEMPLATE=${TEMPLATE:-auto}                      # auto | a template of the family (pre_tokenize.py --help)
STAGE=${STAGE:-sft}                             # sft | dpo (preference pairs; the DPO_* settings below)
OUTPUT=${OUTPUT:-output/$STAGE/$(basename "$MODEL")}
TOKENIZED=${TOKENIZED:-data/$STAGE/$(basename "$MODEL")-$TEMPLATE}  # the pre-tokenized (and packed) folder
PREPARE=${PREPARE:-1}                           # 1: run pre_tokenize.py + sort_and_group.py first; 0: train only
MAX_LENGTH=${MAX_LENGTH:-32768}                 # longest sample = tokens per pack
NUM_GPUS=${NUM_GPUS:-}                          # per node; empty = all the GPUs nvidia-smi lists
NUM_NODES=${NUM_NODES:-}
HOSTFILE=${HOSTFILE:-}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
USE_LORA=${USE_LORA:-0}                         # 1: LoRA (targets: the family's default, or LORA_TARGETS)
LORA_R=${LORA_R:-8}
LORA_ALPHA=${LORA_ALPHA:-16}                    # main.py's default (scale alpha / r = 2)
LORA_TARGETS=${LORA_TARGETS:-}
DS_CONFIG=${DS_CONFIG:-$([[ $USE_LORA == 1 ]] && echo ds_config/stage2.json || echo ds_config/stage3.json)}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-1}         # packs per GPU per micro-step
GRAD_ACC=${GRAD_ACC:-1}
if [[ "$STAGE" == dpo ]]; then                  # DPO's usual scale: smaller steps, fewer epochs
  LR=${LR:-$([[ $USE_LORA == 1 ]] && echo 5e-6 || echo 1e-6)}
  EPOCHS=${EPOCHS:-1}
else
  LR=${LR:-$([[ $USE_LORA == 1 ]] && echo 1e-4 || echo 1e-5)}
  EPOCHS=${EPOCHS:-3}
fi
DPO_LOSS=${DPO_LOSS:-sigmoid}                   # STAGE=dpo: sigmoid (DPO) | ipo | simpo (reference-free)
DPO_BETA=${DPO_BETA:-0.1}
DPO_SFT_WEIGHT=${DPO_SFT_WEIGHT:-0}             # + this x NLL of the chosen replies (token mean)
PRECOMPUTE_REF=${PRECOMPUTE_REF:-1}             # 1: reference log-probs in one pass before training (stored beside
                                                # the data, reused on resume): one model in memory
REF_MODEL=${REF_MODEL:-}                        # reference folder; empty: MODEL (with LoRA: its adapters disabled)
BATCH_METHOD=${BATCH_METHOD:-pack}              # pack | sort | naive
SP_SIZE=${SP_SIZE:-1}                           # ranks sharing each pack (sequence parallelism, pack only);
                                                # data-parallel size = GPUs x nodes / SP_SIZE
PACK_LOSS=${PACK_LOSS:-0}                       # 1: LongAlign per-sequence mean; 0: token mean (SFT only)
BF16=${BF16:-auto}                              # auto: bf16 where the GPU has it, fp32 on CPU (main.py decides);
                                                # 1: --bf16 True; 0: --bf16 False
GRAD_CKPT=${GRAD_CKPT:-1}
SAVE_STEPS=${SAVE_STEPS:-400}
WARMUP=${WARMUP:-0.03}                          # < 1: fraction of all steps, rounded down; 1 step counts as none
REPORT_TO=${REPORT_TO:-none}
PRETOKENIZE=pre_tokenize.py

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's longsft for tools/ and bench/ (no install needed)
PY=${PYTHON:-python3}
read -r -a INPUTS <<< "$DATA"
case "$STAGE" in
  sft) STAGE_ARGS=() ;;
  dpo) STAGE_ARGS=(--stage dpo); PRETOKENIZE_ARGS="--stage dpo" ;;   # (PRETOKENIZE_ARGS: _launch.sh's data hint)
  *) echo "[launch] cannot start: STAGE=$STAGE: use sft or dpo" >&2; exit 2 ;;
esac
# the launch settings first (GPUs, nodes, SP_SIZE, ...: every problem at once, before any data is prepared); this
# also counts sort_and_group's --group_size, the packs per optimizer step: GPUs x nodes / SP_SIZE x batch x GRAD_ACC
LAUNCH_CHECK_ONLY=1
source scripts/_launch.sh
LAUNCH_CHECK_ONLY=0
GROUP=$GROUP_SIZE
[[ "$GROUP" -gt 0 ]] || GROUP=1
step() {  # print a preparation command, then run it (DRY_RUN=1: print only)
  echo "[sft] $(printf '%q ' "$@")"
  [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}
if [[ "$PREPARE" == 1 ]]; then
  step "$PY" pre_tokenize.py --model_name_or_path "$MODEL" --template "$TEMPLATE" --input "${INPUTS[@]}" \
    --output_dir "$TOKENIZED" --max_length "$MAX_LENGTH" "${STAGE_ARGS[@]}"
  if [[ "$BATCH_METHOD" != naive ]]; then
    step "$PY" sort_and_group.py --train_file "$TOKENIZED" --max_length "$MAX_LENGTH" --group_size "$GROUP"
  fi
fi

DATA="$TOKENIZED"   # what _launch.sh checks and main.py trains on
TRAIN_ARGS=(
  --model_name_or_path "$MODEL" --train_file "$TOKENIZED" --output_dir "$OUTPUT"
  --batch_method "$BATCH_METHOD" --pack_loss "$([[ $PACK_LOSS == 1 ]] && echo True || echo False)"
  --deepspeed "$DS_CONFIG" --sequence_parallel_size "$SP_SIZE"
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC"
  --num_train_epochs "$EPOCHS" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps "$WARMUP"
  --weight_decay 0.1
  --gradient_checkpointing "$([[ $GRAD_CKPT == 1 ]] && echo True || echo False)"
  --logging_steps 1 --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit 2
  --report_to "$REPORT_TO"
)
[[ "$BF16" == auto ]] || TRAIN_ARGS+=(--bf16 "$([[ $BF16 == 1 ]] && echo True || echo False)")
if [[ "$USE_LORA" == 1 ]]; then
  TRAIN_ARGS+=(--use_lora True --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA")
  [[ -n "$LORA_TARGETS" ]] && TRAIN_ARGS+=(--lora_target_modules "$LORA_TARGETS")
fi
if [[ "$STAGE" == dpo ]]; then
  TRAIN_ARGS+=(--stage dpo --dpo_loss "$DPO_LOSS" --dpo_beta "$DPO_BETA" --dpo_sft_weight "$DPO_SFT_WEIGHT")
  if [[ "$DPO_LOSS" != simpo ]]; then
    if [[ "$PRECOMPUTE_REF" == 1 ]]; then TRAIN_ARGS+=(--precompute_ref_logps True); fi
    if [[ -n "$REF_MODEL" ]]; then TRAIN_ARGS+=(--ref_model "$REF_MODEL"); fi
  fi
fi
source scripts/_launch.sh
