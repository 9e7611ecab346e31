"""pre_tokenize.py, its front ends pre_tokenize_glm4.py / pre_tokenize_llama3.py, the templates and longsft/data/pretokenize.py end
to end on tiny tokenizers."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longsft.data import pretokenize as driver
from longsft.data import storage
from longsft import models
import pre_tokenize
import pre_tokenize_glm4
import pre_tokenize_llama3
from longsft.templates import registry
from longsft.templates import glm as glm_templates
from longsft.data.inputs import InputError
from patch import families
from longsft.data.storage import IGNORE_INDEX, TokenizedData
from longsft.train.batches import LMDataset
from tests.records import supervised_runs as spans, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
SPECIAL_TEXT = "see <|user|> <|eot_id|> <|end_of_text|> [INST] <|endoftext|> [gMASK]"

MULTI = {"messages": [
    {"role": "system", "content": "You are concise."},
    {"role": "user", "content": "What is 2+2? " + SPECIAL_TEXT},
    {"role": "assistant", "content": "It is\u200b 4. " + SPECIAL_TEXT},
    {"role": "user", "content": [{"type": "text", "text": "And "}, "3+3?"]},
    {"role": "assistant", "content": "Six.", "loss": False},
    {"role": "user", "content": "Say nothing."},
    {"role": "assistant", "content": ""},
    {"role": "user", "content": "用中文回答：天空是什么颜色？"},
    {"role": "assistant", "content": "天空是蓝色的。"},
    {"role": "user", "content": "A trailing question stays unsupervised."},
]}
TOOL = {"messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
    {"role": "observation", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees.", "loss_weight": 1},
]}


def run_glm(tok_dir, inputs, out, *extra):
    return pre_tokenize_glm4.main(["--model_name_or_path", str(tok_dir), "--input", *map(str, inputs),
                                   "--output_dir", str(out), "--num_proc", "1", "--no_shuffle", *extra])


def run_llama(tok_dir, inputs, out, template, *extra):
    return pre_tokenize_llama3.main(["--model_name_or_path", str(tok_dir), "--input", *map(str, inputs),
                                     "--output_dir", str(out), "--template", template, "--num_proc", "1",
                                     "--no_shuffle", *extra])


# ----------------------------------------------------------------------------------------------
# Formats and labels
# ----------------------------------------------------------------------------------------------

def test_glm4_format_and_labels(tmp_path, glm4_tokenizer_dir, glm):
    run_glm(glm4_tokenizer_dir, [write_jsonl(tmp_path / "in.jsonl", [MULTI, TOOL])], tmp_path / "out")
    ds = LMDataset(tmp_path / "out")
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert glm.decode(ids) == (
        "[gMASK]<sop><|system|>\nYou are concise.<|user|>\nWhat is 2+2? " + SPECIAL_TEXT
        + "<|assistant|>\nIt is 4. " + SPECIAL_TEXT + "<|user|>\nAnd 3+3?<|assistant|>\nSix.<|user|>\nSay nothing."
        "<|assistant|>\n<|user|>\n用中文回答：天空是什么颜色？<|assistant|>\n天空是蓝色的。"
        "<|user|>\nA trailing question stays unsupervised.<|endoftext|>")
    # reply + the token after it; the opted-out and the empty reply are not supervised; zero-width removed
    assert [glm.decode(s) for s in spans(labels)] == ["\nIt is 4. " + SPECIAL_TEXT + "<|user|>",
                                                      "\n天空是蓝色的。<|user|>"]
    specials = set(glm.all_special_ids)
    template_specials = [i for i in ids.tolist() if i in specials]
    assert len(template_specials) == 2 + 10 + 1  # prefix, one role token per message, final eos: none from content
    assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()

    ids, labels = ds[1]["input_ids"], ds[1]["labels"]
    assert glm.decode(ids) == ('[gMASK]<sop><|user|>\nWeather in Paris?<|assistant|>get_weather\n{"city": "Paris"}'
                               '<|observation|>\n{"temp": 21}<|assistant|>\nIt is 21 degrees.<|endoftext|>')
    assert [glm.decode(s) for s in spans(labels)] == ['get_weather\n{"city": "Paris"}<|observation|>',
                                                      "\nIt is 21 degrees.<|endoftext|>"]
    meta = TokenizedData(tmp_path / "out").meta
    assert meta["model_family"] == meta["template"] == "glm4"
    assert meta["tokenizer"]["pad_token_id"] == meta["tokenizer"]["eos_token_id"] == glm.convert_tokens_to_ids("<|endoftext|>")
    assert meta["tokenizer"]["vocab_size"] == len(glm) and meta["tokenizer"]["class"] == "ChatGLM4Tokenizer"
    assert meta["stop_token_ids"] == glm.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    assert meta["max_length"] == 32768 and meta["truncate"] == "skip" and meta["inputs"] == [str(tmp_path / "in.jsonl")]


def test_llama3_format_and_labels(tmp_path, llama3_tokenizer_dir, llama):
    rep = run_llama(llama3_tokenizer_dir, [write_jsonl(tmp_path / "in.jsonl", [MULTI, TOOL])], tmp_path / "out", "llama3")
    assert rep["samples_kept"] == 1 and rep["skipped"]["unknown_role"] == 1  # observation: GLM-4 only
    ds = LMDataset(tmp_path / "out")
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    h = lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n"  # noqa: E731
    assert llama.decode(ids) == (
        "<|begin_of_text|>" + h("system") + "You are concise.<|eot_id|>" + h("user") + "What is 2+2? " + SPECIAL_TEXT
        + "<|eot_id|>" + h("assistant") + "It is 4. " + SPECIAL_TEXT + "<|eot_id|>" + h("user") + "And 3+3?<|eot_id|>"
        + h("assistant") + "Six.<|eot_id|>" + h("user") + "Say nothing.<|eot_id|>" + h("assistant") + "<|eot_id|>"
        + h("user") + "用中文回答：天空是什么颜色？<|eot_id|>" + h("assistant") + "天空是蓝色的。<|eot_id|>"
        + h("user") + "A trailing question stays unsupervised.<|eot_id|>")
    assert [llama.decode(s) for s in spans(labels)] == ["It is 4. " + SPECIAL_TEXT + "<|eot_id|>", "天空是蓝色的。<|eot_id|>"]
    assert ids.tolist().count(llama.bos_token_id) == 1
    meta = TokenizedData(tmp_path / "out").meta
    assert meta["template"] == "llama3" and meta["model_family"] == "llama3"
    assert meta["tokenizer"]["bos_token_id"] == llama.bos_token_id
    assert meta["stop_token_ids"][-1] == llama.convert_tokens_to_ids("<|eot_id|>")


def test_longwriter_format_and_labels(tmp_path, llama3_tokenizer_dir, llama):
    run_llama(llama3_tokenizer_dir, [write_jsonl(tmp_path / "in.jsonl", [MULTI])], tmp_path / "out", "longwriter")
    ds = LMDataset(tmp_path / "out")
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    # no <|end_of_text|> between turns (the history reads as the inference prompt does), one at the very end
    assert llama.decode(ids) == (
        "<|begin_of_text|><<SYS>>\nYou are concise.\n<</SYS>>\n\n[INST]What is 2+2? " + SPECIAL_TEXT + "[/INST]"
        "It is 4. " + SPECIAL_TEXT + "[INST]And 3+3?[/INST]Six.[INST]Say nothing.[/INST]"
        "[INST]用中文回答：天空是什么颜色？[/INST]天空是蓝色的。"
        "[INST]A trailing question stays unsupervised.[/INST]<|end_of_text|>")
    # each supervised reply, then <|end_of_text|> as the label of the token after it (the next [INST])
    assert [llama.decode(s) for s in spans(labels)] == ["It is 4. " + SPECIAL_TEXT + "<|end_of_text|>",
                                                        "天空是蓝色的。<|end_of_text|>"]
    bos, end = llama.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>"])
    assert ids.tolist().count(bos) == 1 and ids.tolist().count(end) == 1  # content text stays plain
    relabelled = np.flatnonzero((labels != IGNORE_INDEX) & (labels != ids)).tolist()
    assert len(relabelled) == 2 and all(labels[i] == end for i in relabelled)
    assert all(llama.decode(ids[i:]).startswith("[INST]") for i in relabelled)
    assert labels[-1] == IGNORE_INDEX  # the final eos follows an unsupervised user turn
    meta = TokenizedData(tmp_path / "out").meta
    assert meta["template"] == "longwriter"
    assert meta["tokenizer"]["pad_token_id"] == llama.convert_tokens_to_ids("<|finetune_right_pad_id|>")
    assert meta["stop_token_ids"] == [end]


def longwriter_reference(tok, messages):
    """REFERENCE 5 "LongWriter-llama3.1 multi-turn", written out directly: BOS, every piece tokenized on its own
    and concatenated, one EOS appended; a supervised reply's tokens are labelled, and EOS is the label of the
    position right after it, unless a supervised reply starts there (its own token keeps its label)."""
    bos, eos = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>"])
    ids, labels, eos_at = [bos], [IGNORE_INDEX], []
    for m in messages:
        text = {"system": f"<<SYS>>\n{m.content}\n<</SYS>>\n\n", "user": f"[INST]{m.content}[/INST]"}.get(m.role,
                                                                                                         m.content)
        piece = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        supervised = m.role == "assistant" and m.train
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
        if supervised:
            eos_at.append(len(ids))
    ids.append(eos)
    labels.append(IGNORE_INDEX)
    for end in eos_at:
        if labels[end] == IGNORE_INDEX or end == len(ids) - 1:
            labels[end] = eos
    return ids, labels


def test_longwriter_multi_turn_follows_upstream_rule(tmp_path, llama3_tokenizer_dir, llama):
    from longsft.data.inputs import parse_record

    records = [json.loads(line) for line in (ROOT / "data" / "sample.jsonl").read_text().splitlines()]
    records += [MULTI, GOOD, LONG,
                {"messages": [{"role": "user", "content": "two replies"}, {"role": "assistant", "content": "one"},
                              {"role": "assistant", "content": "two"}, {"role": "assistant", "content": "x",
                                                                        "loss": False}]},
                {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}, {"role": "system", "content": "S2"},
                              {"role": "user", "content": "q2"}, {"role": "assistant", "content": ""},
                              {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]},
                {"conversations": [{"from": "human", "value": "h1"}, {"from": "gpt", "value": "g1"},
                                   {"from": "human", "value": "h2"}, {"from": "gpt", "value": "g2"}]}]
    kept = []
    for r in records:
        try:
            kept.append(parse_record(r)[1])
        except driver.Skip:
            continue
    kept = [m for m in kept if all(x.role in ("system", "user", "assistant") for x in m)]
    run_llama(llama3_tokenizer_dir, [write_jsonl(tmp_path / "in.jsonl", records)], tmp_path / "out", "longwriter",
              "--max_length", "100000")
    ds = LMDataset(tmp_path / "out")
    assert len(ds) == len(kept) > 30
    fmt = registry.chat_format("longwriter", models.load_tokenizer(str(llama3_tokenizer_dir), "llama3"))
    multi = 0
    for i, messages in enumerate(kept):
        ids, labels = longwriter_reference(llama, messages)
        assert ds[i]["input_ids"].tolist() == ids, i
        assert ds[i]["labels"].tolist() == labels, i
        one_ids, one_labels = fmt.encode(messages)  # one conversation (tools/generate.py's path): the same
        assert one_ids.tolist() == ids and one_labels.tolist() == labels, i
        multi += sum(m.role == "assistant" for m in messages) > 1
    assert multi >= 8


def test_sharegpt_alpaca_and_json_array(tmp_path, glm4_tokenizer_dir, glm):
    records = [
        {"conversations": [{"from": "system", "value": "Sys."}, {"from": "human", "value": "Q1"},
                           {"from": "gpt", "value": "A1"}, {"from": "function_call", "value": '{"name": "f"}'},
                           {"from": "observation", "value": "obs"}, {"from": "gpt", "value": "A2"}]},
        {"instruction": "Translate", "input": "hello", "output": "你好", "system": "S.",
         "history": [["h1", "r1"], ["h2", "r2"]]},
        {"instruction": "Only instruction", "output": "Done."},
    ]
    arr = tmp_path / "in.json"
    arr.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")
    rep = run_glm(glm4_tokenizer_dir, [arr], tmp_path / "out")
    assert rep["formats"] == {"alpaca": 2, "sharegpt": 1} and rep["inputs"][0]["format"] == "json"
    ds = LMDataset(tmp_path / "out")
    texts = [glm.decode(ds[i]["input_ids"]) for i in range(3)]
    assert texts[0] == ('[gMASK]<sop><|system|>\nSys.<|user|>\nQ1<|assistant|>\nA1<|assistant|>\n{"name": "f"}'
                        "<|observation|>\nobs<|assistant|>\nA2<|endoftext|>")
    assert texts[1] == ("[gMASK]<sop><|system|>\nS.<|user|>\nh1<|assistant|>\nr1<|user|>\nh2<|assistant|>\nr2"
                        "<|user|>\nTranslate\nhello<|assistant|>\n你好<|endoftext|>")
    assert texts[2] == "[gMASK]<sop><|user|>\nOnly instruction<|assistant|>\nDone.<|endoftext|>"
    assert [glm.decode(s) for s in spans(ds[1]["labels"])] == ["\nr1<|user|>", "\nr2<|user|>", "\n你好<|endoftext|>"]
    # a bad element in a JSON array names the line
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": oops}\n]')
    with pytest.raises(InputError, match=r"bad.json:3"):
        run_glm(glm4_tokenizer_dir, [bad], tmp_path / "out2")


# ----------------------------------------------------------------------------------------------
# Skips, report, strict, truncation
# ----------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
LONG = {"messages": [{"role": "user", "content": "write"}, {"role": "assistant", "content": "word " * 300}]}
BAD_LINES = {
    "invalid_json": '{"messages": [',
    "wrong_schema": {"messages": [{"role": "user", "text": "no content key"}]},
    "unknown_role": {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
    "nothing_to_supervise": {"messages": [{"role": "user", "content": "x"},
                                          {"role": "assistant", "content": "\u200b  ", "loss": True}]},
}


def test_every_skip_reason_is_reported(tmp_path, glm4_tokenizer_dir, capsys):
    lines = [GOOD, BAD_LINES["invalid_json"], "", BAD_LINES["wrong_schema"], LONG, BAD_LINES["unknown_role"],
             {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss_weight": 0}]},
             BAD_LINES["nothing_to_supervise"], [1, 2], GOOD,
             '{"messages": [{"role": "user", "content": "lone \\ud800"}, {"role": "assistant", "content": "x"}]}',
             '{"messages": [{"role": "user", "content": "pair \\ud83d\\ude00"}, {"role": "assistant", "content": "ok"}]}']
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    rep = run_glm(glm4_tokenizer_dir, [src], tmp_path / "out", "--max_length", "64")
    assert rep["skipped"] == {"invalid_json": 2, "wrong_schema": 2, "unknown_role": 1, "too_long": 1,
                              "nothing_to_supervise": 2}
    assert rep["lines_read"] == 11 == rep["samples_kept"] + rep["skipped_total"] and rep["samples_kept"] == 3
    assert rep["inputs"][0]["blank_lines"] == 1
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["reason"]) for s in skipped] == [
        (2, "invalid_json"), (4, "wrong_schema"), (5, "too_long"), (6, "unknown_role"),
        (7, "nothing_to_supervise"), (8, "nothing_to_supervise"), (9, "wrong_schema"), (11, "invalid_json")]
    assert all(s["file"] == str(src) for s in skipped)
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == rep
    out = capsys.readouterr().out
    assert f"{src}:2: invalid_json" in out and "skipped 8" in out
    data = TokenizedData(tmp_path / "out")
    assert rep["tokens"] == int(data.lengths.sum())
    assert rep["supervised_tokens"] == int((np.asarray(data.labels) != IGNORE_INDEX).sum())
    # nothing usable at all is an error, and nothing is written
    with pytest.raises(InputError, match="no sample left"):
        run_glm(glm4_tokenizer_dir, [write_jsonl(tmp_path / "bad.jsonl", [BAD_LINES["invalid_json"]])],
                tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_strict_makes_bad_lines_fatal(tmp_path, glm4_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, GOOD, BAD_LINES["unknown_role"]])
    with pytest.raises(InputError, match=r"in.jsonl:3: unknown_role"):
        run_glm(glm4_tokenizer_dir, [src], tmp_path / "out", "--strict")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    rep = run_glm(glm4_tokenizer_dir, [write_jsonl(tmp_path / "ok.jsonl", [GOOD, LONG])], tmp_path / "out",
                  "--strict", "--max_length", "64")  # too long is not a bad line
    assert rep["skipped"]["too_long"] == 1


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation(tmp_path, glm4_tokenizer_dir, glm, side):
    src = write_jsonl(tmp_path / "in.jsonl", [LONG, GOOD])
    rep = run_glm(glm4_tokenizer_dir, [src], tmp_path / "out", "--max_length", "64", "--truncate", side)
    assert rep["truncated"] == 1 and rep["samples_kept"] == 2 and rep["length_percentiles"]["max"] == 64
    ids, labels = LMDataset(tmp_path / "out")[0].values()
    assert len(ids) == 64
    text = glm.decode(ids)
    if side == "right":
        assert text.startswith("[gMASK]<sop><|user|>\nwrite<|assistant|>\nword word")
    else:  # the conversation prefix stays, the start of the rest goes
        assert text.startswith("[gMASK]<sop> word word") and text.endswith("word <|endoftext|>")
        assert labels[-1] == glm.eos_token_id


def test_truncation_that_removes_all_supervision_is_a_skip(tmp_path, glm4_tokenizer_dir):
    rec = {"messages": [{"role": "user", "content": "long question " * 100}, {"role": "assistant", "content": "ok"}]}
    rep = run_glm(glm4_tokenizer_dir, [write_jsonl(tmp_path / "in.jsonl", [rec, GOOD])], tmp_path / "out",
                  "--max_length", "32", "--truncate", "right")
    assert rep["skipped"]["nothing_to_supervise"] == 1 and rep["samples_kept"] == 1


# ----------------------------------------------------------------------------------------------
# pre_tokenize.py: every template from one entry, the same bytes as the front ends
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["glm4", "longwriter", "llama3"])
def test_pre_tokenize_equals_the_front_ends(tmp_path, glm4_tokenizer_dir, llama3_tokenizer_dir, template):
    sample = ROOT / "data" / "sample.jsonl"
    src = write_jsonl(tmp_path / "in.jsonl", [MULTI, TOOL, GOOD, LONG, BAD_LINES["invalid_json"]])
    tok_dir = glm4_tokenizer_dir if template == "glm4" else llama3_tokenizer_dir
    common = ["--model_name_or_path", str(tok_dir), "--input", str(sample), f"{src}:4", "--max_length", "2048",
              "--truncate", "right", "--num_proc", "1"]
    if template == "glm4":
        front = pre_tokenize_glm4.main(common + ["--output_dir", str(tmp_path / "front")])
    else:
        front = pre_tokenize_llama3.main(common + ["--output_dir", str(tmp_path / "front"), "--template", template])
    one = pre_tokenize.main(common + ["--output_dir", str(tmp_path / "one"), "--template", template])
    assert one == front and dir_bytes(tmp_path / "one") == dir_bytes(tmp_path / "front")
    meta = TokenizedData(tmp_path / "one").meta
    assert meta["template"] == template and meta["model_family"] == ("glm4" if template == "glm4" else "llama3")


def test_pre_tokenize_template_defaults_from_the_family(tmp_path, glm4_tokenizer_dir, llama3_tokenizer_dir,
                                                        monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, MULTI])
    monkeypatch.chdir(tmp_path)  # the default --output_dir is data/<family>/<template>, relative
    for tok_dir, family, template in ((glm4_tokenizer_dir, "glm4", "glm4"),
                                      (llama3_tokenizer_dir, "llama3", "longwriter")):
        assert families.detect_folder(tok_dir).default_template == template
        pre_tokenize.main(["--model_name_or_path", str(tok_dir), "--input", str(src), "--num_proc", "1"])
        meta = TokenizedData(tmp_path / "data" / family / template).meta
        assert (meta["model_family"], meta["template"]) == (family, template)
    # a tiny model folder (config.json + tokenizer files) is told apart the same way
    from longsft.tiny.models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", "glm4", glm4_tokenizer_dir)
    rep = pre_tokenize.main(["--model_name_or_path", str(model), "--input", str(src), "--num_proc", "1",
                             "--output_dir", str(tmp_path / "m")])
    assert TokenizedData(tmp_path / "m").meta["template"] == "glm4" and rep["samples_kept"] == 2


def test_pre_tokenize_template_errors_list_the_available_ones(tmp_path, glm4_tokenizer_dir, llama3_tokenizer_dir,
                                                              monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])

    def run(tok_dir, *extra):
        return pre_tokenize.main(["--model_name_or_path", str(tok_dir), "--input", str(src), "--output_dir",
                                  str(tmp_path / "out"), "--num_proc", "1", *extra])

    listed = "available: glm4, chatglm3, chatglm2, longwriter, llama3, llama2, auto"
    with pytest.raises(InputError, match=f"--template nope: unknown template 'nope'; {listed}"):
        run(glm4_tokenizer_dir, "--template", "nope")
    only_registered = families.Template("later", None, "a format not written yet", ("</s>",))
    monkeypatch.setitem(families.TEMPLATES, "later", only_registered)
    with pytest.raises(InputError, match=f"--template later: registered .* but not implemented yet; {listed}"):
        run(llama3_tokenizer_dir, "--template", "later")
    monkeypatch.delitem(families.TEMPLATES, "later")
    for name in ("glm4", "chatglm3", "chatglm2", "llama2"):
        with pytest.raises(InputError, match=f"--template {name}: not a template of the llama3 family .*: "
                                             "longwriter, llama3, auto"):
            run(llama3_tokenizer_dir, "--template", name)
    with pytest.raises(InputError, match="cannot tell its model family: .*tokenizer files: none found"):
        run(tmp_path)
    assert not (tmp_path / "out").exists()
    # the CLI: one line on stderr and exit status 2, like every other user mistake
    proc = subprocess.run([sys.executable, str(ROOT / "pre_tokenize.py"), "--model_name_or_path",
                           str(llama3_tokenizer_dir), "--input", str(src), "--template", "chatglm3"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --template chatglm3: not a template of the llama3")
    assert "its templates: longwriter, llama3" in proc.stderr


def test_default_output_dirs():
    g = driver.parse_args(pre_tokenize_glm4.Arguments, ["--model_name_or_path", "m", "--input", "x"])
    l = driver.parse_args(pre_tokenize_llama3.Arguments, ["--model_name_or_path", "m", "--input", "x"])
    assert (g.output_dir, l.output_dir) == ("data/glm4/longwriter", "data/llama3/longwriter")
    assert g.max_length == l.max_length == 32768 and g.truncate == "skip" and l.template == "longwriter"


# ----------------------------------------------------------------------------------------------
# Parallelism and atomicity
# ----------------------------------------------------------------------------------------------

def dir_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["glm4", "llama3", "pre_tokenize:longwriter"])
def test_num_proc_does_not_change_the_output(tmp_path, glm4_tokenizer_dir, llama3_tokenizer_dir, script):
    records = [MULTI, TOOL, GOOD, LONG, BAD_LINES["invalid_json"]] * 60  # several chunks
    src = write_jsonl(tmp_path / "in.jsonl", records)
    outs = []
    for n in (1, 4):
        out = tmp_path / f"out{n}"
        if script == "glm4":
            pre_tokenize_glm4.main(["--model_name_or_path", str(glm4_tokenizer_dir), "--input", str(src),
                                    "--output_dir", str(out), "--num_proc", str(n), "--max_length", "256"])
        elif script == "llama3":
            pre_tokenize_llama3.main(["--model_name_or_path", str(llama3_tokenizer_dir), "--input", str(src),
                                      "--output_dir", str(out), "--num_proc", str(n), "--max_length", "256",
                                      "--template", "llama3"])
        else:  # the one entry, the multi-turn relabelling path, truncation included
            pre_tokenize.main(["--model_name_or_path", str(llama3_tokenizer_dir), "--input", str(src),
                               "--output_dir", str(out), "--num_proc", str(n), "--max_length", "256",
                               "--truncate", "left"])
        outs.append(dir_bytes(out))
    assert outs[0] == outs[1] and len(outs[0]) == 6


def test_interrupted_run_keeps_previous_output(tmp_path, glm4_tokenizer_dir, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD] * 5)
    out = tmp_path / "out"
    run_glm(glm4_tokenizer_dir, [src], out)
    before = dir_bytes(out)
    real_add_batch = storage.TokenizedWriter.add_batch

    def interrupted_add_batch(self, ids, labels, lengths):
        real_add_batch(self, ids, labels, lengths)
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing: after some samples are written

    monkeypatch.setattr(storage.TokenizedWriter, "add_batch", interrupted_add_batch)
    with pytest.raises(KeyboardInterrupt):
        run_glm(glm4_tokenizer_dir, [write_jsonl(tmp_path / "new.jsonl", [GOOD] * 9)], out)
    assert dir_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "new.jsonl", "out"]  # no half-written folder


# ----------------------------------------------------------------------------------------------
# GLM-4's one-call path (encode_batch) against the per-conversation reference (pieces/assemble)
# ----------------------------------------------------------------------------------------------

GLM_FRAGMENTS = ["hello", " world", "世界", "123", "'s", " ", "  ", "\n", "\n\n", "\r\n", "\t", "!", "?\n",
                 "<|", "|>", "<|endof", "tex", "<|begin_of_image|>", "[MASK"]  # no special text when joined
GLM_SPECIAL_TEXT = ["<|user|>", "<|assistant|>", "<|endoftext|>", "[gMASK]", "<sop>", "[MASK]"]


def random_conversations(rng, fragments, n):
    convs = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 5)):
            role = rng.choice(["system", "user", "assistant", "observation"])
            content = "".join(rng.choices(fragments, k=rng.randint(0, 6)))
            metadata = "".join(rng.choices(fragments, k=rng.randint(1, 2))) if rng.random() < 0.3 else ""
            train = role == "assistant" and bool(content.strip()) and rng.random() < 0.8
            messages.append(driver.Message(role, content, metadata, train))
        convs.append(messages)
    return convs


def test_glm4_one_call_batch_equals_per_conversation_encoding(glm4_tokenizer_dir):
    import random

    fmt = glm_templates.GLM4Format(models.load_tokenizer(str(glm4_tokenizer_dir), "glm4"))
    assert fmt.batch_ready
    rng = random.Random(0)
    for trial in range(400):
        dirty = trial % 2 == 1  # odd trials: one content holds special-token text -> the unit is not batched
        convs = random_conversations(rng, GLM_FRAGMENTS, rng.randint(1, 6))
        if dirty:
            m = rng.choice(rng.choice(convs))
            m.content += rng.choice(GLM_SPECIAL_TEXT)
        got = fmt.encode_batch(convs)
        if dirty:
            assert got is None
            continue
        ref = [fmt.encode(messages) for messages in convs]
        ids, supervised, lengths = got
        assert ids.dtype == np.int32 and lengths.tolist() == [len(r[0]) for r in ref]
        assert np.array_equal(ids, np.concatenate([r[0] for r in ref]))
        assert np.array_equal(np.where(supervised, ids, IGNORE_INDEX), np.concatenate([r[1] for r in ref]))


def test_glm4_one_call_path_writes_the_same_dataset(tmp_path, glm4_tokenizer_dir, monkeypatch):
    records = [TOOL, GOOD, LONG, {"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "metadata": "m", "content": ""},
                                                {"role": "assistant", "content": " \n "},
                                                {"role": "assistant", "content": "ok"}]}] * 5
    src = write_jsonl(tmp_path / "in.jsonl", records)
    calls = []
    real = glm_templates.GLM4Format.encode_batch
    monkeypatch.setattr(glm_templates.GLM4Format, "encode_batch",
                        lambda self, convs: calls.append(real(self, convs)) or calls[-1])
    fast = run_glm(glm4_tokenizer_dir, [src], tmp_path / "fast", "--max_length", "64", "--truncate", "left")
    assert calls and all(c is not None for c in calls)  # every unit went through the one-call path
    monkeypatch.setattr(glm_templates.GLM4Format, "encode_batch", lambda self, convs: None)
    slow = run_glm(glm4_tokenizer_dir, [src], tmp_path / "slow", "--max_length", "64", "--truncate", "left")
    assert fast == slow and dir_bytes(tmp_path / "fast") == dir_bytes(tmp_path / "slow")


# ----------------------------------------------------------------------------------------------
# The bundled sample data
# ----------------------------------------------------------------------------------------------

def test_bundled_sample_tokenizes_cleanly(tmp_path, glm4_tokenizer_dir, llama3_tokenizer_dir):
    sample = ROOT / "data" / "sample.jsonl"
    rep = run_glm(glm4_tokenizer_dir, [sample], tmp_path / "g", "--max_length", "100000")
    assert rep["skipped_total"] == 0 and rep["samples_kept"] >= 24
    assert rep["length_percentiles"]["max"] > 2000  # a few long replies
    rep = run_llama(llama3_tokenizer_dir, [sample], tmp_path / "l", "longwriter", "--max_length", "100000")
    assert set(k for k, v in rep["skipped"].items() if v) <= {"unknown_role"}  # the GLM-4 tool-call conversation
