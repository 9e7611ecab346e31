"""evaluate.py's outputs for people: the required-vs-produced length scatter (log-log, the LongWriter paper's figure)
and the summary printed at the end. No torch.

    python evaluate.py --predictions pred.jsonl --output_dir eval/x      # writes eval/x/length_scatter.png

The scatter puts each prompt at (required length, produced length) on log axes with the line y = x; replies with no
words cannot sit on a log axis and are drawn as red crosses on the bottom edge (counted in the legend).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def length_scatter(lengths: list[tuple[float, float]], path: str | os.PathLike, title: str = "") -> Path:
    """Write the scatter PNG of (required, produced) pairs to `path` (atomically); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    xs = [x for x, _ in lengths]
    positive = [(x, y) for x, y in lengths if y > 0]
    empty = [x for x, y in lengths if y <= 0]
    values = xs + [y for _, y in positive]
    lo = 10 ** math.floor(math.log10(max(1.0, min(values) / 1.5))) if values else 10
    hi = 10 ** math.ceil(math.log10(max(values) * 1.5)) if values else 10 ** 5
    fig, ax = plt.subplots(figsize=(6, 6))
    if positive:
        ax.scatter([x for x, _ in positive], [y for _, y in positive], s=60, c="tab:blue", alpha=0.4,
                   label=f"replies ({len(positive)})")
    if empty:
        ax.scatter(empty, [lo] * len(empty), marker="x", c="tab:red", clip_on=False,
                   label=f"no words ({len(empty)})")
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="produced = required")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("required length (words)")
    ax.set_ylabel("produced length (words)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def summary(scores: dict, output_dir: str) -> str:
    """A few lines saying what was measured and where the files are."""
    lines = [f"[evaluate] {output_dir}"]
    gen = scores.get("generation")
    if gen:
        lines.append(f"  generated {gen['new_items']} replies this run ({gen['resumed_items']} from before), "
                     f"{gen['new_tokens']:,} tokens in {gen['seconds']:.1f} s = {gen['tokens_per_s']:.1f} tokens/s "
                     f"({gen['backend']}, {gen['device']}); stopped: {gen['finish_reasons']}")
    if "S_l" in scores:
        lines.append(f"  S_l (length score, 0-100) = {_fmt(scores['S_l'])} over {scores['count']} prompts"
                     f" ({scores['empty_responses']} without words)")
        for key in ("by_length", "by_type"):
            part = ", ".join(f"{k}: {_fmt(v['S_l'])} (n={v['count']})" for k, v in scores[key].items())
            lines.append(f"    {key.replace('_', ' ')}: {part}")
    if "S_q" in scores:
        q = scores["quality"]
        missing = {d: n for d, n in q["missing"].items() if n}
        lines.append(f"  S_q (quality score, 0-100) = {_fmt(scores['S_q'])}: {q['judged']} judged, "
                     f"{q['failed']} without an answer" + (f", dimensions missing: {missing}" if missing else ""))
        lines.append("    " + ", ".join(f"{d}: {_fmt(v)}" for d, v in q["dimensions"].items()))
    if "rouge-1" in scores:
        lines.append(f"  rouge-1 {_fmt(scores['rouge-1'])}, rouge-2 {_fmt(scores['rouge-2'])}, rouge-l "
                     f"{_fmt(scores['rouge-l'])} (F x 100), bleu-4 {scores['bleu-4']:.4f} (0-1) over "
                     f"{scores['count']} replies ({scores['empty_replies']} empty)")
    if "eval_loss" in scores:
        lines.append(f"  eval_loss {scores['eval_loss']:.4f} (token mean over {scores['eval_targets']:,} targets, "
                     f"the training format's supervision)")
    if scores.get("skipped"):
        lines.append(f"  skipped records: {scores['skipped']} (each listed in skipped.jsonl)")
    files = ", ".join(f for f in ("predictions.jsonl", "scores.json", "length_scatter.png", "judgments.jsonl",
                                   "skipped.jsonl") if (Path(output_dir) / f).exists())
    lines.append(f"  files: {files}")
    return "\n".join(lines)
