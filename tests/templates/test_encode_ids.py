"""Template auto's one tokenizer call per work unit (longsft/templates/auto_tokens.py: TemplateTokens._encode_ids):
ASCII texts skip a normalizer that leaves ASCII as it is (NFC and the other normal forms), with the same ids, and the
tokenizer's normalizer is back after the call.

    python -m pytest -q tests/templates/test_encode_ids.py     # tiny Qwen2-style tokenizer (CPU, seconds)
    python -m pytest -q tests/templates/test_real_templates.py -k qwen   # Qwen's real NFC vocabulary (slow)
"""
import pytest
from tokenizers import Tokenizer, normalizers
from transformers import PreTrainedTokenizerFast

from longsft.templates import registry

TEXTS = ["<|im_start|>user\nHow tall is it?<|im_end|>\n",  # ASCII
         "<|im_start|>user\n长江多长？<|im_end|>\n",  # NFC already, not ASCII
         "<|im_start|>user\nre\u0301sume\u0301 Cafe\u0301<|im_end|>\n",  # decomposed: NFC composes it
         "plain ascii text, no special token", "", "Ｆｕｌｌｗｉｄｔｈ ﬁ ligature"]  # NFKC changes these


class Spy:
    """A Rust tokenizer that records, per encode_batch_fast call, its texts and its normalizer at that moment."""

    def __init__(self, tk):
        object.__setattr__(self, "tk", tk)
        object.__setattr__(self, "calls", [])

    def __getattr__(self, name):
        return getattr(self.tk, name)

    def __setattr__(self, name, value):
        setattr(self.tk, name, value)

    def encode_batch_fast(self, texts, **kwargs):
        self.calls.append((list(texts), self.tk.normalizer))
        return self.tk.encode_batch_fast(texts, **kwargs)


def auto_format(chat_tokenizer_dir, normalizer):
    tok = PreTrainedTokenizerFast.from_pretrained(chat_tokenizer_dir("qwen2"))
    tok.backend_tokenizer.normalizer = normalizer
    f = registry.chat_format("auto", tok)
    assert f.problems == []
    reference = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # an independent copy, normalizer on
    return f, [e.ids for e in reference.encode_batch(TEXTS, add_special_tokens=False)]


@pytest.mark.parametrize("form", [normalizers.NFC, normalizers.NFKC, normalizers.NFD, normalizers.NFKD])
def test_ascii_texts_skip_a_normal_form_with_the_same_ids(chat_tokenizer_dir, form):
    f, expected = auto_format(chat_tokenizer_dir, form())
    spy = f._backends["tk"] = Spy(f._backend(False))
    assert f._ascii_normalizer()
    assert f._encode_ids(TEXTS) == expected
    (plain, off), (rest, on) = spy.calls
    assert plain == [t for t in TEXTS if t.isascii()] and off is None
    assert rest == [t for t in TEXTS if not t.isascii()] and type(on) is form
    assert type(spy.tk.normalizer) is form  # restored after the call


def test_a_normalizer_that_changes_ascii_runs_on_every_text(chat_tokenizer_dir):
    lowercase = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    f, expected = auto_format(chat_tokenizer_dir, lowercase)
    spy = f._backends["tk"] = Spy(f._backend(False))
    assert not f._ascii_normalizer()
    assert f._encode_ids(TEXTS) == expected
    assert [texts for texts, _ in spy.calls] == [TEXTS] and spy.calls[0][1] is not None


def test_the_normalizer_is_restored_when_the_call_fails(chat_tokenizer_dir):
    class Failing(Spy):
        def encode_batch_fast(self, texts, **kwargs):
            raise RuntimeError("the Rust call failed")

    f, _ = auto_format(chat_tokenizer_dir, normalizers.NFC())
    tk = f._backend(False)
    f._backends["tk"] = Failing(tk)
    with pytest.raises(RuntimeError, match="the Rust call failed"):
        f._encode_ids(TEXTS)
    assert type(tk.normalizer) is normalizers.NFC
