"""longsft/models.py load_tokenizer: the added tokens handed to from_pretrained give the tokenizer transformers
builds on its own (it parses tokenizer.json a second time for them when tokenizer_config.json does not list them).

    python -m pytest -q tests/test_tokenizer_loading.py              # tiny folders (seconds)
    python -m pytest -q -m slow tests/test_tokenizer_loading.py      # + Qwen2.5's real vocabulary, SmolLM2's folder
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from longsft.models import load_tokenizer, saved_added_tokens


def _same_tokenizer(folder: Path, family: str) -> None:
    ours = load_tokenizer(str(folder), family)
    stock = PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert repr(ours) == repr(stock)  # class, sizes, special tokens, every added token with its flags
    assert ours.special_tokens_map == stock.special_tokens_map
    assert ours.all_special_ids == stock.all_special_ids
    assert ours.chat_template == stock.chat_template
    assert ours.backend_tokenizer.to_str() == stock.backend_tokenizer.to_str()
    specials = "".join(t.content for t in stock.added_tokens_decoder.values())
    text = f"{specials} plain text{specials[:20]} ünïcode 12345"
    assert ours(text).input_ids == stock(text).input_ids
    assert ours.decode(ours(text).input_ids) == stock.decode(stock(text).input_ids)


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "mistral", "glm4"])
def test_added_tokens_handed_over_give_the_stock_tokenizer(chat_tokenizer_dir, kind):
    folder = chat_tokenizer_dir(kind)
    saved = saved_added_tokens(folder)
    assert saved, "the folder's tokenizer_config.json lists no added tokens: the shortcut must apply"
    assert {t["content"] for t in saved.values()} == {t["content"] for t in
                                                       json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}
    _same_tokenizer(folder, "transformers")


def test_shortcut_stands_aside_where_transformers_reads_other_files(tmp_path, chat_tokenizer_dir):
    base = chat_tokenizer_dir("qwen2")
    folder = tmp_path / "tok"
    shutil.copytree(base, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())

    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": config["eos_token"]}))
    assert saved_added_tokens(folder) is None
    (folder / "special_tokens_map.json").unlink()

    stock = PreTrainedTokenizerFast.from_pretrained(str(base))
    listed = {str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
                       "normalized": t.normalized, "single_word": t.single_word}
              for i, t in stock.added_tokens_decoder.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": listed}))
    assert saved_added_tokens(folder) is None  # the config lists them: transformers reads nothing more
    _same_tokenizer(folder, "transformers")


def test_a_key_named_added_tokens_inside_a_string_is_not_taken_for_the_list(tmp_path, chat_tokenizer_dir):
    folder = tmp_path / "tok"
    shutil.copytree(chat_tokenizer_dir("qwen2"), folder)
    raw = json.loads((folder / "tokenizer.json").read_text())
    # the same tokenizer, written with a string holding '"added_tokens": [' before the real key
    decoy = {"version": raw["version"], "truncation": None, "padding": None, "decoy": '"added_tokens": [{"id": 0}]'}
    text = json.dumps({**decoy, **{k: v for k, v in raw.items() if k not in decoy}})
    (folder / "tokenizer.json").write_text(text)
    saved = saved_added_tokens(folder)
    assert [t["content"] for t in saved.values()] == [t["content"] for t in raw["added_tokens"]]
    nested = json.dumps({"version": raw["version"], "x": {"added_tokens": [{"id": 5, "content": "no"}]},
                         **{k: v for k, v in raw.items() if k != "version"}})
    (folder / "tokenizer.json").write_text(nested)
    saved = saved_added_tokens(folder)  # the first key found is nested: no shortcut rather than a wrong list
    assert saved is None


@pytest.mark.slow
@pytest.mark.parametrize("kind,family", [("qwen2.5", "qwen2"), ("smollm2", "transformers")])
def test_real_folders_load_the_same(kind, family):
    from longsft.vocabularies import tokenizer_folder

    folder = tokenizer_folder(kind)
    assert saved_added_tokens(folder), "these folders carry no added_tokens_decoder: the shortcut is exercised"
    _same_tokenizer(folder, family)
