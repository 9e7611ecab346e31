"""Reload a trained model (or LoRA adapter) from main.py's output folder and generate a reply to one prompt.

    python tools/generate.py --model_dir output/glm4/longwriter --prompt "Write a 5000-word story about tea."
    python tools/generate.py --model_dir quickstart_out/run --max_new_tokens 32        # tiny CPU check

The prompt is built with the same chat format pre-tokenization trained on (templates.chat_format, the
registry's template): the tokens of a user message followed by an assistant reply, cut where the first
supervised token would be, so inference and training prompts agree token for token. Template: --template, else
the `template` in the training data's meta.json (--data), else the model family's default (patch/families.py:
glm4 -> glm4, llama3 -> longwriter, qwen2 -> auto, ...). Generation stops on the template's stop tokens (and, for
the families that say so, e.g. qwen2, on the model folder's generation_config.json eos ids). The model class comes
from config.json's model_type through the registry (patch/), never from code inside the folder. A folder
holding only a LoRA adapter (adapter_config.json) is loaded on top of its base model (whose config.json also
tells the family), built from the adapter folder's base_model_config.json when there is one (a run that scaled
RoPE writes it: the base as it was trained). Greedy decoding unless --do_sample.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import HfArgumentParser

from longsft import models
from longsft.errors import run_cli
from longsft.data.inputs import InputError
from longsft.data.storage import IGNORE_INDEX
from longsft.atomic_dir import write_json_atomic
from longsft.train.model import BASE_CONFIG_FILE
from patch.families import implemented_templates
from longsft.templates.registry import chat_format, check_template, pad_token_id



@dataclass
class GenerateArguments:
    model_dir: str = field(metadata={"help": "main.py output folder (full model, merged model or LoRA adapter)."})
    prompt: str = field(default="Write a short story about a lighthouse keeper.",
                        metadata={"help": "The user message."})
    system: Optional[str] = field(default=None, metadata={"help": "Optional system message."})
    template: Optional[str] = field(default=None, metadata={"help": " | ".join(implemented_templates())
                                                                    + " (default: see the module docstring)."})
    data: Optional[str] = field(default=None, metadata={"help": "Training data folder; its meta.json names the "
                                                                "template."})
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "With --do_sample."})
    top_p: float = field(default=0.9, metadata={"help": "With --do_sample."})
    seed: int = field(default=0, metadata={"help": "Random seed (sampling)."})
    output: Optional[str] = field(default=None, metadata={"help": "Also write {prompt, reply, ...} to this JSON."})


def chat_format_for(template: str, tokenizer, family=None):
    """The chat format object pre-tokenization used for `template` (checked to be one of `family`'s templates)."""
    try:
        fmt = chat_format(check_template(family, template) if family else template, tokenizer)
    except InputError as e:
        raise SystemExit(str(e)) from e
    if fmt.problems:
        raise SystemExit(f"the tokenizer cannot express the {template} template: " + "; ".join(fmt.problems))
    return fmt


def prompt_ids(fmt, prompt: str, system: Optional[str]) -> list[int]:
    """Tokens of [system], user `prompt`, and the start of the assistant turn, exactly as in training."""
    from longsft.data.inputs import Message

    messages = ([Message("system", system)] if system else []) + [Message("user", prompt),
                                                                  Message("assistant", "x", train=True)]
    ids, labels = fmt.encode(messages)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    return ids[:first]


def base_folder(model_dir: str) -> str:
    """The folder holding the model's config (an adapter folder's base model, else the folder itself)."""
    adapter_cfg = Path(model_dir) / "adapter_config.json"
    if adapter_cfg.is_file() and not (Path(model_dir) / "config.json").is_file():
        return json.loads(adapter_cfg.read_text(encoding="utf-8"))["base_model_name_or_path"]
    return model_dir


def load(model_dir: str):
    """(model, tokenizer, family); a LoRA adapter folder is applied to its base model. transformers-native model
    types load as transformers' own class with the packed forward (patch/modeling_native.py)."""
    base_dir = base_folder(model_dir)
    tok_dir = model_dir if any((Path(model_dir) / f).is_file() for f in
                               ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")) else base_dir
    try:
        cls = models.model_class(models.read_model_type(base_dir))
        family = models.require_family(tok_dir, "--model_dir", config_from=base_dir)  # an adapter: its base's type
        tokenizer = models.load_tokenizer(tok_dir, family)
    except InputError as e:
        raise SystemExit(str(e)) from e
    kw = {}
    base_config = Path(model_dir) / BASE_CONFIG_FILE  # an adapter trained with RoPE scaling: the base as trained
    if base_dir != model_dir and base_config.is_file():
        kw["config"] = cls.config_class.from_pretrained(str(base_config))
    model = cls.from_pretrained(base_dir, dtype=torch.float32, **kw)
    if base_dir != model_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_dir)
    return model.eval(), tokenizer, family


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(GenerateArguments, allow_abbrev=False)  # exact flag names: no --prefix matching
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    torch.manual_seed(args.seed)
    model, tokenizer, family = load(args.model_dir)
    template = args.template
    if template is None and args.data and (Path(args.data) / "meta.json").is_file():
        template = json.loads((Path(args.data) / "meta.json").read_text(encoding="utf-8")).get("template")
    template = template or family.default_template
    fmt = chat_format_for(template, tokenizer, family)
    ids = prompt_ids(fmt, args.prompt, args.system)

    t0 = time.time()
    input_ids = torch.tensor([[int(i) for i in ids]], dtype=torch.long)
    stops = models.stop_token_ids(base_folder(args.model_dir), family, fmt.stop_token_ids)
    pad = pad_token_id(tokenizer, family, template)
    pad = stops[0] if pad is None else pad
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                             temperature=args.temperature if args.do_sample else None,
                             top_p=args.top_p if args.do_sample else None,
                             eos_token_id=stops, pad_token_id=pad, use_cache=True)
    new = out[0, len(ids):].tolist()
    reply = tokenizer.decode(new, skip_special_tokens=True).strip()
    raw = tokenizer.decode(new, skip_special_tokens=False)
    result = {"model_dir": args.model_dir, "template": template, "prompt": args.prompt,
              "prompt_tokens": len(ids), "new_tokens": len(new), "reply": reply, "reply_raw": raw,
              "seconds": round(time.time() - t0, 2)}
    print(f"[generate] {args.model_dir} ({template} template), {len(ids)} prompt tokens, {len(new)} new tokens")
    print(f"[generate] user: {args.prompt}")
    print(f"[generate] assistant: {reply if reply else f'(no visible text; raw: {raw[:200]!r})'}")
    if args.output:
        write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
