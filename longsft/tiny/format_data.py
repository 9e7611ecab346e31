"""Chat records whose replies all follow one format a person can see at a glance: the quickstart's training data.

    python -m longsft.tiny.format_data --out /tmp/format.jsonl --n 160     # 160 records, JSONL (messages format)
    python -m longsft.tiny.format_data --out /tmp/f.jsonl --n 4 --hold_out "What is 14 plus 23?"   # tiny check
    python -m longsft.tiny.format_data --out /tmp/pairs.jsonl --n 96 --pairs     # preference pairs (STAGE=dpo)
    python -m longsft.tiny.format_data --out /tmp/f.jsonl --test_out /tmp/test.jsonl --test_n 8  # + a test set

Every record is one question (arithmetic, letter counts, comparisons, days and months, in varied wordings) and a
reply in exactly this shape, whatever the question:

    ANSWER: 37
    WORKING: 14 + 23 = 37

A pretrained chat model answers such questions in its own words; after about 20 steps on these records it answers
any of them, and similar ones it never saw, in this shape: the change the quickstart shows before and after training.
Every answer is computed, so the records are correct. Questions equal to a `--hold_out` text are never generated
(the quickstart's before/after prompt stays unseen). With --pairs each record is a preference pair for
`pre_tokenize.py --stage dpo`: the prompt, "chosen" the reply in the format, "rejected" the same answer in plain prose
("14 + 23 = 37, so the answer is 37."): DPO teaches the format without ever seeing an SFT reply. --test_out writes
a held-out test set for `evaluate.py --test_file`: SFT records whose questions are not in --out. The same seed
gives the same files; each is written to a temp file and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Callable, Optional

WORDS = ("garden", "river", "planet", "window", "coffee", "silver", "market", "dragon", "pencil", "forest", "bridge",
         "candle", "rocket", "island", "orange", "basket", "camera", "ladder", "mirror", "thunder", "blanket",
         "harbor", "kitten", "lantern", "meadow", "anchor", "violin", "tomato", "castle", "winter")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def reply(answer, working: str) -> str:
    """The one reply format every record uses."""
    return f"ANSWER: {answer}\nWORKING: {working}"


def plain_reply(answer, working: str) -> str:
    """The same answer in plain prose, as a chat model writes it unprompted: the rejected side of a pair."""
    return f"{working}, so the answer is {answer}."


def _add(r: random.Random) -> tuple[str, tuple]:
    a, b = r.randint(2, 60), r.randint(2, 60)
    q = r.choice((f"What is {a} plus {b}?", f"Add {a} and {b}.", f"How much is {a} + {b}?",
                  f"If I have {a} apples and get {b} more, how many do I have?"))
    return q, (a + b, f"{a} + {b} = {a + b}")


def _subtract(r: random.Random) -> tuple[str, tuple]:
    a, b = r.randint(20, 99), r.randint(1, 19)
    q = r.choice((f"What is {a} minus {b}?", f"Subtract {b} from {a}.", f"How much is {a} - {b}?",
                  f"A shelf holds {a} books and {b} are taken away. How many are left?"))
    return q, (a - b, f"{a} - {b} = {a - b}")


def _multiply(r: random.Random) -> tuple[str, tuple]:
    a, b = r.randint(2, 12), r.randint(2, 12)
    q = r.choice((f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"How much is {a} x {b}?",
                  f"There are {a} boxes with {b} pens in each. How many pens are there?"))
    return q, (a * b, f"{a} x {b} = {a * b}")


def _letters(r: random.Random) -> tuple[str, tuple]:
    w = r.choice(WORDS)
    q = r.choice((f"How many letters are in the word '{w}'?", f"Count the letters of \"{w}\".",
                  f"How long is the word {w}, in letters?"))
    return q, (len(w), "-".join(w) + f" has {len(w)} letters")


def _larger(r: random.Random) -> tuple[str, tuple]:
    a, b = r.sample(range(10, 200), 2)
    q = r.choice((f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?",
                  f"Is {a} greater than {b}?"))
    if q.startswith("Is "):
        return q, ("yes" if a > b else "no", f"{a} {'>' if a > b else '<'} {b}")
    big, small = max(a, b), min(a, b)
    return q, (big, f"{big} > {small}")


def _next_day(r: random.Random) -> tuple[str, tuple]:
    seq = r.choice((DAYS, MONTHS))
    i = r.randrange(len(seq))
    nxt = seq[(i + 1) % len(seq)]
    kind = "day" if seq is DAYS else "month"
    q = r.choice((f"What {kind} comes after {seq[i]}?", f"Which {kind} follows {seq[i]}?"))
    return q, (nxt, f"{seq[i]} -> {nxt}")


TASKS: tuple[Callable[[random.Random], tuple[str, tuple]], ...] = (_add, _subtract, _multiply, _letters, _larger,
                                                                  _next_day)


def _questions(n: int, seed: int, hold_out) -> list[tuple[str, tuple]]:
    """`n` (question, (answer, working)), the tasks taking turns, no question in `hold_out`."""
    r = random.Random(seed)
    out, held = [], {h.strip() for h in hold_out}
    while len(out) < n:
        question, answer = TASKS[len(out) % len(TASKS)](r)
        if question.strip() not in held:
            out.append((question, answer))
    return out


def records(n: int, seed: int = 0, hold_out: tuple[str, ...] = (), pairs: bool = False) -> list[dict]:
    """`n` records {"messages": [user, assistant]}; with `pairs`, preference pairs {"messages": [user], "chosen":
    the formatted reply, "rejected": the same answer in plain prose} (pre_tokenize.py --stage dpo)."""
    out = []
    for question, answer in _questions(n, seed, hold_out):
        user = {"role": "user", "content": question}
        if pairs:
            out.append({"messages": [user], "chosen": reply(*answer), "rejected": plain_reply(*answer)})
        else:
            out.append({"messages": [user, {"role": "assistant", "content": reply(*answer)}]})
    return out


def held_out_records(n: int, seed: int, train: list[dict], hold_out: tuple[str, ...] = ()) -> list[dict]:
    """`n` SFT records whose questions are in neither `train` nor `hold_out`: a held-out test set."""
    seen = tuple(rec["messages"][0]["content"] for rec in train)
    return records(n, seed + 1, tuple(hold_out) + seen)


def _write_jsonl(path: str | Path, recs: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in recs:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write(path: str | Path, n: int, seed: int = 0, hold_out: tuple[str, ...] = (), pairs: bool = False) -> Path:
    """`records(n, seed, hold_out, pairs)` as JSONL at `path` (a temp file renamed into place)."""
    return _write_jsonl(path, records(n, seed, hold_out, pairs))


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--n", type=int, default=160, help="number of records")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same file)")
    parser.add_argument("--hold_out", nargs="*", default=[], help="questions never to generate")
    parser.add_argument("--pairs", action="store_true",
                        help="preference pairs (chosen: the format, rejected: plain prose) for pre_tokenize.py "
                             "--stage dpo, instead of SFT records")
    parser.add_argument("--test_out", default=None,
                        help="also write --test_n SFT records whose questions are not in --out (evaluate.py "
                             "--test_file)")
    parser.add_argument("--test_n", type=int, default=8, help="records in --test_out")
    args = parser.parse_args(argv)
    if args.n < 1 or args.test_n < 1:
        parser.error(f"--n {args.n}, --test_n {args.test_n}: each must be at least 1")
    hold_out = tuple(args.hold_out)
    train = records(args.n, args.seed, hold_out, args.pairs)
    out = _write_jsonl(args.out, train)
    print(f"wrote {args.n} {'preference pairs' if args.pairs else 'records'} to {out}")
    if args.test_out:
        test = _write_jsonl(args.test_out, held_out_records(args.test_n, args.seed, train, hold_out))
        print(f"wrote {args.test_n} held-out test records to {test}")
    return out


if __name__ == "__main__":
    from longsft.errors import run_cli

    run_cli(main)
