"""What the data stages do when the world changes under them: a pre_tokenize.py run replacing the dataset while
sort_and_group.py packs it, and the disk refusing writes (a file-size limit, a read-only folder).

The replacement is a real commit of a new dataset (TokenizedWriter, what pre_tokenize.py runs) made at a chosen
moment of a real sort_and_group.py run; the disk limits are real (`ulimit -f` in a child process, chmod).
Run: python -m pytest -q tests/data/test_races_and_disk.py
"""
import os
import shutil
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


# ----------------------------------------------------------------------------------------------
# Disk trouble: a file-size limit (ulimit -f) and a read-only folder, in real child processes
# ----------------------------------------------------------------------------------------------

def cli(script: str, *args, fsize_kb: int | None = None, drop_root_override: bool = False):
    """Run ROOT/script in a child process, under `ulimit -f fsize_kb` when given. drop_root_override: run it
    without root's power to write into folders whose mode forbids it (setpriv), so chmod means what it says."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    if fsize_kb is not None:
        cmd = ["bash", "-c", f'ulimit -f {fsize_kb} && exec "$@"', "_", *cmd]
    if drop_root_override and os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-dac_override", *cmd]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_only_supported() -> bool:
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


@pytest.mark.slow
def test_pre_tokenize_and_sort_and_group_under_a_file_size_limit(tmp_path, glm4_tokenizer_dir):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 40}]}
    src = write_jsonl(tmp_path / "in.jsonl", [good] * 400)  # ~50k tokens: 400 KB of ids and labels
    out = tmp_path / "data"
    args = ["--model_name_or_path", glm4_tokenizer_dir, "--input", src, "--output_dir", out, "--num_proc", 1]
    assert cli("pre_tokenize.py", *args).returncode == 0
    packing = ["--max_length", 256, "--group_size", 2, "--plot", "false"]
    assert cli("sort_and_group.py", "--train_file", out, *packing).returncode == 0
    before = tree(out)

    proc = cli("pre_tokenize.py", *args, "--seed", 7, fsize_kb=64)
    assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr
    assert f"pre_tokenize.py writing {out} failed: a file reached the file-size limit" in err, err
    assert "[Errno 27] File too large" in err and "it needs about" in err and "(ulimit -f 64)" in err
    assert f"The previous dataset in {out} is intact" in err
    needed = float(err.split("it needs about ")[1].split(" KB")[0].replace(",", ""))
    assert 300 < needed < 1000, err  # what the run before wrote: input_ids + labels + offsets (~417 KB)

    proc = cli("sort_and_group.py", "--train_file", out, *packing, "--seed", 7, fsize_kb=1)
    assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr
    assert f"sort_and_group.py writing {out / 'packs'} failed: a file reached the file-size limit" in err, err
    assert f"The previous packs in {out / 'packs'} are intact" in err and "(ulimit -f 1)" in err
    assert tree(out) == before and entries(tmp_path) == ["data", "in.jsonl"]  # nothing changed, nothing left over


@pytest.mark.slow
@pytest.mark.skipif(not read_only_supported(), reason="running as root without setpriv: chmod cannot forbid writes")
def test_read_only_folders_are_named_before_any_work(tmp_path, glm4_tokenizer_dir):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    src = write_jsonl(tmp_path / "in.jsonl", [good] * 20)
    ro = tmp_path / "ro"
    out = ro / "data"
    args = ["--model_name_or_path", glm4_tokenizer_dir, "--input", src, "--num_proc", 1]
    assert cli("pre_tokenize.py", *args, "--output_dir", out).returncode == 0
    before = tree(ro)
    ro.chmod(0o555)
    out.chmod(0o555)
    try:
        for target in (out, ro / "new"):  # replacing a dataset, or a new one, in a read-only folder
            proc = cli("pre_tokenize.py", *args, "--output_dir", target, drop_root_override=True)
            assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in proc.stderr, proc.stderr[-3000:]
            assert f"--output_dir {target}: {ro} is not writable by this user" in proc.stderr, proc.stderr
        proc = cli("sort_and_group.py", "--train_file", out, *ARGS, drop_root_override=True)
        assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"--train_file {out}: {out} is not writable by this user" in proc.stderr, proc.stderr
    finally:
        out.chmod(0o755)
        ro.chmod(0o755)
    assert tree(ro) == before
