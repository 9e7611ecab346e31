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

from chat_data import ChatFormat, InputError, Message, PlainEncoder, PretokenizeArguments, check_plain_encoding, \
    cli, parse_args, run, special_token_ids
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
        self.prefix = [ids["[gMASK]"], ids["<sop>"]]
        self.role_id = {r: ids[f"<|{r}|>"] for r in self.roles}
        self.eos = ids["<|endoftext|>"]
        self.stop_token_ids = [self.eos, self.role_id["user"], self.role_id["observation"]]
        self.newline = self.plain(["\n"])[0]

    def pieces(self, messages: list[Message]) -> list[str]:
        # contents, then the metadata lines that are not the plain "\n" (GLM-4 tool calls)
        return [m.content for m in messages] + [f"{m.metadata}\n" for m in messages if m.metadata]

    def assemble(self, messages: list[Message], encoded: list[list[int]]) -> tuple[list[int], list[tuple[int, int]]]:
        meta_lines = iter(encoded[len(messages):])
        ids, spans = list(self.prefix), []
        for m, content in zip(messages, encoded):
            if spans and spans[-1][1] == len(ids):  # the token after a supervised reply is supervised too
                spans[-1] = (spans[-1][0], len(ids) + 1)
            ids.append(self.role_id[m.role])
            body = (next(meta_lines) if m.metadata else self.newline) + content
            if m.train:  # from the metadata line after the role token through the reply
                spans.append((len(ids), len(ids) + len(body)))
            ids += body
        if spans and spans[-1][1] == len(ids):
            spans[-1] = (spans[-1][0], len(ids) + 1)
        ids.append(self.eos)
        return ids, spans


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
