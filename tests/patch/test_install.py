"""patch/install.py and the patch/ files in a model folder: the GLM-4 round trip through remote code, files copied by
hand, the tiny SentencePiece family folders, refusals (unknown family, bad folders), no code of the folder ever run,
and what the patch package exports.

    python -m pytest -q tests/patch/test_install.py
"""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from patch import install as patch_install
from patch import packed_attention as PA
from patch.modeling_chatglm import ChatGLMForConditionalGeneration
from patch.modeling_llama import LlamaForCausalLM
from tests.patch.test_models import TOL, glm_config, make_llama, rel_err

# ----------------------------------------------------------------------------------------------
# 6. install.py and remote code
# ----------------------------------------------------------------------------------------------
def test_install_glm4_round_trip(tmp_path, glm4_tokenizer_dir):
    model_dir = tmp_path / "glm4"
    shutil.copytree(glm4_tokenizer_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    torch.manual_seed(0)
    cfg = glm_config(padded_vocab_size=len(tok) + 6, eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    model = ChatGLMForConditionalGeneration(cfg).eval()
    model.save_pretrained(model_dir)
    # an upstream-style folder: its own (old) modeling file and an auto_map entry for a class we do not ship
    (model_dir / "modeling_chatglm.py").write_text("# upstream file\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                          "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"}
    (model_dir / "config.json").write_text(json.dumps(config))

    patch_install.main(["--model_dir", str(model_dir)])
    backups = sorted(p.name for p in (model_dir / "patch_backup").iterdir())
    assert backups == ["config.json", "modeling_chatglm.py"]
    assert (model_dir / "patch_backup" / "modeling_chatglm.py").read_text() == "# upstream file\n"
    auto_map = json.loads((model_dir / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    assert "AutoModelForSequenceClassification" not in auto_map
    tok_map = json.loads((model_dir / "tokenizer_config.json").read_text())["auto_map"]
    assert tok_map["AutoTokenizer"][0] == "tokenization_chatglm.ChatGLM4Tokenizer"
    for name in ("packed_attention.py", "configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"):
        assert (model_dir / name).read_bytes() == (patch_install.PATCH_DIR / name).read_bytes()

    snapshot = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    log = patch_install.main(["--model_dir", str(model_dir), "--verify", "false"])  # idempotent
    assert all(line.startswith("unchanged") for line in log)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == snapshot
    assert len(list((model_dir / "patch_backup").iterdir())) == 2

    loaded = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "ChatGLMForConditionalGeneration"
    assert type(loaded).__module__.startswith("transformers_modules")
    assert type(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)).__name__ == "ChatGLM4Tokenizer"
    ids = torch.randint(3, 90, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        assert loaded(ids, attention_mask=cu, labels=ids).loss.isfinite()


def test_llama_files_copied_by_hand_load_via_remote_code(tmp_path):
    """What a user does without install.py: copy the two files and add auto_map; then install.py agrees."""
    ours, _ = make_llama()
    model_dir = tmp_path / "llama"
    ours.save_pretrained(model_dir)
    for name in ("modeling_llama.py", "packed_attention.py"):
        shutil.copy(patch_install.PATCH_DIR / name, model_dir / name)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    assert type(loaded).__module__.startswith("transformers_modules")
    assert set(loaded.state_dict()) == set(ours.state_dict())
    ids = torch.randint(3, 97, (1, 8))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=cu).logits, ours(ids, attention_mask=cu).logits)
    log = patch_install.main(["--model_dir", str(model_dir), "--verify", "false"])
    assert all(line.startswith("unchanged") for line in log)


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3", "llama2"])
def test_tiny_sentencepiece_family_folders(tmp_path, family):
    """tools/make_tiny.py model folders of the SentencePiece families: the real config fields, the right tokenizer
    class through auto_map (install.py tells ChatGLM2/3's binary tokenizer.model from GLM-4's), a working model."""
    from tools.make_tiny import main as make_tiny_main

    out = make_tiny_main(["model", "--family", family, "--out", str(tmp_path / family)])
    config = json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    if family == "llama2":
        assert type(tok).__name__ == "LlamaTokenizer" and config["model_type"] == "llama"
        assert config["vocab_size"] == len(tok) and (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
        assert config["max_position_embeddings"] == 4096
        assert config["num_key_value_heads"] == config["num_attention_heads"]
        model = LlamaForCausalLM.from_pretrained(out).eval()
        assert model.config.rope_parameters["rope_theta"] == 10000.0
    else:
        version = int(family[-1])
        assert type(tok).__name__ == "ChatGLMTokenizer" and tok.chatglm_version == version
        tok_map = json.loads((out / "tokenizer_config.json").read_text())["auto_map"]
        assert tok_map["AutoTokenizer"][0] == "tokenization_chatglm.ChatGLMTokenizer"
        assert "rope_ratio" not in config and config["seq_length"] == {2: 32768, 3: 8192}[version]
        assert config["apply_query_key_layer_scaling"] and config["attention_softmax_in_fp32"]
        assert config["padded_vocab_size"] % 64 == 0 and config["padded_vocab_size"] >= len(tok)
        assert (config["eos_token_id"], config["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id)
        log = patch_install.main(["--model_dir", str(out), "--verify", "false"])  # installed already: idempotent
        assert all(line.startswith("unchanged") for line in log)
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules") and model.config.rope_ratio == 1.0
    ids = torch.tensor([tok("你好 hello")["input_ids"] + tok("world")["input_ids"]])
    n = len(tok("你好 hello")["input_ids"])
    cu = torch.tensor([0, n, ids.shape[1]], dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, attention_mask=cu).logits[0]
        assert rel_err(packed[:n], model(ids[:, :n]).logits[0]) <= TOL
        assert model(ids, attention_mask=cu, labels=ids).loss.isfinite()
    # batched generation from left-padded prompts = one by one (Llama-2 ships no pad token: the config's, <unk>)
    if tok.pad_token is None:
        tok.pad_token = tok.convert_ids_to_tokens(model.config.pad_token_id)
    prompts = ["你好，请写一篇关于长江的文章。", "hi"]
    batch = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=[])
    together = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
    for row, prompt in zip(together.tolist(), prompts):
        alone = tok(prompt, return_tensors="pt")
        assert model.generate(**alone, **kw)[0, alone["input_ids"].shape[1]:].tolist() == row


def test_install_rejects_unknown_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))  # refused: patch/model_types.json
    with pytest.raises(ValueError, match="model_type 'mamba' is not supported"):
        patch_install.install(tmp_path)


def test_install_runs_no_code_of_the_folder(tmp_path):
    """A folder whose auto_map names its own code: install.py never imports it, and every entry left is ours."""
    ours, _ = make_llama()
    model_dir = tmp_path / "llama"
    ours.save_pretrained(model_dir)
    sentinel = tmp_path / "their_code_ran"
    (model_dir / "their_config.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n"
                                               "from transformers import LlamaConfig as TheirConfig\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "their_config.TheirConfig", "AutoModel": "other/repo--modeling.M"}
    (model_dir / "config.json").write_text(json.dumps(config))
    log = patch_install.main(["--model_dir", str(model_dir)])
    assert not sentinel.exists(), log
    assert json.loads((model_dir / "config.json").read_text())["auto_map"] == {
        "AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"}
    assert any("dropped" in line and "AutoConfig" in line for line in log)
    assert log[-1].startswith("verified  AutoModelForCausalLM -> modeling_llama.LlamaForCausalLM")


def test_install_bad_folders_one_message_and_patch_is_a_leaf(tmp_path):
    import subprocess
    import sys

    (tmp_path / "none").mkdir()
    with pytest.raises(patch_install.InstallError, match=r"none: no config.json in the folder"):
        patch_install.install(tmp_path / "none")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(patch_install.InstallError, match=r"config.json: not valid JSON \(line 1"):
        patch_install.install(bad)
    # patch/ copied alone (no repository around it) still runs and reports the problem as one line
    alone = shutil.copytree(patch_install.PATCH_DIR, tmp_path / "alone" / "patch",
                            ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, str(alone / "install.py"), "--model_dir", str(bad)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"error: {bad / 'config.json'}: not valid JSON")


def test_package_exports():
    import patch

    assert patch.LlamaForCausalLM is LlamaForCausalLM
    assert patch.ChatGLMForConditionalGeneration is ChatGLMForConditionalGeneration
    assert copy.copy(PA.ATTN_IMPLEMENTATION) == "packed_varlen"
