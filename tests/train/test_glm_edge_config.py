"""GLM-Edge's finetune.py workflow in main.py: its YAML layout (settings.glm_edge_settings) and resume by
`yes` or by a checkpoint number (checkpoints.resume_request).
Run: python -m pytest -q tests/train/test_glm_edge_config.py
"""
import json
import logging

import pytest

from longsft.train import checkpoints as ckpt
import main as train_main
from tests.train.test_run import StopAt, glm_dir, llama_dir, losses, run, write_task  # noqa: F401 (fixtures)

# The layout of GLM-Edge's finetune/configs/lora.yaml (sections, key names), values of our own.
GLM_EDGE_YAML = """\
data_config:
  train_file: {train}
  val_file: {val}
  test_file: {val}
  num_proc: 4

max_input_length: 1024
max_output_length: 512

training_args:
  # Seq2SeqTrainingArguments keys
  output_dir: {out}
  max_steps: 4
  learning_rate: 5.0e-3
  per_device_train_batch_size: 2
  dataloader_num_workers: 0
  remove_unused_columns: false
  save_strategy: steps
  save_steps: 2
  log_level: info
  logging_strategy: steps
  logging_steps: 1
  per_device_eval_batch_size: 2
  eval_strategy: "no"
  predict_with_generate: true
  generation_config:
    max_new_tokens: 64
peft_config:
  peft_type: LORA
  task_type: CAUSAL_LM
  r: 4
  lora_alpha: 16
  lora_dropout: 0.0
  target_modules: ["q_proj", "v_proj"]
"""


def write_config(path, **values):
    path.write_text(GLM_EDGE_YAML.format(**values))
    return path


def test_glm_edge_yaml_maps_onto_main_flags(tmp_path, caplog):
    (tmp_path / "tok-train").mkdir()
    (tmp_path / "tok-val").mkdir()
    cfg = write_config(tmp_path / "lora.yaml", train=tmp_path / "tok-train", val=tmp_path / "tok-val",
                       out=tmp_path / "out")
    caplog.set_level(logging.WARNING, logger="longsft.train")
    m, d, lora, args = train_main.parse_args([str(cfg), "--model_name_or_path", "/m", "--learning_rate", "1e-4"])
    assert (d.train_file, d.validation_file) == (str(tmp_path / "tok-train"), str(tmp_path / "tok-val"))
    assert (lora.use_lora, lora.lora_r, lora.lora_alpha, lora.lora_dropout) == (True, 4, 16, 0.0)
    assert lora.lora_target_modules == "q_proj,v_proj"
    assert (args.output_dir, args.max_steps, args.per_device_train_batch_size) == (str(tmp_path / "out"), 4, 2)
    assert (args.save_steps, args.logging_steps, args.learning_rate) == (2, 1, 1e-4)  # flags override the file
    log = "\n".join(r.getMessage() for r in caplog.records)
    # GLM-Edge's predict_with_generate on its test_file: main.py's --test_file, with generation_config's budget
    assert (d.test_file, d.test_max_new_tokens) == (str(tmp_path / "tok-val"), 64)
    for note in ("data_config.num_proc ignored", "pre_tokenize.py's --num_proc",
                 "--max_length (max_input_length + max_output_length = 1536)"):
        assert note in log, log
    assert "predict_with_generate" not in log and "generation_config" not in log, log


def test_glm_edge_yaml_problems_are_collected(tmp_path):
    raw = tmp_path / "train.jsonl"
    raw.write_text('{"messages": []}\n')
    text = GLM_EDGE_YAML.format(train=raw, val="dev.jsonl", out=tmp_path / "out")
    text = text.replace("peft_type: LORA", "peft_type: PREFIX_TUNING").replace("task_type: CAUSAL_LM",
                                                                             "task_type: SEQ_2_SEQ_LM")
    text = text.replace("  log_level: info\n", "  log_level: info\n  not_a_setting: 1\n") + "  bias: all\n"
    text = text.replace("max_new_tokens: 64", "max_new_tokens: lots")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text + "gradient_accumulation_steps: 0\n")
    with pytest.raises(SystemExit) as e:
        train_main.parse_args([str(cfg), "--model_name_or_path", "/m"])
    msg = str(e.value)
    for expected in (f"data_config.train_file {raw} is a raw chat file", "python pre_tokenize.py "
                     f"--model_name_or_path MODEL --input {raw} --output_dir DIR", "set data_config.train_file: DIR",
                     "data_config.val_file dev.jsonl is a raw chat file",
                     "peft_config.peft_type PREFIX_TUNING: main.py trains LORA adapters only",
                     "peft_config.task_type SEQ_2_SEQ_LM", "training_args.not_a_setting: not a TrainingArguments",
                     "peft_config.bias: not supported", "--gradient_accumulation_steps 0: must be at least 1",
                     "training_args.generation_config.max_new_tokens: 'lots' is not a whole number"):
        assert expected in msg, msg
    assert msg.startswith("main.py cannot start:")  # one error, with main.py's own setting problems


def test_resume_by_checkpoint_number(tmp_path, llama_dir, caplog):  # noqa: F811
    data = write_task(tmp_path / "data", llama_dir, "llama3", n=8, group=False)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "lora.yaml", train=data, val=data, out=out).read_text()
    cfg = cfg.replace("  val_file: {}\n  test_file: {}\n".format(data, data), "")
    (tmp_path / "lora.yaml").write_text(cfg)
    base = [str(tmp_path / "lora.yaml"), "--model_name_or_path", str(llama_dir), "--report_to", "none",
            "--disable_tqdm", "true", "--seed", "0"]
    first = train_main.main(base, callbacks=[StopAt(2)])
    assert first.state.global_step == 2 and (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()

    # a number with no such checkpoint: one start-up problem naming what the folder has
    with pytest.raises(SystemExit, match=r"--resume_from_checkpoint 6: no checkpoint-6 folder in --output_dir "
                                         r".* \(it has checkpoint-2\)"):
        train_main.main(base + ["--resume_from_checkpoint", "6"])
    # the same completeness check as a path: an interrupted save is refused
    ckpt.mark_in_progress(out / "checkpoint-2")
    with pytest.raises(SystemExit, match=r"--resume_from_checkpoint .*checkpoint-2: incomplete"):
        train_main.main(base + ["--resume_from_checkpoint", "2"])
    ckpt.write_marker(out / "checkpoint-2", **{k: v for k, v in ckpt.read_raw_marker(out / "checkpoint-2").items()
                                               if k != "complete"})

    caplog.set_level(logging.INFO, logger="longsft.train")
    resumed = train_main.main(base + ["--resume_from_checkpoint", "2"])
    assert resumed.state.global_step == 4 and losses(resumed)[:2] == losses(first)  # the log carries on
    settings = json.loads((out / ckpt.SETTINGS_FILE).read_text())
    assert settings["resolved"]["resume_from_checkpoint"] == str(out / "checkpoint-2")
    assert (out / "checkpoint-4").is_dir() and ckpt.read_marker(out)["global_step"] == 4
    # yes = true: the run is finished, nothing to do
    assert train_main.main(base + ["--resume_from_checkpoint", "yes"]) is None
    assert ckpt.resume_request("yes") == "latest" and ckpt.resume_request("0") is None
    assert ckpt.resume_request("2", str(out)) == str(out / "checkpoint-2")
