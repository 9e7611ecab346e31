"""GLM chat templates (REFERENCE 1 and 5): `glm4` for GLM-4-9B (glm-4-9b, glm-4-9b-chat, LongWriter-glm4-9b) and
`chatglm3` for ChatGLM3-6B (chatglm3-6b, LongAlign-6B-64k). ChatGLM2's round format is in longsft/templates/longalign.py.

    from longsft.models import load_tokenizer
    from longsft.templates.registry import chat_format
    fmt = chat_format("glm4", load_tokenizer("/tmp/tiny-glm4", "glm4"))           # GLM4Format
    fmt = chat_format("chatglm3", load_tokenizer("/tmp/tiny-chatglm3", "chatglm3"))  # ChatGLM3Format
    ids, labels = fmt.encode([Message("user", "Hi"), Message("assistant", "Hello", train=True)])

Both are one format with other token texts (`GLMRoleFormat`): a prefix, then per message `<|role|>` +
encode(metadata + "\n") + encode(content), then an end token.
- `glm4`: prefix `[gMASK]<sop>`, end `<|endoftext|>` (tiktoken; content encoded with no special tokens).
- `chatglm3`: prefix `[gMASK] sop`, end `</s>` (SentencePiece `sp_model.encode`, as chatglm3-6b's
  build_single_message: its dummy prefix included, so "\n" is the pieces "▁" "<0x0A>").
Each assistant reply is supervised from its metadata line through the token after it (the next role token, or
the final end token), so the model learns to stop (upstream's `labels[start+3:end+3]`; ChatGLM3's own fine-tuning
rule). Observation messages and metadata lines (tool calls) as GLM-4. Content is always plain text. GLM-4 encodes
a work unit in one tiktoken call (`encode_batch`) when the tokenizer is our ChatGLM4Tokenizer.
Registered in patch/families.py (TEMPLATES["glm4"].impl = "longsft.templates.glm.GLM4Format", TEMPLATES["chatglm3"]).
"""

from __future__ import annotations

import numpy as np

from longsft.templates.base import ChatFormat, PlainEncoder, check_plain_encoding, special_token_ids, token_array
from longsft.data.inputs import Message
from patch.families import template as template_info


class GLMRoleFormat(ChatFormat):
    """`prefix` tokens, then `<|role|>` + metadata line + content per message, then the `end` token."""
    roles = frozenset({"system", "user", "assistant", "observation"})
    prefix_len = 2  # the two prefix tokens, kept by --truncate left
    prefix_tokens: tuple[str, str]
    end_token: str

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.problems: list[str] = []
        self.plain = PlainEncoder(tokenizer)
        names = [*self.prefix_tokens, self.end_token] + [f"<|{r}|>" for r in sorted(self.roles)]
        ids = special_token_ids(tokenizer, names, self.problems, f"needed by the {self.name} chat format")
        check_plain_encoding(self.plain, ids, self.problems)
        if self.problems:
            return
        self.eos = ids[self.end_token]
        self.stop_token_ids = [ids[t] for t in template_info(self.name).stop_tokens]
        # template tokens as int32 arrays, the parts `assemble` returns besides the encoded texts
        self.prefix = token_array(*(ids[t] for t in self.prefix_tokens))
        self.role_token = {r: token_array(ids[f"<|{r}|>"]) for r in self.roles}
        self.eos_token = token_array(self.eos)
        self.newline = self.plain(["\n"])[0]
        self.setup(ids)

    def setup(self, ids: dict[str, int]) -> None:
        """Hook for what a subclass builds once the special ids are known."""

    def pieces(self, messages: list[Message]) -> list[str]:
        # contents, then the metadata lines that are not the plain "\n" (GLM-4 tool calls)
        return [m.content for m in messages] + [f"{m.metadata}\n" for m in messages if m.metadata]

    def assemble(self, messages: list[Message], encoded: list[np.ndarray]) -> tuple[list[np.ndarray], list[bool]]:
        meta_lines = iter(encoded[len(messages):])
        parts, train = [self.prefix], [False]
        after_reply = False  # the token after a supervised reply (next role token or the end token) is supervised too
        for m, content in zip(messages, encoded):
            # <|role|>, then the metadata line and the content: supervised together for a reply
            parts += (self.role_token[m.role], next(meta_lines) if m.metadata else self.newline, content)
            train += (after_reply, m.train, m.train)
            after_reply = m.train
        parts.append(self.eos_token)
        train.append(after_reply)
        return parts, train


class ChatGLM3Format(GLMRoleFormat):
    name = "chatglm3"
    prefix_tokens = ("[gMASK]", "sop")
    end_token = "</s>"


class GLM4Format(GLMRoleFormat):
    name = "glm4"
    prefix_tokens = ("[gMASK]", "<sop>")
    end_token = "<|endoftext|>"

    def setup(self, ids: dict[str, int]) -> None:
        self._setup_batch(ids)

    # ---- the fast path: a whole work unit in one tiktoken call -----------------------------------------------
    # The unit is written out as one text with the template's special tokens in it, plus a separator special
    # token between a metadata line and its content, and tiktoken is allowed to match exactly those. tiktoken
    # encodes the text between two allowed special tokens on its own (its regex runs on that slice), so every
    # metadata line and content gets the ids `assemble` would give it. Labels come from the positions of the
    # role/eos tokens (a reply is supervised from after its role token through the next role or eos token).
    # A content that contains the text of one of these special tokens would turn it into a special token; the
    # counts of those ids then differ from the template's, and the unit goes through pieces/assemble instead.

    def _setup_batch(self, ids: dict[str, int]) -> None:
        self.batch_ready = False
        encoding = getattr(self.tokenizer, "tokenizer", None)
        specials = dict(getattr(encoding, "_special_tokens", None) or {})
        if self.plain.kind != "tiktoken" or any(specials.get(t) != i for t, i in ids.items()):
            return  # not our tiktoken-based tokenizer
        used = list(ids)  # the template's special tokens: prefix, eos, role tokens
        spare = [t for t in sorted(specials, key=specials.get) if t not in ids]
        if not spare or not _cannot_overlap(list(specials)):
            return
        self.sep_text = spare[0]
        self.prefix_text, self.eos_text = "[gMASK]<sop>", "<|endoftext|>"
        self.role_text = {r: f"<|{r}|>" for r in self.roles}
        self.allowed = frozenset(used + [self.sep_text])
        # token kind by id: 1 role or eos (a label boundary), 2 separator, 3 [gMASK] (a sample start), 4 <sop>
        self.kind = np.zeros(encoding.max_token_value + 1, np.uint8)
        self.kind[[ids[f"<|{r}|>"] for r in self.roles] + [self.eos]] = 1
        self.kind[[specials[self.sep_text], ids["[gMASK]"], ids["<sop>"]]] = (2, 3, 4)
        self.batch_ready = True

    def encode_batch(self, conversations: list[list[Message]]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Many conversations -> (ids int32[T], supervised bool[T], length of each int64[K]), exactly as `encode`
        each; None when the fast path cannot be used for them."""
        if not self.batch_ready:
            return None
        text, boundary_train, sizes = [], [False], []  # per role/eos token: is what follows it supervised
        role_text, newline_sep = self.role_text, "\n" + self.sep_text
        for messages in conversations:
            text.append(self.prefix_text)
            for m in messages:
                text += (role_text[m.role], m.metadata, newline_sep, m.content)
                boundary_train.append(m.train)
            text.append(self.eos_text)
            boundary_train.append(False)
            sizes.append(len(messages))
        encode = self.tokenizer.tokenizer.encode_to_numpy
        flat = encode("".join(text), allowed_special=self.allowed, disallowed_special=()).view(np.int32)  # [T + seps]
        kind = self.kind[flat]  # [T + seps]
        counts = np.bincount(kind, minlength=5)
        n, n_messages = len(conversations), len(boundary_train) - 1 - len(conversations)
        if counts[1] != n_messages + n or counts[2] != n_messages or counts[3] != n or counts[4] != n:
            return None  # special-token text inside some content: use pieces/assemble
        before = np.zeros(len(flat) + 1, np.int32)  # [T + seps + 1] role/eos tokens strictly before each token
        np.cumsum(kind == 1, out=before[1:])
        supervised = np.array(boundary_train, dtype=bool)[before[:-1]]  # [T + seps]
        keep = kind != 2
        sample_tokens = np.diff(np.flatnonzero(kind == 3), append=len(flat)) - np.array(sizes)  # minus separators
        return flat[keep], supervised[keep], sample_tokens


def _cannot_overlap(specials: list[str]) -> bool:
    """True when no special-token text is inside another one or overlaps the start of another one with its end:
    then every special token written between texts is found where it was written, whatever the texts hold."""
    for a in specials:
        for b in specials:
            if a != b and a in b:
                return False
            if any(b.startswith(a[k:]) for k in range(1, len(a))):
                return False
    return True
