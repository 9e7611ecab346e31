"""Template `auto`'s rendered text -> token ids and token positions (AutoFormat mixes in TemplateTokens): one call of
the tokenizer's own Rust backend per work unit; special-token text of the data kept as text (the marked path);
positions from a byte-level BPE's token byte lengths, else from offsets; a header the texts share (the system
block) encoded once per process (SharedHeaders).

    from longsft.templates.registry import chat_format
    fmt = chat_format("auto", tokenizer)                      # an AutoFormat: a TemplateTokens
    ids, starts, counts, in_bytes = fmt._encode_clean(["<|im_start|>user\nHi<|im_end|>\n"])

    python -m pytest -q tests/templates/test_auto.py -k "byte_positions or special_token_text"   # its tests (CPU)
    python -m pytest -q tests/templates/test_shared_headers.py                                  # shared headers

Uses the AutoFormat attributes `tokenizer`, `_backends` (per-process caches), `special_re`, `strips`,
`special_ids` and `unmark` (the private-use marks of special-token text in the data).
"""

from __future__ import annotations

import json
import unicodedata
from itertools import chain

import numpy as np

from longsft.templates.base import PlainCalls, own_backend


def utf8_len(text: str, pos: int) -> int:
    """Bytes of text[:pos] (a position past the end counts one byte per character beyond)."""
    return len(text[:pos].encode("utf-8")) + max(0, pos - len(text))


class SharedHeaders:
    """Rendered texts mostly begin alike: the template's system block (Qwen2.5's default system prompt, Llama-3.1's
    dates), a dataset's own fixed system prompt, the shared history of --rewritten_replies split samples. Such a
    header, up to the end of a special token, is encoded once per process and its ids reused: the tokenizer then
    encodes only what follows (Qwen2.5's default system block: ~7% of a short record's tokens).

    Exact: the Rust tokenizer first splits a text at its added tokens and encodes the pieces between them one by
    one (normalizer, pre-tokenizer, model per piece), so ids(header + rest) = ids(header) + ids(rest) when the header
    ends with an added token that no added token's match can cross: `cut_tokens` are those that strip nothing to
    their right (rstrip), are matched before normalization, are no part of a longer added token and do not end
    with whitespace, on a byte-level tokenizer (its pre-tokenizer treats every piece alike; a Metaspace one marks
    the text's first piece) with no single_word tokens (TemplateTokens._cut_tokens checks these once). The first
    VERIFY headers of a process are also checked against the whole text's encoding; a difference switches the
    cache off for good (`off`).

    A header is learned from two neighbouring texts of a work unit: the longest prefix they share that ends at a
    cut token (from SCAN characters, at least MIN_CHARS long), also past a header they already share (a default
    system block, then the first user turn both repeat). At most KEEP headers are held; past that, those the last
    work unit used."""

    MIN_CHARS, SCAN, KEEP, VERIFY = 32, 8192, 64, 4

    def __init__(self, special_re, cut_tokens: set):
        self.special_re, self.cut_tokens = special_re, cut_tokens
        self.ids: dict[str, list[int]] = {}  # header -> its ids
        self.verified, self.off = 0, False

    def _learn(self, text: str, before: str, start: int):
        """The longest prefix of `text` that `before` shares, past `start` (a header both already share), ending at
        a cut token; None if there is none past `start` or it is shorter than MIN_CHARS."""
        header = None
        for m in self.special_re.finditer(text, start, self.SCAN):
            if m.group() not in self.cut_tokens:
                continue
            prefix = text[:m.end()]
            if not before.startswith(prefix):
                break
            header = prefix
        return header if header is not None and len(header) >= self.MIN_CHARS else None

    def encode(self, texts: list[str], encode_batch) -> list[list[int]]:
        """The ids of each text, as encode_batch(texts) gives them (`encode_batch`: a list of texts -> a list of id
        lists, one tokenizer call), each shared header encoded once."""
        if self.off:
            return encode_batch(texts)
        heads, rests, new = [None] * len(texts), list(texts), {}  # new: header -> the text that first uses it
        known, last, before = list(self.ids), None, None
        for k, text in enumerate(texts):
            head = last if last is not None and text.startswith(last) else \
                next((h for h in known if text.startswith(h)), None)
            if before is not None and (head is None or before.startswith(head)):  # does it share more?
                longer = self._learn(text, before, len(head) if head else 0)
                if longer is not None:
                    head = longer
                    if longer not in self.ids and longer not in new:
                        new[longer] = k
                        known.insert(0, longer)
            if head is not None:
                heads[k], rests[k], last = head, text[len(head):], head
            before = text
        check = list(new.items())[:max(0, self.VERIFY - self.verified)]
        lists = encode_batch(rests + list(new) + [texts[k] for _, k in check])
        n, m = len(texts), len(new)
        table = {**self.ids, **dict(zip(new, lists[n:n + m]))}
        for (head, k), whole in zip(check, lists[n + m:]):
            if table[head] + lists[k] != whole:
                self.off = True  # (not expected: the conditions above make it exact)
                return encode_batch(texts)
        self.verified += len(check)
        self.ids = table if len(table) <= self.KEEP else {h: table[h] for h in set(heads) if h is not None}
        return [lists[k] if head is None else table[head] + lists[k] for k, head in enumerate(heads)]


class TemplateTokens:
    def _backend(self, plain: bool):
        """The Rust tokenizer, with offsets: the tokenizer's own (base.own_backend: a private copy only where it
        truncates or pads); `plain`: special tokens never matched (special-token text stays text), set on it for
        each call (base.PlainCalls)."""
        if "tk" not in self._backends:
            self._backends["tk"] = own_backend(self.tokenizer)
        tk = self._backends["tk"]
        return PlainCalls(tk) if plain else tk

    # ---- tokens ----------------------------------------------------------------------------------------------

    def _split_marked(self, text: str) -> list:
        """A text rendered from marked data -> its pieces: ("special", id, position) for the template's special
        tokens (with the whitespace their lstrip/rstrip take), ("text", original text, position, marks) between."""
        pieces, pos = [], 0
        for m in self.special_re.finditer(text):
            a, b = m.span()
            lstrip, rstrip = self.strips[m.group()]
            if lstrip:
                a = pos + len(text[pos:a].rstrip())
            if rstrip:
                b += len(text[b:]) - len(text[b:].lstrip())
            if a > pos:
                pieces.append(self._text_piece(text[pos:a], pos))
            pieces.append(("special", self.special_ids[m.group()], m.start()))
            pos = b
        if pos < len(text):
            pieces.append(self._text_piece(text[pos:], pos))
        return pieces

    def _text_piece(self, piece: str, pos: int) -> tuple:
        out, marks, n = [], [], 0  # marks: (start, end) in the original text, the marker's index in `piece`
        for j, ch in enumerate(piece):
            token = self.unmark.get(ord(ch))
            out.append(ch if token is None else token)
            if token is not None:
                marks.append((n, n + len(token), j))
            n += 1 if token is None else len(token)
        return ("text", "".join(out), pos, marks)

    @staticmethod
    def _marked_position(offset: int, marks: list) -> int:
        """A character offset in a text piece's original text -> its position in the marked text."""
        shift = 0
        for a, b, j in marks:
            if offset >= b:
                shift += b - a - 1
            elif offset >= a:
                return j
            else:
                break
        return offset - shift

    def _encode_marked(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, start positions) of texts rendered from marked data, the text pieces in one plain call."""
        split = [self._split_marked(t) for t in texts]
        plain = [p[1] for pieces in split for p in pieces if p[0] == "text"]
        encoded = iter(self._backend(True).encode_batch(plain, add_special_tokens=False) if plain else ())
        out = []
        for pieces in split:
            ids, starts = [], []
            for p in pieces:
                if p[0] == "special":
                    ids.append(p[1])
                    starts.append(p[2])
                    continue
                e = next(encoded)
                ids += e.ids
                starts += [p[2] + self._marked_position(a, p[3]) for a, _ in e.offsets]
            out.append((ids, starts))
        return out

    def _byte_table(self):
        """Per token id, how many UTF-8 bytes it stands for (-1: not looked up yet, see _with_bytes_of), when the
        tokenizer is a byte-level BPE (no normalizer but NFC): its tokens' bytes then add up to the text, so token
        positions need no offsets. Else None."""
        if "bytes" not in self._backends:
            from tokenizers import models

            tk = self._backend(False)
            norm = tk.normalizer
            nfc = norm is not None and json.loads(norm.__getstate__()).get("type") == "NFC"
            table = None
            if isinstance(tk.model, models.BPE) and tk.pre_tokenizer is not None \
                    and "ByteLevel" in tk.pre_tokenizer.__getstate__().decode("utf-8", "replace") \
                    and (norm is None or nfc):
                table = np.full(tk.get_vocab_size(with_added_tokens=True), -1, np.int64)
                added = tk.get_added_tokens_decoder()
                if added and max(added) >= len(table):
                    table = np.full(max(added) + 1, -1, np.int64)
                for i, t in added.items():
                    table[i] = len(t.content.encode("utf-8"))
            self._backends["bytes"], self._backends["nfc"] = table, norm is not None
        return self._backends["bytes"]

    def _encode_ids(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text (special tokens matched), as encode_batch_fast gives them. When the tokenizer's
        normalizer leaves ASCII text as it is (_ascii_normalizer: Qwen's NFC), the ASCII texts are encoded with it
        off, set for that call and restored after it: the same ids, without the Rust tokenizer's normalization pass
        (9% of the time Qwen's tokenizer takes for ASCII chat texts)."""
        tk = self._backend(False)
        ascii_ = [t.isascii() for t in texts] if self._ascii_normalizer() else None
        if not ascii_ or not any(ascii_):
            return [e.ids for e in tk.encode_batch_fast(texts, add_special_tokens=False)]
        normalizer, tk.normalizer = tk.normalizer, None
        try:
            plain = iter(tk.encode_batch_fast([t for t, a in zip(texts, ascii_) if a], add_special_tokens=False))
        finally:
            tk.normalizer = normalizer
        rest = [t for t, a in zip(texts, ascii_) if not a]
        rest = iter(tk.encode_batch_fast(rest, add_special_tokens=False) if rest else ())
        return [next(plain if a else rest).ids for a in ascii_]

    def _ascii_normalizer(self) -> bool:
        """Whether the tokenizer has a normalizer and it is one of the Unicode normal forms (NFC, NFKC, NFD, NFKD),
        which leave ASCII text unchanged: then ASCII texts need no normalization pass (_encode_ids)."""
        if "ascii_norm" not in self._backends:
            norm = self._backend(False).normalizer
            kind = json.loads(norm.__getstate__()).get("type") if norm is not None else None
            self._backends["ascii_norm"] = kind in ("NFC", "NFKC", "NFD", "NFKD")
        return self._backends["ascii_norm"]

    def _headers(self) -> SharedHeaders:
        """This process's SharedHeaders, its cut tokens checked once (none: every text encoded whole)."""
        if "headers" not in self._backends:
            self._backends["headers"] = SharedHeaders(self.special_re, self._cut_tokens())
        return self._backends["headers"]

    def _cut_tokens(self) -> set:
        """The special tokens a shared header may end with (SharedHeaders: why these conditions make it exact)."""
        if self._byte_table() is None:
            return set()
        added = list(self._backend(False).get_added_tokens_decoder().values())
        if any(t.single_word for t in added):
            return set()
        by_text = {t.content: t for t in added}
        return {s for s in self.special_ids if s in by_text and not by_text[s].rstrip and not by_text[s].normalized
                and not s[-1:].isspace() and not any(s in t.content and s != t.content for t in added)}

    def _with_bytes_of(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The byte table with every token of `ids` looked up (one character of the byte-level alphabet per byte):
        a work unit meets a few thousand distinct tokens, where reading the whole vocabulary (get_vocab, 0.2 s for
        Qwen's 151k) would cost every worker at start-up."""
        if ids.size and int(ids.max()) >= len(table):  # a vocabulary with holes: ids past its size
            grown = np.full(int(ids.max()) + 1, -1, np.int64)
            grown[:len(table)] = table
            table = self._backends["bytes"] = grown
        missing = ids[table[ids] < 0]
        if missing.size:
            tk = self._backend(False)
            for i in np.unique(missing).tolist():
                token = tk.id_to_token(i)
                table[i] = len(token) if token is not None else 0
        return table

    def _encode_texts(self, texts: list[str], marked: list[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """_encode_clean's result for texts of both kinds, in their order: `marked` ones (rendered from data with
        special-token text) through _encode_marked, the others in one _encode_clean call."""
        clean = [t for t, m in zip(texts, marked) if not m]
        ids, starts, counts, in_bytes = self._encode_clean(clean)
        if len(clean) == len(texts):
            return ids, starts, counts, in_bytes
        other = iter(self._encode_marked([t for t, m in zip(texts, marked) if m]))
        bounds = np.append(np.cumsum(counts) - counts, len(ids)).tolist()
        parts, units, c = [], [], 0
        for m in marked:
            if m:
                i, st = next(other)
                parts.append((np.asarray(i, np.int32), np.asarray(st, np.int64)))
                units.append(False)
            else:
                parts.append((ids[bounds[c]:bounds[c + 1]], starts[bounds[c]:bounds[c + 1]]))
                units.append(in_bytes[c])
                c += 1
        return np.concatenate([i for i, _ in parts]), np.concatenate([st for _, st in parts]), \
            np.asarray([len(i) for i, _ in parts], np.int64), units

    def _encode_clean(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """Texts -> (ids int32[T], token start positions int64[T], tokens per text int64[K], per text its positions'
        unit: True bytes, False characters), in one tokenizer call. The byte lengths of a byte-level BPE's tokens
        give the positions (checked to add up to the text's bytes; a text that does not goes through the offsets,
        as do all texts of other tokenizers). Positions are per text (each text's first token at 0); the lookups,
        sums and the check are done for the whole batch at once."""
        table = self._byte_table()
        if table is None:
            return self._offsets_of(texts, range(len(texts)))
        nfc = self._backends["nfc"]
        lists = self._headers().encode(texts, self._encode_ids)
        counts = np.fromiter(map(len, lists), np.int64, len(lists))
        ids = np.fromiter(chain.from_iterable(lists), np.int32, int(counts.sum()))
        table = self._with_bytes_of(table, ids)
        ends = np.cumsum(counts)
        passed = np.zeros(len(ids) + 1, np.int64)  # passed[t]: bytes of all texts before token t
        np.cumsum(table[ids], out=passed[1:])
        firsts = passed[ends - counts]  # per text: bytes before its first token
        sizes = [len(t) if t.isascii() else -1 if nfc and not unicodedata.is_normalized("NFC", t) else
                 len(t.encode("utf-8")) for t in texts]  # -1: NFC would change it, its tokens' bytes say nothing
        wrong = np.flatnonzero(passed[ends] - firsts != np.asarray(sizes, np.int64)).tolist()
        starts = passed[:-1] - np.repeat(firsts, counts)
        if not wrong:
            return ids, starts, counts, [True] * len(texts)
        redo_ids, redo_starts, redo_counts, _ = self._offsets_of(texts, wrong)
        cut = np.cumsum(redo_counts)[:-1]
        redone = dict(zip(wrong, zip(np.split(redo_ids, cut), np.split(redo_starts, cut))))
        bounds = np.append(ends - counts, len(ids)).tolist()
        parts = [redone[k] if k in redone else (ids[bounds[k]:bounds[k + 1]], starts[bounds[k]:bounds[k + 1]])
                 for k in range(len(texts))]
        counts[wrong] = redo_counts
        in_bytes = [k not in redone for k in range(len(texts))]
        return np.concatenate([i for i, _ in parts]), np.concatenate([st for _, st in parts]), counts, in_bytes

    def _offsets_of(self, texts: list[str], which) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """_encode_clean's result for texts[k], k in `which`, with positions from the tokenizer's offsets (characters)."""
        encodings = self._backend(False).encode_batch([texts[k] for k in which], add_special_tokens=False)
        counts = np.asarray([len(e.ids) for e in encodings], np.int64)
        ids = np.asarray([i for e in encodings for i in e.ids], np.int32)
        starts = np.asarray([a for e in encodings for a, _ in e.offsets], np.int64)
        return ids, starts, counts, [False] * len(counts)
