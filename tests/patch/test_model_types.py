"""Every decoder transformers implements: the packed check of each model type (longsft/model_types.py), the table
the registry reads (patch/model_types.json), the family `transformers` that covers what the check accepts, its
errors for the rest, its LoRA default, and tiny runs of types no family names.

    python -m pytest -q tests/patch/test_model_types.py -m "not slow"   # the whole walk, a sample, tiny runs: ~1 min
    python -m pytest -q tests/patch/test_model_types.py -m slow         # 2-rank runs (torchrun, DeepSpeed)
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from longsft import model_types as MT
from longsft import models
from longsft.data.inputs import InputError
from longsft.tiny.models import make_tiny_decoder
from patch import families
from patch import packed_attention as PA

ROOT = MT.TABLE.parents[1]
TABLE = MT.read_table()
SAME_TRANSFORMERS = TABLE["transformers"] == transformers.__version__
# re-checked in the fast test: what each exercises
SAMPLE = {
    "gemma": "embeddings scaled by sqrt(hidden), GeGLU, tied",
    "phi3": "fused qkv and gate_up projections",
    "olmo2": "post-attention / post-MLP norms, q/k norms",
    "granite": "logits_scaling (divided), attention and residual multipliers",
    "cohere": "logit_scale (multiplied), parallel attention + MLP, LayerNorm",
    "gemma3_text": "final_logit_softcapping, sliding and full layers",
    "starcoder2": "biases everywhere, LayerNorm, sliding window",
    "gpt2": "absolute learned positions, Conv1D layers",
    "qwen2": "a type a named family also covers",
    "lfm2": "accepted for attention layers only: its conv layers leak across samples",
    "gemma2": "refused: attention soft-capping",
    "mamba": "refused: no attention interface",
    "bert": "refused: an encoder",
    "minimax": "refused: linear-attention layers carry state across samples",
    "gemma3": "refused: multimodal",
}


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------------------
# The table and the registry
# ----------------------------------------------------------------------------------------------

def test_table_covers_every_causal_lm_and_the_registry_reads_it():
    accepted, refused = TABLE["accepted"], TABLE["refused"]
    assert not set(accepted) & set(refused)
    print(f"\npatch/model_types.json (transformers {TABLE['transformers']}): {len(accepted)} model types accepted, "
          f"{len(refused)} refused")
    if SAME_TRANSFORMERS:
        mapping = MT.causal_lm_types()
        assert set(accepted) | set(refused) == set(mapping)
        assert all(entry["class"] == mapping[t] for t, entry in accepted.items())
    # every type a named family trains is accepted by the check too
    assert set(families.named_model_types()) - {"chatglm"} <= set(accepted)
    generic = families.family(families.GENERIC)
    assert list(families.FAMILIES)[-1] == families.GENERIC  # detection tries it last
    assert generic.model_types == tuple(sorted(accepted)) and generic.default_template == "auto"
    assert set(families.model_types()) == set(accepted) | {"chatglm"}
    for t in ("gemma", "phi3", "olmo2"):
        fam = families.generic_family(t)
        assert fam.model_class == f"modeling_native.{accepted[t]['class']}"
        assert fam.install.auto_map == {"AutoModelForCausalLM": fam.model_class}
        assert families.of_model_type(t) == [fam]
        cls = models.model_class(t)
        assert issubclass(cls, PA.PackedCausalLM) and cls.__mro__[2] is getattr(transformers, cls.__name__)
    # a type a named family covers keeps that family's class; the `transformers` family comes last
    assert [f.name for f in families.of_model_type("llama")] == ["llama3", "llama2", families.GENERIC]
    assert families.generic_family("llama").model_class == "modeling_llama.LlamaForCausalLM"
    assert families.generic_family("mamba") is None and "attention interface" in families.refused_reason("mamba")


@pytest.mark.parametrize("model_type", sorted(SAMPLE))
def test_sample_of_types_checks_as_the_table_says(model_type):
    """The check, re-run on a sample, gives the table's verdict (on the table's transformers: the same reason)."""
    verdict = MT.check(model_type)
    assert verdict.accepted == (model_type in TABLE["accepted"]), (SAMPLE[model_type], verdict)
    if verdict.accepted:
        assert verdict.logits_err <= MT.LOGITS_TOL and verdict.grad_err <= MT.GRAD_TOL
        assert list(verdict.layer_types) == TABLE["accepted"][model_type]["layer_types"]
    elif SAME_TRANSFORMERS:
        assert verdict.reason == TABLE["refused"][model_type]


@pytest.mark.skipif(not SAME_TRANSFORMERS, reason="patch/model_types.json was made on another transformers version")
def test_the_whole_walk_regenerates_the_table():
    """Every causal LM of the installed transformers checked again (~20 s on 2 idle cores): the table is exactly what
    the check says (`python -m longsft.model_types --write` after a transformers upgrade)."""
    made = MT.table(MT.walk())
    assert made["accepted"] == TABLE["accepted"]
    assert made["refused"] == TABLE["refused"]


def test_check_catches_what_the_packed_path_lacks(monkeypatch):
    """The check fails a type when the packed forward misses a logits transform or samples leak into each other."""
    monkeypatch.setattr(PA.PackedCausalLM, "logits_transform", lambda self: (1.0, None))
    verdict = MT.check("granite")  # logits_scaling no longer applied
    assert not verdict.accepted and "differ from the packed forward's on a single sample" in verdict.reason
    monkeypatch.undo()
    # the registered attention function's own module (an installed copy of packed_attention.py loaded by another
    # test registers its own): one causal sequence over the whole pack, so samples see each other
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module_globals = ALL_ATTENTION_FUNCTIONS[PA.ATTN_IMPLEMENTATION].__globals__
    real = module_globals["varlen_attention"]
    monkeypatch.setitem(module_globals, "varlen_attention", lambda q, k, v, cu, m, s, backend=None, window=None: real(
        q, k, v, torch.tensor([0, q.shape[0]], dtype=torch.int32), q.shape[0], s, window=window))
    verdict = MT.check("phi3")
    assert not verdict.accepted and "packed logits differ from one sample at a time" in verdict.reason


@pytest.mark.parametrize("model_type", ["granite", "cohere", "gemma3_text"])
def test_logits_transforms_in_the_chunked_loss(model_type):
    """The chunked loss applies each model's logits transform: our pack's loss (chunks of 3 tokens) = the loss
    computed here from stock transformers' logits, one sample at a time."""
    config = MT.tiny_config(model_type)
    torch.manual_seed(0)
    ours = models.model_class(model_type)(config).eval()
    stock = getattr(transformers, TABLE["accepted"][model_type]["class"])(config).eval()
    stock.load_state_dict(ours.state_dict())
    assert ours.logits_transform() != (1.0, None)  # the tiny config sets the transform
    samples = [torch.randint(3, 120, (n,)) for n in (7, 4, 9)]
    cu = torch.tensor([0, 7, 11, 20], dtype=torch.int32)
    with torch.no_grad():
        loss = ours(torch.cat(samples)[None], attention_mask=cu, labels=torch.cat(samples)[None],
                    loss_chunk_size=3).loss
        ref = sum(F.cross_entropy(stock(s[None]).logits[0, :-1], s[1:], reduction="sum") for s in samples) / 17
    assert rel_err(loss, ref) < 1e-5


# ----------------------------------------------------------------------------------------------
# Refusals: one clear error naming the reason
# ----------------------------------------------------------------------------------------------

def _folder(tmp_path, config: dict, tokenizer_dir):
    folder = tmp_path / "model"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_refused_types_are_clear_errors(tmp_path, chat_tokenizer_dir):
    with pytest.raises(InputError, match=r"'mamba' \(MambaForCausalLM\) is not supported by packed training: "
                                         r"MambaForCausalLM's attention does not go through"):
        models.model_class("mamba")
    with pytest.raises(InputError, match=r"'gemma2' .* soft|softcap"):
        models.model_class("gemma2")
    folder = _folder(tmp_path, {"model_type": "mamba"}, chat_tokenizer_dir("qwen2"))
    with pytest.raises(InputError, match="packed training does not support this model_type: MambaForCausalLM"):
        models.require_family(str(folder))
    out = subprocess.run([sys.executable, str(ROOT / "pre_tokenize.py"), "--model_name_or_path", str(folder),
                          "--input", str(ROOT / "data" / "sample.jsonl"), "--output_dir", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "attention does not go through" in out.stderr, out.stderr[-2000:]
    # LFM2 passes with attention layers only: a folder with its conv layers is refused, naming them and why
    (folder / "config.json").write_text(json.dumps({"model_type": "lfm2",
                                                    "layer_types": ["conv", "full_attention", "conv"]}))
    with pytest.raises(InputError, match=r"layer kinds conv .* did not pass the packed check of lfm2 .*carry state"):
        models.require_family(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "lfm2", "layer_types": ["full_attention"] * 2}))
    assert models.require_family(str(folder)).name == families.GENERIC


def test_another_transformers_version_rechecks_the_type(monkeypatch):
    """The table names the transformers it was made with; on another one a type only the `transformers` family
    covers is checked again before its class is used (and refused with the check's reason)."""
    monkeypatch.setitem(families.MODEL_TYPES, "transformers", "0.0.0")
    monkeypatch.setattr(models, "_RECHECKED", {})
    assert models.model_class("phi3").__name__ == "Phi3ForCausalLM" and models._RECHECKED == {"phi3": ""}
    assert models.model_class("qwen2") and "qwen2" not in models._RECHECKED  # a named family: no re-check
    monkeypatch.setitem(families.MODEL_TYPES["accepted"], "gemma2", {"class": "Gemma2ForCausalLM", "layer_types": []})
    with pytest.raises(InputError, match=r"not supported by packed training on transformers .*softcap"):
        models.model_class("gemma2")


# ----------------------------------------------------------------------------------------------
# LoRA default: every linear layer of the decoder blocks
# ----------------------------------------------------------------------------------------------

def test_lora_default_is_every_linear_layer_of_the_blocks():
    for name in ("glm", "glm4_0414", "qwen2", "qwen3", "mistral", "llama3"):
        fam = families.family(name)
        cls = models.model_class(fam.model_types[0])
        with torch.device("meta"):
            model = cls(cls.config_class(num_hidden_layers=1))
        assert models.decoder_linear_names(model) == sorted(fam.lora_targets), name
    for model_type, expected in (("gpt2", ["c_attn", "c_fc", "c_proj"]),  # Conv1D layers
                                 ("phi3", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
                                 ("cohere", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"])):
        model = models.model_class(model_type)(MT.tiny_config(model_type))
        assert models.decoder_linear_names(model) == expected, model_type


# ----------------------------------------------------------------------------------------------
# Types no family names, end to end: pre_tokenize.py (template auto) -> sort_and_group.py -> main.py -> stock
# ----------------------------------------------------------------------------------------------

def _chat_records(path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    words = "red green blue river stone cloud seven bright quiet music".split()
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(words, 4))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {q}"},
                                             {"role": "assistant", "content": f"{q}. {q}."}]}) + "\n")
    return path


def _prepare(tmp_path, model_dir):
    import pre_tokenize
    import sort_and_group

    data = tmp_path / "data"
    pre_tokenize.main(["--model_name_or_path", str(model_dir), "--input", str(_chat_records(tmp_path / "chat.jsonl")),
                       "--output_dir", str(data), "--max_length", "128", "--num_proc", "1"])
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["model_family"], meta["template"]) == (families.GENERIC, "auto")
    sort_and_group.main(["--train_file", str(data), "--max_length", "128", "--group_size", "2"])
    return data


@pytest.mark.parametrize("model_type,lora", [("phi3", True), ("granite", False)])
def test_type_no_family_names_trains_end_to_end(tmp_path, model_type, lora):
    from tests.train.test_run import losses, run

    model_dir = make_tiny_decoder(tmp_path / "model", model_type)
    data = _prepare(tmp_path, model_dir)
    out = tmp_path / "out"
    extra = ["--use_lora", "--lora_r", 4, "--lora_alpha", 8, "--save_merged_model", "--learning_rate", 3e-2] if lora \
        else ["--learning_rate", 1e-2]
    trainer = run(model_dir, data, out, "--batch_method", "pack", "--pack_loss", "--max_steps", 10,
                  "--warmup_steps", 0, "--gradient_checkpointing", *extra)
    curve = losses(trainer)
    assert len(curve) == 10 and np.mean(curve[-3:]) < np.mean(curve[:2]) - 0.2, curve
    saved = out / "merged" if lora else out
    if lora:
        adapter = json.loads((out / "adapter_config.json").read_text())
        model = models.model_class(model_type)(MT.tiny_config(model_type))
        assert sorted(adapter["target_modules"]) == models.decoder_linear_names(model)
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == [TABLE["accepted"][model_type]["class"]] and "auto_map" not in config
    stock = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    assert type(stock) is getattr(transformers, TABLE["accepted"][model_type]["class"])
    ours = models.model_class(model_type).from_pretrained(saved).eval()
    ids = torch.tensor([list(range(20, 50))])
    with torch.no_grad():
        assert rel_err(ours(ids).logits, stock(ids).logits) <= 1e-5
    assert models.family_of(str(saved)).name == families.GENERIC


# 1 rank x 2 accumulation steps = 2 ranks x 1 (tests/train/test_distributed.py's rule) on a sample of the types
# only the `transformers` family covers: embedding scaling and tied weights, fused projections, logits scaling
@pytest.mark.slow
@pytest.mark.parametrize("model_type,engine,pack_loss", [("gemma", "zero3", False), ("phi3", "ddp", True),
                                                         ("granite", "zero3", True)])
def test_two_ranks_equal_one_rank_accumulating(tmp_path, model_type, engine, pack_loss):
    from tests.train.test_distributed import eval_losses, launch_two_ranks
    from tests.train.test_run import EXACT, losses, max_weight_diff, run, write_task

    model_dir = make_tiny_decoder(tmp_path / "model", model_type)
    data = write_task(tmp_path / "data", model_dir, families.GENERIC, n=24, max_length=64, template="auto")
    val = write_task(tmp_path / "val", model_dir, families.GENERIC, n=7, seed=1, max_length=64, template="auto")
    extra = EXACT + ["--batch_method", "pack", "--per_device_train_batch_size", 1, "--validation_file", val,
                     "--loss_chunk_size", 5] + (["--pack_loss"] if pack_loss else [])
    one = run(model_dir, data, tmp_path / "one", *extra, "--gradient_accumulation_steps", 2)
    ds = ["--deepspeed", ROOT / "ds_config" / "stage3.json"] if engine == "zero3" else []
    two, log = launch_two_ranks(model_dir, data, tmp_path / "two", *extra, "--gradient_accumulation_steps", 1, *ds)
    assert "2 rank(s)" in log
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") < 1e-6
    assert len(two) == 1 and abs(two[0] - losses(one)[0]) < 1e-5
    state = json.loads((tmp_path / "two" / "trainer_state.json").read_text())
    e1, e2 = eval_losses(one.state.log_history), eval_losses(state["log_history"])
    assert e1 and e2 and abs(e1[-1] - e2[-1]) < 1e-5


def test_install_into_a_folder_of_a_type_no_family_names(tmp_path):
    """patch/install.py on a gemma folder: packed_attention.py + modeling_native.py copied, auto_map naming
    modeling_native.GemmaForCausalLM, which the copied module builds on first use; loads with trust_remote_code."""
    from patch import install as patch_install

    folder = make_tiny_decoder(tmp_path / "gemma", "gemma")
    log = patch_install.install(folder)
    assert any(line.startswith("verified  AutoModelForCausalLM -> modeling_native.GemmaForCausalLM") for line in log)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_native.GemmaForCausalLM"}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "GemmaForCausalLM" and "PackedCausalLM" in [c.__name__ for c in type(model).__mro__]
    assert patch_install.install(folder)[-1].startswith("verified")  # idempotent
