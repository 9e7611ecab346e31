"""Benchmark: pre_tokenize_* against the bare tokenizer on the same text and process count, plus peak memory.

    python bench/bench_pretokenize.py                       # both families, --num_proc 2 (about 5 min on 2 cores)
    python bench/bench_pretokenize.py --family glm4 --num_proc 8 --repeat 100 --long_samples 1000
    python bench/bench_pretokenize.py --repeat 2 --long_samples 20 --trials 1 --max_lengths 4096   # quick look
    python bench/bench_pretokenize.py --family qwen2.5 --sections speed turns --long_samples 0   # template auto

Text: the real chat files in --data_dir (default ../shared/data: LLaMA-Factory's alpaca_en_demo.json and
glaive_toolcall_en_demo.json) when present, else synthetic text. Two data sets: `short` = those records
(general SFT, ~200 tokens each) repeated --repeat times (default: ~8M tokens); `long` = --long_samples
conversations whose replies concatenate real replies to 2k-20k words (the LongWriter shape; default ~5M tokens).
Enough text that start-up costs (imports excluded: loading the tokenizer, forking workers, fsync) are a small
part. Tokenizers: tools/make_tiny.py builders trained here on the real text (--vocab_size; no downloads), or
real folders via --glm4_tokenizer/--llama3_tokenizer.

1. Speed. The ceiling ("bare") is the bare tokenizer encoding exactly the texts pre_tokenize_* has to encode
   (the chat format's `pieces` of every record: the message contents, GLM-4 metadata lines, Llama `[INST]`
   wrappers), already in memory, split over the same number of processes, tokenizer loaded before the clock
   starts. GLM-4: tiktoken's `encode_ordinary` per text (faster per core than its threaded
   `encode_ordinary_batch`); Llama: the Rust tokenizer's `encode_batch_fast` over batches of texts (faster than
   `tokenizer(texts)`). pre_tokenize_* runs end to end (load the tokenizer, index the file, read and parse JSON,
   build labels, write and fsync the dataset). Every run is a fresh process; wall time and CPU time (the process
   and its workers) are measured; --trials runs of each, interleaved, fastest counts, spread printed.
   `wall ratio` = bare wall / ours wall on the same text (the goal: >= 0.8); `paired` = the median over trials of
   that ratio within a trial (bare and ours run one after the other), steadier on a machine whose speed drifts.
   `steady` = the wall ratio after subtracting each side's start-up wall time, measured as a run on 20 short
   records.
   pre_tokenize_glm4 does not call tiktoken per text: it encodes a whole work unit in one call (the texts joined
   by special tokens, see GLM4Format.encode_batch), which saves tiktoken's per-call cost. So that this does not
   hide overhead, GLM-4 rows also print `same-trick bare`: bare wall with the same trick (each 256-record batch of
   texts joined by a special token, one call), and ours against it. Template auto encodes each header its texts
   share (the system block up to a special token, auto_tokens.SharedHeaders) once per process, and ASCII texts
   without a normal-form normalizer's pass (TemplateTokens._encode_ids): its rows print the bare tokenizer doing
   the same in that column.
2. Memory. pre_tokenize_* on the real records plus 8 conversations of 30k words, once per --max_length;
   printed: peak RSS of the main process and of the largest worker. Upstream allocated (samples x max_length)
   arrays; here the peak must not grow with --max_length.
3. Template auto (`--family qwen2.5`: Qwen2.5-7B-Instruct's hub template on Qwen's real 151,643 ranks, from
   registry packages, longsft/vocabularies.py). Speed rows as above, where the bare tokenizer encodes each record's
   rendered chat text (rendered before the clock starts: what `auto` renders and encodes). `turns` (--turns):
   one record of N messages (user/assistant rounds) encoded by template auto in this process, with the one
   rendering (single pass, the default where the template allows it) and with every prefix rendered (the method
   before it, quadratic): seconds per record, Qwen2.5's and GLM-Edge's real templates.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process on both sides


@dataclass
class BenchArguments:
    family: list[str] = field(default_factory=lambda: ["glm4", "llama3"], metadata={"help": "glm4 and/or llama3"})
    num_proc: int = field(default=2, metadata={"help": "processes for both the baseline and pre_tokenize_*"})
    trials: int = field(default=3, metadata={"help": "runs per measurement; the fastest counts"})
    repeat: int = field(default=30, metadata={"help": "copies of the real records in the `short` data set"})
    long_samples: int = field(default=360, metadata={"help": "conversations in the `long` data set"})
    data_dir: str = field(default=str(ROOT.parent / "shared" / "data"), metadata={"help": "real *.json chat files"})
    max_lengths: list[int] = field(default_factory=lambda: [4096, 32768, 131072],
                                   metadata={"help": "--max_length values for the memory runs"})
    vocab_size: int = field(default=32768, metadata={"help": "regular tokens of the tokenizers trained here on the "
                                                                "benchmark text (the real ones have 128k-151k)"})
    glm4_tokenizer: str | None = field(default=None, metadata={"help": "GLM-4 folder (default: trained here)"})
    llama3_tokenizer: str | None = field(default=None, metadata={"help": "Llama-3.1 folder (default: trained here)"})
    work_dir: str | None = field(default=None, metadata={"help": "scratch folder (default: a temp dir)"})
    qwen_tokenizer: str | None = field(default=None, metadata={
        "help": "Qwen2.5 tokenizer folder with its chat template (default: built from registry packages)"})
    sections: list[str] = field(default_factory=lambda: ["speed", "memory"],
                                metadata={"help": "speed, memory and/or turns"})
    turns: list[int] = field(default_factory=lambda: [10, 100, 1000, 2000],
                             metadata={"help": "messages per record in the `turns` rows"})


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

ROLES = {"glm4": {"system", "user", "assistant", "observation"}, "llama3": {"system", "user", "assistant"},
         "qwen2.5": {"system", "user", "assistant", "observation"}}


def load_records(data_dir: Path) -> tuple[list[dict], str]:
    files = sorted(data_dir.glob("*.json")) if data_dir.is_dir() else []
    records = [r for f in files for r in json.loads(f.read_text(encoding="utf-8"))]
    if records:
        return records, f"real: {', '.join(f.name for f in files)} ({len(records)} records)"
    from longsft.tiny.tokenizers import CORPUS

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
    """The records a chat format accepts (Llama has no `observation` role) and their text (messages joined;
    the training text of the benchmark tokenizers)."""
    from longsft.data import pretokenize as chat_data

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


def format_texts(records: list[dict], chat_format) -> list[list[str]]:
    """Per record, the texts pre_tokenize_* sends to the tokenizer (what the bare tokenizer encodes); template
    auto: the record's rendered chat text."""
    from longsft.data import pretokenize as chat_data

    if chat_format.name == "auto":
        out = []
        for r in records:
            conv = chat_format._shaped(chat_format.parse_record(r)[1])
            out.append([chat_format._render([t.message for t in conv], conv.tools)[0]])
        return out
    return [chat_format.pieces(chat_data.parse_record(r)[1]) for r in records]


TEMPLATE = {"glm4": "glm4", "llama3": "llama3", "qwen2.5": "auto"}  # the template each family's rows measure
FAMILY = {"glm4": "glm4", "llama3": "llama3", "qwen2.5": "qwen2"}  # the registry family of each


def chat_format_for(family: str, tokenizer):
    from longsft.templates.registry import chat_format

    return chat_format(TEMPLATE[family], tokenizer)


def load_tokenizer(family: str, path: str):
    from longsft.models import load_tokenizer as load

    return load(path, FAMILY[family])


# ----------------------------------------------------------------------------------------------
# One measurement = one fresh child process (`python bench_pretokenize.py _child JSON`)
# ----------------------------------------------------------------------------------------------

_TOK = {}


def _bare_init(family: str, tok, chat_format, trick: bool = False) -> None:
    if family == "glm4" and trick:  # the texts of a batch joined by a special token, one tiktoken call
        encode, sep = tok.tokenizer.encode_to_numpy, chat_format.sep_text
        _TOK["encode"] = lambda texts: [encode(sep.join(texts), allowed_special={sep}, disallowed_special=())]
    elif family == "glm4":
        encode = tok.tokenizer.encode_ordinary
        _TOK["encode"] = lambda texts: [encode(t) for t in texts]
    elif chat_format.name == "auto" and trick:  # each shared header encoded once, as template auto does
        headers = chat_format._headers()
        _TOK["encode"] = lambda texts: headers.encode(texts, chat_format._encode_ids)
    else:  # the Rust tokenizer as pre_tokenize_* configures it (added tokens not matched: plain text; for the
        # rendered text of template auto, the template's special tokens matched)
        backend = chat_format._backend(False) if chat_format.name == "auto" else chat_format.plain._fast()
        _TOK["encode"] = lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _bare_work(records: list[list[str]]) -> int:
    """Encodes the texts of batches of 256 records (the size of pre_tokenize_*'s work units)."""
    enc = _TOK["encode"]
    total = 0
    for i in range(0, len(records), 256):
        total += sum(len(ids) for ids in enc([t for texts in records[i:i + 256] for t in texts]))
    return total


def _peak_rss_mb() -> float:
    """Peak RSS of this process. Linux's ru_maxrss would include the benchmark parent's RSS (it survives the
    fork + exec that started this process); VmHWM starts afresh at exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child(spec: dict) -> dict:
    """Runs one measurement in this (fresh) process; timing starts after the imports."""
    family, path, num_proc = spec["family"], spec["tokenizer"], spec["num_proc"]
    if spec["kind"] in ("bare", "bare_trick"):
        from multiprocessing import get_context

        tok = load_tokenizer(family, path)
        records = [json.loads(x) for x in Path(spec["src"]).read_text(encoding="utf-8").splitlines()]
        chat_format = chat_format_for(family, tok)
        texts = format_texts(records, chat_format)
        _bare_init(family, tok, chat_format, spec["kind"] == "bare_trick")  # before timing; workers inherit it
        wall0, cpu0 = time.perf_counter(), _cpu()
        if num_proc == 1:
            tokens = _bare_work(texts)
        else:
            with get_context("fork").Pool(num_proc) as pool:
                tokens = sum(pool.map(_bare_work, [texts[i::num_proc] for i in range(num_proc)]))
                pool.close()
                pool.join()
        out = {"tokens": tokens}
    else:
        import contextlib
        import io

        from longsft.data.pretokenize import PretokenizeArguments, parse_args
        from longsft.templates.registry import pretokenize

        # what pre_tokenize_glm4.py / pre_tokenize_llama3.py run: the family fixed, its template
        args = parse_args(PretokenizeArguments, ["--model_name_or_path", path, "--input", spec["src"], "--output_dir",
                                                 spec["out"], "--num_proc", str(num_proc), "--max_length",
                                                 str(spec["max_length"])])
        args.template = TEMPLATE[family] if family != "glm4" else None
        wall0, cpu0 = time.perf_counter(), _cpu()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rep = pretokenize(args, family=FAMILY[family])
        out = {"tokens": rep["tokens"], "kept": rep["samples_kept"], "too_long": rep["skipped"]["too_long"]}
    out.update(wall=time.perf_counter() - wall0, cpu=_cpu() - cpu0, rss_main=_peak_rss_mb(),
               rss_worker=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return out


def run_child(spec: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "_child", json.dumps(spec)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"benchmark child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(trials: int, *specs: dict) -> list[dict]:
    """Each spec `trials` times, interleaved (so a busy moment hits all of them): the first run's counts, the
    fastest wall and CPU time, the median wall time (the spread on a shared machine) and every run's wall time
    (`walls`, in trial order: runs of one trial ran one after the other)."""
    runs = [[] for _ in specs]
    for _ in range(trials):
        for k, spec in enumerate(specs):
            runs[k].append(run_child(spec))
    return [{**r[0], "wall": min(x["wall"] for x in r), "cpu": min(x["cpu"] for x in r),
             "wall_median": sorted(x["wall"] for x in r)[len(r) // 2], "walls": [x["wall"] for x in r]} for r in runs]


def paired_ratio(a: dict, b: dict) -> float:
    """The median over trials of a's wall / b's wall in the same trial: on a machine whose speed drifts between
    trials, steadier than the ratio of the two fastest runs (which may come from different trials)."""
    return statistics.median(x / y for x, y in zip(a["walls"], b["walls"]))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    from longsft.tiny.tokenizers import make_glm4_tokenizer, make_llama3_tokenizer

    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        tmp = Path(tmp)
        records, origin = load_records(Path(args.data_dir))
        print(f"data: {origin}; {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), "
              f"--num_proc {args.num_proc}")
        corpus = usable(records, ROLES["glm4"])[1]
        paths = {}
        if "glm4" in args.family:
            paths["glm4"] = args.glm4_tokenizer or str(make_glm4_tokenizer(tmp / "tok_glm4", args.vocab_size, corpus))
        if "llama3" in args.family:
            paths["llama3"] = args.llama3_tokenizer or str(make_llama3_tokenizer(tmp / "tok_llama3", args.vocab_size,
                                                                                  corpus))
        if "qwen2.5" in args.family or "turns" in args.sections:
            from longsft.vocabularies import tokenizer_folder

            paths["qwen2.5"] = args.qwen_tokenizer or str(tokenizer_folder("qwen2.5"))
        for family in args.family:
            print(f"{family} tokenizer: {paths[family]} ({len(load_tokenizer(family, paths[family])):,} tokens)")
        sets = {"short": records * args.repeat, "long": long_records(records, args.long_samples, 2000, 20000)}
        if not args.long_samples:
            del sets["long"]
        if "turns" in args.sections:
            turns_rows(args.turns, paths["qwen2.5"], tmp)

        if "speed" in args.sections:
            speed_rows(args, paths, records, sets, tmp)
        if "memory" in args.sections:
            memory_rows(args, paths, records, tmp)


def turns_rows(turns: list[int], qwen: str, tmp: Path) -> None:
    """Seconds to encode one record of N messages with template auto: one rendering vs every prefix rendered."""
    from transformers import PreTrainedTokenizerFast

    from longsft.templates.registry import chat_format
    from longsft.tiny.tokenizers import make_chat_template_tokenizer
    from longsft.vocabularies import glm_template

    edge = PreTrainedTokenizerFast.from_pretrained(make_chat_template_tokenizer(tmp / "tok_glm_edge", "glm"))
    edge.chat_template = glm_template("glm-edge")
    formats = {"qwen2.5": chat_format("auto", PreTrainedTokenizerFast.from_pretrained(qwen)),
               "glm-edge": chat_format("auto", edge)}
    print("\ntemplate auto, one record of N messages (seconds; one process; one rendering vs every prefix)")
    print(f"{'template':9} {'messages':>8} {'tokens':>8} {'one rendering':>13} {'every prefix':>12} {'same ids+labels':>15}")
    for name, fmt in formats.items():
        single = fmt.single_pass
        fmt.encode_batch([fmt.parse_record({"instruction": "warm up", "output": "ok"})[1]])  # one-time set-up
        for n in turns:
            record = {"messages": [{"role": "user" if k % 2 == 0 else "assistant",
                                    "content": f"Message {k}: " + ("why? " if k % 2 == 0 else "because. ") * (k % 7 + 1)}
                                   for k in range(n)]}
            conv = fmt.parse_record(record)[1]
            out, secs = [], []
            for mode in (single, False):
                fmt.single_pass = mode
                start = time.perf_counter()
                out.append(fmt.encode_batch([conv]))
                secs.append(time.perf_counter() - start)
            fmt.single_pass = single
            same = all(np.array_equal(a, b) for a, b in zip(out[0][:3], out[1][:3]))
            print(f"{name:9} {n:8} {len(out[0][0]):8,} {secs[0]:12.3f}s {secs[1]:11.3f}s {str(same):>15}"
                  + ("" if single else "  (template not single-pass: both render every prefix)"), flush=True)


def speed_rows(args, paths: dict, records: list[dict], sets: dict, tmp: Path) -> None:
    print(f"\nspeed (same text, same process count; fresh process per run; {args.trials} interleaved trials: "
          f"fastest, and median in brackets; start-up = a run on 20 records)")
    print(f"{'family':7} {'data':5} {'records':>7} {'tokens':>10} {'bare tok/s':>11} {'ours tok/s':>11} "
          f"{'bare wall':>15} {'ours wall':>15} {'wall ratio':>10} {'start-up b/o':>12} {'steady':>6} "
          f"{'bare cpu':>8} {'ours cpu':>8} {'cpu ratio':>9} {'paired':>6} {'same-trick bare, ratio':>22}")
    for family in args.family:
        for name, recs in sets.items():
            data = usable(recs, ROLES[family])[0]
            src = tmp / f"bench_{family}_{name}.jsonl"
            src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
            startup = tmp / f"bench_{family}_startup.jsonl"  # 20 short records: start-up costs only
            startup.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                       for r in usable(records, ROLES[family])[0][:20]), encoding="utf-8")
            common = dict(family=family, tokenizer=paths[family], num_proc=args.num_proc)
            script = dict(kind="script", out=str(tmp / "out"), max_length=1 << 30, **common)
            specs = [dict(kind="bare", src=str(src), **common), dict(src=str(src), **script),
                     dict(kind="bare", src=str(startup), **common), dict(src=str(startup), **script)]
            specs += [dict(kind="bare_trick", src=str(src), **common)] if family in ("glm4", "qwen2.5") else []
            bare, ours, bare0, ours0, *trick = measure(args.trials, *specs)
            trick = (f"{trick[0]['wall']:6.2f}s {trick[0]['wall'] / ours['wall']:5.2f}x" if trick
                        else "n/a")
            steady = (bare["wall"] - bare0["wall"]) / (ours["wall"] - ours0["wall"])  # start-up excluded
            steady = f"{steady:5.2f}x" if ours["wall"] > 2 * ours0["wall"] else "   n/a"  # too little data
            print(f"{family:7} {name:5} {len(data):7} {ours['tokens']:10,} {bare['tokens'] / bare['wall']:11,.0f} "
                  f"{ours['tokens'] / ours['wall']:11,.0f} {bare['wall']:6.2f}s ({bare['wall_median']:5.2f}) "
                  f"{ours['wall']:6.2f}s ({ours['wall_median']:5.2f}) {bare['wall'] / ours['wall']:9.2f}x "
                  f"{bare0['wall']:5.2f}/{ours0['wall']:4.2f}s {steady} {bare['cpu']:7.2f}s "
                  f"{ours['cpu']:7.2f}s {bare['cpu'] / ours['cpu']:8.2f}x {paired_ratio(bare, ours):5.2f}x "
                  f"{trick:>22}", flush=True)


def memory_rows(args, paths: dict, records: list[dict], tmp: Path) -> None:
    mem_src = tmp / "bench_memory.jsonl"
    mem_src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                               for r in records + long_records(records, 8, 30000, 30000)), encoding="utf-8")
    print("\npeak memory (the real records + 8 conversations of 30k words)")
    print(f"{'family':7} {'max_length':>10} {'kept':>6} {'too_long':>8} {'tokens':>10} {'main MB':>8} "
          f"{'worker MB':>9}")
    for family in args.family:
        for max_length in args.max_lengths:
            r = run_child(dict(kind="script", family=family, tokenizer=paths[family], src=str(mem_src),
                               num_proc=args.num_proc, out=str(tmp / "mem"), max_length=max_length))
            print(f"{family:7} {max_length:10} {r['kept']:6} {r['too_long']:8} {r['tokens']:10,} "
                  f"{r['rss_main']:8.0f} {r['rss_worker']:9.0f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
