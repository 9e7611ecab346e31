#!/usr/bin/env bash
# LongAlign's packing recipe for ChatGLM3-6B / ChatGLM2-6B models (chatglm_pack.sh, as LongAlign names it):
# full fine-tuning on LongAlign-10k-style long instruction data mixed with general chat data, in packs of
# samples (no padding) with LongAlign's loss weighting (--pack_loss: every sequence counts the same).
# LongAlign's settings (scripts/_longalign.sh): up to 65,536 tokens, 2 epochs, lr 2e-5 cosine with 3% warmup,
# adam beta2 0.95, weight decay 0, bf16, gradient checkpointing, DeepSpeed ZeRO-3, 1 pack per GPU,
# 1 accumulation step.
#
#   bash scripts/chatglm_pack.sh                                    # one node, all its GPUs
#   NUM_GPUS=4 OUTPUT=output/try bash scripts/chatglm_pack.sh --max_steps 20    # extra flags go to main.py
#   SP_SIZE=2 bash scripts/chatglm_pack.sh        # sequence parallelism: 2 GPUs share each pack (half its tokens each)
#   HOSTFILE=hostfile bash scripts/chatglm_pack.sh                  # several nodes (deepspeed over ssh)
#   LAUNCHER=torchrun NUM_NODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/chatglm_pack.sh   # on node 0, and
#     the same with NODE_RANK=1 on node 1 (no ssh needed); DRY_RUN=1 only prints the command.
#
# Data first. Template `chatglm2`: ChatGLM2's "[Round N]" text, what LongAlign's ChatGLM data uses
# (TEMPLATE=chatglm3 for ChatGLM3's role format); the packs' size is fixed by sort_and_group --max_length:
#   python pre_tokenize.py --model_name_or_path THUDM/LongAlign-6B-64k-base --template chatglm2 \
#       --input LongAlign-10k.jsonl sharegpt.jsonl --output_dir data/chatglm/10k --max_length 65536
#   python sort_and_group.py --train_file data/chatglm/10k --max_length 65536 --group_size 8
#   (--group_size: the global batch, GPUs / SP_SIZE x 1; 8 for 8 GPUs, 4 with SP_SIZE=2)
set -euo pipefail

# ---- what you edit (each one can also be set from the environment; relative paths are from the repo root) ---
MODEL=${MODEL:-THUDM/LongAlign-6B-64k-base}    # ChatGLM3-6B extended to 64k
DATA=${DATA:-data/chatglm/10k}                  # pre_tokenize.py output, after sort_and_group.py
OUTPUT=${OUTPUT:-output/chatglm/pack}
BATCH_METHOD=${BATCH_METHOD:-pack}                  # pack | sort | naive
GRAD_ACC=${GRAD_ACC:-1}
PACK_LOSS=${PACK_LOSS:-1}                       # 1: LongAlign's per-sequence mean (loss weighting); 0: token mean
TEMPLATE=${TEMPLATE:-chatglm2}                    # the data's template (shown in the hints for missing data)
# the rest (GPUs, nodes, SP_SIZE, DS_CONFIG, LR, EPOCHS, WARMUP, BF16, GRAD_CKPT, SAVE_STEPS...): scripts/_longalign.sh
source "$(dirname "$0")/_longalign.sh"
