"""ChatGLM4Tokenizer (patch/tokenization_chatglm.py) through the real AutoTokenizer / save_pretrained paths."""
import base64
import copy
import json
import pickle
import shutil
import time

import pytest
import torch
from transformers import AutoTokenizer

from patch.tokenization_chatglm import SPECIAL_TOKENS, ChatGLM4Tokenizer, read_ranks

TEXTS = ["Hello world!", "你好，请写一篇关于长江的文章。", "tabs\tand\nnewlines\r\n  spaces ",
         "emoji 🙂 and ümlauts", "1234567 3.14159", ""]


@pytest.fixture(scope="module")
def tok(glm4_tokenizer_dir):
    return AutoTokenizer.from_pretrained(glm4_tokenizer_dir, trust_remote_code=True)


def test_loads_hub_like_folder_with_all_config_fields(glm4_tokenizer_dir, tok):
    cfg = json.loads((glm4_tokenizer_dir / "tokenizer_config.json").read_text())
    for key in ("added_tokens_decoder", "additional_special_tokens", "eos_token", "pad_token", "padding_side",
                "remove_space", "do_lower_case", "clean_up_tokenization_spaces", "model_max_length",
                "chat_template", "auto_map"):
        assert key in cfg, key
    assert type(tok).__name__ == "ChatGLM4Tokenizer"
    n = len(read_ranks(glm4_tokenizer_dir / "tokenizer.model"))
    for i, t in enumerate(SPECIAL_TOKENS):  # numbered from len(ranks) in the REFERENCE order
        assert tok.convert_tokens_to_ids(t) == n + i
        assert cfg["added_tokens_decoder"][str(n + i)]["content"] == t
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == n
    assert tok.padding_side == "left" and tok.model_max_length == 128000
    assert len(tok) == tok.vocab_size == n + len(SPECIAL_TOKENS)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode_plain(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids  # the transformers path agrees
    assert tok.convert_tokens_to_string(tok.tokenize(text)) == text


def test_special_text_in_content_is_plain(tok):
    content = "say <|user|> and [gMASK]<sop><|endoftext|>"
    ids = tok.build_single_message("user", "", content)
    special_ids = set(tok.all_special_ids)
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>")
    assert not special_ids & set(ids[1:])
    assert tok.decode(ids) == "<|user|>\n" + content
    # transformers convention: tokenizer(text) recognises special tokens unless split_special_tokens=True
    assert tok.convert_tokens_to_ids("<|user|>") in tok(content)["input_ids"]
    assert not special_ids & set(tok(content, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def test_message_format_prefix_and_chat_template(tok):
    prefix = tok.get_prefix_tokens()
    assert prefix == tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    assert tok("hi")["input_ids"] == prefix + tok.encode_plain("hi")
    msg = tok.build_single_message("assistant", "tool_name", "out")
    assert msg == [tok.convert_tokens_to_ids("<|assistant|>")] + tok.encode_plain("tool_name\n") + tok.encode_plain("out")
    with pytest.raises(ValueError, match="unknown role"):
        tok.build_single_message("narrator", "", "x")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "你好"}]
    manual = prefix + [i for m in conv for i in tok.build_single_message(m["role"], "", m["content"])]
    manual += [tok.convert_tokens_to_ids("<|assistant|>")]
    templ = tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(templ) == manual
    assert tok.decode(manual) == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHello<|assistant|>\nHi!<|user|>\n你好<|assistant|>"
    assert tok.decode(manual, skip_special_tokens=True) == "\nBe brief.\nHello\nHi!\n你好"


def test_left_padding_for_batched_generation(tok):
    batch = tok(["a much longer prompt here", "hi"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 2 and torch.equal(ids[0], torch.tensor(tok("a much longer prompt here")["input_ids"]))
    n_pad = int((mask[1] == 0).sum())
    assert n_pad > 0 and mask[1, :n_pad].sum() == 0 and (ids[1, :n_pad] == tok.pad_token_id).all()
    # explicit padding_side (the upstream `_pad() got an unexpected keyword argument 'padding_side'` crash)
    padded = tok.pad({"input_ids": [[1, 2, 3], [4]]}, padding=True, padding_side="right")
    assert padded["input_ids"][1] == [4, tok.pad_token_id, tok.pad_token_id]


def test_save_reload_round_trip(tmp_path, glm4_tokenizer_dir, tok):
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    assert (out / "tokenizer.model").read_bytes() == (glm4_tokenizer_dir / "tokenizer.model").read_bytes()
    assert (out / "tokenization_chatglm.py").is_file()
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["auto_map"]["AutoTokenizer"][0] == "tokenization_chatglm.ChatGLM4Tokenizer"
    for loaded in (AutoTokenizer.from_pretrained(out, trust_remote_code=True), ChatGLM4Tokenizer.from_pretrained(out)):
        assert loaded.padding_side == "left" and len(loaded) == len(tok)
        for text in TEXTS:
            assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.all_special_ids == tok.all_special_ids
        assert loaded.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == \
            tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    # the class used directly (not through auto_map) also saves a self-contained folder
    direct = ChatGLM4Tokenizer.from_pretrained(glm4_tokenizer_dir)
    direct.save_pretrained(tmp_path / "direct")
    again = AutoTokenizer.from_pretrained(tmp_path / "direct", trust_remote_code=True)
    assert again.encode_plain("Hello 你好") == tok.encode_plain("Hello 你好")


def test_pickle_deepcopy_and_padded_vocab_ids(tok):
    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert clone.encode_plain("Hello 你好") == tok.encode_plain("Hello 你好")
    # ids in the model's padded embedding rows (past the vocabulary) decode to nothing instead of crashing
    assert tok.decode(tok.encode_plain("ok") + [len(tok) + 5]) == "ok"


def test_hub_config_extras_are_accepted(tmp_path, glm4_tokenizer_dir):
    """Fields some hub configs also carry (upstream's position_ids input, encode_special_tokens) still load."""
    folder = tmp_path / "extras"
    shutil.copytree(glm4_tokenizer_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(model_input_names=["input_ids", "attention_mask", "position_ids"], encode_special_tokens=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    batch = tok(["a longer prompt", "hi"], padding=True)
    assert batch["attention_mask"][1][0] == 0 and len(set(map(len, batch["input_ids"]))) == 1


def test_config_that_disagrees_with_ranks_is_a_clear_error(tmp_path, glm4_tokenizer_dir):
    bad = tmp_path / "bad"
    shutil.copytree(glm4_tokenizer_dir, bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    first = min(cfg["added_tokens_decoder"], key=int)
    cfg["added_tokens_decoder"][str(int(first) + 100)] = cfg["added_tokens_decoder"].pop(first)
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="added_tokens_decoder"):
        AutoTokenizer.from_pretrained(bad, trust_remote_code=True)
    (bad / "tokenizer.model").write_text("bm90IGEgcmFuaw== 0\ngarbage\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:2"):
        ChatGLM4Tokenizer(vocab_file=str(bad / "tokenizer.model"))


def test_full_size_vocabulary(tmp_path):
    """151,329 ranks like the real glm-4-9b tokenizer.model: specials at 151329.., fast load and encode."""
    n = 151_329
    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    tokens += [bytes([97 + a % 26, 97 + (a // 26) % 26, 97 + a // 676 % 26, 48 + a // 17576]) for a in range(n - len(tokens))]
    assert len(set(tokens)) == n
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    start = time.perf_counter()
    big = ChatGLM4Tokenizer(vocab_file=str(path))
    assert time.perf_counter() - start < 20
    assert big.convert_tokens_to_ids("<|endoftext|>") == 151329 and big.eos_token_id == 151329
    assert big.convert_tokens_to_ids("<|end_of_video|>") == 151342 and len(big) == 151343
    ids = big.build_single_message("user", "", "Hello 你好")
    assert ids[0] == 151336 and big.decode(ids) == "<|user|>\nHello 你好"
