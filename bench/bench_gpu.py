"""GPU benchmark of the training paths: naive / sort / pack throughput, MFU, loss memory, a GLM-4 run, a profile.

    python bench/bench_gpu.py --out bench/RESULTS.md --profile   # one H200 (what scripts/gpu_check.sh runs)
    python bench/bench_gpu.py --tiny                              # tiny sizes on CPU (or any device): seconds

One process, random weights, nothing downloaded. Parts: 1. environment and the MFU reference (an --matmul_size^3
matmul in the training dtype, random data, 10 back to back after 3 warm-ups). 2. Data: bench_train.py's
LongWriter-like length mix (~3% samples with 2.7k-32k-token replies), random ids, prompts unsupervised, written
with dataset.TokenizedWriter, packed by sort_and_group.py into 32,768-token packs. 3. A Llama-architecture model
(patch/modeling_llama.py, Llama-3.2-1B's shape: 16 layers, hidden 2048, 32 heads / 8 KV, ffn 8192, vocab 128,256
tied: 1.24B parameters), bf16, gradient checkpointing, fused AdamW, one epoch over the SAME samples per method
through the project's readers, collators and loss (LMDataset / LMSortDataset / LMPackDataset, make_collator,
count_targets -> num_items_in_batch as trainer.py passes it, labels -> the chunked causal_lm_loss):
    naive  random order, --naive_batch_size (1) samples a micro-batch
    sort   sorted-batching order, --sort_batch_size similar lengths a micro-batch, padded
    pack   one pack a step (cu_seqlens -> varlen attention); naive and sort accumulate ~a pack's samples a step.
Batches are collated before the clock starts (DataLoader workers overlap that in training). Per method:
supervised target tokens/s, token slots (padding included), peak memory (CUDA allocated; CPU: RSS high-water
mark), model TFLOP/s and MFU. Model FLOPs of a sample of L tokens with S supervised targets: 6 L (linear weights
of the layers) + 6 L^2 layers heads head_dim (causal attention) + 6 S hidden vocab (lm_head on supervised rows
only); checkpointing's recompute (hardware FLOPs, ~4/3 of these) is not counted. 4. The loss's peak memory at
32,768 tokens, GLM-4's 151,552 vocabulary, hidden 4096: chunked causal_lm_loss vs upstream's unchunked fp32
logits + cross-entropy. 5. A GLM-4-architecture run (patch/modeling_chatglm.py, 16 layers, hidden 2048, 16 heads
of 128, 2 KV groups, ffn 6848, vocab 151,552: 1.4B parameters), pack. 6. --profile: torch.profiler over two
Llama pack steps: time per op category, top kernels, share of wall time the GPU was busy (what limits MFU).
Goals printed against the figures: pack >= 2.5x naive supervised tokens/s; MFU of pack >= 45%. The markdown is
printed part by part and, with --out, rewritten after each part (a run cut short keeps what it measured), the
figures beside it as JSON. A failed part or method is reported, the rest still runs, the exit status is 1.

Expected wall time on one H200 (from FLOP counts at ~350 TFLOP/s; not yet measured): start-up and matmul 15 s,
data 5 s, Llama init 5 s, naive 15-30 s, sort 20-40 s, pack 10-15 s, profile 10 s, loss memory 10 s, GLM-4 init
and pack 20 s: 2-3 minutes; --max_method_seconds (60) caps each method's timed epoch. --tiny on 2 CPU cores:
~10 s after the imports.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import HfArgumentParser

try:  # the markdown of the report: a sibling module (bench/ is not a package)
    from bench.gpu_report import (GIB, GOAL_MFU, GOAL_PACK_VS_NAIVE, TABLE, gib, goal_lines,  # noqa: F401
                                  model_line, profile_lines, table_row)
except ImportError:  # run as `python bench/bench_gpu.py` without the checkout on sys.path: bench/ is
    from gpu_report import (GIB, GOAL_MFU, GOAL_PACK_VS_NAIVE, TABLE, gib, goal_lines,  # noqa: F401
                            model_line, profile_lines, table_row)


METHODS = ("naive", "sort", "pack")


def _arg(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class BenchArguments:
    tiny: bool = _arg(False, "Tiny sizes (TINY below) for a smoke run in seconds, CPU or GPU; overrides the sizes.")
    out: Optional[str] = _arg(None, "Markdown report file (rewritten after each part); figures beside it as .json.")
    device: str = _arg("auto", "auto (cuda when available, else cpu), cuda or cpu.")
    dtype: str = _arg("auto", "Weights and activations: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float32.")
    seed: int = _arg(0, "Seed of the lengths, tokens, weights and naive order.")
    max_length: int = _arg(32768, "Pack size and longest sample.")
    num_samples: int = _arg(256, "Samples in the mix (~9 packs of 32k).")
    long_fraction: float = _arg(0.03, "Share of long (LongWriter-like) samples.")
    layers: int = _arg(16, "Llama layers.")
    hidden: int = _arg(2048, "Llama hidden size.")
    heads: int = _arg(32, "Llama attention heads.")
    kv_heads: int = _arg(8, "Llama KV heads (GQA).")
    ffn: int = _arg(8192, "Llama intermediate size.")
    vocab: int = _arg(128256, "Llama vocabulary (tied embeddings).")
    glm: bool = _arg(True, "Run the GLM-4-architecture pack run (--no_glm skips it); --layers, --hidden as Llama.")
    glm_heads: int = _arg(16, "GLM-4 attention heads (head dim = hidden / heads).")
    glm_kv_groups: int = _arg(2, "GLM-4 multi_query_group_num.")
    glm_ffn: int = _arg(6848, "GLM-4 ffn_hidden_size.")
    glm_vocab: int = _arg(151552, "GLM-4 padded_vocab_size.")
    methods: str = _arg("naive,sort,pack", "Comma list of the Llama batch methods.")
    naive_batch_size: int = _arg(1, "Samples per naive micro-batch.")
    sort_batch_size: int = _arg(8, "Samples per sort micro-batch (sort_and_group --group_size).")
    warmup_steps: int = _arg(1, "Untimed optimizer steps before each method's epoch.")
    max_method_seconds: float = _arg(60.0, "Cap of a method's timed epoch (tokens/s then covers the steps done).")
    lr: float = _arg(1e-5, "AdamW learning rate.")
    gradient_checkpointing: bool = _arg(True, "Checkpoint every decoder layer.")
    loss_tokens: int = _arg(32768, "Tokens of the loss-memory measurement.")
    loss_vocab: int = _arg(151552, "Vocabulary of the loss-memory measurement.")
    loss_hidden: int = _arg(4096, "Hidden size of the loss-memory measurement.")
    loss_chunk_size: int = _arg(1024, "Tokens per chunk of the chunked loss.")
    matmul_size: int = _arg(8192, "n of the n x n x n matmul that gives the reference rate.")
    profile: bool = _arg(False, "Profile Llama pack steps with torch.profiler.")
    profile_steps: int = _arg(2, "Pack steps under the profiler.")
    attn_backend: str = _arg("", "Force PACKED_ATTN_BACKEND (flash_attn, torch_varlen, sdpa); default: the best.")


TINY = dict(max_length=512, num_samples=32, layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512,
            glm_heads=2, glm_kv_groups=1, glm_ffn=128, glm_vocab=512,
            sort_batch_size=4, loss_tokens=1024, loss_vocab=4096, loss_hidden=64, loss_chunk_size=256,
            matmul_size=256)


# ---- report, memory, timing helpers -------------------------------------------------------------
class Report:
    """Markdown sections (printed when added, in ORDER in the file) and the figures (JSON), rewritten each time."""
    ORDER = ("head", "data", "train", "goals", "loss", "profile")

    def __init__(self, out: Optional[str]):
        self.out, self.sections, self.figures = (Path(out) if out else None), {}, {}

    def add(self, key: str, lines: list[str]) -> None:
        self.sections[key] = self.sections.get(key, []) + lines
        print("\n".join(lines) + "\n", flush=True)
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(self.markdown())
            self.out.with_suffix(".json").write_text(json.dumps(self.figures, indent=2, default=str))

    def markdown(self) -> str:
        keys = [k for k in self.ORDER if k in self.sections] + [k for k in self.sections if k not in self.ORDER]
        return "\n\n".join("\n".join(self.sections[k]) for k in keys) + "\n"


def _proc_status(key: str) -> Optional[int]:
    with contextlib.suppress(OSError, AttributeError):
        return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024
    return None


class Memory:
    """Peak memory: CUDA's allocator statistics; on CPU the process RSS high-water mark (VmHWM, reset through
    /proc/self/clear_refs where the kernel allows it). reset() returns the memory in use then."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> Optional[int]:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        return _proc_status("VmRSS")

    def peak(self) -> Optional[int]:
        if self.cuda:
            torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() if self.cuda else _proc_status("VmHWM")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    from patch import packed_attention as PA

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "python": platform.python_version(), "dtype": str(dtype).replace("torch.", ""),
           "packed_backends": PA.available_backends(device, dtype), "flash_attn": PA._flash_attn_available()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / GIB:.1f} GiB"
    else:
        env["device"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def matmul_rate(n: int, device: torch.device, dtype: torch.dtype, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on random data: `reps` back to back after 3 warm-ups (mean)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# ---- data: a LongWriter-like length mix of random tokens, packed by sort_and_group.py ----------------
def mix_lengths(args: BenchArguments, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """(prompt, reply) token counts and the number of long samples. At 32k: general prompts log-normal(median
    150, sigma 1.0), replies log-normal(400, 0.8); long samples: prompts log-normal(100, 0.5), replies
    log-uniform in [2.7k, 32k]; scaled by max_length / 32768, each sample cut to max_length (reply first)."""
    n = args.num_samples
    n_long = max(1, round(n * args.long_fraction))
    kinds = np.array([1] * n_long + [0] * (n - n_long))
    rng.shuffle(kinds)
    scale = args.max_length / 32768
    q = np.where(kinds == 1, rng.lognormal(math.log(100), 0.5, n), rng.lognormal(math.log(150), 1.0, n))
    r = np.where(kinds == 1, np.exp(rng.uniform(math.log(2700), math.log(32768), n)),
                 rng.lognormal(math.log(400), 0.8, n))
    q = np.clip(np.round(q * scale), 1, args.max_length - 1).astype(np.int64)
    r = np.clip(np.round(r * scale), 1, None).astype(np.int64)
    return q, np.minimum(r, args.max_length - q), n_long


def make_data(work: Path, args: BenchArguments, max_id: int) -> dict:
    from longsft.data import sort_and_group
    from longsft.data.storage import IGNORE_INDEX, TokenizedWriter
    from longsft.train.batches import LMPackDataset

    rng = np.random.default_rng(args.seed)
    q, r, n_long = mix_lengths(args, rng)
    lengths = q + r
    ids = rng.integers(3, max_id, size=int(lengths.sum())).astype(np.int32)
    labels = ids.copy()
    for start, n in zip(np.cumsum(lengths) - lengths, q):
        labels[start:start + n] = IGNORE_INDEX
    data = work / "data"
    with TokenizedWriter(data, {"source": "bench_gpu.py random tokens", "max_length": args.max_length}) as w:
        w.add_batch(ids, labels, lengths)
        w.commit()
    with contextlib.redirect_stdout(io.StringIO()):  # its long report; the figures we need are read below
        sort_and_group.main(["--train_file", str(data), "--max_length", str(args.max_length), "--group_size",
                             str(args.sort_batch_size), "--seed", str(args.seed), "--no_plot"])
    packs = LMPackDataset(data)
    return {"dir": str(data), "samples": int(lengths.size), "long": n_long, "tokens": int(lengths.sum()),
            "targets": int(np.asarray(packs.pack_num_targets).sum()), "p50": int(np.median(lengths)),
            "p99": int(np.percentile(lengths, 99)), "max": int(lengths.max()), "packs": len(packs),
            "fill": float(np.mean(packs.pack_lengths / args.max_length)), "per_pack": lengths.size / len(packs)}


def collate_steps(method: str, data_dir: str, args: BenchArguments, samples_per_pack: float,
                  device: torch.device) -> list[list[dict]]:
    """Optimizer steps of `method` over the whole dataset: lists of collated micro-batches (pinned on CUDA)."""
    from longsft.train.batches import LMDataset, LMPackDataset, LMSortDataset, make_collator

    if method == "pack":
        ds, bs, accum = LMPackDataset(data_dir), 1, 1
        order = np.arange(len(ds))
    else:
        ds = LMSortDataset(data_dir) if method == "sort" else LMDataset(data_dir)
        order = np.arange(len(ds)) if method == "sort" else np.random.default_rng(args.seed).permutation(len(ds))
        bs = args.sort_batch_size if method == "sort" else args.naive_batch_size
        accum = max(1, round(samples_per_pack / bs))  # about a pack's samples per optimizer step
    collate = make_collator(method, pad_token_id=0)
    micro = [collate([ds[int(i)] for i in order[j:j + bs]]) for j in range(0, len(order), bs)]
    if device.type == "cuda":
        micro = [{k: v.pin_memory() for k, v in b.items()} for b in micro]
    return [micro[j:j + accum] for j in range(0, len(micro), accum)]


# ---- models, FLOPs, training ----------------------------------------------------------------------
def build_model(family: str, args: BenchArguments, device: torch.device, dtype: torch.dtype):
    if family == "llama":
        from transformers import LlamaConfig

        from patch.modeling_llama import LlamaForCausalLM as cls

        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                          max_position_embeddings=args.max_length, tie_word_embeddings=True, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, use_cache=False)
    else:
        from patch.configuration_chatglm import ChatGLMConfig
        from patch.modeling_chatglm import ChatGLMForConditionalGeneration as cls

        cfg = ChatGLMConfig(num_layers=args.layers, padded_vocab_size=args.glm_vocab, hidden_size=args.hidden,
                            ffn_hidden_size=args.glm_ffn, kv_channels=args.hidden // args.glm_heads,
                            num_attention_heads=args.glm_heads, multi_query_group_num=args.glm_kv_groups,
                            seq_length=args.max_length, rope_ratio=500, eos_token_id=[2], pad_token_id=0,
                            use_cache=False)
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # weights made in dtype on the device: no fp32 copy, no host initialisation
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    if args.gradient_checkpointing and hasattr(model, "activation_checkpointing_enable"):  # its name in 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif args.gradient_checkpointing:  # 5.17 has only the old name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def model_shape(model) -> dict:
    """What the FLOP count needs: the layers' linear weights (lm_head excluded), attention width, layers, ..."""
    head, cfg = model.get_output_embeddings(), model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    if cfg.model_type == "chatglm":
        attn, layers = cfg.num_attention_heads * cfg.kv_channels, cfg.num_layers
    else:
        attn, layers = cfg.num_attention_heads * cfg.head_dim, cfg.num_hidden_layers
    from transformers.modeling_layers import GradientCheckpointingLayer

    ckpt = sum(bool(m.gradient_checkpointing) for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    return {"linear": linear, "attn": attn, "layers": layers, "hidden": cfg.hidden_size, "checkpointed": ckpt,
            "vocab": head.weight.shape[0], "params": sum(p.numel() for p in model.parameters())}


def batch_stats(batch: dict, shape: dict) -> dict:
    """Real tokens, token slots, supervised targets and model FLOPs (module docstring) of one micro-batch."""
    from longsft.train.batches import count_targets

    mask = batch["attention_mask"]
    lengths = (mask[1:] - mask[:-1]).double() if mask.dim() == 1 else mask.sum(dim=1).double()
    targets, tokens = count_targets(batch)[0], int(lengths.sum())
    flops = (6 * tokens * shape["linear"] + 6 * float((lengths**2).sum()) * shape["layers"] * shape["attn"]
             + 6 * targets * shape["hidden"] * shape["vocab"])
    return {"tokens": tokens, "slots": int(batch["input_ids"].numel()), "targets": targets, "flops": flops}


def train_step(model, opt, step: list[dict], device: torch.device) -> torch.Tensor:
    """One optimizer step over its micro-batches, the loss normalised over the whole step as trainer.py does."""
    from longsft.train.batches import count_targets

    n_items = torch.tensor(max(1, sum(count_targets(b)[0] for b in step)), device=device)
    total = torch.zeros((), device=device)
    for b in step:
        loss = model(**{k: v.to(device, non_blocking=True) for k, v in b.items()}, num_items_in_batch=n_items).loss
        loss.backward()
        total += loss.detach().float()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def run_method(name: str, model, opt, steps: list[list[dict]], shape: dict, args: BenchArguments,
               device: torch.device, mem: Memory) -> dict:
    """--warmup_steps untimed steps, then the timed epoch (cut after --max_method_seconds)."""
    try:
        for step in steps[:args.warmup_steps]:
            train_step(model, opt, step, device)
        mem.reset()
        t0 = time.perf_counter()
        loss, done = torch.zeros((), device=device), []
        for step in steps:
            loss += train_step(model, opt, step, device)
            done.append(step)
            if time.perf_counter() - t0 > args.max_method_seconds:
                break
        sync(device)
        seconds = time.perf_counter() - t0
    except Exception as e:  # out of memory, a backend that fails: reported in the table, the next method runs
        traceback.print_exc()
        opt.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"method": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    stats = [batch_stats(b, shape) for s in done for b in s]
    total = {k: sum(s[k] for s in stats) for k in ("tokens", "slots", "targets", "flops")}
    return {"method": name, "steps": len(done), "of_steps": len(steps), "micro_batches": len(stats),
            "seconds": seconds, **total, "tokens_per_s": total["targets"] / seconds,
            "flops_per_s": total["flops"] / seconds, "peak_bytes": mem.peak(), "mean_loss": float(loss) / len(done)}


def attention_ran() -> list[str]:
    """The attention paths this process ran, from patch.packed_attention's log-once keys."""
    from patch import packed_attention as PA

    return sorted(f"packed attention backend: {k.split(':', 1)[1]}" if k.startswith("backend:") else
                  "unpacked batch: transformers' SDPA" for k in PA._logged if k.startswith(("backend:", "sdpa-")))


def train_part(family: str, methods: list[str], steps: dict, args, device, dtype, mem) -> dict:
    t0 = time.perf_counter()
    model = build_model(family, args, device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    out = {"shape": model_shape(model), "init_s": time.perf_counter() - t0, "results": {}}
    for m in methods:
        out["results"][m] = run_method(m, model, opt, steps[m], out["shape"], args, device, mem)
        print(f"[bench_gpu] {family} {m}: {json.dumps(out['results'][m])}", file=sys.stderr)
    out["attention"] = attention_ran()
    if args.profile and family == "llama" and "pack" in steps:
        try:
            out["profile"] = profile_pack(model, opt, steps["pack"], device, args.profile_steps)
        except Exception as e:  # the profiler is an extra; the figures above stand
            out["profile"] = {"error": f"{type(e).__name__}: {e}"}
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- loss memory and the profile ------------------------------------------------------------------
def loss_memory(args: BenchArguments, device: torch.device, dtype: torch.dtype, mem: Memory) -> list[dict]:
    """Peak memory above the inputs of forward + backward of the loss over --loss_tokens rows: chunked (ours)
    vs upstream's whole-pack fp32 logits + cross-entropy (skipped where it cannot fit)."""
    import torch.nn.functional as F

    from patch.packed_attention import causal_lm_loss

    t, v, h = args.loss_tokens, args.loss_vocab, args.loss_hidden
    torch.manual_seed(args.seed)
    head = torch.nn.Linear(h, v, bias=False, device=device, dtype=dtype)
    hidden = torch.randn(1, t, h, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (1, t), device=device)
    rows = []
    for variant in (f"chunked ({args.loss_chunk_size} tokens a chunk)", "unchunked (upstream)"):
        chunked = variant.startswith("chunked")
        need = 3 * t * v * 4 + 2 * t * v * hidden.element_size()  # fp32 logits, log-softmax, grad + 2 in dtype
        free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else None
        if not chunked and free is not None and need > 0.9 * free:
            rows.append({"variant": variant, "skipped": f"needs ~{need / GIB:.0f} GiB, {free / GIB:.0f} GiB free"})
            continue
        base, t0 = mem.reset(), time.perf_counter()
        if chunked:
            loss = causal_lm_loss(hidden, head, labels, chunk_size=args.loss_chunk_size)
        else:
            loss = F.cross_entropy(head(hidden).float()[0, :-1], labels[0, 1:])  # [T, V] fp32: what upstream keeps
        loss.backward()
        peak = mem.peak()
        rows.append({"variant": variant, "loss": float(loss.detach()), "seconds": time.perf_counter() - t0,
                     "peak_extra_bytes": None if peak is None or base is None else peak - base})
        del loss
        hidden.grad = head.weight.grad = None
    return rows


CATEGORIES = (  # (category, kernel / op name pattern): the first match wins
    ("attention", r"flash|fmha|attention|varlen|sdpa|softmax_warp"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|wgmma|cublas|sm90_|sm80_|aten::(mm|addmm|bmm|matmul)$"),
    ("loss (softmax/CE)", r"logsumexp|log_softmax|cross_entropy|nll_loss|scatter_add|gather"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("memcpy/memset", r"memcpy|memset"),
    ("norm/elementwise/reduce", r"elementwise|vectorized|unrolled|reduce|norm|rsqrt|pow|mul|add|silu|cat|copy|"
                                r"index|fill|where|cos|sin|neg|exp"),
)


def profile_pack(model, opt, steps: list[list[dict]], device: torch.device, n: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for step in steps[:n]:
            train_step(model, opt, step, device)
        sync(device)
    wall = time.perf_counter() - t0

    def self_s(e) -> float:  # microseconds -> seconds
        return (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6

    events = prof.key_averages()
    kernels = [e for e in events if cuda and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    kernels = kernels or [e for e in events if self_s(e) > 0]
    cats: dict[str, float] = {}
    for e in kernels:
        cat = next((c for c, pat in CATEGORIES if re.search(pat, e.key, re.I)), "other")
        cats[cat] = cats.get(cat, 0.0) + self_s(e)
    return {"steps": min(n, len(steps)), "wall_s": wall, "busy_s": sum(self_s(e) for e in kernels),
            "what": "CUDA kernels" if cuda else "CPU ops",
            "categories": dict(sorted(cats.items(), key=lambda c: -c[1])),
            "top": [{"name": e.key, "calls": int(e.count), "seconds": self_s(e)}
                    for e in sorted(kernels, key=self_s, reverse=True)[:12]]}


# ---- main: the parts in order; a part that fails is reported and the next one still runs ------------
def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    if args.attn_backend:
        os.environ["PACKED_ATTN_BACKEND"] = args.attn_backend
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(f"--methods {args.methods}: a comma list of {', '.join(METHODS)}")
    report, mem, failed = Report(args.out), Memory(device), []
    report.figures["args"] = asdict(args)

    def part(key: str, title: str, fn):
        try:
            return fn()
        except Exception as e:
            failed.append(title)
            traceback.print_exc()
            report.add(key, [f"**{title} FAILED**: `{type(e).__name__}: {str(e)[:500]}`"])

    env = environment(device, dtype)  # 1. environment and the MFU reference
    peak = matmul_rate(args.matmul_size, device, dtype)
    report.figures.update(env=env, matmul_flops_per_s=peak)
    n = args.matmul_size
    report.add("head", [
        "# bench/bench_gpu.py" + (" (--tiny: a smoke run of the code paths, not a measurement)" if args.tiny else ""),
        "", f"- command: `python bench/bench_gpu.py {' '.join(argv)}`",
        f"- device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
        f"Python {env['python']}",
        f"- {env['dtype']} weights and activations, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, AdamW lr {args.lr}; packed-attention backends available: "
        f"{', '.join(env['packed_backends'])} (flash-attn installed: {'yes' if env['flash_attn'] else 'no'})",
        f"- MFU reference: {n}x{n}x{n} {env['dtype']} matmul at {peak / 1e12:.3g} TFLOP/s (mean of 10 after 3 "
        f"warm-ups)"])

    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        data = make_data(work, args, max_id=min(args.vocab, args.glm_vocab))  # 2. data
        steps = {m: collate_steps(m, data["dir"], args, data["per_pack"], device)
                 for m in dict.fromkeys(methods + (["pack"] if args.glm else []))}
        bs = {"naive": args.naive_batch_size, "sort": args.sort_batch_size}
        desc = {m: "1 pack" if m == "pack" else f"{bs[m]} x {len(steps[m][0])}" for m in steps}
        report.figures["data"] = data
        report.add("data", [
            "## Data", "",
            f"- {data['samples']} samples ({data['long']} LongWriter-like long ones), {data['tokens']:,} tokens, "
            f"{data['targets']:,} supervised targets; sample length p50 {data['p50']:,}, p99 {data['p99']:,}, "
            f"max {data['max']:,}",
            f"- {data['packs']} packs of <= {args.max_length:,} tokens (mean fill {data['fill']:.1%}, "
            f"{data['per_pack']:.1f} samples a pack); an optimizer step = micro-batch samples x accumulation: "
            + ", ".join(f"{m} {desc[m]}" for m in methods)])

        llama = part("train", "Llama training", lambda: train_part(  # 3. Llama naive / sort / pack (+ 6. profile)
            "llama", methods, steps, args, device, dtype, mem))
        if llama:
            report.figures["llama"] = llama
            res = llama["results"]
            failed += [f"llama {m}" for m, r in res.items() if "error" in r]
            what = (f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV, ffn "
                    f"{args.ffn}, vocab {args.vocab:,} (tied)")
            report.add("train", [f"## Training throughput (same samples, one epoch per method after "
                                 f"{args.warmup_steps} warm-up step(s))", "", model_line("Llama", llama, what), "",
                                 *TABLE, *[table_row("llama", r, res.get("naive"), peak, desc[m]) for m, r in res.items()]])
            report.add("goals", goal_lines(res, peak, llama["attention"]))
            if llama.get("profile"):
                report.add("profile", profile_lines(llama["profile"], device))

        rows = part("loss", "Loss memory", lambda: loss_memory(args, device, dtype, mem))  # 4. loss memory
        if rows:
            report.figures["loss_memory"] = rows
            report.add("loss", [
                f"## Loss memory: {args.loss_tokens:,} tokens, vocab {args.loss_vocab:,}, hidden {args.loss_hidden}, "
                f"{env['dtype']} (forward + backward, peak above the inputs"
                f"{'' if device.type == 'cuda' else '; CPU: RSS high-water mark'})", "",
                "| loss | peak GiB | seconds | loss value |", "|---|---|---|---|",
                *[f"| {r['variant']} | skipped: {r['skipped']} | - | - |" if "skipped" in r else
                  f"| {r['variant']} | {gib(r['peak_extra_bytes'])} | {r['seconds']:.2f} | {r['loss']:.4f} |"
                  for r in rows]])

        glm = args.glm and part("glm4", "GLM-4 training", lambda: train_part(  # 5. GLM-4 architecture, pack
            "glm4", ["pack"], steps, args, device, dtype, mem))
        if glm:
            report.figures["glm4"] = glm
            failed += ["glm4 pack"] if "error" in glm["results"]["pack"] else []
            what = (f"{args.layers} layers, hidden {args.hidden}, {args.glm_heads} heads of "
                    f"{args.hidden // args.glm_heads} / {args.glm_kv_groups} KV groups, ffn {args.glm_ffn}, vocab "
                    f"{args.glm_vocab:,}")
            report.add("train", ["", model_line("GLM-4 architecture", glm, what), "", *TABLE,
                                 table_row("glm4", glm["results"]["pack"], None, peak, desc["pack"])])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        raise SystemExit(f"bench_gpu.py: {', '.join(failed)} failed (see the report and the traceback above)")
    return report.figures


if __name__ == "__main__":
    main()
