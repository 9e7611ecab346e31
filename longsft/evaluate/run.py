"""What `evaluate.py` runs: generate replies with a trained model and score them (LongBench-Write's S_l and S_q,
GLM-Edge's ROUGE/BLEU and the eval loss), or score a prediction file.

    # LongBench-Write (LongWriter's evaluation/longbench_write.jsonl; longwrite_ruler.jsonl the same way)
    python evaluate.py --model_dir output/glm4/longwriter --data longbench_write.jsonl --output_dir eval/lbw
    python evaluate.py --model_dir output/glm4/longwriter --data longbench_write.jsonl --output_dir eval/lbw \\
        --backend vllm --judge_base_url https://api.openai.com/v1 --judge_model gpt-4o-2024-05-13
    # an existing pred.jsonl (LongWriter's fields), lengths recounted from `response`
    python evaluate.py --predictions models/LongWriter-glm4-9b/pred.jsonl --output_dir eval/upstream
    # GLM-Edge-style generation metrics on a chat test set (any format pre_tokenize.py reads) + its eval loss
    python evaluate.py --model_dir output/glm-edge --test_file dev.jsonl --output_dir eval/dev --max_new_tokens 512
    # tiny CPU run
    python tools/make_tiny.py model --family qwen2 --out /tmp/tiny-qwen2
    python evaluate.py --model_dir /tmp/tiny-qwen2 --test_file data/sample.jsonl --output_dir /tmp/ev \\
        --max_new_tokens 16 --temperature 0

Outputs in --output_dir: predictions.jsonl (appended one line per reply as it finishes: a killed run resumes where
it stopped, a finished one generates nothing; generation.json records the settings and a resumed run must match
them), scores.json (written atomically: S_l, by_type, by_length, S_q when judged; rouge-1, rouge-2, rouge-l,
bleu-4, eval_loss for a test set; generation tokens/s), length_scatter.png (log-log required vs produced length),
judgments.jsonl (the judge's answers, the cache), skipped.jsonl (test records that could not be used, with their
line and reason), and a summary printed at the end (progress bars with tokens/s on stderr; LONGSFT_NO_PROGRESS=1
turns them off). Generation: longsft/evaluate/generate.py; S_l: length.py;
S_q: judge.py; ROUGE/BLEU: metrics.py; eval loss: loss.py; inputs and the prediction log: records.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from longsft.atomic_dir import write_json_atomic
from longsft.errors import UserError, run_cli
from longsft.evaluate import judge as judge_lib
from longsft.evaluate.length import LENGTH_BUCKETS, count_words, length_report, parse_buckets
from longsft.evaluate.metrics import corpus_scores
from longsft.evaluate.records import PredictionLog, read_benchmark, read_predictions, read_test_set
from longsft.evaluate.report import length_scatter, summary

logger = logging.getLogger("longsft.evaluate")
GENERATION_FILE = "generation.json"


@dataclass
class EvaluateArguments:
    output_dir: str = field(metadata={"help": "Folder for predictions.jsonl, scores.json, length_scatter.png, "
                                              "judgments.jsonl (created; a run resumes from what it holds)."})
    model_dir: Optional[str] = field(default=None, metadata={"help": "main.py output folder (model, merged model or "
                                                                     "LoRA adapter) or any model folder."})
    data: Optional[str] = field(default=None, metadata={"help": "LongBench-Write JSONL of {prompt, type, length} "
                                                                "(longbench_write.jsonl, longwrite_ruler.jsonl)."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Chat test set (any pre_tokenize.py format): "
                                                                     "ROUGE/BLEU of the last assistant reply, eval "
                                                                     "loss."})
    predictions: Optional[str] = field(default=None, metadata={"help": "Score this prediction file instead of "
                                                                       "generating (LongWriter's pred.jsonl, or a "
                                                                       "test-set predictions.jsonl)."})
    template: Optional[str] = field(default=None, metadata={"help": "Chat template (default: the one the model "
                                                                    "was trained with, else the family's)."})
    backend: str = field(default="hf", metadata={"help": "hf (transformers) or vllm.", "choices": ["hf", "vllm"]})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on a GPU that has it, else fp32), bfloat16, "
                                                         "float16, float32."})
    max_new_tokens: int = field(default=32768, metadata={"help": "Most tokens per reply (LongWriter: 32768)."})
    temperature: float = field(default=0.5, metadata={"help": "Sampling temperature (LongWriter: 0.5); 0 = greedy."})
    top_p: float = field(default=0.8, metadata={"help": "Nucleus sampling (LongWriter's vLLM script: 0.8)."})
    top_k: int = field(default=50, metadata={"help": "Top-k sampling (LongWriter's vLLM script: 50)."})
    seed: int = field(default=42, metadata={"help": "Sampling seed (each batch: seed + its first index)."})
    batch_size: int = field(default=4, metadata={"help": "Prompts generated together (left-padded)."})
    max_samples: Optional[int] = field(default=None, metadata={
        "help": "Only the first N records (a quick look; --test_file: the first N its chat format can write as a "
                "prompt)."})
    length_buckets: str = field(default=",".join(map(str, LENGTH_BUCKETS)),
                                metadata={"help": "Required-length ranges of by_length (LongBench-Write's)."})
    eval_loss: bool = field(default=True, metadata={"help": "With --test_file: also the eval loss."})
    judge_base_url: Optional[str] = field(default=None, metadata={"help": "OpenAI-compatible endpoint for S_q, "
                                                                          "e.g. https://api.openai.com/v1."})
    judge_model: Optional[str] = field(default=None, metadata={"help": "Judge model (LongWriter: "
                                                                       "gpt-4o-2024-05-13)."})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the "
                                                                               "judge's API key."})
    judge_workers: int = field(default=4, metadata={"help": "Judge requests in flight."})
    judge_retries: int = field(default=4, metadata={"help": "New requests for a malformed or incomplete answer."})
    judge_timeout: float = field(default=600.0, metadata={"help": "Seconds per judge request."})


def check_arguments(a: EvaluateArguments) -> tuple[str, list[str]]:
    """(mode "data" | "test" | "predictions", problems)."""
    problems = []
    given = [f for f in ("data", "test_file", "predictions") if getattr(a, f)]
    if len(given) != 1:
        problems.append("give one of --data (LongBench-Write prompts), --test_file (a chat test set) or "
                        f"--predictions (a file to score){'; got ' + ', '.join('--' + g for g in given) if given else ''}")
    mode = {"data": "data", "test_file": "test", "predictions": "predictions"}.get(given[0] if given else "", "")
    if mode in ("data", "test") and not a.model_dir:
        problems.append(f"--{given[0]} needs --model_dir (the model that writes the replies)")
    if mode == "predictions" and a.model_dir:
        problems.append("--predictions scores an existing file: leave out --model_dir (or drop --predictions to "
                        "generate)")
    if a.model_dir and not Path(a.model_dir).is_dir():
        problems.append(f"--model_dir {a.model_dir}: no such folder")
    for name in ("max_new_tokens", "batch_size", "judge_workers"):
        if getattr(a, name) < 1:
            problems.append(f"--{name} {getattr(a, name)}: must be at least 1")
    if a.max_samples is not None and a.max_samples < 1:
        problems.append(f"--max_samples {a.max_samples}: must be at least 1")
    if not 0 < a.top_p <= 1:
        problems.append(f"--top_p {a.top_p}: must be in (0, 1]")
    if a.temperature < 0:
        problems.append(f"--temperature {a.temperature}: must be >= 0 (0 = greedy)")
    if a.judge_retries < 0:
        problems.append(f"--judge_retries {a.judge_retries}: must be >= 0")
    try:
        parse_buckets(a.length_buckets)
    except ValueError as e:
        problems.append(f"--length_buckets {e}")
    if bool(a.judge_base_url) != bool(a.judge_model):
        problems.append("the judge needs both --judge_base_url and --judge_model")
    if a.judge_base_url and mode == "test":
        problems.append("--judge_base_url scores LongBench-Write replies (S_q); a --test_file is scored by "
                        "ROUGE/BLEU against its references")
    if a.judge_base_url and not a.judge_base_url.startswith(("http://", "https://")):
        problems.append(f"--judge_base_url {a.judge_base_url}: expected an http(s) URL, e.g. "
                        f"https://api.openai.com/v1")
    return mode, problems


def parse_args(argv: list[str] | None) -> EvaluateArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EvaluateArguments, allow_abbrev=False)  # exact flag names
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


# ----------------------------------------------------------------------------------------------
# Generation with resume
# ----------------------------------------------------------------------------------------------

REQUESTED = ("template", "backend", "dtype", "max_new_tokens", "temperature", "top_p", "top_k", "seed")


def requested_settings(args: EvaluateArguments) -> dict:
    """The settings that decide the replies, as asked for (a resumed or finished run must ask for the same)."""
    return {"model_dir": str(Path(args.model_dir).resolve()), **{k: getattr(args, k) for k in REQUESTED}}


def check_settings(out: Path, requested: dict, log: PredictionLog) -> None:
    """Replies already in OUTPUT_DIR were made with `requested`, else a UserError naming what changed."""
    path = out / GENERATION_FILE
    if not (path.is_file() and log.done):
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    changed = [f"{k}: {before.get(k)!r} then, {v!r} now" for k, v in requested.items() if before.get(k) != v]
    if changed:
        raise UserError(f"{out} holds {len(log.done)} replies generated with other settings ({'; '.join(changed)}); "
                        f"use another --output_dir, or the same settings to resume")


def generate_all(args: EvaluateArguments, items: list[dict], out: Path, make_record, prompt_of,
                 gen=None) -> tuple[list[dict], dict, object]:
    """Replies for every item, resuming OUTPUT_DIR/predictions.jsonl: (records in item order, generation stats,
    the Generator or None when nothing had to be loaded).
    `prompt_of(gen, item)` -> prompt token ids; `make_record(item, output)` -> the JSON line."""
    from tqdm import tqdm

    from longsft.evaluate.generate import Generator, Sampling, generation_settings

    log = PredictionLog(out / "predictions.jsonl")
    keys = ("prompt",) if "context" not in items[0] else ("prompt", "reference")
    log.check_against(items, keys)
    todo = [it for it in items if it["index"] not in log.done]
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    stats = {"backend": args.backend, "device": "-", "new_items": 0, "resumed_items": len(items) - len(todo),
             "new_tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0, "finish_reasons": {}}
    requested = requested_settings(args)
    check_settings(out, requested, log)
    if not todo:
        logger.info("%s already holds all %d replies: nothing to generate", out / "predictions.jsonl", len(items))
        return log.ordered(len(items)), stats, gen
    gen = gen or Generator.load(args.model_dir, args.template, args.backend, args.dtype)
    stats["device"] = gen.device
    write_json_atomic(out / GENERATION_FILE, {**requested, **generation_settings(gen)})
    logger.info("generating %d replies (%d already in %s) with %s, template %s, stops %s, %s", len(todo),
                stats["resumed_items"], out / "predictions.jsonl", args.model_dir, gen.template, gen.stops,
                "greedy" if args.temperature <= 0 else f"temperature {args.temperature}, top_p {args.top_p}, "
                                                       f"top_k {args.top_k}")
    bar = tqdm(total=len(items), initial=stats["resumed_items"], unit="reply", dynamic_ncols=True,
               disable=os.environ.get("LONGSFT_NO_PROGRESS") == "1")
    t0, shown = time.perf_counter(), [0, 0.0]

    def on_tokens(n: int) -> None:
        shown[0] += n
        now = time.perf_counter()
        if now - shown[1] > 0.5:
            shown[1] = now
            bar.set_postfix_str(f"{shown[0] / max(now - t0, 1e-9):.1f} tok/s", refresh=True)

    batches: dict[int, list[dict]] = {}  # fixed batch boundaries over all items: a resumed run forms the same
    for it in todo:
        batches.setdefault(it["index"] // args.batch_size, []).append(it)
    for _, batch in sorted(batches.items()):
        outputs = gen.generate([prompt_of(gen, it) for it in batch], sampling, first_index=batch[0]["index"],
                               on_tokens=on_tokens)
        for it, o in zip(batch, outputs):
            log.append(make_record(it, o))
            stats["new_tokens"] += len(o.ids)
            stats["finish_reasons"][o.finish_reason] = stats["finish_reasons"].get(o.finish_reason, 0) + 1
        stats["new_items"] += len(batch)
        bar.update(len(batch))
    bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["tokens_per_s"] = round(stats["new_tokens"] / max(stats["seconds"], 1e-9), 2)
    return log.ordered(len(items)), stats, gen


# ----------------------------------------------------------------------------------------------
# The three modes
# ----------------------------------------------------------------------------------------------

def _length_scores(args: EvaluateArguments, preds: list[dict], out: Path) -> dict:
    rep = length_report(preds, parse_buckets(args.length_buckets))
    lengths = rep.pop("lengths")
    length_scatter(lengths, out / "length_scatter.png", f"S_l = {rep['S_l']:.1f} over {rep['count']} prompts")
    return rep


def _quality_scores(args: EvaluateArguments, preds: list[dict], out: Path, scores: dict) -> None:
    from tqdm import tqdm

    key = os.environ.get(args.judge_api_key_env)
    if not key:
        logger.warning("$%s is not set: the judge requests carry no API key (fine for a local server)",
                       args.judge_api_key_env)
    client = judge_lib.JudgeClient(judge_lib.JudgeSettings(
        args.judge_base_url, args.judge_model, key, timeout=args.judge_timeout, parse_retries=args.judge_retries,
        workers=args.judge_workers))
    cache = judge_lib.JudgeCache(out / "judgments.jsonl")
    bar = tqdm(total=len(preds), unit="judgement", disable=os.environ.get("LONGSFT_NO_PROGRESS") == "1")
    judgements = judge_lib.judge_items(preds, client, cache, progress=lambda: bar.update(1))
    bar.close()
    quality = judge_lib.quality_report(preds, judgements)
    quality["requests"] = client.requests
    scores["S_q"] = quality["S_q"]
    scores["quality"] = quality
    for t, v in quality.pop("by_type").items():
        if t in scores["by_type"]:
            scores["by_type"][t]["S_q"] = v


def _benchmark_record(item: dict, o) -> dict:
    return {"index": item["index"], "prompt": item["prompt"], "type": item["type"], "length": item["length"],
            "response_length": count_words(o.text), "response": o.text, "new_tokens": len(o.ids),
            "finish_reason": o.finish_reason}


def _test_record(item: dict, o) -> dict:
    return {"index": item["index"], "line": item["line"], "prompt": item["prompt"], "reference": item["reference"],
            "response": o.text, "new_tokens": len(o.ids), "finish_reason": o.finish_reason}


def _promptable(cases: list[dict], skipped: list[dict], gen, path: str, limit: Optional[int]) -> list[dict]:
    """The cases whose context the model's chat format can write as a prompt (a system prompt has no place in
    LongAlign's formats, for one), numbered again, with their prompt's token ids: the first `limit` of them (None:
    all); the others met on the way go to `skipped` with the format's reason."""
    from longsft.data.inputs import Skip

    usable = []
    for case in cases:
        if limit and len(usable) == limit:
            break
        try:
            prompt_ids = gen.context_ids(case["context"], case["record"])
        except Skip as s:
            skipped.append({"file": path, "line": case["line"], "reason": s.reason, "detail": s.detail})
            continue
        usable.append({**case, "index": len(usable), "prompt_ids": prompt_ids})
    return usable


def evaluate_test_set(args: EvaluateArguments, out: Path, gen=None) -> dict:
    from longsft.evaluate.generate import Generator

    cases, skipped = read_test_set(args.test_file)
    if cases:
        gen = gen or Generator.load(args.model_dir, args.template, args.backend, args.dtype)
        cases = _promptable(cases, skipped, gen, str(Path(args.test_file)), args.max_samples)
    skipped.sort(key=lambda s: s["line"])
    with open(out / "skipped.jsonl", "w", encoding="utf-8") as f:
        for s in skipped:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    if not cases:
        raise UserError(f"--test_file {args.test_file}: no usable record ({len(skipped)} skipped, listed in "
                        f"{out / 'skipped.jsonl'}): each needs a user message and a final assistant reply that "
                        f"the model's chat template can write")
    preds, stats, gen = generate_all(args, cases, out, _test_record, lambda g, it: it["prompt_ids"], gen)
    scores = corpus_scores([(p["response"], p["reference"]) for p in preds])
    scores["skipped"] = {r: sum(1 for s in skipped if s["reason"] == r) for r in sorted({s["reason"]
                                                                                         for s in skipped})}
    if args.eval_loss:
        from longsft.evaluate.loss import eval_loss

        if gen is None or gen.backend != "hf":  # the loss needs the transformers model
            gen = Generator.load(args.model_dir, args.template, "hf", args.dtype)
        scores.update(eval_loss(gen, cases))
    scores["generation"] = stats
    return scores


def main(argv: list[str] | None = None, generator=None) -> dict:
    """Run evaluate.py with `argv`; returns what scores.json holds. `generator`: an already loaded
    longsft.evaluate.generate.Generator to use (tests)."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    mode, problems = check_arguments(args)
    if problems:
        raise UserError("evaluate.py cannot start:\n  - " + "\n  - ".join(problems))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    logger.setLevel(logging.INFO)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "test":
        scores = evaluate_test_set(args, out, generator)
    else:
        if mode == "predictions":
            kind, preds = read_predictions(args.predictions)
            preds = preds[:args.max_samples] if args.max_samples else preds
            if kind == "test" and args.judge_base_url:
                raise UserError(f"--predictions {args.predictions} holds test-set replies (reference, response): "
                                f"they are scored by ROUGE/BLEU; the judge (S_q) scores LongBench-Write replies")
            if kind == "test":
                scores = corpus_scores([(p["response"], p["reference"]) for p in preds])
            else:
                scores = _length_scores(args, preds, out)
        else:
            items = read_benchmark(args.data)
            items = items[:args.max_samples] if args.max_samples else items
            preds, stats, _ = generate_all(args, items, out, _benchmark_record,
                                        lambda g, it: g.prompt_ids(it["prompt"]), generator)
            scores = _length_scores(args, preds, out)
            scores["generation"] = stats
        if args.judge_base_url and "S_l" in scores:
            _quality_scores(args, preds, out, scores)
    scores = {"settings": {k: v for k, v in asdict(args).items() if v is not None and k != "judge_api_key_env"},
              **scores}
    write_json_atomic(out / "scores.json", scores)
    print(summary(scores, str(out)), flush=True)
    return scores


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
