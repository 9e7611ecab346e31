"""main.py's safety: interrupted saves, finished runs, the user's folders, bad model folders and settings, typos.

Each test leaves on disk what a crash or a user leaves (a half-written checkpoint, a finished run, a folder of
the user's), runs main.py on tiny models (CPU, seconds) and checks that nothing is lost and the message is clear.
Run: python -m pytest -q tests/train/test_safety.py
"""
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from longsft.train import checkpoints as ckpt
import main as train_main
from longsft.train import model as train_model
from longsft.train import settings
from tests.train.test_run import StopAt, glm_dir, llama_dir, losses, run, write_task  # noqa: F401 (fixtures)

NAIVE = ["--batch_method", "naive", "--per_device_train_batch_size", 2, "--learning_rate", 5e-3]


def tree_digest(folder: Path) -> dict:
    """{relative path: sha256} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data8(tmp_path_factory, llama_dir):  # noqa: F811
    return write_task(tmp_path_factory.mktemp("data8") / "data", llama_dir, "llama3", n=8, group=False)


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# Interrupted saves and resume (issue 14, items 2 and 3)
# ----------------------------------------------------------------------------------------------

def test_resume_skips_a_half_written_checkpoint(tmp_path, llama_dir, data8, caplog):  # noqa: F811
    common = [*NAIVE, "--max_steps", 6, "--save_strategy", "steps", "--save_steps", 3]
    full = losses(run(llama_dir, data8, tmp_path / "full", *common))
    cut = tmp_path / "cut"
    run(llama_dir, data8, cut, *common, callbacks=[StopAt(3)])
    marker = json.loads((cut / "checkpoint-3" / ckpt.MARKER).read_text())
    assert marker["complete"] is True and marker["global_step"] == 3 and marker["run_id"]
    # killed while saving checkpoint-6: only its config.json was written
    (cut / "checkpoint-6").mkdir()
    shutil.copy(cut / "checkpoint-3" / "config.json", cut / "checkpoint-6" / "config.json")
    assert ckpt.choose_checkpoint(cut)[0].name == "checkpoint-3"

    caplog.set_level(logging.INFO, logger="longsft.train")
    again = losses(run(llama_dir, data8, cut, *common, "--resume_from_checkpoint", "true"))
    log = messages(caplog)
    assert "skipping checkpoint-6" in log and "no trainer_state.json" in log and "resuming from" in log
    np.testing.assert_allclose(again, full, rtol=0, atol=1e-6)
    # the resumed run saved checkpoint-6 whole, of the same run
    six = json.loads((cut / "checkpoint-6" / ckpt.MARKER).read_text())
    assert six["global_step"] == 6 and six["run_id"] == marker["run_id"]
    assert ckpt.checkpoint_problem(cut / "checkpoint-6") is None
    final = json.loads((cut / ckpt.MARKER).read_text())
    assert final["kind"] == "final" and final["global_step"] == 6 and "model.safetensors" in final["outputs"]


def test_a_save_cut_short_never_looks_complete(tmp_path, llama_dir, data8):  # noqa: F811
    """Stop a real save half-way (after the weights, before the optimizer): the folder has no marker."""
    import transformers

    from longsft.train.trainer import TrainerNoShuffle

    class KilledDuringSave(TrainerNoShuffle):
        def _save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step == 4:
                raise KeyboardInterrupt("killed while saving")
            super()._save_optimizer_and_scheduler(output_dir)

    model = train_model.model_class("llama").from_pretrained(llama_dir)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2,
                                          max_steps=6, save_strategy="steps", save_steps=2, report_to="none",
                                          use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    from longsft.train.batches import LMDataset, make_collator

    trainer = KilledDuringSave(model=model, args=args, train_dataset=LMDataset(data8), batch_method="naive",
                               data_collator=make_collator("naive", 0))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    four = tmp_path / "o" / "checkpoint-4"
    marker = json.loads((four / ckpt.MARKER).read_text())  # ours (the run's id), and visibly not complete
    assert (four / "config.json").is_file() and marker["complete"] is False and marker["run_id"] == trainer.run_id
    assert ckpt.read_marker(four) is None and "interrupted" in ckpt.checkpoint_problem(four)
    chosen, skipped = ckpt.choose_checkpoint(tmp_path / "o")
    assert chosen.name == "checkpoint-2" and [name for name, _ in skipped] == ["checkpoint-4"]


def test_resuming_a_finished_run_does_nothing(tmp_path, llama_dir, data8, caplog):  # noqa: F811
    # 4 steps per epoch, max_steps 6: a resumed step-6 checkpoint sits mid-epoch (transformers ran one more step)
    common = [*NAIVE, "--max_steps", 6, "--save_strategy", "steps", "--save_steps", 4]
    out = tmp_path / "out"
    first = run(llama_dir, data8, out, *common)
    assert first.state.global_step == 6 and (out / "checkpoint-6").is_dir()
    before = tree_digest(out)
    caplog.set_level(logging.INFO, logger="longsft.train")
    assert run(llama_dir, data8, out, *common, "--resume_from_checkpoint", "true") is None
    assert "nothing to do" in messages(caplog)
    assert tree_digest(out) == before  # the final model, its state and the checkpoints: untouched

    # killed during the final save: the step-6 checkpoint is complete, the final output is not
    ckpt.mark_in_progress(out)
    (out / "model.safetensors").unlink()
    resumed = run(llama_dir, data8, out, *common, "--resume_from_checkpoint", "true")
    assert resumed.state.global_step == 6 and len(losses(resumed)) == 6  # no 7th step
    assert "nothing left to train" in messages(caplog)
    assert ckpt.read_marker(out)["global_step"] == 6 and (out / "model.safetensors").is_file()
    assert train_model.model_class("llama").from_pretrained(out) is not None


# ----------------------------------------------------------------------------------------------
# The user's folders (item 5, and item 1's rule for --output_dir)
# ----------------------------------------------------------------------------------------------

def test_output_dir_never_the_model_folder(tmp_path, llama_dir, data8):  # noqa: F811
    model = Path(shutil.copytree(llama_dir, tmp_path / "model"))
    before = tree_digest(model)
    for out, word in ((model, "is"), (model / "run", "is inside"), (tmp_path, "contains")):
        with pytest.raises(SystemExit, match=re.escape(f"--output_dir {out} {word} the --model_name_or_path folder")):
            run(model, data8, out, *NAIVE, "--max_steps", 1)
    assert tree_digest(model) == before


def test_output_dir_with_the_users_files_is_refused(tmp_path, llama_dir, data8):  # noqa: F811
    mine = tmp_path / "mine"
    (mine / "figures").mkdir(parents=True)
    (mine / "thesis.tex").write_text("my thesis")
    (mine / "checkpoint-7").mkdir()
    (mine / "checkpoint-7" / "notes.txt").write_text("my own checkpoint")
    before = tree_digest(mine)
    with pytest.raises(SystemExit, match="already holds checkpoints .*checkpoint-7"):
        run(llama_dir, data8, mine, *NAIVE, "--max_steps", 1)
    shutil.rmtree(mine / "checkpoint-7")
    with pytest.raises(SystemExit, match=r"holds files main.py did not write \(figures, thesis.tex\)"):
        run(llama_dir, data8, mine, *NAIVE, "--max_steps", 1)
    assert tree_digest(mine) == {k: v for k, v in before.items() if not k.startswith("checkpoint-7")}

    # an earlier run's output folder may be trained into again, but not once the user added a file to it
    out = tmp_path / "out"
    run(llama_dir, data8, out, *NAIVE, "--max_steps", 1)
    run(llama_dir, data8, out, *NAIVE, "--max_steps", 2)
    assert ckpt.read_marker(out)["global_step"] == 2
    (out / "NOTES.md").write_text("what I saw")
    with pytest.raises(SystemExit, match=r"did not write \(NOTES.md\)"):
        run(llama_dir, data8, out, *NAIVE, "--max_steps", 1)


def test_save_total_limit_rotates_only_this_runs_checkpoints(tmp_path, llama_dir, data8):  # noqa: F811
    common = [*NAIVE, "--max_steps", 5, "--save_strategy", "steps", "--save_steps", 1, "--save_total_limit", 1]
    out = tmp_path / "out"
    run(llama_dir, data8, out, *common, callbacks=[StopAt(2)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # its own checkpoint-1 rotated
    # the user puts checkpoints of their own next to it: one by hand, one from another main.py run
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "notes.txt").write_text("mine")
    other = tmp_path / "other"
    run(llama_dir, data8, other, *NAIVE, "--max_steps", 1, "--save_strategy", "steps", "--save_steps", 1)
    shutil.copytree(other / "checkpoint-1", out / "checkpoint-0")
    mine = {name: tree_digest(out / name) for name in ("checkpoint-0", "checkpoint-1")}
    run(llama_dir, data8, out, *common, "--resume_from_checkpoint", "true")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-1", "checkpoint-5"]
    assert {name: tree_digest(out / name) for name in mine} == mine


def test_resume_never_saves_into_another_runs_checkpoint(tmp_path, llama_dir, data8):  # noqa: F811
    common = [*NAIVE, "--max_steps", 5, "--save_strategy", "steps", "--save_steps", 2]
    out, other = tmp_path / "out", tmp_path / "other"
    run(llama_dir, data8, out, *common, callbacks=[StopAt(2)])
    run(llama_dir, data8, other, *common, callbacks=[StopAt(4)])
    shutil.copytree(other / "checkpoint-4", out / "checkpoint-4")  # another program's: no marker
    (out / "checkpoint-4" / ckpt.MARKER).unlink()
    before = tree_digest(out / "checkpoint-4")
    with pytest.raises(SystemExit, match="checkpoint-4 belong to another run or program"):
        run(llama_dir, data8, out, *common, "--resume_from_checkpoint", "true")
    assert tree_digest(out / "checkpoint-4") == before


# ----------------------------------------------------------------------------------------------
# Bad model folders (item 9), numeric settings (item 10), messages (item 15)
# ----------------------------------------------------------------------------------------------

def broken_models(base: Path, root: Path) -> list[tuple[Path, str]]:
    cases = []
    for name, what in (("no_config", "no config.json"), ("bad_config", "config.json is not valid JSON"),
                       ("no_weights", "no weights"), ("truncated", "model.safetensors is truncated")):
        d = Path(shutil.copytree(base, root / name))
        if name == "no_config":
            (d / "config.json").unlink()
        elif name == "bad_config":
            (d / "config.json").write_text('{"model_type": "llama",')
        elif name == "no_weights":
            (d / "model.safetensors").unlink()
        else:
            w = (d / "model.safetensors").read_bytes()
            (d / "model.safetensors").write_bytes(w[: len(w) // 2])
        cases.append((d, what))
    return cases


def test_bad_model_folders_give_one_clear_message(tmp_path, llama_dir, data8):  # noqa: F811
    for model, what in broken_models(Path(llama_dir), tmp_path):
        with pytest.raises(SystemExit) as e:
            run(model, data8, tmp_path / "out", *NAIVE, "--max_steps", 1)
        assert f"--model_name_or_path {model}: {what}" in str(e.value), str(e.value)
        assert not (tmp_path / "out").exists()


def test_numeric_settings_are_checked_together_before_loading(tmp_path, data8):
    bad = {"--per_device_train_batch_size": 0, "--gradient_accumulation_steps": 0, "--loss_chunk_size": 0,
           "--learning_rate": -1, "--save_steps": 0, "--logging_steps": 0}
    argv = [x for kv in bad.items() for x in kv] + ["--save_strategy", "steps"]
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "no_model", data8, tmp_path / "out", *argv)
    msg = str(e.value)
    for flag, value in bad.items():
        assert f"{flag} {value}" in msg, msg
    assert f"--model_name_or_path {tmp_path / 'no_model'}" in msg  # collected with the other problems
    for epochs, max_steps in ((0, -1), (-1, -1)):
        with pytest.raises(SystemExit, match="trains nothing"):
            train_main.parse_args(["--num_train_epochs", str(epochs), "--max_steps", str(max_steps)])
    with pytest.raises(SystemExit, match="--max_steps 0 trains nothing"):
        train_main.parse_args(["--max_steps", "0"])
    assert settings.setting_problems(train_main.make_parser().parse_args([])) == []


def test_train_file_given_a_jsonl_and_the_missing_packs_message(tmp_path, llama_dir, data8):  # noqa: F811
    raw = tmp_path / "train.jsonl"
    raw.write_text('{"messages": []}\n')
    with pytest.raises(SystemExit, match=r"--train_file .*train.jsonl is a file; .* pre_tokenize"):
        run(llama_dir, raw, tmp_path / "o", *NAIVE)
    with pytest.raises(SystemExit) as e:
        run(llama_dir, data8, tmp_path / "o", "--batch_method", "pack")
    msg = str(e.value)
    assert msg.count("sort_and_group.py") == 1 and ".." not in msg and msg.count(str(data8)) == 2, msg


def test_config_file_anywhere_and_any_case(tmp_path):
    cfg = tmp_path / "SFT.YAML"
    cfg.write_text("model_name_or_path: /m\nlearning_rate: 1.0e-5\npack_loss: true\n")
    for argv in ([str(cfg), "--output_dir", "/o"], ["--output_dir", "/o", str(cfg)],
                 ["--pack_loss", str(cfg), "--output_dir", "/o"]):
        m, d, _, args = train_main.parse_args(argv)
        assert (m.model_name_or_path, args.learning_rate, d.pack_loss, args.output_dir) == ("/m", 1e-5, True, "/o")
    # a flag's value that happens to end in .json stays the flag's value
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto"}))
    assert settings.split_config(["--deepspeed", str(ds)], train_main.ARG_CLASSES, train_main.make_parser()) \
        == ({}, ["--deepspeed", str(ds)])
    with pytest.raises(SystemExit, match="several config files"):
        train_main.parse_args([str(cfg), str(cfg)])
    with pytest.raises(SystemExit, match=r"\.yaml, \.yml or \.json"):
        train_main.parse_args(["sft.toml"])


# ----------------------------------------------------------------------------------------------
# Exact flag names (item 12)
# ----------------------------------------------------------------------------------------------

def test_main_refuses_flag_prefixes():
    with pytest.raises(SystemExit, match=r"unrecognized arguments \['--pack_los'\]"):
        train_main.parse_args(["--pack_los"])
    with pytest.raises(SystemExit, match="unrecognized"):
        train_main.parse_args(["--learning_rat", "1e-5"])
    assert train_main.parse_args(["--pack_loss"])[1].pack_loss


@pytest.mark.parametrize("cli,argv", [  # the required flags in full, one optional flag shortened
    ("pre_tokenize_glm4", ["--model_name_or_path", "m", "--input", "x.jsonl", "--max_lengt", "9"]),
    ("pre_tokenize_llama3", ["--model_name_or_path", "m", "--input", "x.jsonl", "--num_pro", "1"]),
    ("sort_and_group", ["--train_file", "d", "--group_siz", "2"]),
    ("tools.generate", ["--model_dir", "m", "--max_new_token", "3"]),
    ("evaluate", ["--output_dir", "o", "--predictions", "p.jsonl", "--length_bucket", "9"]),
    ("tools.plot_loss", ["--run_dir", "r", "--outpu", "x.png"]),
    ("tools.make_tiny", ["model", "--family", "llama3", "--out", "o", "--see", "1"]),
    ("patch.install", ["--model_dir", "m", "--verif", "false"]),
])
def test_every_cli_refuses_flag_prefixes(cli, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(cli).main(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_deepspeed_config_typos_are_named(tmp_path):
    ds = json.loads((Path(train_main.__file__).parent / "ds_config" / "stage3.json").read_text())
    assert settings.deepspeed_unknown_keys(ds) == []
    ds.update(gradient_clipingg=1.0, steps_per_prnt=10, zero_optimisation={"stage": 2})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    assert settings.deepspeed_unknown_keys(str(path)) == ["gradient_clipingg", "steps_per_prnt",
                                                             "zero_optimisation"]
