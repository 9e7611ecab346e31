"""ChatGLM's `rope_ratio` done right (patch/configuration_chatglm.py, modeling_chatglm.py): ChatGLM2-6B-32K divides the
positions by it, ChatGLM3-6B-32K/128K and GLM-4 multiply the RoPE base by it; which one a folder means is told from
config.json's rope_ratio_mode, else the folder's own modeling file, else its tokenizer files.

Each rule is checked against the published formula written here (angle of rotary pair j at position p:
ChatGLM2-32K (p / r) * 10000 ** (-2j / d), ChatGLM3 / GLM-4 p * (10000 r) ** (-2j / d); d = kv_channels / 2) at
positions far past the original context, and the whole model against transformers' GlmForCausalLM (the same
architecture) given the matching rope_parameters: linear factor r, or rope_theta 10000 r.
Run: python -m pytest -q tests/patch/test_chatglm_rope.py
"""
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GlmConfig, GlmForCausalLM

from longsft.tiny.models import make_tiny_model
from patch.configuration_chatglm import ChatGLMConfig, rope_ratio_mode_of_folder
from patch.modeling_chatglm import ChatGLMForConditionalGeneration
from tests.patch.test_models import native_glm_state_dict

RATIO = 16.0
FAR = torch.tensor([[0, 1, 7, 100, 2047, 2048, 5000, 32767]])  # ChatGLM2-32K: 32,768 positions on 2,048 trained ones


def formula_angles(rule: str, ratio: float, rot_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[B, T, rot_dim / 2] rotation angles in float64, from the published formulas."""
    j = torch.arange(rot_dim // 2, dtype=torch.float64)
    if rule == "positions":  # ChatGLM2-6B-32K: seq_idx = arange(seq_len) / rope_ratio, base 10000
        return (positions.double() / ratio)[..., None] * 10000.0 ** (-2 * j / rot_dim)
    return positions.double()[..., None] * (10000.0 * ratio) ** (-2 * j / rot_dim)  # base = 10000 * rope_ratio


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny chatglm2 / chatglm3 / glm4 folders (hub-like: tokenizer files, our remote-code files) whose config.json
    has rope_ratio 16 and no rope_ratio_mode, as the hub's 32K configs."""
    out = {}
    for family in ("chatglm2", "chatglm3", "glm4"):
        out[family] = make_tiny_model(tmp_path_factory.mktemp(f"rope_{family}"), family, rope_ratio=RATIO)
        assert "rope_ratio_mode" not in json.loads((out[family] / "config.json").read_text())
    return out


@pytest.mark.parametrize("family,rule", [("chatglm2", "positions"), ("chatglm3", "base"), ("glm4", "base")])
def test_each_generation_follows_its_formula(folders, family, rule):
    model = ChatGLMForConditionalGeneration.from_pretrained(folders[family], dtype=torch.float32).eval()
    assert model.config.rope_ratio_mode == rule and model.config.rope_rule == rule
    rot = model.config.kv_channels // 2
    cos, sin = model.transformer.rotary_pos_emb(FAR, torch.float32)
    want = formula_angles(rule, RATIO, rot, FAR)
    # fp32 angles of ~2,000 rad carry ~1e-4 of rounding; the two rules differ by O(1) at these positions
    assert torch.allclose(cos.double(), want.cos(), atol=5e-4) and torch.allclose(sin.double(), want.sin(), atol=5e-4)
    other = formula_angles("base" if rule == "positions" else "positions", RATIO, rot, FAR)
    assert (cos.double() - other.cos()).abs().max() > 0.5
    # and the saved config says which rule ran (main.py's outputs load the same way without the folder's files)
    assert model.config.to_diff_dict()["rope_ratio_mode"] == rule


@pytest.mark.parametrize("family,rule", [("chatglm2", "positions"), ("chatglm3", "base")])
def test_logits_equal_transformers_glm_with_the_same_rope(folders, family, rule):
    """The whole model at positions past the trained context equals GlmForCausalLM with linear scaling (factor r)
    for ChatGLM2-32K, or with rope_theta 10000 r for ChatGLM3."""
    ours = ChatGLMForConditionalGeneration.from_pretrained(folders[family], dtype=torch.float32).eval()
    cfg = ours.config
    rope = {"rope_type": "linear", "factor": RATIO, "rope_theta": 10000.0} if rule == "positions" else \
        {"rope_type": "default", "rope_theta": 10000.0 * RATIO}
    peer = GlmForCausalLM(GlmConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.multi_query_group_num, head_dim=cfg.kv_channels, rms_norm_eps=cfg.layernorm_epsilon,
        attention_bias=cfg.add_qkv_bias, rope_parameters={**rope, "partial_rotary_factor": 0.5},
        max_position_embeddings=40000, pad_token_id=cfg.pad_token_id, tie_word_embeddings=False)).eval()
    peer.load_state_dict(native_glm_state_dict(ours.state_dict(), cfg), strict=True)
    ids = torch.randint(3, 60, (1, 24))
    positions = torch.arange(24)[None] * 1300 + 7  # up to ~30,000: far past 2,048 / 8,192
    with torch.no_grad():
        a = ours(input_ids=ids, position_ids=positions).logits
        b = peer(input_ids=ids, position_ids=positions).logits
        unscaled = GlmForCausalLM(GlmConfig(**{**peer.config.to_dict(), "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}))
        unscaled.load_state_dict(peer.state_dict())
        c = unscaled.eval()(input_ids=ids, position_ids=positions).logits
    assert torch.allclose(a, b, atol=2e-5), (a - b).abs().max()
    assert (a - c).abs().max() > 1e-3  # the ratio matters at these positions


def test_the_rule_is_told_from_the_folder(folders, tmp_path):
    assert rope_ratio_mode_of_folder(folders["chatglm2"])[0] == "positions"
    assert rope_ratio_mode_of_folder(folders["chatglm3"])[0] == "base"
    assert rope_ratio_mode_of_folder(folders["glm4"])[0] == "base"
    assert rope_ratio_mode_of_folder(tmp_path)[0] == "base"  # nothing to tell from: the former rule
    # config.json's own key wins over the folder
    d = tmp_path / "explicit"
    shutil.copytree(folders["chatglm3"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "rope_ratio_mode": "positions"}))
    assert ChatGLMConfig.from_pretrained(d).rope_rule == "positions"
    # the folder's own (hub) modeling file says which rule it implements, before the tokenizer files
    hub = tmp_path / "hub"
    shutil.copytree(folders["chatglm3"], hub)
    (hub / "modeling_chatglm.py").write_text(
        "class RotaryEmbedding:\n    def forward_impl(self, seq_len, n_elem, dtype, device, base=10000):\n"
        "        seq_idx = torch.arange(seq_len, dtype=dtype, device=device) / self.rope_ratio\n")
    assert rope_ratio_mode_of_folder(hub) == ("positions", "modeling_chatglm.py divides the positions by rope_ratio "
                                                           "(ChatGLM2-6B-32K)")
    (hub / "patch_backup").mkdir()  # after patch/install.py: our file in place, the hub's in patch_backup/
    shutil.move(hub / "modeling_chatglm.py", hub / "patch_backup" / "modeling_chatglm.py")
    shutil.copy(folders["chatglm3"] / "modeling_chatglm.py", hub / "modeling_chatglm.py")
    assert rope_ratio_mode_of_folder(hub)[0] == "positions"
    (hub / "patch_backup" / "modeling_chatglm.py").write_text("        base = base * self.rope_ratio\n")
    shutil.copytree(folders["chatglm2"], tmp_path / "c2")
    shutil.copytree(hub / "patch_backup", tmp_path / "c2" / "patch_backup")
    assert rope_ratio_mode_of_folder(tmp_path / "c2")[0] == "base"  # the hub file beats the ChatGLM2 tokenizer
    # a config built in code: the former (base) rule; a bad mode is refused
    assert ChatGLMConfig(rope_ratio=4).rope_rule == "base"
    with pytest.raises(ValueError, match="rope_ratio_mode"):
        ChatGLMConfig(rope_ratio_mode="linear")


def test_rule_works_inside_a_model_folder_loaded_as_remote_code(folders):
    """patch/ copied into the folder (what make_tiny_model and patch/install.py do) and loaded by transformers'
    Auto classes with trust_remote_code: the copied configuration file tells the rule the same way."""
    model = AutoModelForCausalLM.from_pretrained(folders["chatglm2"], trust_remote_code=True, dtype=torch.float32)
    assert type(model).__module__.startswith("transformers_modules")
    assert model.config.rope_rule == "positions"
    cos, _ = model.transformer.rotary_pos_emb(FAR, torch.float32)
    want = formula_angles("positions", RATIO, model.config.kv_channels // 2, FAR)
    assert torch.allclose(cos.double(), want.cos(), atol=5e-4)
    assert math.isclose(model.config.rope_ratio, RATIO)


def test_the_tokenizer_step_agrees_with_the_family_registry(folders, tmp_path):
    """Step 2 of the rule is patch/families.py's family rule (repeated in configuration_chatglm.py, because
    families.py is not copied into model folders): ChatGLM2 -> positions, ChatGLM3 / GLM-4 -> base, also for an
    older ChatGLM3 snapshot whose only sign is its own tokenization_chatglm.py building the role tokens."""
    from patch import families

    old3 = tmp_path / "old_chatglm3"
    shutil.copytree(folders["chatglm2"], old3)  # declares no role token anywhere in its JSON files
    (old3 / "tokenization_chatglm.py").write_text(
        'role_special_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]\n')
    rule = {"chatglm2": "positions", "chatglm3": "base", "glm4": "base"}
    for folder in (folders["chatglm2"], folders["chatglm3"], folders["glm4"], old3):
        assert rope_ratio_mode_of_folder(folder)[0] == rule[families.detect_folder(folder).name], folder
    assert families.detect_folder(old3).name == "chatglm3"
