"""Pre-tokenize chat data for Llama-3.1 (base or instruct) into a tokenized dataset folder.

    # tiny CPU run on the bundled sample (builds a tiny Llama-3.1-style tokenizer first)
    python tools/make_tiny.py tokenizer --family llama3 --out /tmp/tiny-llama3
    python pre_tokenize_llama3.py --model_name_or_path /tmp/tiny-llama3 --input data/sample.jsonl \\
        --output_dir /tmp/llama3-sample --template longwriter --max_length 8192

    # real run (LongWriter-llama3.1-8b recipe, from the base model)
    python pre_tokenize_llama3.py --model_name_or_path meta-llama/Llama-3.1-8B --input general.jsonl \\
        LongWriter-6k.jsonl --output_dir data/llama3/longwriter --template longwriter --num_proc 32

Templates (REFERENCE 2):
- `longwriter` (default; what LongWriter-llama3.1-8b was trained with, from the base model):
  `<|begin_of_text|>` once, then `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n` for a system message, `[INST]{query}[/INST]`
  for a user message, and `{reply}<|end_of_text|>` for an assistant message; each reply and its
  `<|end_of_text|>` are supervised. Inference prompts are `[INST]{query}[/INST]`.
- `llama3`: the official instruct format, `<|begin_of_text|>` then per message
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`; replies supervised through `<|eot_id|>`.
Content is always plain text: "<|eot_id|>" typed inside a message is not the special token.
Special-token ids are read from the tokenizer (AutoTokenizer, fast). The pad id recorded in meta.json is
`<|finetune_right_pad_id|>` when the tokenizer has it (longwriter), else the tokenizer's pad or eos id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from chat_data import ChatFormat, InputError, Message, PlainEncoder, PretokenizeArguments, Skip, \
    check_plain_encoding, cli, parse_args, run, special_token_ids, token_array

BOS, EOT_TEXT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
HEADER = ("<|start_header_id|>", "<|end_header_id|>")
EOT, EOM = "<|eot_id|>", "<|eom_id|>"


@dataclass
class Arguments(PretokenizeArguments):
    output_dir: str = field(default="data/llama3/longwriter", metadata={"help": "Dataset folder to write."})
    template: Literal["longwriter", "llama3"] = field(default="longwriter", metadata={
        "help": "longwriter: the [INST] format LongWriter-llama3.1-8b was trained with; llama3: the official "
                "Llama-3.1 instruct format."})


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"--model_name_or_path {model_name_or_path}: cannot load a tokenizer ({e})") from e


# ----------------------------------------------------------------------------------------------
# Chat formats
# ----------------------------------------------------------------------------------------------

class _LlamaBase(ChatFormat):
    roles = frozenset({"system", "user", "assistant"})
    prefix_len = 1  # <|begin_of_text|>, kept by --truncate left
    needed: list[str] = []

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.problems: list[str] = []
        self.plain = PlainEncoder(tokenizer)
        self.ids = special_token_ids(tokenizer, self.needed, self.problems, f"needed by the {self.name} format")
        check_plain_encoding(self.plain, self.ids, self.problems)
        vocab = tokenizer.get_vocab()
        self.optional = {t: int(vocab[t]) for t in (PAD, EOM, EOT_TEXT) if t in vocab}
        if not self.problems:
            self.bos = token_array(self.ids[BOS])  # template tokens are int32 arrays, parts for `assemble`
            self.setup()

    def setup(self) -> None:
        raise NotImplementedError

    def pad_token_id(self) -> int | None:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else self.optional.get(PAD, tok.eos_token_id)

    @staticmethod
    def _check_metadata(messages: list[Message]) -> None:
        for i, m in enumerate(messages):
            if m.metadata:
                raise Skip("wrong_schema", f"message {i}: `metadata` is GLM-4 only; the Llama formats cannot "
                                           f"express it")


class LongWriterFormat(_LlamaBase):
    name = "longwriter"
    needed = [BOS, EOT_TEXT]

    def setup(self) -> None:
        self.stop_token_ids = [self.ids[EOT_TEXT]]
        self.end = token_array(self.ids[EOT_TEXT])

    def pad_token_id(self) -> int | None:
        return self.optional.get(PAD, super().pad_token_id())

    def pieces(self, messages: list[Message]) -> list[str]:
        self._check_metadata(messages)
        texts = []
        for m in messages:
            if m.role == "system":
                texts.append(f"<<SYS>>\n{m.content}\n<</SYS>>\n\n")
            elif m.role == "user":
                texts.append(f"[INST]{m.content}[/INST]")
            else:
                texts.append(m.content)
        return texts

    def assemble(self, messages: list[Message], encoded: list[np.ndarray]) -> tuple[list[np.ndarray], list[bool]]:
        parts, train = [self.bos], [False]
        for m, piece in zip(messages, encoded):
            if m.role == "assistant":  # the reply and its <|end_of_text|>
                parts += (piece, self.end)
                train += (m.train, m.train)
            else:
                parts.append(piece)
                train.append(False)
        return parts, train


class Llama3Format(_LlamaBase):
    name = "llama3"
    needed = [BOS, *HEADER, EOT]

    def setup(self) -> None:
        self.stop_token_ids = [self.optional[t] for t in (EOT_TEXT, EOM) if t in self.optional] + [self.ids[EOT]]
        self.eot = token_array(self.ids[EOT])
        start, end = token_array(self.ids[HEADER[0]]), token_array(self.ids[HEADER[1]])
        newlines = self.plain(["\n\n"])[0]
        self.header = {r: np.concatenate([start, self.plain([r])[0], end, newlines]) for r in self.roles}

    def pieces(self, messages: list[Message]) -> list[str]:
        self._check_metadata(messages)
        return [m.content for m in messages]

    def assemble(self, messages: list[Message], encoded: list[np.ndarray]) -> tuple[list[np.ndarray], list[bool]]:
        parts, train = [self.bos], [False]
        for m, content in zip(messages, encoded):  # a reply is supervised through its <|eot_id|>
            parts += (self.header[m.role], content, self.eot)
            train += (False, m.train, m.train)
        return parts, train


FORMATS = {"longwriter": LongWriterFormat, "llama3": Llama3Format}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Arguments, argv)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    chat_format = FORMATS[args.template](tokenizer)
    pad = chat_format.pad_token_id() if not chat_format.problems else None
    return run(args, chat_format, template=args.template, model_family="llama3", pad_token_id=pad,
               problems=chat_format.problems)


if __name__ == "__main__":
    cli(main)
