"""Tiny configs of the transformers-native model types patch/modeling_native.py trains, and our class paired with
transformers' stock class holding the same weights. A helper of the tests (no tests here).

    from tiny_native import NATIVE, make_native
    ours, stock = make_native("qwen3")
"""
from __future__ import annotations

import torch
import transformers

from patch import modeling_native

VOCAB = 101  # the tests draw token ids from 3..96; 97..100 are "special" (eos/pad)

# model_type -> (config class, fields like the real models' at tiny sizes)
_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, pad_token_id=97, bos_token_id=98)
CONFIGS = {
    # GLM-Edge: partial (half) interleaved RoPE, q/k/v biases, fused gate_up_proj, three eos ids
    "glm": (transformers.GlmConfig, dict(attention_bias=True, eos_token_id=[99, 100, 98], tie_word_embeddings=False)),
    # GLM-4-0414: GLM plus post-attention / post-MLP norms
    "glm4": (transformers.Glm4Config, dict(attention_bias=True, eos_token_id=[99, 100], tie_word_embeddings=False)),
    # Qwen2.5: biases on q/k/v, RoPE base 1e6, full attention (use_sliding_window false, as every Qwen2.5 ships)
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1e6, eos_token_id=[99, 100], tie_word_embeddings=False)),
    # Qwen2 with its sliding layers on (use_sliding_window, the second layer slides over 4 tokens)
    "qwen2_swa": (transformers.Qwen2Config, dict(rope_theta=1e6, eos_token_id=99, use_sliding_window=True,
                                                 sliding_window=4, max_window_layers=1)),
    # Qwen3 (0.6B-4B style): q/k RMSNorm per head, tied embeddings
    "qwen3": (transformers.Qwen3Config, dict(rope_theta=1e6, eos_token_id=[99, 100], tie_word_embeddings=True)),
    # Mistral v0.1: a sliding window on every layer (4096 there, 6 tokens here so samples exceed it)
    "mistral": (transformers.MistralConfig, dict(sliding_window=6, eos_token_id=99, tie_word_embeddings=False)),
}
NATIVE = sorted(CONFIGS)
OURS = {"glm": modeling_native.GlmForCausalLM, "glm4": modeling_native.Glm4ForCausalLM,
        "qwen2": modeling_native.Qwen2ForCausalLM, "qwen2_swa": modeling_native.Qwen2ForCausalLM,
        "qwen3": modeling_native.Qwen3ForCausalLM, "mistral": modeling_native.MistralForCausalLM}


def native_config(kind: str, **over):
    cls, fields = CONFIGS[kind]
    return cls(**{**_COMMON, **fields, **over})  # rope_theta: folded into rope_parameters by transformers 5


def stock_class(kind: str):
    """transformers' own class (the one ours subclasses)."""
    return OURS[kind].__mro__[2]


def make_native(kind: str, seed: int = 0, **over):
    """(our packed class, transformers' stock class) on one tiny random config, same weights, eval mode. Norm
    weights are drawn away from 1 so a norm applied to the wrong tensor would show."""
    torch.manual_seed(seed)
    ours = OURS[kind](native_config(kind, **over)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    stock = stock_class(kind)(native_config(kind, **over)).eval()
    result = stock.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert stock.config._attn_implementation != ours.config._attn_implementation == "packed_varlen"
    return ours, stock


def maker(kind: str):
    """make_native bound to `kind`, for the tests' family tables: maker("qwen3")(seed=0) -> (ours, stock)."""
    def make(seed: int = 0, **over):
        return make_native(kind, seed, **over)

    make.__name__ = f"make_{kind}"
    return make
