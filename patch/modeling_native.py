"""transformers' own causal LMs for packed long-context SFT: GLM-Edge (`glm`), GLM-4-0414 / GLM-Z1 (`glm4`),
Qwen2 / Qwen2.5 (`qwen2`), Qwen3 (`qwen3`), Mistral (`mistral`). Each class is transformers' class of the same name
with packed_attention.PackedCausalLM mixed in (no modeling code is copied):
  - packed batches: a 1-D cu_seqlens `attention_mask` (input_ids [1, L]), positions restarting per sample, each
    sample attending only to itself, through packed_attention.varlen_attention (flash-attn varlen -> torch
    varlen_attn -> per-sample SDPA), registered as transformers attention function "packed_varlen"; the layers'
    sliding windows (Mistral, Qwen's sliding layers) are applied per sample;
  - the chunked weighted loss (`labels`, `weights`, `pack_loss`, `num_items_in_batch`, `loss_chunk_size`);
  - everything else (weights and key names, RoPE from position_ids, norms, KV cache, generate) is transformers'.
The class names are transformers' own, so a saved folder's config.json names transformers' class (no auto_map)
and loads in stock transformers: `AutoModelForCausalLM.from_pretrained(DIR)`. modeling_llama.LlamaForCausalLM is
the same thing for `llama`. Any other transformers causal LM is built on first use under its own name (a module
`__getattr__` over `packed_causal_lm`): `modeling_native.GemmaForCausalLM`, `modeling_native.Phi3ForCausalLM`, ...;
which model types train correctly that way is decided by a check of each (longsft/model_types.py ->
patch/model_types.json, the registry family `transformers`), not by this module.

    from patch.modeling_native import Qwen2ForCausalLM
    model = Qwen2ForCausalLM.from_pretrained("/models/Qwen2.5-7B-Instruct")
    from patch import modeling_native
    model = modeling_native.GemmaForCausalLM.from_pretrained("/models/gemma-2b-it")   # built on first use
Tiny CPU check:
    python -c "import torch; from transformers import Qwen3Config; from patch.modeling_native import \
Qwen3ForCausalLM as M; m = M(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,\
num_attention_heads=4, num_key_value_heads=2, head_dim=8)); print(m(torch.tensor([[1,2,3,4,5]]), attention_mask=\
torch.tensor([0,2,5], dtype=torch.int32), labels=torch.tensor([[1,2,3,4,5]])).loss)"
"""
from __future__ import annotations

from transformers.models.glm import modeling_glm
from transformers.models.glm4 import modeling_glm4
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from .packed_attention import PackedCausalLM, force_packed_attention, packed_causal_lm


@force_packed_attention
class GlmForCausalLM(PackedCausalLM, modeling_glm.GlmForCausalLM):
    """GLM-Edge (glm-edge-1.5b/4b-chat, model_type glm): partial interleaved RoPE, fused gate_up_proj."""


@force_packed_attention
class Glm4ForCausalLM(PackedCausalLM, modeling_glm4.Glm4ForCausalLM):
    """GLM-4-0414 / GLM-Z1 (model_type glm4): GLM with post-attention and post-MLP norms."""


@force_packed_attention
class Qwen2ForCausalLM(PackedCausalLM, modeling_qwen2.Qwen2ForCausalLM):
    """Qwen2 / Qwen2.5 (model_type qwen2): q/k/v biases; sliding layers when use_sliding_window is set."""


@force_packed_attention
class Qwen3ForCausalLM(PackedCausalLM, modeling_qwen3.Qwen3ForCausalLM):
    """Qwen3 dense models (model_type qwen3): q/k RMSNorm per head; sliding layers when use_sliding_window is set."""


@force_packed_attention
class MistralForCausalLM(PackedCausalLM, modeling_mistral.MistralForCausalLM):
    """Mistral (model_type mistral): the config's sliding_window (4096 on v0.1, none from v0.2) on every layer."""


__all__ = ["GlmForCausalLM", "Glm4ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
           "packed_causal_lm"]


def __getattr__(name: str):
    """transformers.<name> (a causal LM whose attention goes through the attention interface) with the packed
    forward, built once and kept in this module: pickling, `from_pretrained` and an installed auto_map entry
    (`modeling_native.<name>`) find it like the classes above. packed_causal_lm raises ValueError for a class whose
    attention bypasses the interface."""
    import transformers

    upstream = None if name.startswith("_") else getattr(transformers, name, None)
    if not isinstance(upstream, type) or not hasattr(upstream, "get_output_embeddings"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (not a transformers model class)")
    cls = packed_causal_lm(upstream, module=__name__)
    globals()[name] = cls
    return cls
