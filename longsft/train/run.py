"""What `main.py` runs: supervised fine-tuning on a tokenized (sorted / packed) dataset; main.py's docstring has the
commands and what it does.

    from longsft.train.run import main
    trainer = main(["--model_name_or_path", "/tmp/tiny-llama3", "--train_file", "/tmp/tiny-tok", "--batch_method",
                    "pack", "--output_dir", "/tmp/tiny-run", "--max_steps", "5"])

Order: every setting, the model folder and the output folder checked (arguments.py, settings.py); the output folder
locked for this run (rank 0, checkpoints.OutputLock); the model's heads against sequence parallelism, the family,
tokenizer and data checked against the model (data.py), and a resume's data order against its checkpoint's run,
before the model loads (model.py); the settings and data statistics logged and written to train_settings.json;
trained with TrainerNoShuffle (trainer.py); the model or adapter saved with its tokenizer, marked complete
(checkpoints.py). A save the disk refuses stops the run with one message (TrainerNoShuffle's saves).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch
import transformers
from transformers import TrainingArguments

from longsft.atomic_dir import write_json_atomic
from longsft.errors import same_on_every_rank
from longsft.data.storage import TokenizedData
from longsft.evaluate.after_training import TEST_EVAL_DIR, evaluate_saved_model
from longsft.templates.registry import pad_token_id
from longsft.train import checkpoints as ckpt
from longsft.train import sequence_parallel as sp_lib
from longsft.train import settings as train_settings
from longsft.train.arguments import explicit_settings, parse_args
from longsft.train.batches import make_collator
from longsft.train import quantization, rope
from longsft.train.data import build_datasets, check_data, context_warning, data_order
from longsft.train.model import (apply_lora, copy_remote_code, count_parameters, load_model, load_tokenizer,
                                 model_class, model_config, model_family, read_model_type, save_base_config,
                                 save_merged, vocab_rows)
from longsft.train.trainer import TrainerNoShuffle, planned_steps
from longsft.train import dpo_settings
from longsft.train import dpo_setup

logger = logging.getLogger("longsft.train")

SETTINGS_FILE = ckpt.SETTINGS_FILE

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
    parsed = parse_args(argv, check_start=True)
    args = parsed[3]
    if args.process_index != 0:
        return train(argv, parsed, callbacks)
    with ckpt.OutputLock(args.output_dir):  # one run per output folder (rank 0 holds it for the run)
        return train(argv, parsed, callbacks)


def train(argv: list[str], parsed: tuple, callbacks: list | None = None) -> Optional[TrainerNoShuffle]:
    """main() after the settings were parsed and checked: the data, the model, training, the final output."""
    model_args, data_args, lora_args, args = parsed
    setup_logging(args)
    for key in train_settings.deepspeed_unknown_keys(args.deepspeed) if args.deepspeed else []:
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
    family = model_family(model_args.model_name_or_path, model_args.trust_remote_code, data_args.train_file)
    tokenizer = load_tokenizer(model_args.model_name_or_path, family, model_args.trust_remote_code)
    config, rope_plan = model_config(model_args, model_type)  # with --rope_scaling applied (rope.py)
    rows = vocab_rows(config)
    heads = sp_lib.head_problems(config, layout.size)  # the model config, the same on every rank: printed once
    if heads:
        raise same_on_every_rank(f"the model {model_args.model_name_or_path} cannot be shared by "
                                 f"{layout.size} sequence-parallel ranks:\n  - " + "\n  - ".join(heads))
    problems, stats = [], {}
    for role, path in (("train", data_args.train_file), ("validation", data_args.validation_file)):
        if path:
            p, stats[role] = check_data(path, role, data_args.batch_method, rows, tokenizer, family,
                                        model_args.model_name_or_path)
            problems += p + dpo_setup.data_problems(path, role, args.stage)
    if problems:
        raise SystemExit("the training data cannot be used:\n  - " + "\n  - ".join(problems))
    for role, path in (("train", data_args.train_file), ("validation", data_args.validation_file)):
        warning = context_warning(path, role, config, rope_plan, family) if path else None
        if warning:
            logger.warning("%s", warning)
    train_ds, eval_ds = build_datasets(data_args) if args.stage == "sft" else dpo_setup.datasets(data_args)
    train_meta = TokenizedData(data_args.train_file).meta
    pad_id = pad_token_id(tokenizer, family, train_meta.get("template")) if family else tokenizer.pad_token_id
    if pad_id is None:  # no family rule (--trust_remote_code on an unknown folder): what the data recorded, or eos
        pad_id = (train_meta.get("tokenizer") or {}).get("pad_token_id")
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    collator = make_collator(data_args.batch_method, pad_id, data_args.pack_loss) if layout.size == 1 else \
        sp_lib.SequenceParallelCollator(layout.size, layout.rank, pad_id, data_args.pack_loss)
    if args.stage == "dpo":
        collator = dpo_setup.collator(layout, pad_id)

    # ---- a resumed run: already finished (nothing to do), else its newest complete checkpoint ----
    steps = planned_steps(len(train_ds), layout.dp_size, args.per_device_train_batch_size,
                          args.gradient_accumulation_steps, args.max_steps, args.num_train_epochs)
    done = ckpt.finished_output(args.output_dir, steps) if resume_req else None
    if done:
        logger.info("%s already holds the final output of this run (step %s of %d, %s): nothing to do",
                    args.output_dir, done.get("global_step"), steps, ckpt.MARKER)
        return None
    resume = ckpt.resolve_resume(args.output_dir, resume_req, steps)
    mismatch = rope.resume_mismatch(resume, config, model_args.quantization_bit) if resume else None
    if mismatch:  # the same on every rank: the checkpoint's settings and this run's flags
        raise same_on_every_rank(mismatch)
    if resume and (ckpt.checkpoint_step(resume) or 0) >= steps:
        logger.info("%s is at step %s of %d: nothing left to train; the final output is written from it",
                    resume, ckpt.checkpoint_step(resume), steps)
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * layout.dp_size
    resolved = {"world_size": world, "data_parallel_size": layout.dp_size, "sequence_parallel_size": layout.size,
                "global_batch": global_batch, "data_order": data_order(
                    data_args.train_file, data_args.batch_method, len(train_ds),
                    args.data_seed if args.data_seed is not None else args.seed)}
    if resume:  # the data order must be the resumed run's: else data is skipped or repeated without a word
        problems = ckpt.resume_order_problems(resume, {"resolved": resolved, "training": {
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps}})
        if problems is None:
            logger.warning("%s: no %s of its run (saved by an earlier version or another program): cannot check "
                           "that this run's data order is the same", resume, SETTINGS_FILE)
        elif problems:
            raise same_on_every_rank(f"--resume_from_checkpoint {args.resume_from_checkpoint}: this run would not "
                                     f"continue the data where {resume} stopped:\n  - " + "\n  - ".join(problems))

    # ---- model ----
    dtype = torch.bfloat16 if (args.bf16 and args.deepspeed) else torch.float32
    transformers.set_seed(args.seed)  # LoRA's initial weights (and anything the model initialises) from --seed
    model = load_model(model_args, model_type, dtype, compute_dtype=quantization.compute_dtype(args))
    quantized = quantization.describe_quantized(model) if model_args.quantization_bit else None
    if lora_args.use_lora:
        model = apply_lora(model, lora_args, family, args.gradient_checkpointing)
    total, trainable = count_parameters(model)
    divisor = None
    if layout.size > 1:
        sp_lib.enable_ulysses(model, layout)
        divisor = sp_lib.gradient_divisor(args.hf_deepspeed_config.config, world, layout.size)

    # ---- report the settings and the data (rank 0) ----
    unit = "packs" if data_args.batch_method == "pack" else "samples"
    logger.info("model %s (%s, %s), %s parameters, %s trainable (%.2f%%)", model_args.model_name_or_path,
                model_type, str(dtype).replace("torch.", ""), f"{total:,}", f"{trainable:,}",
                100.0 * trainable / max(total, 1))
    logger.info("batch_method %s, loss %s; %d rank(s) x %d %s x %d accumulation steps = %d %s per optimizer step",
                data_args.batch_method, dpo_settings.describe(args, lora_args.use_lora) if args.stage == "dpo" else
                "per-sequence mean (pack_loss)" if data_args.pack_loss else "token mean",
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
                             "dtype": str(dtype), **resolved, "resume_from_checkpoint": resume,
                             "parameters": total, "trainable_parameters": trainable,
                             "quantization": quantized, "rope": rope.rope_settings(config),
                             "rope_scaling": rope_plan.describe() if rope_plan else None},
                "data_stats": stats,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    before = ckpt.begin_output(args.output_dir) if args.should_save else set()
    if args.should_save:
        write_json_atomic(Path(args.output_dir) / SETTINGS_FILE, settings)
    logger.info("settings written to %s", Path(args.output_dir) / SETTINGS_FILE)

    # ---- train ----
    trainer_cls, extra = (TrainerNoShuffle, {}) if args.stage == "sft" else \
        dpo_setup.trainer(model_args, data_args, lora_args, args, dtype, rows)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
                          batch_method=data_args.batch_method, pack_loss=data_args.pack_loss,
                          sequence_parallel=layout, gradient_divisor=divisor, **extra)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    if args.should_save and lora_args.use_lora and rope_plan:
        save_base_config(config, args.output_dir)  # the scaled RoPE, for tools/generate.py and merges
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
    if args.should_save and data_args.test_file:  # made now, so the output folder's record lists it as ours
        (Path(args.output_dir) / TEST_EVAL_DIR).mkdir(exist_ok=True)
    if args.should_save:
        ckpt.finish_output(args.output_dir, before, kind="final", global_step=trainer.state.global_step,
                           max_steps=trainer.state.max_steps, run_id=trainer.run_id)
    logger.info("saved the %s and its tokenizer to %s", "LoRA adapter" if lora_args.use_lora else "model",
                args.output_dir)
    if data_args.test_file:  # GLM-Edge's predict_with_generate: ROUGE/BLEU of the saved model on the test set
        evaluate_saved_model(args.output_dir, data_args.test_file, data_args.test_max_new_tokens, args.process_index)
    return trainer


def shutdown_distributed() -> None:
    """End a successful run of a multi-process launch: leave together, then exit without Python's finalization.

    1. barrier: every rank has written its part of the output and finished its last collective. Rank 0 hosts the
       rendezvous store under the deepspeed launcher, and a rank still tearing down its process group when rank 0
       exits aborts ("terminate called without an active exception" from gloo; a 2-node run did).
    2. destroy_process_group: the backends shut down while the interpreter is fully alive.
    3. exit now (`exit_without_finalization`): destroy_process_group only forgets the groups, and DeepSpeed keeps
       them referenced (deepspeed.utils.groups._WORLD_GROUP and its other module globals, each ZeRO-3 parameter), so
       their C++ objects and gloo's threads would otherwise be destroyed during the interpreter's finalization, in
       no set order. A rank of a 2-rank ZeRO-3 run once died with SIGABRT after its outputs were written (CI; its
       reason was not printed and 72 launches here did not repeat it): finalization is the likely place.
    A single process run (no launcher) ends as usual."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # WORLD_SIZE too: evaluate_saved_model (--test_file) has left the group already on every rank
    if distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_finalization(0)


def exit_without_finalization(code: int) -> None:
    """What a normal exit does in Python (wait for non-daemon threads, run the atexit handlers: logging's flush,
    wandb's finish, ...; flush stdout and stderr), then os._exit: no module teardown, no C++ static destructors."""
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be written to it anyway
            pass
    os._exit(code)
