"""The model side of main.py: the folder's model class and tokenizer through the registry, loading (fp32 / bf16,
the patched packed forward; 4/8-bit base weights: quantization.py; RoPE scaling: rope.py), LoRA, parameter
counts, the merged LoRA model, and the folder's remote code copied beside a saved model.

    from longsft.train.model import load_model, apply_lora
    model = load_model(model_args, "llama", torch.float32)   # patch.modeling_llama.LlamaForCausalLM
    model = apply_lora(model, lora_args, family, gradient_checkpointing=False)

User mistakes end the run with SystemExit naming the flag (main.py's CLI turns it into exit status 2).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
import transformers

from longsft import models
from longsft.models import BASE_CONFIG_FILE
from longsft.data.inputs import InputError
from longsft.data.storage import DatasetFormatError, read_meta
from longsft.templates.registry import family_for_template
from longsft.atomic_dir import write_json_atomic
from longsft.train import quantization, rope
from longsft.train.arguments import LoraArguments, ModelArguments
from patch.families import Family

logger = logging.getLogger("longsft.train")

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


def model_family(model_dir: str, trust_remote_code: bool = False, train_file: Optional[str] = None
                 ) -> Optional[Family]:
    """The registry family of the model folder; None only with --trust_remote_code (the folder's own code).
    With `train_file`: the family its data was made for when pre_tokenize.py's explicit --template read the folder
    as a sibling family our tokenizer also builds (a ChatGLM3 folder that declares no role tokens, detected as
    ChatGLM2, tokenized with --template chatglm3), so the model side loads the same tokenizer."""
    fam = models.family_of(model_dir) if trust_remote_code else _or_exit(models.require_family, model_dir)
    if fam is None or not train_file:
        return fam
    try:
        meta = read_meta(train_file)
    except DatasetFormatError:  # reported by the data checks
        return fam
    chosen = family_for_template(fam, meta.get("template"))
    if chosen is not fam and meta.get("model_family") == chosen.name:
        logger.info("%s looks like %s; its data was tokenized with --template %s, which reads it as %s: loading it "
                    "as %s", model_dir, fam.name, meta.get("template"), chosen.name, chosen.name)
        return chosen
    return fam


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


def model_config(model_args: ModelArguments, model_type: str, log: bool = True):
    """(config, RoPE plan): the folder's config.json as the model is built from it, with --rope_scaling applied
    (rope.py; the plan is None without scaling; `log`: say what the scaling does)."""
    if model_args.trust_remote_code:
        config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    else:
        config = model_class(model_type).config_class.from_pretrained(model_args.model_name_or_path)
    return config, rope.configure_rope(config, model_args, model_args.trust_remote_code, log=log)


def load_model(model_args: ModelArguments, model_type: str, dtype: torch.dtype,
               compute_dtype: Optional[torch.dtype] = None):
    """The model in `dtype`; with --quantization_bit its linear layers through bitsandbytes (quantization.py),
    computing in `compute_dtype` (default `dtype`); with --rope_scaling the scaled RoPE, checked in the model."""
    config, rope_plan = model_config(model_args, model_type, log=False)  # main.py logged it when it read the config
    cls = transformers.AutoModelForCausalLM if model_args.trust_remote_code else model_class(model_type)
    kw = {"trust_remote_code": True} if model_args.trust_remote_code else {}
    if model_args.quantization_bit:
        kw["quantization_config"] = quantization.bnb_config(model_args.quantization_bit, dtype,
                                                            compute_dtype or dtype)
    config.use_cache = False
    if model_args.loss_chunk_size is not None:
        config.loss_chunk_size = model_args.loss_chunk_size
    model = cls.from_pretrained(model_args.model_name_or_path, config=config, dtype=dtype, **kw)
    rope.check_model_rope(model, rope_plan)
    if model_args.quantization_bit:
        quantization.prepare_quantized(model)
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
    """(total, trainable); works on ZeRO-3 partitioned parameters and 4-bit weights (their unpacked size) too."""
    total = trainable = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        if getattr(p, "quant_state", None) is not None:  # bitsandbytes 4-bit: two weights per byte of storage
            n = int(torch.Size(p.quant_state.shape).numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def apply_lora(model, lora_args: LoraArguments, family: Optional[Family], gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model

    targets = lora_args.lora_target_modules
    targets = [t.strip() for t in targets.split(",") if t.strip()] if targets else \
        list(family.lora_targets or models.decoder_linear_names(model)) if family else None
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



def save_base_config(config, output_dir: str) -> Path:
    """Beside a LoRA adapter: the base model's config as this run trained it (RoPE scaling applied), which
    tools/generate.py and a merge then build the base with (config.json stays the mark of a full model)."""
    path = Path(output_dir) / BASE_CONFIG_FILE
    write_json_atomic(path, json.loads(config.to_json_string(use_diff=True)))
    return path


def save_merged(model_args: ModelArguments, model_type: str, dtype, output_dir: str, tokenizer) -> Path:
    """Base model + the saved adapter, merged, written to OUTPUT_DIR/merged (loads like the base model). The base
    is loaded again in full precision (a QLoRA run's adapter is merged into the original weights)."""
    from peft import PeftModel
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # rank 0 alone loads a whole copy: no ZeRO-3 partitioning here
    # the base in full precision (never dequantized 4-bit weights), with the run's RoPE scaling
    base = load_model(dataclasses.replace(model_args, quantization_bit=None), model_type, dtype)
    merged = PeftModel.from_pretrained(base, output_dir).merge_and_unload()
    out = Path(output_dir) / "merged"
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    copy_remote_code(model_args.model_name_or_path, out)
    logger.info("merged model written to %s", out)
    return out
