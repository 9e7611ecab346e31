"""The ChatGLM2/3 and Llama-2 templates (`chatglm3`, `chatglm2`, `llama2`) through pre_tokenize.py on tiny tokenizers.

    python -m pytest -q tests/templates/test_longalign.py

Each template is checked against its rule written out directly (REFERENCE 5): the token ids against
sentencepiece itself on the folder's tokenizer.model (ChatGLM2 / Llama-2: the whole text in one call) or the
hub's build_single_message (ChatGLM3), the supervised spans decoded, multi-turn, empty and opted-out replies,
special-token text in content, every skip reason, and --num_proc 1 vs 4.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from longsft import models
import pre_tokenize
from longsft.templates import registry
from longsft.data.inputs import InputError
from longsft.data.storage import IGNORE_INDEX, TokenizedData
from longsft.train.batches import LMDataset
from tests.records import supervised_runs as runs, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
TEXT = "see </s> <s> <unk> [gMASK] sop <|user|> [INST] [Round 1] 答："  # special-token / template text
MULTI = {"messages": [
    {"role": "user", "content": "What is 2+2? " + TEXT},
    {"role": "assistant", "content": "It is\u200b 4. " + TEXT},
    {"role": "user", "content": [{"type": "text", "text": "And "}, "3+3?"]},
    {"role": "assistant", "content": "Six.", "loss": False},
    {"role": "user", "content": "Say nothing."},
    {"role": "assistant", "content": ""},
    {"role": "user", "content": "用中文回答：天空是什么颜色？"},
    {"role": "assistant", "content": "天空是蓝色的。"},
    {"role": "user", "content": "A trailing question is dropped."},
]}
ALPACA = {"instruction": "Translate", "input": "hello", "output": "你好", "history": [["h1", "r1"]]}
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
SKIPS = [  # (record, reason, words of the detail), one per way a record does not fit the round formats
    ({"messages": [{"role": "system", "content": "S"}, *GOOD["messages"]]}, "unknown_role", "role 'system'"),
    ({"messages": [*GOOD["messages"], {"role": "observation", "content": "o"},
                   {"role": "assistant", "content": "a"}]}, "unknown_role", "role 'observation'"),
    ({"messages": [{"role": "user", "content": "q"}, *GOOD["messages"]]}, "wrong_schema", "two user messages"),
    ({"messages": [*GOOD["messages"], {"role": "assistant", "content": "more"}]}, "wrong_schema",
     "two assistant messages"),
    ({"messages": [{"role": "assistant", "content": "a"}, *GOOD["messages"]]}, "wrong_schema",
     "an assistant message first"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "metadata": "f"}]},
     "wrong_schema", "`metadata` is GLM-4 only"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": False}]},
     "nothing_to_supervise", "no non-empty assistant reply"),
    ('{"messages": [', "invalid_json", ""),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 300}]},
     "too_long", "tokens > --max_length 128"),
]
ROUND_TEMPLATES = {"chatglm2": ("chatglm2_tokenizer_dir", "chatglm2"), "llama2": ("llama2_tokenizer_dir", "llama2")}


def pretok(tok_dir, inputs, out, *extra):
    return pre_tokenize.main(["--model_name_or_path", str(tok_dir), "--input", *map(str, inputs),
                              "--output_dir", str(out), "--num_proc", "1", "--no_shuffle", *extra])


def dir_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def sentencepiece(tok_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(Path(tok_dir) / "tokenizer.model"))


def rounds_reference(template, sp, prefix, eos, messages):
    """REFERENCE 5 written out: the rounds' text (a trailing question dropped), encoded by sentencepiece in one
    call; labels: tokens whose text (decoded piece by piece) overlaps a supervised answer's characters, and </s>
    at the position after each such answer."""
    pairs = [(messages[i], messages[i + 1]) for i in range(0, len(messages) - 1, 2)]
    text, answers = "", []
    for i, (q, a) in enumerate(pairs, 1):
        head = (f"[Round {i}]\n\n问：{q.content}\n\n答：" if template == "chatglm2"
                else f"[INST]{q.content}[/INST]")
        text += ("\n\n" if i > 1 else "") + head
        if a.train:
            answers.append((len(text), len(text) + len(a.content)))
        text += a.content
    body = sp.encode(text)
    ids = prefix + body + [eos]
    # character span of each token, from the piece strings themselves ("▁" is a space; the dummy prefix before
    # the text holds no character; byte pieces hold the character their bytes complete)
    spans, pos, pending = [], 0, []
    for k, piece in enumerate(sp.encode(text, out_type=str)):
        if sp.is_byte(body[k]):
            pending.append(int(piece[3:5], 16))
            try:
                char = bytes(pending).decode("utf-8")
            except UnicodeDecodeError:
                continue
            spans += [(pos, pos + len(char))] * len(pending)
            pos, pending = pos + len(char), []
            continue
        surface = piece.replace("\u2581", " ")
        if k == 0 and surface.startswith(" ") and not text.startswith(" "):
            surface = surface[1:]
        assert text.startswith(surface, pos)
        spans.append((pos, pos + len(surface)))
        pos += len(surface)
    assert pos == len(text) and len(spans) == len(body)
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in answers:
        inside = [k for k, (s, e) in enumerate(spans) if s < b and e > a]
        for k in inside:
            labels[len(prefix) + k] = ids[len(prefix) + k]
        labels[len(prefix) + inside[-1] + 1] = eos
    return ids, labels, text


@pytest.fixture(scope="module")
def toks(chatglm2_tokenizer_dir, chatglm3_tokenizer_dir, llama2_tokenizer_dir):
    return {"chatglm2": models.load_tokenizer(str(chatglm2_tokenizer_dir), "chatglm2"),
            "chatglm3": models.load_tokenizer(str(chatglm3_tokenizer_dir), "chatglm3"),
            "llama2": models.load_tokenizer(str(llama2_tokenizer_dir), "llama2")}


# ----------------------------------------------------------------------------------------------
# chatglm2 / llama2: the rule, the decoded spans, the skips
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["chatglm2", "llama2"])
def test_round_format_follows_the_rule(tmp_path, request, toks, template):
    from longsft.data.inputs import parse_record

    fixture, family = ROUND_TEMPLATES[template]
    tok_dir, tok = request.getfixturevalue(fixture), toks[template]
    records = [MULTI, ALPACA, GOOD]
    records += [json.loads(line) for line in (ROOT / "data" / "sample.jsonl").read_text().splitlines()]
    rep = pretok(tok_dir, [write_jsonl(tmp_path / "in.jsonl", records)], tmp_path / "out", "--max_length", "100000")
    kept = []
    for r in records:
        messages = parse_record(r)[1]
        if all(m.role in ("user", "assistant") for m in messages):
            kept.append(messages)
    ds = LMDataset(tmp_path / "out")
    assert len(ds) == len(kept) == rep["samples_kept"] > 25
    assert rep["skipped"]["unknown_role"] == rep["skipped_total"] == len(records) - len(kept)  # the system prompts
    sp = sentencepiece(tok_dir)
    prefix = tok.convert_tokens_to_ids(["[gMASK]", "sop"] if template == "chatglm2" else ["<s>"])
    fmt = registry.chat_format(template, tok)
    for i, messages in enumerate(kept):
        ids, labels, _ = rounds_reference(template, sp, prefix, tok.eos_token_id, messages)
        assert ds[i]["input_ids"].tolist() == ids, i
        assert ds[i]["labels"].tolist() == labels, i
        one_ids, one_labels = fmt.encode(messages)  # one conversation (tools/generate.py's path): the same
        assert one_ids.tolist() == ids and one_labels.tolist() == labels, i
    meta = TokenizedData(tmp_path / "out").meta
    assert (meta["model_family"], meta["template"]) == (family, template)
    assert meta["tokenizer"]["pad_token_id"] == tok.convert_tokens_to_ids("<unk>") == 0  # LongAlign pads with 0
    assert meta["stop_token_ids"] == [tok.eos_token_id]


@pytest.mark.parametrize("template", ["chatglm2", "llama2"])
def test_round_format_decoded(tmp_path, request, toks, template):
    fixture, _ = ROUND_TEMPLATES[template]
    tok_dir, tok = request.getfixturevalue(fixture), toks[template]
    pretok(tok_dir, [write_jsonl(tmp_path / "in.jsonl", [MULTI, ALPACA])], tmp_path / "out")
    ds = LMDataset(tmp_path / "out")
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    eos = tok.eos_token_id
    if template == "chatglm2":
        text = ("[gMASK]sop[Round 1]\n\n问：What is 2+2? " + TEXT + "\n\n答：It is 4. " + TEXT
                + "\n\n[Round 2]\n\n问：And 3+3?\n\n答：Six.\n\n[Round 3]\n\n问：Say nothing.\n\n答："
                "\n\n[Round 4]\n\n问：用中文回答：天空是什么颜色？\n\n答：天空是蓝色的。</s>")
        alpaca = "[gMASK]sop[Round 1]\n\n问：h1\n\n答：r1\n\n[Round 2]\n\n问：Translate\nhello\n\n答：你好</s>"
    else:  # SentencePiece's dummy prefix: decoding shows a space after <s>
        text = ("<s> [INST]What is 2+2? " + TEXT + "[/INST]It is 4. " + TEXT + "\n\n[INST]And 3+3?[/INST]Six."
                "\n\n[INST]Say nothing.[/INST]\n\n[INST]用中文回答：天空是什么颜色？[/INST]天空是蓝色的。</s>")
        alpaca = "<s> [INST]h1[/INST]r1\n\n[INST]Translate\nhello[/INST]你好</s>"
    assert tok.decode(ids) == text  # zero-width space removed, trailing question dropped, no system
    # the replies, each with </s> as the label after it; the opted-out and the empty reply are not supervised
    assert [tok.decode(r) for r in runs(labels)] == ["It is 4. " + TEXT + "</s>", "天空是蓝色的。</s>"]
    relabelled = np.flatnonzero((labels != IGNORE_INDEX) & (labels != ids)).tolist()
    assert len(relabelled) == 1 and labels[relabelled[0]] == eos  # mid-conversation: the next round's first token
    assert tok.decode(ids[relabelled[0]:]).lstrip().startswith("[Round 2]" if template == "chatglm2" else "[INST]")
    assert labels[-1] == ids[-1] == eos  # the last reply ends the text: the final </s> is its stop label
    # special-token text typed in content stays text: the template's own special tokens only
    specials = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<unk>")}
    assert [i for i in ids.tolist() if i in specials] == ([*tok.get_prefix_tokens(), eos] if template == "chatglm2"
                                                          else [tok.bos_token_id, eos])
    assert tok.decode(ds[1]["input_ids"]) == alpaca
    assert [tok.decode(r) for r in runs(ds[1]["labels"])] == ["r1</s>", "你好</s>"]


def test_round_formats_agree_with_the_inference_prompt(toks):
    """tools/generate.py cuts a conversation where its first supervised token is: that is the model's own prompt
    (ChatGLM2's build_prompt text after [gMASK] sop, encoded in one call; Llama-2's <s>[INST]q[/INST])."""
    from tools.generate import prompt_ids

    glm2, llama2 = toks["chatglm2"], toks["llama2"]
    question = "天空是什么颜色？"
    cases = [("chatglm2", glm2, glm2.get_prefix_tokens() + glm2.encode_plain(f"[Round 1]\n\n问：{question}\n\n答：")),
             ("llama2", llama2, llama2(f"[INST]{question}[/INST]")["input_ids"])]  # the hub tokenizer adds <s>
    for template, tok, expected in cases:
        assert list(prompt_ids(registry.chat_format(template, tok), question, None)) == expected, template


@pytest.mark.parametrize("template", ["chatglm2", "llama2"])
def test_round_format_skip_reasons(tmp_path, request, template):
    tok_dir = request.getfixturevalue(ROUND_TEMPLATES[template][0])
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD] + [r for r, _, _ in SKIPS])
    rep = pretok(tok_dir, [src], tmp_path / "out", "--max_length", "128")
    assert rep["samples_kept"] == 1 and rep["lines_read"] == 1 + len(SKIPS)
    assert rep["skipped"] == {"invalid_json": 1, "wrong_schema": 4, "unknown_role": 2, "too_long": 1,
                              "nothing_to_supervise": 1}
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["reason"]) for s in skipped] == [(k + 2, reason) for k, (_, reason, _) in enumerate(SKIPS)]
    for s, (_, _, words) in zip(skipped, SKIPS):
        assert words in s["detail"], s
    assert all(f"the {template} format" in s["detail"] for s in skipped if s["reason"] in ("unknown_role",
                                                                                          "wrong_schema"))
    # --strict: a record that does not fit the format is fatal, as any wrong schema is
    with pytest.raises(InputError, match=r"in.jsonl:2: unknown_role"):
        pretok(tok_dir, [src], tmp_path / "strict", "--strict")


def test_round_format_truncation_keeps_the_prefix(tmp_path, chatglm2_tokenizer_dir, toks):
    long = {"messages": [{"role": "user", "content": "write"}, {"role": "assistant", "content": "word " * 300}]}
    rep = pretok(chatglm2_tokenizer_dir, [write_jsonl(tmp_path / "in.jsonl", [long])], tmp_path / "out",
                 "--max_length", "64", "--truncate", "left")
    ids, labels = LMDataset(tmp_path / "out")[0].values()
    tok = toks["chatglm2"]
    assert rep["truncated"] == 1 and len(ids) == 64 and ids[:2].tolist() == tok.get_prefix_tokens()
    assert labels[-1] == ids[-1] == tok.eos_token_id and (labels[2:] != IGNORE_INDEX).all()


# ----------------------------------------------------------------------------------------------
# chatglm3: the GLM-4 rule with ChatGLM3's tokens
# ----------------------------------------------------------------------------------------------

TOOL = {"messages": [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
    {"role": "observation", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees. " + TEXT},
]}


def test_chatglm3_format(tmp_path, chatglm3_tokenizer_dir, toks):
    tok = toks["chatglm3"]
    rep = pretok(chatglm3_tokenizer_dir, [write_jsonl(tmp_path / "in.jsonl", [MULTI, TOOL])], tmp_path / "out")
    assert rep["samples_kept"] == 2 and TokenizedData(tmp_path / "out").meta["template"] == "chatglm3"  # default
    ds = LMDataset(tmp_path / "out")
    eos = tok.eos_token_id
    for k, record in enumerate((MULTI, TOOL)):  # the hub's build_single_message per message, </s> last
        from longsft.data.inputs import parse_record

        messages = parse_record(record)[1]
        expected = tok.get_prefix_tokens() + [i for m in messages
                                              for i in tok.build_single_message(m.role, m.metadata, m.content)]
        assert ds[k]["input_ids"].tolist() == expected + [eos]
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert tok.decode(ids).startswith("[gMASK]sop<|user|>\n What is 2+2? " + TEXT + "<|assistant|>\n It is 4. ")
    assert tok.decode(ids).endswith("<|user|>\n A trailing question is dropped.</s>")  # kept: ChatGLM3 has roles
    # a reply is supervised after its role token through the token after it
    assert [tok.decode(r) for r in runs(labels)] == ["\n It is 4. " + TEXT + "<|user|>", "\n 天空是蓝色的。<|user|>"]
    assert labels[-1] == IGNORE_INDEX and (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()
    role_ids = {tok.convert_tokens_to_ids(f"<|{r}|>") for r in ("system", "user", "assistant", "observation")}
    assert sum(i in role_ids for i in ids.tolist()) == 9 and ids.tolist().count(eos) == 1  # none from content
    ids, labels = ds[1]["input_ids"], ds[1]["labels"]
    assert tok.decode(ids) == ("[gMASK]sop<|system|>\n You can call tools.<|user|>\n Weather in Paris?<|assistant|>"
                               'get_weather\n {"city": "Paris"}<|observation|>\n {"temp": 21}<|assistant|>\n It is 21 '
                               "degrees. " + TEXT + "</s>")
    assert [tok.decode(r) for r in runs(labels)] == ['get_weather\n {"city": "Paris"}<|observation|>',
                                                     "\n It is 21 degrees. " + TEXT + "</s>"]
    meta = TokenizedData(tmp_path / "out").meta
    assert meta["stop_token_ids"] == tok.convert_tokens_to_ids(["</s>", "<|user|>", "<|observation|>"])
    # the chatglm3 family also takes LongAlign's chatglm2 rounds (LongAlign-6B-64k's data)
    rep = pretok(chatglm3_tokenizer_dir, [write_jsonl(tmp_path / "g.jsonl", [GOOD])], tmp_path / "r",
                 "--template", "chatglm2")
    assert tok.decode(LMDataset(tmp_path / "r")[0]["input_ids"]) == \
        "[gMASK]sop[Round 1]\n\n问：hi\n\n答：hello there</s>"


def test_chatglm3_needs_the_role_tokens(tmp_path, chatglm2_tokenizer_dir, toks):
    fmt = registry.chat_format("chatglm3", toks["chatglm2"])
    assert any("no special token '<|user|>'" in p for p in fmt.problems)
    # an explicit --template chatglm3 on a folder taken for ChatGLM2 is honoured (issue 19): our ChatGLMTokenizer
    # builds the role tokens, so the folder is read as ChatGLM3 (tests/patch/test_registry.py has the details)
    rep = pretok(chatglm2_tokenizer_dir, [write_jsonl(tmp_path / "in.jsonl", [GOOD])], tmp_path / "o",
                 "--template", "chatglm3")
    assert rep["samples_kept"] == 1 and TokenizedData(tmp_path / "o").meta["model_family"] == "chatglm3"


# ----------------------------------------------------------------------------------------------
# Parallelism
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_num_proc_does_not_change_the_output(tmp_path, chatglm2_tokenizer_dir, chatglm3_tokenizer_dir,
                                             llama2_tokenizer_dir):
    records = [MULTI, TOOL, GOOD, ALPACA] + [r for r, _, _ in SKIPS]
    src = write_jsonl(tmp_path / "in.jsonl", records * 40)  # several work units
    for template, tok_dir in (("chatglm2", chatglm2_tokenizer_dir), ("chatglm3", chatglm3_tokenizer_dir),
                              ("llama2", llama2_tokenizer_dir)):
        outs, reports = [], []
        for n in (1, 4):
            out = tmp_path / f"{template}{n}"
            reports.append(pre_tokenize.main(["--model_name_or_path", str(tok_dir), "--input", str(src),
                                              "--output_dir", str(out), "--num_proc", str(n), "--max_length", "128",
                                              "--truncate", "left"]))
            outs.append(dir_bytes(out))
        assert outs[0] == outs[1] and len(outs[0]) == 6, template
        rep = reports[0]
        assert reports[1] == rep
        assert rep["lines_read"] == len(records) * 40 == rep["samples_kept"] + rep["skipped_total"]
        # per copy: MULTI, GOOD, ALPACA and the long record (both cut) fit every format; chatglm3 also takes the system,
        # observation, metadata and non-alternating records; nobody the opted-out or the invalid line
        assert rep["samples_kept"] == 40 * (11 if template == "chatglm3" else 4) and rep["truncated"] == 80, template
