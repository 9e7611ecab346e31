"""Preference training is exact on any rank count, accumulation and sequence-parallel size: one SGD step on 2 or 4
real processes (torchrun, gloo on CPU; DDP or DeepSpeed ZeRO-2/3, Ulysses SP) gives the weights, the logged loss,
the logged TRL metrics and the evaluation of one process accumulating the same packs of pairs; and a resumed
ZeRO-3 run logs the uninterrupted run's losses.

Run: python -m pytest -q tests/train/test_dpo_distributed.py   (marked slow: about ten launches, ~10 minutes on 2 cores)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.train.test_distributed import eval_losses, launch_ranks
from tests.train.test_dpo import write_pair_task
from tests.train.test_run import EXACT, llama_dir, run  # noqa: F401 (fixture)
from tests.train.test_sequence_parallel import weight_errors

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")

# nproc, sequence-parallel size, DeepSpeed config (None: DDP), extra flags. One optimizer step over every pack: the
# one process accumulates them all, the ranks split them (data-parallel groups) or share each (SP groups).
CASES = {
    "ddp2-sigmoid-sft-frozen-copy": (2, 1, None, ["--dpo_sft_weight", 0.3]),
    "zero3-2-ipo-precomputed": (2, 1, "stage3", ["--dpo_loss", "ipo", "--precompute_ref_logps"]),
    "sp2-zero3-sigmoid-frozen-copy": (2, 2, "stage3", ["--dpo_sft_weight", 0.3, "--loss_chunk_size", 5]),
    "sp2dp2-zero2-precomputed": (4, 2, "stage2", ["--precompute_ref_logps", "--dpo_label_smoothing", 0.1]),
    "sp2-zero3-lora-adapters-gc": (2, 2, "stage3", ["--use_lora", "--lora_dropout", 0, "--gradient_checkpointing"]),
    "sp2dp2-zero3-simpo": (4, 2, "stage3", ["--dpo_loss", "simpo", "--dpo_beta", 2.0, "--simpo_gamma", 0.3,
                                            "--dpo_sft_weight", 0.5]),
    # LongWriter's configuration: ZeRO-3 with parameters and optimizer states offloaded to the CPU (the run's SGD
    # in place of the file's AdamW, so the one process can take the same step)
    "zero3offload-2-precomputed-sft": (2, 1, "stage3_offload", ["--precompute_ref_logps", "--dpo_sft_weight", 0.2]),
}


def _log(history: list[dict]) -> dict:
    (log,) = [h for h in history if "loss" in h and "train_loss" not in h]
    return log


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_and_sequence_parallel_equal_one_process(tmp_path, llama_dir, case):  # noqa: F811
    nproc, size, ds, flags = CASES[case]
    # (prompt, chosen, rejected): a pair filling a whole 64-token pack (it spans every SP shard), odd lengths
    shapes = [(8, 26, 22), (3, 9, 12), (5, 13, 7), (4, 20, 11), (6, 5, 8), (7, 14, 17), (3, 4, 6), (9, 12, 10)]
    data = write_pair_task(tmp_path / "pairs", llama_dir, shapes=shapes, max_length=64)
    val = write_pair_task(tmp_path / "val", llama_dir, n=5, seed=1, group=False)
    packs = int(json.loads((data / "packs" / "meta.json").read_text())["num_packs"])
    dp = nproc // size
    steps = packs + (-packs % dp)  # micro-batches of one pack (the ranks' share padded with target-free items)
    extra = EXACT + ["--stage", "dpo", "--dpo_beta", 0.5, "--learning_rate", 2.0, "--per_device_train_batch_size",
                     1, "--validation_file", val, *flags]
    one = run(llama_dir, data, tmp_path / "one", *extra, "--gradient_accumulation_steps", steps)
    launch = ["--gradient_accumulation_steps", steps // dp]
    if ds:
        config = ROOT / "ds_config" / f"{ds}.json"
        if ds == "stage3_offload":
            cfg = json.loads(config.read_text())
            cfg.pop("optimizer")
            cfg["zero_force_ds_cpu_optimizer"] = False  # let DeepSpeed offload a torch optimizer
            config = tmp_path / "offload_sgd.json"
            config.write_text(json.dumps(cfg))
        launch += ["--deepspeed", config]
    if size > 1:
        launch += ["--sequence_parallel_size", size]
    _, log = launch_ranks(nproc, llama_dir, data, tmp_path / "many", *extra, *launch)
    assert f"{nproc} rank(s)" in log or f"{dp} data-parallel group(s)" in log
    lora = "--use_lora" in flags
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    init = llama_dir
    if lora:  # the adapter before training: B = 0, A as peft initialises it with the seed
        init = tmp_path / "init"
        init.mkdir()
        w = load_file(str(tmp_path / "one" / name))
        save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in w.items()}, str(init / name))
    rel_w, rel_u = weight_errors(init, tmp_path / "one", tmp_path / "many", name)
    assert rel_w < 1e-5 and rel_u < 1e-3, (rel_w, rel_u)
    a = _log(one.state.log_history)
    state = json.loads((tmp_path / "many" / "trainer_state.json").read_text())
    b = _log(state["log_history"])
    assert abs(a["loss"] - b["loss"]) < 1e-5
    for k in METRICS:
        assert abs(a[k] - b[k]) < 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
    e1, e2 = eval_losses(one.state.log_history), eval_losses(state["log_history"])
    assert e1 and e2 and abs(e1[-1] - e2[-1]) < 1e-5
    pairs = [h["eval_pairs"] for h in state["log_history"] if "eval_pairs" in h]
    assert pairs and pairs[-1] == 5  # every validation pair once, none repeated to fill the ranks


def test_zero3_resume_computes_the_reference_from_the_initial_weights(tmp_path, llama_dir):  # noqa: F811
    """2 ranks, ZeRO-3, --precompute_ref_logps: resumed from its step-1 checkpoint with the stored log-probs deleted,
    the run computes them with the initial weights (before the checkpoint is loaded into the engine) and logs the
    uninterrupted run's losses."""
    data = write_pair_task(tmp_path / "pairs", llama_dir, n=12, max_length=64)
    common = ["--stage", "dpo", "--dpo_beta", 0.5, "--precompute_ref_logps", "--per_device_train_batch_size", 1,
              "--max_steps", 3, "--learning_rate", 0.5, "--optim", "sgd", "--deepspeed",
              ROOT / "ds_config" / "stage3.json"]
    full, log = launch_ranks(2, llama_dir, data, tmp_path / "full", *common, "--save_strategy", "steps",
                             "--save_steps", 1)
    assert "computed and stored" in log
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-1", tmp_path / "cut" / "checkpoint-1")
    shutil.rmtree(data / "ref_logps")
    resumed, _ = launch_ranks(2, llama_dir, data, tmp_path / "cut", *common, "--resume_from_checkpoint", "true")
    assert len(full) == len(resumed) == 3 and max(abs(a - b) for a, b in zip(full, resumed)) < 1e-6
    again, log = launch_ranks(2, llama_dir, data, tmp_path / "again", *common)
    assert "read from" in log and abs(again[0] - full[0]) < 1e-6
