"""LongAlign's round formats (REFERENCE 5): `chatglm2` for ChatGLM2-6B / ChatGLM3-6B SentencePiece tokenizers and
`llama2` for Llama-2 (SentencePiece as the hub ships it: tokenizer.model + tokenizer.json).

    from longsft.models import load_tokenizer
    from longsft.templates.registry import chat_format
    fmt = chat_format("chatglm2", load_tokenizer("/tmp/tiny-chatglm2", "chatglm2"))   # ChatGLM2Format
    fmt = chat_format("llama2", load_tokenizer("/tmp/tiny-llama2", "llama2"))         # Llama2Format
    ids, labels = fmt.encode([Message("user", "Hi"), Message("assistant", "Hello", train=True)])

A conversation is strictly alternating user / assistant messages, written out as one text of rounds:
- `chatglm2`: "[Round {i}]\\n\\n问：{q}\\n\\n答：{a}" per round (i from 1), ChatGLM2's own prompt text
  (`build_prompt`, what `model.chat` encodes), after the tokens `[gMASK] sop`;
- `llama2`: "[INST]{q}[/INST]{a}" per round, after one `<s>`;
rounds joined by "\\n\\n", and `</s>` appended. The whole text is encoded in ONE tokenizer call, as the model
encodes its prompt at inference (no marker tokens splitting it, no dummy prefix before each answer). Supervised:
every token holding a character of a supervised answer (the tokenizer's character offsets: ChatGLMTokenizer's
`encode_with_offsets`, the fast tokenizer's offset_mapping), and `</s>` as the *label* of the position right
after each such answer (the first token of the next round, or the final `</s>` itself): the model learns to
stop there while the history stays the inference prompt. Empty and opted-out answers are not supervised (their
round stays in the text). A trailing user message (a question with no answer) is dropped. Content is always
plain text: "</s>" typed in a message is the characters, never the token.
Skipped with a reason (skipped.jsonl): a system or observation message (`unknown_role`: these formats have no
system role), two user or two assistant messages in a row or an assistant message first (`wrong_schema`),
`metadata` (`wrong_schema`: GLM-4 only).
Registered in patch/families.py (TEMPLATES["chatglm2"], TEMPLATES["llama2"]).
"""

from __future__ import annotations

import numpy as np

from longsft.templates.base import ChatFormat, PlainEncoder, check_plain_encoding, special_token_ids, token_array
from longsft.data.inputs import Message, Skip
from patch.families import template as template_info

ROUND_SEP = "\n\n"


class RoundsFormat(ChatFormat):
    """Alternating rounds written as one text, encoded in one call with character offsets (module docstring).
    Subclasses set `prefix_tokens` (token texts before the text), `end_token` and `round_text(i, q, a)`."""
    roles = frozenset({"user", "assistant"})
    prefix_tokens: tuple[str, ...]
    end_token = "</s>"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.problems: list[str] = []
        self.prefix_len = len(self.prefix_tokens)  # kept by --truncate left
        self.plain = PlainEncoder(tokenizer)
        names = [*self.prefix_tokens, self.end_token]
        ids = special_token_ids(tokenizer, names, self.problems, f"needed by the {self.name} chat format")
        if hasattr(tokenizer, "encode_with_offsets"):  # our ChatGLMTokenizer (SentencePiece offsets)
            self.offsets_via = "sentencepiece"
        elif self.plain.kind == "fast":  # tokenizers' offset_mapping, special-token text kept as text
            self.offsets_via = "fast"
        else:
            self.problems.append(f"the {self.name} format needs character offsets: a tokenizers-based (fast) "
                                 f"tokenizer (tokenizer.json) or ChatGLMTokenizer; got {type(tokenizer).__name__}")
        check_plain_encoding(self.plain, ids, self.problems)
        if self.problems:
            return
        self.eos_id = ids[self.end_token]
        stops = template_info(self.name).stop_tokens
        present = special_token_ids(tokenizer, list(stops), [], "")
        self.stop_token_ids = [present[t] for t in stops if t in present]
        self.prefix = token_array(*(ids[t] for t in self.prefix_tokens))
        self.end = token_array(self.eos_id)

    @staticmethod
    def round_text(i: int, query: str, answer: str) -> str:
        raise NotImplementedError

    # ---- the text -----------------------------------------------------------------------------------------
    def layout(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
        """(the conversation's text, [start, end) character span of each supervised answer); raises Skip for a
        conversation the format cannot express. A trailing user message is left out."""
        for i, m in enumerate(messages):
            if m.role not in self.roles:
                raise Skip("unknown_role", f"message {i}: role {m.role!r} has no place in the {self.name} format "
                                           f"(alternating user/assistant rounds, no system role)")
            if m.metadata:
                raise Skip("wrong_schema", f"message {i}: `metadata` is GLM-4 only; the {self.name} format cannot "
                                           f"express it")
            want = "user" if i % 2 == 0 else "assistant"
            if m.role != want:
                what = "an assistant message first" if i == 0 else f"two {m.role} messages in a row"
                raise Skip("wrong_schema", f"message {i}: {what}; the {self.name} format needs strictly "
                                           f"alternating user/assistant messages, starting with user")
        rounds, spans, pos = [], [], 0
        for r in range(len(messages) // 2):  # a trailing user message (odd count) is dropped
            query, answer = messages[2 * r], messages[2 * r + 1]
            text = self.round_text(r + 1, query.content, answer.content)
            if answer.train:  # the answer ends its round's text
                end = pos + len(text)
                spans.append((end - len(answer.content), end))
            rounds.append(text)
            pos += len(text) + len(ROUND_SEP)
        return ROUND_SEP.join(rounds), spans

    def pieces(self, messages: list[Message]) -> list[str]:
        return [self.layout(messages)[0]]

    def tokenize(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: (ids int32[n], char spans int32[n, 2]), in one call per text (SentencePiece) or per batch
        (tokenizers, with added-token matching off so special-token text stays text)."""
        if self.offsets_via == "sentencepiece":
            out = []
            for t in texts:
                ids, spans = self.tokenizer.encode_with_offsets(t)
                out.append((np.array(ids, np.int32), np.array(spans, np.int32).reshape(-1, 2)))
            return out
        encodings = self.plain._fast().encode_batch(texts, add_special_tokens=False)
        return [(np.array(e.ids, np.int32), np.array(e.offsets, np.int32).reshape(-1, 2)) for e in encodings]

    # ---- tokens and labels --------------------------------------------------------------------------------
    def assemble(self, messages: list[Message], encoded: list):
        (ids, spans), = encoded
        _, answers = self.layout(messages)
        starts, ends = spans[:, 0], spans[:, 1]
        parts, train, relabel, pos = [self.prefix], [False], {}, 0
        eos_after = False  # the last supervised answer ends the text: the final </s> is the token after it
        for a, b in answers:
            holds = np.flatnonzero((starts < b) & (ends > a))  # the tokens holding a character of the answer
            if not holds.size:
                continue
            lo, hi = max(int(holds[0]), pos), int(holds[-1]) + 1
            if lo > pos:
                parts.append(ids[pos:lo])
                train.append(False)
            parts.append(ids[lo:hi])
            train.append(True)
            pos, eos_after = hi, hi == len(ids)
            if not eos_after:  # the token right after the answer, with </s> as its label
                relabel[len(parts)] = self.eos_id
                parts.append(ids[hi:hi + 1])
                train.append(True)
                pos = hi + 1
        if pos < len(ids):
            parts.append(ids[pos:])
            train.append(False)
        parts.append(self.end)  # </s> appended; its label is itself
        train.append(eos_after)
        return parts, train, relabel


class ChatGLM2Format(RoundsFormat):
    name = "chatglm2"
    prefix_tokens = ("[gMASK]", "sop")

    @staticmethod
    def round_text(i: int, query: str, answer: str) -> str:
        return f"[Round {i}]\n\n问：{query}\n\n答：{answer}"


class Llama2Format(RoundsFormat):
    name = "llama2"
    prefix_tokens = ("<s>",)

    @staticmethod
    def round_text(i: int, query: str, answer: str) -> str:
        return f"[INST]{query}[/INST]{answer}"
