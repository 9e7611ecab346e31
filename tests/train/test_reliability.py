"""main.py as a cluster scheduler and a careless user drive it (issue 21): a resume into a folder of the user's, a
resume whose settings would change the data order, two runs into one folder, `--resume_from_checkpoint yes` on a
first submission, a disk that refuses a checkpoint, a model whose heads sequence parallelism cannot split.

Each test runs main.py on tiny models (CPU): in this process, or as real child processes where a second live run,
a file-size limit or several ranks are the point. Run: python -m pytest -q tests/train/test_reliability.py
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from longsft.data import sort_and_group
from longsft.errors import UserError
from longsft.train import checkpoints as ckpt
from tests.train.test_run import StopAt, llama_dir, losses, run, write_task  # noqa: F401 (fixtures)
from tests.train.test_safety import messages, tree_digest

ROOT = Path(__file__).resolve().parents[2]
NAIVE = ["--batch_method", "naive", "--learning_rate", 5e-3]


@pytest.fixture(scope="module")
def data8(tmp_path_factory, llama_dir):  # noqa: F811
    return write_task(tmp_path_factory.mktemp("data8") / "data", llama_dir, "llama3", n=8, group=False)


def main_py(model_dir, data, out, *extra, fsize_kb=None, wait=True):
    """main.py as a child process (under `ulimit -f fsize_kb` when given): the CompletedProcess, or the Popen."""
    cmd = [sys.executable, str(ROOT / "main.py"), "--model_name_or_path", str(model_dir), "--train_file", str(data),
           "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
           "--logging_steps", "1", *map(str, extra)]
    if fsize_kb is not None:
        cmd = ["bash", "-c", f'ulimit -f {fsize_kb} && exec "$@"', "_", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------------------------
# Item 1: a resume writes only into an empty folder or one holding main.py runs' own outputs
# ----------------------------------------------------------------------------------------------

def test_resume_from_another_folder_never_writes_over_the_users_files(tmp_path, llama_dir, data8):  # noqa: F811
    common = [*NAIVE, "--per_device_train_batch_size", 2, "--save_strategy", "steps", "--save_steps", 2]
    other = tmp_path / "other"
    run(llama_dir, data8, other, *common, "--max_steps", 2)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("mine")
    (mine / "model.safetensors").write_text("mine")
    before = tree_digest(mine)
    with pytest.raises(SystemExit, match=r"holds files main.py did not write \(config.json, model.safetensors\)"):
        run(llama_dir, data8, mine, *common, "--max_steps", 3, "--resume_from_checkpoint", other / "checkpoint-2")
    assert tree_digest(mine) == before

    # into a new folder it continues (step 3), and the final output is there
    fresh = tmp_path / "fresh"
    resumed = run(llama_dir, data8, fresh, *common, "--max_steps", 3, "--resume_from_checkpoint",
                  other / "checkpoint-2")
    assert resumed.state.global_step == 3 and ckpt.read_marker(fresh)["global_step"] == 3

    # a run killed in its final save (the files written, the marker not yet complete) resumes in its own folder:
    # what it wrote after it started is its own
    real_finish = ckpt.finish_output

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during the final save")

    ckpt.finish_output = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            run(llama_dir, data8, tmp_path / "cut", *common, "--max_steps", 4)
    finally:
        ckpt.finish_output = real_finish
    assert ckpt.read_marker(tmp_path / "cut") is None and (tmp_path / "cut" / "model.safetensors").is_file()
    again = run(llama_dir, data8, tmp_path / "cut", *common, "--max_steps", 4, "--resume_from_checkpoint", "true")
    assert again.state.global_step == 4 and "model.safetensors" in ckpt.read_marker(tmp_path / "cut")["outputs"]


# ----------------------------------------------------------------------------------------------
# Item 2: the resumed run's data order, or a refusal naming what changed
# ----------------------------------------------------------------------------------------------

def test_resume_with_another_step_size_is_refused_and_the_same_one_is_exact(tmp_path, llama_dir, data8,  # noqa: F811
                                                                             caplog):
    # 8 samples, 2 per optimizer step (1 per device x 2 accumulation): 4 steps per epoch, 6 steps cross an epoch
    common = [*NAIVE, "--per_device_train_batch_size", 1, "--max_steps", 6, "--save_strategy", "steps",
              "--save_steps", 3]
    full = losses(run(llama_dir, data8, tmp_path / "full", *common, "--gradient_accumulation_steps", 2))
    cut = tmp_path / "cut"
    run(llama_dir, data8, cut, *common, "--gradient_accumulation_steps", 2, callbacks=[StopAt(3)])
    before = tree_digest(cut)
    with pytest.raises(UserError) as e:  # 1 sample per step: from step 3 it would start at sample 3, not 6
        run(llama_dir, data8, cut, *common, "--resume_from_checkpoint", "true")
    msg = str(e.value)
    assert "this run would not continue the data where" in msg and "checkpoint-3 stopped" in msg, msg
    assert "this run takes 1 samples per optimizer step (1 data-parallel rank(s) x 1 per device x 1 accumulation" \
           in msg and "the run it resumes took 2 (1 data-parallel rank(s) x 1 per device x 2 accumulation" in msg
    assert "start at item 3 instead of 6" in msg
    with pytest.raises(UserError, match=r"the shuffle seed \(--data_seed, else --seed\) differs .*\(0 -> 5\)"):
        run(llama_dir, data8, cut, *common, "--gradient_accumulation_steps", 2, "--data_seed", 5,
            "--resume_from_checkpoint", "true")
    assert tree_digest(cut) == before  # refused before anything was written

    # the same 2 samples per step split another way (2 per device, no accumulation): the exact continuation
    resumed = losses(run(llama_dir, data8, cut, *common, "--per_device_train_batch_size", 2,
                         "--resume_from_checkpoint", "true"))
    np.testing.assert_allclose(resumed, full, rtol=0, atol=1e-6)
    assert json.loads((cut / "checkpoint-6" / ckpt.SETTINGS_FILE).read_text())["resolved"]["global_batch"] == 2


def test_resume_after_the_packs_were_remade_is_refused(tmp_path, llama_dir):  # noqa: F811
    data = write_task(tmp_path / "data", llama_dir, "llama3", n=12)
    common = ["--batch_method", "pack", "--learning_rate", 5e-3, "--max_steps", 4, "--save_strategy", "steps",
              "--save_steps", 2]
    run(llama_dir, data, tmp_path / "out", *common, callbacks=[StopAt(2)])
    sort_and_group.main(["--train_file", str(data), "--max_length", "96", "--group_size", "2", "--seed", "7"])
    with pytest.raises(UserError, match=r"the data's order differs from the run it resumes \(the dataset or its "
                                         r"packs changed"):
        run(llama_dir, data, tmp_path / "out", *common, "--resume_from_checkpoint", "true")


# ----------------------------------------------------------------------------------------------
# Item 3: one run per output folder
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_into_the_same_folder_stops_at_once(tmp_path, llama_dir, data8):  # noqa: F811
    out = tmp_path / "out"
    first = main_py(llama_dir, data8, out, *NAIVE, "--max_steps", 100_000, wait=False)
    try:
        deadline = time.time() + 300
        while not (out / ckpt.SETTINGS_FILE).is_file():  # it holds the lock and has begun to write
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.5)
        holder = json.loads((out / ckpt.LOCK_FILE).read_text())
        assert holder["pid"] == first.pid
        with pytest.raises(SystemExit, match=rf"--output_dir {out} is in use by main.py process {first.pid} on "):
            run(llama_dir, data8, out, *NAIVE, "--max_steps", 1)
    finally:
        first.send_signal(signal.SIGKILL)  # killed: the kernel drops its lock, the lock file stays behind
        first.wait()
    assert (out / ckpt.LOCK_FILE).is_file()
    second = run(llama_dir, data8, out, *NAIVE, "--max_steps", 1)  # a dead holder's lock is stale
    assert second.state.global_step == 1 and not (out / ckpt.LOCK_FILE).exists()  # released at the end


def test_the_lock_is_released_and_a_failed_start_leaves_nothing(tmp_path, llama_dir, data8):  # noqa: F811
    out = tmp_path / "new" / "out"
    with pytest.raises(SystemExit, match="no packs"):  # fails after the lock was taken (the data checks)
        run(llama_dir, data8, out, "--batch_method", "pack", "--max_steps", 1)
    assert not (tmp_path / "new").exists()  # the folders the lock made are gone again
    with ckpt.OutputLock(out) as lock:
        assert lock.path.is_file() and json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(SystemExit, match=f"is in use by main.py process {os.getpid()}"):
            ckpt.OutputLock(out).acquire()  # a second holder, even in the same process
    assert not (tmp_path / "new").exists()


NO_FLOCK = """
import errno, fcntl, sys, time
def no_flock(fd, op):  # what a file system without flock support answers (some NFS mounts, FUSE)
    raise OSError(errno.ENOLCK, "No locks available")
fcntl.flock = no_flock
from longsft.train.checkpoints import OutputLock
lock = OutputLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(300)
"""


def test_without_flock_the_lock_goes_by_whether_its_holder_lives(tmp_path, monkeypatch):
    """Where flock() is refused (ENOLCK), a second run is stopped while the holder lives and takes over once it is
    dead (its lock file left behind, as a SIGKILL leaves it): two real processes, only the kernel's flock simulated."""
    import errno
    import fcntl

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", NO_FLOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"

        def no_flock(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(fcntl, "flock", no_flock)
        with pytest.raises(SystemExit, match=rf"--output_dir {out} is in use by main.py process {holder.pid} on "):
            ckpt.OutputLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / ckpt.LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by the dead holder
    with ckpt.OutputLock(out) as lock:  # stale: its holder is dead on this host
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (out / ckpt.LOCK_FILE).exists()


# ----------------------------------------------------------------------------------------------
# Item 12: --resume_from_checkpoint yes on a first submission starts from scratch
# ----------------------------------------------------------------------------------------------

def test_resume_yes_without_a_checkpoint_starts_a_new_run(tmp_path, llama_dir, data8, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="longsft.train")
    common = [*NAIVE, "--max_steps", 2, "--save_strategy", "steps", "--save_steps", 2]
    first = run(llama_dir, data8, tmp_path / "out", *common, "--resume_from_checkpoint", "yes")
    assert first.state.global_step == 2 and "no checkpoint found" in messages(caplog)
    assert "starting from scratch" in messages(caplog)
    # the first submission killed during its first save: only an incomplete checkpoint, so again from scratch
    cut = tmp_path / "cut"
    (cut / "checkpoint-1").mkdir(parents=True)
    ckpt.mark_in_progress(cut / "checkpoint-1", kind="checkpoint", global_step=1, run_id="killed")
    caplog.clear()
    again = run(llama_dir, data8, cut, *common, "--resume_from_checkpoint", "true")
    assert again.state.global_step == 2 and "skipping checkpoint-1" in messages(caplog)
    assert "starting from scratch" in messages(caplog)
    # a checkpoint named explicitly stays an error when it is not there
    with pytest.raises(SystemExit, match="no checkpoint-5 folder"):
        run(llama_dir, data8, tmp_path / "out2", *common, "--resume_from_checkpoint", "5")
    with pytest.raises(SystemExit, match="no such folder"):
        run(llama_dir, data8, tmp_path / "out2", *common, "--resume_from_checkpoint", tmp_path / "nope")


# ----------------------------------------------------------------------------------------------
# Item 10: a checkpoint save the disk refuses
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_checkpoint_save_under_a_file_size_limit(tmp_path, llama_dir, data8):  # noqa: F811
    common = [*NAIVE, "--save_strategy", "steps", "--save_steps", 1]
    out = tmp_path / "out"
    run(llama_dir, data8, out, *common, "--max_steps", 1)
    one = tree_digest(out / "checkpoint-1")
    size = ckpt.folder_bytes(out / "checkpoint-1")
    # the weights (~0.8 MB) no longer fit in one file: checkpoint-2's save fails
    proc = main_py(llama_dir, data8, out, *common, "--max_steps", 2, "--resume_from_checkpoint", "true",
                   fsize_kb=300)
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert f"error: saving {out / 'checkpoint-2'} failed: " in err, err[-3000:]
    assert "(ulimit -f 300)" in err and f"{out / 'checkpoint-2'} is marked incomplete (a resume skips it" in err
    assert f"The newest complete checkpoint, {out / 'checkpoint-1'}, is intact" in err
    needed = err.split("it needs about ")[1].split(",")[0]
    assert needed == f"{size / 1e6:.1f} MB", (needed, size)
    assert tree_digest(out / "checkpoint-1") == one and ckpt.read_marker(out / "checkpoint-2") is None
    # with room again, the run continues from checkpoint-1
    resumed = run(llama_dir, data8, out, *common, "--max_steps", 2, "--resume_from_checkpoint", "true")
    assert resumed.state.global_step == 2 and ckpt.checkpoint_problem(out / "checkpoint-2") is None

    # the final save of a run without checkpoints
    final = tmp_path / "final"
    proc = main_py(llama_dir, data8, final, *NAIVE, "--max_steps", 1, "--save_strategy", "no", fsize_kb=300)
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert f"error: saving the final output to {final} failed: " in err and "it needs about" in err, err[-3000:]
    assert f"The final output in {final} is marked incomplete. No complete checkpoint exists yet" in err
    assert ckpt.read_marker(final) is None


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv: chmod cannot "
                                                                               "forbid writes")
def test_a_read_only_output_folder_is_named_at_start(tmp_path, llama_dir, data8):  # noqa: F811
    out = tmp_path / "ro" / "out"
    run(llama_dir, data8, out, *NAIVE, "--max_steps", 1)
    before = tree_digest(tmp_path / "ro")
    for folder in (tmp_path / "ro", out):
        folder.chmod(0o555)
    try:
        for target in (out, tmp_path / "ro" / "new"):
            cmd = [sys.executable, str(ROOT / "main.py"), "--model_name_or_path", str(llama_dir), "--train_file",
                   str(data8), "--output_dir", str(target), *map(str, NAIVE), "--max_steps", "1"]
            if os.geteuid() == 0:
                cmd = ["setpriv", "--bounding-set=-dac_override", *cmd]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
            base = out if target == out else tmp_path / "ro"
            assert f"--output_dir {target}: {base} is not writable by this user" in proc.stderr, proc.stderr
    finally:
        for folder in (out, tmp_path / "ro"):
            folder.chmod(0o755)
    assert tree_digest(tmp_path / "ro") == before


@pytest.mark.slow
def test_sp2_checkpoint_resumed_with_sp1_on_two_ranks_is_refused_once(tmp_path, llama_dir):  # noqa: F811
    """The issue's case: an SP 2 checkpoint (1 pack per step on 2 ranks) resumed with SP 1 on 2 ranks (2 packs per
    step) skipped 10 of 28 packs; now it is refused, by rank 0 alone, before the model loads."""
    from tests.launch import free_port
    from tests.train.test_distributed import launch_ranks
    from tests.train.test_sequence_parallel import SHAPES

    data = write_task(tmp_path / "data", llama_dir, "llama3", max_length=64, shapes=SHAPES)
    common = ["--batch_method", "pack", "--per_device_train_batch_size", 1, "--learning_rate", 1e-2,
              "--deepspeed", ROOT / "ds_config" / "stage3.json", "--max_steps", 2]
    launch_ranks(2, llama_dir, data, tmp_path / "sp2", *common, "--sequence_parallel_size", 2, "--save_strategy",
                 "steps", "--save_steps", 1)
    before = tree_digest(tmp_path / "sp2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "main.py"), "--model_name_or_path", str(llama_dir),
           "--train_file", str(data), "--output_dir", str(tmp_path / "sp2"), "--report_to", "none",
           *map(str, common), "--max_steps", "4", "--sequence_parallel_size", "1", "--resume_from_checkpoint", "true"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = out.stdout + out.stderr
    assert out.returncode != 0 and "[rank" not in err, err[-4000:]
    assert err.count("this run would not continue the data where") == 1, err[-4000:]
    assert "this run takes 2 packs per optimizer step (2 data-parallel rank(s)" in err
    assert "the run it resumes took 1 (1 data-parallel rank(s) x 1 per device x 1 accumulation; 2 rank(s), " \
           "sequence_parallel_size 2)" in err, err[-4000:]
    assert tree_digest(tmp_path / "sp2") == before
