"""bench/bench_qlora.py at tiny sizes: one row per mode, 4-bit weights smaller than 8-bit smaller than full, the same
batch (first losses close), user errors at once.

    python -m pytest -q tests/bench/test_bench_qlora.py    # ~30 s on 2 busy CPU cores
"""
from __future__ import annotations

import json

import pytest

from bench import bench_qlora
from longsft.errors import UserError


def test_tiny_rows(tmp_path):
    pytest.importorskip("bitsandbytes")
    report = bench_qlora.main(["--tiny", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_qlora.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    rows = {r["mode"]: r for r in saved["rows"]}
    assert list(rows) == ["full", "8", "4"] and saved["tokens"] == 64
    assert rows["4"]["weight_bytes"] < rows["8"]["weight_bytes"] < rows["full"]["weight_bytes"]
    assert rows["4"]["parameters"] == rows["full"]["parameters"] == rows["8"]["parameters"]  # 4-bit: unpacked count
    assert rows["4"]["trainable"] == rows["full"]["trainable"] > 0
    for r in rows.values():
        assert r["step_seconds"] > 0 and 5 < r["first_loss"] < 9  # random tokens: about ln(vocabulary)
        assert abs(r["first_loss"] - rows["full"]["first_loss"]) < 0.05  # the same batch, a close base
        assert abs(r["text_loss"] - rows["full"]["text_loss"]) < 0.05


def test_bad_flags_are_one_user_error():
    with pytest.raises(UserError) as e:
        bench_qlora.main(["--modes", "full,3", "--tokens", "3", "--samples", "2"])
    assert "--modes full,3" in str(e.value) and "2 tokens per sample" in str(e.value)
