"""RoPE scaling: extend a model's context (`--rope_scaling TYPE` with `--rope_factor F` or `--model_max_length N`),
set in the model config before the weights load, for every family, and checked in the loaded model.

    python main.py --model_name_or_path meta-llama/Llama-3.1-8B ... --rope_scaling yarn --model_max_length 262144
    python main.py --model_name_or_path THUDM/chatglm2-6b ... --use_lora --quantization_bit 4 \\
        --rope_scaling linear --rope_factor 8          # LL-BaiYang: 16,384 tokens on 2,048 trained positions
    # tiny CPU run (quantization.py's docstring makes /tmp/tq/tiny-llama3 and /tmp/tq/data):
    python main.py --model_name_or_path /tmp/tq/tiny-llama3 --train_file /tmp/tq/data --batch_method pack \\
        --rope_scaling yarn --rope_factor 2 --max_steps 2 --output_dir /tmp/tq/rope

    from longsft.train.rope import configure_rope
    plan = configure_rope(config, model_args)   # the config changed in place; None when nothing to do

F multiplies the context the folder has (its `max_position_embeddings`, chatglm's `seq_length`); `--model_max_length
N` takes F = ceil(N / that context) as LLaMA-Factory and ms-swift do (no scaling when N fits). The types:

  linear   positions / F (position interpolation; Chen et al. 2023, LongChat; ChatGLM2-6B-32K's rope_ratio)
  dynamic  dynamic NTK: the base grows with the sequence once it passes max_position_embeddings (transformers'
           own; max_position_embeddings stays the original context, where it starts). Its frequencies depend on
           the longest sequence of a batch, so a pack would change each sample's positions: not with pack.
  yarn     YaRN (Peng et al. 2023): interpolates the low frequencies, keeps the high ones, scales attention
  llama3   Llama-3.1's rule: low frequencies / F, high ones kept, a smooth ramp between (low/high_freq_factor 1/4)
  base     RoPE base x F (ChatGLM3-6B-32K's and GLM-4's rope_ratio; for transformers' models rope_theta x F)

Transformers' models get `config.rope_parameters` (transformers 5: rope_type, factor,
original_max_position_embeddings, ...), which their RotaryEmbedding reads; on a model that already scales RoPE the
same way the factors multiply (Llama-3.1's llama3 factor 8 x F), another type is refused. Chatglm-format models (patch/modeling_chatglm.py): `rope_ratio` x F with
`rope_ratio_mode` "positions" (linear) or "base" (base); a folder whose rope_ratio already applies the other way is
refused. max_position_embeddings / seq_length become context x F (dynamic: unchanged), so the saved config (full
model, merged model, and base_model_config.json beside a LoRA adapter) carries the scaling to generation and reloads.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger("longsft.train")

ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3", "base")
CHATGLM_RULES = {"linear": "positions", "base": "base"}  # --rope_scaling -> chatglm rope_ratio_mode
# (no torch at import: arguments.py checks the flags with setting_problems before torch loads, early_checks.py)


@dataclass
class RopePlan:
    """What configure_rope did: the type, the factor applied on top of the folder's setting, the context before
    and after, and the RoPE settings written into the config."""
    scaling: str
    factor: float
    context_before: int
    context_after: int
    settings: dict

    def describe(self) -> str:
        return (f"RoPE scaling {self.scaling} x{self.factor:g}: context {self.context_before:,} -> "
                f"{self.context_after:,} tokens ({self.settings})")


def setting_problems(ns) -> list[str]:
    """The RoPE flags on their own (before any model is read)."""
    p = []
    scaling, factor, length = ns.rope_scaling, ns.rope_factor, ns.model_max_length
    if factor is not None and length is not None:
        p.append(f"--rope_factor {factor} and --model_max_length {length}: give one (the factor, or the context "
                 f"that sets it to ceil(N / the model's context))")
    if factor is not None and not (math.isfinite(factor) and factor >= 1):
        p.append(f"--rope_factor {factor}: must be a number >= 1 (the new context / the model's context)")
    if length is not None and length < 1:
        p.append(f"--model_max_length {length}: must be a positive number of tokens")
    if scaling is None and (factor is not None or length is not None):
        given = f"--rope_factor {factor}" if factor is not None else f"--model_max_length {length}"
        p.append(f"{given} needs --rope_scaling (one of {', '.join(ROPE_SCALINGS)}): how the positions are scaled")
    if scaling is not None and factor is None and length is None:
        p.append(f"--rope_scaling {scaling} needs --rope_factor F or --model_max_length N")
    if scaling == "dynamic" and ns.batch_method == "pack":
        p.append("--rope_scaling dynamic with --batch_method pack: dynamic NTK takes its frequencies from the longest "
                 "sequence of the batch, so packing would change each sample's positions; use linear, yarn or "
                 "llama3, or --batch_method naive/sort")
    return p


def is_chatglm(config) -> bool:
    return getattr(config, "model_type", None) == "chatglm"


def context_length(config) -> int:
    """The model's context in tokens: chatglm's seq_length, else max_position_embeddings (dynamic: x its factor)."""
    if is_chatglm(config):
        return int(config.seq_length)
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("factor", 1.0) if params.get("rope_type") == "dynamic" else 1.0
    return int(config.max_position_embeddings * factor)


def suggested_scaling(config, family=None) -> str:
    """The --rope_scaling to name for samples past the context: what the model already uses (Llama-3.1: llama3),
    chatglm's own rule (ChatGLM2: linear, ChatGLM3 / GLM-4: base), else yarn."""
    if is_chatglm(config):
        if float(config.rope_ratio or 1) == 1:
            return "linear" if family is not None and family.name == "chatglm2" else "base"
        return "linear" if config.rope_rule == "positions" else "base"
    current = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    return current if current in ROPE_SCALINGS else "yarn"


def rope_settings(config) -> dict:
    """The RoPE settings of a config as saved (for logs, train_settings.json and the resume check)."""
    if is_chatglm(config):
        return {"rope_ratio": float(config.rope_ratio), "rope_ratio_mode": getattr(config, "rope_rule", "base"),
                "seq_length": int(config.seq_length)}
    return {**(getattr(config, "rope_parameters", None) or {}),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None)}


def resume_mismatch(checkpoint: str, config, quantization_bit) -> Optional[str]:
    """A resumed run must train the model its checkpoint was trained as: the RoPE settings and the quantization its
    run recorded (train_settings.json, checkpoints.saved_settings), against this run's; None when they agree or
    the run recorded none."""
    import json

    from longsft.train.checkpoints import saved_settings

    before = (saved_settings(checkpoint) or {}).get("resolved") or {}
    problems = []
    if "rope" in before and before["rope"] != json.loads(json.dumps(rope_settings(config))):
        problems.append(f"RoPE {before['rope']} then, {rope_settings(config)} now (give the same --rope_scaling and "
                        f"--rope_factor / --model_max_length)")
    if "quantization" in before:
        bits = (before["quantization"] or {}).get("bits")
        if bits != quantization_bit:
            problems.append(f"--quantization_bit {bits} then, {quantization_bit} now")
    if not problems:
        return None
    return f"--resume_from_checkpoint: {checkpoint} was trained with other settings: " + "; ".join(problems)


def _factor(model_args, context: int) -> float:
    if model_args.rope_factor is not None:
        return float(model_args.rope_factor)
    return float(math.ceil(model_args.model_max_length / context))


def configure_rope(config, model_args, trust_remote_code: bool = False, log: bool = True) -> Optional[RopePlan]:
    """Apply --rope_scaling to `config` (in place) before the model is built; None when no scaling is asked for
    or --model_max_length fits the context. A combination the model cannot take ends the run (SystemExit)."""
    scaling = model_args.rope_scaling
    if scaling is None:
        return None
    before = context_length(config)
    factor = _factor(model_args, before)
    if factor <= 1:
        if log:
            logger.info("--model_max_length %s fits the model's %s-token context: no RoPE scaling",
                        model_args.model_max_length, f"{before:,}")
        return None
    if is_chatglm(config):
        if trust_remote_code:
            raise SystemExit("--rope_scaling with --trust_remote_code on a chatglm-format model: the folder's own "
                             "code decides what rope_ratio means; drop --trust_remote_code (patch/'s model reads "
                             "rope_ratio_mode)")
        settings = _chatglm_scaling(config, scaling, factor)
    else:
        settings = _native_scaling(config, scaling, factor)
    plan = RopePlan(scaling, factor, before, context_length(config), settings)
    if log:
        logger.info("%s", plan.describe())
    return plan


def _chatglm_scaling(config, scaling: str, factor: float) -> dict:
    rule = CHATGLM_RULES.get(scaling)
    if rule is None:
        raise SystemExit(f"--rope_scaling {scaling}: the chatglm model file (ChatGLM2/3, GLM-4) scales RoPE through "
                         f"rope_ratio in two ways: --rope_scaling linear (positions / F: ChatGLM2-6B-32K, LL-BaiYang) "
                         f"or --rope_scaling base (base x F: ChatGLM3-6B-32K, GLM-4)")
    ratio = float(config.rope_ratio or 1)
    if ratio != 1 and config.rope_rule != rule:
        raise SystemExit(f"--rope_scaling {scaling}: this model's rope_ratio {ratio:g} already applies to the "
                         f"{'positions' if config.rope_rule == 'positions' else 'RoPE base'}, and one rope_ratio "
                         f"cannot do both; use --rope_scaling "
                         f"{'linear' if config.rope_rule == 'positions' else 'base'}")
    config.rope_ratio = ratio * factor
    config.rope_ratio_mode = rule
    config.seq_length = int(round(config.seq_length * factor))
    return rope_settings(config)


def _native_scaling(config, scaling: str, factor: float) -> dict:
    params = copy.deepcopy(getattr(config, "rope_parameters", None))
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise SystemExit(f"--rope_scaling: {type(config).__name__} has no rope_parameters with a rope_theta "
                         f"(transformers 5's RoPE settings): this model cannot be scaled here")
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types & set(params):
        raise SystemExit(f"--rope_scaling: {type(config).__name__} has RoPE settings per layer type "
                         f"({sorted(layer_types & set(params))}); scaling those is not supported")
    current = params.get("rope_type", "default")
    max_pos = int(config.max_position_embeddings)
    if scaling == "base":
        params["rope_theta"] = float(params["rope_theta"]) * factor
    elif current not in ("default", scaling):
        raise SystemExit(f"--rope_scaling {scaling}: the model already scales RoPE with {current} ({params}); "
                         f"a second scaling on top is not supported: use --rope_scaling {current} (the factors "
                         f"multiply) or base")
    else:
        params["rope_type"] = scaling
        params["factor"] = float(params.get("factor", 1.0) if current == scaling else 1.0) * factor
        if scaling in ("yarn", "llama3"):
            params.setdefault("original_max_position_embeddings", max_pos)
        if scaling == "llama3":
            params.setdefault("low_freq_factor", 1.0)
            params.setdefault("high_freq_factor", 4.0)
    config.rope_parameters = params
    if scaling != "dynamic":  # dynamic NTK starts scaling where max_position_embeddings ends
        config.max_position_embeddings = int(round(max_pos * factor))
    if hasattr(config, "validate_rope"):
        config.validate_rope()
    return rope_settings(config)


def check_model_rope(model, plan: Optional[RopePlan]) -> None:
    """The loaded model really computes the configured RoPE: its rotary modules hold the config's type and the
    frequencies that type gives for the config (transformers' models), or the config's rope_ratio rule (chatglm)."""
    if plan is None:
        return
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "position_divisor") and hasattr(module, "base"):  # patch/modeling_chatglm.RotaryEmbedding
            cfg = model.config
            want = (cfg.rope_ratio, 1.0) if cfg.rope_rule == "positions" else (1.0, cfg.rope_ratio)
            got = (module.position_divisor, module.base / 10000.0)
            if any(abs(a - b) > 1e-9 * max(1.0, abs(b)) for a, b in zip(got, want)):
                raise RuntimeError(f"{name}: RoPE position divisor / base factor {got}, the config says {want}")
            checked += 1
        elif hasattr(module, "rope_type") and isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            cfg = module.config
            want_type = cfg.rope_parameters["rope_type"]
            if module.rope_type != want_type:
                raise RuntimeError(f"{name}: rope_type {module.rope_type}, the config says {want_type}")
            fn = module.compute_default_rope_parameters if want_type == "default" else ROPE_INIT_FUNCTIONS[want_type]
            want, _ = fn(cfg, device=module.inv_freq.device)
            if not torch.allclose(module.inv_freq.float(), want.float(), rtol=1e-6, atol=0):
                raise RuntimeError(f"{name}: its RoPE frequencies are not the {want_type} ones of the config")
            checked += 1
    if not checked:
        raise RuntimeError(f"{type(model).__name__}: no rotary module found to check the RoPE scaling in")
