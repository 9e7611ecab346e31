"""What evaluate.py reads and appends: benchmark prompts, test-set conversations, prediction files. No torch.

    from longsft.evaluate.records import read_benchmark, read_test_set, read_predictions, PredictionLog
    items = read_benchmark("longbench_write.jsonl")        # [{"index", "prompt", "type", "length"}, ...]
    cases, skipped = read_test_set("dev.jsonl")            # conversations: the last assistant reply is the reference

- Benchmark (`--data`): JSONL of {"prompt", "type", "length"}, LongWriter's evaluation/longbench_write.jsonl,
  longbench_write_en.jsonl and longwrite_ruler.jsonl format (`type` may be absent: then ""). Every bad line
  (not JSON, a field missing or of the wrong type, a length that is not a positive number) is collected and
  reported in one UserError naming file:line.
- Test set (`--test_file`): any file pre_tokenize.py reads (JSONL or a JSON array; messages, ShareGPT or Alpaca
  records; longsft/data/inputs.py indexes and parses them). The reference is the record's last assistant reply,
  the prompt what comes before it; a record that cannot be used (unparsable, no assistant reply last, an empty
  reference) is listed in `skipped` with its line and reason, never dropped silently.
- Predictions (`--predictions`): LongWriter's pred.jsonl (prompt, type, length, response; response_length is
  ignored and recounted) or a test-set predictions.jsonl of evaluate.py (reference, response).
- PredictionLog: OUTPUT_DIR/predictions.jsonl appended one line per finished item (flushed), keyed by `index`,
  so a killed run resumes after its last complete line (a torn last line is cut off) and a finished one does
  nothing; a line whose prompt differs from the input's item at that index is an error (another --data).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

from longsft.data.inputs import Message, Skip, index_inputs, parse_record
from longsft.errors import UserError


def _jsonl(path: Path, flag: str, problems: list[str]) -> list[tuple[int, object]]:
    """(line number, parsed object) of the non-blank lines; unparsable lines appended to `problems`."""
    if not path.is_file():
        problems.append(f"{flag} {path}: no such file")
        return []
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((n, json.loads(line)))
            except ValueError as e:
                problems.append(f"{path}:{n}: not a JSON line ({e}); fix or remove the line")
    return out


def _check_item(obj, where: str, need: tuple[str, ...], problems: list[str]) -> Optional[dict]:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected a JSON object with {', '.join(need)}")
        return None
    bad = []
    for key in need:
        v = obj.get(key)
        if key == "length":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                bad.append(f"`length` must be a positive number of words (got {v!r})")
        elif not isinstance(v, str):
            bad.append(f"`{key}` must be a string (got {type(v).__name__ if key in obj else 'nothing'})")
    if "type" in obj and not isinstance(obj["type"], str):
        bad.append("`type` must be a string")
    if bad:
        problems.append(f"{where}: " + "; ".join(bad))
        return None
    return obj


def read_benchmark(path: str | os.PathLike, flag: str = "--data") -> list[dict]:
    """LongBench-Write / LongWrite-Ruler records -> [{"index", "line", "prompt", "type", "length"}]."""
    path, problems, items = Path(path), [], []
    for n, obj in _jsonl(path, flag, problems):
        obj = _check_item(obj, f"{path}:{n}", ("prompt", "length"), problems)
        if obj is not None:
            items.append({"index": len(items), "line": n, "prompt": obj["prompt"], "type": obj.get("type", ""),
                          "length": obj["length"]})
    if not items and not problems:
        problems.append(f"{flag} {path}: no records (expected JSON lines of {{\"prompt\", \"type\", \"length\"}}, "
                        f"LongWriter's evaluation/longbench_write.jsonl format)")
    if problems:
        raise UserError(f"{flag} {path} cannot be used:\n  - " + "\n  - ".join(problems))
    return items


def read_predictions(path: str | os.PathLike, flag: str = "--predictions") -> tuple[str, list[dict]]:
    """("length" | "test", items) of a prediction file: LongWriter's pred.jsonl fields (prompt, type, length,
    response) or a test-set predictions.jsonl (reference, response). The kind is the first record's."""
    path, problems = Path(path), []
    rows = _jsonl(path, flag, problems)
    first = next((o for _, o in rows if isinstance(o, dict)), {})
    kind = "test" if "reference" in first and "length" not in first else "length"
    need = ("reference", "response") if kind == "test" else ("prompt", "length", "response")
    items = []
    for n, obj in rows:
        obj = _check_item(obj, f"{path}:{n}", need, problems)
        if obj is not None:
            items.append({**obj, "line": n})
    if not rows and not problems:
        problems.append(f"{flag} {path}: no records")
    if problems:
        raise UserError(f"{flag} {path} cannot be scored:\n  - " + "\n  - ".join(problems))
    return kind, items


def read_test_set(path: str | os.PathLike, flag: str = "--test_file") -> tuple[list[dict], list[dict]]:
    """Chat records -> (cases [{"index", "line", "messages", "context", "record", "reference"}], skipped [{"line",
    "reason", "detail"}]). `messages` is the whole conversation as training reads it; `context` the messages before
    the last reply (earlier replies unsupervised) followed by a stand-in supervised reply: where its supervision
    starts is the model's prompt; `record` the JSON record itself (template auto reads it, tools included)."""
    problems: list[str] = []
    sources = index_inputs([str(path)], problems)
    if problems:
        raise UserError(f"{flag}: " + "; ".join(p.replace("--input", flag) for p in problems))
    src = sources[0]
    cases, skipped = [], []
    with open(src.path, "rb") as f:
        data = f.read()
    for line, start, end in zip(src.lines.tolist(), src.starts.tolist(), src.ends.tolist()):
        try:
            try:
                obj = json.loads(data[start:end])
            except ValueError as e:
                raise Skip("invalid_json", str(e)[:200]) from None
            _, messages = parse_record(obj)
            last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
            if last is None or last != len(messages) - 1:
                raise Skip("no_reference", "the record does not end with an assistant reply (the reference)")
            reference = messages[last].content
            if not reference.strip():
                raise Skip("no_reference", "the last assistant reply is empty")
            if not any(m.role == "user" for m in messages[:last]):
                raise Skip("no_prompt", "no user message before the last assistant reply")
        except Skip as s:
            skipped.append({"file": str(src.path), "line": line, "reason": s.reason, "detail": s.detail})
            continue
        context = [replace(m, train=False) for m in messages[:last]] + [Message("assistant", "x", train=True)]
        cases.append({"index": len(cases), "line": line, "messages": messages, "context": context, "record": obj,
                      "prompt": messages[last - 1].content if messages[last - 1].role == "user" else "",
                      "reference": reference})
    return cases, skipped


class PredictionLog:
    """OUTPUT_DIR/predictions.jsonl: one JSON line per finished item, in the order they finish."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.done: dict[int, dict] = {}
        if self.path.is_file():
            raw = self.path.read_bytes()
            keep = raw.rfind(b"\n") + 1  # a line without its newline was cut by a kill: drop it
            if keep < len(raw):
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
            for n, line in enumerate(raw[:keep].decode("utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        item = json.loads(line)
                        self.done[int(item["index"])] = item
                    except (ValueError, KeyError, TypeError):
                        raise UserError(f"{self.path}:{n}: not a line evaluate.py wrote; remove the file or use "
                                        f"another --output_dir") from None

    def check_against(self, items: list[dict], keys: tuple[str, ...]) -> None:
        """Every logged line must be the item at its index (the same `keys` fields): else it came from other
        inputs."""
        wrong = [i for i, p in self.done.items()
                 if i >= len(items) or any(p.get(k) != items[i].get(k) for k in keys)]
        if wrong:
            raise UserError(f"{self.path} holds predictions for other inputs (index {wrong[0]}: its "
                            f"{'/'.join(keys)} differs from the input's); use another --output_dir, or delete the "
                            f"file to start over")

    def append(self, item: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[int(item["index"])] = item

    def ordered(self, n: int) -> list[dict]:
        return [self.done[i] for i in range(n) if i in self.done]
