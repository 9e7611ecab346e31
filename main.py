"""Supervised fine-tuning (GLM-4, Llama, GLM-Edge, Qwen, Mistral) on tokenized (and sorted/packed) long-output data.

The usual run (8 GPUs, DeepSpeed ZeRO-3, packed batches, LongAlign's per-sequence loss):

    deepspeed --num_gpus 8 main.py \\
        --model_name_or_path THUDM/glm-4-9b --train_file data/glm4/longwriter --batch_method pack --pack_loss \\
        --output_dir runs/glm4-longwriter --deepspeed ds_config/stage3.json --gradient_checkpointing \\
        --per_device_train_batch_size 1 --gradient_accumulation_steps 1 --learning_rate 1e-5 \\
        --num_train_epochs 4 --logging_steps 1 --save_strategy epoch

A config file (YAML or JSON, keys = the flag names; anywhere among the arguments, suffix in any case); flags
override it. Flag names must be exact (no argparse prefix matching):

    # sft.yaml:  model_name_or_path: /models/glm-4-9b
    #            train_file: data/glm4/longwriter
    #            batch_method: pack
    #            pack_loss: true
    #            lora_target_modules: [query_key_value, dense]
    torchrun --nproc_per_node 8 main.py sft.yaml --output_dir runs/x --learning_rate 2e-5

Tiny CPU run (single process, fp32, about a minute), on a model and data built offline:

    python tools/make_tiny.py model --family llama3 --out /tmp/tiny-llama3
    python pre_tokenize.py --model_name_or_path /tmp/tiny-llama3 --input data/sample.jsonl \
        --output_dir /tmp/tiny-tok --max_length 4096
    python sort_and_group.py --train_file /tmp/tiny-tok --max_length 4096 --group_size 1
    python main.py --model_name_or_path /tmp/tiny-llama3 --train_file /tmp/tiny-tok --batch_method pack \
        --pack_loss --output_dir /tmp/tiny-run --max_steps 5 --logging_steps 1 --per_device_train_batch_size 1

What it does: tells the folder's model family from config.json's `model_type` and its tokenizer files
(patch/families.py: glm4, chatglm3, chatglm2 -> patch.modeling_chatglm; llama3, llama2 -> patch.modeling_llama;
glm, glm4_0414, qwen2, qwen3, mistral -> patch.modeling_native: transformers' own classes with the packed forward;
code inside the model folder runs only with --trust_remote_code), loads its tokenizer as pre_tokenize.py does,
checks the data against the model and tokenizer (and fails once, naming every problem and its fix),
trains with `trainer.TrainerNoShuffle` (exact token-mean or --pack_loss per-sequence loss over each
optimizer step, on any number of ranks), optionally with LoRA, and saves the model (or adapter) with
its tokenizer to --output_dir, plus `train_settings.json` with every setting of the run.
--stage dpo trains preference pairs (pre_tokenize.py --stage dpo, then sort_and_group.py) with DPO / IPO / SimPO,
packed and exact on any GPU count (longsft/train/dpo.py; README "Preference training").
--resume_from_checkpoint PATH|true|N continues a run with the same data order (true or yes: the newest complete
checkpoint; N: OUTPUT_DIR/checkpoint-N; a run that already finished is left as it is). A config file in GLM-Edge's
finetune.py layout (data_config / training_args / peft_config; longsft.train.settings.glm_edge_settings maps it) works too:

    python main.py configs/lora.yaml --model_name_or_path THUDM/glm-edge-4b-chat --resume_from_checkpoint 600

Before anything loads, every setting, the model folder and the output folder are checked (longsft/train/settings.py),
first without importing torch or transformers (longsft/train/early_checks.py: a typo fails in about a second), and one
error names every problem; a new run writes only into a new or empty --output_dir or one holding an earlier run's
outputs, a resume only into one holding main.py runs' outputs, and one run at a time (longsft/train/checkpoints.py).
"""

import sys

from longsft.errors import run_cli
from longsft.train.checkpoints import SETTINGS_FILE  # noqa: F401  (what callers use)


def main(argv: list[str] | None = None, callbacks: list | None = None):
    """Check the settings before torch and transformers are imported (a typo fails in about a second:
    longsft/train/early_checks.py), then train (longsft.train.run.main, which checks them all again)."""
    from longsft.train.early_checks import check_early

    argv = list(sys.argv[1:] if argv is None else argv)
    check_early(argv)
    from longsft.train.run import main as train

    return train(argv, callbacks)


def __getattr__(name: str):
    """ARG_CLASSES, make_parser, parse_args (longsft.train.arguments) and shutdown_distributed, imported on first use:
    they bring transformers and torch, which `import main` alone does not."""
    if name in ("ARG_CLASSES", "make_parser", "parse_args"):
        from longsft.train import arguments

        return getattr(arguments, name)
    if name == "shutdown_distributed":
        from longsft.train.run import shutdown_distributed

        return shutdown_distributed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    run_cli(main)
    __getattr__("shutdown_distributed")()
