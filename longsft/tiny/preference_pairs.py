"""Preference pairs the project generates itself (no hub dataset): LongWriter-style writing tasks whose chosen reply
meets the requested length and stays on topic, and whose rejected reply fails in one of three ways (too short, off
topic, or looping). For the CPU quickstart (`STAGE=dpo`), the DPO benchmark (long-tailed pair lengths) and tests.

    python tools/make_tiny.py pairs --out /tmp/pairs.jsonl --num_pairs 64 --max_words 300
    python tools/make_tiny.py pairs --out /tmp/pairs.jsonl --formats mixed     # messages, trl and sharegpt records

    from longsft.tiny.preference_pairs import make_preference_pairs
    make_preference_pairs("/tmp/pairs.jsonl", num_pairs=64, seed=0)

Each record asks for about N words on a topic; N is drawn long-tailed between --min_words and --max_words (most
short, a few long, as LongWriter-6k's output lengths). The chosen reply has N words of sentences about the topic
and a closing line; the rejected one is a two-sentence reply, N words about another topic, or one sentence repeated
to N words. Deterministic in --seed; the file is written to a temp name and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

TOPICS = ["the sea", "a mountain village", "the history of clocks", "learning to cook", "a night train",
          "the life of bees", "an old library", "winter in the city", "building a boat", "the first day of school",
          "a garden in spring", "the northern lights"]
OPENINGS = ["Consider {t}.", "This piece is about {t}.", "Let us look closely at {t}."]
SENTENCES = ["Every part of {t} has a story behind it.", "People who know {t} well speak of it with care.",
             "In the morning, {t} feels quiet and new.", "There is more to {t} than most people notice at first.",
             "Over the years, {t} has changed in small and large ways.", "Details matter when we describe {t}.",
             "Some remember {t} for its sounds, others for its colours.", "A careful writer gives {t} room to breathe.",
             "Questions about {t} often lead to better questions.", "By evening, {t} looks different again."]
CLOSING = "In the end, {t} is worth the time it takes to understand."
FORMATS = ("messages", "trl", "sharegpt")


def _text(rng: np.random.Generator, topic: str, words: int, opening: bool = True) -> str:
    """About `words` words of sentences on `topic`, closing with a conclusion."""
    parts = [OPENINGS[int(rng.integers(len(OPENINGS)))].format(t=topic)] if opening else []
    count = sum(len(p.split()) for p in parts)
    closing = CLOSING.format(t=topic)
    while count + len(closing.split()) < words:
        s = SENTENCES[int(rng.integers(len(SENTENCES)))].format(t=topic)
        parts.append(s[0].upper() + s[1:])
        count += len(s.split())
    return " ".join(parts + [closing])


def make_pair(rng: np.random.Generator, min_words: int, max_words: int) -> tuple[str, str, str, str]:
    """(prompt, chosen, rejected, how the rejected one fails) of one generated writing task."""
    topic = TOPICS[int(rng.integers(len(TOPICS)))]
    words = int(round(min_words * (max_words / min_words) ** (rng.random() ** 2)))  # long-tailed in [min, max]
    prompt = f"Write about {topic} in about {words} words."
    chosen = _text(rng, topic, words)
    kind = ("too_short", "off_topic", "looping")[int(rng.integers(3))]
    if kind == "too_short":
        rejected = f"{topic[0].upper() + topic[1:]} is interesting. That is all."
    elif kind == "off_topic":
        other = TOPICS[(TOPICS.index(topic) + 1 + int(rng.integers(len(TOPICS) - 1))) % len(TOPICS)]
        rejected = _text(rng, other, words)
    else:
        s = SENTENCES[int(rng.integers(len(SENTENCES)))].format(t=topic)
        rejected = " ".join([s[0].upper() + s[1:]] * max(1, words // len(s.split())))
    return prompt, chosen, rejected, kind


def record(prompt: str, chosen: str, rejected: str, fmt: str) -> dict:
    """One pair as a record of `fmt` (pre_tokenize.py --stage dpo reads each of them)."""
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected}
    if fmt == "trl":
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": prompt}], "chosen": {"from": "gpt", "value": chosen},
                "rejected": {"from": "gpt", "value": rejected}}
    raise ValueError(f"record format {fmt!r}: expected one of {FORMATS}")


def make_preference_pairs(out: str | os.PathLike, num_pairs: int = 64, seed: int = 0, min_words: int = 20,
                          max_words: int = 300, formats: str = "messages") -> Path:
    """Write `num_pairs` generated pairs as JSONL to `out` (formats: one of FORMATS, or "mixed": in turn)."""
    if num_pairs < 1 or not 1 <= min_words <= max_words:
        raise ValueError(f"num_pairs {num_pairs} must be >= 1 and 1 <= min_words {min_words} <= max_words {max_words}")
    kinds = FORMATS if formats == "mixed" else (formats,)
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(num_pairs):
            prompt, chosen, rejected, _ = make_pair(rng, min_words, max_words)
            f.write(json.dumps(record(prompt, chosen, rejected, kinds[i % len(kinds)]), ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out
