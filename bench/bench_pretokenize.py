"""Benchmark: pre_tokenize_* against the bare tokenizer on the same text and process count, plus peak memory.

    python bench/bench_pretokenize.py                       # both families, --num_proc 2
    python bench/bench_pretokenize.py --family glm4 --num_proc 4 --repeat 20 --long_samples 200

Text: the real chat files in --data_dir (default ../shared/data: LLaMA-Factory's alpaca_en_demo.json and
glaive_toolcall_en_demo.json) when present, else synthetic text. Two data sets: `short` = those records
(general SFT, ~200 tokens each) repeated --repeat times; `long` = --long_samples conversations whose replies
concatenate real replies to 2k-20k words (the LongWriter shape). Tokenizers: tools/make_tiny.py builders
trained here on the real text (--vocab_size; no downloads), or real folders via --glm4_tokenizer/--llama3_tokenizer.

1. Speed. The ceiling is the tokenizer's own batch encoding of the same message texts, split over the same
   number of processes, with the texts already in memory (GLM-4: tiktoken's `encode_ordinary` over the batch,
   which beats tiktoken's threaded `encode_ordinary_batch` per core; Llama: the Rust tokenizer's
   `encode_batch_fast`, which beats `tokenizer(texts)`). pre_tokenize_* is timed end to end (index the file,
   parse JSON, build labels, write the dataset). Each side runs --trials times and the fastest run counts
   (the machine may be shared). Printed: tokens/s of both and the ratio of wall times (goal >= 0.8).
2. Memory. pre_tokenize_* runs in a fresh process per --max_length on the real records plus 8 conversations
   of 30k words; printed: peak RSS of the main process and of the largest worker. Upstream allocated
   (samples x max_length) arrays; here the peak must not grow with --max_length.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process on both sides


@dataclass
class BenchArguments:
    family: list[str] = field(default_factory=lambda: ["glm4", "llama3"], metadata={"help": "glm4 and/or llama3"})
    num_proc: int = field(default=2, metadata={"help": "processes for both the baseline and pre_tokenize_*"})
    trials: int = field(default=3, metadata={"help": "timed runs per side; the fastest counts"})
    repeat: int = field(default=5, metadata={"help": "copies of the real records in the `short` benchmark file"})
    long_samples: int = field(default=60, metadata={"help": "conversations in the `long` benchmark file"})
    data_dir: str = field(default=str(ROOT.parent / "shared" / "data"), metadata={"help": "real *.json chat files"})
    max_lengths: list[int] = field(default_factory=lambda: [4096, 32768, 131072],
                                   metadata={"help": "--max_length values for the memory runs"})
    vocab_size: int = field(default=32768, metadata={"help": "regular tokens of the tokenizers trained here on the "
                                                                "benchmark text (the real ones have 128k-151k)"})
    glm4_tokenizer: str | None = field(default=None, metadata={"help": "GLM-4 folder (default: trained here)"})
    llama3_tokenizer: str | None = field(default=None, metadata={"help": "Llama-3.1 folder (default: tiny)"})
    work_dir: str | None = field(default=None, metadata={"help": "scratch folder (default: a temp dir)"})


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def load_records(data_dir: Path) -> tuple[list[dict], str]:
    files = sorted(data_dir.glob("*.json")) if data_dir.is_dir() else []
    records = [r for f in files for r in json.loads(f.read_text(encoding="utf-8"))]
    if records:
        return records, f"real: {', '.join(f.name for f in files)} ({len(records)} records)"
    from tools.make_tiny import CORPUS

    rng, words = random.Random(0), CORPUS.split()
    records = [{"instruction": " ".join(rng.choices(words, k=rng.randint(5, 40))),
                "output": " ".join(rng.choices(words, k=rng.randint(50, 600)))} for _ in range(1000)]
    return records, "synthetic (no real data found)"


def long_records(records: list[dict], n: int, min_words: int, max_words: int) -> list[dict]:
    """Long-output conversations (LongWriter-like) made by concatenating real replies, n of them with reply
    lengths spread over [min_words, max_words]."""
    pool = [r["output"] for r in records if isinstance(r.get("output"), str) and r["output"]] or ["lorem ipsum"]
    out, j = [], 0
    for i in range(n):
        target = min_words + (max_words - min_words) * i // max(1, n - 1)
        text, k = [], 0
        while k < target:
            text.append(pool[j % len(pool)])
            k += len(text[-1].split())
            j += 1
        out.append({"messages": [{"role": "user", "content": f"Write about {target} words on topic {i}."},
                                 {"role": "assistant", "content": "\n\n".join(text)}]})
    return out


def usable(records: list[dict], roles: set[str]) -> tuple[list[dict], list[str]]:
    """The records a chat format accepts (Llama has no `observation` role) and their text (messages joined),
    which is what the bare tokenizer encodes."""
    import chat_data

    keep, texts = [], []
    for r in records:
        try:
            messages = chat_data.parse_record(r)[1]
        except chat_data.Skip:
            continue
        if all(m.role in roles for m in messages):
            keep.append(r)
            texts.append("\n".join(m.content for m in messages))
    return keep, texts


# ----------------------------------------------------------------------------------------------
# Baseline: the bare tokenizer's batch encoding, split over num_proc processes
# ----------------------------------------------------------------------------------------------

_TOK = {}


def load_tokenizer(family: str, path: str):
    if family == "glm4":
        from patch.tokenization_chatglm import ChatGLM4Tokenizer

        return ChatGLM4Tokenizer.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _bare_init(family: str, path: str) -> None:
    tok = load_tokenizer(family, path)
    if family == "glm4":
        encode = tok.tokenizer.encode_ordinary
        _TOK["encode"] = lambda texts: [encode(t) for t in texts]  # faster than tiktoken's threaded batch
    else:
        backend = tok.backend_tokenizer  # the Rust tokenizer itself: faster than tokenizer(texts)
        _TOK["encode"] = lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _bare_work(texts: list[str]) -> int:
    enc = _TOK["encode"]
    return sum(len(ids) for i in range(0, len(texts), 256) for ids in enc(texts[i:i + 256]))


def bench_bare(family: str, path: str, texts: list[str], num_proc: int) -> tuple[int, float]:
    shards = [texts[i::num_proc] for i in range(num_proc)]
    ctx = get_context("fork")
    with ctx.Pool(num_proc, initializer=_bare_init, initargs=(family, path)) as pool:
        pool.map(_bare_work, [["warm up"]] * num_proc)  # tokenizer loaded in every worker before timing
        start = time.perf_counter()
        tokens = sum(pool.map(_bare_work, shards))
        return tokens, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# pre_tokenize_* runs
# ----------------------------------------------------------------------------------------------

def script_argv(family: str, path: str, src: Path, out: Path, num_proc: int, max_length: int) -> list[str]:
    argv = ["--model_name_or_path", path, "--input", str(src), "--output_dir", str(out),
            "--num_proc", str(num_proc), "--max_length", str(max_length)]
    return argv + (["--template", "llama3"] if family == "llama3" else [])


def bench_script(family: str, path: str, src: Path, out: Path, num_proc: int) -> tuple[int, float]:
    import pre_tokenize_glm4
    import pre_tokenize_llama3

    main = pre_tokenize_glm4.main if family == "glm4" else pre_tokenize_llama3.main
    start = time.perf_counter()
    report = main(script_argv(family, path, src, out, num_proc, 1 << 30))
    return report["tokens"], time.perf_counter() - start


MEASURE = """
import resource, sys, contextlib, io
sys.path.insert(0, {root!r})
import pre_tokenize_{family} as m
with contextlib.redirect_stdout(io.StringIO()):
    rep = m.main({argv!r})
print(rep["samples_kept"], rep["skipped"]["too_long"], rep["tokens"],
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_memory(family: str, path: str, src: Path, out: Path, num_proc: int, max_length: int) -> list[int]:
    code = MEASURE.format(root=str(ROOT), family=family, argv=script_argv(family, path, src, out, num_proc, max_length))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [int(x) for x in res.stdout.split()]


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    from tools.make_tiny import make_glm4_tokenizer, make_llama3_tokenizer

    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        tmp = Path(tmp)
        records, origin = load_records(Path(args.data_dir))
        print(f"data: {origin}; {os.cpu_count()} CPUs, --num_proc {args.num_proc}")
        corpus = usable(records, {"system", "user", "assistant", "observation"})[1]
        paths = {"glm4": args.glm4_tokenizer or str(make_glm4_tokenizer(tmp / "tok_glm4", args.vocab_size, corpus)),
                 "llama3": args.llama3_tokenizer
                 or str(make_llama3_tokenizer(tmp / "tok_llama3", args.vocab_size, corpus))}
        for family, path in paths.items():
            print(f"{family} tokenizer: {path} ({len(load_tokenizer(family, path)):,} tokens)")
        sets = {"short": records * args.repeat,  # general SFT: the real records as they are
                "long": long_records(records, args.long_samples, 2000, 20000)}  # long outputs, 2k-20k words

        print("\nspeed (same text, same process count; fastest of --trials runs each)")
        print(f"{'family':8} {'data':6} {'records':>8} {'MB':>6} {'bare tokens/s':>14} {'pre_tokenize tokens/s':>22} "
              f"{'bare s':>7} {'ours s':>7} {'speed ratio':>12}")
        for family in args.family:
            roles = {"system", "user", "assistant"} | ({"observation"} if family == "glm4" else set())
            for name, recs in sets.items():
                data, texts = usable(recs, roles)
                src = tmp / f"bench_{family}_{name}.jsonl"
                src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
                bare_tokens, bare_s = min((bench_bare(family, paths[family], texts, args.num_proc)
                                           for _ in range(args.trials)), key=lambda r: r[1])
                with contextlib.redirect_stdout(io.StringIO()):
                    ours_tokens, ours_s = min((bench_script(family, paths[family], src, tmp / "out", args.num_proc)
                                               for _ in range(args.trials)), key=lambda r: r[1])
                print(f"{family:8} {name:6} {len(data):8} {src.stat().st_size / 1e6:6.1f} {bare_tokens / bare_s:14,.0f} "
                      f"{ours_tokens / ours_s:22,.0f} {bare_s:7.2f} {ours_s:7.2f} {bare_s / ours_s:11.2f}x", flush=True)

        long_src = tmp / "bench_memory.jsonl"
        long_src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                    for r in records + long_records(records, 8, 30000, 30000)), encoding="utf-8")
        print("\npeak memory (fresh process per run; the real records + 8 conversations of 30k words)")
        print(f"{'family':8} {'max_length':>10} {'kept':>6} {'too_long':>8} {'tokens':>11} "
              f"{'main MB':>8} {'worker MB':>10}")
        for family in args.family:
            for max_length in args.max_lengths:
                kept, too_long, tokens, rss_main, rss_child = peak_memory(
                    family, paths[family], long_src, tmp / f"mem_{family}", args.num_proc, max_length)
                print(f"{family:8} {max_length:10} {kept:6} {too_long:8} {tokens:11,} {rss_main / 1024:8.0f} "
                      f"{rss_child / 1024:10.0f}", flush=True)


if __name__ == "__main__":
    main()
