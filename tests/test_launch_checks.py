"""The launch scripts refuse what would launch a broken job (issue 21 items 13, 14): zero GPUs, accumulation steps or
per-device batch (deepspeed reads --num_gpus 0 as every GPU), and a MODEL that is not a model folder, before
anything is launched or created. Real bash runs of the scripts (DRY_RUN=1 where only the checks matter).
Run: python -m pytest -q tests/test_launch_checks.py
"""
import os
import subprocess
from pathlib import Path

import pytest

from longsft.data import sort_and_group
from tests.data.test_sort_and_group import write_dataset
from tests.test_quickstart import dry_run, launch_fails

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["glm4_longwriter", "llama3_longwriter_lora", "chatglm_pack", "llama_sort", "sft"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_zero_gpus_accumulation_or_batch_are_refused(script):
    for var, what in (("NUM_GPUS", "processes per node (deepspeed --num_gpus 0 would mean every GPU"),
                      ("GRAD_ACC", "micro-steps per optimizer step"),
                      ("PER_DEVICE_BATCH", "packs or samples per GPU per micro-step")):
        err = launch_fails(script, **{var: "0"})
        assert f"{var}=0: must be at least 1 ({what}" in err, err
    err = launch_fails(script, NUM_GPUS="0", GRAD_ACC="0", PER_DEVICE_BATCH="0")  # all of them at once
    assert err.count("must be at least 1") == 3 and "global batch" not in err
    stdout, cmd = dry_run(script, NUM_GPUS="1", GRAD_ACC="1", PER_DEVICE_BATCH="1")  # 1 is fine
    assert cmd[:3] == ["deepspeed", "--num_gpus", "1"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    data = tmp_path_factory.mktemp("packed") / "data"
    write_dataset(data, [20] * 16)
    sort_and_group.main(["--train_file", str(data), "--max_length", "64", "--group_size", "1", "--plot", "false"])
    return data


@pytest.mark.parametrize("model", ["README.md", "missing_folder", "ds_config"])
def test_a_model_that_is_not_a_model_folder_fails_before_the_launch(tmp_path, packed, model):
    out = tmp_path / "out" / "pack"
    env = {**os.environ, "MODEL": model, "DATA": str(packed), "OUTPUT": str(out), "NUM_GPUS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "llama_pack.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and " main.py " not in proc.stdout, proc.stdout + proc.stderr
    expected = {"README.md": "MODEL=README.md: not a folder", "missing_folder": "MODEL=missing_folder: no such folder",
                "ds_config": "MODEL=ds_config: no config.json in the folder"}[model]
    assert expected in proc.stderr and "DATA=" not in proc.stderr, proc.stderr  # the data is fine
    assert not (tmp_path / "out").exists()  # nothing created
