#!/usr/bin/env bash
# LoRA fine-tuning of Llama-3.1-8B (base) on LongWriter-style data: the LongWriter recipe (packs of up to 32,768 tokens,
# one pack per GPU, 4 epochs, cosine schedule with 3% warmup, bf16, gradient checkpointing) with LoRA adapters
# on Llama's q/k/v/o_proj, gate/up/down_proj (main.py's default for model_type llama)
# and a LoRA-sized learning rate (1e-4). ZeRO-2: the frozen bf16 base (~16 GB) fits on each GPU, and only
# the small adapter's gradients and optimizer states are partitioned.
#
#   bash scripts/llama3_longwriter_lora.sh                              # saves the adapter to OUTPUT
#   SAVE_MERGED=1 bash scripts/llama3_longwriter_lora.sh                # also the merged full model
#   LORA_R=16 LORA_ALPHA=32 LORA_TARGETS=q_proj,v_proj bash scripts/llama3_longwriter_lora.sh
#   NUM_GPUS=4 bash scripts/llama3_longwriter_lora.sh --max_steps 20    # extra flags go to main.py
#   SP_SIZE=2 NUM_GPUS=8 bash scripts/llama3_longwriter_lora.sh     # sequence parallelism: 2 GPUs share each pack
#   multi-node and everything else as in scripts/llama3_longwriter.sh (HOSTFILE / LAUNCHER=torchrun NODE_RANK ...)
#
# Data first:
#   python pre_tokenize_llama3.py --model_name_or_path meta-llama/Llama-3.1-8B \
#       --input longwriter-6k.jsonl general.jsonl \
#       --output_dir data/llama3/longwriter --max_length 32768 --template longwriter
#   python sort_and_group.py --train_file data/llama3/longwriter --max_length 32768 --group_size 8
set -euo pipefail

# ---- what you edit (each one can also be set from the environment; relative paths are from the repo root) ---
MODEL=${MODEL:-meta-llama/Llama-3.1-8B}         # base model folder or hub id
DATA=${DATA:-data/llama3/longwriter}            # pre_tokenize_llama3.py output, after sort_and_group.py
OUTPUT=${OUTPUT:-output/llama3/longwriter_lora}
NUM_GPUS=${NUM_GPUS:-}                          # per node; empty = all the GPUs nvidia-smi lists
NUM_NODES=${NUM_NODES:-}                        # empty = 1, or the number of hosts in HOSTFILE
HOSTFILE=${HOSTFILE:-}                          # multi-node: lines "hostname slots=8"
MASTER_ADDR=${MASTER_ADDR:-}                    # multi-node: node 0's address
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-ds_config/stage2.json}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-1}         # packs per GPU per micro-step
GRAD_ACC=${GRAD_ACC:-1}
LR=${LR:-1e-4}
EPOCHS=${EPOCHS:-4}
BATCH_METHOD=${BATCH_METHOD:-pack}              # pack | sort | naive
SP_SIZE=${SP_SIZE:-1}                           # ranks sharing each pack (sequence parallelism, pack only);
                                                # data-parallel size = GPUs x nodes / SP_SIZE
PACK_LOSS=${PACK_LOSS:-0}                       # 1: LongAlign per-sequence mean; 0: token mean (LongWriter)
LORA_R=${LORA_R:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
LORA_TARGETS=${LORA_TARGETS:-}                  # comma list; empty = the family default (main.py)
SAVE_MERGED=${SAVE_MERGED:-0}                   # 1: also save base + adapter merged into one model
BF16=${BF16:-1}
GRAD_CKPT=${GRAD_CKPT:-1}
SAVE_STEPS=${SAVE_STEPS:-400}
WARMUP=${WARMUP:-0.03}                          # warmup: < 1 = fraction of all steps (transformers 5 --warmup_steps)
REPORT_TO=${REPORT_TO:-none}                    # none | tensorboard | wandb
PRETOKENIZE=pre_tokenize_llama3.py

TRAIN_ARGS=(
  --model_name_or_path "$MODEL" --train_file "$DATA" --output_dir "$OUTPUT"
  --batch_method "$BATCH_METHOD" --pack_loss "$([[ $PACK_LOSS == 1 ]] && echo True || echo False)"
  --use_lora True --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT"
  --save_merged_model "$([[ $SAVE_MERGED == 1 ]] && echo True || echo False)"
  --deepspeed "$DS_CONFIG" --sequence_parallel_size "$SP_SIZE"
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC"
  --num_train_epochs "$EPOCHS" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps "$WARMUP"
  --weight_decay 0.1
  --bf16 "$([[ $BF16 == 1 ]] && echo True || echo False)"
  --gradient_checkpointing "$([[ $GRAD_CKPT == 1 ]] && echo True || echo False)"
  --logging_steps 1 --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit 2
  --report_to "$REPORT_TO"
)
[[ -n "$LORA_TARGETS" ]] && TRAIN_ARGS+=(--lora_target_modules "$LORA_TARGETS")
source "$(dirname "$0")/_launch.sh"
