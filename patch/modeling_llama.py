"""Llama (Llama-2, Llama-3.x) for packed long-context SFT: a thin subclass of transformers' own LlamaForCausalLM.
One instance of the generic packed path (packed_attention.PackedCausalLM; the other transformers-native models
are in modeling_native.py); kept as its own file, with this class name, for folders it was installed into.

What it changes against upstream transformers (everything else - weights, key names, RoPE variants, KV cache,
generate() - is transformers' own code):
  1. Packed batches: `attention_mask` may be a 1-D int tensor of cu_seqlens [0, e1, ..., L] (input_ids [1, L]);
     each sample attends only to itself (flash-attn varlen -> torch varlen_attn -> per-sample SDPA, see
     packed_attention.py), positions restart per sample unless `position_ids` are given. 2-D padding masks and
     None work as usual.
  2. Loss: `labels` with optional `weights`, `pack_loss`, `num_items_in_batch`, `loss_chunk_size`:
     loss = sum_t w_t * CE_t / D (w_t = weights if pack_loss else 1, D = num_items_in_batch or sum w_t), computed in
     chunks so fp32 logits of a whole pack never exist. With labels given, `logits` is returned as None.
  3. Attention implementation is always "packed_varlen" (unpacked batches use transformers' SDPA inside it).
Supported transformers: >= 5.0 (AttentionInterface, masking_utils, TransformersKwargs); tested with 5.23 and 5.17.

Use: `python patch/install.py --model_dir DIR` then `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`, or import directly: `from patch.modeling_llama import LlamaForCausalLM`.
Tiny CPU check:
    python -c "from transformers import LlamaConfig; from patch.modeling_llama import LlamaForCausalLM; import torch;\
m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,\
num_attention_heads=4, num_key_value_heads=2)); print(m(torch.tensor([[1,2,3,4,5]]), attention_mask=\
torch.tensor([0,2,5], dtype=torch.int32), labels=torch.tensor([[1,2,3,4,5]])).loss)"
"""
from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaForCausalLM as _UpstreamLlamaForCausalLM

from .packed_attention import PackedCausalLM, force_packed_attention


@force_packed_attention
class LlamaForCausalLM(PackedCausalLM, _UpstreamLlamaForCausalLM):
    """transformers' LlamaForCausalLM with packed batches and the chunked weighted loss (PackedCausalLM.forward)."""


__all__ = ["LlamaForCausalLM"]
