"""LongBench-Write's S_l (longsft/evaluate/length.py) on hand-made prediction files scored by evaluate.py
--predictions: exact values from the formula written out here, empty replies, CJK / English mixes, by type and by
length bucket, the scatter PNG; bad prediction and benchmark files are one UserError naming every file:line.

    python -m pytest -q tests/evaluate/test_length.py
"""
import json
import math
import subprocess
import sys

import pytest

from longsft.errors import UserError
from longsft.evaluate import length as L
from longsft.evaluate.records import read_benchmark
import evaluate as evaluate_entry
from tests.records import write_jsonl


def expected_score(x, y):
    """The formula as the issue states it (LongWriter's eval_length.py), y = 0 scoring 0."""
    if y == 0:
        return 0.0
    return 100 * max(0, 1 - (y / x - 1) / 3) if y > x else 100 * max(0, 1 - (x / y - 1) / 2)


@pytest.mark.parametrize("text,words", [
    ("", 0), ("   \n", 0), ("hello world", 2), ("Hello, World! It's 2024.", 4),  # It, s: \b splits the quote
    ("写一篇文章", 5), ("中文 and English", 4), ("中文abc", 2),  # no boundary between 文 and a: abc is not a word
    ("abc123 x_y 3d", 0), ("ＡＢＣ", 0), ("naïve café", 0),  # ï and é are word characters: no boundary inside
    ("\u3007 \u3005 \uf900", 0), ("一\u9fff\u4e00", 3),  # only U+4E00-U+9FFF counts as CJK
])
def test_count_words_is_longwriters(text, words):
    assert L.count_words(text) == words


def test_length_score_formula():
    for x, y, want in [(1000, 1000, 100.0), (1000, 2500, 50.0), (1000, 4000, 0.0), (1000, 9000, 0.0),
                       (1000, 500, 50.0), (1000, 400, 25.0), (1000, 200, 0.0),
                       (1000, 0, 0.0), (300, 301, 100 * (1 - (301 / 300 - 1) / 3))]:
        assert L.length_score(x, y) == pytest.approx(want, abs=1e-12), (x, y)
        assert L.length_score(x, y) == pytest.approx(expected_score(x, y), abs=1e-12)


def test_buckets():
    assert L.bucket_names((500, 2000, 4000)) == ["[0, 500)", "[500, 2000)", "[2000, 4000)", ">= 4000"]
    assert [L.bucket_of(v, (500, 2000, 4000)) for v in (1, 499, 500, 3999, 4000, 30000)] == [
        "[0, 500)", "[0, 500)", "[500, 2000)", "[2000, 4000)", ">= 4000", ">= 4000"]
    for bad in ("", "0,100", "500,200", "500,500", "a"):
        with pytest.raises(ValueError):
            L.parse_buckets(bad)


PREDICTIONS = [  # LongWriter's pred.jsonl fields; response_length deliberately wrong: it must be recounted
    {"prompt": "Write 200 words", "type": "A", "length": 200, "response_length": 999,
     "response": " ".join(["word"] * 150)},
    {"prompt": "写一篇300字的文章", "type": "B", "length": 300, "response_length": 300, "response": "字" * 600},
    {"prompt": "Write 1000 words", "type": "A", "length": 1000, "response_length": 1000, "response": ""},
    {"prompt": "写2500字", "type": "B", "length": 2500, "response_length": 0,
     "response": "中文abc " * 1000 + "end."},  # 2000 CJK + 1 word ("abc" glued to 文 is not one)
    {"prompt": "Write 5000 words", "type": "A", "length": 5000, "response_length": 1,
     "response": "Numbers 1 2 3 only, ..." + " and" * 5999},
    {"prompt": "Write 20000 words", "type": "C", "length": 20000, "response_length": 5,
     "response": "!!! ??? 123"},  # no words at all: scores 0, like an empty reply
]


def test_scores_of_a_handmade_prediction_file(tmp_path):
    pred = write_jsonl(tmp_path / "pred.jsonl", PREDICTIONS)
    scores = evaluate_entry.main(["--predictions", str(pred), "--output_dir", str(tmp_path / "out")])
    produced = [150, 600, 0, 2001, 6001, 0]
    per = [expected_score(p["length"], y) for p, y in zip(PREDICTIONS, produced)]
    assert per[0] == pytest.approx(100 * (1 - (200 / 150 - 1) / 2)) and per[1] == pytest.approx(100 * (1 - 1 / 3))
    assert scores["S_l"] == pytest.approx(sum(per) / len(per), abs=1e-12)
    assert scores["count"] == 6 and scores["empty_responses"] == 2
    by_type = {t: [s for p, s in zip(PREDICTIONS, per) if p["type"] == t] for t in "ABC"}
    assert scores["by_type"] == {t: {"S_l": pytest.approx(sum(v) / len(v), abs=1e-12), "count": len(v)}
                                 for t, v in by_type.items()}
    buckets = {"[0, 500)": per[:2], "[500, 2000)": per[2:3], "[2000, 4000)": per[3:4], ">= 4000": per[4:]}
    assert scores["by_length"] == {k: {"S_l": pytest.approx(sum(v) / len(v), abs=1e-12), "count": len(v)}
                                   for k, v in buckets.items()}
    on_disk = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert on_disk["S_l"] == scores["S_l"] and "S_q" not in on_disk
    png = (tmp_path / "out" / "length_scatter.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_custom_buckets_and_the_ruler_lengths(tmp_path):
    """LongWrite-Ruler's required lengths (1k..30k) with buckets at each of them."""
    preds = [{"prompt": f"p{i}", "type": "t", "length": n, "response": "x " * (n // 3)}
             for i, n in enumerate([1000, 2000, 5000, 10000, 20000, 30000])]
    pred = write_jsonl(tmp_path / "pred.jsonl", preds)
    scores = evaluate_entry.main(["--predictions", str(pred), "--output_dir", str(tmp_path / "o"),
                                  "--length_buckets", "2000,5000,10000,20000,30000"])
    assert list(scores["by_length"]) == ["[0, 2000)", "[2000, 5000)", "[5000, 10000)", "[10000, 20000)",
                                         "[20000, 30000)", ">= 30000"]
    assert all(v["S_l"] == pytest.approx(0.0) for v in scores["by_length"].values())  # a third of the length: 0
    assert scores["S_l"] == 0.0 and math.isfinite(scores["S_l"])


def test_bad_files_are_one_error_naming_each_line(tmp_path):
    pred = write_jsonl(tmp_path / "pred.jsonl", [
        {"prompt": "ok", "type": "a", "length": 10, "response": "fine"}, "{not json",
        {"prompt": "p", "type": "a", "length": 0, "response": "r"},
        {"prompt": "p", "length": "500", "response": "r"}, {"prompt": "p", "type": "a", "length": 5}, "[1, 2]"])
    with pytest.raises(UserError) as e:
        evaluate_entry.main(["--predictions", str(pred), "--output_dir", str(tmp_path / "o")])
    msg = str(e.value)
    for where in (":2: not a JSON line", ":3: `length` must be a positive number", ":4: `length` must be",
                  ":5: `response` must be a string", ":6: expected a JSON object"):
        assert f"{pred}{where}" in msg, msg
    assert ":1:" not in msg

    data = write_jsonl(tmp_path / "lbw.jsonl", [{"prompt": "Write", "type": "x", "length": 100},
                                                 {"prompt": 3, "type": "x", "length": 100}, {"type": "x"}])
    with pytest.raises(UserError, match=r"lbw.jsonl:2: `prompt` must be a string.*\n.*lbw.jsonl:3: `prompt` must"):
        read_benchmark(data)
    assert read_benchmark(write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "length": 3}]))[0]["type"] == ""


def test_command_line_errors_exit_2(tmp_path):
    """The entry's user errors: one `error:` paragraph naming every problem, exit status 2."""
    proc = subprocess.run([sys.executable, "evaluate.py", "--output_dir", str(tmp_path / "o"), "--data", "x.jsonl",
                           "--test_file", "y.jsonl", "--batch_size", "0", "--judge_model", "gpt"],
                          cwd=evaluate_entry.__file__.rsplit("/", 1)[0], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    for text in ("give one of --data", "--data needs --model_dir", "--batch_size 0: must be at least 1",
                 "both --judge_base_url and --judge_model"):
        assert text in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
