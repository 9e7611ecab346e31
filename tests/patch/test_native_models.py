"""transformers-native model types (GLM-Edge `glm`, GLM-4-0414 `glm4`, Qwen2 `qwen2`, Qwen3 `qwen3`, Mistral
`mistral`) through the one packed path (patch/modeling_native.py = transformers' classes + PackedCausalLM):
sliding windows in every backend, the registry entries, and what users run: tiny folders (tools/make_tiny.py) ->
data (TokenizedWriter + sort_and_group.py) -> main.py packed -> a folder stock transformers loads; LoRA with
gradient checkpointing and --save_merged_model, resume, tools/generate.py's loading and stop ids.

Model-level exactness (ours vs the stock class: logits, loss, generate; packed vs one by one: logits and
gradients; chunked loss; gradient checkpointing; ZeRO-3) runs in tests/patch/test_models.py over its FAMILIES table,
which includes these types (`hf_<type>`); 2 ranks x GA1 = 1 rank x GA2 in tests/train/test_distributed.py.

    python -m pytest -q tests/patch/test_native_models.py
"""
from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import main as train_main
from longsft import models
from longsft.data.inputs import InputError
from patch import families, modeling_native
from patch import packed_attention as PA
from tests.train.test_run import StopAt, losses, run, write_task
from tools import generate
from longsft.tiny.models import make_tiny_model
from longsft.tiny.tokenizers import NATIVE_FAMILIES

TOL = 1e-5
MODEL_TYPES = {"glm": "glm", "glm4_0414": "glm4", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------------------
# Sliding windows: every backend, packed and unpacked
# ----------------------------------------------------------------------------------------------
def _band_reference(q, k, v, cu, scale, window):
    """Whole-pack attention with an explicit [T, T] mask: same sample, causal, within `window` latest tokens."""
    t = q.shape[0]
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    i = torch.arange(t)
    mask = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def _varlen_windowed(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False):
    """torch >= 2.10's varlen_attn signature, computed on CPU with the reference (window_size = (left, right))."""
    left, right = window_size
    assert right == 0 and enable_gqa
    return _band_reference(query, key, value, cu_seq_q, scale, left + 1 if left >= 0 else 10**9)


def _varlen_no_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    raise AssertionError("not to be called with a window")  # torch 2.9's signature: no window_size


def test_sliding_window_every_backend():
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 13, 14, 23], dtype=torch.int32)  # samples of 3, 10, 1, 9 tokens
    q, k, v = torch.randn(23, 4, 8), torch.randn(23, 2, 8), torch.randn(23, 2, 8)
    for window in (1, 4, 9):
        ref = _band_reference(q, k, v, cu, 0.3, window)
        assert rel_err(PA.varlen_attention(q, k, v, cu, 10, 0.3, backend="sdpa", window=window), ref) <= TOL
        assert rel_err(PA._attn_torch_varlen(q, k, v, cu, 10, 0.3, fn=_varlen_windowed, window=window), ref) <= TOL
        with pytest.raises(ValueError, match="no window_size"):
            PA._attn_torch_varlen(q, k, v, cu, 10, 0.3, fn=_varlen_no_window, window=window)
    # a window no sample reaches is plain causal attention
    full = PA.varlen_attention(q, k, v, cu, 10, 0.3, backend="sdpa")
    assert torch.equal(PA.varlen_attention(q, k, v, cu, 10, 0.3, backend="sdpa", window=10), full)
    assert not PA._torch_varlen_has_window(_varlen_no_window) and PA._torch_varlen_has_window(_varlen_windowed)
    assert PA.available_backends(torch.device("cpu"), torch.float32, window=True) == ["sdpa"]


def test_attention_extras_the_packed_path_lacks_are_refused():
    q = torch.randn(1, 4, 5, 8)
    kv = torch.randn(1, 2, 5, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="softcap"):
        PA.packed_attention_forward(torch.nn.Linear(1, 1), q, kv, kv, None, softcap=30.0, cu_seq_lens_q=cu,
                                    max_length_q=3)


@pytest.mark.parametrize("kind", ["mistral", "qwen2_swa"])
def test_sliding_window_models_packed_equal_stock_one_by_one(kind):
    """Samples longer than the window, packed: each equals the stock model (SDPA + transformers' sliding mask) on
    that sample alone; batched unpadded rows longer than the window too."""
    from tests.tiny_native import make_native

    ours, stock = make_native(kind)
    window = ours.config.sliding_window
    lengths = [window + 5, 2, 2 * window + 1]
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, 97, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(torch.cat(samples)[None], attention_mask=cu).logits[0]
        for i, s in enumerate(samples):
            assert rel_err(packed[cu[i]:cu[i + 1]], stock(s[None]).logits[0]) <= TOL
        rows = torch.randint(3, 97, (2, 2 * window + 3), generator=g)
        assert rel_err(ours(rows).logits, stock(rows).logits) <= TOL
        full, _ = make_native(kind, sliding_window=None, use_sliding_window=False)
        assert rel_err(full(rows).logits, stock(rows).logits) > 1e-3  # the window mattered
    # generation: an unpadded prompt longer than the window (prefill without a mask), then cached decoding
    kw = dict(max_new_tokens=window + 2, do_sample=False, pad_token_id=97, eos_token_id=[])
    assert ours.generate(rows, **kw).tolist() == stock.generate(rows, **kw).tolist()


# ----------------------------------------------------------------------------------------------
# Registry: families, classes, errors
# ----------------------------------------------------------------------------------------------
def test_native_families_and_classes():
    for name, model_type in MODEL_TYPES.items():
        fam = families.family(name)
        assert fam.model_types == (model_type,) and fam.default_template == "auto" and fam.generation_stops
        assert families.of_model_type(model_type) == [fam, families.generic_family(model_type)]  # `transformers` last
        assert families.generic_family(model_type).model_class == fam.model_class
        cls = models.model_class(model_type)
        assert cls.__module__ == "patch.modeling_native" and issubclass(cls, PA.PackedCausalLM)
        upstream = getattr(transformers, cls.__name__)  # transformers' own class of the same name
        assert cls.__mro__[2] is upstream and cls.config_class is upstream.config_class
        assert upstream.config_class.model_type == model_type
        assert "forward" not in vars(cls)  # no modeling code of ours besides the mixin's forward
        params = inspect.signature(cls.forward).parameters
        assert {"weights", "pack_loss", "num_items_in_batch", "loss_chunk_size"} <= set(params)
        with torch.device("meta"):
            model = cls(cls.config_class(num_hidden_layers=1))
        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(fam.lora_targets) == present - {"lm_head"}  # LoRA default: every linear layer but lm_head
    # the chatglm-format GLM-4-9B keeps the family name glm4; model_type glm4 (GLM-4-0414) is glm4_0414
    assert families.family("glm4").model_types == ("chatglm",) and families.family("glm4").templates == ("glm4",)
    assert families.model_class_of("glm4") == "modeling_native.Glm4ForCausalLM"
    # the Llama file is one instance of the generic path, under its old name
    from patch.modeling_llama import LlamaForCausalLM
    assert issubclass(LlamaForCausalLM, PA.PackedCausalLM) and LlamaForCausalLM.__mro__[2] is \
        transformers.LlamaForCausalLM
    # any other transformers causal LM built at run time
    built = PA.packed_causal_lm(transformers.Qwen2ForCausalLM)
    assert built.__name__ == "Qwen2ForCausalLM" and issubclass(built, modeling_native.PackedCausalLM)


def test_unsupported_model_types_are_one_clear_error(tmp_path, native_dirs, monkeypatch):
    with pytest.raises(InputError, match=r"model_type 'baichuan' is not supported: expected one of \[.*'qwen3'.*"
                                         r"--trust_remote_code"):
        models.model_class("baichuan")  # no transformers class: the folder's own code is the way
    # a type transformers implements that patch/model_types.json has not checked (e.g. new in transformers)
    monkeypatch.delitem(families.MODEL_TYPES["refused"], "mamba")
    with pytest.raises(InputError, match=r"implements it \(MambaForCausalLM\), but patch/model_types.json .* has "
                                         r"not checked it: run `python -m longsft.model_types --types mamba`"):
        models.model_class("mamba")
    monkeypatch.undo()
    model_dir = shutil.copytree(native_dirs["qwen2"], tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "baichuan"}))
    data = write_task(tmp_path / "data", native_dirs["qwen2"], "qwen2", n=2, group=False, template="auto")
    with pytest.raises(SystemExit, match="'baichuan' is not supported.*--trust_remote_code"):
        run(model_dir, data, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# What users run: tiny folder -> data -> sort_and_group -> main.py packed -> stock transformers
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def native_dirs(tmp_path_factory, llama3_tokenizer_dir):
    return {f: make_tiny_model(tmp_path_factory.mktemp(f"tiny_{f}"), f, llama3_tokenizer_dir) for f in NATIVE_FAMILIES}


def _saved_loads_in_stock(out, model_dir, fam, ids):
    """The saved folder: config.json names transformers' class (no auto_map, no code), AutoModelForCausalLM loads
    it without our code or trust_remote_code, with our class's logits; its family and stop ids are the input's."""
    config = json.loads((out / "config.json").read_text())
    cls = models.model_class(config["model_type"])
    assert config["architectures"] == [cls.__name__] and "auto_map" not in config
    assert not list(out.glob("*.py"))
    stock = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(stock) is getattr(transformers, cls.__name__)
    ours = cls.from_pretrained(out).eval()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, stock(ids).logits) <= TOL
    assert models.family_of(str(out)) == fam
    assert models.stop_token_ids(str(out), fam) == models.stop_token_ids(str(model_dir), fam)
    return stock


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_packed_run_end_to_end_and_stock_reload(tmp_path, native_dirs, family):
    model_dir = native_dirs[family]
    fam = families.family(family)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert models.stop_token_ids(str(model_dir), fam) == gen["eos_token_id"]  # read at run time
    data = write_task(tmp_path / "data", model_dir, family, template="auto")  # + sort_and_group.py
    trainer = run(model_dir, data, tmp_path / "out", "--batch_method", "pack", "--pack_loss", "--max_steps", 12,
                  "--learning_rate", 1e-2, "--warmup_steps", 0, "--per_device_train_batch_size", 1)
    curve = losses(trainer)
    assert len(curve) == 12 and np.mean(curve[-3:]) < 0.8 * np.mean(curve[:2]), curve
    settings = json.loads((tmp_path / "out" / train_main.SETTINGS_FILE).read_text())["resolved"]
    assert settings["model_family"] == family and settings["model_type"] == MODEL_TYPES[family]
    ids = torch.tensor([list(range(20, 60))])
    _saved_loads_in_stock(tmp_path / "out", model_dir, fam, ids)


@pytest.mark.parametrize("family", ["glm", "qwen3"])  # fused gate_up_proj; tied embeddings
def test_lora_gradient_checkpointing_merged_and_generate_loading(tmp_path, native_dirs, family):
    from peft import PeftModel

    model_dir = native_dirs[family]
    fam = families.family(family)
    data = write_task(tmp_path / "data", model_dir, family, template="auto")
    out = tmp_path / "lora"
    trainer = run(model_dir, data, out, "--batch_method", "pack", "--use_lora", "--lora_r", 4, "--lora_alpha", 8,
                  "--lora_dropout", 0.0, "--learning_rate", 2e-2, "--max_steps", 10, "--gradient_checkpointing",
                  "--save_merged_model")
    curve = losses(trainer)
    assert np.mean(curve[-3:]) < np.mean(curve[:2]) - 0.2, curve
    assert set(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == set(fam.lora_targets)
    ids = torch.tensor([list(range(20, 50))])
    merged = _saved_loads_in_stock(out / "merged", model_dir, fam, ids)
    # tools/generate.py loads the adapter folder on its base and the merged folder alone, as our class
    with_adapter, tok, got_fam = generate.load(str(out))
    assert isinstance(with_adapter, PeftModel) and got_fam == fam and len(tok) == merged.config.vocab_size
    alone, _, _ = generate.load(str(out / "merged"))
    assert type(alone) is models.model_class(MODEL_TYPES[family])
    with torch.no_grad():
        assert rel_err(with_adapter(input_ids=ids).logits, merged(ids).logits) <= 1e-4
        stops = models.stop_token_ids(generate.base_folder(str(out)), fam)
        reply = alone.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               eos_token_id=stops, pad_token_id=stops[0])
        stock = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                eos_token_id=stops, pad_token_id=stops[0])
    assert reply.tolist() == stock.tolist()


def test_resume_logs_the_same_losses(tmp_path, native_dirs):
    """mistral (a sliding window shorter than the packs' samples): a run cut at step 3 and resumed = one run."""
    model_dir = native_dirs["mistral"]
    data = write_task(tmp_path / "data", model_dir, "mistral", template="auto", max_length=128)
    common = ["--batch_method", "pack", "--pack_loss", "--per_device_train_batch_size", 1, "--max_steps", 5,
              "--learning_rate", 5e-3, "--save_strategy", "steps", "--save_steps", 3]
    full = losses(run(model_dir, data, tmp_path / "full", *common))
    first = losses(run(model_dir, data, tmp_path / "cut", *common, callbacks=[StopAt(3)]))
    again = losses(run(model_dir, data, tmp_path / "cut", *common, "--resume_from_checkpoint", "true"))
    assert len(first) == 3 and len(again) == 5
    np.testing.assert_allclose(again, full, rtol=0, atol=1e-6)


def test_generate_cli_end_to_end(tmp_path):
    """tools/generate.py on a fresh tiny qwen2 folder with its own chat tokenizer: the prompt is the template's
    (auto, the family's default) inference prompt token for token, the reply is the greedy continuation decoded,
    and generation stops on an id that only the folder's generation_config.json names."""
    model_dir = make_tiny_model(tmp_path / "qwen2", "qwen2")
    prompt, system = "Write a haiku about the sea.", "Be brief."
    argv = ["--model_dir", str(model_dir), "--prompt", prompt, "--system", system, "--max_new_tokens", 8]
    first = generate.main([str(a) for a in argv + ["--output", tmp_path / "reply.json"]])
    assert first == json.loads((tmp_path / "reply.json").read_text())
    assert first["template"] == "auto" and first["new_tokens"] >= 3

    model, tok, fam = generate.load(str(model_dir))
    chat = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    expected = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = [int(i) for i in generate.prompt_ids(generate.chat_format_for("auto", tok, fam), prompt, system)]
    assert ids == [int(i) for i in expected] and first["prompt_tokens"] == len(ids)
    stops = models.stop_token_ids(str(model_dir), fam, generate.chat_format_for("auto", tok, fam).stop_token_ids)
    saved = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    assert set(saved if isinstance(saved, list) else [saved]) <= set(stops)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    new = out[0, len(ids):].tolist()
    assert len(new) == first["new_tokens"] and first["reply"] == tok.decode(new, skip_special_tokens=True).strip()
    assert first["reply_raw"] == tok.decode(new, skip_special_tokens=False)

    # a new stop id only in generation_config.json (the first token that is new at position k >= 1): k + 1 tokens
    k = next(i for i in range(1, len(new)) if new[i] not in new[:i])
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [*(saved if isinstance(saved, list) else [saved]), new[k]]
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    cut = generate.main([str(a) for a in argv])
    assert cut["new_tokens"] == k + 1 and cut["reply_raw"] == tok.decode(new[:k + 1], skip_special_tokens=False)
