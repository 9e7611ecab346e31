"""scripts/sft.sh, the generic launch script: the commands it prints under DRY_RUN=1 (no GPU, nothing run).
Run: python -m pytest -q tests/test_sft_script.py
"""
import os
import shlex
import subprocess

from tests.test_quickstart import ROOT, dry_run, flag


def sft_steps(stdout: str) -> list[list[str]]:
    return [shlex.split(line[len("[sft] "):]) for line in stdout.splitlines() if line.startswith("[sft] ")]


def test_sft_script_prints_the_three_steps():
    stdout, cmd = dry_run("sft", MODEL="/models/glm-edge-4b-chat", DATA="chat.jsonl long.jsonl:500",
                          OUTPUT="/out/edge", TOKENIZED="/data/edge", MAX_LENGTH="8192", GRAD_ACC="2")
    pre, sort = sft_steps(stdout)
    assert pre[1] == "pre_tokenize.py" and flag(pre, "--template") == "auto"
    assert flag(pre, "--model_name_or_path") == "/models/glm-edge-4b-chat"
    assert pre[pre.index("--input") + 1:pre.index("--input") + 3] == ["chat.jsonl", "long.jsonl:500"]
    assert flag(pre, "--output_dir") == "/data/edge" and flag(pre, "--max_length") == "8192"
    assert sort[1:] == ["sort_and_group.py", "--train_file", "/data/edge", "--max_length", "8192",
                        "--group_size", "16"]  # 8 GPUs x 1 node x 1 per device x 2 accumulation
    assert cmd[:3] == ["deepspeed", "--num_gpus", "8"]
    assert "= 16 packs per optimizer step" in stdout and "data /data/edge" in stdout
    assert flag(cmd, "--model_name_or_path") == "/models/glm-edge-4b-chat" and flag(cmd, "--train_file") == "/data/edge"
    assert flag(cmd, "--output_dir") == "/out/edge" and flag(cmd, "--batch_method") == "pack"
    assert flag(cmd, "--deepspeed") == "ds_config/stage3.json" and flag(cmd, "--learning_rate") == "1e-5"
    assert "--use_lora" not in cmd and cmd[-2:] == ["--max_steps", "7"]


def test_sft_script_lora_template_and_train_only():
    stdout, cmd = dry_run("sft", MODEL="Qwen/Qwen3-4B", TEMPLATE="qwen3", USE_LORA="1", LORA_TARGETS="q_proj,v_proj",
                          BATCH_METHOD="naive")
    (pre,) = sft_steps(stdout)  # naive batches need no sort_and_group.py
    assert flag(pre, "--template") == "qwen3" and flag(pre, "--output_dir") == "data/sft/Qwen3-4B-qwen3"
    assert flag(cmd, "--use_lora") == "True" and flag(cmd, "--lora_target_modules") == "q_proj,v_proj"
    assert flag(cmd, "--deepspeed") == "ds_config/stage2.json" and flag(cmd, "--learning_rate") == "1e-4"
    assert flag(cmd, "--output_dir") == "output/sft/Qwen3-4B"
    stdout, _ = dry_run("sft", PREPARE="0", TOKENIZED="/data/ready")
    assert sft_steps(stdout) == [] and "data /data/ready" in stdout


def test_sft_script_sequence_parallel_groups_and_flag():
    """SP_SIZE=2 on 8 GPUs: 4 data-parallel groups, so sort_and_group packs for 4 x GRAD_ACC 2 = 8 per step."""
    stdout, cmd = dry_run("sft", SP_SIZE="2", GRAD_ACC="2", TOKENIZED="/data/edge", MAX_LENGTH="65536")
    pre, sort = sft_steps(stdout)
    assert sort[1:] == ["sort_and_group.py", "--train_file", "/data/edge", "--max_length", "65536",
                        "--group_size", "8"]
    assert flag(cmd, "--sequence_parallel_size") == "2" and "= 8 packs per optimizer step" in stdout


def test_sft_script_checks_the_launch_settings_before_preparing(tmp_path):
    """A bad SP_SIZE / BATCH_METHOD fails at once, with every problem, before pre_tokenize.py would run."""
    env = {**os.environ, "NUM_GPUS": "8", "SP_SIZE": "3", "BATCH_METHOD": "sort", "DATA": str(tmp_path / "x.jsonl"),
           "TOKENIZED": str(tmp_path / "tok")}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "sft.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "[sft] " not in out.stdout, out.stdout
    assert "SP_SIZE=3: NUM_GPUS x NUM_NODES = 8 x 1 = 8 processes must be a multiple of it" in out.stderr
    assert "SP_SIZE=3 needs BATCH_METHOD=pack" in out.stderr and not (tmp_path / "tok").exists()


def test_sft_script_precision_and_lora_defaults():
    """bf16 is main.py's choice unless BF16 says (no --bf16 True on a CPU); lora_alpha 16, main.py's default."""
    import main as train_main

    _, cmd = dry_run("sft", USE_LORA="1")
    assert "--bf16" not in cmd and flag(cmd, "--lora_alpha") == "16"
    assert train_main.parse_args(["--output_dir", "/tmp/x"])[2].lora_alpha == 16
    assert flag(dry_run("sft", BF16="1")[1], "--bf16") == "True" and flag(dry_run("sft", BF16="0")[1], "--bf16") == "False"
