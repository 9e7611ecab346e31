"""Preference training (DPO and relatives) on packed pairs: the loss math and the settings of `main.py --stage dpo`.

    python pre_tokenize.py --stage dpo --model_name_or_path MODEL --input pairs.jsonl --output_dir data/pairs
    python sort_and_group.py --train_file data/pairs --max_length 32768 --group_size 8
    deepspeed --num_gpus 8 main.py --stage dpo --model_name_or_path MODEL --train_file data/pairs \\
        --deepspeed ds_config/stage3.json --dpo_beta 0.1 --precompute_ref_logps --output_dir runs/dpo
    # tiny CPU run: python tools/make_tiny.py pairs ... (README, "Preference training")

Per sequence the model gives the sum of its completion tokens' log-probs, from the packed forward, chunk by chunk
(patch/packed_attention.causal_lm_token_logps; `sequence_logps` sums them per sequence in float64). With p the
policy's and r the reference's sums, c the chosen and j the rejected completion, |.| its token count, b = --dpo_beta,
e = --dpo_label_smoothing, g = --simpo_gamma:

    sigmoid (DPO; e > 0: conservative DPO)  d = b ((p_c - r_c) - (p_j - r_j))   l = -(1 - e) log s(d) - e log s(-d)
    ipo                                     d = (p_c - r_c) / |c| - (p_j - r_j) / |j|        l = (d - 1 / (2 b))^2
    simpo (reference-free)                  d = b (p_c / |c| - p_j / |j|) - g   l = -(1 - e) log s(d) - e log s(-d)

IPO is length-normalised as in TRL's DPOTrainer (confirmed there with the IPO authors); SimPO as TRL's CPOTrainer.
The loss of an optimizer step is the mean of l over its pairs P, plus --dpo_sft_weight w times the NLL of the chosen
completions, token mean over the step's chosen targets T_c:  loss = (1/P) sum_pairs l + w (1/T_c) sum -log p.
P and T_c are counted over every rank and accumulation step (TrainerNoShuffle's exact normaliser), so the loss and
its gradient are the same whatever the ranks, accumulation, pairs per pack or sequence-parallel size.
Logged with TRL's names, exactly over the logged steps (sums over the pairs, all ranks, divided at the end):
rewards/chosen = b (p_c - r_c) (simpo: b p_c / |c|), rewards/rejected, rewards/accuracies (chosen > rejected),
rewards/margins, logps/chosen = p_c and logps/rejected = p_j (summed log-probs, TRL's meaning), and loss.

Sequence parallelism: every rank of a group holds a shard of the same pack and sums the log-probs of its shard per
sequence; `sum_over_group` all-reduces those sums (its backward all-reduces the gradient), so each rank computes
the group's loss; each returns 1/N of it, so the N shards' gradients add up to the loss's once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "simpo")
STAGES = ("sft", "dpo")
DPO_FLAGS = ("dpo_loss", "dpo_beta", "dpo_label_smoothing", "simpo_gamma", "dpo_sft_weight", "precompute_ref_logps",
             "ref_model")
# sums kept per batch for the logs (and the evaluation): every value is a sum over pairs or tokens
METRICS = ("pairs", "loss_pairs", "nll_chosen", "chosen_targets", "rewards/chosen", "rewards/rejected",
           "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def sequence_logps(token_logps: torch.Tensor, sequence: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Per-sequence sums of the token log-probs, float64 [num_sequences]. token_logps [1, T] fp32 (0 where no
    target), sequence [1, T] the sequence each position's target belongs to (-1: none; summed into a dropped slot)."""
    seq = sequence.reshape(-1).to(token_logps.device)
    slot = torch.where(seq >= 0, seq, torch.full_like(seq, num_sequences))
    out = torch.zeros(num_sequences + 1, dtype=torch.float64, device=token_logps.device)
    return out.index_add(0, slot, token_logps.reshape(-1).to(torch.float64))[:num_sequences]


class _SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) over a process group in forward and in backward (each rank's loss is 1/N of the group's)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        torch.distributed.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.clone()
        torch.distributed.all_reduce(g, group=ctx.group)
        return g, None


def sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of `x` over the ranks of `group` (a sequence-parallel group), differentiable."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _SumOverGroup.apply(x, group)
    y = x.clone()
    torch.distributed.all_reduce(y, group=group)
    return y


def pair_terms(policy: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor, loss_type: str,
               beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.0):
    """Per-pair losses and the logged quantities of sequences laid out (chosen, rejected) per pair.

    policy / reference: float64 [2P] summed completion log-probs (reference None for simpo), lengths [2P] completion
    tokens. Returns (losses [P], rewards_chosen [P], rewards_rejected [P]), float64."""
    pc, pj = policy[0::2], policy[1::2]
    lc, lj = lengths[0::2].to(policy.dtype).clamp(min=1), lengths[1::2].to(policy.dtype).clamp(min=1)
    if loss_type == "simpo":
        rc, rj = beta * pc / lc, beta * pj / lj
        d = rc - rj - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
        return losses, rc, rj
    ref_c, ref_j = reference[0::2], reference[1::2]
    rc, rj = beta * (pc - ref_c), beta * (pj - ref_j)
    if loss_type == "sigmoid":
        d = rc - rj
        losses = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    elif loss_type == "ipo":
        d = (pc - ref_c) / lc - (pj - ref_j) / lj
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"--dpo_loss {loss_type!r}: expected one of {', '.join(DPO_LOSSES)}")
    return losses, rc, rj


def batch_sums(policy: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor, settings) -> tuple:
    """(sum of the pair losses, sum of the chosen NLL, metric sums float64 [len(METRICS)]) of one batch's pairs.
    `settings`: the parsed flags (dpo_loss, dpo_beta, dpo_label_smoothing, simpo_gamma)."""
    losses, rc, rj = pair_terms(policy, reference, lengths, settings.dpo_loss, settings.dpo_beta,
                                settings.dpo_label_smoothing, settings.simpo_gamma)
    nll = -policy[0::2].sum()
    with torch.no_grad():
        metrics = torch.stack([
            torch.tensor(float(losses.numel()), dtype=torch.float64, device=policy.device), losses.sum(), nll,
            lengths[0::2].sum().to(torch.float64), rc.sum(), rj.sum(), (rc > rj).to(torch.float64).sum(),
            (rc - rj).sum(), policy[0::2].sum(), policy[1::2].sum()]).detach()
    return losses.sum(), nll, metrics


def metric_values(sums: torch.Tensor, sft_weight: float) -> dict[str, float]:
    """The logged values from metric sums (all ranks, all logged steps): means over the pairs, and the loss."""
    s = dict(zip(METRICS, sums.tolist()))
    pairs = max(s["pairs"], 1.0)
    out = {k: s[k] / pairs for k in METRICS[4:]}
    out["loss"] = s["loss_pairs"] / pairs + (sft_weight * s["nll_chosen"] / max(s["chosen_targets"], 1.0)
                                             if sft_weight else 0.0)
    return out


# ----------------------------------------------------------------------------------------------
# Settings (main.py's flags for --stage dpo, in longsft/train/arguments.py), checked before anything loads
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
