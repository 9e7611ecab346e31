"""pre_tokenize.py --stage dpo (longsft/data/preference.py) and sort_and_group.py on preference pairs
(longsft/data/pair_packing.py): every record format, every template, the skip reasons, the pair-level length
policies, whole pairs in packs; one test on a real chat template (SmolLM2's, marked slow).

Run: python -m pytest -q tests/data/test_preference.py
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import pre_tokenize
from longsft.data import sort_and_group
from longsft.data.inputs import Skip
from longsft.data.pair_packing import cut_pair
from longsft.data.preference import PairFormat, split_record
from longsft.data.storage import IGNORE_INDEX, PackedData, TokenizedData
from longsft.data.sort_and_group import SortAndGroupError
from tests.records import write_jsonl

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "A story, please."}]
RECORDS = [
    {"messages": PROMPT, "chosen": "Once upon a time, a cat sat.", "rejected": "No."},
    {"messages": PROMPT[1:2], "chosen": {"role": "assistant", "content": "Hey there."},
     "rejected": [{"role": "assistant", "content": "Go away."}]},
    {"prompt": "What is 2+2?", "chosen": "Four.", "rejected": "Five."},
    {"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": [{"role": "assistant",
                                                                                 "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "Lyon."}]},
    {"chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}]},
    {"conversations": [{"from": "human", "value": "Name a fruit."}], "chosen": {"from": "gpt", "value": "Apple."},
     "rejected": {"from": "gpt", "value": "Car."}, "system": "Be brief."},
    {"instruction": "Translate to English:", "input": "chat", "chosen": "cat", "rejected": "dog",
     "history": [["Hi", "Hello!"]]},
]
FORMATS = ["messages", "messages", "trl", "trl", "trl_implicit", "sharegpt", "alpaca"]


def pretokenize(tok_dir, records, out, *extra, stage="dpo", name="in.jsonl"):
    path = write_jsonl(out.parent / name, records)
    return pre_tokenize.main(["--model_name_or_path", str(tok_dir), "--input", str(path), "--output_dir", str(out),
                              "--num_proc", "1", "--no_shuffle", "--stage", stage, *map(str, extra)])


def sft_records(record) -> list[dict]:
    """The two SFT conversations a preference record stands for: the prompt (its replies not trained), then each
    completion as the final, trained reply (what the DPO samples must be, token for token)."""
    return split_record(record)[1]


def prompt_length(labels: np.ndarray) -> int:
    return int(np.argmax(labels != IGNORE_INDEX))


# ----------------------------------------------------------------------------------------------
# Records and templates
# ----------------------------------------------------------------------------------------------

def test_every_record_format_splits_into_prompt_and_two_completions():
    for record, fmt in zip(RECORDS, FORMATS):
        got, sides = split_record(record)
        assert got == fmt and len(sides) == 2
        key = "conversations" if fmt == "sharegpt" else "messages"
        a, b = sides[0][key], sides[1][key]
        assert a[:-1] == b[:-1] and a[-1] != b[-1]  # one shared prompt, two final replies
        replies = [t for t in a[:-1] if t.get("role", t.get("from")) in ("assistant", "gpt")]
        assert all(t.get("loss") is False for t in replies)  # the prompt's own replies are never trained
    assert [t.get("loss") for t in split_record(RECORDS[0])[1][0]["messages"]] == [False] * 4 + [None]
    assert split_record(RECORDS[5])[1][0]["system"] == "Be brief."  # other keys (system, tools) kept per side
    with pytest.raises(Skip, match="needs `chosen` and `rejected`"):
        split_record({"prompt": "x", "chosen": "y"})
    with pytest.raises(Skip, match="empty_side") as e:
        split_record({"prompt": "x", "chosen": "y", "rejected": " "})
    assert e.value.reason == "empty_side"
    with pytest.raises(Skip, match="share no prompt"):
        split_record({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]})


# (tokenizer fixture or chat kind, --template)
TEMPLATES = [("glm4_tokenizer_dir", "glm4"), ("chatglm3_tokenizer_dir", "chatglm3"),
             ("chatglm3_tokenizer_dir", "chatglm2"), ("llama2_tokenizer_dir", "llama2"),
             ("llama3_tokenizer_dir", "llama3"), ("llama3_tokenizer_dir", "longwriter"),
             ("qwen2", "auto"), ("glm", "auto"), ("llama3", "auto"), ("qwen3", "auto")]


@pytest.mark.parametrize("tok,template", TEMPLATES, ids=[f"{t}-{k}" for k, t in TEMPLATES])
def test_pairs_are_the_sft_samples_of_their_two_conversations(tmp_path, request, chat_tokenizer_dir, tok, template):
    """Every template: each side is the SFT sample of prompt + that completion (labels on the completion only),
    both share the prompt's tokens, pairs are samples (2p, 2p + 1), and the report counts pairs."""
    tok_dir = request.getfixturevalue(tok) if tok.endswith("_dir") else chat_tokenizer_dir(tok)
    records = RECORDS if template not in ("chatglm2", "llama2") else [  # LongAlign: alternating user/assistant
        r for r in RECORDS if "system" not in json.dumps(r)]
    report = pretokenize(tok_dir, records, tmp_path / "dpo", "--template", template)
    pairs = TokenizedData(tmp_path / "dpo")
    assert pairs.meta["stage"] == "dpo" and report["pairs_kept"] == pairs.num_pairs == len(records)
    assert report["skipped_total"] == 0 and (pairs.pairs == np.arange(2 * len(records)).reshape(-1, 2)).all()
    sft = [side for r in records for side in sft_records(r)]
    pretokenize(tok_dir, sft, tmp_path / "sft", "--template", template, stage="sft", name="sft.jsonl")
    want = TokenizedData(tmp_path / "sft")
    assert len(want) == len(pairs)
    for i in range(len(pairs)):
        (ids, lab), (wids, wlab) = pairs.sample(i), want.sample(i)
        assert np.array_equal(ids, wids) and np.array_equal(lab, wlab)
    for p in range(pairs.num_pairs):
        (ci, cl), (ri, rl) = pairs.sample(2 * p), pairs.sample(2 * p + 1)
        n = prompt_length(cl)
        assert n == prompt_length(rl) > 0 and np.array_equal(ci[:n], ri[:n])  # the shared prompt
        assert (cl[n:] != IGNORE_INDEX).sum() > 0 and not np.array_equal(ci, ri)


def test_skip_reasons_and_strict(tmp_path, llama3_tokenizer_dir, capsys):
    bad = [{"prompt": "Same?", "chosen": "yes", "rejected": "yes"},              # identical_pair
           {"prompt": "Empty?", "chosen": "ok", "rejected": "   "},              # empty_side
           {"prompt": "Bad", "chosen": 3, "rejected": "x"},                      # wrong_schema
           "not json",                                                           # invalid_json
           {"messages": [{"role": "user", "content": "hi"}], "output": "x"},     # wrong_schema (no pair)
           {"messages": [{"role": "wizard", "content": "hi"}], "chosen": "a", "rejected": "b"}]  # unknown_role
    report = pretokenize(llama3_tokenizer_dir, RECORDS[:2] + bad, tmp_path / "out", "--template", "llama3")
    assert report["pairs_kept"] == 2 and report["lines_read"] == 8
    assert report["skipped"] == {**{k: 0 for k in report["skipped"]}, "identical_pair": 1, "empty_side": 1,
                                 "wrong_schema": 2, "invalid_json": 1, "unknown_role": 1}
    lines = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [x["line"] for x in lines] == [3, 4, 5, 6, 7, 8] and "rejected" in lines[1]["detail"]
    assert "rejected: " in lines[5]["detail"] or "chosen: " in lines[5]["detail"]  # a side's SFT reason names it
    assert "preference pairs 2" in capsys.readouterr().out
    with pytest.raises(Exception, match="--strict"):
        pretokenize(llama3_tokenizer_dir, bad[2:], tmp_path / "strict", "--template", "llama3", "--strict")


def test_prompt_that_is_not_a_prefix_is_skipped(llama3_tokenizer_dir):
    """The check behind `prompt_not_prefix` (LongAlign's formats encode a whole conversation in one call, so a
    completion's first characters can merge into the prompt's last token)."""
    fmt = PairFormat(type("F", (), {"name": "x", "prefix_len": 1})())
    lab = lambda n, total: np.array([IGNORE_INDEX] * n + [5] * (total - n), np.int32)  # noqa: E731
    ids = np.arange(10, dtype=np.int32)
    other = ids.copy()
    other[3] = 99
    with pytest.raises(Skip, match="from token 3 on") as e:
        fmt._check_pair([(ids, lab(5, 10)), (other, lab(5, 10))], 100, "skip")
    assert e.value.reason == "prompt_not_prefix"
    with pytest.raises(Skip) as e:
        fmt._check_pair([(ids, lab(5, 10)), (ids[:9], lab(4, 9))], 100, "skip")
    assert e.value.reason == "prompt_not_prefix"
    with pytest.raises(Skip) as e:
        fmt._check_pair([(ids, lab(5, 10)), (ids.copy(), lab(5, 10))], 100, "skip")
    assert e.value.reason == "identical_pair"


def test_max_length_applies_to_the_pair(tmp_path, llama3_tokenizer_dir):
    long = {"prompt": "word " * 30, "chosen": "yes " * 40, "rejected": "no " * 10}
    full = pretokenize(llama3_tokenizer_dir, [long], tmp_path / "full", "--template", "llama3", "--max_length", 4096)
    c, r = TokenizedData(tmp_path / "full").lengths.tolist()
    n = prompt_length(TokenizedData(tmp_path / "full").sample(0)[1])
    limit = c + r - 20
    with pytest.raises(Exception, match="no sample left"):  # --truncate skip (the default): the pair is too_long
        pretokenize(llama3_tokenizer_dir, [long], tmp_path / "skip", "--template", "llama3", "--max_length", limit)
    right = pretokenize(llama3_tokenizer_dir, [long, RECORDS[2]], tmp_path / "right", "--template", "llama3",
                        "--max_length", limit, "--truncate", "right")
    data = TokenizedData(tmp_path / "right")
    assert right["truncated"] == 1 and data.lengths[:2].tolist() == list(cut_pair(c, r, limit))
    assert sum(data.lengths[:2]) <= limit
    left = pretokenize(llama3_tokenizer_dir, [long], tmp_path / "left", "--template", "llama3", "--max_length",
                       limit, "--truncate", "left")
    data = TokenizedData(tmp_path / "left")
    (ci, cl), (ri, rl) = data.sample(0), data.sample(1)
    assert left["truncated"] == 1 and len(ci) + len(ri) <= limit
    assert prompt_length(cl) == prompt_length(rl) == n - 10 and ci[0] == ri[0]  # cut from the shared prompt
    assert full["pairs_kept"] == 1


def test_num_proc_does_not_change_the_pairs(tmp_path, llama3_tokenizer_dir):
    records = [dict(r, prompt=f"{i}: {r['prompt']}") if "prompt" in r and isinstance(r["prompt"], str) else r
               for i in range(40) for r in RECORDS]
    path = write_jsonl(tmp_path / "many.jsonl", records)
    outs = []
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        pre_tokenize.main(["--model_name_or_path", str(llama3_tokenizer_dir), "--input", str(path), "--output_dir",
                           str(out), "--num_proc", str(n), "--stage", "dpo", "--template", "llama3"])
        outs.append({f: (out / f).read_bytes() for f in ("input_ids.bin", "labels.bin", "offsets.bin", "pairs.bin")})
    assert outs[0] == outs[1]


# ----------------------------------------------------------------------------------------------
# sort_and_group.py: whole pairs in packs, the over-length policy per pair
# ----------------------------------------------------------------------------------------------

def test_packs_never_split_a_pair(tmp_path, llama3_tokenizer_dir):
    records = [{"prompt": "q" * (i % 7 + 1), "chosen": "a " * (i % 11 + 1), "rejected": "b " * (i % 5 + 2)}
               for i in range(60)]
    pretokenize(llama3_tokenizer_dir, records, tmp_path / "d", "--template", "llama3")
    data = TokenizedData(tmp_path / "d")
    pair_len = data.lengths[0::2] + data.lengths[1::2]
    limit = 4 * int(pair_len.max()) + 1  # room for a few pairs of every length
    report = sort_and_group.main(["--train_file", str(tmp_path / "d"), "--max_length", str(limit), "--group_size", "3"])
    packs = PackedData(tmp_path / "d")
    samples, offsets = np.asarray(packs.pack_samples), np.asarray(packs.pack_offsets)
    assert sorted(samples.tolist()) == list(range(len(data)))  # every sample once
    assert (np.diff(offsets) % 2 == 0).all() and (samples[0::2] % 2 == 0).all() and \
        (samples[1::2] == samples[0::2] + 1).all()  # (chosen, rejected) side by side in one pack
    assert (packs.pack_reduce(packs.sample_lengths) <= limit).all()
    assert report["pairs"]["packed"] == 60 and report["packs"] <= report["lower_bound"] + 1
    assert packs.meta["stage"] == "dpo" and (packs.sample_lengths == data.lengths).all()


def test_over_length_policy_applies_to_the_pair(tmp_path, llama3_tokenizer_dir):
    records = [{"prompt": "p", "chosen": "a " * 40, "rejected": "b " * 30}] + [
        {"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(5)]
    pretokenize(llama3_tokenizer_dir, records, tmp_path / "d", "--template", "llama3")
    data = TokenizedData(tmp_path / "d")
    c, r = data.lengths[:2].tolist()
    limit = c + r - 15  # only the first pair is over; each of its samples alone fits
    args = ["--train_file", str(tmp_path / "d"), "--max_length", str(limit), "--group_size", "2"]
    with pytest.raises(SortAndGroupError, match=r"1 preference pairs are longer .*pair 0 \(samples 0\+1"):
        sort_and_group.main(args)
    report = sort_and_group.main(args + ["--over_length", "skip"])
    assert report["pairs"]["skipped"] == 1 and report["pairs"]["packed"] == 5
    assert 0 not in np.asarray(PackedData(tmp_path / "d").pack_samples)
    report = sort_and_group.main(args + ["--over_length", "truncate"])
    packs = PackedData(tmp_path / "d")
    assert report["pairs"]["truncated"] == 1 and packs.sample_lengths[:2].tolist() == list(cut_pair(c, r, limit))
    assert packs.sample_lengths[2:].tolist() == data.lengths[2:].tolist()
    assert report["tokens"]["cut"] == c + r - sum(cut_pair(c, r, limit))


# ----------------------------------------------------------------------------------------------
# A real chat template: SmolLM2-135M-Instruct's (ChatML), from the registry package
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_template_pairs_are_apply_chat_template_ids(tmp_path):
    """SmolLM2's real tokenizer and template (longsft.pretrained): each side's ids are apply_chat_template's for
    prompt + completion, and its labels are the completion through <|im_end|>, right after the inference prompt
    (apply_chat_template(prompt, add_generation_prompt=True))."""
    from transformers import AutoTokenizer

    from longsft.data.pretokenize import PretokenizeArguments, run
    from longsft.pretrained import smollm2_dir
    from longsft.templates.registry import chat_format

    model = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model)
    records = [r for r in RECORDS if "conversations" not in r]
    # the driver pre_tokenize.py runs, on the folder's own template (template auto), whatever family it is
    args = PretokenizeArguments(model_name_or_path=str(model), input=[str(write_jsonl(tmp_path / "in.jsonl",
                                                                                        records))],
                                output_dir=str(tmp_path / "out"), num_proc=1, shuffle=False, stage="dpo")
    run(args, PairFormat(chat_format("auto", tok)), "auto", "llama", tok.pad_token_id)
    data = TokenizedData(tmp_path / "out")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for p, record in enumerate(records):
        for side, conv in enumerate(sft_records(record)):
            messages = [{k: v for k, v in m.items() if k != "loss"} for m in conv["messages"]]
            ids, labels = data.sample(2 * p + side)
            want = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
            prompt = tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                             return_dict=False)
            assert ids.tolist() == list(want)
            n = prompt_length(labels)
            assert n == len(prompt) and ids[:n].tolist() == list(prompt)
            sup = labels[n:][labels[n:] != IGNORE_INDEX]
            assert sup[-1] == end and tok.decode(sup[:-1]) == messages[-1]["content"]


def test_json_array_and_counts_give_what_jsonl_gives(tmp_path, llama3_tokenizer_dir):
    (tmp_path / "pairs.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    common = ["--model_name_or_path", str(llama3_tokenizer_dir), "--num_proc", "1", "--no_shuffle", "--stage", "dpo",
              "--template", "llama3"]
    pre_tokenize.main(common + ["--input", str(tmp_path / "pairs.json"), "--output_dir", str(tmp_path / "a")])
    pre_tokenize.main(common + ["--input", str(write_jsonl(tmp_path / "pairs.jsonl", RECORDS)), "--output_dir",
                                str(tmp_path / "b")])
    for f in ("input_ids.bin", "labels.bin", "offsets.bin", "pairs.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    report = pre_tokenize.main(common + ["--input", f"{tmp_path / 'pairs.json'}:3", "--output_dir", str(tmp_path / "c")])
    assert report["lines_read"] == 3 and report["pairs_kept"] == 3 == TokenizedData(tmp_path / "c").num_pairs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama3.1", "qwen2.5", "qwen3", "mistral-v3"])
def test_real_vocabularies_and_templates_render_pairs_as_trl_does(tmp_path, kind):
    """Real vocabularies with their hub chat templates (longsft.vocabularies, from registry packages): each side is
    the inference prompt (apply_chat_template with add_generation_prompt) followed by the completion through its
    end-of-turn token; where the template renders the whole conversation with that prompt as a prefix (TRL's
    assumption), the side is apply_chat_template's ids of prompt + completion and the completion is TRL's (the tokens
    after the prompt; TRL also keeps what a template writes after the turn's end, ChatML's newline). Mistral v3
    drops the system prompt from a conversation that ends with a reply: there the side keeps the inference prompt."""
    from transformers import AutoTokenizer

    from longsft.vocabularies import tokenizer_folder

    folder = tokenizer_folder(kind)
    tok = AutoTokenizer.from_pretrained(folder)
    records = [RECORDS[0], RECORDS[2], RECORDS[3]]  # a multi-turn prompt with a system message; TRL strings; lists
    report = pre_tokenize.main(["--model_name_or_path", str(folder), "--input", str(write_jsonl(tmp_path / "p.jsonl",
                                                                                                  records)),
                                "--output_dir", str(tmp_path / "out"), "--num_proc", "1", "--no_shuffle", "--stage",
                                "dpo", "--template", "auto"])
    data = TokenizedData(tmp_path / "out")
    assert report["pairs_kept"] == len(records) == data.num_pairs
    prefix_kept = 0
    for p, record in enumerate(records):
        for side, conv in enumerate(sft_records(record)):
            messages = [{k: v for k, v in m.items() if k != "loss"} for m in conv["messages"]]
            ids, labels = data.sample(2 * p + side)
            full = list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
            prompt = list(tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                  return_dict=False))
            n = prompt_length(labels)
            assert ids[:n].tolist() == prompt  # the inference prompt, whole
            assert messages[-1]["content"].strip() in tok.decode(labels[n:][labels[n:] != IGNORE_INDEX])
            if full[:len(prompt)] == prompt:
                prefix_kept += 1
                assert ids.tolist() == full[:len(ids)]
                trl_completion = full[len(prompt):]
                assert ids[n:].tolist() == trl_completion[:len(ids) - n]  # TRL's completion, ours to the turn's end
                assert tok.decode(trl_completion[len(ids) - n:]).strip() == ""  # at most whitespace after it
            else:
                assert kind == "mistral-v3" and "system" in json.dumps(record)
    assert prefix_kept >= 4
