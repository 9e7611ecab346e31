"""How main.py ends a multi-process run (longsft.train.run.shutdown_distributed): all ranks leave together, then exit
without Python's finalization, after what a normal exit does (non-daemon threads joined, atexit handlers run, streams
flushed); a single process returns as usual.
Run: python -m pytest -q tests/train/test_shutdown.py  (one 2-process torchrun launch, a few seconds)
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.launch import failure_text, free_port

ROOT = Path(__file__).resolve().parents[2]

RANK_SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    import torch.distributed as dist
    from longsft.train.run import shutdown_distributed

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    HELD = dist.group.WORLD  # what DeepSpeed does: a module global keeps the group after destroy_process_group
    atexit.register(lambda: print(f"atexit ran on rank {rank}", flush=True))
    threading.Thread(target=lambda: (time.sleep(0.3), print(f"thread finished on rank {rank}", flush=True))).start()
    sys.stdout.write(f"unflushed text of rank {rank}\\n")  # a pipe: block-buffered until the exit flushes it
    shutdown_distributed()
    print(f"after shutdown on rank {rank}", flush=True)
""")


def test_ranks_exit_after_a_normal_exits_work(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + failure_text(proc.stderr)
    for rank in (0, 1):
        for line in (f"atexit ran on rank {rank}", f"thread finished on rank {rank}", f"unflushed text of rank {rank}"):
            assert line in proc.stdout, (line, proc.stdout)
    assert "after shutdown" not in proc.stdout


def test_a_single_process_returns(monkeypatch):
    from longsft.train.run import shutdown_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert shutdown_distributed() is None  # no process group, no launcher: nothing to do, no exit
