"""Plain encoding (longsft/templates/base.py: PlainEncoder, PlainCalls, own_backend): special-token text in content
stays text, on the tokenizer's own Rust tokenizer (no copy), which is left as it was found.

    python -m pytest -q tests/templates/test_plain_encoding.py      # tiny Llama-3.1-style tokenizer (CPU, seconds)
"""

import json
import shutil

from longsft.models import load_tokenizer
from longsft.templates.base import PlainEncoder

TEXT = "Hi <|eot_id|> and <|start_header_id|>user<|end_header_id|> as text"


def reference_ids(tokenizer, text: str) -> list[int]:
    """The ids with special tokens never matched, from an independent copy of the Rust tokenizer."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    copy.no_truncation()
    copy.encode_special_tokens = True
    return copy.encode(text, add_special_tokens=False).ids


def test_plain_encoding_shares_the_tokenizer_and_leaves_it_as_found(llama3_tokenizer_dir):
    tok = load_tokenizer(str(llama3_tokenizer_dir), "llama3")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    plain = PlainEncoder(tok)
    assert plain.kind == "fast"
    ids = plain([TEXT])[0].tolist()
    assert ids == reference_ids(tok, TEXT) and eot not in ids
    assert plain._fast().tk is tok.backend_tokenizer  # shared: no copy of the vocabulary
    assert tok.backend_tokenizer.encode_special_tokens is False  # restored after the call
    assert eot in tok(TEXT, add_special_tokens=False)["input_ids"]  # the tokenizer's own behaviour is unchanged
    assert plain._fast().encode_batch([TEXT], add_special_tokens=False)[0].ids == ids
    assert tok.backend_tokenizer.encode_special_tokens is False


def test_a_tokenizer_that_truncates_is_copied_for_plain_encoding(llama3_tokenizer_dir, tmp_path):
    """tokenizer.json may set truncation: the plain encoder then works on a copy without it, and the user's
    tokenizer keeps its setting."""
    folder = tmp_path / "truncating"
    shutil.copytree(llama3_tokenizer_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(str(folder), "llama3")
    assert tok.backend_tokenizer.truncation is not None
    plain = PlainEncoder(tok)
    ids = plain([TEXT])[0].tolist()
    assert len(ids) > 3 and ids == reference_ids(tok, TEXT)
    assert plain._fast().tk is not tok.backend_tokenizer
    assert tok.backend_tokenizer.truncation["max_length"] == 3
