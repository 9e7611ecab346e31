"""What template `auto` keeps of chat files with each real hub template: records kept, skipped (by reason), samples from
split records, per template; pre_tokenize.py run for each on real vocabularies from registry packages
(longsft/vocabularies.py; GLM-Edge, GLM-4-9b-chat and GLM-4-0414: their real templates on the tiny tokenizers with
their special tokens, as in tests/templates/test_real_templates.py).

    python tools/template_counts.py --input ../shared/data/glaive_toolcall_en_demo.json \\
        ../shared/data/alpaca_en_demo.json data/sample.jsonl
    python tools/template_counts.py --input data/sample.jsonl --templates qwen3 glm-edge   # a quick look (~1 min)
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = ["qwen2.5", "qwen3", "llama3.1", "mistral-v3", "glm-edge", "glm-4-9b-chat", "glm-4-0414", "smollm2"]


@dataclass
class Arguments:
    input: list[str] = field(metadata={"help": "chat files (JSONL / JSON arrays), as pre_tokenize.py takes them"})
    templates: list[str] = field(default_factory=lambda: list(TEMPLATES), metadata={"help": ", ".join(TEMPLATES)})
    rewritten_replies: str = field(default="split", metadata={"help": "pre_tokenize.py's --rewritten_replies"})


def folder_for(name: str, tmp: Path) -> Path:
    from longsft.vocabularies import GLM_TEMPLATES, glm_template, tokenizer_folder

    if name not in GLM_TEMPLATES:
        return tokenizer_folder(name)
    from longsft.tiny.tokenizers import make_chat_template_tokenizer

    folder = make_chat_template_tokenizer(tmp / name, "glm" if name == "glm-edge" else "glm4")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = glm_template(name)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return folder


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    from longsft.data.pretokenize import PretokenizeArguments, run
    from longsft.templates.registry import chat_format
    from transformers import PreTrainedTokenizerFast

    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses(args=argv)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.templates:
            ptargs = PretokenizeArguments(model_name_or_path=str(folder_for(name, tmp)), input=args.input,
                                          output_dir=str(tmp / f"out-{name}"), num_proc=2, max_length=1 << 20)
            ptargs.rewritten_replies = args.rewritten_replies  # pre_tokenize.py's template auto setting
            fmt = chat_format("auto", PreTrainedTokenizerFast.from_pretrained(ptargs.model_name_or_path), ptargs)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rep = run(ptargs, fmt, "auto", name, None, problems=fmt.problems)
            split = rep.get("split", {})
            kept = rep["samples_kept"] - split.get("extra_samples", 0)
            out[name] = {"records": rep["lines_read"], "kept": kept, "samples": rep["samples_kept"],
                         "skipped": {k: v for k, v in rep["skipped"].items() if v}, "split": split}
            print(f"{name:14} records {rep['lines_read']}: kept {kept} ({rep['samples_kept']} samples"
                  + (f"; {split['records']} split into {split['samples']}, {split['extra_tokens']:,} extra tokens"
                     if split else "") + f"), skipped {out[name]['skipped'] or 0}", flush=True)
    return out


if __name__ == "__main__":
    from longsft.errors import run_cli

    run_cli(main)
