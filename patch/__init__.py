"""Model files for packed long-context SFT: GLM-4 and ChatGLM2/3 (chatglm format), Llama and the other
transformers-native models (GLM-Edge, GLM-4-0414, Qwen2/2.5, Qwen3, Mistral: transformers' own classes with the
packed forward), shared attention/loss.

The files are meant to be copied into a model folder (`python patch/install.py --model_dir DIR`) and loaded
with `trust_remote_code=True`; this package form lets code import them directly, e.g.
`from patch.modeling_chatglm import ChatGLMForConditionalGeneration`. Attributes load lazily so that importing
`patch` alone (e.g. for `patch.install`) does not import torch/transformers.
"""
import importlib

_EXPORTS = {
    "LlamaForCausalLM": "modeling_llama",
    "GlmForCausalLM": "modeling_native",
    "Glm4ForCausalLM": "modeling_native",
    "Qwen2ForCausalLM": "modeling_native",
    "Qwen3ForCausalLM": "modeling_native",
    "MistralForCausalLM": "modeling_native",
    "PackedCausalLM": "packed_attention",
    "packed_causal_lm": "packed_attention",
    "ChatGLMConfig": "configuration_chatglm",
    "ChatGLMModel": "modeling_chatglm",
    "ChatGLMForConditionalGeneration": "modeling_chatglm",
    "ChatGLM4Tokenizer": "tokenization_chatglm",
    "ChatGLMTokenizer": "tokenization_chatglm",
    "causal_lm_loss": "packed_attention",
    "varlen_attention": "packed_attention",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
