"""Pre-tokenize chat data for GLM-4 (glm-4-9b, glm-4-9b-chat, LongWriter-glm4-9b) into a tokenized dataset folder.

    # tiny CPU run on the bundled sample (builds a tiny GLM-4 tokenizer first)
    python tools/make_tiny.py tokenizer --family glm4 --out /tmp/tiny-glm4
    python pre_tokenize_glm4.py --model_name_or_path /tmp/tiny-glm4 --input data/sample.jsonl \\
        --output_dir /tmp/glm4-sample --max_length 8192

    # real run (LongWriter recipe: LongWriter-6k mixed with general SFT data)
    python pre_tokenize_glm4.py --model_name_or_path THUDM/glm-4-9b --input general.jsonl LongWriter-6k.jsonl \\
        --output_dir data/glm4/longwriter --max_length 32768 --num_proc 32

LongWriter's entry point, kept with its flags and defaults: the same as
`python pre_tokenize.py --template glm4 ...` (family glm4, whatever the folder), with --output_dir defaulting to
data/glm4/longwriter. The format (template `glm4`, REFERENCE 1) is in longsft/templates/glm.py; the tokenizer is our
`patch/tokenization_chatglm.py` ChatGLM4Tokenizer reading the folder's `tokenizer.model`, so the folder's own
tokenizer code never runs unless you pass --trust_remote_code. Inputs, the report and the output layout: see
longsft/data/pretokenize.py and longsft/data/storage.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longsft.data.pretokenize import PretokenizeArguments, cli, parse_args
from longsft.templates.registry import pretokenize

FAMILY = "glm4"


@dataclass
class Arguments(PretokenizeArguments):
    output_dir: str = field(default="data/glm4/longwriter", metadata={"help": "Dataset folder to write."})


def main(argv: list[str] | None = None) -> dict:
    return pretokenize(parse_args(Arguments, argv), family=FAMILY)


if __name__ == "__main__":
    cli(main)
