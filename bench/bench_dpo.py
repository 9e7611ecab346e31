"""Preference training throughput and memory: packed DPO (ours) vs padded pairs vs TRL's DPOTrainer, on long-tailed
pair lengths, with the reference precomputed (one model in memory) or live (two models).

    python bench/bench_dpo.py                                     # CPU: ~3-6 min on 2 shared cores
    python bench/bench_dpo.py --num_pairs 16 --max_completion 256 --methods packed-precomputed,padded-live  # quick
    python bench/bench_dpo.py --hidden_size 1024 --num_layers 8 --vocab_size 128256 --max_completion 8192 \\
        --pack_length 16384 --num_pairs 256                       # on a GPU (bf16)

The pairs: a prompt of 16..--prompt_length tokens and two completions of long-tailed lengths in
[--min_completion, --max_completion] (most short, a few long, as LongWriter's outputs), random token ids. The model:
a random Llama (patch/modeling_llama.LlamaForCausalLM; its packed forward and chunked log-probs for our methods,
transformers' own class for TRL), fp32 on CPU, bf16 on CUDA. Every method runs one epoch over the same pairs with
SGD at learning rate 0 (so every method sees the initial weights and the summed loss must agree: it is checked),
each in a fresh process:
- packed-precomputed: whole pairs best-fit-decreasing into --pack_length packs (sort_and_group's packer), one pack
  per step; the reference's log-probs computed once before (its pass is timed apart); one model in memory;
- packed-live: the same packs, the reference a second model run on every pack (two models in memory);
- padded-live: --padded_batch pairs per step, chosen and rejected right-padded to the longest of the batch (the
  [2B, T] layout TRL and LLaMA-Factory use), the same chunked log-probs, a live reference (two models);
- trl: TRL's DPOTrainer (where trl is installed) on the same token ids, --padded_batch pairs per step, its
  reference model, bf16 off on CPU.
Printed per method: real tokens (policy forward + backward, reference forward), token slots with padding, seconds,
real tokens/s, peak memory (CPU: the process's peak RSS; CUDA: max_memory_allocated) and the summed loss.
Written to --out (JSON). Measured figures: README "Preference training".
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from transformers import HfArgumentParser

from longsft.errors import UserError, run_cli

MIB = 1 << 20
METHODS = ("packed-precomputed", "packed-live", "padded-live", "trl")


@dataclass
class BenchArguments:
    num_pairs: int = field(default=64, metadata={"help": "Preference pairs."})
    prompt_length: int = field(default=64, metadata={"help": "Longest prompt (uniform from 16)."})
    min_completion: int = field(default=16, metadata={"help": "Shortest completion (tokens)."})
    max_completion: int = field(default=1024, metadata={"help": "Longest completion; long-tailed in between."})
    pack_length: int = field(default=4096, metadata={"help": "Tokens per pack (at least the longest pair)."})
    padded_batch: int = field(default=2, metadata={"help": "Pairs per step of the padded methods."})
    hidden_size: int = field(default=256, metadata={"help": "Model width."})
    num_layers: int = field(default=4, metadata={"help": "Model depth."})
    vocab_size: int = field(default=32000, metadata={"help": "Vocabulary (the lm_head's share of the work)."})
    methods: str = field(default=",".join(METHODS), metadata={"help": "Comma list of " + ", ".join(METHODS)})
    repeats: int = field(default=1, metadata={"help": "Runs per method (the fastest counts)."})
    seed: int = field(default=0, metadata={"help": "Seed of the lengths, the tokens and the weights."})
    out: Optional[str] = field(default=None, metadata={"help": "JSON file for the results."})


def make_pairs(args: BenchArguments) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids; completion lengths long-tailed in [min, max]."""
    rng = np.random.default_rng(args.seed)
    lo, hi = args.min_completion, args.max_completion
    out = []
    for _ in range(args.num_pairs):
        p = int(rng.integers(16, max(17, args.prompt_length + 1)))
        c, r = (int(round(lo * (hi / lo) ** (rng.random() ** 3))) for _ in range(2))
        out.append(tuple(rng.integers(3, args.vocab_size, size=n).tolist() for n in (p, c, r)))
    return out


def problems_of(args: BenchArguments) -> list[str]:
    p = []
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.append(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if not 1 <= args.min_completion <= args.max_completion:
        p.append("--min_completion / --max_completion: need 1 <= min <= max")
    if args.pack_length < 2 * (args.prompt_length + args.max_completion):
        p.append(f"--pack_length {args.pack_length}: must hold the longest pair, 2 x (--prompt_length + "
                 f"--max_completion) = {2 * (args.prompt_length + args.max_completion)}")
    for name in ("num_pairs", "padded_batch", "hidden_size", "num_layers", "repeats"):
        if getattr(args, name) < 1:
            p.append(f"--{name} {getattr(args, name)}: must be at least 1")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Worker: one method in a fresh process
# ---------------------------------------------------------------------------------------------------------------
def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / MIB
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MIB
    return float("nan")


def _models(args: BenchArguments, stock: bool = False):
    """(policy, reference, device): the reference is the policy's weights plus small noise (another model, so the
    loss is not log 2 and its check means something)."""
    import torch
    import transformers

    from patch.modeling_llama import LlamaForCausalLM

    cfg = transformers.LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                                   intermediate_size=args.hidden_size * 3, num_hidden_layers=args.num_layers,
                                   num_attention_heads=max(1, args.hidden_size // 64),
                                   num_key_value_heads=max(1, args.hidden_size // 128), max_position_embeddings=1 << 20,
                                   tie_word_embeddings=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    cls = transformers.LlamaForCausalLM if stock else LlamaForCausalLM
    policy = cls(cfg).to(device, dtype)
    ref = cls(cfg).to(device, dtype).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ref.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=gen).to(v) for k, v in
                         policy.state_dict().items()})
    return policy, ref, device


def _items(pairs, idx) -> list[dict]:
    """Pairs as two-sample packs (what PairDataset yields) for PairCollator."""
    import torch

    out = []
    for p in idx:
        prompt, chosen, rejected = pairs[p]
        ids = prompt + chosen + prompt + rejected
        lab = [-100] * len(prompt) + chosen + [-100] * len(prompt) + rejected
        lc = len(prompt) + len(chosen)
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(lab),
                    "attention_mask": torch.tensor([0, lc, len(ids)], dtype=torch.int32),
                    "sample_ids": torch.tensor([2 * p, 2 * p + 1])})
    return out


def _logps_packed(model, batch, device):
    from longsft.train.dpo import sequence_logps

    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device), labels=batch["labels"].to(device),
                return_token_logps=True)
    return sequence_logps(out.token_logps, batch["dpo_sequence"], int(batch["dpo_lengths"].numel()))


def _logps_padded(model, pairs, idx, device):
    """[2B, T] right-padded (chosen rows then rejected rows, as TRL): per-row sums, reordered to (c, r) pairs."""
    import torch

    rows = [pairs[p][0] + pairs[p][k] for k in (1, 2) for p in idx]
    prompts = [len(pairs[p][0]) for _ in (1, 2) for p in idx]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, n) in enumerate(zip(rows, prompts)):
        ids[i, :len(r)] = torch.tensor(r)
        lab[i, n:len(r)] = torch.tensor(r[n:])
        mask[i, :len(r)] = 1
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=lab.to(device),
                return_token_logps=True)
    sums = out.token_logps.to(torch.float64).sum(dim=1)  # [2B]
    b = len(idx)
    pair_order = torch.stack([sums[:b], sums[b:]], dim=1).reshape(-1)  # (c0, r0, c1, r1, ...)
    lengths = torch.tensor([len(pairs[p][k]) for p in idx for k in (1, 2)], device=sums.device)
    return pair_order, lengths, int(mask.sum()), ids.numel()


def run_ours(args: BenchArguments, method: str) -> dict:
    import torch

    from longsft.data.packing import pack_bfd
    from longsft.train import dpo as dpo_lib
    from longsft.train.dpo_data import PairCollator

    pairs = make_pairs(args)
    policy, ref, device = _models(args)
    settings = type("S", (), dict(dpo_loss="sigmoid", dpo_beta=0.1, dpo_label_smoothing=0.0, simpo_gamma=0.0))
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    if method == "padded-live":
        steps = [list(range(i, min(i + args.padded_batch, len(pairs)))) for i in range(0, len(pairs), args.padded_batch)]
    else:
        lengths = np.array([2 * len(p) + len(c) + len(r) for p, c, r in pairs])
        order, offsets = pack_bfd(lengths, args.pack_length)
        steps = [order[offsets[k]:offsets[k + 1]].tolist() for k in range(len(offsets) - 1)]
    collate = PairCollator()
    result = {"method": method, "steps": len(steps), "models_in_memory": 1 if method == "packed-precomputed" else 2}
    ref_table = None
    if method == "packed-precomputed":  # the reference's pass before training; then only the policy stays
        t0 = time.perf_counter()
        ref_table = np.zeros(2 * len(pairs))
        with torch.no_grad():
            for idx in steps:
                batch = collate(_items(pairs, idx))
                ref_table[batch["dpo_sample_ids"].numpy()] = _logps_packed(ref, batch, device).cpu().numpy()
        result["reference_pass_s"] = round(time.perf_counter() - t0, 3)
        del ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _peak_reset(device)
    real = slots = 0
    total = 0.0
    t0 = time.perf_counter()
    for idx in steps:
        if method == "padded-live":
            policy_sums, lengths, n_real, n_slots = _logps_padded(policy, pairs, idx, device)
            with torch.no_grad():
                reference = _logps_padded(ref, pairs, idx, device)[0]
        else:
            batch = collate(_items(pairs, idx))
            policy_sums = _logps_packed(policy, batch, device)
            lengths, n_real = batch["dpo_lengths"].to(device), int(batch["input_ids"].numel())
            n_slots = n_real
            if ref_table is not None:
                reference = torch.from_numpy(ref_table[batch["dpo_sample_ids"].numpy()]).to(device)
            else:
                with torch.no_grad():
                    reference = _logps_packed(ref, batch, device)
        loss_sum, _, _ = dpo_lib.batch_sums(policy_sums, reference, lengths, settings)
        (loss_sum / len(idx)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total += loss_sum.item()
        real += n_real
        slots += n_slots
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result.update(seconds=round(seconds, 3), real_tokens=real, token_slots=slots, loss_sum=total,
                  tokens_per_s=round(real / seconds, 1), peak_mib=round(_peak_mib(device), 1))
    return result


def run_trl(args: BenchArguments) -> dict:
    import tempfile

    import transformers

    try:
        import trl
        from datasets import Dataset
    except ImportError as e:
        return {"method": "trl", "skipped": f"trl not installed ({e})"}
    from longsft.tiny.tokenizers import make_llama3_tokenizer

    pairs = make_pairs(args)
    policy, ref, device = _models(args, stock=True)
    with tempfile.TemporaryDirectory() as work:
        tok = transformers.AutoTokenizer.from_pretrained(make_llama3_tokenizer(Path(work) / "tok"))
        tok.pad_token = tok.convert_ids_to_tokens(0)  # an id every --vocab_size has (padding is masked anyway)
        rows = {"prompt_ids": [p for p, _, _ in pairs], "chosen_ids": [c for _, c, _ in pairs],
                "rejected_ids": [r for _, _, r in pairs]}
        config = trl.DPOConfig(output_dir=str(Path(work) / "out"), per_device_train_batch_size=args.padded_batch,
                               num_train_epochs=1, learning_rate=0.0, optim="sgd", logging_steps=1, report_to="none",
                               save_strategy="no", bf16=device.type == "cuda", use_cpu=device.type != "cuda",
                               max_length=None, seed=args.seed, beta=0.1, disable_tqdm=True)
        dummy = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
        trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=dummy, processing_class=tok)
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train_dataset = Dataset.from_dict(rows)  # our token ids, past TRL's own tokenization
        _peak_reset(device)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    batch = [min(args.padded_batch, len(pairs) - i) for i in range(0, len(pairs), args.padded_batch)]
    real = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
    return {"method": "trl", "steps": len(losses), "models_in_memory": 2, "seconds": round(seconds, 3),
            "real_tokens": real, "token_slots": None, "tokens_per_s": round(real / seconds, 1),
            "peak_mib": round(_peak_mib(device), 1), "loss_sum": float(sum(b * x for b, x in zip(batch, losses))),
            "trl": trl.__version__}


def run_method(args: BenchArguments, method: str) -> dict:
    return run_trl(args) if method == "trl" else run_ours(args, method)


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    print(f"{'method':20} {'models':>6} {'steps':>5} {'real tok':>9} {'slots':>9} {'pad %':>6} {'seconds':>8} "
          f"{'tok/s':>9} {'peak MiB':>9} {'loss sum':>10}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['method']:20} skipped: {r['skipped']}")
            continue
        pad = "" if not r.get("token_slots") else f"{100 * (1 - r['real_tokens'] / r['token_slots']):.1f}"
        print(f"{r['method']:20} {r['models_in_memory']:>6} {r['steps']:>5} {r['real_tokens']:>9,} "
              f"{r['token_slots'] or '':>9} {pad:>6} {r['seconds']:>8.2f} {r['tokens_per_s']:>9,.0f} "
              f"{r['peak_mib']:>9,.0f} {r['loss_sum']:>10.4f}"
              + (f"   (+ reference pass {r['reference_pass_s']:.2f} s)" if "reference_pass_s" in r else ""))


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(BenchArguments, allow_abbrev=False)
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    problems = problems_of(args)
    if problems:
        raise UserError("bench_dpo.py cannot run:\n  - " + "\n  - ".join(problems))
    pairs = make_pairs(args)
    lengths = np.array([[len(c), len(r)] for _, c, r in pairs])
    print(f"{args.num_pairs} pairs, completion tokens p50 {np.median(lengths):.0f}, p90 {np.quantile(lengths, 0.9):.0f}, "
          f"max {lengths.max()}; model hidden {args.hidden_size} x {args.num_layers} layers, vocab {args.vocab_size}",
          flush=True)
    ctx = mp.get_context("spawn")
    rows = []
    for method in args.methods.split(","):
        runs = []
        for _ in range(args.repeats):
            with ctx.Pool(1) as pool:
                runs.append(pool.apply(run_method, (args, method)))
        rows.append(min(runs, key=lambda r: r.get("seconds", float("inf"))))
        print(f"  {method}: {rows[-1].get('seconds', rows[-1].get('skipped'))}", flush=True)
    print_table(rows)
    sums = [r["loss_sum"] for r in rows if "loss_sum" in r]
    agree = max(sums) - min(sums) <= 1e-3 * max(1.0, abs(sums[0])) if sums else True
    print(f"summed loss {'agrees' if agree else 'DIFFERS'} across methods (same objective at the initial weights)")
    report = {"args": asdict(args), "rows": rows, "loss_agrees": agree}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if run_cli(main)["loss_agrees"] else 1)
