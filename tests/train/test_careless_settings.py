"""Careless settings get one clear message naming the key (issue 21 items 8, 9, 15): DeepSpeed configs with "auto" or
text where numbers belong, YAML values of the wrong type (GLM-Edge's layout too), and every check done before torch
and transformers are imported; the sequence-parallel head rule printed once, by rank 0, under a heading about the model.
Run: python -m pytest -q tests/train/test_careless_settings.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import main as train_main
from longsft.train import setting_types
from tests.launch import free_port
from tests.train.test_run import llama_dir, write_task  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]


def start_error(argv, monkeypatch=None, world=None) -> str:
    """The message main.py's full start-up check stops with (and the early check's, which must be the same)."""
    if monkeypatch is not None and world is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as full:
        train_main.parse_args(list(map(str, argv)), check_start=True)
    with pytest.raises(SystemExit) as early:
        train_main.main(list(map(str, argv)))  # stops in the early check: nothing heavier runs
    assert isinstance(full.value.code, str) and early.value.code == full.value.code, (early.value.code,
                                                                                        full.value.code)
    return full.value.code


# ----------------------------------------------------------------------------------------------
# Item 8: DeepSpeed configs read defensively
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,named", [
    ({"zero_optimization": {"stage": "auto"}}, "zero_optimization.stage is 'auto': must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 3}, "sequence_parallel_size": "abc"},
     "sequence_parallel_size is 'abc': must be a whole number >= 1 or \"auto\""),
    ([{"zero_optimization": {"stage": 3}}], "a DeepSpeed config is a JSON object"),
    ({"zero_optimization": "3"}, "zero_optimization is '3': must be an object"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}}, "zero_optimization.offload_optimizer is 'cpu'"),
    ({"train_micro_batch_size_per_gpu": [1]}, "train_micro_batch_size_per_gpu is [1]"),
])
@pytest.mark.parametrize("sp", [1, 2])
def test_careless_deepspeed_configs_name_the_key(tmp_path, monkeypatch, config, named, sp):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(config))
    msg = start_error(["--deepspeed", ds, "--sequence_parallel_size", sp, "--batch_method", "pack",
                       "--output_dir", tmp_path / "o"], monkeypatch, world=2)
    assert f"--deepspeed {ds}: {named}" in msg and msg.count(named) == 1, msg
    assert "Error" not in msg and "invalid literal" not in msg


def test_unreadable_deepspeed_config(tmp_path, monkeypatch):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}')
    msg = start_error(["--deepspeed", ds, "--output_dir", tmp_path / "o"], monkeypatch, world=1)
    assert f"--deepspeed {ds}: cannot read it as a JSON DeepSpeed config" in msg, msg


# ----------------------------------------------------------------------------------------------
# Item 9: every config value's type, named by its config key
# ----------------------------------------------------------------------------------------------

def test_wrong_value_types_in_a_config_file_are_named(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("per_device_train_batch_size: [1, 2]\nlearning_rate: fast\npack_loss: maybe\n"
                   "num_train_epochs: 2\nsave_strategy: sometimes\nlora_r: 1.5\noutput_dir: {o}\n"
                   "warmup_steps: '0.03'\nlogging_steps: 5\n".format(o=tmp_path / "o"))
    msg = start_error([cfg])
    for expected in ("per_device_train_batch_size: [1, 2] is not a whole number",
                     "learning_rate: 'fast' is not a number", "pack_loss: 'maybe' is not true or false",
                     "save_strategy: 'sometimes' is not one of no, steps, epoch, best", "lora_r: 1.5 is not a whole"):
        assert f"config file {cfg}: {expected}" in msg, msg
    assert "num_train_epochs" not in msg and "warmup_steps" not in msg and "logging_steps" not in msg

    # converted where the value means the same: "0.03" for a number, 600 for a checkpoint name, a list of modules
    cfg.write_text("warmup_steps: '0.03'\nresume_from_checkpoint: 600\nlora_target_modules: [q_proj, v_proj]\n"
                   "learning_rate: 1e-5\nbf16: 0\n")
    model, _, lora, args = train_main.parse_args([str(cfg)])
    assert args.warmup_steps == 0.03 and args.resume_from_checkpoint == "600" and args.learning_rate == 1e-5
    assert lora.lora_target_modules == "q_proj,v_proj" and args.bf16 is False


def test_glm_edge_config_values_are_named_by_their_glm_edge_key(tmp_path):
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("max_input_length: '128'\nmax_output_length: 512\n"
                   "training_args:\n  output_dir: {o}\n  per_device_train_batch_size: [1, 2]\n"
                   "peft_config:\n  peft_type: LORA\n  r: four\n  lora_dropout: high\n"
                   "data_config:\n  train_file: [a, b]\n".format(o=tmp_path / "o"))
    msg = start_error([cfg])
    where = f"config file {cfg}"
    for expected in (f"{where} (GLM-Edge layout): max_input_length: '128' is not a whole number > 0",
                     f"{where}: training_args.per_device_train_batch_size: [1, 2] is not a whole number",
                     f"{where}: peft_config.r: 'four' is not a whole number",
                     f"{where}: peft_config.lora_dropout: 'high' is not a number",
                     f"{where} (GLM-Edge layout): data_config.train_file: ['a', 'b'] is not a folder path"):
        assert expected in msg, msg
    assert "--lora_r" not in msg and "usage:" not in msg


def test_coerce_kinds():
    kind = setting_types.kind_of_hint
    assert setting_types.coerce("3", kind(int)) == (True, 3)
    assert setting_types.coerce(True, kind(int))[0] is False and setting_types.coerce(2.0, kind(int)) == (True, 2)
    assert setting_types.coerce(None, kind(int | None)) == (True, None)
    assert setting_types.coerce(None, kind(int)) == (False, "a whole number")
    assert setting_types.coerce({"a": 1}, kind(dict | str | None)) == (True, {"a": 1})
    assert setting_types.coerce("tensorboard", kind(None | str | list[str])) == (True, "tensorboard")
    assert setting_types.coerce(["a", 1], kind(list[str])) == (True, ["a", "1"])
    assert setting_types.coerce(["a", {"b": 1}], kind(list[str]))[0] is False


# ----------------------------------------------------------------------------------------------
# Item 15: the checks before the heavy imports are the full ones
# ----------------------------------------------------------------------------------------------

def test_the_early_parser_has_hf_argparsers_flags():
    """Option strings, destinations, value counts, constants and choices of every flag: the parser built from the source
    of the installed transformers (no import) against HfArgumentParser on the imported classes."""
    def table(parser):
        return {o: (a.dest, a.nargs, a.const, tuple(map(str, a.choices or ()))) for a in parser._actions
                for o in a.option_strings if o not in ("-h", "--help")}

    from longsft.train.arguments import OUR_CLASSES  # ours (with the preference flags), as early_checks.py reads them

    specs = [s for cls in OUR_CLASSES for s in setting_types.dataclass_specs(cls)]
    early = table(setting_types.lenient_parser(specs + setting_types.training_argument_specs()))
    full = table(train_main.make_parser())
    assert early.keys() == full.keys() and len(early) > 200
    assert {k: v[:3] for k, v in early.items()} == {k: v[:3] for k, v in full.items()}
    # choices: the same, except where the source computes them (log_level: a dict's keys): the full check's then
    differ = sorted(k for k in early if early[k][3] != full[k][3])
    assert all(early[k][3] == () for k in differ) and len(differ) <= 4, differ


@pytest.mark.parametrize("argv", [
    ["--pack_los"], ["--learning_rat", "1e-5"], ["--max_steps", "0", "--output_dir", "o"],
    ["--per_device_train_batch_size", "0", "--gradient_accumulation_steps", "-1", "--lora_r", "0", "--use_lora"],
    ["--output_dir", "o", "--model_name_or_path", "/no/such/model", "--train_file", "/no/such/data"],
    ["--batch_method", "naive", "--sequence_parallel_size", "2", "--output_dir", "o"],
])
def test_early_and_full_checks_agree(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    start_error(argv)


def test_a_typo_fails_before_torch_is_imported(tmp_path):
    code = ("import sys, main\n"
            "try:\n    main.main(['--pack_los', '--output_dir', 'o'])\n"
            "except SystemExit as e:\n    print(repr(e.code))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert "unrecognized arguments ['--pack_los']" in lines[0] and lines[-1] == "[]", out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------
# Item 15: the head rule under sequence parallelism, printed once, about the model
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_head_rule_is_printed_once_under_a_heading_about_the_model(tmp_path, llama_dir):  # noqa: F811
    model = tmp_path / "model"
    model.mkdir()
    for f in Path(llama_dir).iterdir():
        (model / f.name).symlink_to(f)
    config = json.loads((Path(llama_dir) / "config.json").read_text())
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps({**config, "num_attention_heads": 1, "num_key_value_heads": 1}))
    data = write_task(tmp_path / "data", llama_dir, "llama3", n=6, max_length=64)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "main.py"), "--model_name_or_path", str(model),
           "--train_file", str(data), "--output_dir", str(tmp_path / "out"), "--batch_method", "pack",
           "--sequence_parallel_size", "2", "--deepspeed", str(ROOT / "ds_config" / "stage3.json"),
           "--report_to", "none", "--max_steps", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = out.stdout + out.stderr
    assert out.returncode != 0 and "[rank" not in err and "longsft/" not in err, err[-4000:]  # no rank's traceback
    # (torchrun itself ends with its own ChildFailedError summary whenever a rank exits with an error)
    heading = f"error: the model {model} cannot be shared by 2 sequence-parallel ranks:"
    assert err.count(heading) == 1 and err.count("the model has 1 attention heads, which 2 ranks cannot") == 1, \
        err[-4000:]
    assert "the training data cannot be used" not in err and not (tmp_path / "out").exists()
