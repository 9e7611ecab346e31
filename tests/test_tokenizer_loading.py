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
from patch.families import folder_reader, tokenizer_facts


def saved(folder: Path):
    """What load_tokenizer hands to from_pretrained for this folder."""
    return saved_added_tokens(folder, tokenizer_facts(folder_reader(folder)))


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
    handed = saved(folder)
    assert handed, "the folder's tokenizer_config.json lists no added tokens: the shortcut must apply"
    assert {t["content"] for t in handed.values()} == {t["content"] for t in
                                                       json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}
    _same_tokenizer(folder, "transformers")


def test_shortcut_stands_aside_where_transformers_reads_other_files(tmp_path, chat_tokenizer_dir):
    base = chat_tokenizer_dir("qwen2")
    folder = tmp_path / "tok"
    shutil.copytree(base, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())

    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": config["eos_token"]}))
    assert saved(folder) is None
    (folder / "special_tokens_map.json").unlink()

    stock = PreTrainedTokenizerFast.from_pretrained(str(base))
    listed = {str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
                       "normalized": t.normalized, "single_word": t.single_word}
              for i, t in stock.added_tokens_decoder.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": listed}))
    assert saved(folder) is None  # the config lists them: transformers reads nothing more
    _same_tokenizer(folder, "transformers")


def test_only_the_top_level_added_tokens_key_is_taken():
    from patch.families import added_token_entries

    real = [{"id": 7, "content": "<|im_end|>", "special": True}]
    decoys = {"a": "added_tokens", "b": '"added_tokens": [{"id": 0}]',  # strings holding the key's text
              "c": {"added_tokens": [{"id": 5, "content": "nested"}]}, "d": [{"added_tokens": []}]}  # nested keys
    raw = json.dumps({"version": "1.0", **decoys, "added_tokens": real, "model": {"vocab": {}}}).encode()
    assert added_token_entries(raw) == real
    assert added_token_entries(json.dumps({"version": "1.0", **decoys}).encode()) is None


def test_a_long_added_tokens_list_with_wide_characters_is_read_whole():
    from patch.families import added_token_entries

    entries = [{"id": i, "content": f"<|预留_{i}|>", "special": True} for i in range(3000)]  # ~200 KB of list
    raw = json.dumps({"version": "1.0", "added_tokens": entries, "model": {"vocab": {"x": 0}}},
                     ensure_ascii=False).encode()
    assert added_token_entries(raw) == entries
    assert added_token_entries(raw[:len(raw) // 2]) is None  # a file cut inside the list
    assert added_token_entries(b'{"model": {"added_tokens": []}}') is None


@pytest.mark.slow
@pytest.mark.parametrize("kind,family", [("qwen2.5", "qwen2"), ("smollm2", "transformers")])
def test_real_folders_load_the_same(kind, family):
    from longsft.vocabularies import tokenizer_folder

    folder = tokenizer_folder(kind)
    assert saved(folder), "these folders carry no added_tokens_decoder: the shortcut is exercised"
    _same_tokenizer(folder, family)
