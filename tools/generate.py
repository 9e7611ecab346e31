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
tells the family). Greedy decoding unless --do_sample. The loading, template and prompt logic is
longsft/evaluate/generate.py (what evaluate.py generates with); this is its one-prompt command line.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from longsft.atomic_dir import write_json_atomic
from longsft.errors import run_cli
from longsft.evaluate.generate import (Generator, Sampling, base_folder, chat_format_for,  # noqa: F401 (re-exported)
                                       load, prompt_ids)
from patch.families import implemented_templates


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


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(GenerateArguments, allow_abbrev=False)  # exact flag names: no --prefix matching
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    gen = Generator.load(args.model_dir, args.template, dtype="float32", data_dir=args.data)
    ids = gen.prompt_ids(args.prompt, args.system)
    t0 = time.time()
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature if args.do_sample else 0,
                        top_p=args.top_p, top_k=None, seed=args.seed)
    out = gen.generate([ids], sampling)[0]
    reply, raw = out.text, gen.tokenizer.decode(out.ids, skip_special_tokens=False)
    result = {"model_dir": args.model_dir, "template": gen.template, "prompt": args.prompt,
              "prompt_tokens": len(ids), "new_tokens": len(out.ids), "reply": reply, "reply_raw": raw,
              "seconds": round(time.time() - t0, 2)}
    print(f"[generate] {args.model_dir} ({gen.template} template), {len(ids)} prompt tokens, {len(out.ids)} new tokens")
    print(f"[generate] user: {args.prompt}")
    print(f"[generate] assistant: {reply if reply else f'(no visible text; raw: {raw[:200]!r})'}")
    if args.output:
        write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
