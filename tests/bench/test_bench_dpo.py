"""bench/bench_dpo.py at tiny sizes: one row per method (each in a fresh process), no padding in packs, padding in
padded pairs, the same summed loss for every method (the same objective at the initial weights), user errors at once.

    python -m pytest -q tests/bench/test_bench_dpo.py    # ~1-2 min on 2 busy CPU cores (one process per method)
"""
from __future__ import annotations

import json

import pytest

from bench import bench_dpo
from longsft.errors import UserError

TINY = ["--num_pairs", "6", "--max_completion", "64", "--prompt_length", "24", "--pack_length", "256",
        "--hidden_size", "64", "--num_layers", "1", "--vocab_size", "500", "--padded_batch", "1"]


@pytest.mark.slow
def test_tiny_run_rows_and_equal_losses(tmp_path):
    methods = "packed-precomputed,packed-live,padded-live,trl"
    report = bench_dpo.main(TINY + ["--methods", methods, "--out", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    rows = {r["method"]: r for r in saved["rows"]}
    assert list(rows) == methods.split(",") and saved["loss_agrees"] and report["loss_agrees"]
    packed, live, padded = rows["packed-precomputed"], rows["packed-live"], rows["padded-live"]
    assert packed["token_slots"] == packed["real_tokens"] == live["real_tokens"] == padded["real_tokens"]
    assert padded["token_slots"] > padded["real_tokens"]  # right padding to the longest of each batch
    assert packed["models_in_memory"] == 1 and live["models_in_memory"] == 2 and "reference_pass_s" in packed
    assert packed["steps"] < padded["steps"]  # several pairs per pack
    if "skipped" not in rows["trl"]:
        assert abs(rows["trl"]["loss_sum"] - packed["loss_sum"]) < 1e-4 * abs(packed["loss_sum"])


def test_bad_settings_are_one_user_error():
    with pytest.raises(UserError) as e:
        bench_dpo.main(["--methods", "packed-live,magic", "--pack_length", "100", "--max_completion", "200",
                        "--num_pairs", "0"])
    msg = str(e.value)
    assert "magic" in msg and "--pack_length 100" in msg and "--num_pairs 0" in msg
