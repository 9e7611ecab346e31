"""Llama (Llama-2, Llama-3.x) for packed long-context SFT: a thin subclass of transformers' own LlamaForCausalLM.

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

from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaForCausalLM as _UpstreamLlamaForCausalLM

from .packed_attention import causal_lm_loss, force_packed_attention, prepare_packed_inputs


@force_packed_attention
class LlamaForCausalLM(_UpstreamLlamaForCausalLM):
    def forward(
        self,
        input_ids=None,  # [B, T]
        attention_mask=None,  # 1-D int cu_seqlens [n+1] (B == 1), 2-D [B, T] 0/1 padding, or None
        position_ids=None,  # [B, T]; derived per sample from cu_seqlens when packed and None
        past_key_values=None,
        inputs_embeds=None,
        labels=None,  # [B, T] aligned with input_ids, -100 = not supervised
        use_cache=None,
        logits_to_keep=0,
        weights=None,  # [B, T] float, aligned with labels (e.g. 1/N_i per supervised token of sample i)
        pack_loss=False,  # use `weights` in the loss
        num_items_in_batch=None,  # normaliser D (number or 0-d tensor); default: sum of the token weights
        loss_chunk_size=None,  # tokens per lm_head/CE chunk; default config.loss_chunk_size or 1024
        **kwargs,
    ) -> CausalLMOutputWithPast:
        ref = input_ids if input_ids is not None else inputs_embeds
        attention_mask, position_ids, packed_kwargs, cu_seqlens = prepare_packed_inputs(
            attention_mask, position_ids, ref.shape[0], ref.shape[1], ref.device
        )
        if cu_seqlens is not None:
            use_cache = False  # a pack is a training input; nothing to continue from
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **packed_kwargs,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # [B, T, H]
        loss = logits = None
        if labels is not None:
            loss = causal_lm_loss(
                hidden_states, self.lm_head, labels, weights=weights, pack_loss=pack_loss,
                num_items_in_batch=num_items_in_batch, cu_seqlens=cu_seqlens,
                chunk_size=loss_chunk_size or getattr(self.config, "loss_chunk_size", None),
            )
        else:
            # an int keeps the last `logits_to_keep` positions (0 = all), a tensor selects positions; written out
            # because transformers.modeling_utils.slice_logits_to_keep is missing from older 5.x (5.17 has none)
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])  # [B, T', V]
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["LlamaForCausalLM"]
