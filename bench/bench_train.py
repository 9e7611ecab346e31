"""Training throughput of the three batch methods on the same samples: naive, sort, pack (CPU, tiny model).

    python bench/bench_train.py                                  # ~5-8 min on 2 CPU cores
    python bench/bench_train.py --num_samples 200 --max_length 1024   # quicker
    python bench/bench_train.py --hidden_size 256 --num_layers 4      # a bigger tiny model

A scaled-down LongWriter-like length mix: LongWriter-6k (replies of 2k-32k words) mixed with ~180k general SFT
samples, i.e. ~3% long samples (--long_fraction); the lengths of `make_mix` for 32k packs, every length
multiplied by --max_length / 32768. The text is random words, so the real pipeline runs on it:
tools/make_tiny.py (tiny Llama-3.1-style model) -> pre_tokenize_llama3.py -> sort_and_group.py -> main.py.

Each method trains one epoch over the same samples, each in a fresh single process, fp32, same optimizer:
- naive: shuffled batches of --batch_size samples, right-padded to the longest of the batch (upstream);
- sort:  batches of --batch_size samples of similar length (sort_and_group's sorted-batching order);
- pack:  one pack of up to --max_length tokens per step (about the same samples per step as the others:
         --batch_size defaults to the mean number of samples per pack).
Timing: from the start to the end of Trainer.train (model loading excluded), each method --repeats times in
interleaved rounds, every run in a fresh process; the fastest run counts (other jobs on a shared machine only
ever add time; on this 2-core box single runs varied up to 5x). Printed: supervised (target) tokens per second,
the same per CPU second of the process, token slots computed (padding included) and each method's speed-up
over naive. Written to OUT/bench_train.json. Goal: pack >= 2.5x naive.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from transformers import HfArgumentParser


WORDS = ("the a of to and in is it that for on with as was by at from this be are an or which one all has "
         "river long story chapter writer model data train tea trade route people history question answer "
         "paris france summary document essay paragraph light keeper night storm sea ship morning garden").split()


@dataclass
class BenchArguments:
    out_dir: Optional[str] = field(default=None, metadata={"help": "Work folder (default: a temp folder, removed)."})
    num_samples: int = field(default=800, metadata={"help": "Samples in the mix."})
    long_fraction: float = field(default=0.03, metadata={"help": "Share of long (LongWriter-like) samples."})
    max_length: int = field(default=2048, metadata={"help": "Pack size and longest sample (upstream: 32768)."})
    batch_size: Optional[int] = field(default=None, metadata={"help": "Samples per step for naive and sort "
                                                                      "(default: mean samples per pack)."})
    hidden_size: int = field(default=128, metadata={"help": "Tiny model width."})
    num_layers: int = field(default=2, metadata={"help": "Tiny model depth."})
    methods: str = field(default="naive,sort,pack", metadata={"help": "Comma list of batch methods to time."})
    repeats: int = field(default=3, metadata={"help": "Timed runs per method, interleaved; the fastest counts."})
    seed: int = field(default=0, metadata={"help": "Seed of the length mix, the text and the data order."})


# ----------------------------------------------------------------------------------------------
# Data: a LongWriter-like length mix of random-word conversations
# ----------------------------------------------------------------------------------------------

def tokens_per_word(model_dir: Path, seed: int) -> float:
    """How many tokens the tiny tokenizer spends per random word of WORDS (to size the text in tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = " ".join(np.random.default_rng(seed).choice(WORDS, 2000))
    return len(tok(text, add_special_tokens=False)["input_ids"]) / 2000


def make_mix(path: Path, args: BenchArguments, tpw: float) -> dict:
    """Write a JSONL of random-word conversations whose token lengths follow the scaled-down mix.

    At full scale (32k packs), in tokens: general SFT prompts log-normal(median 150, sigma 1.0) and replies
    log-normal(median 400, sigma 0.8); LongWriter-6k prompts log-normal(median 100, sigma 0.5) and replies
    log-uniform in [2.7k, 32k] (2k-24k words). Everything is scaled by max_length / 32768."""
    rng = np.random.default_rng(args.seed)
    scale = args.max_length / 32768
    n_long = max(1, round(args.num_samples * args.long_fraction))
    kinds = np.array([1] * n_long + [0] * (args.num_samples - n_long))
    rng.shuffle(kinds)
    words = np.array(WORDS)
    sizes = []
    with open(path, "w", encoding="utf-8") as f:
        for long in kinds:
            if long:
                q = rng.lognormal(math.log(100), 0.5)
                r = math.exp(rng.uniform(math.log(2700), math.log(32768)))
            else:
                q = rng.lognormal(math.log(150), 1.0)
                r = rng.lognormal(math.log(400), 0.8)
            nq, nr = (max(1, round(x * scale / tpw)) for x in (q, r))
            rec = {"messages": [{"role": "user", "content": " ".join(rng.choice(words, nq))},
                                {"role": "assistant", "content": " ".join(rng.choice(words, nr))}]}
            f.write(json.dumps(rec) + "\n")
            sizes.append((nq + nr) * tpw)
    return {"samples": int(len(kinds)), "long_samples": int(n_long), "tokens_per_word": round(tpw, 3),
            "planned_tokens_mean": round(float(np.mean(sizes)), 1)}


def padded_slots(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    return int(sum(len(b) * lengths[b].max() for b in batches))


# ----------------------------------------------------------------------------------------------
# Timing one method
# ----------------------------------------------------------------------------------------------

class _Timer:
    """Trainer callback: wall-clock and process CPU seconds between the start and the end of training (CPU
    time is steadier than wall time on a shared machine)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer.t0, timer.c0 = time.perf_counter(), time.process_time()

            def on_train_end(self, args, state, control, **kw):
                timer.wall, timer.cpu = time.perf_counter() - timer.t0, time.process_time() - timer.c0

        self.callback = Callback()


def time_method(method: str, model: Path, data: Path, out: Path, batch_size: int, seed: int) -> dict:
    from longsft.train import run as train_main

    argv = ["--model_name_or_path", str(model), "--train_file", str(data), "--output_dir", str(out / method),
            "--batch_method", method, "--per_device_train_batch_size", str(1 if method == "pack" else batch_size),
            "--num_train_epochs", "1", "--learning_rate", "1e-4", "--lr_scheduler_type", "constant",
            "--logging_steps", "1000000", "--save_strategy", "no", "--report_to", "none", "--seed", str(seed),
            "--disable_tqdm", "True", "--use_cpu", "True", "--dataloader_num_workers", "0"]
    timer = _Timer()
    trainer = train_main.main(argv, callbacks=[timer.callback])
    metrics = next(h for h in reversed(trainer.state.log_history) if "train_runtime" in h)
    return {"train_s": round(timer.wall, 3), "cpu_s": round(timer.cpu, 3), "steps": int(trainer.state.global_step),
            "train_loss": float(metrics["train_loss"])}


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    from longsft.data import sort_and_group
    from longsft.data.pretokenize import PretokenizeArguments, parse_args
    from longsft.templates.registry import pretokenize
    from longsft.train.batches import LMPackDataset, LMSortDataset
    from longsft.data.storage import TokenizedData
    from longsft.train.data import target_stats
    from longsft.tiny.models import make_tiny_model

    work = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        heads = max(2, args.hidden_size // 32)
        model = make_tiny_model(work / "model", "llama3", hidden_size=args.hidden_size,
                                intermediate_size=2 * args.hidden_size, num_hidden_layers=args.num_layers,
                                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                                head_dim=args.hidden_size // heads)
        mix = make_mix(work / "mix.jsonl", args, tokens_per_word(model, args.seed))
        data = work / "data"
        pretokenize(parse_args(PretokenizeArguments, [  # what pre_tokenize_llama3.py runs (template longwriter)
            "--model_name_or_path", str(model), "--input", str(work / "mix.jsonl"), "--output_dir", str(data),
            "--max_length", str(args.max_length), "--truncate", "right", "--num_proc", "1", "--seed", str(args.seed)]),
            family="llama3")

        def group(size: int) -> None:  # --group_size: samples per step for sort (packs per step: 1 here)
            sort_and_group.main(["--train_file", str(data), "--max_length", str(args.max_length),
                                 "--group_size", str(size), "--seed", str(args.seed), "--no_plot"])

        group(1)

        tok = TokenizedData(data)
        lengths = np.asarray(tok.lengths, dtype=np.int64)
        supervised = target_stats(tok)["targets"]  # the prediction targets every method trains on
        n_packs = len(LMPackDataset(data))
        batch = args.batch_size or max(1, round(len(lengths) / n_packs))
        group(batch)  # sorted runs of `batch` similar lengths = the sort method's batches
        assert len(LMPackDataset(data)) == n_packs

        # token slots each method computes (padding included): naive pads random batches (estimated here with one
        # random order; the trainer draws its own), sort pads runs of similar lengths, pack has no padding
        rng = np.random.default_rng(args.seed)
        perm = rng.permutation(len(lengths))
        naive_batches = [perm[i:i + batch] for i in range(0, len(perm), batch)]
        sorted_lengths = np.asarray(LMSortDataset(data).lengths, dtype=np.int64)
        sort_batches = [np.arange(i, min(i + batch, len(lengths))) for i in range(0, len(lengths), batch)]
        slots = {"naive": padded_slots(lengths, naive_batches), "sort": padded_slots(sorted_lengths, sort_batches),
                 "pack": int(lengths.sum())}

        print(f"\n[bench_train] {mix['samples']} samples ({mix['long_samples']} long), {int(lengths.sum()):,} tokens, "
              f"{supervised:,} supervised targets; lengths p50 {int(np.median(lengths))}, max {int(lengths.max())}; "
              f"{n_packs} packs of <= {args.max_length}; naive/sort batch {batch} samples")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for rep in range(args.repeats):  # rounds in rotated order, each run in a fresh process
            for method in methods[rep % len(methods):] + methods[:rep % len(methods)]:
                with mp.get_context("spawn").Pool(1) as pool:
                    r = pool.apply(time_method, (method, model, data, work / "runs", batch, args.seed))
                runs[method].append(r)
                print(f"[bench_train] round {rep + 1}/{args.repeats} {method:5s}: {r['steps']} steps, "
                      f"{r['train_s']:.2f} s ({r['cpu_s']:.1f} CPU s), loss {r['train_loss']:.4f}")
        results = {}
        for method in methods:  # noise from other jobs only ever adds time: keep the fastest run
            r = dict(min(runs[method], key=lambda x: x["train_s"]))
            r["all_train_s"] = [x["train_s"] for x in runs[method]]
            r["cpu_s"] = min(x["cpu_s"] for x in runs[method])
            r["slots"] = slots[method]
            r["supervised_tokens_per_s"] = supervised / r["train_s"]
            r["supervised_tokens_per_cpu_s"] = supervised / r["cpu_s"]
            results[method] = r
        base = results.get("naive")
        print("\n| method | steps | train s | supervised tok/s | vs naive | tok per CPU s | vs naive (CPU) | token slots |")
        print("|---|---|---|---|---|---|---|---|")
        for method, r in results.items():
            r["speedup_vs_naive"] = r["supervised_tokens_per_s"] / base["supervised_tokens_per_s"] if base else None
            r["speedup_vs_naive_cpu"] = (r["supervised_tokens_per_cpu_s"] / base["supervised_tokens_per_cpu_s"]
                                         if base else None)
            ratio = f"{r['speedup_vs_naive']:.2f}x" if base else "-"
            ratio_cpu = f"{r['speedup_vs_naive_cpu']:.2f}x" if base else "-"
            print(f"| {method} | {r['steps']} | {r['train_s']:.2f} | {r['supervised_tokens_per_s']:.0f} | {ratio} | "
                  f"{r['supervised_tokens_per_cpu_s']:.0f} | {ratio_cpu} | {r['slots']:,} |")
        report = {"args": vars(args), "mix": mix, "tokens": int(lengths.sum()), "supervised_targets": supervised,
                  "packs": n_packs, "batch_size": batch, "results": results}
        if "pack" in results and base:
            ok = results["pack"]["speedup_vs_naive"] >= 2.5
            print(f"\n[bench_train] pack vs naive: {results['pack']['speedup_vs_naive']:.2f}x in wall time, "
                  f"{results['pack']['speedup_vs_naive_cpu']:.2f}x in CPU time (goal >= 2.5x: {'met' if ok else 'NOT met'})")
        (work / "bench_train.json").write_text(json.dumps(report, indent=2))
        return report
    finally:
        if not args.out_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
