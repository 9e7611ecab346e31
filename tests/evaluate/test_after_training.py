"""main.py --test_file (longsft/evaluate/after_training.py): GLM-Edge's predict_with_generate at the end of training.
The test file is checked before anything loads; after the run, OUTPUT_DIR/test_eval holds the saved model's replies,
ROUGE/BLEU and eval loss, and the output folder's completion record lists test_eval as the run's own; a 2-process
torchrun run (gloo) leaves its process group and rank 0 evaluates.

    python -m pytest -q tests/evaluate/test_after_training.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import main as train_main
import pre_tokenize
import sort_and_group
from longsft.evaluate.records import read_test_set
from longsft.tiny.models import make_tiny_model
from tests.records import write_jsonl
from tests.launch import failure_text, free_port

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample.jsonl"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    work = tmp_path_factory.mktemp("after_training")
    model = make_tiny_model(work / "qwen2", "qwen2")
    data = work / "tok"
    pre_tokenize.main(["--model_name_or_path", str(model), "--input", str(SAMPLE), "--output_dir", str(data),
                       "--max_length", "1024", "--num_proc", "1"])
    sort_and_group.main(["--train_file", str(data), "--max_length", "1024", "--group_size", "1"])
    return model, data


def train_argv(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--train_file", str(data), "--output_dir", str(out),
            "--batch_method", "pack", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", *map(str, extra)]


def test_a_bad_test_file_stops_main_before_it_loads(tmp_path, prepared):
    model, data = prepared
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "no reply"}]}, "{x"])
    for test_file, message in ((tmp_path / "missing.jsonl", "no such file"),
                               (bad, "no usable record (2 skipped: invalid_json, no_reference)")):
        with pytest.raises(SystemExit) as e:
            train_main.parse_args(train_argv(model, data, tmp_path / "o", "--test_file", test_file),
                                  check_start=True)
        assert message in str(e.value) and "main.py cannot start" in str(e.value)


@pytest.mark.slow
def test_main_evaluates_the_saved_model_on_the_test_file(tmp_path, prepared):
    model, data = prepared
    out = tmp_path / "run"
    train_main.main(train_argv(model, data, out, "--test_file", SAMPLE, "--test_max_new_tokens", 6))
    scores = json.loads((out / "test_eval" / "scores.json").read_text())
    cases, skipped = read_test_set(SAMPLE)
    assert scores["count"] == len(cases) and set(scores) >= {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "eval_loss"}
    assert scores["settings"]["max_new_tokens"] == 6 and scores["settings"]["temperature"] == 0
    preds = [json.loads(x) for x in (out / "test_eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(cases) and all(p["new_tokens"] <= 6 for p in preds)
    assert len((out / "test_eval" / "skipped.jsonl").read_text().splitlines()) == len(skipped)
    marker = json.loads((out / "save_complete.json").read_text())
    assert "test_eval" in marker["outputs"]


@pytest.mark.slow
def test_two_processes_leave_the_group_and_rank0_evaluates(tmp_path, prepared):
    model, data = prepared
    out = tmp_path / "run2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "main.py",
                           *train_argv(model, data, out, "--test_file", SAMPLE, "--test_max_new_tokens", 4)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + failure_text(proc.stderr)
    scores = json.loads((out / "test_eval" / "scores.json").read_text())
    assert scores["count"] == len(read_test_set(SAMPLE)[0]) and scores["eval_targets"] > 0
    assert proc.stdout.count("[evaluate]") == 1  # one rank evaluated
