"""Tiny random-weight model folders (config.json, model.safetensors, generation_config.json, the tokenizer files),
loadable exactly like the real folders: tests, benchmarks and the CPU quickstart train them offline.

    from longsft.tiny.models import make_tiny_model
    make_tiny_model("/tmp/tiny-glm4-model", "glm4")      # also llama3, chatglm2, chatglm3, llama2, and the
    make_tiny_model("/tmp/tiny-qwen2", "qwen2")          # transformers-native glm, glm4_0414, qwen2, qwen3, mistral
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from longsft.tiny.tokenizers import (CHAT_KIND_OF_FAMILY, NATIVE_FAMILIES, TOKENIZER_BUILDERS,  # noqa: F401
                                     make_chat_template_tokenizer, write_json)
from patch import families

# ----------------------------------------------------------------------------------------------
# Tiny models (random weights) with their tokenizer, loadable like the real folders
# ----------------------------------------------------------------------------------------------

SP_CHATGLM_VERSIONS = {"chatglm2": 2, "chatglm3": 3}


def glm4_tiny_config(tok, stops: list[int], pad: int) -> dict:
    """GLM-4 config.json fields at tiny sizes; eos = the family's stop tokens (as glm-4-9b-chat's list)."""
    return dict(padded_vocab_size=-(-len(tok) // 64) * 64, num_layers=2, hidden_size=64, ffn_hidden_size=128,
                kv_channels=16, num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2,
                seq_length=131072, rope_ratio=1.0, eos_token_id=stops, pad_token_id=pad)


def llama3_tiny_config(tok, pad: int) -> dict:
    """Llama-3.1 config.json fields at tiny sizes (GQA, RoPE base 500000); pad = the family's pad id."""
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=131072,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad)


def chatglm_sp_tiny_config(tok, version: int) -> dict:
    """chatglm2-6b / chatglm3-6b config.json fields (REFERENCE 5) at tiny sizes: no rope_ratio (= 1),
    apply_query_key_layer_scaling and attention_softmax_in_fp32 on, seq_length 32768 (ChatGLM2) / 8192 (ChatGLM3),
    embedding rows padded past the tokenizer (padded_vocab_size), eos `</s>` and pad `<unk>` from the tokenizer."""
    return dict(padded_vocab_size=-(-len(tok) // 64) * 64, num_layers=2, hidden_size=64, ffn_hidden_size=128,
                kv_channels=16, num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2,
                seq_length=32768 if version == 2 else 8192, layernorm_epsilon=1e-5, rmsnorm=True,
                post_layer_norm=True, add_bias_linear=False, add_qkv_bias=True, original_rope=True,
                apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True, tie_word_embeddings=False,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def llama2_tiny_config(tok) -> dict:
    """Llama-2-7b config.json fields at tiny sizes: no GQA, max_position_embeddings 4096, rms_norm_eps 1e-5,
    RoPE base 10000, untied; bos/eos from the tokenizer, pad = `<unk>` (LongAlign pads with it)."""
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.unk_token_id)


# The real models' config.json fields that shape the math, at tiny sizes (2 layers, hidden 64, 4 query heads of
# 16 dims sharing 2 key/value heads, MLP 128), and the token texts their generation_config.json stops on.
NATIVE_TINY = {
    # glm-edge-1.5b/4b-chat: half the head dims rotated (interleaved), q/k/v biases, fused gate_up_proj
    "glm": dict(attention_bias=True, partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=8192,
                rms_norm_eps=1e-5, tie_word_embeddings=False),
    # GLM-4-9B-0414: the same plus post-attention / post-MLP norms (Glm4 class)
    "glm4_0414": dict(attention_bias=True, partial_rotary_factor=0.5, rope_theta=10000.0,
                      max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Qwen2.5-7B-Instruct: q/k/v biases (always on in Qwen2), RoPE base 1e6, no sliding layers, untied
    "qwen2": dict(rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                  tie_word_embeddings=False),
    # Qwen3-0.6B..4B: per-head q/k RMSNorm, head_dim set on its own, tied embeddings
    "qwen3": dict(rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6, use_sliding_window=False,
                  tie_word_embeddings=True),
    # Mistral-7B-v0.1: a sliding window on every layer (4096 there; 32 here, so tiny packs' samples exceed it)
    "mistral": dict(rope_theta=10000.0, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=32,
                    tie_word_embeddings=False),
}
NATIVE_STOPS = {"glm": ("<|endoftext|>", "<|user|>", "<|observation|>"),
                "glm4_0414": ("<|endoftext|>", "<|user|>", "<|observation|>"),
                "qwen2": ("<|im_end|>", "<|endoftext|>"), "qwen3": ("<|im_end|>", "<|endoftext|>"),
                "mistral": ("</s>",)}


def native_stop_ids(family: str, tok) -> list[int]:
    """generation_config.json's eos ids for a tiny folder: the real model's stop tokens the tokenizer has, else
    the tokenizer's eos."""
    vocab = tok.get_vocab()
    ids = [vocab[t] for t in NATIVE_STOPS[family] if t in vocab]
    return ids or [tok.eos_token_id]


def native_tiny_config(family: str, tok, pad: int) -> dict:
    """A native family's tiny config.json fields; eos = its stop ids (GLM: the list, as GLM's configs; Qwen,
    Mistral: the first, the list going to generation_config.json)."""
    stops = native_stop_ids(family, tok)
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=tok.bos_token_id,
                eos_token_id=stops if family.startswith("glm") else stops[0], pad_token_id=pad,
                **NATIVE_TINY[family])


def _drop_config_keys(path: Path, keys: list[str]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    write_json(path, {k: v for k, v in data.items() if k not in keys})


def tiny_config(family: str, tok) -> dict:
    """The tiny config.json fields of `family` for its tokenizer `tok`."""
    from longsft.templates.registry import pad_token_id

    fam = families.family(family)
    if family == "glm4":
        return glm4_tiny_config(tok, [tok.convert_tokens_to_ids(t) for t in fam.stop_tokens], pad_token_id(tok, fam))
    if family == "llama3":
        return llama3_tiny_config(tok, pad_token_id(tok, fam))
    if family in SP_CHATGLM_VERSIONS:
        return chatglm_sp_tiny_config(tok, SP_CHATGLM_VERSIONS[family])
    if family in NATIVE_TINY:
        return native_tiny_config(family, tok, pad_token_id(tok, fam))
    return llama2_tiny_config(tok)


def make_tiny_model(out_dir: str | Path, family: str, tokenizer_dir: str | Path | None = None, seed: int = 0,
                    **overrides) -> Path:
    """A tiny random-weight model folder for `family` (glm4, llama3, chatglm2, chatglm3, llama2, and the
    transformers-native glm, glm4_0414, qwen2, qwen3, mistral: `native_tiny_config`): config.json,
    model.safetensors, generation_config.json and the tokenizer files of `tokenizer_dir` (built into out_dir when None).

    Shapes: 2 layers, hidden 64, 4 query heads of 16 dims sharing 2 key/value heads (GQA), MLP 128 (llama2:
    4 key/value heads, MLP 172, `llama2_tiny_config`; chatglm2/3: `chatglm_sp_tiny_config`); the vocabulary and
    special ids come from the tokenizer (chatglm formats: embedding rows padded to a multiple of 64, like the
    real padded_vocab_size). `overrides` replace config fields (e.g. num_hidden_layers=1 / num_layers=1).
    chatglm-format folders (glm4, chatglm2, chatglm3) also get the remote-code files and auto_map
    (patch/install.py), as the hub folders have them; main.py and pre_tokenize.py never run them unless given
    --trust_remote_code. The model class, tokenizer loading and pad rule come from patch/families.py."""
    import torch

    if family not in TOKENIZER_BUILDERS:
        raise ValueError(f"family {family!r}: expected one of {sorted(TOKENIZER_BUILDERS)}")
    from longsft.models import load_tokenizer, model_class

    fam = families.family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = TOKENIZER_BUILDERS[family](out)
    tokenizer_dir = Path(tokenizer_dir)
    tok = load_tokenizer(str(tokenizer_dir), fam)  # as main.py and pre_tokenize.py load it
    torch.manual_seed(seed)
    cls = model_class(fam.model_types[0])
    cfg = tiny_config(family, tok)
    cfg.update(overrides)
    model = cls(cls.config_class(**cfg))
    if family in NATIVE_TINY:  # generation_config.json stops on every stop token (as the hub folders' do)
        model.generation_config.eos_token_id = native_stop_ids(family, tok)
    model.save_pretrained(out)
    if tokenizer_dir.resolve() != out.resolve():
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copyfile(f, out / f.name)
    if fam.remote_code:  # the hub folders of the family ship modeling/tokenizer code: so does the tiny one
        from patch.install import BACKUP_DIR, install
        had_backup = (out / BACKUP_DIR).exists()
        install(out, verify=False)
        if not had_backup:  # a fresh tiny folder: the copies of what install rewrote are just clutter
            shutil.rmtree(out / BACKUP_DIR, ignore_errors=True)
    if family in SP_CHATGLM_VERSIONS and "rope_ratio" not in overrides:
        _drop_config_keys(out / "config.json", ["rope_ratio"])  # chatglm2-6b / chatglm3-6b carry none (= 1)
    return out


def make_tiny_decoder(out_dir: str | Path, model_type: str, tokenizer_dir: str | Path | None = None, seed: int = 0,
                      **overrides) -> Path:
    """A tiny random-weight folder of any model type patch/model_types.json accepts (registry family
    `transformers`): the config of the packed check (longsft.model_types.tiny_config: 2-4 layers of width 64, every
    layer kind of the config, logit scalings set) sized to the tokenizer, whose special ids it takes; the tokenizer
    of `tokenizer_dir`, else a tiny Qwen2.5-style chat tokenizer (template auto). generation_config.json stops on
    the tokenizer's eos and `<|im_end|>` / `<|endoftext|>` where it has them.

        make_tiny_decoder("/tmp/tiny-gemma", "gemma")      # python tools/make_tiny.py decoder --model_type gemma ..."""
    import torch

    from longsft.model_types import tiny_config
    from longsft.models import load_tokenizer, model_class

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = make_chat_template_tokenizer(out, "qwen2")
    tokenizer_dir = Path(tokenizer_dir)
    tok = load_tokenizer(str(tokenizer_dir), families.GENERIC)
    vocab = tok.get_vocab()
    stops = list(dict.fromkeys(i for i in [tok.eos_token_id] + [vocab.get(t) for t in ("<|im_end|>", "<|endoftext|>")]
                               if i is not None))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": stops[0],
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else stops[0]}
    cls = model_class(model_type)
    config = tiny_config(model_type, vocab_size=len(tok), extra_kinds=[], **ids, **overrides)
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.eos_token_id = stops
    model.save_pretrained(out)
    if tokenizer_dir.resolve() != out.resolve():
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copyfile(f, out / f.name)
    return out
