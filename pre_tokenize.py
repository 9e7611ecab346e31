"""Pre-tokenize chat data for any supported model into a tokenized dataset folder: one entry for every template.

    # tiny CPU run on the bundled sample (the template defaults from the folder's family: glm4 here)
    python tools/make_tiny.py tokenizer --family glm4 --out /tmp/tiny-glm4
    python pre_tokenize.py --model_name_or_path /tmp/tiny-glm4 --input data/sample.jsonl \\
        --output_dir /tmp/glm4-sample --max_length 8192

    # real runs
    python pre_tokenize.py --model_name_or_path THUDM/glm-4-9b --input general.jsonl LongWriter-6k.jsonl \\
        --output_dir data/glm4/longwriter --num_proc 32                                   # template glm4
    python pre_tokenize.py --model_name_or_path meta-llama/Llama-3.1-8B --template llama3 --input chat.jsonl \\
        --output_dir data/llama3/chat --max_length 32768
    python pre_tokenize.py --model_name_or_path THUDM/LongAlign-6B-64k-base --template chatglm2 \\
        --input LongAlign-10k.jsonl sharegpt.jsonl --output_dir data/chatglm/10k --max_length 65536   # LongAlign
    python pre_tokenize.py --model_name_or_path meta-llama/Llama-3.1-8B-Instruct --template auto \\
        --input glaive_toolcall_en_demo.json --output_dir data/llama3/tools     # the tokenizer's chat template
    python pre_tokenize.py --stage dpo --model_name_or_path output/glm4/longwriter --input pairs.jsonl \\
        --output_dir data/glm4/longwriter_dpo     # preference pairs (chosen / rejected) for main.py --stage dpo

The model family comes from the folder (patch/families.py: config.json `model_type` and the tokenizer files;
a tokenizer-only folder works too), `--template` defaults to the family's first template:

    family     templates (default first)   tokenizer
    glm4       glm4                         patch/ ChatGLM4Tokenizer (tiktoken tokenizer.model)
    chatglm3   chatglm3, chatglm2           patch/ ChatGLMTokenizer (SentencePiece tokenizer.model)
    chatglm2   chatglm2                     patch/ ChatGLMTokenizer
    llama3     longwriter, llama3, auto     transformers' fast tokenizer (tokenizer.json)
    llama2     llama2, auto                 transformers' fast tokenizer
    glm, glm4_0414, qwen2, qwen3, mistral
               auto                         transformers' fast tokenizer (transformers-native model types)

(longsft/templates/glm.py: glm4, chatglm3; longsft/templates/llama.py: longwriter, llama3; longsft/templates/longalign.py: LongAlign's
round formats chatglm2 and llama2, which take alternating user/assistant records and skip others with a reason;
longsft/templates/auto.py: auto, the folder's own chat template as apply_chat_template renders it, tools and tool calls
included, `--rewritten_replies` for templates such as Qwen3's that rewrite earlier turns; a folder without a chat
template is an error naming --template). An unknown template, or one the family cannot express, is an error that
lists the available templates. The folder's own tokenizer code runs only with --trust_remote_code.
Flags, inputs, skip reasons, the report, atomic output and `--num_proc` (byte-identical output for any count)
are longsft/data/pretokenize.py's; `pre_tokenize_glm4.py` and `pre_tokenize_llama3.py` are the same code with the family fixed.
meta.json records `model_family` and `template`; main.py checks them against the model it trains.
`--stage dpo` reads preference records (messages / TRL / ShareGPT / Alpaca pairwise) into (chosen, rejected) pairs
of samples that share their prompt: longsft/data/preference.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from longsft.data.pretokenize import PretokenizeArguments, cli, parse_args
from patch.families import implemented_templates
from longsft.templates.registry import pretokenize


@dataclass
class Arguments(PretokenizeArguments):
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "Dataset folder to write (replaced atomically); default data/<family>/<template>."})
    template: Optional[str] = field(default=None, metadata={
        "help": f"Chat template: {', '.join(implemented_templates())}; default: the model family's default "
                f"(pre_tokenize.py docstring)."})
    rewritten_replies: Literal["split", "skip", "unsupervised"] = field(default="split", metadata={
        "help": "Template auto: a reply the chat template writes differently once later messages follow (Qwen3 "
                "drops past reasoning, Mistral v0.3 writes the system prompt into the last user message only): "
                "split = train it as its own sample (its prompt with the generation prompt, then the reply as the "
                "template writes a final one; the report counts those samples and their extra tokens); skip = skip "
                "the record (reason template_rewrites_history); unsupervised = leave those replies unsupervised."})
    render_timeout: float = field(default=10.0, metadata={
        "help": "Template auto: seconds one record's chat-template rendering may take (real templates: ms); past "
                "it the record is skipped as template_error, naming the template (at start-up: an error)."})
    render_max_chars: int = field(default=64 * 2 ** 20, metadata={
        "help": "Template auto: the most characters a chat template may write for one record, or build in one "
                "string or list ('x' * N); past it: as --render_timeout."})


def main(argv: list[str] | None = None) -> dict:
    return pretokenize(parse_args(Arguments, argv))


if __name__ == "__main__":
    cli(main)
