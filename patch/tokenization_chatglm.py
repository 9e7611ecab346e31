"""GLM-4 tokenizer (`ChatGLM4Tokenizer`) that works on current transformers and loads hub folders unchanged.

A GLM-4 folder (THUDM/glm-4-9b, glm-4-9b-chat, LongWriter-glm4-9b) ships `tokenizer.model`: one line per
regular token, `<base64 of the token's bytes> <rank>` (tiktoken mergeable ranks, byte-level BPE). This class
reads that file, builds a `tiktoken.Encoding` with its *own* special-token table (numbered from
`len(ranks)` upward, so there is no `KeyError: '<|endoftext|>'`), and plugs into transformers'
slow-tokenizer base class, so `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`, `save_pretrained`,
left padding for batched generation and `apply_chat_template` all work without the hub's code.

    from patch.tokenization_chatglm import ChatGLM4Tokenizer
    tok = ChatGLM4Tokenizer.from_pretrained("THUDM/glm-4-9b-chat")        # any GLM-4 folder
    ids = tok.get_prefix_tokens() + tok.build_single_message("user", "", "Hi") \\
        + [tok.convert_tokens_to_ids("<|assistant|>")]
    tok.decode(ids)  # '[gMASK]<sop><|user|>\\nHi<|assistant|>'

Plain text vs special tokens:
- `encode_plain(text)` / `build_single_message(...)` never produce special tokens: special-token text
  inside content ("<|user|>" typed by a user) is tokenized as ordinary bytes. Training data goes this way.
- `tokenizer(text)` / `tokenize(text)` follow the transformers convention: registered special-token text is
  recognised (needed for chat templates), unless `split_special_tokens=True` is passed.
- `tokenizer(text)` with the default `add_special_tokens=True` prepends `[gMASK]<sop>` (upstream behaviour).

Only the standard library, tiktoken and transformers are imported, so this file can be copied into a model
folder (`save_pretrained` does that) and loaded as remote code.
"""

from __future__ import annotations

import base64
import os
import shutil
from typing import Any

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}

# Special tokens in id order, numbered from len(ranks) (REFERENCE 1).
SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)
ROLES = ("system", "user", "assistant", "observation")

# Pre-tokenization regex (the same as Llama-3's).
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (`<base64 token> <rank>` per line); ranks must be exactly 0..n-1."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except Exception as e:  # noqa: BLE001 - report the offending line whatever went wrong
                raise ValueError(f"{path}:{lineno}: not a `<base64 token> <rank>` line ({e}). "
                                 f"Pass the GLM-4 `tokenizer.model` file.") from e
    if not ranks:
        raise ValueError(f"{path}: no tokens; pass the GLM-4 `tokenizer.model` file.")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not exactly 0..{len(ranks) - 1} (duplicates or gaps); "
                         f"the special tokens are numbered from len(ranks), so the file must be dense.")
    return ranks


def write_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ranks in the `tokenizer.model` format, one `<base64> <rank>` line per token, by rank."""
    with open(path, "w", encoding="ascii") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


def _byte_to_char() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable characters (byte-level BPE convention):
    printable Latin-1 bytes map to themselves, the others to code points from 256 upward."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ChatGLM4Tokenizer(PreTrainedTokenizer):
    """GLM-4 tokenizer over tiktoken. Token strings are byte-level (`Ġ`-style) renderings of the token bytes,
    so `get_vocab()` is one-to-one; `decode` returns the exact UTF-8 text."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    _auto_class = "AutoTokenizer"  # save_pretrained copies this file and writes auto_map

    def __init__(
        self,
        vocab_file: str,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        remove_space: bool = False,
        do_lower_case: bool = False,
        encode_special_tokens: bool = False,
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        **kwargs: Any,
    ):
        self.vocab_file = vocab_file
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case
        self.encode_special_tokens = encode_special_tokens
        self.mergeable_ranks = read_ranks(vocab_file)
        n = len(self.mergeable_ranks)
        self.special_tokens = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._build_tables()

        # The special-token table is ours; a config's added_tokens_decoder must agree with it.
        added = {i: AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
                 for t, i in self.special_tokens.items()}
        problems = []
        for idx, tok in (kwargs.pop("added_tokens_decoder", None) or {}).items():
            idx, content = int(idx), str(tok)
            if content in self.special_tokens and self.special_tokens[content] != idx:
                problems.append(f"{content!r} at id {idx}, but {vocab_file} puts it at {self.special_tokens[content]}")
            elif content not in self.special_tokens and idx < n + len(SPECIAL_TOKENS):
                problems.append(f"{content!r} at id {idx}, which is a regular or special token id of {vocab_file}")
            elif content not in self.special_tokens:
                added[idx] = tok if isinstance(tok, AddedToken) else AddedToken(content, special=True)
        if problems:
            raise ValueError("tokenizer_config.json `added_tokens_decoder` does not match tokenizer.model: "
                             + "; ".join(problems) + ". Remove those entries or use the matching tokenizer.model.")
        self._added_tokens_decoder = added
        if "additional_special_tokens" not in kwargs and "extra_special_tokens" not in kwargs:
            kwargs["extra_special_tokens"] = list(SPECIAL_TOKENS)  # so skip_special_tokens drops role tokens
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         eos_token=eos_token, pad_token=pad_token, **kwargs)
        # `tokenizer(text)` with add_special_tokens=True -> [gMASK] <sop> text
        self.special_tokens_pattern = "prefix_suffix"
        self.prefix_tokens = self.get_prefix_tokens()
        self.suffix_tokens = []
        self.init_kwargs.update(remove_space=remove_space, do_lower_case=do_lower_case)  # kept on save

    def _build_tables(self) -> None:
        self.tokenizer = tiktoken.Encoding(name="glm4", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks,
                                           special_tokens=self.special_tokens)
        self._id_to_bytes = [b""] * len(self.mergeable_ranks)
        for token, rank in self.mergeable_ranks.items():
            self._id_to_bytes[rank] = token
        self._string_tables = None  # built on first use: encoding and decoding never need them

    def _strings(self) -> tuple[list[str], dict[str, int], dict[str, int]]:
        """(id -> token string, token string -> id, char -> byte): the token strings of the slow-tokenizer API
        (tokenize, convert_*, get_vocab), each token's bytes in the GPT-2 byte-to-char alphabet."""
        if self._string_tables is None:
            b2c = _byte_to_char()
            id_to_str = [t.decode("latin-1").translate(b2c) for t in self._id_to_bytes]  # latin-1: char = byte
            self._string_tables = (id_to_str, {s: i for i, s in enumerate(id_to_str)},
                                   {c: b for b, c in b2c.items()})
        return self._string_tables

    # tiktoken's Encoding does not pickle; rebuild it (copy.deepcopy, spawn-started workers).
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("tokenizer", "_id_to_bytes", "_string_tables"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build_tables()

    # ---- sizes and vocabulary -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.mergeable_ranks) + len(SPECIAL_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._strings()[1])
        vocab.update(self._added_tokens_encoder)
        return vocab

    # ---- the fast paths the pre-tokenization scripts use ----------------------------------------
    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens: special-token text is encoded as plain bytes."""
        return self.tokenizer.encode_ordinary(text)

    def get_command(self, token: str) -> int:
        """Id of a special token such as "<|user|>" (upstream API)."""
        if token not in self._added_tokens_encoder:
            raise KeyError(f"{token!r} is not a special token of this tokenizer")
        return self._added_tokens_encoder[token]

    def get_prefix_tokens(self) -> list[int]:
        """[gMASK] <sop>: the prefix of every GLM-4 conversation."""
        return [self.special_tokens["[gMASK]"], self.special_tokens["<sop>"]]

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """[<|role|>] + encode(metadata + "\\n") + encode(message); content is always plain text."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; GLM-4 roles are {', '.join(ROLES)}")
        return ([self.special_tokens[f"<|{role}|>"]] + self.encode_plain(f"{metadata}\n")
                + self.encode_plain(message))

    # ---- transformers' slow-tokenizer hooks -----------------------------------------------------
    def _tokenize(self, text: str, **kwargs) -> list[str]:
        id_to_str = self._strings()[0]
        return [id_to_str[i] for i in self.tokenizer.encode_ordinary(text)]

    def _convert_token_to_id(self, token: str) -> int | None:
        return self._strings()[1].get(token)

    def _convert_id_to_token(self, index: int) -> str:
        # ids past the vocabulary (the model's padded embedding rows) decode to nothing
        id_to_str = self._strings()[0]
        return id_to_str[index] if 0 <= index < len(id_to_str) else ""

    def _token_bytes(self, token: str) -> bytes:
        if token in self._added_tokens_encoder:
            return token.encode("utf-8")
        c2b = self._strings()[2]
        return bytes(c2b[c] for c in token) if all(c in c2b for c in token) else token.encode("utf-8")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return b"".join(self._token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        added, n, parts = self._added_tokens_decoder, len(self._id_to_bytes), []
        for i in token_ids:
            i = int(i)
            if i in skip:
                continue
            if 0 <= i < n:
                parts.append(self._id_to_bytes[i])
            elif i in added:
                parts.append(added[i].content.encode("utf-8"))
        text = b"".join(parts).decode("utf-8", errors="replace")
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean else text

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary: {save_directory} is not a folder")
        out = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "")
                           + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.isfile(self.vocab_file) and os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)  # byte-identical copy of the original file
        elif not os.path.isfile(out):
            write_ranks(self.mergeable_ranks, out)
        return (out,)
