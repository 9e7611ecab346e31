"""main.py's settings: the argument dataclasses (model, data, LoRA, and transformers' TrainingArguments), read
from a config file (YAML / JSON, GLM-Edge's layout too) and the command line, every problem reported at once.

    from longsft.train.arguments import parse_args
    model_args, data_args, lora_args, training_args = parse_args(["sft.yaml", "--output_dir", "runs/x"])

Flag names are exact (no argparse prefix matching); flags override the config file. Precision: bf16 where the
GPU has it, fp32 on CPU. A multi-process CPU run (torchrun / deepspeed launcher) gets a gloo process group here.
The checks themselves: settings.py (settings, model folder, output folder), sequence_parallel.py (SP settings).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import transformers
from transformers import HfArgumentParser

from longsft.evaluate.after_training import test_file_problems
from longsft.train import dpo as dpo_lib
from longsft.train import sequence_parallel as sp_lib
from longsft.train import settings as train_settings
from longsft.train.trainer import BATCH_METHODS
from patch import families

logger = logging.getLogger("longsft.train")

@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Model folder (config.json model_type " + " or ".join(families.model_types())
                                        + ", weights, tokenizer)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model folder's own modeling/tokenizer code (auto_map) instead of "
                                         "patch/. The exact loss needs a forward() with weights/num_items_in_batch."})
    loss_chunk_size: Optional[int] = field(
        default=None, metadata={"help": "Tokens per chunk of the lm_head + cross-entropy (memory vs. speed); "
                                        "default: the model config's loss_chunk_size."})


@dataclass
class DataArguments:
    train_file: Optional[str] = field(
        default=None, metadata={"help": "Tokenized dataset folder (pre_tokenize.py; + sort_and_group.py for "
                                        "sort/pack)."})
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "Tokenized validation folder; evaluated with --eval_strategy, and at the end."})
    batch_method: str = field(
        default="naive", metadata={"help": "naive: shuffled padded batches of samples; sort: padded batches of "
                                           "similar-length samples (sort_and_group order); pack: packs of samples "
                                           "with no padding.", "choices": list(BATCH_METHODS)})
    pack_loss: bool = field(
        default=False, metadata={"help": "LongAlign loss: every sequence of the optimizer step weighs the same "
                                         "(mean over sequences of their token-mean CE). Default: token mean."})
    test_file: Optional[str] = field(
        default=None, metadata={"help": "Chat test set (any pre_tokenize.py input format): after training, the saved "
                                        "model generates a reply to each conversation and gets ROUGE-1/2/L, BLEU-4 "
                                        "and the eval loss in OUTPUT_DIR/test_eval (GLM-Edge's predict_with_generate; "
                                        "longsft/evaluate/after_training.py)."})
    test_max_new_tokens: int = field(
        default=512, metadata={"help": "With --test_file: most tokens per reply (GLM-Edge's 512); greedy decoding."})
    sequence_parallel_size: int = field(
        default=1, metadata={"help": "Ranks that share each pack (DeepSpeed Ulysses; needs --batch_method pack and "
                                     "--deepspeed): each holds 1/N of its tokens; data-parallel size = ranks / N. "
                                     "N must divide the attention heads (sequence_parallel.py)."})


@dataclass
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated module names; default per family: " + "; ".join(
            f"{f.name} {','.join(f.lora_targets)}" for f in families.FAMILIES.values()) + "."})
    save_merged_model: bool = field(
        default=False, metadata={"help": "With --use_lora, also save base + adapter merged to OUTPUT_DIR/merged."})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' TrainingArguments plus the preference-training settings (`--stage dpo`, longsft/train/dpo.py)."""
    stage: str = field(default="sft", metadata={
        "help": "sft: supervised fine-tuning on samples; dpo: preference training on pairs (pre_tokenize.py --stage "
                "dpo, then sort_and_group.py), packed, --batch_method pack.", "choices": list(dpo_lib.STAGES)})
    dpo_loss: str = field(default="sigmoid", metadata={
        "help": "sigmoid: DPO (with --dpo_label_smoothing: conservative DPO); ipo: IPO (length-normalised, as TRL); "
                "simpo: SimPO (reference-free, length-normalised, --simpo_gamma).", "choices": list(dpo_lib.DPO_LOSSES)})
    dpo_beta: float = field(default=0.1, metadata={"help": "beta: DPO's temperature (IPO's regularisation; SimPO's "
                                                           "reward scale, ~2 in its paper)."})
    dpo_label_smoothing: float = field(default=0.0, metadata={
        "help": "Share of preference labels assumed flipped (conservative DPO), for sigmoid and simpo; in [0, 0.5)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin (--dpo_loss simpo)."})
    dpo_sft_weight: float = field(default=0.0, metadata={
        "help": "Adds this weight times the NLL of the chosen completions (token mean over the step) to the loss."})
    precompute_ref_logps: bool = field(default=False, metadata={
        "help": "One pass of the reference over the data before training (stored beside the dataset, reused on "
                "resume): training then holds one model. Reference: --ref_model, LoRA's base, or the initial model."})
    ref_model: Optional[str] = field(default=None, metadata={
        "help": "Reference model folder (loaded like --model_name_or_path, eval mode, ZeRO-3 sharded). Default: a "
                "frozen copy of --model_name_or_path, or with --use_lora the policy with its adapters disabled."})


ARG_CLASSES = (ModelArguments, DataArguments, LoraArguments, TrainingArguments)


def make_parser() -> HfArgumentParser:
    """Exact flag names only: argparse would otherwise take --pack_los for --pack_loss."""
    return HfArgumentParser(ARG_CLASSES, allow_abbrev=False)


def split_config(argv: list[str]) -> tuple[dict, list[str]]:
    """(settings of the YAML/JSON config file given among argv, or {}; the remaining command-line flags)."""
    return train_settings.split_config(argv, ARG_CLASSES, make_parser())


def explicit_settings(argv: list[str]) -> list[str]:
    """Names of the settings the config file or the command line set (the rest are defaults)."""
    return train_settings.explicit_settings(argv, ARG_CLASSES, make_parser())


def parse_args(argv: list[str] | None = None, check_start: bool = False):
    """(ModelArguments, DataArguments, LoraArguments, TrainingArguments) from [CONFIG.yaml|json] + flags.

    Every bad value is reported at once (SystemExit), before anything is built; with check_start also the
    required flags, the input paths, the model folder and the output folder (what main() needs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    config, flags, config_problems, notes = train_settings.read_settings(argv, ARG_CLASSES, parser)
    for note in notes:
        logger.warning("%s", note)
    if config:
        config = {k: ",".join(v) if k == "lora_target_modules" and isinstance(v, (list, tuple)) else v
                  for k, v in config.items()}
        parser.set_defaults(**config)
    ns, extra = parser.parse_known_args(flags)
    if extra:
        hint = "; a config file must end in .yaml, .yml or .json" if any(not e.startswith("-") for e in extra) \
            else ""
        raise SystemExit(f"main.py: unrecognized arguments {extra} (python main.py --help lists the flags{hint})")
    explicit = set(explicit_settings(argv))
    dpo_lib.apply_defaults(ns, explicit)
    problems = config_problems + train_settings.setting_problems(ns) + sp_lib.setting_problems(
        ns.sequence_parallel_size, int(os.environ.get("WORLD_SIZE", "1")), ns.batch_method, ns.deepspeed)
    problems += dpo_lib.setting_problems(ns, explicit)
    if check_start:
        problems += train_settings.start_problems(ns, BATCH_METHODS)
        problems += test_file_problems(ns.test_file)
        if ns.stage == "dpo" and ns.ref_model:
            problems += [p.replace("--model_name_or_path", "--ref_model", 1)
                         for p in train_settings.model_dir_problems(ns.ref_model)]
    if problems:
        raise SystemExit("main.py cannot start:\n  - " + "\n  - ".join(problems))
    _choose_precision(ns, explicit)
    if "per_device_eval_batch_size" not in explicit:  # a pack per device, not 8 packs concatenated
        ns.per_device_eval_batch_size = ns.per_device_train_batch_size
    if "dataloader_pin_memory" not in explicit and not torch.cuda.is_available():
        ns.dataloader_pin_memory = False
    _setup_cpu_distributed(ns)
    try:
        return tuple(cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init})
                     for cls in ARG_CLASSES)
    except ValueError as e:  # TrainingArguments.__post_init__ checks combinations of settings
        raise SystemExit(f"main.py cannot start: {e}") from e


def _choose_precision(ns, explicit: set[str]) -> None:
    """bf16 where the hardware has it (unless set explicitly), fp32 on CPU."""
    if not torch.cuda.is_available() or getattr(ns, "use_cpu", False):
        if ns.bf16 or ns.fp16:
            logging.getLogger("longsft.train").warning("no CUDA device: training in fp32 (ignoring --bf16/--fp16)")
        ns.bf16 = ns.fp16 = False
    elif "bf16" not in explicit and "fp16" not in explicit and torch.cuda.is_bf16_supported():
        ns.bf16 = True


def _setup_cpu_distributed(ns) -> None:
    """Make multi-process CPU runs (torchrun / deepspeed launcher, gloo) distributed, as on GPUs.

    transformers/accelerate only start a CPU process group with --use_cpu, and never one for DeepSpeed
    without a GPU; for DeepSpeed we start the state ourselves and tell TrainingArguments to use it."""
    if torch.cuda.is_available():
        return
    if not ns.deepspeed:
        ns.use_cpu = True
        return
    if int(os.environ.get("LOCAL_RANK", -1)) == -1:
        return  # a single process: nothing to start
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend=ns.ddp_backend or "gloo")
    acc = ns.accelerator_config
    if isinstance(acc, str):
        acc = json.loads(Path(acc).read_text(encoding="utf-8"))
    ns.accelerator_config = {**(acc or {}), "use_configured_state": True}
