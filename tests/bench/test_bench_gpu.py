"""bench/bench_gpu.py and scripts/gpu_check.sh at tiny sizes on CPU, so the GPU run is known to work before a GPU
is lent: every part runs, the methods see the same samples, and the markdown report holds the tables and goals.

    python -m pytest -q tests/bench/test_bench_gpu.py                 # ~15 s on 2 CPU cores
    python -m pytest -q tests/bench/test_bench_gpu.py -m "not slow"   # without the end-to-end gpu_check.sh run
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench import bench_gpu

ROOT = Path(__file__).resolve().parents[2]

TABLE_HEADER = bench_gpu.TABLE[0]


def _table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown table rows whose first cell is `first_cell`."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|")]
    return [r for r in rows if r[0] == first_cell]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu") / "RESULTS.md"
    figures = bench_gpu.main(["--tiny", "--profile", "--out", str(out)])
    return figures, out


def test_tiny_run_same_samples_every_method(tiny_run):
    figures, _ = tiny_run
    data, res = figures["data"], figures["llama"]["results"]
    assert list(res) == ["naive", "sort", "pack"]
    for m, r in res.items():
        assert "error" not in r, (m, r)
        assert r["steps"] == r["of_steps"] > 0  # the whole epoch was timed
        assert r["tokens"] == data["tokens"] and r["targets"] == data["targets"], m  # the same samples
        assert r["tokens_per_s"] > 0 and r["flops_per_s"] > 0 and r["peak_bytes"] > 0
        assert 5 < r["mean_loss"] < 8, m  # random weights: about ln(vocab 512) = 6.2 per target
    assert res["naive"]["slots"] == data["tokens"]  # batch 1: no padding
    assert res["sort"]["slots"] > data["tokens"]  # padded to the longest of each micro-batch
    assert res["pack"]["slots"] == data["tokens"] and res["pack"]["steps"] == data["packs"]
    assert figures["glm4"]["results"]["pack"]["targets"] == data["targets"]
    assert figures["llama"]["shape"]["checkpointed"] == figures["llama"]["shape"]["layers"] == 2
    assert any("packed attention backend: sdpa" in m for m in figures["llama"]["attention"])
    chunked, unchunked = figures["loss_memory"]
    assert abs(chunked["loss"] - unchunked["loss"]) < 1e-4 * unchunked["loss"]  # the same loss, two ways
    profile = figures["llama"]["profile"]
    assert "error" not in profile and profile["top"] and profile["busy_s"] > 0


def test_tiny_run_markdown_report(tiny_run, capsys):
    figures, out = tiny_run
    md = out.read_text()
    assert md.count(TABLE_HEADER) == 2  # Llama and GLM-4 tables
    rows = {r[1]: r for r in _table_rows(md, "llama")}
    assert list(rows) == ["naive", "sort", "pack"]
    for method, cells in rows.items():
        assert len(cells) == 12, cells
        assert float(cells[5].replace(",", "")) > 0  # supervised tok/s
        assert cells[11].endswith("%")  # MFU
    assert rows["naive"][6] == "1.00x" and rows["pack"][8] == "0.0%"  # vs naive; pack has no padding
    assert len(_table_rows(md, "glm4")) == 1
    for text in ("## Goals", "pack >= 2.5x naive supervised tokens/s", "MFU of pack >= 45%", "Attention that ran",
                 "## Loss memory", "chunked (256 tokens a chunk)", "unchunked (upstream)", "## Profile",
                 "| top CPU ops |", "MFU reference: 256x256x256 float32 matmul", "(--tiny: a smoke run"):
        assert text in md, text
    assert json.loads(out.with_suffix(".json").read_text())["data"]["tokens"] == figures["data"]["tokens"]


def test_rejects_unknown_method():
    with pytest.raises(SystemExit, match="a comma list of naive, sort, pack"):
        bench_gpu.main(["--tiny", "--methods", "naive,packed"])


@pytest.mark.slow
def test_gpu_check_script_tiny(tmp_path):
    """scripts/gpu_check.sh end to end at tiny sizes: pytest -m gpu (skipped without CUDA), then the benchmark,
    the report written to GPU_CHECK_OUT and printed again at the end with one status line per part."""
    env = {**os.environ, "GPU_CHECK_TINY": "1", "GPU_CHECK_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pytest -m gpu: passed" in proc.stdout and "bench_gpu.py: done" in proc.stdout
    md = (tmp_path / "RESULTS.md").read_text()
    assert len(_table_rows(md, "llama")) == 3 and "## Goals" in md
    assert proc.stdout.rstrip().splitlines()[-5].startswith("=====")  # the report is printed again before the status
    for name in ("RESULTS.json", "pytest.log", "bench.log"):
        assert (tmp_path / name).is_file(), name
