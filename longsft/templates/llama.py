"""Llama chat templates (REFERENCE 2 and 5): `longwriter` and `llama3` for Llama-3.1 tokenizers.

    from longsft.models import load_tokenizer
    from longsft.templates.registry import chat_format
    fmt = chat_format("longwriter", load_tokenizer("/tmp/tiny-llama3", "llama3"))   # LongWriterFormat
    ids, labels = fmt.encode([Message("user", "Hi"), Message("assistant", "Hello", train=True)])

- `longwriter` (what LongWriter-llama3.1-8b was trained with, from the base model): `<|begin_of_text|>` once,
  then `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n` for a system message, `[INST]{query}[/INST]` for a user message and
  `{reply}` for an assistant message, all concatenated, and ONE `<|end_of_text|>` appended at the very end.
  Each reply is supervised, and `<|end_of_text|>` is the *label* at the position right after it (the first token
  of the next piece, or the final `<|end_of_text|>`): the model learns to stop after every reply while its
  multi-turn history has no EOS in it, as the inference prompt `[INST]q1[/INST]r1[INST]q2[/INST]` has none
  (REFERENCE 5, "LongWriter-llama3.1 multi-turn"). When a supervised reply follows directly, its own first token
  keeps its label; an empty reply has no tokens, so the label goes to the next token there is.
- `llama3`: the official instruct format, `<|begin_of_text|>` then per message
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`; replies supervised through `<|eot_id|>`.
Content is always plain text: "<|eot_id|>" typed inside a message is not the special token. Special-token ids are
read from the tokenizer. Registered in patch/families.py (TEMPLATES["longwriter"], TEMPLATES["llama3"]).
"""

from __future__ import annotations

import numpy as np

from longsft.templates.base import ChatFormat, PlainEncoder, check_plain_encoding, special_token_ids, token_array
from longsft.data.inputs import Message, Skip
from patch.families import template as template_info

BOS, EOT_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
HEADER = ("<|start_header_id|>", "<|end_header_id|>")
EOT = "<|eot_id|>"


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
        if not self.problems:
            stops = template_info(self.name).stop_tokens  # the ones the tokenizer has
            present = special_token_ids(tokenizer, list(stops), [], "")
            self.stop_token_ids = [present[t] for t in stops if t in present]
            self.bos = token_array(self.ids[BOS])  # template tokens are int32 arrays, parts for `assemble`
            self.setup()

    def setup(self) -> None:
        raise NotImplementedError

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
        self.eos_id = self.ids[EOT_TEXT]
        self.end = token_array(self.eos_id)

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

    def assemble(self, messages: list[Message], encoded: list[np.ndarray]):
        parts, train, relabel = [self.bos], [False], {}
        eos_next = False  # a supervised reply ended: the next token's label is <|end_of_text|>
        for m, piece in zip(messages, encoded):
            reply = m.role == "assistant" and m.train
            if eos_next and len(piece) and not reply:  # split off the piece's first token, labelled EOS
                relabel[len(parts)] = self.eos_id
                parts += (piece[:1], piece[1:])
                train += (True, False)
            else:
                parts.append(piece)
                train.append(reply)
            if len(piece):
                eos_next = reply
        parts.append(self.end)  # one <|end_of_text|> at the very end; supervised right after a reply
        train.append(eos_next)
        return parts, train, relabel


class Llama3Format(_LlamaBase):
    name = "llama3"
    needed = [BOS, *HEADER, EOT]

    def setup(self) -> None:
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
