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
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from longsft.evaluate.after_training import test_file_problems
from longsft.train import dpo_settings, quantization, rope
from longsft.train import settings as train_settings
from longsft.train.deepspeed_checks import deepspeed_config_problems, sequence_parallel_problems
from longsft.train.dpo_settings import PreferenceArguments
from longsft.train.settings import BATCH_METHODS
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
    # fit and extend (longsft/train/quantization.py, rope.py)
    quantization_bit: Optional[int] = field(
        default=None, metadata={"help": "Load the base weights in 4 bits (NF4, double quantization) or 8 bits "
                                        "(LLM.int8) through bitsandbytes and train LoRA adapters on them (QLoRA; "
                                        "needs --use_lora). Embeddings and lm_head stay unquantized.",
                                "choices": [4, 8]})
    rope_scaling: Optional[str] = field(
        default=None, metadata={"help": "Extend the context by scaling RoPE: linear (positions / F), dynamic (NTK), "
                                        "yarn, llama3, base (RoPE base x F); chatglm-format models: linear "
                                        "(ChatGLM2-6B-32K) or base (ChatGLM3 / GLM-4). With --rope_factor or "
                                        "--model_max_length.", "choices": ["linear", "dynamic", "yarn", "llama3",
                                                                           "base"]})
    rope_factor: Optional[float] = field(
        default=None, metadata={"help": "RoPE scaling factor F: the new context / the model's context."})
    model_max_length: Optional[int] = field(
        default=None, metadata={"help": "The context to reach with --rope_scaling: F = ceil(N / the model's "
                                        "context) (max_position_embeddings; chatglm: seq_length); none if N fits."})


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
            f"{f.name} {','.join(f.lora_targets) or 'every linear layer of the decoder blocks'}"
            for f in families.FAMILIES.values()) + "."})
    save_merged_model: bool = field(
        default=False, metadata={"help": "With --use_lora, also save base + adapter merged to OUTPUT_DIR/merged."})


# importing these needs neither torch nor transformers; PreferenceArguments' flags (--stage dpo, dpo_settings.py)
# go into main.py's TrainingArguments, the fourth of ARG_CLASSES
OUR_CLASSES = (ModelArguments, DataArguments, LoraArguments, PreferenceArguments)
_TRAINING_ARGUMENTS: list = []


def _training_arguments():
    """transformers' TrainingArguments plus the preference-training flags (built once, on first use)."""
    if not _TRAINING_ARGUMENTS:
        from transformers import TrainingArguments as HFTrainingArguments

        @dataclass
        class TrainingArguments(PreferenceArguments, HFTrainingArguments):
            """transformers' TrainingArguments plus the preference-training settings (dpo_settings.py), with a
            warmup that never wastes a step: a fraction (--warmup_steps < 1, the scripts' WARMUP=0.03) rounds down
            instead of up, and a warmup of a single step is none. transformers' linear warmup trains its first step
            at learning rate 0, so ceil(0.03 x 20 steps) = 1 step of warmup only meant that step 1 of a short run
            trained nothing."""

            def get_warmup_steps(self, num_training_steps: int) -> int:
                if self.warmup_steps >= 1:
                    return int(self.warmup_steps)
                steps = math.floor(num_training_steps * self.warmup_steps)
                return steps if steps >= 2 else 0

        TrainingArguments.__module__ = __name__  # pickled with checkpoints: found again through __getattr__
        TrainingArguments.__qualname__ = "TrainingArguments"
        _TRAINING_ARGUMENTS.append(TrainingArguments)
    return _TRAINING_ARGUMENTS[0]


def __getattr__(name: str):
    """ARG_CLASSES on first use: transformers' TrainingArguments costs ~10 s to import (torch, peft, bitsandbytes),
    and main.py checks the settings before that (early_checks.py)."""
    if name == "ARG_CLASSES":
        return (ModelArguments, DataArguments, LoraArguments, _training_arguments())
    if name == "TrainingArguments":
        return _training_arguments()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_parser():
    """Exact flag names only: argparse would otherwise take --pack_los for --pack_loss."""
    from transformers import HfArgumentParser

    return HfArgumentParser(__getattr__("ARG_CLASSES"), allow_abbrev=False)


def split_config(argv: list[str]) -> tuple[dict, list[str]]:
    """(settings of the YAML/JSON config file given among argv, or {}; the remaining command-line flags)."""
    return train_settings.split_config(argv, __getattr__("ARG_CLASSES"), make_parser())


def explicit_settings(argv: list[str]) -> list[str]:
    """Names of the settings the config file or the command line set (the rest are defaults)."""
    return train_settings.explicit_settings(argv, __getattr__("ARG_CLASSES"), make_parser())


def parse_args(argv: list[str] | None = None, check_start: bool = False):
    """(ModelArguments, DataArguments, LoraArguments, TrainingArguments) from [CONFIG.yaml|json] + flags.

    Every bad value is reported at once (SystemExit), before anything is built; with check_start also the
    required flags, the input paths, the model folder and the output folder (what main() needs)."""
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    arg_classes = __getattr__("ARG_CLASSES")
    parser = make_parser()
    ns, problems = checked_settings(argv, parser, train_settings.read_settings(argv, arg_classes, parser), check_start)
    if problems:
        raise SystemExit("main.py cannot start:\n  - " + "\n  - ".join(problems))
    explicit = set(explicit_settings(argv))
    _choose_precision(ns, explicit)
    if "per_device_eval_batch_size" not in explicit:  # a pack per device, not 8 packs concatenated
        ns.per_device_eval_batch_size = ns.per_device_train_batch_size
    if "dataloader_pin_memory" not in explicit and not torch.cuda.is_available():
        ns.dataloader_pin_memory = False
    _setup_cpu_distributed(ns)
    try:
        return tuple(cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init})
                     for cls in arg_classes)
    except ValueError as e:  # TrainingArguments.__post_init__ checks combinations of settings
        raise SystemExit(f"main.py cannot start: {e}") from e


def checked_settings(argv: list[str], parser, settings: tuple, check_start: bool) -> tuple:
    """(namespace, problems) of argv parsed by `parser` over the config file's `settings` (read_settings' result):
    unknown flags end the run at once; every other problem (values, the DeepSpeed config, sequence parallelism, and
    with check_start the required flags, paths, model folder and output folder) is collected. Used by the full
    parser and, before the heavy imports, by early_checks.py's lenient one."""
    config, flags, config_problems, notes = settings
    for note in notes:
        logger.warning("%s", note)
    if config:
        parser.set_defaults(**config)
    ns, extra = parser.parse_known_args(flags)
    if extra:
        hint = "; a config file must end in .yaml, .yml or .json" if any(not e.startswith("-") for e in extra) \
            else ""
        raise SystemExit(f"main.py: unrecognized arguments {extra} (python main.py --help lists the flags{hint})")
    explicit = set(config) | {a[2:].split("=")[0].replace("-", "_") for a in flags if a.startswith("--")}
    dpo_settings.apply_defaults(ns, explicit)  # --stage dpo: --batch_method pack unless set
    problems = config_problems + train_settings.setting_problems(ns) + deepspeed_config_problems(ns.deepspeed) \
        + sequence_parallel_problems(ns.sequence_parallel_size, int(os.environ.get("WORLD_SIZE", "1")),
                                     ns.batch_method, ns.deepspeed) + dpo_settings.setting_problems(ns, explicit)
    problems += quantization.setting_problems(ns) + rope.setting_problems(ns)
    if check_start:
        problems += train_settings.start_problems(ns, BATCH_METHODS)
        problems += test_file_problems(ns.test_file)
        if ns.stage == "dpo" and ns.ref_model:
            problems += [p.replace("--model_name_or_path", "--ref_model", 1)
                         for p in train_settings.model_dir_problems(ns.ref_model)]
    return ns, problems


def _choose_precision(ns, explicit: set[str]) -> None:
    """bf16 where the hardware has it (unless set explicitly), fp32 on CPU."""
    import torch

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
    import torch

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
