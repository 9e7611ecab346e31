"""Preference pairs in sort_and_group.py: what a pair dataset (`pre_tokenize.py --stage dpo`) packs as (numpy only).

    python pre_tokenize.py --stage dpo --model_name_or_path /tmp/tiny-llama3 --input pairs.jsonl \\
        --output_dir /tmp/pairs --max_length 4096
    python sort_and_group.py --train_file /tmp/pairs --max_length 4096 --group_size 2   # the same command as SFT

The packer's items are whole pairs (chosen + rejected, samples 2p and 2p + 1), so a pack never splits a pair: it
holds each pair's two samples side by side, chosen first, which is what main.py --stage dpo reads. Best-fit
decreasing runs on the pair lengths (chosen + rejected tokens), the compute balance counts both samples'
attention (longsft/data/packing.py `squares`), and the sorted order lists whole pairs too.

--over_length applies to the pair (its two samples together longer than --max_length):
- error (default): the pairs are named with their lengths and the fix;
- skip: the pair is left out (both samples), counted in the report;
- truncate: both sides are cut from the end until they fit, the longer one first (each side keeps
  min(its length, c) tokens with c as large as fits): the shared prompt stays whole unless a side is cut into it.
  A pair that no longer has a target on each side is left out and counted (`emptied_by_truncation`).
A pair with a side without targets (made by other tools) is left out too (`without_targets`): DPO compares both.
The tokens of every sample that enter the packs go to DIR/packs/sample_lengths.bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PairItems:
    """What sort_and_group packs for a preference dataset: `included` pairs as items."""
    lengths: np.ndarray        # int64 [num_samples]: tokens of each sample entering the packs
    included: np.ndarray       # int64 [k]: the pairs packed
    item_lengths: np.ndarray   # int64 [k]: chosen + rejected tokens of each included pair
    item_squares: np.ndarray   # float64 [k]: chosen^2 + rejected^2 (the attention term of the cost model)
    item_samples: np.ndarray   # int64 [k, 2]: (chosen, rejected) sample indices of each included pair
    over_samples: np.ndarray   # bool [num_samples]: the samples of pairs longer than --max_length
    report: dict               # counts of pairs: in_dataset, packed, over_length, truncated, skipped, ...


def pair_lengths(raw: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Tokens of every pair (chosen + rejected), int64 [num_pairs]."""
    return raw[pairs[:, 0]] + raw[pairs[:, 1]]


def over_length_pairs_problem(raw: np.ndarray, pairs: np.ndarray, max_length: int, over_length: str) -> str | None:
    """The error for pairs longer than --max_length (None when none are, or the policy allows them)."""
    total = pair_lengths(raw, pairs)
    over = np.flatnonzero(total > max_length)
    if over.size == 0:
        return None
    if over_length == "skip" and over.size == total.size:
        return (f"every pair is longer than --max_length {max_length} (chosen + rejected tokens), --over_length skip "
                f"would leave nothing; pass --max_length {int(total.max())} or --over_length truncate.")
    if over_length != "error":
        return None
    worst = over[np.argsort(-total[over], kind="stable")[:10]]
    listed = ", ".join(f"pair {p} (samples {pairs[p, 0]}+{pairs[p, 1]}: {raw[pairs[p, 0]]:,} + {raw[pairs[p, 1]]:,} "
                       f"tokens)" for p in worst.tolist())
    return (f"{over.size:,} preference pairs are longer than --max_length {max_length} (a pack holds both samples "
            f"of a pair): {listed}{', ...' if over.size > 10 else ''}. Pass --max_length {int(total.max())} (or "
            f"more), or --over_length truncate (cut both sides from the end, the longer first), or --over_length "
            f"skip (leave those pairs out); either is counted in the report.")


def cut_pair(chosen: int, rejected: int, max_length: int) -> tuple[int, int]:
    """Tokens each side keeps so that the pair fits: min(length, c) for the largest c that fits."""
    if chosen + rejected <= max_length:
        return chosen, rejected
    short = min(chosen, rejected)
    cap = max_length - short if 2 * short <= max_length else max_length // 2
    return min(chosen, cap), min(rejected, cap)


def pair_items(raw: np.ndarray, pairs: np.ndarray, max_length: int, over_length: str, count_targets) -> tuple:
    """(PairItems, per-sample target counts) under the --over_length policy; `count_targets(lengths)` counts each
    sample's targets within its first lengths[i] tokens (sort_and_group.count_targets)."""
    total = pair_lengths(raw, pairs)
    over = total > max_length
    lengths = raw.copy()
    if over_length == "truncate":
        for p in np.flatnonzero(over).tolist():
            c, r = pairs[p]
            lengths[c], lengths[r] = cut_pair(int(raw[c]), int(raw[r]), max_length)
    targets = count_targets(lengths)
    both = (targets[pairs[:, 0]] > 0) & (targets[pairs[:, 1]] > 0)
    candidates = ~over if over_length == "skip" else np.ones(len(pairs), bool)
    originally = (count_targets(raw)[pairs] > 0).all(axis=1) if over_length == "truncate" and over.any() else both
    included = np.flatnonzero(candidates & both)
    samples = pairs[included]
    item_len = lengths[samples[:, 0]] + lengths[samples[:, 1]]
    sq = lengths[samples].astype(np.float64) ** 2
    report = {"in_dataset": int(len(pairs)), "packed": int(included.size), "over_length": int(over.sum()),
              "truncated": int((over & both).sum()) if over_length == "truncate" else 0,
              "skipped": int(over.sum()) if over_length == "skip" else 0,
              "emptied_by_truncation": int((candidates & originally & ~both).sum()),
              "without_targets": int((candidates & ~originally).sum())}
    over_samples = np.zeros(raw.size, bool)
    over_samples[pairs[over].reshape(-1)] = True
    return PairItems(lengths, included, item_len, sq.sum(axis=1), samples, over_samples, report), targets


def pairs_summary(r: dict) -> str:
    p = r["pairs"]
    return (f"  preference pairs {p['in_dataset']:,} -> packed {p['packed']:,} (never split); over max_length "
            f"{p['over_length']:,} (truncated {p['truncated']:,}, skipped {p['skipped']:,}); left out: emptied by "
            f"truncation {p['emptied_by_truncation']:,}, a side without targets {p['without_targets']:,}")
