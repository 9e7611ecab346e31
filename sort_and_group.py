"""Stage 2: sorted-batching order and near-perfect packs for a tokenized dataset, nothing lost.

Reads the folder pre_tokenize.py (or its front ends pre_tokenize_glm4.py / pre_tokenize_llama3.py) wrote and
adds DIR/packs/ to it (layout in storage.py's docstring; no torch is imported); `dataset.LMPackDataset(DIR)`
and `dataset.LMSortDataset(DIR)` read the result.

    python sort_and_group.py --train_file data/glm4/longwriter                       # defaults below
    python sort_and_group.py --train_file data/glm4/longwriter --max_length 32768 --group_size 8 \\
        --pack_algorithm bfd --seed 42 --over_length error
    # a tiny CPU run on the bundled sample
    python tools/make_tiny.py tokenizer --family glm4 --out /tmp/tiny-glm4
    python pre_tokenize.py --model_name_or_path /tmp/tiny-glm4 --input data/sample.jsonl \\
        --output_dir /tmp/glm4-sample --max_length 8192
    python sort_and_group.py --train_file /tmp/glm4-sample --max_length 8192 --group_size 2
    # data prepared by the upstream LongWriter/LongAlign scripts (inputs.npy, labels.npy): converted in place
    python sort_and_group.py --train_file data/glm4/longwriter --pad_token_id 151330

What it does, top to bottom:
- Lengths come from the offsets (no token is read for packing); labels are read once to count N_i, the
  supervised target tokens of every sample (its first token excluded: nothing before it can predict it).
- The token ids themselves are checked first (storage.check_token_ids: no negative id, none past the vocabulary
  of the tokenizer meta.json names, meta.json's max_token_id true), and an existing DIR/packs/ must be ours
  alone (a user's file in it is an error, not a deletion). packs/ is replaced atomically (a symlinked one is
  written through); SIGTERM cleans up like Ctrl-C, and temp folders of killed runs are removed.
- A sample longer than --max_length is an error naming the samples and the fix, unless --over_length
  truncate (keep its first max_length tokens) or skip (leave it out); either way it is counted in the report.
- Packing. `bfd` (default): best-fit decreasing over the whole dataset at once. Items of one length are placed
  together (a best-fit bin takes floor(room / length) of them), and the bins are kept in buckets by remaining
  room with a two-level bitmap to find the tightest bin that fits, so 1M samples pack in well under a second.
  `sequential`: upstream's next-fit in file order (a sample that does not fit closes the pack), keeping the
  last pack and never dropping a sample.
- Compute balance. With --group_size ranks, the packs of one step run in parallel and the step waits for the
  slowest. Modeled cost of a pack = sum(L_i) + sum(L_i^2) / attn_cost_length, L_i its sample lengths: forward
  FLOPs are 2 * params per token for the matmuls and 2 * L^2 * hidden * layers per causal sample for attention,
  so the quadratic term equals the linear one at L = params / (hidden * layers): about 57,000 for GLM-4-9B
  (9.4e9 / (4096 * 40)) and 61,000 for Llama-3.1-8B (8.0e9 / (4096 * 32)); default 57,000. Packs are sorted
  by cost and cut into steps of group_size (similar packs train side by side), then whole steps are shuffled
  with --seed; a shorter last step, if any, comes last. A step still uneven by more than 1% (typically the
  one holding bfd's last, part-filled pack) is re-packed among its own packs, costliest sample first into the
  cheapest pack with room (same pack count). The report gives the modeled imbalance (slowest rank /
  mean, per step) against upstream's next-fit in file order. With another GPU count the balance is only less
  good; nothing that affects the loss depends on it (weights are 1/N_i; normalization happens at training).
- Sorted batching (LMSortDataset): samples sorted by length, cut into groups of group_size, groups shuffled
  with --seed (a shorter last group at the end).
- Report: printed, saved as DIR/packs/report.json, and DIR/packs/report.png (length histogram, pack fill).

Upstream layout (LongAlign / LongWriter pre_tokenize: dense inputs.npy + labels.npy): converted in place first,
without re-tokenizing (upstream_layout.py: row-length and pad-id rules; upstream LongWriter padded GLM-4 data
with [MASK] while the tokenizer's pad is <|endoftext|>: a pad id the rows do not end with is refused with the fix).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from tqdm import tqdm
from transformers import HfArgumentParser

from errors import run_cli
from atomic_dir import describe_removed, signals_as_exit, sweep_stale
from upstream_layout import (CONVERT_STAGE, SortAndGroupError, convert_legacy, inspect_legacy,  # noqa: F401
                             model_pad_token_id)  # re-exported: the CLI's error and pad lookup
from storage import (IGNORE_INDEX, META_FILE, PACKS_DIR, DatasetFormatError, TokenizedData, check_token_ids,
                     packs_replace_problem, write_packs)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

@dataclass
class Arguments:
    train_file: str = field(metadata={"help": "Dataset folder written by pre_tokenize.py (or the upstream "
                                              "layout with inputs.npy / labels.npy, converted in place)."})
    max_length: int = field(default=32768, metadata={"help": "Tokens per pack (and longest sample allowed)."})
    group_size: int = field(default=8, metadata={"help": "Packs (sorted batching: samples) trained in one step, "
                                                         "normally the GPU count; steps are balanced for it."})
    pack_algorithm: Literal["bfd", "sequential"] = field(default="bfd", metadata={
        "help": "bfd: best-fit decreasing over the whole dataset (near the lower bound); "
                "sequential: upstream's next-fit in file order."})
    seed: int = field(default=42, metadata={"help": "Shuffles whole steps of packs and sorted groups."})
    over_length: Literal["error", "truncate", "skip"] = field(default="error", metadata={
        "help": "Samples longer than --max_length: error (default), truncate (keep the first max_length "
                "tokens) or skip; the report counts them."})
    balance_steps: bool = field(default=True, metadata={
        "help": "Sort packs by modeled cost before cutting steps, so the packs of a step cost about the same."})
    shuffle: bool = field(default=True, metadata={"help": "Shuffle whole steps / groups with --seed."})
    attn_cost_length: float = field(default=57000.0, metadata={
        "help": "Cost model: pack cost = sum(L) + sum(L^2) / this; ~params / (hidden * layers)."})
    pad_token_id: Optional[int] = field(default=None, metadata={
        "help": "Upstream layout only: the pad id of inputs.npy (default: from --model_name_or_path, else "
                "inferred from the data)."})
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Upstream layout only: local model/tokenizer folder to read the pad id from."})
    plot: bool = field(default=True, metadata={"help": "Write DIR/packs/report.png."})


def check_arguments(args: Arguments) -> list[str]:
    problems = []
    if args.max_length < 2:
        problems.append(f"--max_length {args.max_length}: must be at least 2 (the packs' token budget).")
    if args.group_size < 1:
        problems.append(f"--group_size {args.group_size}: must be at least 1 (normally the GPU count).")
    if not args.attn_cost_length > 0:
        problems.append(f"--attn_cost_length {args.attn_cost_length}: must be positive.")
    return problems


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

def lower_bound(lengths: np.ndarray, max_length: int) -> int:
    """No packing can use fewer packs than ceil(total tokens / max_length)."""
    return int(-(-int(np.sum(lengths, dtype=np.int64)) // max_length))


def _offsets_from_bins(item_bin: np.ndarray, num_bins: int) -> np.ndarray:
    offsets = np.zeros(num_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(item_bin, minlength=num_bins), out=offsets[1:])
    return offsets


def pack_bfd(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing. lengths: int [n], each in [1, max_length].

    Returns (order, pack_offsets): pack p holds items order[pack_offsets[p]:pack_offsets[p + 1]] (positions
    into `lengths`), longest first. Exact best fit: an item goes to the bin with the least room that fits it.
    Runs of equal length are placed together (the best bin takes floor(room / length) of them; its room is then
    below the length, so the next best bin is looked up), and bins wait in buckets by room: buckets[r] is a
    stack of bins with r tokens free, and a bitmap of non-empty buckets (64-bit words + a summary of non-zero
    words) finds the smallest r >= length in a few integer operations."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n, cap = lengths.size, int(max_length)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    starts = np.concatenate([[0], np.flatnonzero(sorted_len[1:] != sorted_len[:-1]) + 1])
    run_len = sorted_len[starts].tolist()
    run_cnt = np.diff(np.append(starts, n)).tolist()

    words = [0] * ((cap >> 6) + 1)   # bit r & 63 of words[r >> 6]: buckets[r] is not empty
    summary = 0                      # bit w: words[w] != 0
    buckets: list[list[int]] = [[] for _ in range(cap + 1)]
    seg_bin: list[int] = []          # the sorted items, in order, go in segments: seg_cnt[s] items to seg_bin[s]
    seg_cnt: list[int] = []
    num_bins = 0

    def add(room: int, bins) -> None:  # put bins with `room` free into their bucket
        nonlocal summary
        if isinstance(bins, int):
            buckets[room].append(bins)
        else:
            buckets[room].extend(bins)
        w = room >> 6
        if not words[w]:
            summary |= 1 << w
        words[w] |= 1 << (room & 63)

    for x, k in zip(run_len, run_cnt):
        while k:
            w = x >> 6
            m = words[w] >> (x & 63)
            if m:                                   # a bucket in x's own word
                r = x + (m & -m).bit_length() - 1
            else:
                s = summary >> (w + 1)
                if not s:                           # nothing fits: open bins, floor(cap / x) items each
                    q = cap // x
                    full, rest = divmod(k, q)
                    if full:
                        seg_bin.extend(range(num_bins, num_bins + full))
                        seg_cnt.extend([q] * full)
                        if cap - q * x:
                            add(cap - q * x, range(num_bins, num_bins + full))
                        num_bins += full
                    if rest:
                        seg_bin.append(num_bins)
                        seg_cnt.append(rest)
                        if cap - rest * x:
                            add(cap - rest * x, num_bins)
                        num_bins += 1
                    break
                w += (s & -s).bit_length()
                m = words[w]
                r = (w << 6) + (m & -m).bit_length() - 1
            bucket = buckets[r]
            b = bucket.pop()
            if not bucket:
                words[w] &= ~(1 << (r & 63))
                if not words[w]:
                    summary &= ~(1 << w)
            t = min(r // x, k)
            if r - t * x:
                add(r - t * x, b)
            seg_bin.append(b)
            seg_cnt.append(t)
            k -= t
    item_bin = np.repeat(np.asarray(seg_bin, dtype=np.int64), np.asarray(seg_cnt, dtype=np.int64))
    by_bin = np.argsort(item_bin, kind="stable")
    return order[by_bin], _offsets_from_bins(item_bin, num_bins)


def pack_sequential(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's next-fit in file order: a sample that does not fit the open pack closes it. Same return as
    pack_bfd; the last pack is kept. One binary search per pack over the running token count."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = lengths.size
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    bounds, s = [0], 0
    while s < n:
        s = int(np.searchsorted(cum, cum[s] + max_length, side="right")) - 1  # last end that still fits
        bounds.append(s)
    return np.arange(n, dtype=np.int64), np.asarray(bounds, dtype=np.int64)


PACKERS = {"bfd": pack_bfd, "sequential": pack_sequential}


# ----------------------------------------------------------------------------------------------
# Compute balance across the packs of a step, and the sorted-batching order
# ----------------------------------------------------------------------------------------------

def pack_costs(lengths: np.ndarray, order: np.ndarray, pack_offsets: np.ndarray,
               attn_cost_length: float) -> np.ndarray:
    """Modeled cost of every pack: tokens + sum of squared sample lengths / attn_cost_length, float64 [packs]."""
    if pack_offsets.size < 2:
        return np.zeros(0)
    ell = np.asarray(lengths, dtype=np.float64)[order]
    return np.add.reduceat(ell + ell * ell / attn_cost_length, pack_offsets[:-1])


def arrange_steps(costs: np.ndarray, group_size: int, seed: int, balance: bool = True,
                  shuffle: bool = True) -> np.ndarray:
    """Training order of the packs: steps of group_size packs of similar cost (balance), whole steps shuffled
    with seed; the shorter last step (packs % group_size of them, the cheapest) stays last."""
    num = costs.size
    order = np.argsort(-costs, kind="stable") if balance else np.arange(num)
    full = num // group_size
    steps = order[:full * group_size].reshape(full, group_size)
    if shuffle:
        steps = steps[np.random.default_rng([seed, 0]).permutation(full)]
    return np.concatenate([steps.reshape(-1), order[full * group_size:]]).astype(np.int64)


def reorder_packs(order: np.ndarray, pack_offsets: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same packs, pack perm[k] in k-th place."""
    sizes = np.diff(pack_offsets)[perm]
    offsets = np.zeros(perm.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    pos = np.repeat(pack_offsets[:-1][perm] - offsets[:-1], sizes) + np.arange(offsets[-1])
    return order[pos], offsets


def repack_uneven_steps(lengths: np.ndarray, order: np.ndarray, pack_offsets: np.ndarray, group_size: int,
                        max_length: int, attn_cost_length: float,
                        tol: float = 1.01) -> tuple[np.ndarray, np.ndarray, int]:
    """Steps (runs of group_size packs, the last one may be shorter) whose slowest pack costs more than tol x
    their mean are re-packed: their samples, most expensive first, go to the cheapest of the step's packs that
    has room (LPT), kept only if that is more even. Same packs count; only a few tail steps (e.g. the last,
    part-filled bfd pack) qualify. Returns the new order (pack_offsets may change) and the steps re-packed."""
    order, offsets = order.copy(), pack_offsets.copy()
    cost = np.asarray(lengths, dtype=np.float64)
    cost = cost + cost * cost / attn_cost_length
    per_pack = np.add.reduceat(cost[order], offsets[:-1]) if offsets.size > 1 else np.zeros(0)
    repacked = 0
    for first in range(0, per_pack.size, group_size):
        c = per_pack[first:first + group_size]
        if c.size < 2 or c.max() <= tol * c.mean():
            continue
        a, b = offsets[first], offsets[first + c.size]
        items = order[a:b][np.argsort(-cost[order[a:b]], kind="stable")]
        load, room, dest = np.zeros(c.size), np.full(c.size, max_length), np.empty(items.size, dtype=np.int64)
        for k, i in enumerate(items.tolist()):
            fits = np.flatnonzero(room >= lengths[i])
            if fits.size == 0:
                break
            j = fits[np.argmin(load[fits])]
            dest[k], load[j], room[j] = j, load[j] + cost[i], room[j] - lengths[i]
        else:
            if load.max() < c.max():
                by_pack = np.argsort(dest, kind="stable")
                order[a:b] = items[by_pack]
                offsets[first + 1:first + c.size] = a + np.cumsum(np.bincount(dest, minlength=c.size))[:-1]
                per_pack[first:first + c.size] = load
                repacked += 1
    return order, offsets, repacked


def step_imbalance(costs_in_order: np.ndarray, group_size: int) -> dict:
    """Slowest rank / mean of each full step (1.0 = perfect), and the modeled time lost to waiting."""
    full = costs_in_order.size // group_size
    if full == 0:
        return {"steps": 0}
    c = costs_in_order[:full * group_size].reshape(full, group_size)
    ratio = c.max(axis=1) / np.maximum(c.mean(axis=1), 1e-12)
    return {"steps": full, "mean": round(float(ratio.mean()), 4), "p95": round(float(np.quantile(ratio, 0.95)), 4),
            "max": round(float(ratio.max()), 4),
            "time_lost": round(float(c.max(axis=1).sum() / c.mean(axis=1).sum() - 1), 4)}


def sorted_batching_order(lengths: np.ndarray, group_size: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Positions into `lengths` sorted by length (stable), cut into groups of group_size, groups shuffled with
    seed; the shorter last group (the longest samples) stays last."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    full = order.size // group_size
    groups = order[:full * group_size].reshape(full, group_size)
    if shuffle:
        groups = groups[np.random.default_rng([seed, 1]).permutation(full)]
    return np.concatenate([groups.reshape(-1), order[full * group_size:]]).astype(np.int64)


def count_targets(data: TokenizedData, lengths: np.ndarray, chunk_tokens: int = 1 << 24) -> np.ndarray:
    """N_i: supervised labels at positions 1..lengths[i]-1 of every sample, int32 [num_samples] (chunked reads)."""
    offsets = np.asarray(data.offsets)
    out = np.zeros(len(data), dtype=np.int32)
    n, i = len(data), 0
    with tqdm(total=int(offsets[-1]), desc="count targets", unit="tok", unit_scale=True,
              disable=offsets[-1] < 10 * chunk_tokens) as bar:
        while i < n:
            j = min(n, max(i + 1, int(np.searchsorted(offsets, offsets[i] + chunk_tokens, side="right")) - 1))
            a, b = int(offsets[i]), int(offsets[j])
            csum = np.zeros(b - a + 1, dtype=np.int64)
            np.cumsum(np.asarray(data.labels[a:b]) != IGNORE_INDEX, out=csum[1:])
            start = offsets[i:j] - a
            out[i:j] = csum[start + lengths[i:j]] - csum[start + 1]
            bar.update(b - a)
            i = j
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def plot_png(lengths: np.ndarray, fill: np.ndarray, max_length: int, title: str) -> bytes:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    bins = np.unique(np.geomspace(1, max(2, int(lengths.max(initial=1))), 80).astype(np.int64))
    ax1.hist(lengths, bins=bins)
    ax1.set(xscale="log", yscale="log", xlabel="sample length (tokens)", ylabel="samples",
            title=f"{lengths.size:,} samples, {int(lengths.sum()):,} tokens")
    ax2.hist(fill, bins=np.linspace(0, 1, 101))
    ax2.set(yscale="log", xlabel=f"pack fill (tokens / {max_length:,})", ylabel="packs",
            title=f"{fill.size:,} packs, mean fill {fill.mean() if fill.size else 0:.2%}")
    for ax in (ax1, ax2):  # counts as plain numbers on 1-2-5 ticks, not 10^0-style labels
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def summary_lines(r: dict) -> list[str]:
    s, t, imb = r["samples"], r["tokens"], r["step_imbalance"]
    lines = [
        f"sort_and_group: {r['train_file']} (max_length {r['max_length']}, group_size {r['group_size']}, "
        f"{r['pack_algorithm']}, seed {r['seed']})",
        f"  samples {s['in_dataset']:,} -> packed {s['packed']:,}; over max_length {s['over_length']:,} "
        f"({r['over_length']}: truncated {s['truncated']:,}, skipped {s['skipped']:,}, tokens cut "
        f"{t['cut']:,}); without supervised tokens {s['without_targets']:,} (weight 0)",
        f"  tokens {t['packed']:,} in {r['packs']:,} packs; lower bound {r['lower_bound']:,} "
        f"(+{r['packs'] - r['lower_bound']}, {r['gap_to_lower_bound']:.3%}); efficiency {r['efficiency']:.4%}",
        f"  sequences per pack mean {r['sequences_per_pack']['mean']:.2f} "
        f"(min {r['sequences_per_pack']['min']}, max {r['sequences_per_pack']['max']}); "
        f"steps {r['steps']['full']:,} of {r['group_size']} + last step of {r['steps']['last_step_packs']}",
    ]
    for name, v in imb.items():
        if isinstance(v, dict) and v.get("steps"):
            lines.append(f"  step imbalance [{name}] slowest/mean: mean {v['mean']:.4f}, p95 {v['p95']:.4f}, "
                         f"max {v['max']:.4f}; modeled time lost {v['time_lost']:.2%}")
    if r.get("legacy"):
        g = r["legacy"]
        lines.append(f"  converted upstream layout: {g['rows']:,} rows x {g['width']:,}, pad id {g['pad_token_id']} "
                     f"({g['pad_source']}), all-padding rows dropped {g['empty_rows']:,}")
    lines.append(f"  sorted batching: {r['sorted_batching']['samples']:,} samples, padding efficiency "
                 f"{r['sorted_batching']['padding_efficiency']:.2%}")
    return lines


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def over_length_problem(lengths: np.ndarray, args: Arguments, names: Optional[np.ndarray] = None,
                        what: str = "sample") -> Optional[str]:
    """The error for samples over --max_length (None when there are none or they are allowed);
    names[i] is how the user finds sample i (default: its index)."""
    over = np.flatnonzero(lengths > args.max_length)
    if args.over_length != "error" or over.size == 0:
        return None
    worst = over[np.argsort(-lengths[over], kind="stable")[:10]]
    names = np.arange(lengths.size) if names is None else names
    listed = ", ".join(f"{what} {names[i]} ({lengths[i]:,} tokens)" for i in worst.tolist())
    return (f"{over.size:,} samples are longer than --max_length {args.max_length}: {listed}"
            f"{', ...' if over.size > 10 else ''}. Pass --max_length {int(lengths.max())} (or more), or "
            f"--over_length truncate (keep their first {args.max_length:,} tokens), or --over_length skip "
            f"(leave them out); either is counted in the report.")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = HfArgumentParser(Arguments, allow_abbrev=False)  # exact flag names: no --prefix matching
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    with signals_as_exit():  # SIGTERM / SIGHUP clean up like Ctrl-C: no half-written packs/ temp folder stays
        return run(args)


def run(args: Arguments) -> dict:
    t0 = time.perf_counter()
    data_dir = Path(args.train_file)
    problems = check_arguments(args)
    legacy = None
    if data_dir.is_dir() and not (data_dir / META_FILE).exists() and (data_dir / "inputs.npy").exists():
        legacy = inspect_legacy(data_dir, args.pad_token_id, args.model_name_or_path)              # reads only
        raw_lengths = legacy["lengths"][legacy["lengths"] > 0]
        if raw_lengths.size == 0:
            problems.append(f"{data_dir}/inputs.npy: every row is padding; nothing to train on.")
    else:
        try:
            data = TokenizedData(data_dir)
        except DatasetFormatError as e:
            if not problems:
                raise
            raise SortAndGroupError("sort_and_group.py cannot run:\n  - " + "\n  - ".join([*problems, str(e)]))
        raw_lengths = data.lengths
        if args.pad_token_id is not None or args.model_name_or_path:
            print("note: --pad_token_id / --model_name_or_path only apply to the upstream layout; not used here.")
        if raw_lengths.size == 0:
            problems.append(f"{data_dir}: the dataset has no samples; re-run pre-tokenization with data.")
        vocab = (data.meta.get("tokenizer") or {}).get("vocab_size")
        problems += check_token_ids(data, vocab, f"the {vocab} tokens of the tokenizer it was made with (meta.json)")
    packs_problem = packs_replace_problem(data_dir)
    if packs_problem:
        problems.append(f"{packs_problem}; sort_and_group.py replaces {PACKS_DIR}/ whole, so move those files out "
                        f"of it (or remove {PACKS_DIR}/ yourself) and run again.")
    if not problems and legacy is not None:
        problem = over_length_problem(raw_lengths, args, np.flatnonzero(legacy["lengths"] > 0), "inputs.npy row")
        problems += [problem] if problem else []
    elif not problems:
        problem = over_length_problem(raw_lengths, args)
        problems += [problem] if problem else []
    if not problems and args.over_length == "skip" and np.all(raw_lengths > args.max_length):
        problems.append(f"every sample is longer than --max_length {args.max_length}, --over_length skip would "
                        f"leave nothing; pass --max_length {int(raw_lengths.max())} or --over_length truncate.")
    if problems:
        raise SortAndGroupError("sort_and_group.py cannot run:\n  - " + "\n  - ".join(problems))

    # ---- nothing has been written so far; from here on the inputs are known to be usable
    removed = sweep_stale(data_dir / PACKS_DIR) + sweep_stale(data_dir / CONVERT_STAGE)
    if removed:
        print("note: " + describe_removed(removed))
    if legacy is not None:
        convert_legacy(data_dir, legacy, args.model_name_or_path)
        data = TokenizedData(data_dir)
    t_read = time.perf_counter()
    raw = data.lengths                                               # int64 [num_samples]
    over = raw > args.max_length
    lengths = np.minimum(raw, args.max_length)
    included = np.flatnonzero(~over) if args.over_length == "skip" else np.arange(raw.size)
    targets = count_targets(data, lengths)                           # int32 [num_samples]
    t_targets = time.perf_counter()

    inc_len = lengths[included]
    order, pack_offsets = PACKERS[args.pack_algorithm](inc_len, args.max_length)
    t_pack = time.perf_counter()
    costs = pack_costs(inc_len, order, pack_offsets, args.attn_cost_length)
    order, pack_offsets = reorder_packs(order, pack_offsets, arrange_steps(
        costs, args.group_size, args.seed, args.balance_steps, args.shuffle))
    repacked = 0
    if args.balance_steps:
        order, pack_offsets, repacked = repack_uneven_steps(inc_len, order, pack_offsets, args.group_size,
                                                            args.max_length, args.attn_cost_length)
    costs = pack_costs(inc_len, order, pack_offsets, args.attn_cost_length)   # in training order
    sizes = np.diff(pack_offsets)
    pack_samples = included[order]
    sort_order = included[sorted_batching_order(inc_len, args.group_size, args.seed, args.shuffle)]
    t_arrange = time.perf_counter()

    # ---- report
    nf_order, nf_offsets = pack_sequential(inc_len, args.max_length)
    nf_costs = pack_costs(inc_len, nf_order, nf_offsets, args.attn_cost_length)
    num_packs = sizes.size
    fill = np.add.reduceat(inc_len[order], pack_offsets[:-1]) / args.max_length if num_packs else np.zeros(0)
    lb = lower_bound(inc_len, args.max_length)
    g = args.group_size
    sorted_len = lengths[sort_order]
    full = sorted_len.size // g
    padded = sorted_len[:full * g].reshape(full, g).max(axis=1).sum() * g + (
        sorted_len[full * g:].max(initial=0) * (sorted_len.size - full * g))
    report = {
        "train_file": str(data_dir), **{k: v for k, v in asdict(args).items() if k != "train_file"},
        "samples": {"in_dataset": int(raw.size), "packed": int(included.size), "over_length": int(over.sum()),
                    "truncated": int(over.sum()) if args.over_length == "truncate" else 0,
                    "skipped": int(over.sum()) if args.over_length == "skip" else 0,
                    "without_targets": int((targets[included] == 0).sum())},
        "tokens": {"in_dataset": int(raw.sum()), "packed": int(inc_len.sum()),
                   "cut": int((raw - lengths).sum()) if args.over_length == "truncate" else 0,
                   "skipped": int(raw[over].sum()) if args.over_length == "skip" else 0,
                   "supervised_targets": int(targets[included].sum(dtype=np.int64))},
        "packs": int(num_packs), "lower_bound": lb,
        "gap_to_lower_bound": round((num_packs - lb) / max(lb, 1), 6),
        "efficiency": round(float(inc_len.sum()) / max(1, num_packs * args.max_length), 6),
        "sequences_per_pack": {"mean": round(float(sizes.mean()), 3), "min": int(sizes.min()),
                               "max": int(sizes.max())},
        "pack_fill": {"mean": round(float(fill.mean()), 6), "min": round(float(fill.min()), 6),
                      "p01": round(float(np.quantile(fill, 0.01)), 6)},
        "steps": {"full": int(num_packs // g), "last_step_packs": int(num_packs % g), "repacked": repacked},
        "cost_model": f"pack cost = sum(L) + sum(L^2) / {args.attn_cost_length:g}",
        "step_imbalance": {
            "this_run": step_imbalance(costs, g),
            "next_fit_file_order": step_imbalance(nf_costs, g),
        },
        "sorted_batching": {"samples": int(sort_order.size), "groups": int(-(-sort_order.size // g)),
                            "padding_efficiency": round(float(sorted_len.sum()) / max(1, int(padded)), 6)},
        "legacy": None if legacy is None else data.meta["legacy"],
        "seconds": {"read": round(t_read - t0, 3), "count_targets": round(t_targets - t_read, 3),
                    "pack": round(t_pack - t_targets, 3), "arrange": round(t_arrange - t_pack, 3)},
    }
    extra = {}
    if args.plot:
        extra["report.png"] = plot_png(lengths[included], fill, args.max_length,
                                       f"{data_dir.name}: {args.pack_algorithm}, efficiency {report['efficiency']:.3%}")
    report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    extra["report.json"] = (json.dumps(report, indent=2) + "\n").encode()
    meta = {key: report[key] for key in ("max_length", "group_size", "pack_algorithm", "seed", "over_length",
                                         "balance_steps", "shuffle", "attn_cost_length")}
    meta.update({"num_packs": int(num_packs), "steps": report["steps"], "lower_bound": lb, "samples": report["samples"],
                 "efficiency": report["efficiency"],
                 "source": {"num_samples": data.meta["num_samples"], "num_tokens": data.meta["num_tokens"]}})
    write_packs(data_dir, {"pack_offsets": pack_offsets, "pack_samples": pack_samples, "sort_order": sort_order,
                           "targets": targets}, meta, extra)
    print("\n".join(summary_lines(report)))
    print(f"  wrote {data_dir / 'packs'} (report.json{', report.png' if args.plot else ''})")
    return report


if __name__ == "__main__":
    run_cli(main)
