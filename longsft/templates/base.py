"""What every chat template builds on: `ChatFormat` (a conversation -> token parts and their supervision), the
`PlainEncoder` that tokenizes content with special-token text kept as text, and the special-token lookups.

    from longsft.models import load_tokenizer
    from longsft.templates.registry import chat_format
    fmt = chat_format("llama3", load_tokenizer("/tmp/tiny-llama3", "llama3"))   # a ChatFormat subclass
    ids, labels = fmt.encode([Message("user", "Hi"), Message("assistant", "Hello", train=True)])

One module per template family implements a ChatFormat: glm.py (glm4, chatglm3), llama.py (longwriter, llama3),
longalign.py (chatglm2, llama2), auto.py (the tokenizer's own chat template). The driver that runs a format over
whole input files, in parallel, and writes the dataset is longsft/data/pretokenize.py. No torch is imported.
"""

from __future__ import annotations

import numpy as np

from longsft.data.inputs import Message
from longsft.data.pretokenize import join_parts, part_labels

def own_backend(tokenizer):
    """`tokenizer`'s Rust tokenizer for calls with add_special_tokens=False (so its post-processor adds nothing):
    its own, or a private copy without truncation and padding when it has either set."""
    tk = tokenizer.backend_tokenizer
    if tk.truncation is not None or tk.padding is not None:
        from tokenizers import Tokenizer

        tk = Tokenizer.from_str(tk.to_str())
        tk.no_truncation()
        tk.no_padding()
    return tk


class PlainCalls:
    """A Rust tokenizer's encode calls with `encode_special_tokens` on (special-token text stays plain text), set
    for each call and restored after it, so the tokenizer is shared, not copied."""

    def __init__(self, tk):
        self.tk = tk

    def _call(self, name: str, *args, **kwargs):
        before = self.tk.encode_special_tokens
        self.tk.encode_special_tokens = True
        try:
            return getattr(self.tk, name)(*args, **kwargs)
        finally:
            self.tk.encode_special_tokens = before

    def encode(self, *args, **kwargs):
        return self._call("encode", *args, **kwargs)

    def encode_batch(self, *args, **kwargs):
        return self._call("encode_batch", *args, **kwargs)

    def encode_batch_fast(self, *args, **kwargs):
        return self._call("encode_batch_fast", *args, **kwargs)


class PlainEncoder:
    """Batch-encodes text with no special tokens (special-token text such as "<|eot_id|>" stays plain text):
    texts -> one int32 array of token ids per text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._backend = None
        if hasattr(tokenizer, "encode_plain"):  # our ChatGLM4Tokenizer: tiktoken directly
            # encode_to_numpy with no special tokens allowed gives encode_plain's ids without a Python list
            self.kind = "tiktoken" if hasattr(getattr(tokenizer, "tokenizer", None), "encode_to_numpy") else "plain"
        elif getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer"):
            self.kind = "fast"
        else:
            self.kind = "slow"

    def _fast(self) -> "PlainCalls":
        """The tokenizer's own Rust tokenizer, its encode calls made with special tokens never matched. A private
        copy only when it truncates or pads (tokenizer.json may say so): copying a real vocabulary takes longer
        than loading it (0.66 s for Llama-3.1's 128k tokens)."""
        if self._backend is None:
            self._backend = PlainCalls(own_backend(self.tokenizer))
        return self._backend

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if self.kind == "tiktoken":
            encode = self.tokenizer.tokenizer.encode_to_numpy
            return [encode(t, disallowed_special=()).view(np.int32) for t in texts]  # ids < 2**31
        if self.kind == "plain":
            return [np.array(self.tokenizer.encode_plain(t), dtype=np.int32) for t in texts]
        if self.kind == "fast":
            encodings = self._fast().encode_batch_fast(texts, add_special_tokens=False)
            return [np.array(e.ids, dtype=np.int32) for e in encodings]
        return [np.array(self.tokenizer.encode(t, add_special_tokens=False, split_special_tokens=True),
                         dtype=np.int32) for t in texts]

    def __getstate__(self):
        return {**self.__dict__, "_backend": None}


def token_array(*ids: int) -> np.ndarray:
    """Template token ids as an int32 array (a part that `assemble` can return)."""
    return np.array(ids, dtype=np.int32)


class ChatFormat:
    """How a conversation becomes tokens; each template defines one (templates_*.py, registered in
    patch/families.py). Subclasses set `name` (the template name), `roles` (allowed message roles), `prefix_len`
    (leading tokens --truncate left keeps), `tokenizer`, `plain` (a PlainEncoder), `stop_token_ids`, and
    implement `pieces` (the texts to tokenize, plain) and `assemble` (the token arrays of those pieces -> the
    conversation as a list of int32 token arrays, its *parts*, and for each part whether it is supervised).
    `assemble` may also return a third item, `relabel` {part index: token id}: every token of that (supervised)
    part gets that id as its label instead of its own id (LongWriter: EOS as the label after a reply).
    Batching the pieces of many records into one tokenizer call and joining the parts is the driver's job;
    `encode` does one conversation; `tokenize` (default: `plain`) turns pieces into what `assemble` gets. A format
    may also define `encode_batch(conversations)` -> (ids, supervised, lengths) or None: the driver then tries it
    first for a whole work unit (GLM-4 does); a fourth item, a Skip or None per conversation, skips records (their
    samples left out). `parse_record(obj)` replaces longsft.data.inputs.parse_record and `skip_reasons` adds report
    reasons (template auto has both). A fifth item of `encode_batch`, the conversation index of each sample, lets a
    format make several samples of one record (template auto's --rewritten_replies split); the report counts them."""

    name: str
    roles: frozenset
    prefix_len: int

    def pieces(self, messages: list[Message]) -> list[str]:
        raise NotImplementedError

    def assemble(self, messages: list[Message], encoded: list[np.ndarray]) -> tuple[list[np.ndarray], list[bool]]:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> list:
        """The texts of `pieces` -> what `assemble` gets for each: the plain token ids (int32 arrays) here; a format
        that needs more (character offsets: longsft/templates/longalign.py) returns that instead."""
        return self.plain(texts)

    def encode(self, messages: list[Message]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) int32 arrays of one conversation, labels IGNORE_INDEX where not supervised."""
        parts, train, *relabel = self.assemble(messages, self.tokenize(self.pieces(messages)))
        ids, supervised, part_len = join_parts(parts, train)
        return ids, part_labels(ids, supervised, part_len, relabel[0] if relabel else None)


def special_token_ids(tokenizer, names: list[str], problems: list[str], why: str) -> dict[str, int]:
    """Ids of special tokens read from the tokenizer; a missing one is appended to `problems`."""
    out = {}
    for name in names:
        i = tokenizer.convert_tokens_to_ids(name)
        unk = getattr(tokenizer, "unk_token_id", None)
        if i is None or (i == unk and name != getattr(tokenizer, "unk_token", None)) \
                or tokenizer.convert_ids_to_tokens(i) != name:
            problems.append(f"tokenizer of {tokenizer.name_or_path!r} has no special token {name!r} ({why})")
        else:
            out[name] = int(i)
    return out


def check_plain_encoding(encoder: PlainEncoder, specials: dict[str, int], problems: list[str]) -> None:
    """Special-token text inside content must not turn into special tokens."""
    text = "".join(specials)
    if text and set(encoder([text])[0].tolist()) & set(specials.values()):
        problems.append("the tokenizer turns special-token text inside content into special tokens even with "
                        "split_special_tokens; use a tokenizers-based (fast) tokenizer")
