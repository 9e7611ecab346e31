"""The DPO launch scripts: scripts/glm4_longwriter_dpo.sh, llama3_longwriter_dpo.sh (their commands under DRY_RUN=1)
and `STAGE=dpo scripts/sft.sh` (its three commands, and one real run on a tiny model: generated pairs ->
pre_tokenize.py --stage dpo -> sort_and_group.py -> 2 processes of main.py --stage dpo under DeepSpeed ZeRO-3).

Run: python -m pytest -q tests/test_dpo_scripts.py   (the real run is marked slow: ~1-2 minutes on 2 cores)
"""
import json
import os
import subprocess

import pytest

from tests.test_quickstart import ROOT, dry_run, flag
from tests.test_sft_script import sft_steps
from tests.launch import failure_text, free_port


@pytest.mark.parametrize("family", ["glm4", "llama3"])
def test_longwriter_dpo_scripts(family):
    stdout, cmd = dry_run(f"{family}_longwriter_dpo")
    assert cmd[:3] == ["deepspeed", "--num_gpus", "8"] and "= 8 packs per optimizer step" in stdout
    assert flag(cmd, "--stage") == "dpo" and flag(cmd, "--batch_method") == "pack"
    assert flag(cmd, "--model_name_or_path") == f"output/{family}/longwriter"  # the SFT stage's output
    assert flag(cmd, "--train_file") == f"data/{family}/longwriter_dpo" and flag(cmd, "--deepspeed") == \
        "ds_config/stage3.json"
    assert flag(cmd, "--dpo_loss") == "sigmoid" and flag(cmd, "--dpo_beta") == "0.1"
    assert flag(cmd, "--precompute_ref_logps") == "True" and "--ref_model" not in cmd
    assert cmd[-2:] == ["--max_steps", "7"]
    _, cmd = dry_run(f"{family}_longwriter_dpo", PRECOMPUTE_REF="0", REF_MODEL="/models/ref", DPO_SFT_WEIGHT="0.2",
                     SP_SIZE="2")
    assert "--precompute_ref_logps" not in cmd and flag(cmd, "--ref_model") == "/models/ref"
    assert flag(cmd, "--dpo_sft_weight") == "0.2" and flag(cmd, "--sequence_parallel_size") == "2"
    _, cmd = dry_run(f"{family}_longwriter_dpo", DPO_LOSS="simpo", SIMPO_GAMMA="1.5", REF_MODEL="/models/ref")
    assert flag(cmd, "--simpo_gamma") == "1.5" and "--ref_model" not in cmd and "--precompute_ref_logps" not in cmd


def test_sft_script_stage_dpo():
    stdout, cmd = dry_run("sft", STAGE="dpo", MODEL="/models/sft", DATA="pairs.jsonl", USE_LORA="1",
                          DPO_SFT_WEIGHT="0.1")
    pre, sort = sft_steps(stdout)
    assert flag(pre, "--stage") == "dpo" and flag(pre, "--output_dir") == "data/dpo/sft-auto"
    assert sort[1] == "sort_and_group.py" and flag(sort, "--train_file") == "data/dpo/sft-auto"
    assert flag(cmd, "--stage") == "dpo" and flag(cmd, "--output_dir") == "output/dpo/sft"
    assert flag(cmd, "--learning_rate") == "5e-6" and flag(cmd, "--num_train_epochs") == "1"  # LoRA DPO defaults
    assert flag(cmd, "--precompute_ref_logps") == "True" and flag(cmd, "--dpo_sft_weight") == "0.1"
    stdout, _ = dry_run("sft", MODEL="/models/base")
    assert "--stage" not in stdout  # SFT's commands are unchanged
    out = subprocess.run(["bash", str(ROOT / "scripts" / "sft.sh")], env={**os.environ, "STAGE": "ppo"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "STAGE=ppo: use sft or dpo" in out.stderr


@pytest.mark.slow
def test_sft_script_stage_dpo_runs_on_a_tiny_model(tmp_path):
    """What the quickstart's STAGE=dpo runs, on a tiny Qwen2 (ChatML template, template auto)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for cmd in (["tools/make_tiny.py", "model", "--family", "qwen2", "--out", str(tmp_path / "model")],
                ["tools/make_tiny.py", "pairs", "--out", str(tmp_path / "pairs.jsonl"), "--num_pairs", "12",
                 "--max_words", "60"]):
        subprocess.run(["python3", *cmd], cwd=ROOT, env=env, check=True, capture_output=True)
    run_env = {**env, "STAGE": "dpo", "NUM_GPUS": "2", "MODEL": str(tmp_path / "model"),
               "DATA": str(tmp_path / "pairs.jsonl"), "TOKENIZED": str(tmp_path / "data"),
               "OUTPUT": str(tmp_path / "dpo"), "MAX_LENGTH": "512", "LR": "5e-4", "BF16": "0", "GRAD_CKPT": "0",
               "MASTER_PORT": str(free_port())}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "sft.sh"), "--max_steps", "2", "--disable_tqdm", "True"],
                         cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + failure_text(out.stderr)
    logs = json.loads((tmp_path / "dpo" / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in logs if "rewards/margins" in h]
    assert len(steps) == 2 and all("logps/chosen" in h for h in steps)
    assert (tmp_path / "data" / "ref_logps" / "logps.bin").is_file() and (tmp_path / "dpo" / "model.safetensors").is_file()
