"""RoPE scaling (longsft/train/rope.py): --rope_scaling linear|dynamic|yarn|llama3|base with --rope_factor or
--model_max_length. The model main.py loads computes what transformers' stock class computes with the same
rope_parameters (written out here), past the original context; packed = one by one under scaling; the flags'
checks; a packed run at 4x the original context trains, saves the scaling and generates; the data check names
the flags; LL-BaiYang's route (ChatGLM2, 4-bit, linear interpolation) end to end on a tiny ChatGLM2 with the
adapter's base config, tools/generate.py and the merged model.
Run: python -m pytest -q tests/train/test_rope.py
"""
import json
import math

import numpy as np
import pytest
import torch
import transformers

import main as train_main
from longsft.errors import UserError
from longsft.tiny.models import make_tiny_model
from longsft.train import model as train_model
from longsft.train import rope
from longsft.train.arguments import ModelArguments
from longsft.train.data import context_warning
from tests.train.test_run import losses, run, write_task

CONTEXT = 32  # the tiny models' original context here
THETA = 500000.0  # tools/make_tiny.py's llama3 RoPE base


@pytest.fixture(scope="module")
def short_llama(tmp_path_factory, llama3_tokenizer_dir):
    """A tiny Llama-3.1-shaped folder whose context is 32 positions."""
    return make_tiny_model(tmp_path_factory.mktemp("llama32"), "llama3", llama3_tokenizer_dir,
                           max_position_embeddings=CONTEXT)


def load(model_dir, model_type="llama", **flags):
    return train_model.load_model(ModelArguments(model_name_or_path=str(model_dir), **flags), model_type,
                                  torch.float32).eval()


# the rope_parameters each flag must give, written out (transformers 5's keys)
EXPECTED = {
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": THETA},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": THETA},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": THETA, "original_max_position_embeddings": CONTEXT},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "rope_theta": THETA, "original_max_position_embeddings": CONTEXT,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "base": {"rope_type": "default", "rope_theta": THETA * 4},
}


@pytest.mark.parametrize("scaling", list(EXPECTED))
def test_logits_equal_stock_transformers_with_the_same_rope_parameters(short_llama, scaling):
    ours = load(short_llama, rope_scaling=scaling, model_max_length=4 * CONTEXT)  # factor ceil(128 / 32) = 4
    assert ours.config.rope_parameters == EXPECTED[scaling]
    assert ours.config.max_position_embeddings == (CONTEXT if scaling == "dynamic" else 4 * CONTEXT)
    assert ours.model.rotary_emb.rope_type == EXPECTED[scaling]["rope_type"]  # the model really uses it
    stock_config = transformers.LlamaConfig.from_pretrained(short_llama)
    stock_config.rope_parameters = dict(EXPECTED[scaling])
    stock_config.max_position_embeddings = ours.config.max_position_embeddings
    stock = transformers.LlamaForCausalLM.from_pretrained(short_llama, config=stock_config, dtype=torch.float32).eval()
    plain = transformers.LlamaForCausalLM.from_pretrained(short_llama, dtype=torch.float32).eval()
    ids = torch.randint(3, 200, (1, 4 * CONTEXT - 8))  # positions to 119: past the original 32
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (ours, stock, plain))
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert (a - c)[:, CONTEXT:].abs().max() > 1e-4  # scaled: the model differs from the unscaled one
    if scaling != "dynamic":  # packed = one by one (dynamic NTK depends on the batch: refused with pack)
        x, y = ids[:, :70], ids[:, 70:]
        with torch.no_grad():
            packed = ours(input_ids=ids, attention_mask=torch.tensor([0, 70, ids.shape[1]], dtype=torch.int32)).logits
            one = torch.cat([ours(input_ids=x).logits, ours(input_ids=y).logits], dim=1)
        assert torch.allclose(packed, one, atol=1e-5)


def test_native_family_with_partial_rotary_and_a_scaled_model(tmp_path, llama3_tokenizer_dir):
    """GLM-Edge (partial interleaved RoPE) with yarn = stock GlmForCausalLM; a model already scaled the same way
    multiplies its factor (Llama-3.1's llama3 x8 -> x16), another type is refused."""
    glm = make_tiny_model(tmp_path / "glm", "glm", llama3_tokenizer_dir, max_position_embeddings=CONTEXT)
    ours = load(glm, "glm", rope_scaling="yarn", rope_factor=4)
    want = {**transformers.GlmConfig.from_pretrained(glm).rope_parameters, "rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": CONTEXT}
    assert ours.config.rope_parameters == want and want["partial_rotary_factor"] == 0.5
    cfg = transformers.GlmConfig.from_pretrained(glm)
    cfg.rope_parameters, cfg.max_position_embeddings = dict(want), 4 * CONTEXT
    stock = transformers.GlmForCausalLM.from_pretrained(glm, config=cfg, dtype=torch.float32).eval()
    ids = torch.randint(3, 200, (1, 100))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-5)

    llama31 = make_tiny_model(tmp_path / "l31", "llama3", llama3_tokenizer_dir, max_position_embeddings=131072,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings":
                                            8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    config, plan = train_model.model_config(ModelArguments(model_name_or_path=str(llama31), rope_scaling="llama3",
                                                           model_max_length=200000), "llama")
    assert plan.factor == 2 and config.rope_parameters["factor"] == 16.0
    assert config.rope_parameters["original_max_position_embeddings"] == 8192
    assert config.max_position_embeddings == 262144 and plan.context_after == 262144
    with pytest.raises(SystemExit, match="already scales RoPE with llama3"):
        train_model.model_config(ModelArguments(model_name_or_path=str(llama31), rope_scaling="yarn", rope_factor=2),
                                 "llama")
    config, plan = train_model.model_config(ModelArguments(model_name_or_path=str(llama31), rope_scaling="llama3",
                                                           model_max_length=100000), "llama")
    assert plan is None and config.rope_parameters["factor"] == 8.0  # 100,000 fits 131,072: nothing to do


def test_flags_are_checked_before_anything_loads(tmp_path, short_llama):
    base = ["--model_name_or_path", str(short_llama), "--train_file", "x", "--output_dir", str(tmp_path / "o")]
    cases = {("--rope_factor", "2"): "needs --rope_scaling",
             ("--model_max_length", "64"): "needs --rope_scaling",
             ("--rope_scaling", "yarn"): "needs --rope_factor F or --model_max_length N",
             ("--rope_scaling", "yarn", "--rope_factor", "0.5"): "must be a number >= 1",
             ("--rope_scaling", "yarn", "--rope_factor", "2", "--model_max_length", "64"): "give one",
             ("--rope_scaling", "dynamic", "--rope_factor", "2", "--batch_method", "pack"): "packing would change"}
    for flags, message in cases.items():
        with pytest.raises(SystemExit, match=message):
            train_main.parse_args(base + list(flags))
    glm4 = make_tiny_model(tmp_path / "glm4", "glm4")
    with pytest.raises(SystemExit, match="two ways: --rope_scaling linear"):
        train_model.model_config(ModelArguments(model_name_or_path=str(glm4), rope_scaling="yarn", rope_factor=2),
                                 "chatglm")


def test_packed_run_at_4x_the_context_trains_saves_and_generates(tmp_path, short_llama):
    shapes = [(10, 110), (8, 90), (12, 100), (6, 118), (9, 60), (7, 80)]  # samples up to 124 tokens: 3.9x 32
    data = write_task(tmp_path / "data", short_llama, "llama3", shapes=shapes, max_length=128)
    config = transformers.AutoConfig.from_pretrained(short_llama)
    warning = context_warning(str(data), "train", config)
    assert "6 of 6 samples are longer than the model's 32-token context" in warning
    assert "--rope_scaling yarn --model_max_length 124" in warning
    out = tmp_path / "run"
    trainer = run(short_llama, data, out, "--batch_method", "pack", "--per_device_train_batch_size", 1,
                  "--max_steps", 8, "--learning_rate", 3e-3, "--rope_scaling", "linear", "--model_max_length", 124)
    curve = losses(trainer)
    assert np.mean(curve[-2:]) < np.mean(curve[:2]) - 0.1, curve
    saved = json.loads((out / "config.json").read_text())
    assert saved["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": THETA}
    assert saved["max_position_embeddings"] == 128
    settings = json.loads((out / train_main.SETTINGS_FILE).read_text())["resolved"]
    assert settings["rope"]["factor"] == 4.0 and "linear x4" in settings["rope_scaling"]
    # stock transformers loads the trained folder with its scaling and generates past the original context
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model) is transformers.LlamaForCausalLM and model.model.rotary_emb.rope_type == "linear"
    prompt = torch.randint(20, 100, (1, 40))
    with torch.no_grad():
        gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=60,
                             min_new_tokens=60, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == 100
    assert context_warning(str(data), "train", model.config) is None  # 124 fits the scaled 128


def test_ll_baiyang_route_chatglm2_4bit_linear_interpolation(tmp_path):
    """LL-BaiYang: ChatGLM2, 4-bit base, LoRA, positions / 8. The adapter folder carries the base's scaled config
    (base_model_config.json), which tools/generate.py and the merged model use."""
    pytest.importorskip("bitsandbytes")
    from tools import generate

    model_dir = make_tiny_model(tmp_path / "chatglm2", "chatglm2")
    data = write_task(tmp_path / "data", model_dir, "chatglm2", n=8, max_length=96)
    out = tmp_path / "run"
    run(model_dir, data, out, "--batch_method", "pack", "--max_steps", 2, "--learning_rate", 1e-2, "--use_lora",
        "--quantization_bit", 4, "--rope_scaling", "linear", "--rope_factor", 8, "--save_merged_model")
    base_cfg = json.loads((out / train_model.BASE_CONFIG_FILE).read_text())
    assert (base_cfg["rope_ratio"], base_cfg["rope_ratio_mode"], base_cfg["seq_length"]) == (8.0, "positions",
                                                                                             32768 * 8)
    assert "quantization_config" not in base_cfg and not (out / "config.json").exists()
    model, tok, family = generate.load(str(out))
    assert family.name == "chatglm2"
    cfg = model.get_base_model().config
    assert (cfg.rope_ratio, cfg.rope_rule) == (8.0, "positions")
    rotary = model.get_base_model().transformer.rotary_pos_emb
    assert rotary.position_divisor == 8.0 and math.isclose(rotary.base, 10000.0)
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert (merged["rope_ratio"], merged["rope_ratio_mode"]) == (8.0, "positions")
    assert "quantization_config" not in merged
    reply = generate.main(["--model_dir", str(out / "merged"), "--max_new_tokens", "4"])
    assert reply["new_tokens"] >= 1


def test_context_check_names_the_family_rule(tmp_path):
    model_dir = make_tiny_model(tmp_path / "chatglm2", "chatglm2", seq_length=16)
    data = write_task(tmp_path / "data", model_dir, "chatglm2", n=4, max_length=96, group=False)
    config = train_model.model_class("chatglm").config_class.from_pretrained(model_dir)
    from longsft.models import require_family
    msg = context_warning(str(data), "train", config, None, require_family(str(model_dir)))
    assert "--rope_scaling linear --model_max_length" in msg and "chatglm2" in msg
    assert rope.context_length(config) == 16


def test_resume_refuses_other_rope_settings(tmp_path, short_llama):
    data = write_task(tmp_path / "data", short_llama, "llama3", n=6, max_length=64)
    common = ["--batch_method", "pack", "--per_device_train_batch_size", 1, "--max_steps", 2, "--save_strategy",
              "steps", "--save_steps", 1]
    run(short_llama, data, tmp_path / "o", *common, "--rope_scaling", "yarn", "--rope_factor", 2)
    with pytest.raises(UserError, match="trained with other settings: RoPE"):  # exit status 2 through run_cli
        run(short_llama, data, tmp_path / "o", *common, "--max_steps", 3, "--resume_from_checkpoint", "true")
    again = run(short_llama, data, tmp_path / "o", *common, "--max_steps", 3, "--resume_from_checkpoint", "true",
                "--rope_scaling", "yarn", "--rope_factor", 2)
    assert again.state.global_step == 3


def test_chatglm_flags_follow_the_folders_rule(tmp_path):
    """ChatGLM2-6B-32K-like (rope_ratio 16 on the positions): linear multiplies it, base is refused; a ChatGLM3 folder
    without a ratio takes either rule; GLM-4-9b-chat-like (rope_ratio 500 on the base): base multiplies it."""
    c2 = make_tiny_model(tmp_path / "c2", "chatglm2", rope_ratio=16.0)
    config, plan = train_model.model_config(ModelArguments(model_name_or_path=str(c2), rope_scaling="linear",
                                                           rope_factor=2), "chatglm")
    assert (config.rope_ratio, config.rope_ratio_mode, config.seq_length) == (32.0, "positions", 65536)
    assert plan.context_before == 32768 and plan.context_after == 65536
    with pytest.raises(SystemExit, match="already applies to the positions.*use --rope_scaling linear"):
        train_model.model_config(ModelArguments(model_name_or_path=str(c2), rope_scaling="base", rope_factor=2),
                                 "chatglm")
    c3 = make_tiny_model(tmp_path / "c3", "chatglm3")  # no rope_ratio, seq_length 8192
    config, _ = train_model.model_config(ModelArguments(model_name_or_path=str(c3), rope_scaling="linear",
                                                        model_max_length=30000), "chatglm")
    assert (config.rope_ratio, config.rope_ratio_mode, config.seq_length) == (4.0, "positions", 32768)
    g4 = make_tiny_model(tmp_path / "g4", "glm4", rope_ratio=500.0, seq_length=131072)
    config, _ = train_model.model_config(ModelArguments(model_name_or_path=str(g4), rope_scaling="base",
                                                        model_max_length=262144), "chatglm")
    assert (config.rope_ratio, config.rope_rule, config.seq_length) == (1000.0, "base", 262144)
    model = load(g4, "chatglm", rope_scaling="base", rope_factor=2)  # the loaded model checked to use it
    assert math.isclose(model.transformer.rotary_pos_emb.base, 10000.0 * 1000)
