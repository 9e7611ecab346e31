#!/usr/bin/env bash
# Preference training (DPO) of a LongWriter-style Llama-3.1-8B SFT model on long-output preference pairs, as
# LongWriter-glm4-9b's second stage (= LongWriter-9B-DPO, arXiv 2408.07055; its DPO code and hyper-parameters were
# not published; LongWriter-llama3.1-8b itself had none): packs of whole (chosen, rejected) pairs up to 32,768
# tokens ([INST] template), the exact DPO loss over each optimizer step on any GPU count, bf16, gradient
# checkpointing, DeepSpeed ZeRO-3, the reference log-probs precomputed once (one 8B model in memory while
# training). The hyper-parameters below are a starting point, not LongWriter's.
#
#   bash scripts/llama3_longwriter_dpo.sh                               # one node, all its GPUs
#   MODEL=THUDM/LongWriter-llama3.1-8b NUM_GPUS=4 bash scripts/llama3_longwriter_dpo.sh --max_steps 20
#   DPO_BETA=0.2 DPO_SFT_WEIGHT=0.1 bash scripts/llama3_longwriter_dpo.sh   # beta; + 0.1 x chosen NLL (token mean)
#   PRECOMPUTE_REF=0 bash scripts/llama3_longwriter_dpo.sh   # a live frozen copy instead (two models in memory)
#   REF_MODEL=/models/llama3-sft bash scripts/llama3_longwriter_dpo.sh   # another reference than MODEL
#   DPO_LOSS=simpo DPO_BETA=2 SIMPO_GAMMA=1 bash scripts/llama3_longwriter_dpo.sh   # reference-free SimPO
#   SP_SIZE=4 NUM_GPUS=8 bash scripts/llama3_longwriter_dpo.sh   # sequence parallelism: 4 GPUs share each pack
#   DS_CONFIG=ds_config/stage3_offload.json, HOSTFILE=..., LAUNCHER=torchrun ..., DRY_RUN=1: as llama3_longwriter.sh
#
# Data first: preference records (messages / TRL prompt,chosen,rejected / ShareGPT pairwise; README "Preference"):
#   python pre_tokenize_llama3.py --stage dpo --model_name_or_path output/llama3/longwriter --input pairs.jsonl \
#       --output_dir data/llama3/longwriter_dpo --max_length 32768 --template longwriter
#   python sort_and_group.py --train_file data/llama3/longwriter_dpo --max_length 32768 --group_size 8
#   (--max_length: a pair's two samples share one pack; --group_size: GPUs x nodes / SP_SIZE x batch x GRAD_ACC)
set -euo pipefail

# ---- what you edit (each one can also be set from the environment; relative paths are from the repo root) ---
MODEL=${MODEL:-output/llama3/longwriter}        # the SFT model (llama3_longwriter.sh's OUTPUT), or a hub id
DATA=${DATA:-data/llama3/longwriter_dpo}        # pre_tokenize_llama3.py --stage dpo output, after sort_and_group.py
OUTPUT=${OUTPUT:-output/llama3/longwriter_dpo}
NUM_GPUS=${NUM_GPUS:-}                          # per node; empty = all the GPUs nvidia-smi lists
NUM_NODES=${NUM_NODES:-}                        # empty = 1, or the number of hosts in HOSTFILE
HOSTFILE=${HOSTFILE:-}                          # multi-node: lines "hostname slots=8"
MASTER_ADDR=${MASTER_ADDR:-}                    # multi-node: node 0's address
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-ds_config/stage3.json}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-1}         # packs per GPU per micro-step
GRAD_ACC=${GRAD_ACC:-1}
LR=${LR:-1e-6}
EPOCHS=${EPOCHS:-1}
BATCH_METHOD=pack                               # DPO trains packs of whole pairs
SP_SIZE=${SP_SIZE:-1}                           # ranks sharing each pack (sequence parallelism)
DPO_LOSS=${DPO_LOSS:-sigmoid}                   # sigmoid (DPO) | ipo | simpo (reference-free)
DPO_BETA=${DPO_BETA:-0.1}
DPO_SFT_WEIGHT=${DPO_SFT_WEIGHT:-0}             # + this x NLL of the chosen replies (token mean over the step)
SIMPO_GAMMA=${SIMPO_GAMMA:-0.5}                 # DPO_LOSS=simpo only
PRECOMPUTE_REF=${PRECOMPUTE_REF:-1}             # 1: reference log-probs once, stored beside DATA, reused on resume
REF_MODEL=${REF_MODEL:-}                        # empty: MODEL itself is the reference
BF16=${BF16:-1}
GRAD_CKPT=${GRAD_CKPT:-1}
SAVE_STEPS=${SAVE_STEPS:-100}
WARMUP=${WARMUP:-0.1}                           # warmup: < 1 = fraction of all steps
REPORT_TO=${REPORT_TO:-none}                    # none | tensorboard | wandb
PRETOKENIZE=pre_tokenize_llama3.py
PRETOKENIZE_ARGS="--stage dpo --template longwriter"

source "$(dirname "$0")/_dpo_args.sh"
source "$(dirname "$0")/_launch.sh"
