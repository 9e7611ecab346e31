# LongAlign's training recipe (arXiv 2401.18058), shared by chatglm_pack.sh, chatglm_sort.sh, llama_pack.sh and
# llama_sort.sh. Sourced, not run: the calling script sets MODEL, DATA, OUTPUT, BATCH_METHOD, GRAD_ACC, PACK_LOSS
# and TEMPLATE first; this file adds LongAlign's settings and hands over to _launch.sh (launchers, multi-node,
# DRY_RUN=1, checks). LongAlign's settings: samples/packs of up to 65,536 tokens, 2 epochs, lr 2e-5 with a cosine
# schedule and 3% warmup, AdamW betas (0.9, 0.95), weight decay 0, bf16, gradient checkpointing, DeepSpeed ZeRO-3,
# one pack (pack) or sample (sort) per GPU, 1 (pack) or 12 (sort) accumulation steps, saves every 200 steps.
# Every setting below can be set from the environment; extra arguments of the calling script go to main.py last.

NUM_GPUS=${NUM_GPUS:-}                          # per node; empty = all the GPUs nvidia-smi lists
NUM_NODES=${NUM_NODES:-}                        # empty = 1, or the number of hosts in HOSTFILE
HOSTFILE=${HOSTFILE:-}                          # multi-node: lines "hostname slots=8"
MASTER_ADDR=${MASTER_ADDR:-}                    # multi-node: node 0's address
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-ds_config/stage3.json}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-1}         # packs (pack) or samples (sort) per GPU per micro-step
SP_SIZE=${SP_SIZE:-1}                           # ranks sharing each pack (sequence parallelism): the
                                                # _pack scripts only; data-parallel size = GPUs x nodes / SP_SIZE
LR=${LR:-2e-5}
EPOCHS=${EPOCHS:-2}
BF16=${BF16:-1}
GRAD_CKPT=${GRAD_CKPT:-1}
SAVE_STEPS=${SAVE_STEPS:-200}
WARMUP=${WARMUP:-0.03}                          # warmup: < 1 = fraction of all steps (transformers 5 --warmup_steps)
REPORT_TO=${REPORT_TO:-none}                    # none | tensorboard | wandb (LongAlign logged to wandb)
PACK_LENGTH=${PACK_LENGTH:-65536}               # the data's --max_length (pre_tokenize.py, sort_and_group.py)
PRETOKENIZE=pre_tokenize.py
PRETOKENIZE_ARGS="--template $TEMPLATE --max_length $PACK_LENGTH"

TRAIN_ARGS=(
  --model_name_or_path "$MODEL" --train_file "$DATA" --output_dir "$OUTPUT"
  --batch_method "$BATCH_METHOD" --pack_loss "$([[ $PACK_LOSS == 1 ]] && echo True || echo False)"
  --deepspeed "$DS_CONFIG" --sequence_parallel_size "$SP_SIZE"
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --per_device_eval_batch_size 1
  --gradient_accumulation_steps "$GRAD_ACC"
  --num_train_epochs "$EPOCHS" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps "$WARMUP"
  --weight_decay 0 --adam_beta1 0.9 --adam_beta2 0.95
  --bf16 "$([[ $BF16 == 1 ]] && echo True || echo False)"
  --gradient_checkpointing "$([[ $GRAD_CKPT == 1 ]] && echo True || echo False)"
  --logging_steps 1 --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit 10
  --report_to "$REPORT_TO"
)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
