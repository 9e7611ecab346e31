"""Chat data -> tokenized dataset: everything `pre_tokenize.py` (and its front ends `pre_tokenize_glm4.py`,
`pre_tokenize_llama3.py`) runs, whatever the template.

Templates differ only in a *chat format* object (longsft/templates/registry.py looks one up by name in patch/families.py) that
turns a parsed conversation into (input_ids, labels); this module does the rest:

1. Inputs: JSONL files or JSON arrays (detected by the first character, not the extension). Several files can be
   mixed with a per-file sample count, `--input general.jsonl LongAlign-10k.jsonl:5000` (a random subset of
   5000 records of the second file, drawn with `--seed`); the mixed list is shuffled with `--seed`
   (`--no_shuffle` keeps file order). A file given twice is refused unless every mention has a count (then its
   records are drawn that many times on purpose). A UTF-8 BOM is allowed. Both formats are indexed without holding
   the records in memory; JSONL is preferred for very large inputs (a bad line is skipped, not fatal). Indexing
   and work units: longsft/data/inputs.py.
2. Records, format detected per record (parsed by longsft.data.inputs.parse_record):
   - messages: {"messages": [{"role": "system"|"user"|"assistant"|"observation", "content": str | [parts],
     "metadata": str (optional, GLM-4), "loss": false | "loss_weight": 0 (optional opt-out)}]}
   - ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system"|"observation"|"function_call"|..., "value": str}],
     "system": str (optional)}
   - Alpaca:   {"instruction": str, "input": str, "output": str, "system": str, "history": [[q, a], ...]}
   Only assistant replies are supervised; a reply opts out with `"loss": false` or `"loss_weight": 0`.
   Zero-width characters are removed from replies; empty replies are not supervised. Nothing is dropped,
   merged or reordered. `tools` fields are rendered only by template auto (longsft/templates/auto.py reads the records
   itself: tool calls, tool results, tools, reasoning).
3. Every selected record ends up either in the dataset or in DIR/skipped.jsonl with file, line and one reason:
   invalid_json, wrong_schema, unknown_role, too_long (with --truncate skip), nothing_to_supervise (template auto
   adds template_error and template_rewrites_history). JSON nested deeper than inputs.MAX_JSON_DEPTH levels (in the
   record, or in a `tools` / `function_call` JSON string) is invalid_json: its depth is measured before any parser
   runs, so no record can crash or hang the run.
   `--strict` makes the first three fatal. DIR/report.json has the totals; the first few skips are printed.
4. `--stage dpo`: preference records -> (chosen, rejected) pairs of samples (longsft/data/preference.py's PairFormat
   wraps the template: it encodes whole work units, each side through this module's SFT path, and marks the dataset
   as pairs when it is written).
5. Parallel over `--num_proc` processes (this one and num_proc - 1 workers; bounded in-flight chunks, results
   consumed in input order), so the output is byte-identical for any process count; written through
   `longsft.data.storage.TokenizedWriter`, so an interrupted run (Ctrl-C, SIGTERM, a crash) leaves the previous output intact,
   an --output_dir holding anything but one of our datasets is refused, and a symlinked one is written through.
   A worker that dies (killed, or crashed) stops the run at once with a message naming the input lines it had in
   hand (longsft/data/parallel.py).
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from tqdm.auto import tqdm

from longsft.data.inputs import (InputError, Message, Skip, Source, check_surrogates, describe_lines, index_inputs,
                                iter_chunks, json_depth_problem, parse_record, plan_order)
from longsft.data.parallel import in_order, worker_pool
from longsft.errors import run_cli
from longsft.atomic_dir import (default_signals, describe_removed, signals_as_exit, writable_problem,
                                write_failures_reported)
from longsft.data.storage import IGNORE_INDEX, DatasetFormatError, TokenizedWriter, dataset_replace_problem

try:  # optional: a faster JSON reader for JSONL lines (same results, see _parse)
    import orjson
except ImportError:
    orjson = None

SKIP_REASONS = ("invalid_json", "wrong_schema", "unknown_role", "too_long", "nothing_to_supervise")
BAD_REASONS = ("invalid_json", "wrong_schema", "unknown_role")  # fatal with --strict
SHOW_SKIPS = 5


# ----------------------------------------------------------------------------------------------
# Command line (each entry subclasses this to set its --output_dir default and add its own flags)
# ----------------------------------------------------------------------------------------------

@dataclass
class PretokenizeArguments:
    model_name_or_path: str = field(metadata={"help": "Model folder or hub id; its tokenizer is used."})
    input: list[str] = field(metadata={"help": "JSONL / JSON-array files; FILE:COUNT takes a random subset of COUNT "
                                               "records (with --seed). Example: general.jsonl long.jsonl:5000"})
    output_dir: str = field(default="data/out", metadata={"help": "Dataset folder to write (replaced atomically)."})
    max_length: int = field(default=32768, metadata={"help": "Longest sample in tokens."})
    truncate: Literal["skip", "right", "left"] = field(default="skip", metadata={
        "help": "Samples over --max_length: skip them (listed in skipped.jsonl), cut the end (right), or cut "
                "after the conversation prefix (left)."})
    num_proc: int | None = field(default=None, metadata={"help": "Worker processes (default: CPUs, at most 16). "
                                                                 "The output does not depend on it."})
    seed: int = field(default=42, metadata={"help": "Seed of the FILE:COUNT subsets and the shuffle."})
    shuffle: bool = field(default=True, metadata={"help": "Shuffle the mixed records (--no_shuffle keeps order)."})
    strict: bool = field(default=False, metadata={"help": "Stop at the first invalid JSON / wrong schema / unknown "
                                                          "role line instead of skipping it."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow the tokenizer code shipped inside the model folder to run (never needed for the families of "
                "patch/families.py: their tokenizers load without it)."})
    stage: Literal["sft", "dpo"] = field(default="sft", metadata={
        "help": "sft: conversations -> samples; dpo: preference records (chosen / rejected) -> pairs of samples that "
                "share their prompt, for main.py --stage dpo (longsft/data/preference.py)."})


# ----------------------------------------------------------------------------------------------
# Token parts -> one sample (the chat formats' `assemble` output, joined)
# ----------------------------------------------------------------------------------------------

def join_parts(parts: list[np.ndarray], train: list[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token parts and their supervised flags -> (ids int32[T], supervised bool[T], length of each part)."""
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return ids, np.repeat(np.array(train, dtype=bool), lengths), lengths


def part_labels(ids: np.ndarray, supervised: np.ndarray, part_len: np.ndarray,
                relabel: dict[int, int] | None) -> np.ndarray:
    """Labels int32[T]: the id where supervised, IGNORE_INDEX elsewhere, and `relabel`'s id on the tokens of the
    parts it names (part index -> label id; see ChatFormat)."""
    labels = np.where(supervised, ids, IGNORE_INDEX).astype(np.int32)
    if relabel:
        starts = np.cumsum(part_len) - part_len
        for j, label in relabel.items():
            labels[starts[j]:starts[j] + part_len[j]] = label
    return labels


def token_info(tokenizer, pad_token_id: int | None) -> dict:
    return {"name_or_path": str(tokenizer.name_or_path), "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer), "pad_token_id": pad_token_id,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}


# ----------------------------------------------------------------------------------------------
# Work: one chunk of records -> encoded samples or skip reasons (runs in the worker processes)
# ----------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(chat_format, max_length: int, truncate: str, sources: list[Source]) -> None:
    _WORKER.update(fmt=chat_format, max_length=max_length, truncate=truncate, sources=sources, maps={})


def _init_pool_worker(*init) -> None:
    default_signals()  # a forked worker has nothing to clean up: SIGTERM ends it as usual
    _init_worker(*init)


def _close_worker_files() -> None:
    for m in _WORKER.get("maps", {}).values():
        m.close()
    _WORKER.clear()


def _payloads(unit: np.ndarray) -> list:
    """The unit's records as stored: the raw bytes of JSONL lines or JSON-array elements, read here, in the
    worker, through a memory map of the file."""
    sources, maps, out = _WORKER["sources"], _WORKER["maps"], []
    for s, r in unit.tolist():
        src = sources[s]
        if s not in maps:
            with open(src.path, "rb") as f:
                maps[s] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        out.append(maps[s][src.starts[r]:src.ends[r]])
    return out


def _load_json(payload: bytes):
    """A JSONL line -> a Python object, or Skip("invalid_json"). The standard json module is the reference:
    orjson (when installed; several times faster) is used only where it returns the same object."""
    try:
        text = payload.decode("utf-8")
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Skip("invalid_json", str(e)[:200]) from None
    except RecursionError:  # _parse measured the depth first: only a much lower recursion limit gets here
        raise Skip("invalid_json", "nested too deep for Python's json") from None
    if "\\ud" in text or "\\uD" in text:
        check_surrogates(obj)
    return obj


def _validate(obj, chat_format) -> tuple[str, list[Message]]:
    fmt, messages = getattr(chat_format, "parse_record", parse_record)(obj)  # a format may read records its own way
    roles, train = chat_format.roles, False
    for m in messages:
        if m.role not in roles:
            raise Skip("unknown_role", f"role {m.role!r} has no place in the {chat_format.name} format")
        train = train or m.train
    if not train:
        raise Skip("nothing_to_supervise", "no non-empty assistant reply that is not opted out")
    return fmt, messages


def _parse(payload: bytes, chat_format) -> tuple[str, list[Message]]:
    """Decode and validate one record (raises Skip). Its nesting depth is measured before any parser sees it
    (inputs.json_depth_problem: orjson crashes the process on ~200,000 levels, json raises at ~1,000)."""
    problem = json_depth_problem(payload)
    if problem:
        raise Skip("invalid_json", problem)
    if orjson is not None:
        # orjson accepts only strictly valid JSON (no lone surrogates, NaN, BOM: those fail and take the json
        # path below) but reads integers over 64 bits as floats, which can only change a skip's message; so a
        # record orjson cannot read, or one that is skipped, is redone with json for the reference result.
        try:
            return _validate(orjson.loads(payload), chat_format)
        except (orjson.JSONDecodeError, Skip):
            pass
    return _validate(_load_json(payload), chat_format)


@dataclass
class ChunkResult:
    """What a worker sends back for one work unit (k = record position in the unit)."""
    input_ids: np.ndarray  # int32 [T]  the kept samples, concatenated
    labels: np.ndarray  # int32 [T]  IGNORE_INDEX where not supervised
    lengths: np.ndarray  # int64 [K]  tokens of each kept sample
    supervised: np.ndarray  # int64 [K]  supervised tokens of each kept sample
    kept: np.ndarray  # bool [n]  per record
    truncated: int  # kept samples cut to --max_length
    formats: dict  # record format -> kept samples
    problems: list  # (k, reason, detail) per skipped record, (k, "error", traceback) per bug; by k
    split: tuple = (0, 0, 0)  # records kept as several samples (template auto: --rewritten_replies split), their
    # samples, and their tokens beyond each record's longest sample (the history the extra samples repeat)


def _encode_parts(todo: list, chat_format, problems: list):
    """The generic path of encode_chunk: pieces of all records -> one tokenizer call -> assemble -> joined."""
    texts, items = [], []
    for k, fmt, messages in todo:
        try:
            pieces = chat_format.pieces(messages)
        except Skip as s:
            problems.append((k, s.reason, s.detail))
            continue
        except Exception:
            problems.append((k, "error", traceback.format_exc()))
            continue
        items.append((k, fmt, messages, len(texts), len(pieces)))
        texts += pieces
    try:
        encoded = chat_format.tokenize(texts)
    except Exception:
        error = traceback.format_exc()
        problems += [(k, "error", error) for k, *_ in items]
        items = []

    parts, train, first_part, rows, relabel = [], [], [], [], {}  # rows: (k, fmt) of each assembled sample
    for k, fmt, messages, start, n in items:
        try:
            p, t, *r = chat_format.assemble(messages, encoded[start:start + n])
        except Exception:
            problems.append((k, "error", traceback.format_exc()))
            continue
        if r and r[0]:
            relabel.update({len(parts) + j: label for j, label in r[0].items()})
        first_part.append(len(parts))
        parts += p
        train += t
        rows.append((k, fmt))
    ids, supervised, part_len = join_parts(parts, train)
    labels = part_labels(ids, supervised, part_len, relabel)
    lengths = np.add.reduceat(part_len, first_part) if rows else np.zeros(0, np.int64)
    n_sup = np.add.reduceat(np.where(train, part_len, 0), first_part) if rows else np.zeros(0, np.int64)
    return ids, supervised, labels, lengths, n_sup, rows


def encode_chunk(payloads: list, chat_format, max_length: int, truncate: str) -> ChunkResult:
    """Records -> ChunkResult. The whole chunk is tokenized at once: by the format's `encode_batch` when it has
    one (GLM-4: one tokenizer call), else by `pieces` -> one batch tokenizer call -> `assemble`; labels and
    lengths are made once per chunk with numpy."""
    problems, todo = [], []  # todo: (k, record format, messages) of the records that parsed
    for k, payload in enumerate(payloads):
        try:
            todo.append((k, *_parse(payload, chat_format)))
        except Skip as s:
            problems.append((k, s.reason, s.detail))
        except Exception:  # a bug, not bad data: reported by the main process with the record's location
            problems.append((k, "error", traceback.format_exc()))
    joined = None
    if todo and hasattr(chat_format, "encode_batch"):
        try:
            joined = chat_format.encode_batch([messages for *_, messages in todo])
        except Exception:
            error = traceback.format_exc()
            problems += [(k, "error", error) for k, *_ in todo]
            todo = []
    if joined is not None:
        # skips: per conversation, None (encoded) or a Skip; owners: the conversation of each sample (a format may
        # make several samples of one record); without them, one sample per encoded conversation
        ids, supervised, lengths, *extra = joined
        if extra:
            problems += [(k, s.reason, s.detail) for (k, *_), s in zip(todo, extra[0]) if s is not None]
        owners = extra[1].tolist() if len(extra) > 1 else None
        if extra:
            todo = [t for t, s in zip(todo, extra[0]) if s is None] if owners is None else todo
        labels = np.where(supervised, ids, IGNORE_INDEX).astype(np.int32)
        rows = [(k, fmt) for k, fmt, _ in (todo if owners is None else [todo[o] for o in owners])]
        n_sup = np.add.reduceat(supervised, np.cumsum(lengths) - lengths, dtype=np.int64) if rows \
            else np.zeros(0, np.int64)
    else:
        ids, supervised, labels, lengths, n_sup, rows = _encode_parts(todo, chat_format, problems)

    truncated = 0
    over = np.flatnonzero(lengths > max_length)
    if over.size:  # rare: cut (or drop) those samples' tokens with masks over the joined arrays
        keep_token, keep_row = np.ones(len(ids), bool), np.ones(len(rows), bool)
        starts = np.cumsum(lengths) - lengths
        if truncate == "skip":  # a record is skipped whole: every sample it made
            long = {rows[i][0] for i in over.tolist()}
            over = np.asarray([i for i, (k, _) in enumerate(rows) if k in long], np.int64)
        reported = set()
        for i in over.tolist():
            a, n, k = int(starts[i]), int(lengths[i]), rows[i][0]
            if truncate == "skip":
                keep_token[a:a + n] = False
                keep_row[i] = False
                if k in reported:
                    continue
                reported.add(k)
                n = max(int(lengths[j]) for j, (kk, _) in enumerate(rows) if kk == k)
                problem = (k, "too_long", f"{n} tokens > --max_length {max_length}")
            else:  # keep the first `head` tokens and the last max_length - head
                head = chat_format.prefix_len if truncate == "left" else max_length
                keep_token[a + head:a + n - (max_length - head)] = False
                n_sup[i] = np.count_nonzero(supervised[a:a + n] & keep_token[a:a + n])
                if n_sup[i] > 0:
                    lengths[i] = max_length
                    truncated += 1
                    continue
                problem = (k, "nothing_to_supervise", f"no supervised token left after --truncate {truncate}")
            problems.append(problem)
            keep_token[a:a + n] = False
            keep_row[i] = False
        ids, supervised, labels = ids[keep_token], supervised[keep_token], labels[keep_token]
        lengths, n_sup = lengths[keep_row], n_sup[keep_row]
        rows = [row for row, keep in zip(rows, keep_row.tolist()) if keep]

    kept = np.zeros(len(payloads), bool)
    kept[[k for k, _ in rows]] = True
    formats: dict[str, int] = {}
    for _, fmt in rows:
        formats[fmt] = formats.get(fmt, 0) + 1
    per_record: dict[int, list[int]] = {}
    for (k, _), n in zip(rows, lengths.tolist()):
        per_record.setdefault(k, []).append(n)
    many = [v for v in per_record.values() if len(v) > 1]
    split = (len(many), sum(map(len, many)), sum(sum(v) - max(v) for v in many))
    seen: set = set()  # a kept record is not skipped; a skipped one is reported once
    problems = [p for p in problems if p[1] == "error" or (p[0] not in per_record and not (p[0] in seen
                                                                                           or seen.add(p[0])))]
    return ChunkResult(ids, labels, lengths, n_sup, kept, truncated, formats, sorted(problems, key=lambda p: p[0]),
                       split)


def _work(unit: np.ndarray) -> ChunkResult:
    w = _WORKER
    if hasattr(w["fmt"], "encode_chunk"):  # a format that encodes whole work units itself (preference pairs)
        return w["fmt"].encode_chunk(_payloads(unit), w["max_length"], w["truncate"])
    return encode_chunk(_payloads(unit), w["fmt"], w["max_length"], w["truncate"])


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

def _percentiles(x: np.ndarray) -> dict:
    if x.size == 0:
        return {}
    q = np.percentile(x, [50, 90, 99])
    return {"min": int(x.min()), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "max": int(x.max()), "mean": round(float(x.mean()), 2)}


def _check_output_dir(out: Path, sources: list[Source], problems: list[str]) -> None:
    problem = dataset_replace_problem(out)
    if problem:
        problems.append(f"--output_dir {out}: {problem}; refusing to replace it (replacing deletes everything in "
                        f"it). Move those files elsewhere, or pick another --output_dir.")
    problem = writable_problem(Path(os.path.realpath(out)).parent, f"--output_dir {out}")  # the new copy's place
    if problem:
        problems.append(problem)
    for src in sources:
        if out.resolve() in src.path.resolve().parents:
            problems.append(f"--output_dir {out} contains the input {src.path}; write the dataset elsewhere")


def run(args: PretokenizeArguments, chat_format, template: str, model_family: str, pad_token_id: int | None,
        problems: list[str] | None = None) -> dict:
    """Index inputs, check everything, then encode in parallel and write the dataset. Returns the report."""
    problems = list(problems or [])
    if args.max_length <= chat_format.prefix_len + 1:
        problems.append(f"--max_length {args.max_length} is too small")
    num_proc = args.num_proc if args.num_proc is not None else min(16, os.cpu_count() or 1)
    if num_proc < 1:
        problems.append(f"--num_proc {num_proc}: must be at least 1")
    sources = index_inputs(args.input, problems)
    out_dir = Path(args.output_dir)
    _check_output_dir(out_dir, sources, problems)
    if problems:
        raise InputError("cannot start:\n  - " + "\n  - ".join(problems))

    plan = plan_order(sources, args.seed, args.shuffle)
    tok = chat_format.tokenizer
    meta = {"model_family": model_family, "template": template, "max_length": args.max_length,
            "truncate": args.truncate, "seed": args.seed, "shuffle": args.shuffle, "inputs": list(args.input),
            "tokenizer": token_info(tok, pad_token_id), "stop_token_ids": chat_format.stop_token_ids}
    reasons = SKIP_REASONS + tuple(getattr(chat_format, "skip_reasons", ()))  # and the format's own
    counts = {"kept": 0, "truncated": 0, **{r: 0 for r in reasons}}
    per_file = [{"file": src.spec, "format": src.kind, "records": src.num_records, "blank_lines": src.blank_lines,
                 "selected": 0, "kept": 0, "skipped": 0} for src in sources]
    formats: dict[str, int] = {}
    lengths, supervised, shown = [], [], []
    split = {"records": 0, "samples": 0, "extra_tokens": 0}
    start = time.perf_counter()
    written = {"bytes": 0, "records": 0}  # for the space a failed write needed: extrapolated from the share done
    intact = (f"The previous dataset in {out_dir} is intact (nothing was replaced)" if out_dir.exists() else
              f"Nothing was written to {out_dir}") + "; the unfinished copy was removed."

    def needed() -> int | None:
        return written["bytes"] * len(plan) // written["records"] if written["records"] else None

    # SIGTERM / SIGHUP stop the run like Ctrl-C: the temp folder is removed, the previous output stays; a write that
    # fails for disk reasons (full, file-size limit, read-only) is one message saying so
    with signals_as_exit(), write_failures_reported(f"pre_tokenize.py writing {out_dir}", out_dir, intact, needed), \
            TokenizedWriter(out_dir, meta) as writer, \
            open(writer.tmp_dir / "skipped.jsonl", "w", encoding="utf-8") as skipped, \
            tqdm(total=len(plan), unit="rec", desc=f"pre-tokenize ({num_proc} proc)", mininterval=1.0,
                 dynamic_ncols=True) as bar:
        if writer.swept:
            print("note: " + describe_removed(writer.swept), flush=True)

        def handle(unit: np.ndarray, out: ChunkResult) -> None:
            written["bytes"] += out.input_ids.nbytes + out.labels.nbytes + 8 * len(out.lengths)
            written["records"] += len(unit)
            writer.add_batch(out.input_ids, out.labels, out.lengths)
            lengths.append(out.lengths)
            supervised.append(out.supervised)
            counts["kept"] += len(out.lengths)
            counts["truncated"] += out.truncated
            for key, n in zip(("records", "samples", "extra_tokens"), out.split):
                split[key] += n
            for fmt, n in out.formats.items():
                formats[fmt] = formats.get(fmt, 0) + n
            selected = np.bincount(unit[:, 0], minlength=len(sources)).tolist()
            kept = np.bincount(unit[out.kept, 0], minlength=len(sources)).tolist()
            for pf, n_selected, n_kept in zip(per_file, selected, kept):
                pf["selected"] += n_selected
                pf["kept"] += n_kept
            for k, reason, detail in out.problems:
                s, r = unit[k].tolist()
                line = int(sources[s].lines[r])
                where = f"{sources[s].path}:{line}"
                if reason == "error":
                    raise RuntimeError(f"{where}: internal error while encoding this record "
                                       f"(please report it):\n{detail}")
                if args.strict and reason in BAD_REASONS:
                    raise InputError(f"{where}: {reason}: {detail} (--strict; fix the line or drop --strict)")
                counts[reason] += 1
                per_file[s]["skipped"] += 1
                skipped.write(json.dumps({"file": str(sources[s].path), "line": line, "reason": reason,
                                          "detail": detail}, ensure_ascii=False) + "\n")
                if len(shown) < SHOW_SKIPS:
                    shown.append(f"  {where}: {reason}: {detail}")
            bar.update(len(unit))

        units = iter_chunks(sources, plan, num_proc)
        init = (chat_format, args.max_length, args.truncate, sources)
        # What is alive now (modules, tokenizer, index) lives through the run: keep the garbage collector's full
        # passes off it. One pass walked ~200k objects (0.12 s), and in a forked worker it would also copy every
        # page it touched.
        gc.freeze()
        try:
            if num_proc == 1:
                _init_worker(*init)
                try:
                    for unit in units:
                        handle(unit, _work(unit))
                finally:
                    _close_worker_files()
            else:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker process
                with worker_pool(num_proc - 1, _init_pool_worker, init) as pool:
                    _init_worker(*init)  # this process is the num_proc-th encoder
                    try:
                        for unit, out in in_order(pool, units, num_proc, _work,
                                                  lambda lost: describe_lines(sources, lost), intact):
                            handle(unit, out)
                    finally:
                        _close_worker_files()
        finally:
            gc.unfreeze()

        lengths_a = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        sup_a = np.concatenate(supervised) if supervised else np.zeros(0, np.int64)
        n_skipped = sum(counts[r] for r in reasons)
        report = {
            "lines_read": len(plan), "samples_kept": counts["kept"], "truncated": counts["truncated"],
            "skipped_total": n_skipped, "skipped": {r: counts[r] for r in reasons},
            "formats": dict(sorted(formats.items())), "tokens": int(lengths_a.sum()),
            "supervised_tokens": int(sup_a.sum()), "length_percentiles": _percentiles(lengths_a),
            "supervised_percentiles": _percentiles(sup_a), "inputs": per_file,
            "max_length": args.max_length, "truncate": args.truncate,
        }
        if split["records"]:  # records trained as several samples: lines_read = samples_kept - extra + skipped
            report["split"] = {**split, "extra_samples": split["samples"] - split["records"]}
        if counts["kept"] == 0:
            raise InputError(f"no sample left to write (all {len(plan)} records skipped: {report['skipped']}); "
                             f"the first skips:\n" + "\n".join(shown))
        if hasattr(chat_format, "finish"):  # preference pairs: pairs.bin, meta.json's stage, the report's pairs
            chat_format.finish(writer, report)
        writer.write_json("report.json", report)
        skipped.close()
        try:
            writer.commit()
        except DatasetFormatError as e:  # files appeared in --output_dir while this run worked
            raise InputError(f"--output_dir {out_dir}: {e}") from None

    elapsed = time.perf_counter() - start
    print_report(report, shown, out_dir, elapsed)
    return report


def print_report(report: dict, shown: list[str], out_dir: Path, elapsed: float) -> None:
    pct = report["length_percentiles"]
    lines = [
        f"wrote {out_dir}: {report['samples_kept']} samples, {report['tokens']:,} tokens "
        f"({report['supervised_tokens']:,} supervised) in {elapsed:.1f}s "
        f"({report['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s)",
        f"  records read {report['lines_read']}, kept {report.get('pairs_kept', report['samples_kept'])}, "
        f"truncated {report['truncated']}, "
        f"skipped {report['skipped_total']} " + str({k: v for k, v in report["skipped"].items() if v}),
        f"  formats {report['formats']}; length min/p50/p90/p99/max "
        f"{pct['min']}/{pct['p50']:.0f}/{pct['p90']:.0f}/{pct['p99']:.0f}/{pct['max']}",
    ] + ([f"  {report['split']['records']} records trained as {report['split']['samples']} samples (the chat "
           f"template rewrites earlier replies: --rewritten_replies split), {report['split']['extra_tokens']:,} extra "
           f"tokens"] if "split" in report else [])
    if report.get("pairs_kept") is not None:
        lines.insert(1, f"  preference pairs {report['pairs_kept']} (chosen, rejected: samples 2p, 2p + 1)")
    if shown:
        lines.append(f"  first skipped records (all in {out_dir / 'skipped.jsonl'}):")
        lines += shown
    print("\n".join(lines), flush=True)


def parse_args(dataclass_type, argv: list[str] | None):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_type, allow_abbrev=False)  # exact flag names: no --prefix matching
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def cli(main: Callable[[list[str] | None], Any]) -> None:
    """Run a pre-tokenization script's main(None): a user mistake is one `error:` message, exit status 2."""
    run_cli(main, None)
