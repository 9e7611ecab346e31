"""Quantized base weights for LoRA training (QLoRA): `--quantization_bit 4|8` with `--use_lora`.

    python main.py --model_name_or_path THUDM/glm-4-9b --train_file data/glm4/longwriter --batch_method pack \\
        --use_lora --quantization_bit 4 --bf16 --deepspeed ds_config/stage3.json --output_dir output/glm4-qlora
    QUANT_BIT=4 bash scripts/glm4_longwriter_lora.sh     # the launch scripts pass QUANT_BIT on
    # tiny CPU run (~2 min on 2 busy cores):
    python tools/make_tiny.py model --family llama3 --out /tmp/tq/tiny-llama3
    python pre_tokenize.py --model_name_or_path /tmp/tq/tiny-llama3 --input data/sample.jsonl --output_dir /tmp/tq/data
    python sort_and_group.py --train_file /tmp/tq/data --max_length 8192 --group_size 1
    python main.py --model_name_or_path /tmp/tq/tiny-llama3 --train_file /tmp/tq/data --batch_method pack \\
        --use_lora --quantization_bit 4 --max_steps 2 --output_dir /tmp/tq/qlora

The linear layers of the decoder load through bitsandbytes via transformers' BitsAndBytesConfig: 4 bits = NF4 with
double quantization (the quantization constants quantized again; Dettmers et al. 2023), 8 bits = LLM.int8 (outlier
columns in 16 bits). The embeddings and the output layer (lm_head / chatglm's output_layer) stay unquantized
(transformers leaves the output embeddings out; checked after loading), so the chunked loss runs as before. The
LoRA adapters on top train in full precision. Compute dtype: bf16 with --bf16 (GPU), fp16 with --fp16, else fp32
(CPU). 4-bit weights are stored as the model's float dtype (`bnb_4bit_quant_storage`), so DeepSpeed ZeRO-3 can
shard them with the rest (as PEFT documents for QLoRA + ZeRO-3); 8-bit weights cannot be sharded: not with ZeRO-3.

CPU: bitsandbytes runs NF4 and LLM.int8 on x86-64 CPUs (>= 0.48 with the model-dtype storage used here). On a
CPU with AVX512-BF16 its Linear4bit repacks its weights the first time it runs without gradients in eval mode (an
evaluation, generate()), and from then on its matmul has no backward: the gradients of every layer below would
silently be lost in the next training step. `prepare_quantized` turns that repacking off for every 4-bit layer
(the plain NF4 kernel runs instead).
The merged model (--save_merged_model) merges the adapter into the base loaded again in full precision, never into
dequantized 4-bit weights (model.py save_merged).
"""

from __future__ import annotations

import logging
from typing import Optional

from longsft.train import settings as train_settings  # no torch at import: setting_problems runs before it loads
from longsft.train.deepspeed_checks import zero_stage

logger = logging.getLogger("longsft.train")

QUANTIZATION_BITS = (4, 8)
BNB_REQUIREMENT = "bitsandbytes>=0.48,<0.51"  # requirements.txt: 0.48.2 and 0.50.2 tested
MIN_BNB = (0, 48)  # 0.46 runs NF4 on CPUs, but only with uint8 storage; the model-dtype storage ZeRO-3 needs: 0.48


def _bnb_version() -> Optional[tuple[int, ...]]:
    """The installed bitsandbytes version (major, minor), read without importing it; None when missing."""
    from importlib import metadata

    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit())


def _zero_stage(deepspeed) -> Optional[int]:
    try:
        return zero_stage(train_settings.read_deepspeed_config(deepspeed))
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # an unreadable config: deepspeed_config_problems names it


def setting_problems(ns) -> list[str]:
    """--quantization_bit and what it needs, before anything loads."""
    bits = ns.quantization_bit
    if bits is None:
        return []
    p = []
    if bits not in QUANTIZATION_BITS:
        p.append(f"--quantization_bit {bits}: must be 4 (NF4) or 8 (LLM.int8)")
    if not ns.use_lora:
        p.append(f"--quantization_bit {bits} needs --use_lora: quantized weights are frozen, only LoRA adapters on "
                 f"top of them train (QLoRA)")
    version = _bnb_version()
    if version is None:
        p.append(f"--quantization_bit {bits} needs bitsandbytes: pip install '{BNB_REQUIREMENT}'")
    elif version < MIN_BNB:
        p.append(f"--quantization_bit {bits}: bitsandbytes {'.'.join(map(str, version))} is too old (4-bit weights "
                 f"stored as the model dtype, on CPUs too, from 0.48): pip install '{BNB_REQUIREMENT}'")
    if bits == 8 and ns.deepspeed and _zero_stage(ns.deepspeed) == 3:
        p.append("--quantization_bit 8 with DeepSpeed ZeRO-3: its int8 weights cannot be sharded; use "
                 "--quantization_bit 4 (stored as the model dtype, sharded) or ZeRO-2")
    return p


def compute_dtype(args):
    """The torch dtype quantized layers compute in: the training precision (bf16 / fp16 on GPUs, fp32 on CPU)."""
    import torch

    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def bnb_config(bits: int, storage_dtype, compute):
    """transformers' BitsAndBytesConfig for --quantization_bit `bits`."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=storage_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def quantized_layers(model) -> list[str]:
    """Names of the modules holding bitsandbytes weights."""
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def prepare_quantized(model) -> None:
    """After loading: no CPU repacking of 4-bit weights (module docstring); the embeddings and the output layer
    checked to be unquantized."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    if not quantized_layers(model):
        raise RuntimeError(f"{type(model).__name__}: no layer was quantized")
    kept = {"input embeddings": model.get_input_embeddings(), "output layer": model.get_output_embeddings()}
    bad = [what for what, module in kept.items()
           if module is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    if bad:
        raise RuntimeError(f"{type(model).__name__}: the {' and '.join(bad)} got quantized; they must stay in full "
                           f"precision")


def describe_quantized(model) -> dict:
    """What was quantized and the weights' memory now (logged, and written to train_settings.json)."""
    q = model.config.quantization_config
    q = q.to_dict() if hasattr(q, "to_dict") else dict(q)
    bits = 4 if q.get("load_in_4bit") else 8
    names = quantized_layers(model)
    summary = {"bits": bits, "method": "NF4, double quantization" if bits == 4 else "LLM.int8",
               "quantized_linear_layers": len(names), "weight_bytes": int(model.get_memory_footprint()),
               "compute_dtype": str(q.get("bnb_4bit_compute_dtype")) if bits == 4 else "the input's",
               "storage_dtype": str(q.get("bnb_4bit_quant_storage")) if bits == 4 else "int8"}
    logger.info("%d linear layers quantized to %s (compute dtype %s); weights %.1f MiB", len(names),
                summary["method"], summary["compute_dtype"], summary["weight_bytes"] / 2**20)
    return summary
