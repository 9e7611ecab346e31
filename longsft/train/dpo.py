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

import torch
import torch.nn.functional as F

from longsft.train.dpo_settings import DPO_LOSSES  # noqa: F401  (the flags and their checks live there, no torch)

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
