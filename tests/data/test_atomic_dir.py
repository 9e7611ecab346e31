"""Writing datasets and packs never loses anything (longsft/atomic_dir.py): only our own folders are replaced, the commit
is atomic and every crash window leaves a readable folder, symlinks are written through, and killed runs leave
nothing behind (SIGTERM cleans up, a later run removes dead runs' temp folders)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longsft import atomic_dir
import pre_tokenize_glm4
from longsft.data import sort_and_group as sg
from longsft.atomic_dir import HOST, FolderReader
from longsft.data.inputs import InputError
from longsft.data.storage import DatasetFormatError, TokenizedData, TokenizedWriter, write_packs
from longsft.train.batches import LMPackDataset

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}


def write_jsonl(path, n):
    path.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(n)), encoding="utf-8")
    return path


def run_glm(tok_dir, src, out, *extra):
    return pre_tokenize_glm4.main(["--model_name_or_path", str(tok_dir), "--input", str(src), "--output_dir",
                                   str(out), "--num_proc", "1", "--no_shuffle", *extra])


def write_ds(path, samples):
    with TokenizedWriter(path, meta={"tokenizer": {"vocab_size": 100}}) as w:
        for ids in samples:
            w.add(ids, ids)
        w.commit()
    return path


def samples_of(path):
    data = TokenizedData(path)
    return [data.sample(i)[0].tolist() for i in range(len(data))]


def tree(d):
    """Every file under d (relative path -> bytes); folders as None."""
    d = Path(d)
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


def hidden(d):
    return sorted(p.name for p in Path(d).iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------------------- item 1: the guard

def test_pretokenize_replaces_only_a_folder_that_is_ours_alone(tmp_path, glm4_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", 3)
    thesis = tmp_path / "thesis"  # a user's folder that merely holds a meta.json
    (thesis / "figures").mkdir(parents=True)
    (thesis / "meta.json").write_text('{"title": "my thesis"}')
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    (thesis / "figures" / "a.png").write_bytes(b"png")
    before = tree(thesis)
    with pytest.raises(InputError) as e:
        run_glm(glm4_tokenizer_dir, src, thesis)
    assert f"{thesis}" in str(e.value) and "not a tokenized dataset" in str(e.value)
    assert "refusing to replace" in str(e.value) and "another --output_dir" in str(e.value)
    assert tree(thesis) == before

    out = tmp_path / "out"  # a real dataset that also keeps the user's notes
    run_glm(glm4_tokenizer_dir, src, out)
    sg.main(["--train_file", str(out), "--max_length", "64", "--group_size", "1", "--plot", "false"])
    (out / "NOTES.md").write_text("mine")
    before = tree(out)
    with pytest.raises(InputError, match=r"(?s)also holds files that are not part of it: NOTES\.md.*refusing"):
        run_glm(glm4_tokenizer_dir, write_jsonl(tmp_path / "new.jsonl", 5), out)
    assert tree(out) == before
    (out / "NOTES.md").unlink()
    (out / "packs" / "todo.txt").write_text("mine too")
    with pytest.raises(InputError, match=r"packs/todo\.txt"):
        run_glm(glm4_tokenizer_dir, write_jsonl(tmp_path / "new.jsonl", 5), out)
    (out / "packs" / "todo.txt").unlink()
    run_glm(glm4_tokenizer_dir, write_jsonl(tmp_path / "new.jsonl", 5), out)  # only our files: replaced whole
    assert len(samples_of(out)) == 5 and not (out / "packs").exists()


def test_the_writers_themselves_refuse(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "meta.json").write_text('{"format": "something else"}')
    with pytest.raises(DatasetFormatError, match="not a tokenized dataset"):
        TokenizedWriter(mine)
    ds = write_ds(tmp_path / "ds", [[1, 2]])
    (ds / "packs").mkdir()
    (ds / "packs" / "mine.txt").write_text("x")
    with pytest.raises(DatasetFormatError, match="not a packs folder"):
        write_packs(ds, {}, {})
    with pytest.raises(DatasetFormatError, match=r"packs/"):
        TokenizedWriter(ds)
    assert (ds / "packs" / "mine.txt").read_text() == "x" and hidden(ds) == [] and hidden(tmp_path) == []


def test_sort_and_group_replaces_only_its_own_packs(tmp_path):
    ds = write_ds(tmp_path / "ds", [[1, 2, 3], [4, 5], [6]])
    args = ["--train_file", str(ds), "--max_length", "8", "--group_size", "1", "--plot", "false"]
    sg.main(args)
    (ds / "packs" / "NOTES.md").write_text("mine")
    before = tree(ds)
    with pytest.raises(sg.SortAndGroupError, match=r"(?s)NOTES\.md.*move those files out of it"):
        sg.main(args)
    assert tree(ds) == before
    (ds / "packs" / "meta.json").write_text('{"mine": true}')  # not even our meta.json
    with pytest.raises(sg.SortAndGroupError, match="is not a packs folder"):
        sg.main(args)
    assert (ds / "packs" / "NOTES.md").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- item 4: atomic commit

def test_the_output_folder_exists_at_every_step_of_a_commit(tmp_path, monkeypatch):
    out = write_ds(tmp_path / "ds", [[1, 2, 3]])
    watch, seen = [out / "meta.json"], []

    def spy(fn):  # after every rename / exchange: would a reader find the folder?
        def call(*a, **k):
            result = fn(*a, **k)
            seen.append(all(p.is_file() for p in watch))
            return result
        return call

    for mod, name in ((os, "rename"), (os, "replace"), (atomic_dir, "exchange")):
        monkeypatch.setattr(mod, name, spy(getattr(mod, name)))
    write_ds(out, [[4, 5, 6, 7]])
    args = ["--train_file", str(out), "--max_length", "8", "--group_size", "1", "--plot", "false"]
    sg.main(args)
    watch.append(out / "packs" / "meta.json")
    sg.main(args + ["--seed", "3"])
    assert len(seen) >= 6 and all(seen)
    assert samples_of(out) == [[4, 5, 6, 7]] and len(LMPackDataset(out)) == 1
    assert hidden(out) == [] and hidden(tmp_path) == []


def test_every_crash_window_leaves_a_readable_folder(tmp_path, dead_pid):
    def crash_layout(case):
        """The folders a writer killed at that moment leaves: old A, new B."""
        d = tmp_path / case
        d.mkdir()
        a, b = write_ds(d / "a", [[1, 2]]), write_ds(d / "b", [[3, 4, 5]])
        out = d / "ds"
        tmp = d / f".ds.tmp-{HOST}-{dead_pid}-0123abcd"
        old = d / f".ds.old-{HOST}-{dead_pid}-4567cdef"
        moves = {"before_the_swap": (out, tmp),  # killed while writing the new folder, or just before the swap
                 "after_the_swap": (tmp, out),  # killed after the exchange, before the old one (now at tmp) went
                 "between_fallback_renames": (old, tmp),  # no exchange here: killed between the two renames
                 "earlier_version": (d / ".ds.old-89abcdef", tmp)}  # the same, with an earlier version's name
        for src, dst in zip((a, b), moves[case]):
            src.rename(dst)
        return d, out

    expect = {"before_the_swap": [[1, 2]], "after_the_swap": [[3, 4, 5]], "between_fallback_renames": [[1, 2]],
              "earlier_version": [[1, 2]]}
    for case, want in expect.items():
        d, out = crash_layout(case)
        assert samples_of(out) == want, case  # readable (recovered if need be) before anything else runs
        assert out.is_dir() and not out.is_symlink()
        write_ds(out, [[9]])  # the next run cleans up what the killed one left
        assert samples_of(out) == [[9]] and hidden(d) == [], case


def test_a_crash_between_fallback_renames_of_packs_is_recovered(tmp_path, dead_pid):
    ds = write_ds(tmp_path / "ds", [[1, 2, 3], [4, 5]])
    args = ["--train_file", str(ds), "--max_length", "8", "--group_size", "1", "--plot", "false"]
    sg.main(args)
    n = len(LMPackDataset(ds))
    (ds / "packs").rename(ds / f".packs.old-{HOST}-{dead_pid}-0123abcd")
    (ds / f".packs.tmp-{HOST}-{dead_pid}-4567cdef").mkdir()  # the half-written new one
    assert len(LMPackDataset(ds)) == n and (ds / "packs" / "meta.json").is_file()
    sg.main(args)
    assert hidden(ds) == [] and len(LMPackDataset(ds)) == n


def test_fallback_commit_where_the_exchange_is_not_supported(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_dir, "exchange", lambda a, b: False)
    out = write_ds(tmp_path / "ds", [[1, 2]])
    write_ds(out, [[3]])
    assert samples_of(out) == [[3]] and hidden(tmp_path) == []
    real, calls = os.rename, []

    def rename(a, b):  # Ctrl-C right between the two renames
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_ds(out, [[4, 4]])
    monkeypatch.setattr(os, "rename", real)
    assert samples_of(out) == [[3]] and hidden(tmp_path) == []
    live = tmp_path / f".gone.old-{HOST}-{os.getpid()}-0123abcd"  # a live writer's: waited for, not taken
    live.mkdir()
    assert not atomic_dir.recover_dir(tmp_path / "gone", wait_s=0.1) and live.is_dir()


def test_a_reader_sees_one_version_while_a_commit_swaps(tmp_path, monkeypatch):
    out = write_ds(tmp_path / "ds", [[1, 2, 3], [4, 5]])
    real, swapped = FolderReader.read_text, []

    def read_text(self, name):
        text = real(self, name)
        if not swapped:  # a new version with the same counts lands right after meta.json was read
            swapped.append(1)
            write_ds(out, [[6], [7, 8, 9, 10]])
        return text

    monkeypatch.setattr(FolderReader, "read_text", read_text)
    assert samples_of(out) == [[6], [7, 8, 9, 10]]


# ---------------------------------------------------------------------------------------------- item 7: symlinks

def test_a_symlinked_output_is_written_through(tmp_path, glm4_tokenizer_dir):
    store = tmp_path / "store" / "ds"
    run_glm(glm4_tokenizer_dir, write_jsonl(tmp_path / "a.jsonl", 2), store)
    link = tmp_path / "link"
    link.symlink_to(store)
    run_glm(glm4_tokenizer_dir, write_jsonl(tmp_path / "b.jsonl", 4), link)
    assert link.is_symlink() and link.resolve() == store.resolve() and len(samples_of(store)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "link", "store"]
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["ds"]
    packs_store = tmp_path / "packs_store"  # DIR/packs as a link to another disk
    sg.main(["--train_file", str(link), "--max_length", "64", "--group_size", "1", "--plot", "false"])
    (store / "packs").rename(packs_store)
    (store / "packs").symlink_to(packs_store)
    sg.main(["--train_file", str(link), "--max_length", "128", "--group_size", "1", "--plot", "false"])
    assert (store / "packs").is_symlink() and json.loads((packs_store / "meta.json").read_text())["max_length"] == 128
    assert hidden(store) == [] and hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------------- item 8: killed runs

def test_temp_folders_of_dead_runs_are_removed_live_ones_kept(tmp_path, glm4_tokenizer_dir, dead_pid, capsys):
    out = tmp_path / "out"
    src = write_jsonl(tmp_path / "in.jsonl", 2)
    run_glm(glm4_tokenizer_dir, src, out)
    names = {"dead": f".out.tmp-{HOST}-{dead_pid}-0123abcd", "dead_old": f".out.old-{HOST}-{dead_pid}-1123abcd",
             "live": f".out.tmp-{HOST}-{os.getpid()}-2123abcd", "other_host": f".out.tmp-elsewhere-{dead_pid}-3123abcd",
             "earlier_stale": ".out.tmp-4123abcd", "earlier_fresh": ".out.tmp-5123abcd"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "input_ids.bin").write_bytes(b"\0" * 1000)
    hour_ago = time.time() - 2 * 3600
    for p in (tmp_path / names["earlier_stale"], tmp_path / names["earlier_stale"] / "input_ids.bin"):
        os.utime(p, (hour_ago, hour_ago))
    run_glm(glm4_tokenizer_dir, src, out)
    assert hidden(tmp_path) == sorted(names[k] for k in ("live", "other_host", "earlier_fresh"))
    assert "removed 3 temp folder(s) left by killed runs" in capsys.readouterr().out
    ds = out
    (ds / f".packs.tmp-{HOST}-{dead_pid}-6123abcd").mkdir()
    sg.main(["--train_file", str(ds), "--max_length", "64", "--group_size", "1", "--plot", "false"])
    assert hidden(ds) == [] and "removed 1 temp folder(s)" in capsys.readouterr().out


KILL_SELF = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from longsft.data import storage
real = storage.{target}
def killed(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
storage.{target} = killed
import {module}
{module}.main(sys.argv[1:])
"""


def kill_self_during(target, module, argv, tmp_path):
    """Run `module.main(argv)` in a fresh process that sends itself SIGTERM right after storage.<target>."""
    script = tmp_path / "kill_self.py"
    script.write_text(KILL_SELF.format(root=str(ROOT), target=target, module=module))
    return subprocess.run([sys.executable, str(script), *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, glm4_tokenizer_dir, num_proc):
    out = tmp_path / "out"
    run_glm(glm4_tokenizer_dir, write_jsonl(tmp_path / "old.jsonl", 2), out)
    before = tree(out)
    res = kill_self_during("TokenizedWriter.add_batch", "pre_tokenize_glm4", [
        "--model_name_or_path", glm4_tokenizer_dir, "--input", write_jsonl(tmp_path / "new.jsonl", 600),
        "--output_dir", out, "--num_proc", num_proc], tmp_path)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-2000:]
    assert "SIGTERM" in res.stderr and tree(out) == before and hidden(tmp_path) == []


def test_sigterm_during_packing_cleans_up(tmp_path):
    ds = write_ds(tmp_path / "ds", [[1, 2, 3], [4, 5]])
    args = ["--train_file", ds, "--max_length", "8", "--group_size", "1", "--plot", "false"]
    sg.main(list(map(str, args)))
    before = tree(ds)
    res = kill_self_during("write_json_atomic", "sort_and_group", [*args, "--seed", "9"], tmp_path)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-2000:]
    assert tree(ds) == before and hidden(ds) == []
