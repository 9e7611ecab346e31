"""Pre-tokenize chat data for GLM-4 (glm-4-9b, glm-4-9b-chat, LongWriter-glm4-9b) into a tokenized dataset folder.

    # tiny CPU run on the bundled sample (builds a tiny GLM-4 tokenizer first)
    python tools/make_tiny.py tokenizer --family glm4 --out /tmp/tiny-glm4
    python pre_tokenize_glm4.py --model_name_or_path /tmp/tiny-glm4 --input data/sample.jsonl \\
        --output_dir /tmp/glm4-sample --max_length 8192

    # real run (LongWriter recipe: LongWriter-6k mixed with general SFT data)
    python pre_tokenize_glm4.py --model_name_or_path THUDM/glm-4-9b --input general.jsonl LongWriter-6k.jsonl \\
        --output_dir data/glm4/longwriter --max_length 32768 --num_proc 32

Format (REFERENCE 1): `[gMASK]<sop>` then per message `<|role|>` + encode(metadata + "\\n") + encode(content),
then `<|endoftext|>`. Each assistant reply is supervised from its metadata line through the token after it
(the next role token, or the final `<|endoftext|>`), so the model learns to stop. Content is always plain text.

The tokenizer is our `patch/tokenization_chatglm.py` ChatGLM4Tokenizer reading the folder's `tokenizer.model`,
so the folder's own tokenizer code never runs unless you pass --trust_remote_code. Inputs, formats, the
report and the output layout: see chat_data.py and dataset.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chat_data import ChatFormat, InputError, Message, PlainEncoder, PretokenizeArguments, check_plain_encoding, \
    cli, parse_args, run, special_token_ids, token_array
from patch.tokenization_chatglm import ChatGLM4Tokenizer


@dataclass
class Arguments(PretokenizeArguments):
    output_dir: str = field(default="data/glm4/longwriter", metadata={"help": "Dataset folder to write."})


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False):
    path = Path(model_name_or_path)
    if trust_remote_code:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=True)
    if path.exists() and not (path / "tokenizer.model").is_file():
        raise InputError(f"--model_name_or_path {path}: no tokenizer.model (the GLM-4 tiktoken ranks file). "
                         f"Pass a GLM-4 folder such as a THUDM/glm-4-9b download.")
    return ChatGLM4Tokenizer.from_pretrained(model_name_or_path)


# ----------------------------------------------------------------------------------------------
# Chat format
# ----------------------------------------------------------------------------------------------

class GLM4Format(ChatFormat):
    name = "glm4"
    roles = frozenset({"system", "user", "assistant", "observation"})
    prefix_len = 2  # [gMASK] <sop>, kept by --truncate left

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.problems: list[str] = []
        self.plain = PlainEncoder(tokenizer)
        names = ["[gMASK]", "<sop>", "<|endoftext|>"] + [f"<|{r}|>" for r in sorted(self.roles)]
        ids = special_token_ids(tokenizer, names, self.problems, "needed by the GLM-4 chat format")
        check_plain_encoding(self.plain, ids, self.problems)
        if self.problems:
            return
        self.eos = ids["<|endoftext|>"]
        self.stop_token_ids = [self.eos, ids["<|user|>"], ids["<|observation|>"]]
        # template tokens as int32 arrays, the parts `assemble` returns besides the encoded texts
        self.prefix = token_array(ids["[gMASK]"], ids["<sop>"])
        self.role_token = {r: token_array(ids[f"<|{r}|>"]) for r in self.roles}
        self.eos_token = token_array(self.eos)
        self.newline = self.plain(["\n"])[0]

    def pieces(self, messages: list[Message]) -> list[str]:
        # contents, then the metadata lines that are not the plain "\n" (GLM-4 tool calls)
        return [m.content for m in messages] + [f"{m.metadata}\n" for m in messages if m.metadata]

    def assemble(self, messages: list[Message], encoded: list[np.ndarray]) -> tuple[list[np.ndarray], list[bool]]:
        meta_lines = iter(encoded[len(messages):])
        parts, train = [self.prefix], [False]
        after_reply = False  # the token after a supervised reply (next role token or the eos) is supervised too
        for m, content in zip(messages, encoded):
            # <|role|>, then the metadata line and the content: supervised together for a reply
            parts += (self.role_token[m.role], next(meta_lines) if m.metadata else self.newline, content)
            train += (after_reply, m.train, m.train)
            after_reply = m.train
        parts.append(self.eos_token)
        train.append(after_reply)
        return parts, train


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Arguments, argv)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    chat_format = GLM4Format(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(chat_format, "eos", None)
    return run(args, chat_format, template="glm4", model_family="glm4", pad_token_id=pad,
               problems=chat_format.problems)


if __name__ == "__main__":
    cli(main)
