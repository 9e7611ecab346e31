"""Preference pairs for `pre_tokenize.py --stage dpo`: records in the users' formats -> (chosen, rejected) samples
that share one prompt, rendered by the chosen template (every template, `auto` included). No torch.

    python pre_tokenize.py --stage dpo --model_name_or_path /tmp/tiny-llama3 --input pairs.jsonl \\
        --output_dir /tmp/pairs --max_length 4096
    python tools/make_tiny.py pairs --out /tmp/pairs.jsonl          # the project's generated pairs (a CPU demo)

Records (JSONL or a JSON array, FILE:COUNT, as for SFT; the format is found per record):
- messages:  {"messages": [prompt turns], "chosen": C, "rejected": R, "tools"?: [...]}; C / R: a string (the
             reply), an assistant message {"role": "assistant", "content": ...}, or a list of messages (several
             turns, tool calls and results: every assistant message in it is trained, the others are not);
- trl:       TRL's {"prompt": P, "chosen": C, "rejected": R}: P a string (one user turn) or a list of messages;
             C / R as above; TRL's implicit-prompt form {"chosen": [messages], "rejected": [messages]} (no prompt):
             the messages both lists start with are the prompt (`trl_implicit`);
- sharegpt:  LLaMA-Factory's ShareGPT pairwise {"conversations": [turns], "chosen": {"from": "gpt", "value": ...},
             "rejected": {...}, "system"?: ..., "tools"?: ...} (a turn or a list of turns; function_call turns too);
- alpaca:    LLaMA-Factory's Alpaca pairwise {"instruction", "input"?, "chosen": str, "rejected": str, "system"?,
             "history"?: [[q, a], ...]}.
Assistant turns of the prompt are never trained (their "loss" is set to false).

How a pair is rendered: each side becomes one conversation (the prompt, then the completion as the final reply)
in the record's own layout, and both go through the template's normal path (longsft/data/pretokenize.encode_chunk: the
same parsing, rendering and labels as SFT: the completion is labelled through its end-of-turn token, nothing
before it is); the two samples are then checked to share their prompt token for token (the tokens before the
completion's first label). Pair p is samples 2p (chosen) and 2p + 1 (rejected); DIR/pairs.bin and meta.json's
"stage": "dpo" mark the dataset (longsft/data/storage.py). Skipped with a reason, in skipped.jsonl and the report:
`empty_side` (a side without a non-empty assistant reply), `identical_pair` (the same tokens on both sides),
`prompt_not_prefix` (the template writes the prompt differently before the two completions, or a completion's
tokens merge into the prompt's: LongAlign's whole-conversation formats), and every SFT reason of a side (its detail
says which side). --max_length applies to the pair (chosen + rejected tokens: both go into one pack): `skip`
drops a longer pair (too_long), `right` cuts both completions' ends, the longer first (sort_and_group.py's rule),
`left` cuts the same tokens from the shared prompt after its fixed start (too_long when the prompt is too short).
A side is one sequence: with template auto's `--rewritten_replies split` (the default), a completion of several
replies of which the template rewrites an earlier one would make several samples; that pair is skipped as
template_rewrites_history (`--rewritten_replies unsupervised` keeps it with those replies unsupervised). A final
reply trained as its own sample (Mistral v3 moving the system prompt) is one sample and is kept.
"""

from __future__ import annotations

import json

import numpy as np

from longsft.data.inputs import Skip
from longsft.data.pair_packing import cut_pair
from longsft.data.pretokenize import ChunkResult, _load_json, encode_chunk
from longsft.data.storage import IGNORE_INDEX, mark_pairs

PAIR_SKIP_REASONS = ("empty_side", "identical_pair", "prompt_not_prefix")
NO_LIMIT = 1 << 62
SIDES = ("chosen", "rejected")


# ----------------------------------------------------------------------------------------------
# Records -> two SFT records (one per side) in the record's own layout
# ----------------------------------------------------------------------------------------------

def _unsupervised(turns: list, key: str) -> list:
    """Prompt turns as given, every one marked "loss": false (assistant turns of the prompt are never trained)."""
    if not isinstance(turns, list):
        raise Skip("wrong_schema", f"`{key}` must be a list of turns")
    return [{**t, "loss": False} if isinstance(t, dict) else t for t in turns]


def _completion(value, side: str, turn: str) -> list:
    """A side's completion as a list of turns: `turn` "messages" (role/content) or "sharegpt" (from/value)."""
    if isinstance(value, str):
        value = {"role": "assistant", "content": value} if turn == "messages" else {"from": "gpt", "value": value}
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(t, dict) for t in value):
        raise Skip("wrong_schema", f"`{side}` must be a string, a message or a non-empty list of messages")
    return value


def _has_reply(turns: list, turn: str) -> bool:
    """Whether a completion holds an assistant reply with text or tool calls (else the side is empty)."""
    for t in turns:
        role, text = (t.get("role"), t.get("content")) if turn == "messages" else (t.get("from"), t.get("value"))
        if turn == "messages" and role == "assistant" and (t.get("tool_calls") or _text_of(text).strip()):
            return True
        if turn == "sharegpt" and role in ("gpt", "assistant", "chatgpt", "model", "function_call") \
                and (role == "function_call" or _text_of(text).strip()):
            return True
    return False


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p if isinstance(p, str) else str(p.get("text", "")) if isinstance(p, dict) else ""
                       for p in content)
    return ""


def split_record(obj) -> tuple[str, list[dict]]:
    """(format, [chosen record, rejected record]) of one preference record; raises Skip."""
    if not isinstance(obj, dict):
        raise Skip("wrong_schema", f"a record must be a JSON object, got {type(obj).__name__}")
    if "chosen" not in obj or "rejected" not in obj:
        raise Skip("wrong_schema", "a preference record needs `chosen` and `rejected` (keys: "
                                   f"{', '.join(sorted(obj))[:200]})")
    rest = {k: v for k, v in obj.items() if k not in ("chosen", "rejected", "prompt", "messages", "conversations")}
    if "conversations" in obj:
        fmt, key, turn, prompt = "sharegpt", "conversations", "sharegpt", _unsupervised(obj["conversations"],
                                                                                        "conversations")
    elif "messages" in obj:
        fmt, key, turn, prompt = "messages", "messages", "messages", _unsupervised(obj["messages"], "messages")
    elif "prompt" in obj:
        p = obj["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _unsupervised(p, "prompt")
        fmt, key, turn = "trl", "messages", "messages"
    elif "instruction" in obj:
        return "alpaca", _alpaca_sides(obj, rest)
    elif isinstance(obj["chosen"], list) and isinstance(obj["rejected"], list):
        return "trl_implicit", _implicit_sides(obj, rest)
    else:
        raise Skip("wrong_schema", "no prompt: expected `messages`, `conversations`, `prompt` or `instruction` beside "
                                   "`chosen` / `rejected` (or both as message lists that start with the prompt)")
    sides = []
    for side in SIDES:
        completion = _completion(obj[side], side, turn)
        if not _has_reply(completion, turn):
            raise Skip("empty_side", f"{side}: no non-empty assistant reply")
        sides.append({**rest, key: prompt + completion})
    return fmt, sides


def _implicit_sides(obj: dict, rest: dict) -> list[dict]:
    chosen, rejected = obj["chosen"], obj["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise Skip("wrong_schema", "`chosen` and `rejected` share no prompt messages (TRL's implicit-prompt form "
                                   "needs both to start with the same messages)")
    sides = []
    for side, turns in zip(SIDES, (chosen, rejected)):
        completion = _completion(turns[n:], side, "messages")
        if not _has_reply(completion, "messages"):
            raise Skip("empty_side", f"{side}: no non-empty assistant reply")
        sides.append({**rest, "messages": _unsupervised(turns[:n], "chosen") + completion})
    return sides


def _alpaca_sides(obj: dict, rest: dict) -> list[dict]:
    get = obj.get
    instruction, query_input, system, history = get("instruction") or "", get("input") or "", get("system") or "", \
        get("history") or []
    if not (isinstance(instruction, str) and isinstance(query_input, str) and isinstance(system, str)
            and isinstance(history, list)) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise Skip("wrong_schema", "alpaca: instruction/input/system must be strings and history a list of "
                                   "[query, reply] pairs")
    prompt = [{"role": "system", "content": system}] if system else []
    for q, a in history:
        prompt += [{"role": "user", "content": q}, {"role": "assistant", "content": a, "loss": False}]
    prompt.append({"role": "user", "content": instruction + "\n" + query_input if query_input else instruction})
    rest = {k: v for k, v in rest.items() if k not in ("instruction", "input", "system", "history", "output")}
    sides = []
    for side in SIDES:
        if not isinstance(obj[side], str):
            raise Skip("wrong_schema", f"alpaca: `{side}` must be a string")
        if not obj[side].strip():
            raise Skip("empty_side", f"{side}: empty reply")
        sides.append({**rest, "messages": prompt + [{"role": "assistant", "content": obj[side]}]})
    return sides


# ----------------------------------------------------------------------------------------------
# The pair format: what the pre-tokenization driver runs on each work unit
# ----------------------------------------------------------------------------------------------

class PairFormat:
    """A chat format (longsft/templates/) for preference records: `encode_chunk` turns a work unit of records into
    pair-ordered samples (module docstring); `finish` marks the dataset as pairs. The template's own attributes
    (name, roles, tokenizer, stop tokens, prefix, problems) are the wrapped format's."""

    def __init__(self, chat_format):
        self.inner = chat_format
        for attr in ("name", "roles", "tokenizer", "stop_token_ids", "prefix_len", "problems"):
            setattr(self, attr, getattr(chat_format, attr, None))
        self.skip_reasons = tuple(getattr(chat_format, "skip_reasons", ())) + PAIR_SKIP_REASONS

    def encode_chunk(self, payloads: list, max_length: int, truncate: str) -> ChunkResult:
        problems, sides, records = [], [], []  # records: (k, format) of the records split into two sides
        for k, payload in enumerate(payloads):
            try:
                fmt, pair = split_record(_load_json(payload))
            except Skip as s:
                problems.append((k, s.reason, s.detail))
                continue
            records.append((k, fmt))
            sides += [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in pair]
        encoded = self._encode_sides(sides)  # per side: (ids, labels), or (reason, detail) when skipped
        ids, labels, lengths, supervised, kept, formats, truncated = [], [], [], [], np.zeros(len(payloads), bool), \
            {}, 0
        for n, (k, fmt) in enumerate(records):
            pair = encoded[2 * n:2 * n + 2]
            bad = [(side, got) for side, got in zip(SIDES, pair) if isinstance(got[0], str)]
            if bad:
                side, (reason, detail) = bad[0]
                problems.append((k, reason, f"{side}: {detail}" if reason != "error" else detail))
                continue
            try:
                pair, cut = self._check_pair(pair, max_length, truncate)
            except Skip as s:
                problems.append((k, s.reason, s.detail))
                continue
            for side_ids, side_labels in pair:
                ids.append(side_ids)
                labels.append(side_labels)
                lengths.append(len(side_ids))
                supervised.append(int((side_labels != IGNORE_INDEX).sum()))
            kept[k] = True
            truncated += cut
            formats[fmt] = formats.get(fmt, 0) + 1
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int32))
        return ChunkResult(cat(ids), cat(labels), np.asarray(lengths, np.int64), np.asarray(supervised, np.int64),
                           kept, truncated, formats, sorted(problems, key=lambda p: p[0]))

    def _encode_sides(self, sides: list[bytes]) -> list[tuple]:
        """Each side's one sample (ids, labels) through the SFT path, or its (reason, detail): all sides in one call;
        when a side made several samples (template auto's --rewritten_replies split: a rewritten reply of a
        multi-reply completion), side by side, so that side is named and skipped (a side must be one sequence)."""
        both = encode_chunk(sides, self.inner, NO_LIMIT, "skip")
        if not both.split[0]:
            problem = {j: (reason, detail) for j, reason, detail in both.problems}
            starts, row = np.cumsum(both.lengths) - both.lengths, np.cumsum(both.kept) - 1
            return [problem[j] if j in problem else
                    (both.input_ids[starts[row[j]]:starts[row[j]] + both.lengths[row[j]]],
                     both.labels[starts[row[j]]:starts[row[j]] + both.lengths[row[j]]]) for j in range(len(sides))]
        out = []
        for side in sides:
            one = encode_chunk([side], self.inner, NO_LIMIT, "skip")
            if one.problems:
                out.append(one.problems[0][1:])
            elif len(one.lengths) > 1:
                out.append(("template_rewrites_history", f"the chat template rewrites an earlier reply of this "
                                                         f"completion once later ones follow, so it makes "
                                                         f"{len(one.lengths)} samples; a completion must be one "
                                                         f"sequence (--rewritten_replies unsupervised keeps it, those "
                                                         f"replies unsupervised)"))
            else:
                out.append((one.input_ids, one.labels))
        return out

    def _check_pair(self, pair: list, max_length: int, truncate: str) -> tuple[list, int]:
        """The two samples checked (shared prompt, not identical) and fitted to max_length; (pair, 1 if cut)."""
        (ci, cl), (ri, rl) = pair
        pc, pr = int(np.argmax(cl != IGNORE_INDEX)), int(np.argmax(rl != IGNORE_INDEX))
        if pc != pr or not np.array_equal(ci[:pc], ri[:pr]):
            n = min(pc, pr)
            diff = int(np.argmax(ci[:n] != ri[:n])) if not np.array_equal(ci[:n], ri[:n]) else n
            raise Skip("prompt_not_prefix", f"the prompt's tokens differ before the chosen ({pc} tokens) and the "
                                            f"rejected ({pr}) completion from token {diff} on: the template renders "
                                            f"the prompt differently, or a completion's first characters merge with "
                                            f"it into one token")
        if np.array_equal(ci, ri) and np.array_equal(cl, rl):
            raise Skip("identical_pair", "chosen and rejected are the same tokens")
        total = len(ci) + len(ri)
        if total <= max_length:
            return pair, 0
        if truncate == "skip":
            raise Skip("too_long", f"the pair has {len(ci)} + {len(ri)} = {total} tokens > --max_length {max_length} "
                                   f"(both sides go into one pack)")
        if truncate == "right":
            keep = cut_pair(len(ci), len(ri), max_length)
            pair = [(i[:n], lab[:n]) for (i, lab), n in zip(pair, keep)]
            if any(not (lab[1:] != IGNORE_INDEX).any() for _, lab in pair):
                raise Skip("nothing_to_supervise", f"a completion keeps no supervised token after --truncate right to "
                                                   f"{keep[0]} + {keep[1]} tokens")
            return pair, 1
        cut, start = -(-(total - max_length) // 2), int(self.prefix_len or 0)  # left: from the shared prompt
        if pc - start < cut:
            raise Skip("too_long", f"the pair has {total} tokens > --max_length {max_length} and its prompt "
                                   f"({pc} tokens, {start} kept at its start) is too short to cut {cut} from it")
        return [(np.concatenate([i[:start], i[start + cut:]]), np.concatenate([lab[:start], lab[start + cut:]]))
                for i, lab in pair], 1

    def finish(self, writer, report: dict) -> None:
        """Mark the dataset as pairs (pairs.bin, meta.json) and count them in the report."""
        mark_pairs(writer)
        report.update(stage="dpo", pairs_kept=writer.num_samples // 2)
