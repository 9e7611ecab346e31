"""Exact loss across ranks: one SGD step on 2 real processes (torchrun, gloo on CPU) gives the weights and the
logged loss of one process accumulating the same packs, with DDP and with DeepSpeed ZeRO-3.

And a 2-rank ZeRO-3 run resumed from a checkpoint logs the same per-step losses as the uninterrupted one.
Run: python -m pytest -q tests/train/test_distributed.py  (marked slow: seven 2-process launches, ~3-4 minutes on 2 cores)
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.test_run import EXACT, llama_dir, losses, max_weight_diff, run, write_task  # noqa: F401 (fixture)
from longsft.tiny.models import make_tiny_model
from tests.launch import failure_text, free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def launch_two_ranks(model_dir, data, out, *extra):
    return launch_ranks(2, model_dir, data, out, *extra)


def launch_ranks(nproc: int, model_dir, data, out, *extra):
    """main.py on `nproc` real processes (torchrun, gloo on CPU); (logged losses, rank 0's output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "main.py"),
           "--model_name_or_path", str(model_dir), "--train_file", str(data), "--output_dir", str(out),
           "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
           *map(str, extra)]
    if "--save_strategy" not in cmd:
        cmd += ["--save_strategy", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + failure_text(proc.stderr)
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h], proc.stdout


def eval_losses(log_history) -> list[float]:
    return [h["eval_loss"] for h in log_history if "eval_loss" in h]


# zero3 also runs the loss in chunks of 5 tokens (different lm_head call counts on the two ranks; see the resume test);
# transformers' own classes with the packed forward (patch/modeling_native.py): qwen3 (tied embeddings), glm
# (GLM-Edge: partial interleaved RoPE, fused gate_up_proj), mistral (a 32-token sliding window under 64-token samples),
# qwen2 (q/k/v biases), glm4_0414 (GLM-4-0414: extra post-attention/post-MLP norms)
@pytest.mark.parametrize("engine,pack_loss,per_device,chunk,family", [
    ("ddp", True, 2, 1024, "llama3"), ("zero3", False, 1, 5, "llama3"), ("zero3", True, 1, 5, "qwen3"),
    ("zero3", False, 1, 5, "glm"), ("ddp", True, 2, 1024, "mistral"), ("ddp", False, 2, 1024, "qwen2"),
    ("zero3", True, 1, 5, "glm4_0414")])
def test_two_ranks_equal_one_rank_accumulating(tmp_path, request, engine, pack_loss, per_device, chunk, family):
    if family == "llama3":
        model_dir = request.getfixturevalue("llama_dir")
    else:
        model_dir = make_tiny_model(tmp_path / "model", family, request.getfixturevalue("llama3_tokenizer_dir"))
    template = None if family == "llama3" else "auto"
    data = write_task(tmp_path / "data", model_dir, family, n=24, max_length=64, template=template)
    val = write_task(tmp_path / "val", model_dir, family, n=7, seed=1, max_length=64, template=template)
    extra = EXACT + ["--batch_method", "pack", "--per_device_train_batch_size", per_device, "--validation_file", val,
                     "--loss_chunk_size", chunk]
    extra += ["--pack_loss"] if pack_loss else []
    one = run(model_dir, data, tmp_path / "one", *extra, "--gradient_accumulation_steps", 2)
    ds = ["--deepspeed", ROOT / "ds_config" / "stage3.json"] if engine == "zero3" else []
    two, log = launch_two_ranks(model_dir, data, tmp_path / "two", *extra, "--gradient_accumulation_steps", 1, *ds)
    assert "2 rank(s)" in log
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") < 1e-6
    assert len(two) == 1 and abs(two[0] - losses(one)[0]) < 1e-5  # the logged loss means the same
    # evaluation: the same exact mean over the whole validation set (no sample repeated to fill the ranks)
    state = json.loads((tmp_path / "two" / "trainer_state.json").read_text())
    e1, e2 = eval_losses(one.state.log_history), eval_losses(state["log_history"])
    assert e1 and e2 and abs(e1[-1] - e2[-1]) < 1e-5


def test_zero3_resume_logs_the_same_losses(tmp_path, llama_dir):  # noqa: F811
    """A 2-rank ZeRO-3 run resumed from its step-1 checkpoint (in a fresh folder) logs the same later losses."""
    data = write_task(tmp_path / "data", llama_dir, "llama3", n=24, max_length=64)
    # --loss_chunk_size 5: the ranks make different numbers of lm_head calls per step; from step 2 on (ZeRO-3
    # prefetches along the recorded trace) that hung before causal_lm_loss evened out the counts.
    # the DeepSpeed config has a top-level typo deepspeed would ignore silently: main.py names it
    ds_config = json.loads((ROOT / "ds_config" / "stage3.json").read_text())
    ds_config["steps_per_prnt"] = 10
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    common = ["--batch_method", "pack", "--pack_loss", "--per_device_train_batch_size", 1, "--max_steps", 3,
              "--learning_rate", 1e-3, "--deepspeed", tmp_path / "ds.json", "--loss_chunk_size", 5]
    full, log = launch_two_ranks(llama_dir, data, tmp_path / "full", *common, "--save_strategy", "steps",
                                 "--save_steps", 1)
    assert "never reads the key 'steps_per_prnt'" in log
    # every checkpoint was marked complete after both ranks wrote their ZeRO partitions
    for step in (1, 2, 3):
        marker = json.loads((tmp_path / "full" / f"checkpoint-{step}" / "save_complete.json").read_text())
        assert marker["complete"] and marker["global_step"] == step
        assert len(list((tmp_path / "full" / f"checkpoint-{step}").glob("global_step*/*optim_states.pt"))) == 2
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-1", tmp_path / "cut" / "checkpoint-1")
    # a save of step 2 cut short by a kill: skipped by the resume
    (tmp_path / "cut" / "checkpoint-2").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint-2" / "config.json", tmp_path / "cut" / "checkpoint-2")
    resumed, log = launch_two_ranks(llama_dir, data, tmp_path / "cut", *common, "--resume_from_checkpoint", "true")
    assert "skipping checkpoint-2" in log
    assert len(full) == 3 and len(resumed) == 3  # the resumed state keeps the history of step 1
    assert max(abs(a - b) for a, b in zip(full, resumed)) < 1e-6
