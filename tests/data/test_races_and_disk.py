"""What the data stages do when the world changes under them: a pre_tokenize.py run replacing the dataset while
sort_and_group.py packs it, the disk refusing writes (a file-size limit, a read-only folder, a full disk) and a
worker process killed mid-run.

The replacement is a real commit of a new dataset (TokenizedWriter, what pre_tokenize.py runs) made at a chosen
moment of a real sort_and_group.py run; the disk limits are real (`ulimit -f` in a child process, chmod, a small
tmpfs mounted in a private mount namespace), and so is the SIGKILL.
Run: python -m pytest -q tests/data/test_races_and_disk.py
"""
import json
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


# ----------------------------------------------------------------------------------------------
# A worker process killed mid-run (the out-of-memory killer, a scheduler): the run fails at once, it does not hang
# ----------------------------------------------------------------------------------------------

SLOW = ("{%- if messages and messages[0]['content'] is string and 'SLOW' in messages[0]['content'] %}"
        "{%- for i in range(400) %}{%- for j in range(1000) %}{%- endfor %}{%- endfor %}{%- endif %}")


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the worker processes")
def test_a_killed_worker_fails_the_run_at_once_naming_its_records(tmp_path, chat_tokenizer_dir):
    import signal
    import time

    tok = tmp_path / "tok"  # a chat template that takes a while on records that ask for it
    shutil.copytree(chat_tokenizer_dir("qwen2"), tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": SLOW + config["chat_template"]}))
    slow = {"messages": [{"role": "user", "content": "SLOW question"}, {"role": "assistant", "content": "an answer"}]}
    src = write_jsonl(tmp_path / "in.jsonl", [slow] * 400)
    out = tmp_path / "data"
    cmd = [sys.executable, str(ROOT / "pre_tokenize.py"), "--model_name_or_path", str(tok), "--template", "auto",
           "--input", str(src), "--output_dir", str(out), "--num_proc", "3", "--no_shuffle"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(children(proc.pid)) < 2:  # the two pool workers are up (forked: same command line)
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        time.sleep(1.0)  # they are encoding
        victim = children(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=60)  # multiprocessing.Pool waited here forever
        assert time.time() - killed < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in err, err[-3000:]
    assert "error: a pre-tokenization worker process died (killed by SIGKILL) while it encoded one of these " \
           f"records: {src} lines " in err, err[-3000:]
    assert "with fewer --num_proc if memory ran out" in err and f"Nothing was written to {out}" in err
    assert not out.exists() and entries(tmp_path) == ["in.jsonl", "tok"]  # no temp folder left
    deadline = time.time() + 10
    while children(proc.pid) and time.time() < deadline:  # (a reaped process has no children file)
        time.sleep(0.1)
    assert not any(Path(f"/proc/{c}").exists() and "pre_tokenize" in Path(f"/proc/{c}/cmdline").read_text()
                   for c in children(proc.pid))


# ----------------------------------------------------------------------------------------------
# A full disk (ENOSPC), for real: a small tmpfs mounted in a private mount namespace (unshare)
# ----------------------------------------------------------------------------------------------

def _namespace_prefix() -> list[str] | None:
    """`unshare` arguments that give a child its own mount namespace where it may mount a tmpfs (as root, or in a
    user namespace where unprivileged ones are allowed), or None where neither works here."""
    if not shutil.which("unshare"):
        return None
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*prefix, "bash", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && "
                                "umount $d && rmdir $d"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return prefix
    return None


def on_small_disk(disk: Path, size_kb: int, setup: str, command: list, keep: Path):
    """Run `command` with a tmpfs of size_kb mounted at `disk` (in a private mount namespace): `setup` (bash) runs
    first on it, and afterwards the whole disk is copied to `keep` (the tmpfs ends with the namespace)."""
    prefix = _namespace_prefix()
    script = (f'mount -t tmpfs -o size={size_kb}k tmpfs "{disk}" && {setup} && "$@"; rc=$?; '
              f'cp -a "{disk}/." "{keep}/"; exit $rc')
    keep.mkdir()
    return subprocess.run([*prefix, "bash", "-c", script, "_", *map(str, command)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(_namespace_prefix() is None, reason="cannot mount a tmpfs in a private mount namespace here")
def test_pre_tokenize_and_sort_and_group_on_a_full_disk(tmp_path, glm4_tokenizer_dir):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 40}]}
    small, big = write_jsonl(tmp_path / "small.jsonl", [good] * 10), write_jsonl(tmp_path / "big.jsonl", [good] * 800)
    prev = tmp_path / "prev"
    args = ["--model_name_or_path", glm4_tokenizer_dir, "--num_proc", 1]
    packing = ["--max_length", 256, "--group_size", 2, "--plot", "false"]
    assert cli("pre_tokenize.py", *args, "--input", small, "--output_dir", prev).returncode == 0
    assert cli("sort_and_group.py", "--train_file", prev, *packing).returncode == 0
    before = tree(prev)
    disk = tmp_path / "disk"
    disk.mkdir()
    data = disk / "data"

    # the previous dataset (~20 KB) on a 256 KB disk; the new one needs ~830 KB
    proc = on_small_disk(disk, 256, f'cp -a "{prev}" "{data}"',
                         [sys.executable, ROOT / "pre_tokenize.py", *args, "--input", big, "--output_dir", data],
                         tmp_path / "after")
    err = proc.stderr
    assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in err, err[-3000:]
    assert f"pre_tokenize.py writing {data} failed: the disk is full" in err, err[-3000:]
    assert "[Errno 28] No space left on device" in err and "it needs about" in err
    assert f"The previous dataset in {data} is intact" in err
    assert tree(tmp_path / "after" / "data") == before and entries(tmp_path / "after") == ["data"]

    # packing the previous dataset again on a disk filled up: its packs stay as they were
    proc = on_small_disk(disk, 1024, f'cp -a "{prev}" "{data}" && (cat /dev/zero > "{disk}/filler" || true)',
                         [sys.executable, ROOT / "sort_and_group.py", "--train_file", data, *packing, "--seed", 7],
                         tmp_path / "after2")
    err = proc.stderr
    assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in err, err[-3000:]
    assert f"sort_and_group.py writing {data / 'packs'} failed: the disk is full" in err, err[-3000:]
    assert f"The previous packs in {data / 'packs'} are intact" in err
    assert tree(tmp_path / "after2" / "data") == before and entries(tmp_path / "after2") == ["data", "filler"]
