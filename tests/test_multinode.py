"""Multi-node launch paths of the training scripts, as two "nodes" on loopback (one CPU rank each, gloo):

- `LAUNCHER=torchrun NUM_NODES=2 NODE_RANK=i MASTER_ADDR=127.0.0.1 scripts/glm4_longwriter.sh` (torchrun rendezvous)
- `LAUNCHER=deepspeed NO_SSH=1 HOSTFILE=... NODE_RANK=i scripts/glm4_longwriter.sh` (deepspeed launcher per node)

Both train the same tiny GLM-4 model two steps on the same packs with ZeRO-3 and must log the same losses; the same
two nodes run sequence parallelism across them and preference training (scripts/glm4_longwriter_dpo.sh).

    python -m pytest -q tests/test_multinode.py          # ~2 min on 2 CPU cores
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2


@pytest.fixture(scope="module")
def tiny_glm4_run(tmp_path_factory, glm4_tokenizer_dir):
    """A tiny GLM-4 model and its packed sample data (2 ranks)."""
    import pre_tokenize_glm4
    from longsft.data import sort_and_group
    from longsft.tiny.models import make_tiny_model

    root = tmp_path_factory.mktemp("multinode")
    model = make_tiny_model(root / "model", "glm4", glm4_tokenizer_dir)
    data = root / "data"
    pre_tokenize_glm4.main(["--model_name_or_path", str(model), "--input", str(ROOT / "data" / "sample.jsonl"),
                            "--output_dir", str(data), "--max_length", "512", "--truncate", "right",
                            "--num_proc", "1"])
    sort_and_group.main(["--train_file", str(data), "--max_length", "512", "--group_size", "2", "--no_plot"])
    return root, model, data


def run_two_nodes(root: Path, name: str, model: Path, data: Path,
                  batch: str = "1 CPU processes x 2 node(s) x 1 per device x 1 accumulation = 2 packs",
                  script: str = "glm4_longwriter.sh", **launch_env) -> list[float]:
    """Start both nodes of the script at once, wait for both, return the logged per-step losses."""
    out = root / name
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MODEL": str(model), "DATA": str(data), "OUTPUT": str(out), "NUM_GPUS": "1",
               "NUM_NODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "BF16": "0", "GRAD_CKPT": "0", "LR": "1e-3", "WARMUP": "0", "PYTHON": sys.executable, **launch_env}
        log = open(root / f"{name}.node{rank}.log", "w")
        procs.append((subprocess.Popen(
            ["bash", str(ROOT / "scripts" / script), "--max_steps", str(STEPS),
             "--save_strategy", "no", "--logging_steps", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True), log))
    try:
        for p, _ in procs:
            p.wait(timeout=300)
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
    logs = [(root / f"{name}.node{rank}.log").read_text() for rank in (0, 1)]
    codes = [p.returncode for p, _ in procs]
    assert codes == [0, 0], "\n".join(f"---- node {r} (exit {c}) ----\n{t[-4000:]}" for r, (c, t) in
                                       enumerate(zip(codes, logs)))
    assert f"global batch = {batch}" in logs[0], logs[0][-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert (out / "model.safetensors").is_file()  # ZeRO-3 weights gathered on save
    return [h for h in history if "loss" in h] if script.endswith("_dpo.sh") else \
        [h["loss"] for h in history if "loss" in h]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.skipif(_has_cuda(), reason="loopback 'nodes' are CPU ranks; on a GPU box each would take local GPU 0")
def test_two_nodes_torchrun_and_deepspeed_no_ssh(tiny_glm4_run):
    root, model, data = tiny_glm4_run
    torchrun = run_two_nodes(root, "torchrun", model, data, LAUNCHER="torchrun")
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names for this machine = two "nodes"
    ds = run_two_nodes(root, "deepspeed", model, data, LAUNCHER="deepspeed", NO_SSH="1", HOSTFILE=str(hostfile))
    assert len(torchrun) == STEPS and len(ds) == STEPS
    assert ds == pytest.approx(torchrun, rel=1e-5, abs=1e-5), (torchrun, ds)
    # the world really had 2 ranks on 2 nodes: each node's launcher started one process
    node1 = (root / "deepspeed.node1.log").read_text()
    assert "nnodes=2, num_local_procs=1, node_rank=1" in node1


@pytest.mark.slow
@pytest.mark.skipif(_has_cuda(), reason="loopback 'nodes' are CPU ranks; on a GPU box each would take local GPU 0")
def test_two_nodes_share_each_pack_with_sequence_parallelism(tiny_glm4_run):
    """SP_SIZE=2 across the two "nodes" (torchrun rendezvous): one sequence-parallel group spans both."""
    root, model, data = tiny_glm4_run
    sp = run_two_nodes(root, "torchrun_sp", model, data, LAUNCHER="torchrun", SP_SIZE="2",
                       batch="1 CPU processes x 2 node(s) / SP_SIZE 2 (ranks sharing each pack) x 1 per device x 1 "
                             "accumulation = 1 packs")
    assert len(sp) == STEPS and all(0 < x < 20 for x in sp)
    log = (root / "torchrun_sp.node0.log").read_text()
    assert "2 ranks = 1 data-parallel group(s) x 2 ranks sharing each pack" in log


@pytest.mark.slow
@pytest.mark.skipif(_has_cuda(), reason="loopback 'nodes' are CPU ranks; on a GPU box each would take local GPU 0")
def test_two_nodes_train_preference_pairs(tiny_glm4_run):
    """scripts/glm4_longwriter_dpo.sh on the two "nodes" (torchrun rendezvous): the reference log-probs are computed
    once before training, and each step logs the DPO loss and TRL's reward metrics over the pairs of both nodes."""
    import pre_tokenize_glm4
    from longsft.data import sort_and_group
    from longsft.tiny.preference_pairs import make_preference_pairs

    root, model, _ = tiny_glm4_run
    pairs = make_preference_pairs(root / "pairs.jsonl", num_pairs=8, seed=0, max_words=40)
    data = root / "pairs"
    pre_tokenize_glm4.main(["--stage", "dpo", "--model_name_or_path", str(model), "--input", str(pairs),
                            "--output_dir", str(data), "--max_length", "512", "--num_proc", "1"])
    sort_and_group.main(["--train_file", str(data), "--max_length", "512", "--group_size", "2", "--no_plot"])
    steps = run_two_nodes(root, "torchrun_dpo", model, data, script="glm4_longwriter_dpo.sh", LAUNCHER="torchrun")
    assert len(steps) == STEPS and all(0 < h["loss"] < 5 and 0 <= h["rewards/accuracies"] <= 1 for h in steps)
    log = (root / "torchrun_dpo.node0.log").read_text()
    assert "reference log-probs of the train pairs computed and stored" in log and (data / "ref_logps").is_dir()
