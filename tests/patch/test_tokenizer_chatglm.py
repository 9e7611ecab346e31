"""ChatGLMTokenizer (ChatGLM2/3, SentencePiece) and the tiny SentencePiece builders (tools/make_tiny.py: chatglm2,
chatglm3, llama2) through the real AutoTokenizer / save_pretrained / sentencepiece paths.

    python -m pytest -q tests/patch/test_tokenizer_chatglm.py
"""
import copy
import json
import pickle
import shutil
import time

import numpy as np
import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer

from longsft.templates.base import PlainEncoder
from patch.tokenization_chatglm import SP_ROLE_TOKENS, SP_SPECIAL_TOKENS, ChatGLMTokenizer, detect_chatglm_version

TEXTS = ["Hello world!", "你好，请写一篇关于长江的文章。", "tabs\tand\nnewlines\r\n  spaces ", "\n",
         "emoji 🙂 and ümlauts €", "1234567 3.14159", "[Round 1]\n\n问：你好\n\n答：", ""]
SPECIAL_TEXT = "say <|user|> and [gMASK]sop<|assistant|></s><unk><s> eop [MASK]"


@pytest.fixture(scope="module", params=[2, 3], ids=["chatglm2", "chatglm3"])
def folder(request, chatglm2_tokenizer_dir, chatglm3_tokenizer_dir):
    return request.param, {2: chatglm2_tokenizer_dir, 3: chatglm3_tokenizer_dir}[request.param]


@pytest.fixture(scope="module")
def tok(folder):
    return AutoTokenizer.from_pretrained(folder[1], trust_remote_code=True)


@pytest.fixture(scope="module")
def sp(folder):
    return spm.SentencePieceProcessor(model_file=str(folder[1] / "tokenizer.model"))


@pytest.fixture(scope="module")
def glm3(chatglm3_tokenizer_dir):
    return AutoTokenizer.from_pretrained(chatglm3_tokenizer_dir, trust_remote_code=True)


# ----------------------------------------------------------------------------------------------
# The hub folder as it is
# ----------------------------------------------------------------------------------------------
def test_hub_folder_loads_with_special_ids_from_the_piece_count(folder, tok, sp):
    version, path = folder
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert cfg["auto_map"]["AutoTokenizer"][0] == "tokenization_chatglm.ChatGLMTokenizer"
    assert "chatglm_version" not in cfg  # told apart the way the hub configs allow
    if version == 3:
        for key in ("added_tokens_decoder", "chat_template", "eos_token", "pad_token", "unk_token", "padding_side",
                    "model_max_length", "clean_up_tokenization_spaces", "remove_space", "do_lower_case"):
            assert key in cfg, key
    assert type(tok).__name__ == "ChatGLMTokenizer" and type(tok).__module__.startswith("transformers_modules")
    assert tok.chatglm_version == version
    names = SP_SPECIAL_TOKENS + (SP_ROLE_TOKENS if version == 3 else ())
    n = sp.get_piece_size()
    for i, name in enumerate(names):  # REFERENCE 5 order, from the file's piece count
        assert tok.convert_tokens_to_ids(name) == tok.get_command(name) == n + i
        assert tok.convert_ids_to_tokens(n + i) == name
    for entry_id, entry in cfg.get("added_tokens_decoder", {}).items():
        assert tok.convert_tokens_to_ids(entry["content"]) == int(entry_id)
    assert len(tok) == tok.vocab_size == n + len(names)
    assert tok.eos_token == "</s>" and tok.eos_token_id == sp.eos_id()
    assert tok.pad_token == tok.unk_token == "<unk>" and tok.pad_token_id == tok.unk_token_id == sp.unk_id() == 0
    assert tok.padding_side == "left"
    assert set(tok.all_special_ids) >= {n + i for i in range(len(names))}
    with pytest.raises(KeyError):
        tok.get_command("<|user|>" if version == 2 else "<|nobody|>")


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_sentencepiece_ids(tok, sp, text):
    ids = tok.encode_plain(text)
    assert ids == sp.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ids  # the transformers path agrees
    assert tok(text)["input_ids"] == tok.get_prefix_tokens() + ids  # [gMASK] sop first, as upstream
    assert tok.get_prefix_tokens() == tok.convert_tokens_to_ids(["[gMASK]", "sop"])
    assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.convert_tokens_to_string(tok.tokenize(text)) == text
    assert tok.encode_plain_batch([text, text + "x"]) == [ids, sp.encode(text + "x")]


def test_dummy_prefix_as_the_file_says(tok, sp):
    """A leading "\\n" is the pieces "▁" + "<0x0A>" (the dummy prefix of the model file), as chatglm3-6b."""
    assert [sp.id_to_piece(i) for i in tok.encode_plain("\n")] == ["▁", "<0x0A>"]


def test_special_text_in_content_is_plain(tok, glm3):
    specials = set(tok.all_special_ids)
    ids = tok.encode_plain(SPECIAL_TEXT)
    assert not specials & set(ids) and tok.decode(ids) == SPECIAL_TEXT
    assert not specials & set(tok(SPECIAL_TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    assert not specials & set(np.concatenate(PlainEncoder(tok)([SPECIAL_TEXT, "x"])).tolist())
    # ChatGLM3 message: [<|role|>] + encode(metadata + "\n") + encode(content)
    msg = glm3.build_single_message("user", "", SPECIAL_TEXT)
    assert msg == [glm3.get_command("<|user|>")] + glm3.encode_plain("\n") + glm3.encode_plain(SPECIAL_TEXT)
    assert not set(glm3.all_special_ids) & set(msg[1:])
    # the content, encoded on its own, starts with the file's dummy-prefix space (as the hub's chat_template shows)
    assert glm3.decode(glm3.get_prefix_tokens() + msg) == "[gMASK]sop<|user|>\n " + SPECIAL_TEXT
    assert glm3.decode(msg, skip_special_tokens=True) == "\n " + SPECIAL_TEXT  # typed "</s>" is text, kept
    with pytest.raises(ValueError, match="unknown role"):
        glm3.build_single_message("narrator", "", "x")
    if tok.chatglm_version == 2:
        with pytest.raises(ValueError, match="no role tokens"):
            tok.build_single_message("user", "", "x")


def test_transformers_path_recognises_special_text_but_not_inside_words(tok, glm3):
    """tokenizer(text) recognises registered token text (chat templates need it), but the word-like `sop` / `eop`
    only right after another special token: "people" and "Aesop" stay letters (the hub class split them)."""
    words = "people of Aesop sopa eop"
    assert tok(words, add_special_tokens=False)["input_ids"] == tok.encode_plain(words)
    ids = tok("[gMASK]sop hi", add_special_tokens=False)["input_ids"]
    assert ids[:2] == tok.get_prefix_tokens() and ids[2:] == tok.encode_plain(" hi")
    # chatglm3-6b's own chat_template gives the ids the model's message builder gives
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "people?"}]
    manual = glm3.get_prefix_tokens()
    for m in conv:
        manual += glm3.build_single_message(m["role"], "", m["content"])
    templ = glm3.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(templ) == manual + [glm3.get_command("<|assistant|>")]


def test_decode_padded_rows_and_specials(tok):
    ids = tok.encode_plain("ok")
    assert tok.decode(ids + [len(tok) + 5]) == "ok"  # the model's padded embedding rows decode to nothing
    eos = tok.eos_token_id
    assert tok.decode(ids + [eos]) == "ok</s>" and tok.decode(ids + [eos], skip_special_tokens=True) == "ok"


# ----------------------------------------------------------------------------------------------
# Character offsets: which tokens hold which characters
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS + [SPECIAL_TEXT, "a  b\n\nc 🙂🙂x", "答：🙂"])
def test_offsets_cover_every_character(tok, text):
    ids, spans = tok.encode_with_offsets(text)
    assert ids == tok.encode_plain(text) and len(spans) == len(ids)
    assert all(0 <= a <= b <= len(text) for a, b in spans)
    assert [a for a, _ in spans] == sorted(a for a, _ in spans)
    # the distinct non-empty spans tile the text: every character is held, by consecutive tokens
    tiles = [span for i, span in enumerate(spans) if span[1] > span[0] and (i == 0 or span != spans[i - 1])]
    assert "".join(text[a:b] for a, b in tiles) == text
    assert all(tiles[i][1] == tiles[i + 1][0] for i in range(len(tiles) - 1))


def test_offsets_of_an_answer(glm3):
    """The chatglm2 template's rule: the tokens holding a character of the answer, found from the spans."""
    prompt, answer = "[Round 1]\n\n问：写一首诗\n\n答：", "春风拂面 🙂 ok"
    text = prompt + answer + "\n\n"
    ids, spans = glm3.encode_with_offsets(text)
    a, b = len(prompt), len(prompt) + len(answer)
    held = [i for i, (s, e) in enumerate(spans) if s < b and e > a]
    assert held == list(range(held[0], held[-1] + 1))
    assert answer in glm3.decode([ids[i] for i in held])
    emoji = text.index("🙂")
    emoji_tokens = [i for i, (s, e) in enumerate(spans) if s <= emoji < e]
    assert len(emoji_tokens) == 4 and all(glm3.convert_ids_to_tokens(ids[i]).startswith("<0x") for i in emoji_tokens)


# ----------------------------------------------------------------------------------------------
# transformers paths: padding, save_pretrained, pickling, configs
# ----------------------------------------------------------------------------------------------
def test_left_padding_for_batched_generation(tok):
    batch = tok(["a much longer prompt here", "hi"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert torch.equal(ids[0], torch.tensor(tok("a much longer prompt here")["input_ids"]))
    n_pad = int((mask[1] == 0).sum())
    assert n_pad > 0 and mask[1, :n_pad].sum() == 0 and (ids[1, :n_pad] == tok.pad_token_id).all()
    assert ids[1, n_pad:].tolist() == tok("hi")["input_ids"]
    # explicit padding_side (the upstream `_pad() got an unexpected keyword argument 'padding_side'` crash)
    padded = tok.pad({"input_ids": [[5, 6, 7], [8]]}, padding=True, padding_side="right")
    assert padded["input_ids"][1] == [8, tok.pad_token_id, tok.pad_token_id]


def test_save_reload_round_trip(tmp_path, folder, tok):
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    assert (out / "tokenizer.model").read_bytes() == (folder[1] / "tokenizer.model").read_bytes()
    assert (out / "tokenization_chatglm.py").is_file()
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["auto_map"]["AutoTokenizer"][0] == "tokenization_chatglm.ChatGLMTokenizer"
    assert cfg["chatglm_version"] == tok.chatglm_version
    for loaded in (AutoTokenizer.from_pretrained(out, trust_remote_code=True), ChatGLMTokenizer.from_pretrained(out)):
        assert loaded.chatglm_version == tok.chatglm_version and len(loaded) == len(tok)
        assert loaded.padding_side == "left" and loaded.all_special_ids == tok.all_special_ids
        for text in TEXTS + [SPECIAL_TEXT]:
            assert loaded(text)["input_ids"] == tok(text)["input_ids"]
            assert loaded.encode_plain(text) == tok.encode_plain(text)
        assert loaded.chat_template == tok.chat_template
    # the class used directly (not through auto_map) also saves a self-contained folder
    direct = ChatGLMTokenizer.from_pretrained(folder[1])
    direct.save_pretrained(tmp_path / "direct")
    again = AutoTokenizer.from_pretrained(tmp_path / "direct", trust_remote_code=True)
    assert again.encode_plain("Hello 你好") == tok.encode_plain("Hello 你好")
    assert again.chatglm_version == tok.chatglm_version


def test_pickle_and_deepcopy(tok):
    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert clone.encode_plain("Hello 你好") == tok.encode_plain("Hello 你好")
        assert clone.encode_with_offsets("Hello") == tok.encode_with_offsets("Hello")
        assert clone.get_prefix_tokens() == tok.get_prefix_tokens()


def test_version_from_config_or_setting(tmp_path, chatglm3_tokenizer_dir):
    assert detect_chatglm_version({}) == 2
    assert detect_chatglm_version({"chat_template": "[gMASK]sop<|{{ message['role'] }}|>"}) == 3
    assert detect_chatglm_version({"additional_special_tokens": ["<|observation|>"]}) == 3
    folder = tmp_path / "minimal"
    shutil.copytree(chatglm3_tokenizer_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    minimal = {k: cfg[k] for k in ("auto_map", "tokenizer_class", "remove_space", "do_lower_case")}
    (folder / "tokenizer_config.json").write_text(json.dumps(minimal))
    assert AutoTokenizer.from_pretrained(folder, trust_remote_code=True).chatglm_version == 2  # names no role
    (folder / "tokenizer_config.json").write_text(json.dumps({**minimal, "chatglm_version": 3}))
    three = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert three.chatglm_version == 3 and len(three) == three.n_pieces + 9
    assert ChatGLMTokenizer(vocab_file=str(folder / "tokenizer.model"), chatglm_version=3).get_command("<|user|>") \
        == three.get_command("<|user|>")
    with pytest.raises(ValueError, match="chatglm_version"):
        ChatGLMTokenizer(vocab_file=str(folder / "tokenizer.model"), chatglm_version=4)


def test_config_that_disagrees_with_the_model_is_a_clear_error(tmp_path, chatglm3_tokenizer_dir, glm4_tokenizer_dir):
    bad = tmp_path / "bad"
    shutil.copytree(chatglm3_tokenizer_dir, bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    first = min(cfg["added_tokens_decoder"], key=int)
    cfg["added_tokens_decoder"][str(int(first) + 1)] = cfg["added_tokens_decoder"].pop(first)
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="added_tokens_decoder"):
        AutoTokenizer.from_pretrained(bad, trust_remote_code=True)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        ChatGLMTokenizer(vocab_file=str(glm4_tokenizer_dir / "tokenizer.model"))


def test_glm4_folder_still_gets_chatglm4(glm4_tokenizer_dir):
    from transformers.dynamic_module_utils import get_imports

    assert type(AutoTokenizer.from_pretrained(glm4_tokenizer_dir, trust_remote_code=True)).__name__ == \
        "ChatGLM4Tokenizer"
    # the remote-code check asks for no sentencepiece: GLM-4 folders load without it
    assert "sentencepiece" not in get_imports(glm4_tokenizer_dir / "tokenization_chatglm.py")


# ----------------------------------------------------------------------------------------------
# tools/make_tiny.py SentencePiece builders
# ----------------------------------------------------------------------------------------------
def test_builders_are_fast_and_deterministic(tmp_path):
    from longsft.tiny.tokenizers import make_chatglm_tokenizer, make_llama2_tokenizer

    start = time.perf_counter()
    a = make_chatglm_tokenizer(tmp_path / "a", version=3)
    b = make_chatglm_tokenizer(tmp_path / "b", version=3)
    make_chatglm_tokenizer(tmp_path / "c", version=2)
    make_llama2_tokenizer(tmp_path / "d")
    assert time.perf_counter() - start < 10
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    with pytest.raises(ValueError, match="version"):
        make_chatglm_tokenizer(tmp_path / "e", version=4)


def test_tiny_sentencepiece_model_settings(sp):
    """Byte fallback (any text encodes, no <unk>), the ids and dummy prefix of the real files, EN + ZH pieces."""
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2
    for text in TEXTS + ["𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ ñ"]:
        assert sp.unk_id() not in sp.encode(text) and sp.decode(sp.encode(text)) == text
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert any(len(p) > 2 and p.isascii() and p.isalpha() for p in pieces) and "▁你好" in pieces


LLAMA2_TEXTS = ["Hello world!", "你好，请写一篇关于长江的文章。", "[INST]Write a poem.[/INST]Roses are red.\n\n[INST]More",
                "tabs\tand\nnewlines\r\n  double  spaces ", "emoji 🙂 and ümlauts", "x"]


def test_llama2_folder_as_the_hub_ships_it(tmp_path, llama2_tokenizer_dir):
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (llama2_tokenizer_dir / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(llama2_tokenizer_dir)
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_dir / "tokenizer.model"))
    assert tok.is_fast and len(tok) == sp.get_piece_size()
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2] == [sp.unk_id(), sp.bos_id(), sp.eos_id()]
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    # transformers' own fast tokenizer on this folder = <s> + SentencePiece (texts not starting with a space)
    for text in LLAMA2_TEXTS:
        assert tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    # special-token text typed in content stays text through the plain encoder
    plain = PlainEncoder(tok)(["say </s> and <s> [INST]"])[0].tolist()
    assert plain == sp.encode("say </s> and <s> [INST]") and not {0, 1, 2} & set(plain)
    # our tokenizer.json agrees with what transformers converts from tokenizer.model alone
    sp_only = tmp_path / "sp_only"
    sp_only.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(llama2_tokenizer_dir / name, sp_only / name)
    converted = AutoTokenizer.from_pretrained(sp_only)
    for text in LLAMA2_TEXTS:
        assert converted(text)["input_ids"] == tok(text)["input_ids"], text
