"""Peak memory of forward + backward for one long pack with GLM-4's vocabulary: chunked loss vs unchunked.

    python bench/bench_loss_memory.py          # 32,768-token pack, 151,552 vocab (~7 min on 2 busy CPU cores)
    python bench/bench_loss_memory.py --tokens 2048 --vocab 32000 --chunk_sizes 256,1024   # tiny run (~1 min)

Measured here (2 shared CPU cores, 23 GiB RAM, torch 2.13 CPU), default arguments:
    chunked:1024 tokens 32768: peak RSS 3.40 GiB (after model+inputs 0.68 GiB, forward+backward +2.72 GiB), 432 s
    unchunked    tokens  2048: peak RSS 5.41 GiB (+4.73 GiB) -> at 32768 tokens: computed >= 55.5 GiB,
                               extrapolated peak 76.4 GiB (cannot run on this machine)

Model: patch/modeling_chatglm.py with 2 layers, hidden 256, 4 heads of 64 (2 KV groups), ffn 512, vocab 151,552,
fp32 on CPU; one pack of `--samples` equal-length samples, every target supervised (the worst case for the loss).
Variants, each in a fresh Python subprocess so no allocation of one run leaks into the next:
  chunked    the model's own loss (labels -> patch.packed_attention.causal_lm_loss, `--chunk_sizes` tokens a chunk)
  unchunked  upstream's way: logits = output_layer(hidden).float() for the whole pack, then cross-entropy
Method: the child reads its peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, the kernel's
high-water mark of the whole process, which includes everything torch allocates) once after building the model
and inputs ("base") and once after forward + backward ("peak"). The unchunked variant is run only where its
estimated need (3 fp32 [tokens, vocab] tensors: logits, log-softmax, their gradient) fits in 80% of
MemAvailable; otherwise it is run at `--unchunked_tokens` and its per-token cost extrapolated, and the computed
size is printed.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1024**3


@dataclass
class BenchArguments:
    tokens: int = field(default=32768, metadata={"help": "Tokens in the pack."})
    samples: int = field(default=8, metadata={"help": "Equal-length samples in the pack."})
    vocab: int = field(default=151552, metadata={"help": "Vocabulary (padded_vocab_size); GLM-4 = 151,552."})
    hidden: int = field(default=256, metadata={"help": "Hidden size."})
    layers: int = field(default=2, metadata={"help": "Transformer layers."})
    chunk_sizes: str = field(default="1024", metadata={"help": "Comma-separated loss_chunk_size values to run."})
    unchunked_tokens: int = field(default=2048, metadata={
        "help": "Pack size for the unchunked run when the full size cannot fit (its cost is extrapolated)."})
    threads: int = field(default=0, metadata={"help": "torch threads in the child (0 = torch default)."})
    child: str = field(default="", metadata={"help": "Internal: run one variant ('chunked:N' or 'unchunked')."})


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: ru_maxrss is in KiB


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("inf")


# ---------------------------------------------------------------------------------------------------------------
# Child: one variant
# ---------------------------------------------------------------------------------------------------------------
def run_child(args: BenchArguments) -> dict:
    import torch
    import torch.nn.functional as F

    from patch.configuration_chatglm import ChatGLMConfig
    from patch.modeling_chatglm import ChatGLMForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ChatGLMConfig(num_layers=args.layers, padded_vocab_size=args.vocab, hidden_size=args.hidden,
                        ffn_hidden_size=2 * args.hidden, kv_channels=64, num_attention_heads=args.hidden // 64,
                        multi_query_group_num=2, eos_token_id=[0], pad_token_id=0)
    model = ChatGLMForConditionalGeneration(cfg).train()
    ids = torch.randint(0, args.vocab, (1, args.tokens))
    bounds = [round(i * args.tokens / args.samples) for i in range(args.samples + 1)]
    cu = torch.tensor(bounds, dtype=torch.int32)
    base = _rss_gib()
    start = time.perf_counter()
    if args.child.startswith("chunked"):
        chunk = int(args.child.split(":")[1])
        loss = model(ids, attention_mask=cu, labels=ids, loss_chunk_size=chunk).loss
    else:  # upstream: whole-pack logits cast to fp32, then cross-entropy (boundaries masked the same way)
        hidden = model.transformer(ids, attention_mask=cu).last_hidden_state  # [1, T, H]
        logits = model.transformer.output_layer(hidden).float()  # [1, T, V]: the tensor upstream keeps
        targets = ids[0, 1:].clone()
        targets[cu[1:-1].long() - 1] = -100
        loss = F.cross_entropy(logits[0, :-1], targets, ignore_index=-100)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"variant": args.child, "tokens": args.tokens, "vocab": args.vocab, "loss": round(loss.item(), 4),
            "base_gib": round(base, 3), "peak_gib": round(_rss_gib(), 3), "seconds": round(seconds, 1)}


def _spawn(args: BenchArguments, variant: str, tokens: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--tokens", str(tokens),
           "--samples", str(args.samples), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": variant, "tokens": tokens, "error": f"exit {proc.returncode}: {proc.stderr[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> list[dict]:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    if args.child:
        result = run_child(args)
        print(json.dumps(result))
        return [result]

    logits_gib = args.tokens * args.vocab * 4 / GIB  # one fp32 [tokens, vocab] tensor
    print(f"pack {args.tokens} tokens ({args.samples} samples), vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers, fp32 CPU; one fp32 logits tensor of the pack = {logits_gib:.1f} GiB")
    results = []
    for chunk in [int(c) for c in args.chunk_sizes.split(",") if c]:
        results.append(_spawn(args, f"chunked:{chunk}", args.tokens))
    need = 3 * logits_gib
    if need < 0.8 * _mem_available_gib():
        results.append(_spawn(args, "unchunked", args.tokens))
    else:
        small = min(args.unchunked_tokens, args.tokens)
        measured = _spawn(args, "unchunked", small)
        if "error" not in measured:
            slope = (measured["peak_gib"] - measured["base_gib"]) / small
            measured["extrapolated_peak_gib"] = round(measured["base_gib"] + slope * args.tokens, 1)
        measured["computed_need_gib"] = round(need, 1)
        measured["note"] = (f"unchunked at {args.tokens} tokens needs >= {need:.1f} GiB (3 fp32 [tokens, vocab] "
                            f"tensors), more than this machine has; run at {small} tokens and extrapolated")
        results.append(measured)
    for r in results:
        if "error" in r:
            print(f"{r['variant']:>14} tokens {r['tokens']:>6}: FAILED {r['error']}")
            continue
        line = (f"{r['variant']:>14} tokens {r['tokens']:>6}: peak RSS {r['peak_gib']:.2f} GiB "
                f"(after model+inputs {r['base_gib']:.2f} GiB, forward+backward +{r['peak_gib'] - r['base_gib']:.2f} "
                f"GiB) in {r['seconds']:.0f}s, loss {r['loss']}")
        if "extrapolated_peak_gib" in r:
            line += (f"\n{'':>14} -> at {args.tokens} tokens: computed >= {r['computed_need_gib']} GiB, "
                     f"extrapolated peak {r['extrapolated_peak_gib']} GiB")
        print(line)
    chunked = [r for r in results if r["variant"].startswith("chunked") and "error" not in r]
    if chunked:
        best = min(r["peak_gib"] for r in chunked)
        print(f"goal: chunked peak under 4 GiB -> {'met' if best < 4 else 'NOT met'} ({best:.2f} GiB)")
    return results


if __name__ == "__main__":
    main()
