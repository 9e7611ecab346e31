"""The on-disk tokenized format: writer, reader, atomic replace, clear errors."""
import numpy as np
import pytest

import dataset
from dataset import DatasetFormatError, LMDataset, TokenizedData, TokenizedWriter


def _write(path, samples, meta=None):
    with TokenizedWriter(path, meta=meta or {}) as w:
        for ids, lab in samples:
            w.add(ids, lab)
        w.commit()


def test_round_trip_and_lengths(tmp_path):
    out = tmp_path / "ds"
    _write(out, [([1, 2, 3], [-100, 2, 3]), ([7, 8], [7, -100])], meta={"template": "x"})
    ds = LMDataset(out)
    assert len(ds) == 2
    assert ds[0]["input_ids"].tolist() == [1, 2, 3]
    assert ds[1]["labels"].tolist() == [7, -100]
    data = TokenizedData(out)
    assert data.lengths.tolist() == [3, 2]
    assert data.meta["template"] == "x" and data.meta["num_tokens"] == 5


def test_uncommitted_writer_leaves_previous_output(tmp_path):
    out = tmp_path / "ds"
    _write(out, [([1, 2], [1, 2])])
    with pytest.raises(RuntimeError):
        with TokenizedWriter(out) as w:
            w.add([5, 6, 7], [5, 6, 7])
            raise RuntimeError("interrupted")
    assert LMDataset(out)[0]["input_ids"].tolist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetFormatError, match="no such folder"):
        LMDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="not a tokenized dataset"):
        LMDataset(tmp_path / "empty")
    out = tmp_path / "ds"
    _write(out, [([1, 2, 3], [1, 2, 3])])
    with open(out / "labels.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(DatasetFormatError, match="labels.bin"):
        LMDataset(out)
    with pytest.raises(ValueError):
        with TokenizedWriter(tmp_path / "bad") as w:
            w.add([1, 2], [1])
