"""Sequence parallelism on one long pack: per-rank peak memory and tokens/s for SP 1, 2, 4 (CPU, tiny Llama).

    python bench/bench_sp.py                       # 65,536-token pack, SP 1,2,4 (~7 min on 2 busy CPU cores)
    python bench/bench_sp.py --tiny                # 2,047 tokens, SP 1,2: a smoke run of the code paths (~1 min)
    python bench/bench_sp.py --sizes 1,2 --tokens 32768 --gradient_checkpointing --out /tmp/bench_sp

Measured here (2 CPU cores shared with other jobs, load average ~5; torch 2.13 CPU, deepspeed 0.19.8), defaults:
    SP N  ranks x threads  tokens/rank  peak RSS/rank  activation/rank  vs SP 1  step s  tokens/s total
    1     1 x 2            65,536       3,885 MiB      3,452 MiB        1.000    57.5    1,140
    2     2 x 1            32,768       2,168 MiB      1,736 MiB        0.503    30.7    2,136
    4     4 x 1            16,384       1,311 MiB        879 MiB        0.255    24.2    2,709
    loss 7.015513 for every N (gradient norm 0.184091 too); activation memory per rank ~1/N. The step times
    moved 20-40% between the two timed steps of one size (the other jobs): read them as noise, not speed-ups.

What runs: tools/make_tiny.py builds one tiny Llama-3.1-style model (patch/modeling_llama.py, random weights,
fp32; --hidden_size 256, 2 layers, 4 query heads of 64 sharing 2 KV heads: wide enough that activations, not
weights, fill the memory). One pack of --tokens random tokens made of --samples samples: one long sample
(--long_fraction of the pack) and the rest split in lengths 1:2:...:(samples-1), the first 10% of each sample
an unsupervised prompt. For each N of --sizes, N real processes (torchrun, gloo) run the worker of this file
(`--worker`), which does what a main.py step does to the model, without the DeepSpeed engine and optimizer:
  N = 1: dataset.PackCollator's pack -> the model's packed forward (cu_seqlens -> varlen attention, "sdpa"
         backend on CPU: one causal SDPA call per sample, the flash kernel, memory linear in its length);
  N > 1: sequence_parallel.SequenceParallelCollator's [1, L/N] shard of the same pack, and
         sequence_parallel.enable_ulysses(model, SPLayout.of(N, rank, N)): DeepSpeed's UlyssesSPAttentionHF
         around our packed attention (all-to-all to whole-pack / heads-per-N and back, over gloo);
then forward + backward with the exact normaliser: num_items_in_batch = the pack's targets (samples with
--pack_loss), summed over the ranks as trainer.py counts it (only SP rank 0 carries the pack's counts).
--warmup steps, then --repeats timed steps, gradients cleared before each.

Measured per rank (each a separate process, so nothing of one size leaks into another):
  peak RSS      the kernel's resident-set high-water mark of the process (VmHWM, /proc/self/status) at the end:
                interpreter, torch, the model, the batch, and the largest step;
  activation    per timed step: the high-water mark is reset to the current RSS just before the forward
                (writing "5" to /proc/self/clear_refs, Linux >= 4.0) and read right after the backward, minus
                the RSS once the model and the batch were built (before the first step): what forward +
                backward add at their peak (saved activations, the all-to-all buffers, the loss chunks, the
                parameter gradients: 2-8 MiB here, and ~20 MiB the first step leaves allocated); the largest
                of the timed steps. torch's CPU allocator caches nothing itself, but glibc's malloc keeps freed heap
                blocks resident and raises its mmap threshold up to 32 MiB as blocks are freed, so RSS would
                follow the heap's fragmentation (+-20% between steps and ranks in a first try); the workers run
                with MALLOC_MMAP_THRESHOLD_=65536 (every block >= 64 KiB its own mapping, returned when freed)
                and MALLOC_TRIM_THRESHOLD_=131072, and then repeat it to the MiB on every step and rank;
  step time     wall time of forward + backward between two barriers (the slowest rank), the fastest step;
  tokens/s      pack tokens / step time (all ranks together), and tokens per rank / step time.
Checks: the loss (sum over ranks of each shard's sum / D) and the norm of the gradient summed over the ranks
must equal SP 1's to 1e-5 / 1e-4 relative; else the run fails after writing the JSON.
Printed: a table and a one-line conclusion. Written: OUT/bench_sp.json with --out OUT (the model and the per-rank
results beside it); without --out all of it goes to a temp folder that is removed.

Cores: the N processes of a size share the machine's cores (--cores, default the CPUs this process may use):
each rank runs max(1, cores // N) threads (OMP_NUM_THREADS and torch.set_num_threads), so on this 2-core box SP 4
runs 4 one-thread processes on 2 cores. The total compute of a step is the same for every N (each rank does 1/N
of the pack, attention included), so tokens/s measures no speed-up here, only the all-to-all and
oversubscription overhead; on GPUs each rank has its own device. Memory per rank is the figure that carries over.

Why several samples and not one 64k sample: memory would allow it (the CPU flash kernel is linear in length),
but time would not: causal attention is quadratic, fwd + bwd of ONE 16k sample (4 heads of 64) took 6.3 s per
layer on this machine, a 64k one would take ~100 s per layer and step. The per-rank memory story is the same:
under Ulysses every rank attends over the whole pack for heads / N heads, everything else runs on L / N tokens.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from longsft.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]

MIB = 1024**2
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4
# glibc: every block of >= 64 KiB its own mmap, unmapped when freed (no dynamic threshold), so RSS follows live memory
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _arg(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class BenchArguments:
    tiny: bool = _arg(False, "Tiny sizes (TINY below) for a smoke run; overrides the sizes.")
    out: Optional[str] = _arg(None, "Folder for bench_sp.json, the model and the per-rank results "
                                    "(default: a temp folder, removed).")
    tokens: int = _arg(65536, "Tokens in the pack.")
    samples: int = _arg(8, "Samples in the pack: one long one and samples-1 of lengths 1:2:...:(samples-1).")
    long_fraction: float = _arg(0.25, "Share of the pack in the long sample.")
    sizes: str = _arg("1,2,4", "Comma list of sequence-parallel sizes (processes) to run.")
    hidden_size: int = _arg(256, "Model width.")
    intermediate_size: int = _arg(768, "MLP width.")
    num_layers: int = _arg(2, "Decoder layers.")
    num_heads: int = _arg(4, "Query heads (every size must divide them).")
    num_kv_heads: int = _arg(2, "Key/value heads (divisible by each size or dividing it).")
    pack_loss: bool = _arg(False, "LongAlign's per-sequence loss (D = samples) instead of the token mean.")
    gradient_checkpointing: bool = _arg(False, "Recompute each layer in backward (transformers' non-reentrant).")
    warmup: int = _arg(1, "Untimed steps first.")
    repeats: int = _arg(2, "Timed steps (the fastest counts for time, the largest for memory).")
    cores: int = _arg(0, "Cores the ranks of one size share (0 = the CPUs this process may use).")
    seed: int = _arg(0, "Seed of the weights and tokens.")
    timeout: int = _arg(3600, "Seconds one size may run.")
    worker: bool = _arg(False, "Internal: run as one rank under torchrun.")
    model_dir: str = _arg("", "Internal: the model folder (worker).")
    threads: int = _arg(0, "Internal: torch threads of a worker.")


# an odd pack: SP 2 pads it by one target-free token (the collator's padding path)
TINY = dict(tokens=2047, samples=5, sizes="1,2", hidden_size=64, intermediate_size=128, warmup=1, repeats=1)


def sample_lengths(tokens: int, samples: int, long_fraction: float) -> list[int]:
    """One long sample of long_fraction * tokens, then samples - 1 of lengths 1:2:..., summing to `tokens`."""
    long = round(tokens * long_fraction) if samples > 1 else tokens
    rest, parts = tokens - long, list(range(1, samples))
    lengths = [long] + [rest * p // sum(parts) for p in parts]
    lengths[-1] += tokens - sum(lengths)
    return lengths


def problems_of(args: BenchArguments, sizes: list[int]) -> list[str]:
    from longsft.train.sequence_parallel import head_problems

    p = []
    if not sizes or any(n < 1 for n in sizes):
        p.append(f"--sizes {args.sizes}: a comma list of positive sequence-parallel sizes")
    heads = SimpleNamespace(num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads)
    for n in sizes:
        p += [m.replace("--sequence_parallel_size", "--sizes") for m in head_problems(heads, n)]
    if args.hidden_size % args.num_heads:
        p.append(f"--hidden_size {args.hidden_size} is not a multiple of --num_heads {args.num_heads}")
    if args.samples < 1 or not 0 < args.long_fraction <= 1:
        p.append("--samples must be >= 1 and --long_fraction in (0, 1]")
    elif min(sample_lengths(args.tokens, args.samples, args.long_fraction)) < 2:
        p.append(f"--tokens {args.tokens} is too few for --samples {args.samples} (each needs >= 2 tokens)")
    if args.repeats < 1 or args.warmup < 0:
        p.append("--repeats must be >= 1 and --warmup >= 0")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Worker: one rank
# ---------------------------------------------------------------------------------------------------------------
def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / MIB  # the kernel writes kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def make_features(args: BenchArguments, vocab: int) -> list[dict]:
    """The pack's samples (the same on every rank): random ids, the first 10% of each an unsupervised prompt."""
    import torch

    from longsft.data.storage import IGNORE_INDEX

    gen = torch.Generator().manual_seed(args.seed)
    feats = []
    for n in sample_lengths(args.tokens, args.samples, args.long_fraction):
        ids = torch.randint(0, vocab, (n,), generator=gen)
        labels = ids.clone()
        labels[:max(1, n // 10)] = IGNORE_INDEX
        feats.append({"input_ids": ids, "labels": labels})
    return feats


def run_worker(args: BenchArguments) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist

    from longsft.train.batches import PackCollator, count_targets
    from longsft.models import model_class, read_model_type
    from longsft.train.sequence_parallel import PACK_COUNT_KEYS, SequenceParallelCollator, SPLayout, enable_ulysses

    torch.set_num_threads(args.threads or torch.get_num_threads())
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    deepspeed.init_distributed(dist_backend="gloo")  # Ulysses' all-to-all goes through deepspeed.comm
    model = model_class(read_model_type(args.model_dir)).from_pretrained(args.model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if world > 1:
        enable_ulysses(model, SPLayout.of(world, rank, world))
        collator = SequenceParallelCollator(world, rank, model.config.pad_token_id, pack_loss=args.pack_loss)
    else:
        collator = PackCollator(pack_loss=args.pack_loss)
    batch = collator(make_features(args, model.config.vocab_size))
    counts = torch.tensor(count_targets(batch), dtype=torch.int64)  # (targets, samples): SP rank 0 has the pack's
    dist.all_reduce(counts)
    inputs = {k: v for k, v in batch.items() if k not in PACK_COUNT_KEYS}  # what trainer._model_inputs passes
    if args.pack_loss:
        inputs["pack_loss"] = True
    else:
        inputs.pop("weights", None)
    inputs["num_items_in_batch"] = counts[1 if args.pack_loss else 0].clamp(min=1)
    shard = int(batch["input_ids"].shape[1])
    base = _status_mib("VmRSS")
    steps = []
    for step in range(args.warmup + args.repeats):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        before = _status_mib("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        loss = model(**inputs).loss  # this shard's sum of CE / D
        loss.backward()
        peak = _status_mib("VmHWM")
        dist.barrier()
        if step >= args.warmup:
            steps.append({"seconds": time.perf_counter() - start, "activation_mib": peak - base,
                          "rss_before_mib": before})
    total = loss.detach().double().clone()
    dist.all_reduce(total)  # the pack's loss: sum over the shards
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).double()
    dist.all_reduce(grad)  # each rank holds its shard's share of every parameter's gradient
    return {"rank": rank, "world": world, "tokens_per_rank": shard, "threads": torch.get_num_threads(),
            "targets": int(counts[0]), "sequences": int(counts[1]), "base_rss_mib": base,
            "peak_rss_mib": _status_mib("VmHWM"), "activation_mib": max(s["activation_mib"] for s in steps),
            "step_seconds": min(s["seconds"] for s in steps), "steps": steps, "loss": float(total),
            "grad_norm": float(grad.norm())}


# ---------------------------------------------------------------------------------------------------------------
# Driver: one torchrun launch per size
# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_size(args: BenchArguments, n: int, model_dir: Path, work: Path, cores: int) -> dict:
    """N ranks of the worker; the per-rank results combined into one row."""
    threads = max(1, cores // n)
    out = work / f"sp{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    skip = {"tiny", "out", "sizes", "worker", "model_dir", "threads", "cores", "timeout"}
    flags = []
    for k, v in asdict(args).items():
        if k not in skip and not isinstance(v, bool):
            flags += [f"--{k}", str(v)]
        elif k not in skip and v:
            flags.append(f"--{k}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", "--model_dir",
           str(model_dir), "--threads", str(threads), "--out", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           **MALLOC_ENV}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"size": n, "error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}"}
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    return {"size": n, "ranks": n, "threads_per_rank": threads, "tokens_per_rank": ranks[0]["tokens_per_rank"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
            "activation_mib": max(r["activation_mib"] for r in ranks),
            "step_seconds": max(r["step_seconds"] for r in ranks), "loss": ranks[0]["loss"],
            "grad_norm": ranks[0]["grad_norm"], "targets": ranks[0]["targets"], "sequences": ranks[0]["sequences"],
            "launch_seconds": time.perf_counter() - start, "per_rank": ranks}


def print_table(rows: list[dict], tokens: int) -> None:
    one = next((r for r in rows if r.get("size") == 1 and "error" not in r), None)
    print("\n| SP N | ranks x threads | tokens/rank | peak RSS/rank MiB | activation/rank MiB | vs SP 1 | 1/N | "
          "step s | tokens/s total | tokens/s per rank | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | FAILED: {r['error'].splitlines()[-1][:120]} |")
            continue
        ratio = f"{r['activation_mib'] / one['activation_mib']:.3f}" if one else "-"
        print(f"| {r['size']} | {r['ranks']} x {r['threads_per_rank']} | {r['tokens_per_rank']:,} | "
              f"{r['peak_rss_mib']:,.0f} | {r['activation_mib']:,.0f} | {ratio} | {1 / r['size']:.3f} | "
              f"{r['step_seconds']:.2f} | {tokens / r['step_seconds']:,.0f} | "
              f"{r['tokens_per_rank'] / r['step_seconds']:,.0f} | {r['loss']:.6f} |")


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    if args.worker:
        result = run_worker(args)
        (Path(args.out) / f"rank{result['rank']}.json").write_text(json.dumps(result, indent=1))
        return result
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    problems = problems_of(args, sizes)
    if problems:
        raise UserError("bench_sp.py: " + "; ".join(problems))
    from longsft.tiny.models import make_tiny_model

    cores = args.cores or len(os.sched_getaffinity(0))
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_sp_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = make_tiny_model(work / "model", "llama3", seed=args.seed, hidden_size=args.hidden_size,
                                    intermediate_size=args.intermediate_size, num_hidden_layers=args.num_layers,
                                    num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
                                    head_dim=args.hidden_size // args.num_heads)
        lengths = sample_lengths(args.tokens, args.samples, args.long_fraction)
        print(f"[bench_sp] pack of {args.tokens:,} tokens = {len(lengths)} samples {lengths}; tiny Llama hidden "
              f"{args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads / {args.num_kv_heads} KV, "
              f"MLP {args.intermediate_size}, fp32, {'pack loss' if args.pack_loss else 'token mean'}"
              f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; {cores} cores shared by the "
              f"ranks of each size", flush=True)
        rows = []
        for n in sizes:
            row = run_size(args, n, model_dir, work, cores)
            rows.append(row)
            msg = row.get("error", "").splitlines()[-1:] or [f"activation/rank {row['activation_mib']:.0f} MiB, "
                                                            f"step {row['step_seconds']:.2f} s, loss {row['loss']:.6f}"]
            print(f"[bench_sp] SP {n}: {msg[0]}", flush=True)
        print_table(rows, args.tokens)
        ok = [r for r in rows if "error" not in r]
        ref = ok[0] if ok else None
        mismatch = [r["size"] for r in ok if abs(r["loss"] - ref["loss"]) > LOSS_RTOL * abs(ref["loss"])
                    or abs(r["grad_norm"] - ref["grad_norm"]) > GRAD_RTOL * ref["grad_norm"]]
        one = next((r for r in ok if r["size"] == 1), None)
        if one and len(ok) > 1:
            parts = [f"SP {r['size']}: {r['activation_mib'] / one['activation_mib']:.2f} (1/N = {1 / r['size']:.2f})"
                     for r in ok if r["size"] > 1]
            print(f"\n[bench_sp] activation memory per rank vs SP 1: {', '.join(parts)}; losses and gradient norms "
                  f"{'agree' if not mismatch else 'DIFFER for SP ' + str(mismatch)} (loss {ref['loss']:.6f}, "
                  f"grad norm {ref['grad_norm']:.6f})")
        report = {"args": asdict(args), "cores": cores, "sample_lengths": lengths, "rows": rows,
                  "losses_agree": not mismatch, "failed": [r["size"] for r in rows if "error" in r]}
        (work / "bench_sp.json").write_text(json.dumps(report, indent=2))
        if mismatch:
            raise RuntimeError(f"SP sizes {mismatch}: loss or gradient norm differs from SP {ref['size']}")
        return report
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    report = run_cli(main)
    sys.exit(1 if isinstance(report, dict) and report.get("failed") else 0)
