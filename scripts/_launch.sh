# Shared launcher of the training scripts (glm4_longwriter.sh, llama3_longwriter.sh and their _lora variants;
# LongAlign's chatglm_pack.sh, chatglm_sort.sh, llama_pack.sh, llama_sort.sh through _longalign.sh; sft.sh). It is
# sourced, not run: the calling script sets MODEL, DATA, OUTPUT, ... and the array TRAIN_ARGS (its main.py
# hyper-parameters) first, and optionally PACK_LENGTH (the data's --max_length, 32768 unless set) and
# PRETOKENIZE_ARGS (extra pre-tokenization flags), which only the hints for missing data show. Extra
# command-line arguments of the calling script ("$@") are appended last, so they override anything here:
#   bash scripts/glm4_longwriter.sh --max_steps 10
# Sequence parallelism: SP_SIZE ranks share each pack (the calling script passes --sequence_parallel_size
# "$SP_SIZE" to main.py; longsft/train/sequence_parallel.py); it needs BATCH_METHOD=pack, NUM_GPUS x NUM_NODES a multiple of
# SP_SIZE, and makes the data-parallel size (NUM_GPUS x NUM_NODES) / SP_SIZE:
#   SP_SIZE=4 NUM_GPUS=8 bash scripts/glm4_longwriter.sh          # 2 groups of 4 GPUs, each group shares a pack
# QUANT_BIT=4|8: the base weights in 4 bits (NF4) or 8 bits (LLM.int8), LoRA adapters on top (QLoRA: main.py
# --quantization_bit, needs the script's LoRA flags: the _lora scripts, or USE_LORA=1 for sft.sh):
#   QUANT_BIT=4 bash scripts/glm4_longwriter_lora.sh
# LAUNCH_CHECK_ONLY=1 (set by scripts/sft.sh before it prepares the data): run the settings checks, skip the
# data checks, and return to the caller (GROUP_SIZE then holds sort_and_group's --group_size).
#
# Launchers (LAUNCHER=deepspeed | torchrun):
#   one node            deepspeed --num_gpus $NUM_GPUS main.py ...
#   nodes over ssh      HOSTFILE=hostfile bash scripts/...   (run on the first node; deepspeed starts the others
#                       through pdsh/ssh; hostfile lines look like "node1 slots=8"; NUM_NODES defaults to its
#                       number of hosts)
#   nodes without ssh   run the same command on every node, each with its own NODE_RANK (0 .. NUM_NODES-1) and
#                       MASTER_ADDR = node 0's address:
#                         LAUNCHER=deepspeed NO_SSH=1 HOSTFILE=hostfile NODE_RANK=$i MASTER_ADDR=10.0.0.1 bash ...
#                         LAUNCHER=torchrun NUM_NODES=2 NODE_RANK=$i MASTER_ADDR=10.0.0.1 bash ...
# Every node needs the repository and the data at the same path (a shared filesystem is simplest); variables
# the other nodes need (NCCL_*, HF_HOME, ...) go into .deepspeed_env (lines NAME=value) for the ssh launcher.
# Checked before anything is launched or created (every problem at once, exit status 2): the numbers (GPUs, nodes,
# per-device batch and accumulation at least 1), SP_SIZE, the DeepSpeed config, the model folder (as main.py checks
# it) and the data. DRY_RUN=1 prints the command and exits.  Without a CUDA GPU the run goes to the CPU (gloo), which only makes
# sense for tiny models (see scripts/quickstart.sh).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# ---- launch settings (environment overrides) --------------------------------------------------------------
LAUNCHER=${LAUNCHER:-deepspeed}
HOSTFILE=${HOSTFILE:-}
NO_SSH=${NO_SSH:-0}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python3}
PACK_LENGTH=${PACK_LENGTH:-32768}
SP_SIZE=${SP_SIZE:-1}
LAUNCH_CHECK_ONLY=${LAUNCH_CHECK_ONLY:-0}
QUANT_BIT=${QUANT_BIT:-}

has_cuda() { "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

if [[ -z "${NUM_GPUS:-}" ]]; then   # GPUs (processes) per node
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NUM_GPUS" -gt 0 ]] || NUM_GPUS=1
fi
if [[ -z "${NUM_NODES:-}" ]]; then
  if [[ -n "$HOSTFILE" ]]; then
    NUM_NODES=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
  else
    NUM_NODES=1
  fi
fi
if [[ "$NUM_NODES" -gt 1 ]]; then
  MASTER_ADDR=${MASTER_ADDR:-}
else
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
fi

# ---- checks: collect every problem, then fail once ---------------------------------------------------------
problems=()
case "$LAUNCHER" in deepspeed|torchrun) ;; *) problems+=("LAUNCHER=$LAUNCHER: use deepspeed or torchrun") ;; esac
for v in NUM_GPUS NUM_NODES NODE_RANK PER_DEVICE_BATCH GRAD_ACC MASTER_PORT; do
  if [[ ! "${!v}" =~ ^[0-9]+$ ]]; then
    problems+=("$v=${!v}: must be a whole number")
  elif [[ "$v" != NODE_RANK && "${!v}" -lt 1 ]]; then   # deepspeed reads --num_gpus 0 as "every GPU"
    case "$v" in
      NUM_GPUS) what="processes per node (deepspeed --num_gpus 0 would mean every GPU of the node)" ;;
      NUM_NODES) what="nodes" ;;
      PER_DEVICE_BATCH) what="packs or samples per GPU per micro-step" ;;
      GRAD_ACC) what="micro-steps per optimizer step" ;;
      *) what="a port number" ;;
    esac
    problems+=("$v=${!v}: must be at least 1 ($what)")
  fi
done
if [[ "$NUM_NODES" =~ ^[0-9]+$ && "$NUM_NODES" -gt 1 ]]; then
  if [[ "$LAUNCHER" == deepspeed && -z "$HOSTFILE" ]]; then
    problems+=("NUM_NODES=$NUM_NODES with LAUNCHER=deepspeed needs HOSTFILE (lines 'hostname slots=GPUS'), or use LAUNCHER=torchrun")
  fi
  if [[ ( "$LAUNCHER" == torchrun || "$NO_SSH" == 1 ) && -z "$MASTER_ADDR" ]]; then
    problems+=("NUM_NODES=$NUM_NODES: set MASTER_ADDR to node 0's address (and NODE_RANK on every node)")
  fi
fi
[[ -z "$HOSTFILE" || -f "$HOSTFILE" ]] || problems+=("HOSTFILE=$HOSTFILE: no such file")
[[ -f "$DS_CONFIG" ]] || problems+=("DS_CONFIG=$DS_CONFIG: no such file (see ds_config/)")
# sequence parallelism (longsft/train/sequence_parallel.py): SP_SIZE ranks share each pack; main.py checks the model's heads
if [[ ! "$SP_SIZE" =~ ^[1-9][0-9]*$ ]]; then
  problems+=("SP_SIZE=$SP_SIZE: must be a whole number >= 1 (ranks sharing each pack; 1 = no sequence parallelism)")
elif [[ "$SP_SIZE" -gt 1 ]]; then
  if [[ "$NUM_GPUS" =~ ^[0-9]+$ && "$NUM_NODES" =~ ^[0-9]+$ ]] && (( (NUM_GPUS * NUM_NODES) % SP_SIZE )); then
    problems+=("SP_SIZE=$SP_SIZE: NUM_GPUS x NUM_NODES = $NUM_GPUS x $NUM_NODES = $((NUM_GPUS * NUM_NODES)) processes must be a multiple of it (data-parallel size = processes / SP_SIZE)")
  fi
  if [[ "$BATCH_METHOD" != pack ]]; then
    hint=""
    [[ "$0" == *_sort.sh ]] && hint="; $(basename "$0") is the sorted-batch recipe, $(basename "${0%_sort.sh}")_pack.sh the packed one"
    problems+=("SP_SIZE=$SP_SIZE needs BATCH_METHOD=pack (the ranks of a group share one pack), not BATCH_METHOD=$BATCH_METHOD$hint")
  fi
fi
[[ -z "$QUANT_BIT" || "$QUANT_BIT" == 4 || "$QUANT_BIT" == 8 ]] || \
  problems+=("QUANT_BIT=$QUANT_BIT: 4 (NF4) or 8 (LLM.int8) quantized base weights under LoRA, or unset")
GROUP_SIZE=8   # sort_and_group --group_size: packs (or samples) per optimizer step
[[ ${#problems[@]} -eq 0 ]] && GROUP_SIZE=$((NUM_GPUS * NUM_NODES / SP_SIZE * PER_DEVICE_BATCH * GRAD_ACC))
if [[ "$DRY_RUN" != 1 ]]; then   # the model folder, as main.py checks it (before anything is launched or created)
  while IFS= read -r p; do
    [[ -n "$p" ]] && problems+=("MODEL=$p")
  done < <("$PYTHON" -c 'import sys; from longsft.train.settings import model_dir_problems
for p in model_dir_problems(sys.argv[1]): print(p.split(" ", 1)[1])' "$MODEL")
fi
if [[ "$DRY_RUN" != 1 && "$LAUNCH_CHECK_ONLY" != 1 ]]; then
  if [[ ! -f "$DATA/meta.json" ]]; then
    problems+=("DATA=$DATA is not a tokenized dataset (no meta.json). Make it with
      $PYTHON $PRETOKENIZE --model_name_or_path $MODEL --input YOUR.jsonl --output_dir $DATA${PRETOKENIZE_ARGS:+ $PRETOKENIZE_ARGS}
      $PYTHON sort_and_group.py --train_file $DATA --max_length $PACK_LENGTH --group_size $GROUP_SIZE")
  elif [[ "$BATCH_METHOD" != naive && ! -d "$DATA/packs" ]]; then
    problems+=("DATA=$DATA has no packs/ (needed by --batch_method $BATCH_METHOD). Run
      $PYTHON sort_and_group.py --train_file $DATA --max_length $PACK_LENGTH --group_size $GROUP_SIZE")
  fi
fi
if [[ ${#problems[@]} -gt 0 ]]; then
  echo "[launch] cannot start, fix these settings at the top of $0 or in the environment:" >&2
  for p in "${problems[@]}"; do echo "  - $p" >&2; done
  exit 2
fi
if [[ "$LAUNCH_CHECK_ONLY" == 1 ]]; then
  return 0
fi

# No CUDA: main.py runs the processes on the CPU itself (gloo; DeepSpeed's CPU accelerator). Only small models.
devices=GPUs   # what NUM_GPUS counts: GPUs, or on a real run without CUDA processes on the CPU (a dry run plans GPUs)
if [[ "$DRY_RUN" != 1 ]] && ! has_cuda; then
  echo "[launch] no CUDA GPU found: $NUM_GPUS process(es) per node on the CPU (gloo backend), fp32"
  devices="CPU processes"
fi

# ---- command ---------------------------------------------------------------------------------------------
if [[ "$LAUNCHER" == torchrun ]]; then
  CMD=(torchrun --nnodes "$NUM_NODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS"
       --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  CMD=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
  if [[ -n "$HOSTFILE" ]]; then
    CMD+=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES")
    [[ "$NO_SSH" == 1 ]] && CMD+=(--no_ssh --node_rank "$NODE_RANK")
  fi
  [[ -n "$MASTER_ADDR" ]] && CMD+=(--master_addr "$MASTER_ADDR")
fi
CMD+=(main.py "${TRAIN_ARGS[@]}" ${QUANT_BIT:+--quantization_bit "$QUANT_BIT"} "$@")

# ---- effective global batch ------------------------------------------------------------------------------
unit=samples
[[ "$BATCH_METHOD" == pack ]] && unit=packs
GLOBAL_BATCH=$((NUM_GPUS * NUM_NODES / SP_SIZE * PER_DEVICE_BATCH * GRAD_ACC))
if [[ "$SP_SIZE" -gt 1 ]]; then
  echo "[launch] global batch = $NUM_GPUS $devices x $NUM_NODES node(s) / SP_SIZE $SP_SIZE (ranks sharing each pack) x $PER_DEVICE_BATCH per device x $GRAD_ACC accumulation = $GLOBAL_BATCH $unit per optimizer step"
else
  echo "[launch] global batch = $NUM_GPUS $devices x $NUM_NODES node(s) x $PER_DEVICE_BATCH per device x $GRAD_ACC accumulation = $GLOBAL_BATCH $unit per optimizer step"
fi
echo "[launch] model $MODEL | data $DATA | output $OUTPUT | deepspeed config $DS_CONFIG"
echo "[launch] $(printf '%q ' "${CMD[@]}")"
if [[ "$DRY_RUN" == 1 ]]; then
  exit 0
fi
exec "${CMD[@]}"   # main.py creates $OUTPUT (and removes it again if it fails before writing anything)
