"""What `sort_and_group.py` runs: sorted-batching order and near-perfect packs for a tokenized dataset, nothing lost.

Reads the folder pre_tokenize.py (or its front ends pre_tokenize_glm4.py / pre_tokenize_llama3.py) wrote and
adds DIR/packs/ to it (layout in storage.py's docstring; no torch is imported); `LMPackDataset(DIR)` and
`LMSortDataset(DIR)` (longsft/train/batches.py, `from dataset import ...`) read the result.

    from longsft.data.sort_and_group import main
    report = main(["--train_file", "/tmp/glm4-sample", "--max_length", "8192", "--group_size", "2"])
    # the commands (the root entry, a tiny CPU run, upstream's layout): sort_and_group.py's docstring

What it does, top to bottom:
- Lengths come from the offsets (no token is read for packing); labels are read once to count N_i, the
  supervised target tokens of every sample (its first token excluded: nothing before it can predict it).
- The token ids themselves are checked first (longsft.data.storage.check_token_ids: no negative id, none past the vocabulary
  of the tokenizer meta.json names, meta.json's max_token_id true), and an existing DIR/packs/ must be ours
  alone (a user's file in it is an error, not a deletion). packs/ is replaced atomically (a symlinked one is
  written through); SIGTERM cleans up like Ctrl-C, and temp folders of killed runs are removed. If DIR is replaced
  while packing (pre_tokenize.py writing it again), that is an error and no packs are kept (storage.write_packs).
- A sample longer than --max_length is an error naming the samples and the fix, unless --over_length
  truncate (keep its first max_length tokens) or skip (leave it out); either way it is counted in the report.
- Packing, compute balance and the sorted-batching order: longsft/data/packing.py (its docstring).
- Report: printed, saved as DIR/packs/report.json, and DIR/packs/report.png (length histogram, pack fill).
- Preference pairs (`pre_tokenize.py --stage dpo`): the same command packs whole pairs, never split, and
  --over_length applies to the pair (longsft/data/pair_packing.py).

Upstream layout (LongAlign / LongWriter pre_tokenize: dense inputs.npy + labels.npy): converted in place first,
without re-tokenizing (longsft/data/upstream_layout.py: row-length and pad-id rules; upstream LongWriter padded GLM-4 data
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

from longsft.atomic_dir import describe_removed, signals_as_exit, sweep_stale, writable_problem, write_failures_reported
from longsft.data.packing import (PACKERS, arrange_steps, lower_bound, pack_costs, pack_sequential, repack_uneven_steps,
                                  reorder_packs, sorted_batching_order, step_imbalance)
from longsft.data.upstream_layout import (CONVERT_STAGE, SortAndGroupError, convert_legacy, inspect_legacy)
from longsft.data.pair_packing import over_length_pairs_problem, pair_items, pairs_summary
from longsft.data.storage import (IGNORE_INDEX, META_FILE, PACKS_DIR, SAMPLE_LENGTHS_FILE, DatasetFormatError, TokenizedData,
                                  check_token_ids, packs_replace_problem, write_packs)


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
    if data_dir.is_dir() and (problem := writable_problem(data_dir, f"--train_file {data_dir}")):
        problems.append(f"{problem} (sort_and_group.py writes {PACKS_DIR}/ inside it)")
    packs_problem = packs_replace_problem(data_dir)
    if packs_problem:
        problems.append(f"{packs_problem}; sort_and_group.py replaces {PACKS_DIR}/ whole, so move those files out "
                        f"of it (or remove {PACKS_DIR}/ yourself) and run again.")
    if not problems and legacy is not None:
        problem = over_length_problem(raw_lengths, args, np.flatnonzero(legacy["lengths"] > 0), "inputs.npy row")
        problems += [problem] if problem else []
    elif not problems and data.pairs is not None:  # preference pairs: the policy applies to whole pairs
        problem = over_length_pairs_problem(raw_lengths, np.asarray(data.pairs), args.max_length, args.over_length)
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
    squares, pairs = None, None                                      # items: samples, or preference pairs
    if data.pairs is None:
        over = raw > args.max_length
        lengths = np.minimum(raw, args.max_length)
        included = np.flatnonzero(~over) if args.over_length == "skip" else np.arange(raw.size)
        targets = count_targets(data, lengths)                       # int32 [num_samples]
        inc_len, item_samples = lengths[included], included[:, None]
    else:  # longsft/data/pair_packing.py: the items are whole pairs
        pairs, targets = pair_items(raw, np.asarray(data.pairs), args.max_length, args.over_length,
                                    lambda n: count_targets(data, n))
        lengths, inc_len, squares, item_samples = pairs.lengths, pairs.item_lengths, pairs.item_squares, \
            pairs.item_samples
        included = item_samples.reshape(-1)
        over = pairs.over_samples
    t_targets = time.perf_counter()

    order, pack_offsets = PACKERS[args.pack_algorithm](inc_len, args.max_length)
    t_pack = time.perf_counter()
    costs = pack_costs(inc_len, order, pack_offsets, args.attn_cost_length, squares)
    order, pack_offsets = reorder_packs(order, pack_offsets, arrange_steps(
        costs, args.group_size, args.seed, args.balance_steps, args.shuffle))
    repacked = 0
    if args.balance_steps:
        order, pack_offsets, repacked = repack_uneven_steps(inc_len, order, pack_offsets, args.group_size,
                                                            args.max_length, args.attn_cost_length, squares=squares)
    costs = pack_costs(inc_len, order, pack_offsets, args.attn_cost_length, squares)   # in training order
    width = item_samples.shape[1]                                    # samples per item: 1, or 2 for a pair
    sizes = np.diff(pack_offsets) * width
    pack_samples = item_samples[order].reshape(-1)
    sort_order = item_samples[sorted_batching_order(inc_len, args.group_size, args.seed, args.shuffle)].reshape(-1)
    t_arrange = time.perf_counter()

    # ---- report
    nf_order, nf_offsets = pack_sequential(inc_len, args.max_length)
    nf_costs = pack_costs(inc_len, nf_order, nf_offsets, args.attn_cost_length, squares)
    num_packs = sizes.size
    fill = np.add.reduceat(inc_len[order], pack_offsets[:-1]) / args.max_length if num_packs else np.zeros(0)
    lb = lower_bound(inc_len, args.max_length)
    pack_offsets = pack_offsets * width                              # into pack_samples
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
                   "cut": int((raw - lengths)[included].sum()) if args.over_length == "truncate" else 0,
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
        **({} if pairs is None else {"pairs": pairs.report}),
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
    if pairs is not None:  # which samples' tokens enter the packs: stored, since a pair is cut as a whole
        meta.update({"stage": "dpo", "pairs": pairs.report, "sample_lengths_file": SAMPLE_LENGTHS_FILE})
        extra[SAMPLE_LENGTHS_FILE] = np.ascontiguousarray(lengths, dtype=np.int64).tobytes()
    arrays = {"pack_offsets": pack_offsets, "pack_samples": pack_samples, "sort_order": sort_order, "targets": targets}
    intact = (f"The previous packs in {data_dir / PACKS_DIR} are intact" if (data_dir / PACKS_DIR).exists() else
              f"{data_dir} is unchanged (no {PACKS_DIR}/ was added)") + "; the unfinished copy was removed."
    with write_failures_reported(f"sort_and_group.py writing {data_dir / PACKS_DIR}", data_dir, intact,
                                 lambda: sum(a.nbytes for a in arrays.values()) + sum(map(len, extra.values()))):
        write_packs(data_dir, arrays, meta, extra, made_from=data.identity)
    print("\n".join(summary_lines(report) + ([pairs_summary(report)] if pairs is not None else [])))
    print(f"  wrote {data_dir / 'packs'} (report.json{', report.png' if args.plot else ''})")
    return report

