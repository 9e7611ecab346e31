#!/usr/bin/env bash
# Full fine-tuning of GLM-4-9B on LongWriter-style data: the LongWriter-glm4-9b recipe (arXiv 2408.07055):
# packs of up to 32,768 tokens, one pack per GPU, lr 1e-5, 4 epochs, cosine schedule with 3% warmup,
# weight decay 0.1, bf16, gradient checkpointing, DeepSpeed ZeRO-3.
#
#   bash scripts/glm4_longwriter.sh                                   # one node, all its GPUs
#   NUM_GPUS=4 OUTPUT=output/try bash scripts/glm4_longwriter.sh --max_steps 20   # extra flags go to main.py
#   DS_CONFIG=ds_config/stage3_offload.json bash scripts/glm4_longwriter.sh  # the paper's ZeRO-3 + CPU offload
#   PACK_LOSS=1 bash scripts/glm4_longwriter.sh      # LongAlign's per-sequence loss instead of the token mean
#   SP_SIZE=4 NUM_GPUS=8 bash scripts/glm4_longwriter.sh    # sequence parallelism: 4 GPUs share each pack
#     (each holds 1/4 of its tokens; 2 data-parallel groups: 2 packs per step; longer packs fit)
#   HOSTFILE=hostfile bash scripts/glm4_longwriter.sh                 # several nodes (deepspeed over ssh)
#   LAUNCHER=torchrun NUM_NODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/glm4_longwriter.sh  # on node 0,
#     and the same with NODE_RANK=1 on node 1 (no ssh needed); DRY_RUN=1 only prints the command.
#
# Data first (the packs' size is fixed here, by sort_and_group --max_length):
#   python pre_tokenize_glm4.py --model_name_or_path THUDM/glm-4-9b --input longwriter-6k.jsonl general.jsonl \
#       --output_dir data/glm4/longwriter --max_length 32768
#   python sort_and_group.py --train_file data/glm4/longwriter --max_length 32768 --group_size 8
#   (--group_size: packs per optimizer step = GPUs x nodes / SP_SIZE x PER_DEVICE_BATCH x GRAD_ACC)
#
# ZeRO-3 (ds_config/stage3.json) fits a 32k pack per 80 GB GPU with gradient checkpointing; the LongWriter
# authors ran ZeRO-3 with CPU offload (ds_config/stage3_offload.json: optimizer states and parameters in CPU
# RAM, DeepSpeed's CPU AdamW; slower per step, for smaller GPUs or longer packs).
set -euo pipefail

# ---- what you edit (each one can also be set from the environment; relative paths are from the repo root) ---
MODEL=${MODEL:-THUDM/glm-4-9b}                  # base model folder or hub id (LongWriter started from the base)
DATA=${DATA:-data/glm4/longwriter}              # pre_tokenize_glm4.py output, after sort_and_group.py
OUTPUT=${OUTPUT:-output/glm4/longwriter}
NUM_GPUS=${NUM_GPUS:-}                          # per node; empty = all the GPUs nvidia-smi lists
NUM_NODES=${NUM_NODES:-}                        # empty = 1, or the number of hosts in HOSTFILE
HOSTFILE=${HOSTFILE:-}                          # multi-node: lines "hostname slots=8"
MASTER_ADDR=${MASTER_ADDR:-}                    # multi-node: node 0's address
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-ds_config/stage3.json}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-1}         # packs per GPU per micro-step
GRAD_ACC=${GRAD_ACC:-1}
LR=${LR:-1e-5}
EPOCHS=${EPOCHS:-4}
BATCH_METHOD=${BATCH_METHOD:-pack}              # pack | sort | naive
SP_SIZE=${SP_SIZE:-1}                           # ranks sharing each pack (sequence parallelism, pack only);
                                                # data-parallel size = GPUs x nodes / SP_SIZE
PACK_LOSS=${PACK_LOSS:-0}                       # 1: LongAlign per-sequence mean; 0: token mean (LongWriter)
BF16=${BF16:-1}
GRAD_CKPT=${GRAD_CKPT:-1}
SAVE_STEPS=${SAVE_STEPS:-400}
WARMUP=${WARMUP:-0.03}                          # warmup: < 1 = fraction of all steps (transformers 5 --warmup_steps)
REPORT_TO=${REPORT_TO:-none}                    # none | tensorboard | wandb
PRETOKENIZE=pre_tokenize_glm4.py

TRAIN_ARGS=(
  --model_name_or_path "$MODEL" --train_file "$DATA" --output_dir "$OUTPUT"
  --batch_method "$BATCH_METHOD" --pack_loss "$([[ $PACK_LOSS == 1 ]] && echo True || echo False)"
  --deepspeed "$DS_CONFIG" --sequence_parallel_size "$SP_SIZE"
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC"
  --num_train_epochs "$EPOCHS" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps "$WARMUP"
  --weight_decay 0.1
  --bf16 "$([[ $BF16 == 1 ]] && echo True || echo False)"
  --gradient_checkpointing "$([[ $GRAD_CKPT == 1 ]] && echo True || echo False)"
  --logging_steps 1 --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit 2
  --report_to "$REPORT_TO"
)
source "$(dirname "$0")/_launch.sh"
