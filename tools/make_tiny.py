"""Build tiny, offline stand-ins of the real model folders for tests, benchmarks and the CPU quickstart.

    python tools/make_tiny.py tokenizer --family glm4   --out /tmp/tiny-glm4
    python tools/make_tiny.py tokenizer --family llama3 --out /tmp/tiny-llama3
    python tools/make_tiny.py model --family glm4 --out /tmp/tiny-glm4-model     # + tiny random weights
    python tools/make_tiny.py model --family llama3 --out /tmp/tiny-llama3-model
    python tools/make_tiny.py model --family chatglm3 --out /tmp/tiny-chatglm3   # also chatglm2, llama2
    python tools/make_tiny.py model --family qwen2 --out /tmp/tiny-qwen2   # also glm, glm4_0414, qwen3, mistral
    python tools/make_tiny.py chat-tokenizer --kind qwen2 --out /tmp/tiny-qwen2     # chat templates: see below
    python tools/make_tiny.py decoder --model_type gemma --out /tmp/tiny-gemma   # any type patch/model_types.json
                                                                                 # accepts (family `transformers`)
    python tools/make_tiny.py pairs --out /tmp/pairs.jsonl --num_pairs 64           # generated preference pairs

The builders: longsft/tiny/tokenizers.py (tokenizer folders, each like its hub layout) and longsft/tiny/models.py
(tiny random-weight models); the chat templates of the native families' tiny tokenizers: longsft/tiny/chat_templates.py;
the preference pairs (pre_tokenize.py --stage dpo input): longsft/tiny/preference_pairs.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from longsft.errors import run_cli
from longsft.tiny.models import make_tiny_decoder, make_tiny_model
from longsft.tiny.preference_pairs import FORMATS, make_preference_pairs
from longsft.tiny.tokenizers import CHAT_TOKENIZERS, TOKENIZER_BUILDERS, make_chat_template_tokenizer

# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # exact flag names: no --prefix matching
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("tokenizer", help="write a tiny tokenizer folder", allow_abbrev=False)
    p.add_argument("--family", choices=sorted(TOKENIZER_BUILDERS), required=True)
    p.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    c = sub.add_parser("chat-tokenizer", help="write a tiny tokenizer with a model's chat template (template auto)",
                       allow_abbrev=False)
    c.add_argument("--kind", choices=list(CHAT_TOKENIZERS), required=True)
    c.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    m = sub.add_parser("model", help="write a tiny random-weight model folder (with its tokenizer)",
                       allow_abbrev=False)
    m.add_argument("--family", choices=sorted(TOKENIZER_BUILDERS), required=True)
    m.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    m.add_argument("--tokenizer", default=None, help="tokenizer folder to copy (default: build a tiny one)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    d = sub.add_parser("decoder", help="write a tiny random-weight folder of a model type the family `transformers` "
                       "covers (patch/model_types.json), with a tiny chat tokenizer", allow_abbrev=False)
    d.add_argument("--model_type", required=True, help="a config.json model_type, e.g. gemma, phi3, olmo2")
    d.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    d.add_argument("--tokenizer", default=None, help="tokenizer folder to copy (default: a tiny Qwen2.5-style one)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    q = sub.add_parser("pairs", help="write generated preference pairs (JSONL) for pre_tokenize.py --stage dpo",
                       allow_abbrev=False)
    q.add_argument("--out", required=True, help="JSONL file to write (replaced)")
    q.add_argument("--num_pairs", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--min_words", type=int, default=20, help="shortest requested reply, in words")
    q.add_argument("--max_words", type=int, default=300, help="longest requested reply (long-tailed in between)")
    q.add_argument("--formats", choices=[*FORMATS, "mixed"], default="messages", help="record layout (mixed: in turn)")
    args = parser.parse_args(argv)
    if args.what == "decoder":
        out = make_tiny_decoder(args.out, args.model_type, args.tokenizer, seed=args.seed)
        print(f"wrote tiny {args.model_type} model to {out}")
        return out
    if args.what == "pairs":
        try:
            out = make_preference_pairs(args.out, args.num_pairs, args.seed, args.min_words, args.max_words,
                                        args.formats)
        except ValueError as e:
            parser.error(str(e))
        print(f"wrote {args.num_pairs} preference pairs to {out}")
        return out
    if args.what == "chat-tokenizer":
        out = make_chat_template_tokenizer(args.out, args.kind)
        print(f"wrote {args.kind} ({CHAT_TOKENIZERS[args.kind].title}) tokenizer to {out}")
        return out
    if args.what == "model":
        out = make_tiny_model(args.out, args.family, args.tokenizer, seed=args.seed)
        print(f"wrote tiny {args.family} model to {out}")
        return out
    out = TOKENIZER_BUILDERS[args.family](args.out)
    print(f"wrote {args.family} tokenizer to {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
