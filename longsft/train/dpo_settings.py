"""main.py's preference-training settings (`--stage dpo`): the flags' dataclass, their checks and defaults, and how
the reference comes, without torch or transformers (main.py checks every setting before the heavy imports).

    from longsft.train.dpo_settings import PreferenceArguments, setting_problems
    setting_problems(namespace, explicit={"stage", "dpo_beta"})     # [] or the problems, each naming its flag

The loss math is longsft/train/dpo.py; README "Preference training" has the commands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

DPO_LOSSES = ("sigmoid", "ipo", "simpo")
STAGES = ("sft", "dpo")
DPO_FLAGS = ("dpo_loss", "dpo_beta", "dpo_label_smoothing", "simpo_gamma", "dpo_sft_weight", "precompute_ref_logps",
             "ref_model")


@dataclass
class PreferenceArguments:
    """The preference-training flags; main.py's TrainingArguments carries them (longsft/train/arguments.py)."""
    stage: str = field(default="sft", metadata={
        "help": "sft: supervised fine-tuning on samples; dpo: preference training on pairs (pre_tokenize.py --stage "
                "dpo, then sort_and_group.py), packed, --batch_method pack.", "choices": list(STAGES)})
    dpo_loss: str = field(default="sigmoid", metadata={
        "help": "sigmoid: DPO (with --dpo_label_smoothing: conservative DPO); ipo: IPO (length-normalised, as TRL); "
                "simpo: SimPO (reference-free, length-normalised, --simpo_gamma).", "choices": list(DPO_LOSSES)})
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


# ----------------------------------------------------------------------------------------------

def apply_defaults(ns, explicit: set[str]) -> None:
    """--stage dpo trains packed pairs: --batch_method pack unless it was set (then setting_problems names it)."""
    if getattr(ns, "stage", "sft") == "dpo" and "batch_method" not in explicit:
        ns.batch_method = "pack"


def setting_problems(ns, explicit: set[str]) -> list[str]:
    """What stops the preference settings from running (values only; nothing is read from disk)."""
    p = []
    if ns.stage not in STAGES:
        return [f"--stage {ns.stage!r}: expected one of {', '.join(STAGES)}"]
    if ns.stage == "sft":
        given = [f"--{k}" for k in DPO_FLAGS if k in explicit]
        return [f"{', '.join(given)}: preference-training settings; add --stage dpo (and train on pairs from "
                f"pre_tokenize.py --stage dpo)"] if given else []
    if ns.dpo_loss not in DPO_LOSSES:
        p.append(f"--dpo_loss {ns.dpo_loss!r}: expected one of {', '.join(DPO_LOSSES)}")
    if ns.batch_method != "pack":
        p.append(f"--stage dpo trains packed pairs: --batch_method pack (sort_and_group.py packs whole pairs), not "
                 f"{ns.batch_method}")
    if ns.pack_loss:
        p.append("--pack_loss is the SFT loss's per-sequence weighting; --stage dpo's loss is the mean over the pairs "
                 "of the step (and --dpo_sft_weight's token mean): drop --pack_loss")
    if not (ns.dpo_beta > 0 and math.isfinite(ns.dpo_beta)):
        p.append(f"--dpo_beta {ns.dpo_beta}: must be a number > 0 (DPO's temperature; 0.1 is common, SimPO ~2)")
    if not 0 <= ns.dpo_label_smoothing < 0.5:
        p.append(f"--dpo_label_smoothing {ns.dpo_label_smoothing}: must be in [0, 0.5) (the share of flipped "
                 f"labels conservative DPO assumes)")
    elif ns.dpo_label_smoothing and ns.dpo_loss == "ipo":
        p.append("--dpo_label_smoothing applies to --dpo_loss sigmoid and simpo, not ipo")
    if not (ns.dpo_sft_weight >= 0 and math.isfinite(ns.dpo_sft_weight)):
        p.append(f"--dpo_sft_weight {ns.dpo_sft_weight}: must be a number >= 0")
    if not math.isfinite(ns.simpo_gamma):
        p.append(f"--simpo_gamma {ns.simpo_gamma}: must be a number")
    elif "simpo_gamma" in explicit and ns.dpo_loss != "simpo":
        p.append(f"--simpo_gamma is SimPO's margin: it needs --dpo_loss simpo (not {ns.dpo_loss})")
    if ns.dpo_loss == "simpo":
        given = [f"--{k}" for k in ("precompute_ref_logps", "ref_model") if getattr(ns, k)]
        if given:
            p.append(f"{', '.join(given)}: --dpo_loss simpo uses no reference model; drop {' and '.join(given)}")
    return p


def reference_kind(args, use_lora: bool) -> str:
    """How the reference log-probs come: none (simpo), precomputed, model (--ref_model, or a frozen copy of
    --model_name_or_path) or adapters (LoRA: the policy with its adapters disabled). `args`: the parsed flags."""
    if args.dpo_loss == "simpo":
        return "none"
    if args.precompute_ref_logps:
        return "precomputed"
    if args.ref_model or not use_lora:
        return "model"
    return "adapters"


def describe(args, use_lora: bool) -> str:
    """One line for the start-up log: the loss and where its reference comes from."""
    kind = reference_kind(args, use_lora)
    ref = {"none": "no reference (reference-free)",
           "precomputed": f"reference log-probs precomputed once ({args.ref_model or 'initial model'}"
                          f"{', adapters disabled' if use_lora and not args.ref_model else ''}), one model in memory",
           "model": f"reference model {args.ref_model or 'frozen copy of the initial model'} (eval mode)",
           "adapters": "reference = the policy with its LoRA adapters disabled, one model in memory"}[kind]
    extra = {"sigmoid": f", label smoothing {args.dpo_label_smoothing}" if args.dpo_label_smoothing else "",
             "ipo": "", "simpo": f", gamma {args.simpo_gamma}"}[args.dpo_loss]
    sft = f" + {args.dpo_sft_weight} x chosen NLL (token mean)" if args.dpo_sft_weight else ""
    return f"{args.dpo_loss} (beta {args.dpo_beta}{extra}) mean over the step's pairs{sft}; {ref}"
