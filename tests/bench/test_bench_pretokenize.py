"""bench/bench_pretokenize.py's statistics (the measurements themselves run in `python bench/bench_pretokenize.py`).

    python -m pytest -q tests/bench/test_bench_pretokenize.py
"""
import pytest

from bench import bench_pretokenize


def test_paired_ratio_takes_each_trials_own_ratio():
    # per trial 2.0/2.5, 3.0/2.6, 2.2/2.75 = 0.8, 1.15, 0.8: the median is 0.8, where the fastest runs (trials 1
    # and 2) give 2.0/2.6 = 0.77
    bare, ours = {"walls": [2.0, 3.0, 2.2]}, {"walls": [2.5, 2.6, 2.75]}
    assert bench_pretokenize.paired_ratio(bare, ours) == pytest.approx(0.8)
