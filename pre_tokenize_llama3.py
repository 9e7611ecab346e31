"""Pre-tokenize chat data for Llama-3.1 (base or instruct) into a tokenized dataset folder.

    # tiny CPU run on the bundled sample (builds a tiny Llama-3.1-style tokenizer first)
    python tools/make_tiny.py tokenizer --family llama3 --out /tmp/tiny-llama3
    python pre_tokenize_llama3.py --model_name_or_path /tmp/tiny-llama3 --input data/sample.jsonl \\
        --output_dir /tmp/llama3-sample --template longwriter --max_length 8192

    # real run (LongWriter-llama3.1-8b recipe, from the base model)
    python pre_tokenize_llama3.py --model_name_or_path meta-llama/Llama-3.1-8B --input general.jsonl \\
        LongWriter-6k.jsonl --output_dir data/llama3/longwriter --template longwriter --num_proc 32

LongWriter's entry point, kept with its flags and defaults: the same as `python pre_tokenize.py ...` with the
family fixed to llama3, --template defaulting to longwriter and --output_dir to data/llama3/longwriter.
Templates (longsft/templates/llama.py, REFERENCE 2 and 5):
- `longwriter` (default; what LongWriter-llama3.1-8b was trained with, from the base model): `<|begin_of_text|>`,
  `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n`, `[INST]{query}[/INST]` and `{reply}` concatenated, one `<|end_of_text|>` at
  the very end; each reply is supervised with `<|end_of_text|>` as the label right after it. Inference prompts
  are `[INST]{query}[/INST]`.
- `llama3`: the official instruct format, `<|begin_of_text|>` then per message
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`; replies supervised through `<|eot_id|>`.
Content is always plain text: "<|eot_id|>" typed inside a message is not the special token.
Special-token ids are read from the tokenizer (transformers' fast tokenizer). The pad id recorded in meta.json
follows the registry's rule (patch/families.py): longwriter `<|finetune_right_pad_id|>` when the tokenizer has
it, else its pad or eos id; llama3 the tokenizer's pad, else `<|finetune_right_pad_id|>`, else eos.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longsft.data.pretokenize import PretokenizeArguments, cli, parse_args
from patch.families import family
from longsft.templates.registry import pretokenize

FAMILY = family("llama3")


@dataclass
class Arguments(PretokenizeArguments):
    output_dir: str = field(default="data/llama3/longwriter", metadata={"help": "Dataset folder to write."})
    template: str = field(default=FAMILY.default_template, metadata={
        "choices": list(FAMILY.templates),
        "help": "longwriter: the [INST] format LongWriter-llama3.1-8b was trained with; llama3: the official "
                "Llama-3.1 instruct format."})


def main(argv: list[str] | None = None) -> dict:
    return pretokenize(parse_args(Arguments, argv), family=FAMILY.name)


if __name__ == "__main__":
    cli(main)
