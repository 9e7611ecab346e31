"""main.py honours the family pre_tokenize.py's explicit --template chose (issue 19 part 4): a ChatGLM3 folder that
declares no role tokens is detected as ChatGLM2; `pre_tokenize.py --template chatglm3` reads it as ChatGLM3, and
main.py then loads the same tokenizer and trains on that data instead of refusing it.

    python -m pytest -q tests/train/test_template_family.py
"""
import json
from pathlib import Path

import main as train_main
import pre_tokenize
from longsft.tiny.models import make_tiny_model
from patch import families

ROOT = Path(__file__).resolve().parents[2]


def test_main_trains_on_data_of_an_explicit_chatglm3_template(tmp_path):
    model = make_tiny_model(tmp_path / "model", "chatglm3")
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("chat_template", "chatglm_version", "additional_special_tokens"):  # an older hub snapshot's config
        cfg.pop(key, None)
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg.get("added_tokens_decoder", {}).items()
                                   if not v["content"].startswith("<|")}
    cfg_path.write_text(json.dumps(cfg))
    assert families.detect_folder(model).name == "chatglm2"

    data = tmp_path / "data"
    pre_tokenize.main(["--model_name_or_path", str(model), "--template", "chatglm3", "--input",
                       str(ROOT / "data" / "sample.jsonl"), "--output_dir", str(data), "--max_length", "1024",
                       "--num_proc", "1"])
    trainer = train_main.main(["--model_name_or_path", str(model), "--train_file", str(data), "--output_dir",
                               str(tmp_path / "run"), "--max_steps", "1", "--report_to", "none",
                               "--disable_tqdm", "true"])
    assert trainer.state.global_step == 1
    settings = json.loads((tmp_path / "run" / "train_settings.json").read_text())
    assert settings["resolved"]["model_family"] == "chatglm3"
    assert families.detect_folder(tmp_path / "run").name == "chatglm3"  # the saved tokenizer says so itself
