"""The input side of pre-tokenization (longsft/data/inputs.py through pre_tokenize.py's front ends): files mixed with
counts and a seed, every input mistake named before any work, a BOM, JSON arrays indexed like JSONL without holding
their records.

    python -m pytest -q tests/data/test_inputs.py
"""
import json

import numpy as np
import pytest

import pre_tokenize_glm4
import pre_tokenize_llama3
from longsft.data.inputs import InputError
from longsft.data.storage import IGNORE_INDEX, TokenizedData
from longsft.train.batches import LMDataset
from tests.data.test_pretokenize import BAD_LINES, GOOD, LONG, MULTI, TOOL, dir_bytes, run_glm
from tests.records import write_jsonl

# ----------------------------------------------------------------------------------------------
# Inputs, mixing, errors before work starts
# ----------------------------------------------------------------------------------------------

def make_numbered(path, n):
    return write_jsonl(path, [{"messages": [{"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": f"{path.stem} answer {i}"}]}
                              for i in range(n)])


def test_mixing_with_counts_and_seed(tmp_path, glm4_tokenizer_dir, glm):
    a, b = make_numbered(tmp_path / "a.jsonl", 10), make_numbered(tmp_path / "b.jsonl", 30)

    def answers(out, *extra):
        pre_tokenize_glm4.main(["--model_name_or_path", str(glm4_tokenizer_dir), "--input", str(a), f"{b}:5",
                                "--output_dir", str(out), "--num_proc", "1", *extra])
        ds = LMDataset(out)
        return [glm.decode(ds[i]["labels"][ds[i]["labels"] != IGNORE_INDEX]) for i in range(len(ds))]

    first, same, other = answers(tmp_path / "o1"), answers(tmp_path / "o2"), answers(tmp_path / "o3", "--seed", "7")
    assert first == same and first != other and len(first) == 15
    assert sum("a answer" in x for x in first) == 10 and sum("b answer" in x for x in first) == 5
    assert sorted(first) != first or True  # shuffled order is deterministic (checked by first == same)
    meta = TokenizedData(tmp_path / "o1").meta
    assert meta["inputs"] == [str(a), f"{b}:5"] and meta["seed"] == 42
    rep = json.loads((tmp_path / "o1" / "report.json").read_text())
    assert [(f["records"], f["selected"]) for f in rep["inputs"]] == [(10, 10), (30, 5)]


def test_problems_are_reported_together_before_any_work(tmp_path, glm4_tokenizer_dir, llama3_tokenizer_dir):
    a = make_numbered(tmp_path / "a.jsonl", 3)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError) as e:
        pre_tokenize_glm4.main(["--model_name_or_path", str(glm4_tokenizer_dir), "--input", str(tmp_path / "nope.jsonl"),
                                str(tmp_path / "empty.jsonl"), f"{a}:9", "--output_dir", str(tmp_path / "out")])
    msg = str(e.value)
    assert "nope.jsonl: no such file" in msg and "empty.jsonl: no records" in msg and "asks for 9" in msg
    assert not (tmp_path / "out").exists()
    # a tokenizer without the needed special tokens
    with pytest.raises(InputError, match=r"no special token '<\|begin_of_text\|>'"):
        pre_tokenize_llama3.main(["--model_name_or_path", str(glm4_tokenizer_dir), "--trust_remote_code",
                                  "--input", str(a), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(InputError, match="no tokenizer.model"):
        pre_tokenize_glm4.main(["--model_name_or_path", str(llama3_tokenizer_dir), "--input", str(a),
                                "--output_dir", str(tmp_path / "out")])
    # never replace a folder that is not a dataset
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing to replace"):
        run_glm(glm4_tokenizer_dir, [a], keep)
    assert (keep / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------
# Inputs: mistakes named, a BOM, JSON arrays indexed like JSONL
# ----------------------------------------------------------------------------------------------

def test_input_mistakes_are_named(tmp_path, glm4_tokenizer_dir):
    a = make_numbered(tmp_path / "a.jsonl", 3)
    (tmp_path / "folder").mkdir()
    (tmp_path / "link.jsonl").symlink_to(a)
    with pytest.raises(InputError) as e:
        run_glm(glm4_tokenizer_dir, [tmp_path / "folder", f"{a}:abc", a, tmp_path / "link.jsonl"], tmp_path / "out")
    msg = str(e.value)
    assert f"--input {tmp_path / 'folder'}: is a folder, not a file; pass the JSONL / JSON files in it" in msg
    assert f"--input {a}:abc: 'abc' after ':' is not a record count. FILE:COUNT takes a random COUNT" in msg
    assert "no such file" not in msg
    assert f"--input {a} {tmp_path / 'link.jsonl'}: the same file 2 times" in msg and f"{a}:3 {a}:3" in msg
    assert not (tmp_path / "out").exists()
    rep = run_glm(glm4_tokenizer_dir, [f"{a}:3", f"{tmp_path / 'link.jsonl'}:2"], tmp_path / "out")  # on purpose
    assert rep["samples_kept"] == 5 and [f["selected"] for f in rep["inputs"]] == [3, 2]


def test_a_bom_does_not_drop_the_first_jsonl_record(tmp_path, glm4_tokenizer_dir):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "x.jsonl", [GOOD, BAD_LINES["wrong_schema"], GOOD])
                    .read_bytes())
    rep = run_glm(glm4_tokenizer_dir, [src], tmp_path / "out")
    assert rep["samples_kept"] == 2 and rep["skipped"]["wrong_schema"] == 1 and rep["skipped"]["invalid_json"] == 0
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [s["line"] for s in skipped] == [2]
    assert dir_bytes(tmp_path / "out")["input_ids.bin"] == (run_glm(glm4_tokenizer_dir, [tmp_path / "x.jsonl"],
                                                                     tmp_path / "plain") and
                                                             dir_bytes(tmp_path / "plain")["input_ids.bin"])


def json_array_text(records):
    """A pretty-printed JSON array (elements over several lines) and the line each element starts on."""
    text, lines = "[\n", []
    for k, r in enumerate(records):
        lines.append(text.count("\n") + 1)
        text += (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False, indent=2)) + (
            ",\n" if k + 1 < len(records) else "\n")
    return text + "]\n", lines


def test_json_array_gives_what_jsonl_gives(tmp_path, glm4_tokenizer_dir):
    """Same records as JSONL and as a JSON array: the same samples and skips; the array's skips name the line each
    element starts on; any process count gives the same bytes."""
    lone = '{"messages": [{"role": "user", "content": "lone \\ud800"}, {"role": "assistant", "content": "x"}]}'
    records = [MULTI, GOOD, BAD_LINES["wrong_schema"], lone, [1, 2], 12345, LONG, TOOL] * 40
    text, lines = json_array_text(records)
    arr = tmp_path / "in.json"
    arr.write_text(text, encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "in.jsonl", records)
    runs = {}
    for name, src, n in (("jsonl", jsonl, 1), ("json", arr, 1), ("json2", arr, 2)):
        rep = run_glm(glm4_tokenizer_dir, [src], tmp_path / name, "--max_length", "128", "--num_proc", str(n))
        runs[name] = (rep, dir_bytes(tmp_path / name))
    for name in ("json", "jsonl", "json2"):
        assert runs[name][0]["skipped"] == {"invalid_json": 40, "wrong_schema": 120, "unknown_role": 0,
                                            "too_long": 80, "nothing_to_supervise": 0}
    for f in ("input_ids.bin", "labels.bin", "offsets.bin"):
        assert runs["json"][1][f] == runs["jsonl"][1][f] == runs["json2"][1][f]
    assert runs["json"][1] == runs["json2"][1]
    skipped = [json.loads(x) for x in runs["json"][1]["skipped.jsonl"].decode().splitlines()]
    by_line = [json.loads(x) for x in runs["jsonl"][1]["skipped.jsonl"].decode().splitlines()]
    assert [(s["reason"], s["detail"]) for s in skipped] == [(s["reason"], s["detail"]) for s in by_line]
    assert [s["line"] for s in skipped] == [lines[s["line"] - 1] for s in by_line]


def test_json_array_index_holds_no_records(tmp_path, monkeypatch):
    """Indexing a JSON array keeps byte spans only: its peak memory is a fraction of the file, not a multiple."""
    import tracemalloc

    from longsft.data import inputs

    rec = {"messages": [{"role": "user", "content": "question " * 20},
                        {"role": "assistant", "content": "答案 answer " * 40}]}
    arr = tmp_path / "big.json"
    arr.write_text("[\n" + ",\n".join([json.dumps(rec, ensure_ascii=False)] * 12000) + "\n]\n", encoding="utf-8")
    size = arr.stat().st_size
    monkeypatch.setattr(inputs, "JSON_WINDOW_BYTES", 1 << 18, raising=False)  # 256 KB windows, a 10 MB file
    tracemalloc.start()
    try:
        problems = []
        (src,) = inputs.index_inputs([str(arr)], problems)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert problems == [] and src.num_records == 12000 and src.kind == "json"
    assert peak < size / 3, (peak, size)
    first = arr.read_bytes()[src.starts[0]:src.ends[0]]
    assert json.loads(first) == rec and src.lines[:3].tolist() == [2, 3, 4]


@pytest.mark.parametrize("num_proc", [1, 2, 8])
def test_work_units_cover_the_plan_in_order_and_the_tail_is_finer(tmp_path, num_proc):
    from longsft.data.inputs import CHUNK_RECORDS, index_inputs, iter_chunks, plan_order

    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": f"q{i}", "output": "a" * (i % 50)} for i in range(6000)])
    problems = []
    sources = index_inputs([str(src)], problems)
    plan = plan_order(sources, 42, True)
    units = list(iter_chunks(sources, plan, num_proc))
    assert not problems and np.array_equal(np.concatenate(units), plan)  # every record once, in plan order
    sizes = [len(u) for u in units]
    assert max(sizes) == CHUNK_RECORDS and sizes[-2] <= CHUNK_RECORDS // 4  # the last units are cut finer
    tail = sum(s for s in sizes if s <= CHUNK_RECORDS // 4 and s != sizes[-1]) + sizes[-1]
    assert tail <= 2 * num_proc * CHUNK_RECORDS + CHUNK_RECORDS  # about two whole units' worth per process
