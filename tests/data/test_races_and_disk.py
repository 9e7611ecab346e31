"""What the data stages do when the world changes under them: a pre_tokenize.py run replacing the dataset while
sort_and_group.py packs it, and the disk refusing writes (a file-size limit, a read-only folder).

The replacement is a real commit of a new dataset (TokenizedWriter, what pre_tokenize.py runs) made at a chosen
moment of a real sort_and_group.py run; the disk limits are real (`ulimit -f` in a child process, chmod).
Run: python -m pytest -q tests/data/test_races_and_disk.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longsft.data import sort_and_group as sg
from longsft.data import storage
from longsft.data.storage import DatasetChangedError, TokenizedData
from longsft.errors import EXIT_USER_ERROR, run_cli
from tests.data.test_sort_and_group import entries, write_dataset
from tests.records import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--max_length", "64", "--group_size", "2", "--plot", "false"]


def sort_and_group(data: Path) -> None:
    run_cli(sg.main, ["--train_file", str(data), *ARGS])


@pytest.mark.parametrize("moment", ["after_reading", "while_writing", "after_writing"])
def test_sort_and_group_fails_when_the_dataset_is_replaced_meanwhile(tmp_path, monkeypatch, capsys, moment):
    data = tmp_path / "data"
    write_dataset(data, [5] * 20)
    replaced = []

    def replace_dataset():  # what pre_tokenize.py writing the same --output_dir does, at this moment
        write_dataset(data, [7] * 30, seed=1)
        replaced.append(True)

    if moment == "after_reading":  # the data is read, the packs are being computed
        real_count = sg.count_targets
        monkeypatch.setattr(sg, "count_targets", lambda *a, **k: (real_count(*a, **k), replace_dataset())[0])
    else:  # between the packs' temp folder and its commit, or right after the commit
        real_replace = storage.replace_dir

        def racing_replace(tmp, out):
            if Path(out).name == "packs" and moment == "while_writing":
                replace_dataset()
            real_replace(tmp, out)
            if Path(out).name == "packs" and moment == "after_writing":
                replace_dataset()

        monkeypatch.setattr(storage, "replace_dir", racing_replace)
    with pytest.raises(SystemExit) as e:
        sort_and_group(data)
    err = capsys.readouterr()
    assert replaced and e.value.code == EXIT_USER_ERROR and "Traceback" not in err.err
    assert f"{data} was replaced by another version" in err.err and "none were kept" in err.err, err.err
    assert "wrote" not in err.out
    # the new dataset is whole, without packs of the old one, and no temp folder is left anywhere
    assert len(TokenizedData(data)) == 30 and not (data / "packs").exists()
    assert entries(tmp_path) == ["data"] and not [p for p in data.iterdir() if p.name.startswith(".")]
    with pytest.raises(DatasetChangedError):  # the library call raises the same error
        storage.write_packs(data, {}, {}, made_from=("another", "version", None))
