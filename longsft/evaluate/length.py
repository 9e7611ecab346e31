"""LongBench-Write's length score S_l (LongWriter's evaluation/eval_length.py, arXiv 2408.07055), no torch.

    python evaluate.py --predictions pred.jsonl --output_dir eval/scored      # recounts and scores a pred.jsonl
    python -c "from longsft.evaluate.length import count_words, length_score; print(count_words('写 a story'), length_score(1000, 800))"

`count_words(text)`: the characters in U+4E00-U+9FFF (CJK unified ideographs) plus the matches of
`\\b[a-zA-Z]+\\b`, with Python's Unicode word boundaries, exactly as LongWriter counts (so "中文abc" has 2: no
boundary between 文 and a; "abc123" has none).

`length_score(x, y)` with x the required and y the produced length:
    100 * max(0, 1 - (y/x - 1) / 3)   if y > x     (writing 4x too much scores 0)
    100 * max(0, 1 - (x/y - 1) / 2)   otherwise    (writing a third scores 0)
and 0 for an empty reply (y = 0; upstream divides by zero there). S_l is the mean over prompts, reported overall,
per `type` and per required-length bucket (LongWriter's ranges [0, 500), [500, 2000), [2000, 4000), >= 4000 by
default).
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

CJK_CHAR = re.compile(r"[\u4e00-\u9fff]")
ENGLISH_WORD = re.compile(r"\b[a-zA-Z]+\b")
LENGTH_BUCKETS = (500, 2000, 4000)  # LongBench-Write's required-length ranges (the paper's table)


def count_words(text: str) -> int:
    """LongWriter's count_words: CJK characters plus English words."""
    return len(CJK_CHAR.findall(text)) + len(ENGLISH_WORD.findall(text))


def length_score(required: float, produced: float) -> float:
    """S_l of one reply (0-100): required length x, produced length y; 0 when y is 0."""
    x, y = float(required), float(produced)
    if y <= 0:
        return 0.0
    if y > x:
        return 100.0 * max(0.0, 1.0 - (y / x - 1.0) / 3.0)
    return 100.0 * max(0.0, 1.0 - (x / y - 1.0) / 2.0)


def bucket_names(bounds: Sequence[int]) -> list[str]:
    """Names of the required-length ranges cut at `bounds`: '[0, 500)', ..., '>= 4000'."""
    edges = [0, *bounds]
    return [f"[{a}, {b})" for a, b in zip(edges, edges[1:])] + [f">= {edges[-1]}"]


def bucket_of(length: float, bounds: Sequence[int]) -> str:
    names = bucket_names(bounds)
    for name, bound in zip(names, bounds):
        if length < bound:
            return name
    return names[-1]


def parse_buckets(text: str) -> tuple[int, ...]:
    """'500,2000,4000' -> (500, 2000, 4000); ValueError unless positive increasing whole numbers."""
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or any(v <= 0 for v in values) or list(values) != sorted(set(values)):
        raise ValueError(f"{text!r}: expected increasing positive whole numbers, e.g. 500,2000,4000")
    return values


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")


def length_report(items: list[dict], bounds: Sequence[int] = LENGTH_BUCKETS) -> dict:
    """S_l of prediction items ({"type", "length", "response"}): the length is recounted from `response`.

    -> {"S_l", "count", "empty_responses", "by_type": {type: {"S_l", "count"}},
        "by_length": {bucket: {"S_l", "count"}}, "lengths": [(required, produced), ...]}"""
    rows = [(str(it.get("type", "")), float(it["length"]), count_words(it.get("response") or "")) for it in items]
    scores = [length_score(x, y) for _, x, y in rows]

    def group(keys: list[str], order: list[str]) -> dict:
        out = {}
        for key in order:
            sel = [s for k, s in zip(keys, scores) if k == key]
            if sel:
                out[key] = {"S_l": _mean(sel), "count": len(sel)}
        return out

    types = [t for t, _, _ in rows]
    buckets = [bucket_of(x, bounds) for _, x, _ in rows]
    return {"S_l": _mean(scores), "count": len(rows), "empty_responses": sum(1 for _, _, y in rows if y == 0),
            "by_type": group(types, sorted(set(types))), "by_length": group(buckets, bucket_names(bounds)),
            "lengths": [(x, y) for _, x, y in rows]}
