"""Chat data inputs: index JSONL / JSON-array files, pick and shuffle records, cut the plan into work units, and
turn one record (messages, ShareGPT or Alpaca) into a list of `Message`s.

Used by chat_data.py (the pre-tokenization driver; its docstring has the --input syntax and the record formats).
A JSONL file is indexed as the byte offsets of its non-blank lines (the workers read the lines themselves through
a memory map); a JSON array is parsed here element by element, keeping each element's line number for the skip
report.
"""

from __future__ import annotations

import json
import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHUNK_RECORDS, CHUNK_BYTES = 256, 4 << 20  # largest work unit sent to a worker
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.strip() removes
ZERO_WIDTH_CHARS = "\u200b\u200c\u200d\u2060\ufeff"
ZERO_WIDTH = dict.fromkeys(map(ord, ZERO_WIDTH_CHARS))
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "function_call": "assistant",
                  "system": "system", "observation": "observation", "function_response": "observation",
                  "tool": "observation"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "observation": "observation",
                 "tool": "observation"}


class InputError(ValueError):
    """Bad command line, inputs or tokenizer, found before any work starts (all problems in one message)."""


class Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def __reduce__(self):
        return Skip, (self.reason, self.detail)


@dataclass
class Source:
    spec: str  # as given: FILE or FILE:COUNT
    path: Path
    count: int | None
    kind: str = "jsonl"  # jsonl | json
    lines: np.ndarray | None = None  # line number of each record (1-based)
    starts: np.ndarray | None = None  # jsonl: byte offset of each record's line
    ends: np.ndarray | None = None
    items: list | None = None  # json: the parsed records
    blank_lines: int = 0

    @property
    def num_records(self) -> int:
        return len(self.lines)


def check_surrogates(obj) -> None:
    """A lone UTF-16 surrogate escape ("\\ud800") parses in Python but is not Unicode text: skip the record
    rather than let one tokenizer crash on it and another silently replace it."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Skip("invalid_json", "a string holds a lone surrogate escape (\\ud800-\\udfff), not valid Unicode") \
            from None


def _split_spec(spec: str) -> tuple[Path, int | None]:
    m = re.fullmatch(r"(.+):(-?\d+)", spec)
    if m and not Path(spec).exists():
        return Path(m.group(1)), int(m.group(2))
    return Path(spec), None


def _index_jsonl(src: Source) -> None:
    """Byte ranges and line numbers of the non-blank lines, found through a memory map (no line is copied unless
    it starts with whitespace, when it may be blank)."""
    lines, starts, ends, blank = [], [], [], 0
    size = src.path.stat().st_size
    if size:
        with open(src.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            find, pos, n = mm.find, 0, 0
            while pos < size:
                end = find(b"\n", pos) + 1 or size
                n += 1
                if mm[pos] in _WHITESPACE and not mm[pos:end].strip():
                    blank += 1
                else:
                    lines.append(n)
                    starts.append(pos)
                    ends.append(end)
                pos = end
    src.lines, src.blank_lines = np.asarray(lines, np.int64), blank
    src.starts, src.ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)


def _index_json_array(src: Source, text: str) -> None:
    """Parse a JSON array element by element, keeping each element's line number."""
    dec, ws = json.JSONDecoder(), re.compile(r"\s*")
    escapes = "\\ud" in text or "\\uD" in text
    items, lines, line, last = [], [], 1, 0
    i = ws.match(text).end() + 1  # past "["
    while True:
        i = ws.match(text, i).end()
        if i < len(text) and text[i] == "]" and not items:
            break
        line += text.count("\n", last, i)
        last = i
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InputError(f"{src.path}:{e.lineno}:{e.colno}: invalid JSON array ({e.msg}); fix the file or "
                             f"convert it to JSONL, where a bad line is skipped and reported instead") from e
        if escapes:
            try:
                check_surrogates(obj)
            except Skip as bad:
                obj = bad  # reported as this record's skip reason
        items.append(obj)
        lines.append(line)
        i = ws.match(text, i).end()
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] == "]":
            break
        else:
            line += text.count("\n", last, i)
            raise InputError(f"{src.path}:{line}: invalid JSON array (expected ',' or ']'); fix the file")
    src.items, src.lines = items, np.asarray(lines, np.int64)


def index_inputs(specs: list[str], problems: list[str]) -> list[Source]:
    sources = []
    for spec in specs:
        path, count = _split_spec(spec)
        src = Source(spec, path, count)
        if not path.is_file():
            problems.append(f"--input {spec}: no such file")
            continue
        if count is not None and count <= 0:
            problems.append(f"--input {spec}: the sample count must be a positive integer")
            continue
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        try:
            if head.startswith(b"["):
                src.kind = "json"
                _index_json_array(src, path.read_text(encoding="utf-8-sig"))
            else:
                _index_jsonl(src)
        except InputError as e:
            problems.append(str(e))
            continue
        except UnicodeDecodeError as e:
            problems.append(f"--input {spec}: not UTF-8 text ({e})")
            continue
        if src.num_records == 0:
            problems.append(f"--input {spec}: no records (empty file)")
        elif count is not None and count > src.num_records:
            problems.append(f"--input {spec}: asks for {count} records but the file has {src.num_records}")
        sources.append(src)
    return sources


def plan_order(sources: list[Source], seed: int, shuffle: bool) -> np.ndarray:
    """[N, 2] (source index, record index) in output order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    parts = []
    for s, src in enumerate(sources):
        idx = np.arange(src.num_records, dtype=np.int64)
        if src.count is not None:
            idx = np.sort(rng.choice(src.num_records, size=src.count, replace=False))
        parts.append(np.stack([np.full_like(idx, s), idx], axis=1))
    plan = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    return plan[rng.permutation(len(plan))] if shuffle else plan


def iter_chunks(sources: list[Source], plan: np.ndarray, num_proc: int):
    """Cuts the plan into work units: [n, 2] int arrays of (source, record). Units aim at ~16 per process
    (so long-sample data still spreads over all processes), within [64 KB, 4 MB] of text and 256 records."""
    sizes = np.array([1024 if src.kind == "json" else 0 for src in sources], dtype=np.int64)
    rec_bytes = np.empty(len(plan), dtype=np.int64)
    for k, src in enumerate(sources):
        sel = plan[:, 0] == k
        rec_bytes[sel] = (src.ends - src.starts)[plan[sel, 1]] if src.kind == "jsonl" else sizes[k]
    target = int(np.clip(rec_bytes.sum() // (16 * num_proc), 64 << 10, CHUNK_BYTES))
    start, acc = 0, 0
    for i, nbytes in enumerate(rec_bytes.tolist()):
        acc += nbytes
        if acc >= target or i + 1 - start >= CHUNK_RECORDS:
            yield plan[start:i + 1]
            start, acc = i + 1, 0
    if start < len(plan):
        yield plan[start:]


# ----------------------------------------------------------------------------------------------
# Records -> messages
# ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Message:
    role: str  # system | user | assistant | observation
    content: str
    metadata: str = ""
    train: bool = False  # supervised: an assistant reply, not opted out, not empty


def _text(value: Any, where: str) -> str:
    """A content value: a string, or a list of text parts (strings or {"type": "text", "text": ...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for p in value:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise Skip("wrong_schema", f"{where}: content part of type {kind!r}; only text parts are supported")
        return "".join(parts)
    raise Skip("wrong_schema", f"{where}: content must be a string or a list of text parts, "
                               f"got {type(value).__name__}")


def _opted_out(msg: dict, where: str) -> bool:
    if "loss" not in msg and "loss_weight" not in msg:  # the common case, checked first (hot path)
        return False
    loss, weight = msg.get("loss", True), msg.get("loss_weight", 1)
    if not isinstance(loss, bool) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise Skip("wrong_schema", f"{where}: `loss` must be true/false and `loss_weight` a number")
    return loss is False or weight == 0


def _message(role: str, content: str, metadata: str = "", opt_out: bool = False) -> Message:
    if role != "assistant":
        return Message(role, content, metadata, False)
    if not content.isascii() and any(c in content for c in ZERO_WIDTH_CHARS):  # isascii() is O(1)
        content = content.translate(ZERO_WIDTH)
    return Message(role, content, metadata, not opt_out and content != "" and not content.isspace())


def parse_record(obj: Any) -> tuple[str, list[Message]]:
    """(format name, messages) of one record; raises Skip for a record that cannot be used."""
    if not isinstance(obj, dict):
        raise Skip("wrong_schema", f"a record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        fmt, turns, role_key, text_key, roles = "messages", obj["messages"], "role", "content", MESSAGE_ROLES
    elif "conversations" in obj:
        fmt, turns, role_key, text_key, roles = "sharegpt", obj["conversations"], "from", "value", SHAREGPT_ROLES
    elif "instruction" in obj and "output" in obj:
        return "alpaca", _parse_alpaca(obj)
    else:
        raise Skip("wrong_schema", "no `messages`, `conversations` or `instruction`+`output` field "
                                   f"(keys: {', '.join(sorted(obj))[:200]})")
    if not isinstance(turns, list) or not turns:
        raise Skip("wrong_schema", f"`{'messages' if fmt == 'messages' else 'conversations'}` must be a "
                                   "non-empty list")
    out = []
    if fmt == "sharegpt" and obj.get("system"):
        out.append(_message("system", _text(obj["system"], "system")))
    for i, m in enumerate(turns):
        where = f"message {i}"
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise Skip("wrong_schema", f"{where}: must be an object with `{role_key}` and `{text_key}`")
        role = roles.get(m[role_key]) if isinstance(m[role_key], str) else None
        if role is None:
            raise Skip("unknown_role", f"{where}: role {m[role_key]!r}; expected one of {', '.join(sorted(roles))}")
        metadata = m.get("metadata") or ""
        if not isinstance(metadata, str):
            raise Skip("wrong_schema", f"{where}: `metadata` must be a string")
        out.append(_message(role, _text(m[text_key], where), metadata, _opted_out(m, where)))
    return fmt, out


def _parse_alpaca(obj: dict) -> list[Message]:
    get = obj.get
    instruction, query_input, output, system = (get("instruction") or "", get("input") or "", get("output") or "",
                                                get("system") or "")
    history = get("history") or []
    if not (isinstance(instruction, str) and isinstance(query_input, str) and isinstance(output, str)
            and isinstance(system, str) and isinstance(history, list)) or history and not all(
            isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
        raise Skip("wrong_schema", "alpaca: instruction/input/output/system must be strings and history a list "
                                   "of [query, reply] pairs")
    out = [Message("system", system)] if system else []
    for q, a in history:
        out += (Message("user", q), _message("assistant", a))
    query = instruction + "\n" + query_input if query_input else instruction
    out += (Message("user", query), _message("assistant", output, opt_out=_opted_out(obj, "record")))
    return out
