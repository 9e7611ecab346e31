"""Helpers of the data tests (no tests here): write chat records as JSONL, and read supervised label runs.

    from records import write_jsonl, supervised_runs
"""
import json

IGNORE_INDEX = -100


def write_jsonl(path, records):
    """One line per record: a dict is dumped as JSON (non-ASCII kept), a str is written as it is (bad lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def supervised_runs(labels):
    """Contiguous runs of supervised labels (label != -100), as lists of ids."""
    out, cur = [], []
    for x in labels.tolist() + [IGNORE_INDEX]:
        if x != IGNORE_INDEX:
            cur.append(x)
        elif cur:
            out.append(cur)
            cur = []
    return out
