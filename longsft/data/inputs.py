"""Chat data inputs: index JSONL / JSON-array files, pick and shuffle records, cut the plan into work units, and
turn one record (messages, ShareGPT or Alpaca) into a list of `Message`s.

Used by longsft/data/pretokenize.py (the pre-tokenization driver; its docstring has the --input syntax and the record formats).
Both formats are indexed without holding the records: a JSONL file as the byte spans of its non-blank lines, a
JSON array as the byte spans of its top-level elements (found by decoding the memory-mapped file a window at a
time, each element once, so a syntax error stops the run before any work with its line and column); the workers
read the records themselves through a memory map. Memory stays flat in the input size for both, but JSONL is
the better format for very large inputs: a bad line is skipped and reported instead of stopping the run, and
indexing it reads no record.
"""

from __future__ import annotations

import json
import mmap
import re
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from longsft.errors import UserError

CHUNK_RECORDS, CHUNK_BYTES = 256, 4 << 20  # largest work unit sent to a worker
MAX_JSON_DEPTH = 100  # deeper JSON is invalid_json: real records (tool schemas included) nest ~10 levels
JSON_WINDOW_BYTES = 4 << 20  # a JSON array is decoded this much at a time (more for a larger element)
BOM = b"\xef\xbb\xbf"
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.strip() removes
ZERO_WIDTH_CHARS = "\u200b\u200c\u200d\u2060\ufeff"
ZERO_WIDTH = dict.fromkeys(map(ord, ZERO_WIDTH_CHARS))
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "function_call": "assistant",
                  "system": "system", "observation": "observation", "function_response": "observation",
                  "tool": "observation"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "observation": "observation",
                 "tool": "observation"}


class InputError(UserError):
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
    starts: np.ndarray | None = None  # byte span of each record: its JSONL line or JSON-array element
    ends: np.ndarray | None = None
    blank_lines: int = 0

    @property
    def num_records(self) -> int:
        return len(self.lines)


# ----------------------------------------------------------------------------------------------
# JSON with bounded nesting: no parser ever sees a record nested deeper than MAX_JSON_DEPTH
# ----------------------------------------------------------------------------------------------

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')  # deleted before counting
_OPEN, _CLOSE = np.zeros(256, np.int8), np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE[[ord("]"), ord("}")]] = 1


def json_depth_problem(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why `data` (JSON text) may not be parsed: nested deeper than `limit` arrays/objects, else None.

    Parsers recurse once per level: Python's json stops at its recursion limit (RecursionError, ~1,000 levels),
    orjson crashes the process (a segfault at ~200,000 levels), and a record that parses still makes every later
    recursive step (templates, copies) deep. So the depth is measured on the text first, without parsing: the
    escaped backslashes and quotes removed, everything but quotes and brackets deleted, the strings (every other
    piece between quotes) dropped, and a cumulative sum over the brackets left. A text with at most `limit`
    opening brackets cannot be deeper (the common case: two bytes.count calls)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return None
    if b"\\" in raw:  # backslashes occur only in strings: an escaped quote is not a string's end
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(raw.translate(None, _NOT_STRUCTURE).split(b'"')[0::2])
    code = np.frombuffer(outside, np.uint8)
    depth = int(np.cumsum(_OPEN[code] - _CLOSE[code], dtype=np.int64).max(initial=0))
    if depth <= limit:
        return None
    return f"nested {depth:,} levels deep (arrays/objects; at most {limit} are read, real records nest ~10)"


def load_json(data: bytes | str, where: str = ""):
    """json.loads with bounded nesting: Skip("invalid_json") for text nested deeper than MAX_JSON_DEPTH (`where`
    names the field in the detail); a text that is not JSON raises ValueError, for the caller's own message."""
    problem = json_depth_problem(data)
    if problem:
        raise Skip("invalid_json", f"{where}: {problem}" if where else problem)
    return json.loads(data)


def check_surrogates(obj) -> None:
    """A lone UTF-16 surrogate escape ("\\ud800") parses in Python but is not Unicode text: skip the record
    rather than let one tokenizer crash on it and another silently replace it."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Skip("invalid_json", "a string holds a lone surrogate escape (\\ud800-\\udfff), not valid Unicode") \
            from None


def _index_jsonl(src: Source) -> None:
    """Byte ranges and line numbers of the non-blank lines, found through a memory map (no line is copied unless
    it starts with whitespace, when it may be blank)."""
    lines, starts, ends, blank = [], [], [], 0
    size = src.path.stat().st_size
    if size:
        with open(src.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            find, pos, n = mm.find, len(BOM) if mm[:len(BOM)] == BOM else 0, 0  # a BOM is not part of line 1
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


def _index_json_array(src: Source, mm) -> None:
    """Byte spans and line numbers of a JSON array's top-level elements, read through the memory map `mm` a window
    at a time: each element is decoded once (to find where it ends and that it is valid JSON) and dropped. An
    element that does not fit in the rest of the window is decoded again in a window twice as large."""
    dec, ws, size = json.JSONDecoder(), re.compile(r"\s*"), len(mm)
    bom = len(BOM) if mm[:len(BOM)] == BOM else 0
    starts, ends, lines = array("q"), array("q"), array("q")
    w = {"text": "", "base": bom, "bytes": 0, "end": False, "ci": 0, "bi": bom}  # the window: text from byte base

    def load(byte: int, want: int) -> str:
        """Make the window the text from `byte` for about `want` bytes, cut at a character boundary."""
        end = min(size, byte + want)
        while end < size and mm[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: on to the next character start
            end += 1
        try:
            text = mm[byte:end].decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"--input {src.spec}: not UTF-8 text (byte {byte + e.start}: {e.reason})") from None
        w.update(text=text, base=byte, bytes=end - byte, end=end == size, ascii=text.isascii(), ci=0, bi=byte)
        return text

    def byte_of(j: int) -> int:
        """File offset of character j of the window (j never decreases within a window)."""
        if w["ascii"]:
            return w["base"] + j
        w["bi"] += len(w["text"][w["ci"]:j].encode("utf-8"))
        w["ci"] = j
        return w["bi"]

    def fail(i: int, msg: str):
        text, byte = w["text"], w["base"]
        line_start = max(mm.rfind(b"\n", 0, byte) + 1, bom)
        line = mm[:line_start].count(b"\n") + 1 + text.count("\n", 0, i)
        nl = text.rfind("\n", 0, i)
        col = i - nl if nl >= 0 else len(mm[line_start:byte].decode("utf-8", "replace")) + i + 1
        raise InputError(f"{src.path}:{line}:{col}: invalid JSON array ({msg}); fix the file or convert it to JSONL, "
                         f"where a bad line is skipped and reported instead")

    lead = mm[:4096 + len(BOM)]
    bracket = len(lead) - len(lead.lstrip(b"\xef\xbb\xbf \t\r\n"))  # where index_inputs saw the "["
    text, i = load(bracket + 1, JSON_WINDOW_BYTES), 0
    line, last = 1 + lead.count(b"\n", 0, bracket), 0  # line of character `last` of the window

    def move(i: int, want: int = JSON_WINDOW_BYTES) -> str:
        """Start the window at its character i (counting the lines passed)."""
        nonlocal line, last
        line += w["text"].count("\n", last, i)
        last = 0
        return load(byte_of(i), want)

    while True:
        i = ws.match(text, i).end()
        if i == len(text) and not w["end"]:  # the window ends in blank space: move it on
            text, i = move(i), 0
            continue
        if i < len(text) and text[i] == "]" and not starts:
            break
        line += text.count("\n", last, i)
        last = i
        try:
            try:
                _, j = dec.raw_decode(text, i)
            except RecursionError:  # nested too deep to decode: its span all the same (the worker skips it)
                j = _nested_value_end(text, i)
                if j is None:
                    raise json.JSONDecodeError("unterminated array or object", text, i) from None
            k = ws.match(text, j).end()  # a number cut by the window's end parses too: want the delimiter seen
            cut = not w["end"] and (k == len(text) or text[k] not in ",]")
        except json.JSONDecodeError as e:
            if w["end"]:
                fail(e.pos, e.msg)
            cut = True
        if cut:  # the element may not fit: decode it again from its start, with twice the room it had
            room = w["base"] + w["bytes"] - byte_of(i)
            text, i = move(i, max(JSON_WINDOW_BYTES, 2 * room)), 0
            continue
        starts.append(byte_of(i))
        ends.append(byte_of(j))
        lines.append(line)
        i = ws.match(text, j).end()
        while i == len(text) and not w["end"]:
            text = move(i)
            i = ws.match(text).end()
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] == "]":
            break
        else:
            line += text.count("\n", last, i)
            raise InputError(f"{src.path}:{line}: invalid JSON array (expected ',' or ']'); fix the file")
    rest = ws.match(text, i + 1).end()
    while rest == len(text) and not w["end"]:
        text = move(rest)
        rest = ws.match(text).end()
    if rest < len(text):
        fail(rest, "more content after the closing ']', e.g. a second array; merge them or use JSONL")
    src.starts, src.ends = np.frombuffer(starts, np.int64), np.frombuffer(ends, np.int64)
    src.lines = np.frombuffer(lines, np.int64)


_BRACKET_OR_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def _nested_value_end(text: str, i: int) -> int | None:
    """End of the array or object starting at text[i], found by matching brackets outside strings (no recursion;
    for values too deep for the json decoder), or None when it does not close within `text`."""
    depth = 0
    for m in _BRACKET_OR_STRING.finditer(text, i):
        c = m.group()
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return m.end()
    return None


def _split_spec(spec: str) -> tuple[Path, int | None, str | None]:
    """(path, count, problem) of `FILE` or `FILE:COUNT` (a file whose own name ends in ':N' is taken whole)."""
    m = re.fullmatch(r"(.+):(-?\d+)", spec)
    if m and not Path(spec).exists():
        return Path(m.group(1)), int(m.group(2)), None
    path = Path(spec)
    if not path.exists() and ":" in spec:
        head, tail = spec.rsplit(":", 1)
        if head and Path(head).exists():
            return path, None, (f"{tail!r} after ':' is not a record count. FILE:COUNT takes a random COUNT "
                                f"(a positive whole number) of FILE's records, e.g. {head}:5000; FILE alone takes all")
    return path, None, None


def index_inputs(specs: list[str], problems: list[str]) -> list[Source]:
    """Index every --input (FILE or FILE:COUNT); problems found are appended to `problems`. A file given more than
    once is refused unless every mention has an explicit count (repeating records on purpose)."""
    sources, seen = [], {}  # seen: (device, inode) -> the Sources of that file
    for spec in specs:
        path, count, problem = _split_spec(spec)
        src = Source(spec, path, count)
        if problem:
            problems.append(f"--input {spec}: {problem}")
            continue
        if path.is_dir():
            problems.append(f"--input {spec}: is a folder, not a file; pass the JSONL / JSON files in it "
                            f"(e.g. {str(path).rstrip('/')}/*.jsonl), or FILE:COUNT for a random subset of one")
            continue
        if not path.is_file():
            problems.append(f"--input {spec}: no such file (an input is FILE, or FILE:COUNT for a random subset)")
            continue
        if count is not None and count <= 0:
            problems.append(f"--input {spec}: the sample count must be a positive integer")
            continue
        st = path.stat()
        same = seen.setdefault((st.st_dev, st.st_ino), [])
        if same:  # indexed already: share the index
            src.kind, src.lines, src.starts, src.ends = same[0].kind, same[0].lines, same[0].starts, same[0].ends
            src.blank_lines = same[0].blank_lines
        else:
            with open(path, "rb") as f:
                head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            try:
                if head.startswith(b"["):
                    src.kind = "json"
                    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                        _index_json_array(src, mm)
                else:
                    _index_jsonl(src)
            except InputError as e:
                problems.append(str(e))
                continue
        same.append(src)
        if src.num_records == 0:
            problems.append(f"--input {spec}: no records (empty file)")
        elif count is not None and count > src.num_records:
            problems.append(f"--input {spec}: asks for {count} records but the file has {src.num_records}")
        sources.append(src)
    for same in seen.values():
        if len(same) > 1 and any(s.count is None for s in same):
            n, name = same[0].num_records, same[0].path
            problems.append(f"--input {' '.join(s.spec for s in same)}: the same file {len(same)} times, so its "
                            f"records would be used {len(same)} times; give it once, or repeat it on purpose with "
                            f"a count on every mention (e.g. {name}:{n} {name}:{n} for all {n} records twice)")
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
    (so long-sample data still spreads over all processes), within [64 KB, 4 MB] of text and 256 records. The
    last ~2 units' worth per process is cut 4 times finer, so the processes finish nearly together (with whole
    units, one waited up to two units for the slowest)."""
    rec_bytes = np.empty(len(plan), dtype=np.int64)
    for k, src in enumerate(sources):
        sel = plan[:, 0] == k
        rec_bytes[sel] = (src.ends - src.starts)[plan[sel, 1]]
    total = int(rec_bytes.sum())
    target = int(np.clip(total // (16 * num_proc), 64 << 10, CHUNK_BYTES))
    records = CHUNK_RECORDS
    unit = min(target, CHUNK_RECORDS * total // max(len(plan), 1))  # the bytes of a typical unit
    left = total  # bytes not yet in a unit
    start, acc = 0, 0
    for i, nbytes in enumerate(rec_bytes.tolist()):
        acc += nbytes
        if acc >= target or i + 1 - start >= records:
            yield plan[start:i + 1]
            left -= acc
            start, acc = i + 1, 0
            if records == CHUNK_RECORDS and left <= 2 * num_proc * unit:  # the tail: finer units
                target, records = max(target // 4, 1), max(records // 4, 1)
    if start < len(plan):
        yield plan[start:]


def describe_lines(sources: list[Source], units: list[np.ndarray]) -> str:
    """Where the records of these work units are, per input file: "FILE lines A-B", or "FILE: N lines: a, b, ..."
    when they are not consecutive (a shuffled plan)."""
    both = np.concatenate(units)
    spans = []
    for s in np.unique(both[:, 0]).tolist():
        lines = np.unique(sources[s].lines[both[both[:, 0] == s, 1]]).tolist()
        if lines[-1] - lines[0] + 1 == len(lines):
            spans.append(f"{sources[s].path} lines {lines[0]}-{lines[-1]}")
        else:
            spans.append(f"{sources[s].path}: {len(lines)} lines: {', '.join(map(str, lines[:8]))}"
                         + (f" and {len(lines) - 8} more" if len(lines) > 8 else ""))
    return "; ".join(spans)


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
