"""Template auto encodes a header its texts share once per process (longsft/templates/auto_tokens.py:
SharedHeaders): the ids stay the tokenizer's own for the whole text; only tokens that no added token's match can
cross may end a header; a header that does not add up switches the cache off.

    python -m pytest -q tests/templates/test_shared_headers.py     # tiny tokenizers (seconds)
    python -m pytest -q tests/templates/test_real_templates.py -k shared_headers   # real vocabularies (slow)
"""
import numpy as np
import pytest
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

from longsft.templates import registry
from longsft.templates.auto_tokens import SharedHeaders
from tests.records import alpaca_records, glaive_records, multi_turn_records

SHARED_SYSTEM = "You answer in one short paragraph, citing the source of every figure."


def records() -> list[dict]:
    """Neighbours that share the template's default system block, a dataset's own system prompt, nothing; a
    conversation that is only its header's turns; non-ASCII, decomposed (NFC changes it) and long text."""
    mine = [{"messages": [{"role": "system", "content": SHARED_SYSTEM}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]}
            for q, a in [("How tall is it?", "About 330 m."), ("长江多长？", "约 6,300 公里。"),
                         ("re\u0301sume\u0301?", "Cafe\u0301 ok."), ("Long?", "word " * 3000)]]
    return alpaca_records(10) + mine + glaive_records(6) + multi_turn_records(6) + mine[:2]


def texts_of(f, recs) -> list[str]:
    return [text for r in recs for text, *_ in f._layout(f.parse_record(r)[1])[0]]


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "glm4", "qwen3"])
def test_shared_headers_give_the_tokenizers_ids(chat_tokenizer_dir, kind):
    f = registry.chat_format("auto", PreTrainedTokenizerFast.from_pretrained(chat_tokenizer_dir(kind)))
    texts = texts_of(f, records())
    backend = f._backend(False)
    whole = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    sent = []

    def encode(batch):
        sent.extend(batch)
        return f._encode_ids(batch)

    headers = SharedHeaders(f.special_re, f._cut_tokens())
    assert headers.encode(texts, encode) == whole
    assert headers.ids and headers.verified == min(len(headers.ids), headers.VERIFY) and not headers.off, kind
    assert sum(map(len, sent)) < sum(map(len, texts)) - len(texts)  # the tokenizer was given less text
    # a second unit reuses what the first learned (a lone text has no neighbour to learn from)
    sent.clear()
    assert headers.encode(texts[-1:], encode) == whole[-1:] and len(sent[0]) < len(texts[-1])
    # and template auto's work unit, its positions from those ids, is each record alone (a fresh format)
    convs = [f.parse_record(r)[1] for r in records()]
    together, (samples, owners) = {}, unit_samples(f, convs)
    for o, sample in zip(owners, samples):
        together.setdefault(o, []).append(sample)
    for o, conv in enumerate(convs):
        assert together[o] == unit_samples(registry.chat_format("auto", f.tokenizer), [conv])[0], (kind, o)


def unit_samples(f, convs) -> tuple[list, list]:
    """([(ids, supervised)] per sample, the record of each) of one encode_batch call."""
    ids, supervised, lengths, _, owners = f.encode_batch(convs)
    cuts = np.cumsum(lengths)[:-1]
    return [(i.tolist(), s.tolist()) for i, s in zip(np.split(ids, cuts), np.split(supervised, cuts))], \
        owners.tolist()


def test_a_longer_shared_header_is_learned_past_a_known_one(chat_tokenizer_dir):
    f = registry.chat_format("auto", PreTrainedTokenizerFast.from_pretrained(chat_tokenizer_dir("qwen2")))
    short = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>"
    longer = short + "user\nThe same long instruction every record repeats.<|im_end|>\n<|im_start|>"
    texts = [short + "user\nsomething else<|im_end|>\n", longer + "assistant\none<|im_end|>\n",
             longer + "assistant\ntwo<|im_end|>\n", longer + "assistant\nthree<|im_end|>\n"]
    headers = SharedHeaders(f.special_re, f._cut_tokens())
    assert headers.encode(texts, f._encode_ids) == f._encode_ids(texts)
    assert set(headers.ids) == {short, longer}


def test_cut_tokens_are_the_tokens_no_match_crosses(chat_tokenizer_dir):
    tok = PreTrainedTokenizerFast.from_pretrained(chat_tokenizer_dir("qwen2"))
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken("<|eats_right|>", rstrip=True, normalized=False),
        AddedToken("<|normalized|>", normalized=True), AddedToken("<|part|>", normalized=False),
        AddedToken("<|part|>+", normalized=False), AddedToken("<|blank|> ", normalized=False)]})
    cut = registry.chat_format("auto", tok)._cut_tokens()
    assert {"<|im_start|>", "<|im_end|>"} <= cut
    assert not cut & {"<|eats_right|>", "<|normalized|>", "<|part|>", "<|blank|> "}
    assert "<|part|>+" in cut  # no longer token holds it
    single = PreTrainedTokenizerFast.from_pretrained(chat_tokenizer_dir("qwen2"))
    single.add_tokens([AddedToken("word", single_word=True)])  # its match looks at the character before it
    assert registry.chat_format("auto", single)._cut_tokens() == set()


def test_a_header_that_does_not_add_up_switches_the_cache_off():
    import re

    def by_length(texts):  # not additive: one id, the text's length
        return [[len(t)] for t in texts]

    headers = SharedHeaders(re.compile(r"<s>"), {"<s>"})
    texts = ["a" * 40 + "<s>one", "a" * 40 + "<s>two", "a" * 40 + "<s>three"]
    assert headers.encode(texts, by_length) == by_length(texts)
    assert headers.off and not headers.ids
    assert headers.encode(texts, by_length) == by_length(texts)  # from now on every text whole
