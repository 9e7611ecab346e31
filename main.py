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
--resume_from_checkpoint PATH|true|N continues a run with the same data order (true or yes: the newest complete
checkpoint; N: OUTPUT_DIR/checkpoint-N; a run that already finished is left as it is). A config file in GLM-Edge's
finetune.py layout (data_config / training_args / peft_config; train_setup.glm_edge_settings maps it) works too:

    python main.py configs/lora.yaml --model_name_or_path THUDM/glm-edge-4b-chat --resume_from_checkpoint 600 Before anything loads, every setting, the model
folder and the output folder are checked (train_setup.py), and one error names every problem; a new run writes
only into a new or empty --output_dir or one holding an earlier run's outputs (checkpoints.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments

import checkpoints as ckpt
import models
import sequence_parallel as sp_lib
import train_setup
from errors import run_cli
from chat_inputs import InputError
from dataset import TokenizedData, make_collator, write_json_atomic
from patch import families
from patch.families import Family
from templates import pad_token_id
from train_data import build_datasets, check_data
from trainer import BATCH_METHODS, TrainerNoShuffle, planned_steps

logger = logging.getLogger("longsft.train")

SETTINGS_FILE = ckpt.SETTINGS_FILE


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

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


ARG_CLASSES = (ModelArguments, DataArguments, LoraArguments, TrainingArguments)


def make_parser() -> HfArgumentParser:
    """Exact flag names only: argparse would otherwise take --pack_los for --pack_loss."""
    return HfArgumentParser(ARG_CLASSES, allow_abbrev=False)


def split_config(argv: list[str]) -> tuple[dict, list[str]]:
    """(settings of the YAML/JSON config file given among argv, or {}; the remaining command-line flags)."""
    return train_setup.split_config(argv, ARG_CLASSES, make_parser())


def explicit_settings(argv: list[str]) -> list[str]:
    """Names of the settings the config file or the command line set (the rest are defaults)."""
    return train_setup.explicit_settings(argv, ARG_CLASSES, make_parser())


def parse_args(argv: list[str] | None = None, check_start: bool = False):
    """(ModelArguments, DataArguments, LoraArguments, TrainingArguments) from [CONFIG.yaml|json] + flags.

    Every bad value is reported at once (SystemExit), before anything is built; with check_start also the
    required flags, the input paths, the model folder and the output folder (what main() needs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    config, flags, config_problems, notes = train_setup.read_settings(argv, ARG_CLASSES, parser)
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
    problems = config_problems + train_setup.setting_problems(ns) + sp_lib.setting_problems(
        ns.sequence_parallel_size, int(os.environ.get("WORLD_SIZE", "1")), ns.batch_method, ns.deepspeed)
    if check_start:
        problems += train_setup.start_problems(ns, BATCH_METHODS)
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


# ----------------------------------------------------------------------------------------------
# Model and tokenizer
# ----------------------------------------------------------------------------------------------

def _or_exit(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        raise SystemExit(str(e)) from e


def read_model_type(model_dir: str) -> str:
    """config.json's model_type, from a local folder or the hub cache (the path's name plays no part)."""
    return _or_exit(models.read_model_type, model_dir)


def model_class(model_type: str):
    return _or_exit(models.model_class, model_type)


def model_family(model_dir: str, trust_remote_code: bool = False) -> Optional[Family]:
    """The registry family of the model folder; None only with --trust_remote_code (the folder's own code)."""
    return models.family_of(model_dir) if trust_remote_code else _or_exit(models.require_family, model_dir)


def load_tokenizer(model_dir: str, family: Optional[Family | str], trust_remote_code: bool = False):
    """The model folder's tokenizer, loaded as pre_tokenize.py loads it (GLM-4: patch/'s class, no folder code)."""
    if family is None:  # a folder no family covers, with --trust_remote_code
        return transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return _or_exit(models.load_tokenizer, model_dir, family, trust_remote_code=trust_remote_code)


def copy_remote_code(src_dir: str, dst_dir: str) -> list[str]:
    """If the model folder ships remote code (an auto_map in config.json or tokenizer_config.json), copy its
    top-level .py files next to a saved model, so the output folder loads every way the input did."""
    uses_remote_code = False
    for cfg in ("config.json", "tokenizer_config.json"):
        p = Path(src_dir) / cfg
        if p.is_file() and json.loads(p.read_text(encoding="utf-8")).get("auto_map"):
            uses_remote_code = True
    copied = []
    for py in sorted(Path(src_dir).glob("*.py")) if uses_remote_code else []:
        if not (Path(dst_dir) / py.name).exists():
            shutil.copyfile(py, Path(dst_dir) / py.name)
            copied.append(py.name)
    return copied


def load_model(model_args: ModelArguments, model_type: str, dtype: torch.dtype):
    if model_args.trust_remote_code:
        config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
        cls = transformers.AutoModelForCausalLM
        kw = {"trust_remote_code": True}
    else:
        cls = model_class(model_type)
        config = cls.config_class.from_pretrained(model_args.model_name_or_path)
        kw = {}
    config.use_cache = False
    if model_args.loss_chunk_size is not None:
        config.loss_chunk_size = model_args.loss_chunk_size
    model = cls.from_pretrained(model_args.model_name_or_path, config=config, dtype=dtype, **kw)
    params = inspect.signature(model.forward).parameters
    missing = [p for p in ("weights", "pack_loss", "num_items_in_batch") if p not in params]
    if missing:
        raise SystemExit(f"{type(model).__name__}.forward() from {model_args.model_name_or_path} does not accept "
                         f"{missing}: the exact loss needs the patched model; drop --trust_remote_code or install "
                         f"patch/ into the folder (python patch/install.py --model_dir DIR)")
    return model


def vocab_rows(config) -> int:
    """Embedding rows of the model = the largest token id it can read + 1."""
    return int(getattr(config, "padded_vocab_size", None) or config.vocab_size)


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable); works on ZeRO-3 partitioned parameters too."""
    total = trainable = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def apply_lora(model, lora_args: LoraArguments, family: Optional[Family], gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model

    targets = lora_args.lora_target_modules
    targets = [t.strip() for t in targets.split(",") if t.strip()] if targets else \
        list(family.lora_targets) if family else None
    if not targets:
        raise SystemExit("--use_lora: no default target modules for a model no family of patch/families.py "
                         "covers; pass --lora_target_modules")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [t for t in targets if t not in present]
    if absent:
        raise SystemExit(f"--lora_target_modules: {absent} not in the model (its linear layers include "
                         f"{sorted(n for n in present if 'proj' in n or 'dense' in n or 'query' in n)[:12]})")
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    cfg = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                     target_modules=targets, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, cfg)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def setup_logging(args: TrainingArguments) -> None:
    main_process = args.process_index == 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    if main_process:
        transformers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None, callbacks: list | None = None) -> Optional[TrainerNoShuffle]:
    """Train; returns the trainer (None when a resumed run had already finished: nothing was done)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # every setting, the model folder and the output folder: one error naming each problem, before anything loads
    model_args, data_args, lora_args, args = parse_args(argv, check_start=True)
    setup_logging(args)
    for key in train_setup.deepspeed_unknown_keys(args.deepspeed) if args.deepspeed else []:
        logger.warning("--deepspeed %s: the installed deepspeed never reads the key %r (a typo?): it has no "
                       "effect", args.deepspeed if isinstance(args.deepspeed, str) else "config", key)
    args.remove_unused_columns = False
    args.prediction_loss_only = True
    resume_req = ckpt.resume_request(args.resume_from_checkpoint, args.output_dir)
    world = max(1, args.world_size)
    layout = sp_lib.SPLayout.of(world, args.process_index, data_args.sequence_parallel_size)
    if layout.size > 1:  # before the model loads: ZeRO-3's Init reads the batch sizes of the DeepSpeed config
        sp_lib.configure_deepspeed(args.hf_deepspeed_config, layout, args.per_device_train_batch_size,
                                   args.gradient_accumulation_steps)

    # ---- model family, tokenizer, data checks (before the model is loaded: fail fast) ----
    model_type = read_model_type(model_args.model_name_or_path)
    if not model_args.trust_remote_code:
        model_class(model_type)  # unsupported model_type -> one clear error
    family = model_family(model_args.model_name_or_path, model_args.trust_remote_code)
    tokenizer = load_tokenizer(model_args.model_name_or_path, family, model_args.trust_remote_code)
    config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=True) \
        if model_args.trust_remote_code else model_class(model_type).config_class.from_pretrained(
            model_args.model_name_or_path)
    rows = vocab_rows(config)
    problems, stats = sp_lib.head_problems(config, layout.size), {}
    for role, path in (("train", data_args.train_file), ("validation", data_args.validation_file)):
        if path:
            p, stats[role] = check_data(path, role, data_args.batch_method, rows, tokenizer, family,
                                        model_args.model_name_or_path)
            problems += p
    if problems:
        raise SystemExit("the training data cannot be used:\n  - " + "\n  - ".join(problems))
    train_ds, eval_ds = build_datasets(data_args)
    train_meta = TokenizedData(data_args.train_file).meta
    pad_id = pad_token_id(tokenizer, family, train_meta.get("template")) if family else tokenizer.pad_token_id
    if pad_id is None:  # no family rule (--trust_remote_code on an unknown folder): what the data recorded, or eos
        pad_id = (train_meta.get("tokenizer") or {}).get("pad_token_id")
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    collator = make_collator(data_args.batch_method, pad_id, data_args.pack_loss) if layout.size == 1 else \
        sp_lib.SequenceParallelCollator(layout.size, layout.rank, pad_id, data_args.pack_loss)

    # ---- a resumed run: already finished (nothing to do), else its newest complete checkpoint ----
    steps = planned_steps(len(train_ds), layout.dp_size, args.per_device_train_batch_size,
                          args.gradient_accumulation_steps, args.max_steps, args.num_train_epochs)
    done = ckpt.finished_output(args.output_dir, steps) if resume_req else None
    if done:
        logger.info("%s already holds the final output of this run (step %s of %d, %s): nothing to do",
                    args.output_dir, done.get("global_step"), steps, ckpt.MARKER)
        return None
    resume = ckpt.resolve_resume(args.output_dir, resume_req, steps)
    if resume and (ckpt.checkpoint_step(resume) or 0) >= steps:
        logger.info("%s is at step %s of %d: nothing left to train; the final output is written from it",
                    resume, ckpt.checkpoint_step(resume), steps)

    # ---- model ----
    dtype = torch.bfloat16 if (args.bf16 and args.deepspeed) else torch.float32
    transformers.set_seed(args.seed)  # LoRA's initial weights (and anything the model initialises) from --seed
    model = load_model(model_args, model_type, dtype)
    if lora_args.use_lora:
        model = apply_lora(model, lora_args, family, args.gradient_checkpointing)
    total, trainable = count_parameters(model)
    divisor = None
    if layout.size > 1:
        sp_lib.enable_ulysses(model, layout)
        divisor = sp_lib.gradient_divisor(args.hf_deepspeed_config.config, world, layout.size)

    # ---- report the settings and the data (rank 0) ----
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * layout.dp_size
    unit = "packs" if data_args.batch_method == "pack" else "samples"
    logger.info("model %s (%s, %s), %s parameters, %s trainable (%.2f%%)", model_args.model_name_or_path,
                model_type, str(dtype).replace("torch.", ""), f"{total:,}", f"{trainable:,}",
                100.0 * trainable / max(total, 1))
    logger.info("batch_method %s, loss %s; %d rank(s) x %d %s x %d accumulation steps = %d %s per optimizer step",
                data_args.batch_method, "per-sequence mean (pack_loss)" if data_args.pack_loss else "token mean",
                layout.dp_size, args.per_device_train_batch_size, unit, args.gradient_accumulation_steps,
                global_batch, unit)
    if layout.size > 1:
        logger.info("sequence parallelism: %d ranks = %d data-parallel group(s) x %d ranks sharing each pack "
                    "(DeepSpeed Ulysses around %s; each rank holds 1/%d of a pack's tokens)", world, layout.dp_size,
                    layout.size, "packed_varlen", layout.size)
    group = stats["train"].get("group_size")
    step_items = layout.dp_size * args.per_device_train_batch_size
    if group and step_items % group:
        logger.info("note: sort_and_group.py balanced the data for --group_size %d, this run takes %d %s per "
                    "micro-step across ranks: balance is less good, the loss is unaffected", group, step_items, unit)
    for role, s in stats.items():
        logger.info("%s data: %s", role, ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                                      for k, v in s.items()))
    every = {f.name: getattr(a, f.name) for a in (model_args, data_args, lora_args, args)
             for f in dataclasses.fields(a) if f.init}
    logger.info("settings given: %s", ", ".join(f"{k}={every[k]}" for k in explicit_settings(argv) if k in every))
    settings = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
                "lora": dataclasses.asdict(lora_args), "training": json.loads(args.to_json_string()),
                "resolved": {"model_type": model_type, "model_family": family.name if family else None,
                             "dtype": str(dtype), "world_size": world, "data_parallel_size": layout.dp_size,
                             "sequence_parallel_size": layout.size,
                             "global_batch": global_batch, "resume_from_checkpoint": resume,
                             "parameters": total, "trainable_parameters": trainable},
                "data_stats": stats,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    before = ckpt.begin_output(args.output_dir) if args.should_save else set()
    if args.should_save:
        write_json_atomic(Path(args.output_dir) / SETTINGS_FILE, settings)
    logger.info("settings written to %s", Path(args.output_dir) / SETTINGS_FILE)

    # ---- train ----
    trainer = TrainerNoShuffle(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                               data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
                               batch_method=data_args.batch_method, pack_loss=data_args.pack_loss,
                               sequence_parallel=layout, gradient_divisor=divisor)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    if args.should_save and not lora_args.use_lora:
        copy_remote_code(model_args.model_name_or_path, args.output_dir)
    if eval_ds is not None:
        trainer.evaluate()
    trainer.save_state()  # trainer_state.json: the log history, final evaluation included
    if lora_args.save_merged_model:
        trainer.accelerator.wait_for_everyone()
        if args.should_save:
            save_merged(model_args, model_type, dtype, args.output_dir, tokenizer)
    trainer.accelerator.wait_for_everyone()  # every rank's part of the final output is written
    if args.should_save:
        ckpt.finish_output(args.output_dir, before, kind="final", global_step=trainer.state.global_step,
                           max_steps=trainer.state.max_steps, run_id=trainer.run_id)
    logger.info("saved the %s and its tokenizer to %s", "LoRA adapter" if lora_args.use_lora else "model",
                args.output_dir)
    return trainer


def save_merged(model_args: ModelArguments, model_type: str, dtype, output_dir: str, tokenizer) -> Path:
    """Base model + the saved adapter, merged, written to OUTPUT_DIR/merged (loads like the base model)."""
    from peft import PeftModel
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # rank 0 alone loads a whole copy: no ZeRO-3 partitioning here
    base = load_model(model_args, model_type, dtype)
    merged = PeftModel.from_pretrained(base, output_dir).merge_and_unload()
    out = Path(output_dir) / "merged"
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    copy_remote_code(model_args.model_name_or_path, out)
    logger.info("merged model written to %s", out)
    return out


def shutdown_distributed() -> None:
    """Leave together: rank 0 hosts the rendezvous store (deepspeed launcher), and a rank still tearing down its
    process group when rank 0 exits aborts ("terminate called without an active exception" from gloo)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
    shutdown_distributed()
