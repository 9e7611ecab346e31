"""Records that try to crash or hang pre_tokenize.py: deeply nested JSON (in the record itself, in a JSON array,
inside a `tools` string and a ShareGPT `function_call` value). Each one must end up in skipped.jsonl as
invalid_json with its line, for any --num_proc, and the run must finish (no segfault, no hang).

The runs are real pre_tokenize.py processes (a segfault or a hang must not take pytest with it).
Run: python -m pytest -q tests/data/test_hostile_inputs.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from longsft.data import inputs
from longsft.data.inputs import MAX_JSON_DEPTH, Skip, json_depth_problem, load_json
from tests.records import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"messages": [{"role": "user", "content": "hi [[[{{{"}, {"role": "assistant", "content": "hello ]]]}}}"}]}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def pre_tokenize(tok_dir, src: Path, out: Path, num_proc: int, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "pre_tokenize.py"), "--model_name_or_path", str(tok_dir), "--input", str(src),
           "--output_dir", str(out), "--num_proc", str(num_proc), "--no_shuffle", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def skipped(out: Path) -> list[tuple[int, str, str]]:
    return [(s["line"], s["reason"], s["detail"]) for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())]


def test_depth_check_reads_strings_as_text():
    assert json_depth_problem(b'{"a": "' + b"[" * 5000 + b'"}') is None  # brackets inside a string are text
    assert json_depth_problem(b'{"a": "\\"' + b"[" * 5000 + b'"}') is None  # after an escaped quote too
    # an escaped backslash ends right before the string's closing quote: what follows is structure again
    assert "nested 102 levels" in json_depth_problem(b'{"a": "x\\\\", "b": ' + nested(101).encode() + b"}")
    assert json_depth_problem(nested(MAX_JSON_DEPTH)) is None
    problem = json_depth_problem(nested(MAX_JSON_DEPTH + 1).encode())
    assert f"nested {MAX_JSON_DEPTH + 1} levels deep" in problem
    assert load_json(nested(3)) == [[[]]]
    with pytest.raises(Skip) as e:
        load_json(nested(200_000), "tools")
    assert e.value.reason == "invalid_json" and e.value.detail.startswith("tools: nested 200,000 levels deep")
    with pytest.raises(ValueError):  # not JSON at all: the caller's own message
        load_json("{oops")
    assert inputs.MAX_JSON_DEPTH >= 64  # far above any real record (tool schemas nest ~10 levels)


@pytest.mark.slow
@pytest.mark.parametrize("num_proc", [1, 2])
def test_deeply_nested_records_are_invalid_json(tmp_path, glm4_tokenizer_dir, num_proc):
    lines = [GOOD, '{"messages": ' + nested(1_000) + "}", GOOD, '{"messages": ' + nested(200_000) + "}",
             '{"messages": [' + '{"a": ' * 150_000 + "1" + "}" * 150_000 + "]}", GOOD]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    proc = pre_tokenize(glm4_tokenizer_dir, src, tmp_path / "out", num_proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(line, reason) for line, reason, _ in skipped(tmp_path / "out")] == [
        (2, "invalid_json"), (4, "invalid_json"), (5, "invalid_json")]
    assert "nested 200,001 levels deep" in skipped(tmp_path / "out")[1][2]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["samples_kept"] == 3 and report["skipped"]["invalid_json"] == 3

    # the same records as the elements of a JSON array
    arr = tmp_path / "in.json"
    arr.write_text("[\n" + ",\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n]\n")
    proc = pre_tokenize(glm4_tokenizer_dir, arr, tmp_path / "out_array", num_proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(line, reason) for line, reason, _ in skipped(tmp_path / "out_array")] == [
        (3, "invalid_json"), (5, "invalid_json"), (6, "invalid_json")]


@pytest.mark.slow
def test_deep_tools_string_and_function_call_are_invalid_json(tmp_path, chat_tokenizer_dir):
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    glaive = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                               "arguments": {"city": "Paris"}})},
                                {"from": "observation", "value": '{"temp": 21}'},
                                {"from": "gpt", "value": "It is 21 degrees."}],
              "tools": json.dumps([weather])}
    deep_tools = {**glaive, "tools": nested(200_000)}
    deep_call = json.loads(json.dumps(glaive))
    deep_call["conversations"][1]["value"] = '{"name": "get_weather", "arguments": ' + nested(50_000) + "}"
    deep_args = json.loads(json.dumps(glaive))
    deep_args["conversations"][1]["value"] = json.dumps({"name": "get_weather", "arguments": nested(5_000)})
    src = write_jsonl(tmp_path / "tools.jsonl", [glaive, deep_tools, deep_call, deep_args, glaive])
    proc = pre_tokenize(chat_tokenizer_dir("qwen2"), src, tmp_path / "out", 2, "--template", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = skipped(tmp_path / "out")
    assert [(line, reason) for line, reason, _ in found] == [(2, "invalid_json"), (3, "invalid_json"),
                                                            (4, "invalid_json")], found
    assert found[0][2].startswith("tools: nested 200,000 levels deep")
    assert found[1][2].startswith("message 1: nested 50,001 levels deep")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["samples_kept"] == 2
