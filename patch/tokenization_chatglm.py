"""GLM tokenizers that work on current transformers and load hub folders unchanged:
`ChatGLM4Tokenizer` (GLM-4, tiktoken ranks) and `ChatGLMTokenizer` (ChatGLM2-6B / ChatGLM3-6B, SentencePiece).

GLM-4. A GLM-4 folder (THUDM/glm-4-9b, glm-4-9b-chat, LongWriter-glm4-9b) ships `tokenizer.model`: one line per
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

ChatGLM2 / ChatGLM3. Their `tokenizer.model` is a binary SentencePiece model: regular ids are its piece ids
(`<unk>` 0 = pad, `</s>` = eos), and `[MASK] [gMASK] [sMASK] sop eop` (+ `<|system|> <|user|> <|assistant|>
<|observation|>` for ChatGLM3) are numbered from its piece count upward. ChatGLM3 is told from ChatGLM2 by
`chatglm_version` (2 or 3) when given, else by the hub's tokenizer_config.json (ChatGLM3's names role tokens in
`added_tokens_decoder` / its chat_template; ChatGLM2's names none), else 2. See `ChatGLMTokenizer`.

    from patch.tokenization_chatglm import ChatGLMTokenizer
    tok = ChatGLMTokenizer.from_pretrained("THUDM/chatglm3-6b")
    tok.get_prefix_tokens() + tok.build_single_message("user", "", "Hi")   # ChatGLM3 message
    ids, spans = tok.encode_with_offsets("[Round 1]\\n\\n问：hi")               # char span of every token

Plain text vs special tokens (both classes):
- `encode_plain(text)` / `build_single_message(...)` never produce special tokens: special-token text
  inside content ("<|user|>" typed by a user) is tokenized as ordinary text. Training data goes this way.
- `tokenizer(text)` / `tokenize(text)` follow the transformers convention: registered special-token text is
  recognised (needed for chat templates), unless `split_special_tokens=True` is passed.
- `tokenizer(text)` with the default `add_special_tokens=True` prepends `[gMASK]<sop>` / `[gMASK] sop` (upstream).

Only the standard library, tiktoken, sentencepiece (imported when a ChatGLM2/3 tokenizer is built) and
transformers are imported, so this file can be copied into a model folder (`save_pretrained` does that) and
loaded as remote code.
"""

from __future__ import annotations

import base64
import os
import re
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


def _role_message(tok, role: str, metadata: str, message: str, model: str) -> list[int]:
    """[<|role|>] + encode(metadata + "\\n") + encode(message) of a GLM-4 / ChatGLM3 tokenizer (content: plain text)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; {model} roles are {', '.join(ROLES)}")
    return [tok.special_tokens[f"<|{role}|>"]] + tok.encode_plain(f"{metadata}\n") + tok.encode_plain(message)


def _save_vocab_file(vocab_file: str, save_directory: str, filename_prefix: str | None, write) -> tuple[str]:
    """save_vocabulary of both tokenizers: a byte-identical copy of the loaded file, else `write(out)` rebuilds it."""
    if not os.path.isdir(save_directory):
        raise ValueError(f"save_vocabulary: {save_directory} is not a folder")
    name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
    out = os.path.join(save_directory, name)
    if os.path.isfile(vocab_file) and os.path.abspath(vocab_file) != os.path.abspath(out):
        shutil.copyfile(vocab_file, out)
    elif not os.path.isfile(out):
        write(out)
    return (out,)


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
        return _role_message(self, role, metadata, message, "GLM-4")

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
        return _save_vocab_file(self.vocab_file, save_directory, filename_prefix,
                                lambda out: write_ranks(self.mergeable_ranks, out))


# ---------------------------------------------------------------------------------------------------------------
# ChatGLM2 / ChatGLM3: SentencePiece (REFERENCE 5)
# ---------------------------------------------------------------------------------------------------------------
# Special tokens in id order, numbered from the SentencePiece piece count; ChatGLM3 adds the role tokens.
SP_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
SP_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def _new_sentencepiece_processor():
    try:  # imported here, inside try: GLM-4 folders load as remote code without sentencepiece installed
        import sentencepiece
    except ImportError as e:
        raise ImportError("ChatGLMTokenizer needs the sentencepiece package: pip install sentencepiece") from e
    return sentencepiece.SentencePieceProcessor()


def load_sentencepiece(path: str | os.PathLike):
    """A `sentencepiece.SentencePieceProcessor` for a binary SentencePiece model file, with a clear error if the
    package is missing or the file is not such a model (a GLM-4 text `tokenizer.model`, say)."""
    sp = _new_sentencepiece_processor()
    try:
        sp.Load(str(path))
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError depending on the version
        raise ValueError(f"{path}: not a SentencePiece model ({e}). ChatGLMTokenizer reads the binary "
                         f"tokenizer.model of chatglm2-6b / chatglm3-6b; GLM-4 folders use ChatGLM4Tokenizer.") from e
    return sp


def detect_chatglm_version(config: dict) -> int:
    """3 when a tokenizer_config's fields name ChatGLM3's role tokens (`added_tokens_decoder`,
    `additional_special_tokens` / `extra_special_tokens`, or a `chat_template` with `<|role|>` tags, as the
    chatglm3-6b hub config has), else 2 (the chatglm2-6b hub config names none)."""
    named = [str(t) for t in (config.get("added_tokens_decoder") or {}).values()]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key) or []
        named += [str(t) for t in (value.values() if isinstance(value, dict) else value)]
    if set(named) & set(SP_ROLE_TOKENS):
        return 3
    templates = config.get("chat_template") or ""
    templates = templates.values() if isinstance(templates, dict) else [templates]
    return 3 if any("<|" in str(t) for t in templates) else 2


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM2 / ChatGLM3 tokenizer over SentencePiece (REFERENCE 5). Regular ids and token strings are the
    model's pieces; `decode` is SentencePiece's (so the dummy-prefix space of a text's first piece is dropped,
    as the hub does). Ids past the vocabulary (the model's padded embedding rows) decode to nothing.

    API for templates: `encode_plain(text)`, `encode_with_offsets(text)` (ids + char span of each token),
    `get_prefix_tokens()` ([gMASK] sop), `get_command(name)` / `special_tokens[name]` (special ids),
    `build_single_message(role, metadata, content)` (ChatGLM3), `eos_token_id` (`</s>`), `pad_token_id` (`<unk>`)."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    _auto_class = "AutoTokenizer"  # save_pretrained copies this file and writes auto_map

    def __init__(
        self,
        vocab_file: str,
        chatglm_version: int | None = None,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        remove_space: bool = False,
        do_lower_case: bool = False,
        encode_special_tokens: bool = False,
        eos_token: str = "</s>",
        pad_token: str = "<unk>",
        unk_token: str = "<unk>",
        **kwargs: Any,
    ):
        self.vocab_file = vocab_file
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case
        self.encode_special_tokens = encode_special_tokens
        if chatglm_version is None:
            chatglm_version = detect_chatglm_version(kwargs)
        if int(chatglm_version) not in (2, 3):
            raise ValueError(f"chatglm_version={chatglm_version!r}: expected 2 (ChatGLM2) or 3 (ChatGLM3)")
        self.chatglm_version = int(chatglm_version)
        self._load(load_sentencepiece(vocab_file))  # before super().__init__, which already calls get_vocab
        n = self.n_pieces

        # The special-token table is ours; a config's added_tokens_decoder must agree with it and the pieces.
        added = {i: AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
                 for t, i in self.special_tokens.items()}
        problems = []
        for idx, tok in (kwargs.pop("added_tokens_decoder", None) or {}).items():
            idx, content = int(idx), str(tok)
            if content in self.special_tokens:
                if self.special_tokens[content] != idx:
                    problems.append(f"{content!r} at id {idx}, but {vocab_file} (ChatGLM{self.chatglm_version}) "
                                    f"puts it at {self.special_tokens[content]}")
            elif 0 <= idx < n and self.sp_model.id_to_piece(idx) != content:
                problems.append(f"{content!r} at id {idx}, which is the piece {self.sp_model.id_to_piece(idx)!r}")
            elif n <= idx < self.vocab_size:
                problems.append(f"{content!r} at id {idx}, which is a special token id of {vocab_file}")
            else:
                added[idx] = tok if isinstance(tok, AddedToken) else AddedToken(content, special=True)
        if problems:
            raise ValueError("tokenizer_config.json `added_tokens_decoder` does not match tokenizer.model: "
                             + "; ".join(problems) + ". Remove those entries, set `chatglm_version` (2 or 3), "
                             "or use the matching tokenizer.model.")
        self._added_tokens_decoder = added
        if "additional_special_tokens" not in kwargs and "extra_special_tokens" not in kwargs:
            kwargs["extra_special_tokens"] = list(self.special_tokens)  # so skip_special_tokens drops them
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         eos_token=eos_token, pad_token=pad_token, unk_token=unk_token, **kwargs)
        self.special_tokens_pattern = "prefix_suffix"  # tokenizer(text) -> [gMASK] sop text
        self.prefix_tokens = self.get_prefix_tokens()
        self.suffix_tokens = []
        self.init_kwargs.update(chatglm_version=self.chatglm_version, remove_space=remove_space,
                                do_lower_case=do_lower_case)  # kept on save

    def _load(self, sp_model) -> None:
        self.sp_model = sp_model
        self.n_pieces = sp_model.get_piece_size()
        names = SP_SPECIAL_TOKENS + (SP_ROLE_TOKENS if self.chatglm_version == 3 else ())
        self.special_tokens = {tok: self.n_pieces + i for i, tok in enumerate(names)}
        self._pieces = None  # piece -> id, built on first use (get_vocab)
        try:  # sentencepiece >= 0.2.3 returns char offsets directly; older versions through an immutable proto
            sp_model.encode("a", return_type="offset_mapping")
            self._offsets_via = "offset_mapping"
        except (TypeError, ValueError):
            self._offsets_via = "immutable_proto"

    # SentencePieceProcessor objects are rebuilt from the model bytes (copy.deepcopy, spawn-started workers).
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["sp_model"] = self.sp_model.serialized_model_proto()
        state.pop("_pieces", None)
        return state

    def __setstate__(self, state: dict) -> None:
        proto = state.pop("sp_model")
        self.__dict__.update(state)
        sp = _new_sentencepiece_processor()
        sp.LoadFromSerializedProto(proto)
        self._load(sp)

    # ---- sizes and vocabulary -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.n_pieces + len(self.special_tokens)

    def get_vocab(self) -> dict[str, int]:
        if self._pieces is None:
            self._pieces = {self.sp_model.id_to_piece(i): i for i in range(self.n_pieces)}
        vocab = dict(self._pieces)
        vocab.update(self.special_tokens)
        vocab.update(self._added_tokens_encoder)
        return vocab

    # ---- the paths templates use ----------------------------------------------------------------
    def encode_plain(self, text: str) -> list[int]:
        """`sp_model.encode(text)`: the model's own normalizer and dummy prefix; special-token text is plain."""
        return self.sp_model.encode(text)

    def encode_plain_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """`encode_plain` of many texts in one SentencePiece call."""
        return self.sp_model.encode(list(texts), num_threads=num_threads)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, spans): `encode_plain(text)` and, per token, the [start, end) character span of `text` it holds.
        A token holding no character (the dummy-prefix "▁" before a leading "\\n", say) has start == end; all
        byte-fallback pieces of one character hold that character (SentencePiece gives it to the last byte only).
        So "the tokens holding a character of text[a:b]" are those with start < b and end > a."""
        if self._offsets_via == "offset_mapping":
            out = self.sp_model.encode(text, return_type="offset_mapping")
            ids, spans = list(out["ids"]), [(int(b), int(e)) for b, e in out["offsets"]]
        else:
            pieces = self.sp_model.encode(text, out_type="immutable_proto").pieces
            ids, spans = [p.id for p in pieces], [(p.begin, p.end) for p in pieces]
        is_byte = self.sp_model.is_byte
        for i in range(len(ids) - 2, -1, -1):
            start, end = spans[i]
            if start == end and is_byte(ids[i]) and is_byte(ids[i + 1]) and spans[i + 1][0] == start:
                spans[i] = spans[i + 1]
        return ids, spans

    def get_command(self, token: str) -> int:
        """Id of a special token such as "[gMASK]" or "<|user|>" (upstream API)."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token in self._added_tokens_encoder:
            return self._added_tokens_encoder[token]
        raise KeyError(f"{token!r} is not a special token of this ChatGLM{self.chatglm_version} tokenizer")

    def get_prefix_tokens(self) -> list[int]:
        """[gMASK] sop: the prefix of every ChatGLM2/3 prompt."""
        return [self.special_tokens["[gMASK]"], self.special_tokens["sop"]]

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """ChatGLM3: [<|role|>] + encode(metadata + "\\n") + encode(message); content is always plain text."""
        if self.chatglm_version != 3:
            raise ValueError("ChatGLM2 has no role tokens; build_single_message is ChatGLM3's (chatglm_version=3)")
        return _role_message(self, role, metadata, message, "ChatGLM3")

    # ---- transformers' slow-tokenizer hooks -----------------------------------------------------
    def tokenize(self, text: str, **kwargs) -> list[str]:
        """The transformers convention (registered token text is recognised, so chat templates work), except
        that the word-like `sop` / `eop` count only right after another special token (`[gMASK]sop`): inside
        ordinary words ("people", "Aesop") they are letters. `split_special_tokens=True`: plain SentencePiece."""
        split = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        if split:
            return self._tokenize(text)
        names = set(self._added_tokens_encoder) | set(self.special_tokens)
        wordlike = sorted(t for t in names if t.isalpha())
        pattern = "|".join(re.escape(t) for t in sorted(names - set(wordlike), key=len, reverse=True))
        tokens, parts = [], re.split(f"({pattern})", text) if pattern else [text]
        for i, part in enumerate(parts):  # odd indices: registered tokens
            if i % 2:
                tokens.append(part)
                continue
            word = next((w for w in wordlike if i and part.startswith(w)), None)
            if word:
                tokens.append(word)
                part = part[len(word):]
            if part:
                tokens.extend(self._tokenize(part))
        return tokens

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.special_tokens.get(token, self.sp_model.piece_to_id(token))

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index) if 0 <= index < self.n_pieces else ""

    def _text_of(self, items, is_regular, to_text, regular_run) -> str:
        """Join runs of regular items through SentencePiece and the others through `to_text`."""
        parts, run = [], []
        for item in items:
            if is_regular(item):
                run.append(item)
                continue
            if run:
                parts.append(regular_run(run))
                run = []
            parts.append(to_text(item))
        if run:
            parts.append(regular_run(run))
        return "".join(parts)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        specials = set(self.special_tokens) | set(self._added_tokens_encoder)
        return self._text_of(tokens, lambda t: t not in specials, str, self.sp_model.decode_pieces)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        added, n = self._added_tokens_decoder, self.n_pieces
        ids = [int(i) for i in token_ids if int(i) not in skip]
        # regular ids through SentencePiece (control pieces such as </s> decode to nothing there, so they are
        # written out like the other registered tokens), registered tokens as their text, others as nothing
        text = self._text_of(ids, lambda i: 0 <= i < n and i not in added, lambda i: added[i].content if i in added
                             else "", self.sp_model.decode)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean else text

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        def write(out: str) -> None:
            with open(out, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())

        return _save_vocab_file(self.vocab_file, save_directory, filename_prefix, write)
