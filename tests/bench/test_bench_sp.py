"""bench/bench_sp.py at tiny sizes: real torchrun launches of SP 1 and 2 (gloo, DeepSpeed's Ulysses wrapper), one
row per size, the same loss and gradient norm, SP 2's shard half the (odd, padded) pack, and user errors at once.

    python -m pytest -q tests/bench/test_bench_sp.py    # ~1 min on 2 busy CPU cores (two launches)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bench_sp
from longsft.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_run_rows_and_equal_losses(tmp_path):
    report = bench_sp.main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_sp.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    rows = {r["size"]: r for r in saved["rows"]}
    assert list(rows) == [1, 2] and not saved["failed"], [r.get("error") for r in saved["rows"]]
    one, two = rows[1], rows[2]
    tokens = bench_sp.TINY["tokens"]
    assert sum(saved["sample_lengths"]) == tokens and len(saved["sample_lengths"]) == bench_sp.TINY["samples"]
    assert one["tokens_per_rank"] == tokens and two["tokens_per_rank"] == (tokens + 1) // 2  # padded to even
    assert saved["losses_agree"] and abs(one["loss"] - two["loss"]) <= 1e-5 * one["loss"]
    assert abs(one["grad_norm"] - two["grad_norm"]) <= 1e-4 * one["grad_norm"]
    assert 5 < one["loss"] < 9  # random weights: about ln(vocab) per target
    assert one["targets"] == two["targets"] > 0  # the same normaliser D on both sizes
    for r in (one, two):
        assert len(r["per_rank"]) == r["ranks"] == r["size"]
        assert r["activation_mib"] > 0 and r["peak_rss_mib"] > r["activation_mib"] and r["step_seconds"] > 0
        assert [p["rank"] for p in r["per_rank"]] == list(range(r["size"]))


def test_bad_sizes_are_one_user_error():
    with pytest.raises(UserError) as e:
        bench_sp.main(["--sizes", "0,3,8", "--num_heads", "4", "--num_kv_heads", "2", "--tokens", "4"])
    msg = str(e.value)
    assert "positive" in msg and "4 attention heads" in msg and "too few" in msg
