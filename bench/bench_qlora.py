"""QLoRA vs LoRA on the same real model: weight memory and step time of LoRA on a full-precision base, an 8-bit
(LLM.int8) base and a 4-bit (NF4, double quantization) base, loaded the way main.py loads them.

    python bench/bench_qlora.py                    # SmolLM2-135M-Instruct (longsft.pretrained), 1,024-token pack
    python bench/bench_qlora.py --tiny             # a tiny random Llama, 64 tokens: a smoke run (~20 s)
    python bench/bench_qlora.py --modes full,4 --tokens 2048 --repeats 5 --out /tmp/bench_qlora

Measured here (SmolLM2-135M-Instruct, `--tokens 512 --repeats 3`, 2 CPU cores at a load average of ~1.5; torch
2.13 CPU, transformers 5.23, bitsandbytes 0.50.2, fp32; 52 s for the whole run):
    base                     weights MiB  vs full  step s  tokens/s  loss, English text
    full precision (fp32)    513.1        1.000    2.76    186       3.455
    8-bit LLM.int8           209.4        0.408    2.98    172       3.487 (+0.032)
    4-bit NF4 + DQ           158.8        0.309    3.36    152       3.681 (+0.226)
    4 bits leave 31% of the weights (the tied 49,152 x 576 embedding, 108 MiB in fp32, stays unquantized and is
    most of what is left) for a 1.22x slower step on this CPU (the weights are unpacked for every matmul). Under
    a load average of 6-10 the same run gave 46.5 / 47.1 / 46.9 s per step: on a shared machine the steps time
    the other jobs, the weights do not move.

What runs, per mode (--modes: full, 8, 4), in this one process one after the other:
  longsft.train.model.load_model (bitsandbytes through transformers' BitsAndBytesConfig for 8 / 4, the patched
  packed Llama class, fp32 on CPU / bf16 on a GPU) and apply_lora (r 8, alpha 16, no dropout, the family's
  targets: every linear layer but lm_head); one pack of --tokens random tokens in --samples samples (cu_seqlens),
  every token a target; the packed forward with the chunked loss, backward, one SGD step of the adapters.
Measured:
  weights     model.get_memory_footprint() before LoRA: the bytes of every parameter and buffer (4-bit: the packed
              weights and their quantization constants), the figure QLoRA exists to shrink;
  step        forward + backward + optimizer step, --warmup untimed, then the fastest of --repeats (other jobs on a
              shared machine only ever add time);
  loss        of the first step on the random pack (before any update), and of the base on a short English
              paragraph (TEXT): how far the quantized base is from the full one (the text is the meaningful one).
Printed: a markdown table; written: OUT/bench_qlora.json with --out OUT.
On a GPU (CUDA) the same runs in bf16 with peak GPU memory (torch.cuda.max_memory_allocated) per mode as well.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from transformers import HfArgumentParser


LLAMA_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear layer but lm_head
TEXT = ("The lighthouse stood at the end of a long stone pier. Every evening the keeper climbed the narrow stairs, "
        "trimmed the wick and watched the beam sweep across the dark water. Ships passed far out at sea, and in the "
        "morning he wrote their names in a book that nobody else would ever read.")


@dataclass
class BenchArguments:
    model_dir: Optional[str] = field(default=None, metadata={"help": "A Llama-family model folder (default: "
                                                                     "SmolLM2-135M-Instruct, longsft.pretrained)."})
    tiny: bool = field(default=False, metadata={"help": "A tiny random Llama instead (smoke run of the code)."})
    modes: str = field(default="full,8,4", metadata={"help": "Comma list: full (no quantization), 8, 4."})
    tokens: int = field(default=1024, metadata={"help": "Tokens of the pack (--tiny: 64)."})
    samples: int = field(default=4, metadata={"help": "Samples in the pack."})
    warmup: int = field(default=1, metadata={"help": "Untimed steps first."})
    repeats: int = field(default=3, metadata={"help": "Timed steps; the fastest counts."})
    seed: int = field(default=0, metadata={"help": "Seed of the tokens and the LoRA initialisation."})
    out: Optional[str] = field(default=None, metadata={"help": "Write OUT/bench_qlora.json."})


def parse(argv) -> BenchArguments:
    from longsft.errors import UserError

    parser = HfArgumentParser(BenchArguments, allow_abbrev=False)
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    problems = [f"unrecognized arguments: {' '.join(rest)}"] if rest else []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("full", "8", "4")]
    if bad or not modes:
        problems.append(f"--modes {args.modes}: a comma list of full, 8 and 4")
    if args.tiny and args.tokens == 1024:
        args.tokens = 64
    if args.tokens < 2 or args.samples < 1 or args.tokens < args.samples * 2:
        problems.append(f"--tokens {args.tokens} --samples {args.samples}: need at least 2 tokens per sample")
    if args.repeats < 1 or args.warmup < 0:
        problems.append("--repeats must be >= 1 and --warmup >= 0")
    if problems:
        raise UserError("bench_qlora.py: " + "; ".join(problems))
    args.modes = ",".join(modes)
    return args


def make_pack(tokens: int, samples: int, vocab: int, seed: int, device):
    """One pack: `samples` random samples laid end to end, cu_seqlens, every token a target."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    bounds = [round(i * tokens / samples) for i in range(samples + 1)]
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device),
            "attention_mask": torch.tensor(bounds, dtype=torch.int32, device=device)}


def tokenizer_ids(model_dir: str, device):
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], device=device)


def run_mode(mode: str, model_dir: str, args: BenchArguments, device, dtype) -> dict:
    import torch
    import transformers

    from longsft.train.arguments import LoraArguments, ModelArguments
    from longsft.train.model import apply_lora, count_parameters, load_model

    bits = None if mode == "full" else int(mode)
    model_args = ModelArguments(model_name_or_path=model_dir, quantization_bit=bits)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load_model(model_args, "llama", dtype, compute_dtype=dtype)
    load_s = time.perf_counter() - t0
    if bits is None:
        model.to(device)
    weight_bytes = int(model.get_memory_footprint())
    transformers.set_seed(args.seed)
    lora = LoraArguments(use_lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules=LLAMA_LINEAR)
    model = apply_lora(model, lora, None, gradient_checkpointing=False)
    total, trainable = count_parameters(model)
    text = tokenizer_ids(model_dir, device)
    model.eval()
    with torch.no_grad():  # the base's loss on English text (LoRA's B is 0 before the first step)
        text_loss = float(model(input_ids=text, labels=text).loss.item())
    model.train()
    batch = make_pack(args.tokens, args.samples, model.config.vocab_size, args.seed, device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, first_loss = [], None
    for step in range(args.warmup + args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if first_loss is None:
            first_loss = float(loss.item())
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    row = {"mode": mode, "bits": bits or (16 if dtype == torch.bfloat16 else 32), "weight_bytes": weight_bytes,
           "weight_mib": round(weight_bytes / 2**20, 1), "parameters": total, "trainable": trainable,
           "step_seconds": round(min(times), 4), "tokens_per_second": round(args.tokens / min(times), 1),
           "first_loss": round(first_loss, 6), "text_loss": round(text_loss, 6), "load_seconds": round(load_s, 2)}
    if device.type == "cuda":
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    del model, opt, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict], full_bytes: Optional[int]) -> str:
    head = "| base | weights MiB | vs full | step s | tokens/s | loss, random tokens | loss, English text |" + (
        " peak GPU MiB |" if any("peak_gpu_mib" in r for r in rows) else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = {"full": f"full precision ({r['bits']}-bit floats)", "8": "8-bit LLM.int8", "4": "4-bit NF4 + DQ"}[
            r["mode"]]
        ratio = f"{r['weight_bytes'] / full_bytes:.3f}" if full_bytes else "-"
        line = (f"| {name} | {r['weight_mib']:,} | {ratio} | {r['step_seconds']} | {r['tokens_per_second']:,} | "
                f"{r['first_loss']} | {r['text_loss']} |")
        if "peak_gpu_mib" in r:
            line += f" {r['peak_gpu_mib']:,} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import torch

    args = parse(list(sys.argv[1:] if argv is None else argv))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from longsft.tiny.models import make_tiny_model

            model_dir = str(make_tiny_model(Path(tmp) / "tiny-llama3", "llama3"))
        elif args.model_dir:
            model_dir = args.model_dir
        else:
            from longsft.pretrained import smollm2_dir

            model_dir = str(smollm2_dir())
        rows = [run_mode(m, model_dir, args, device, dtype) for m in args.modes.split(",")]
    full_row = next((r for r in rows if r["mode"] == "full"), None)
    full = full_row["weight_bytes"] if full_row else None
    report = {"model_dir": model_dir if not args.tiny else "tiny llama3", "device": str(device),
              "dtype": str(dtype), "tokens": args.tokens, "samples": args.samples, "rows": rows,
              "versions": versions()}
    print(f"[bench_qlora] {report['model_dir']} on {device} ({str(dtype).replace('torch.', '')}), one pack of "
          f"{args.tokens:,} tokens in {args.samples} samples, LoRA r 8 on every linear layer but lm_head")
    print(table(rows, full))
    if full:
        for r in rows:
            if r["mode"] != "full":
                print(f"[bench_qlora] {r['mode']}-bit: weights {r['weight_bytes'] / full:.1%} of the full-precision "
                      f"base, step {r['step_seconds'] / full_row['step_seconds']:.2f}x its time, loss on the English text "
                      f"{r['text_loss'] - full_row['text_loss']:+.4f}")
    if args.out:
        from longsft.atomic_dir import write_json_atomic

        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out) / "bench_qlora.json", report)
    return report


def versions() -> dict:
    import bitsandbytes
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__}


if __name__ == "__main__":
    from longsft.errors import run_cli

    run_cli(main)
