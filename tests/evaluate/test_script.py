"""scripts/eval_longbench_write.sh: the command it builds (DRY_RUN), a missing benchmark file named with where to get
it (exit 2), and a real run on a tiny model through the script; the quickstart's closing evaluation command (the
README gives it) on a tiny trained folder.

    python -m pytest -q tests/evaluate/test_script.py
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

from longsft.tiny.models import make_tiny_model
from tests.records import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "eval_longbench_write.sh"


def run(env, *args):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LONGSFT_NO_PROGRESS": "1", **env})


def test_dry_run_and_a_missing_benchmark_file(tmp_path):
    proc = run({"DRY_RUN": "1", "MODEL": "out/m", "DATA": "lbw.jsonl", "JUDGE_BASE_URL": "http://127.0.0.1:9/v1"},
               "--max_samples", "3")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    for part in ("evaluate.py --model_dir out/m --data lbw.jsonl --backend hf --max_new_tokens 32768 --temperature "
                 "0.5 --top_p 0.8 --top_k 50 --seed 42", "--output_dir eval/m/lbw",
                 "--judge_base_url http://127.0.0.1:9/v1 --judge_model gpt-4o-2024-05-13 --judge_api_key_env "
                 "OPENAI_API_KEY", "--max_samples 3"):
        assert part in line, line
    scored = run({"DRY_RUN": "1", "PREDICTIONS": "pred.jsonl"})
    assert "evaluate.py --predictions pred.jsonl --output_dir" in scored.stdout and "--model_dir" not in scored.stdout
    missing = run({"DATA": str(tmp_path / "nope.jsonl")})
    assert missing.returncode == 2 and "Download LongWriter's evaluation/longbench_write.jsonl" in missing.stderr


@pytest.mark.slow
def test_a_tiny_run_through_the_script(tmp_path):
    model = make_tiny_model(tmp_path / "qwen2", "qwen2")
    data = write_jsonl(tmp_path / "lbw.jsonl", [{"prompt": "Write 300 words about tea.", "type": "a", "length": 300},
                                                {"prompt": "写一篇800字的文章", "type": "b", "length": 800},
                                                {"prompt": "Write 5000 words.", "type": "a", "length": 5000}])
    out = tmp_path / "eval"
    proc = run({"MODEL": str(model), "DATA": str(data), "OUTPUT": str(out), "MAX_NEW_TOKENS": "6",
                "TEMPERATURE": "0", "BATCH_SIZE": "2"}, "--max_samples", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["count"] == 2 and scores["settings"]["max_samples"] == 2
    assert "S_l (length score, 0-100)" in proc.stdout and (out / "length_scatter.png").is_file()


@pytest.mark.slow
def test_quickstart_closing_evaluation(tmp_path):
    """The command the quickstart ends with (README: evaluate a trained model), on a tiny trained output folder."""
    import main as train_main
    import pre_tokenize
    import sort_and_group

    model = make_tiny_model(tmp_path / "qwen2", "qwen2")
    sample = ROOT / "data" / "sample.jsonl"
    pre_tokenize.main(["--model_name_or_path", str(model), "--input", str(sample), "--output_dir",
                       str(tmp_path / "tok"), "--max_length", "1024", "--num_proc", "1"])
    sort_and_group.main(["--train_file", str(tmp_path / "tok"), "--max_length", "1024", "--group_size", "1"])
    train_main.main(["--model_name_or_path", str(model), "--train_file", str(tmp_path / "tok"), "--output_dir",
                     str(tmp_path / "run"), "--batch_method", "pack", "--max_steps", "2", "--save_strategy", "no",
                     "--report_to", "none", "--disable_tqdm", "true"])
    cmd = ["python", "evaluate.py", "--model_dir", str(tmp_path / "run"), "--test_file", str(sample),
           "--output_dir", str(tmp_path / "eval"), "--max_samples", "4", "--max_new_tokens", "32", "--temperature",
           "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LONGSFT_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert scores["count"] == 4 and "rouge-l" in scores and scores["eval_targets"] > 0
    assert "rouge-1" in proc.stdout and "eval_loss" in proc.stdout
