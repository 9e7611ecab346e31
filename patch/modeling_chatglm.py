"""GLM-4 ("chatglm" remote-code format) for packed long-context SFT, written for current transformers.

Loads glm-4-9b / glm-4-9b-chat / LongWriter-glm4-9b checkpoints unchanged (same module tree and state-dict keys:
transformer.embedding.word_embeddings, transformer.encoder.layers.N.{input_layernorm, self_attention.
{query_key_value, dense}, post_attention_layernorm, mlp.{dense_h_to_4h, dense_4h_to_h}},
transformer.encoder.final_layernorm, transformer.output_layer, transformer.rotary_pos_emb.inv_freq).

Against upstream's file it changes:
  - packed batches: a 1-D int `attention_mask` = cu_seqlens [0, e1, ..., L] (input_ids [1, L]); each sample
    attends only to itself (flash-attn varlen -> torch varlen_attn -> per-sample SDPA: no crash without
    flash-attn), positions restart per sample unless `position_ids` are given;
  - partial interleaved RoPE computed for any position from `rope_ratio` (no RoPE cache sized by `seq_length`),
    as a base factor (ChatGLM3, GLM-4) or a position divisor (ChatGLM2-6B-32K): the config's `rope_ratio_mode`;
  - loss = sum_t w_t * CE_t / D (w_t = `weights` if `pack_loss` else 1, D = `num_items_in_batch` or sum w_t),
    computed in chunks so fp32 logits of a whole pack never exist; `logits` is None when labels are given;
  - transformers' own KV cache (DynamicCache), masks and GenerationMixin, so `generate()` works on transformers 5
    (stops on the config's eos list; left-padded batches).
Supported transformers: >= 5.0 (AttentionInterface, masking_utils, DynamicCache API); tested with 5.23.

Tiny CPU check:
    python -c "import torch; from patch.configuration_chatglm import ChatGLMConfig; \
from patch.modeling_chatglm import ChatGLMForConditionalGeneration as M; m = M(ChatGLMConfig(num_layers=2, \
padded_vocab_size=64, hidden_size=32, ffn_hidden_size=48, kv_channels=8, num_attention_heads=4)); \
print(m(torch.tensor([[1,2,3,4,5]]), attention_mask=torch.tensor([0,2,5], dtype=torch.int32), \
labels=torch.tensor([[1,2,3,4,5]])).loss)"
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_chatglm import ChatGLMConfig
from .packed_attention import PackedCausalLM, force_packed_attention, packed_attention_forward, prepare_packed_inputs


# ---------------------------------------------------------------------------------------------------------------
# Norms, RoPE, MLP
# ---------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):  # [..., H]: x * rsqrt(mean(x^2) + eps) * weight in fp32, cast back (as upstream)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)


def make_norm(config: ChatGLMConfig):
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class RotaryEmbedding(nn.Module):
    """Partial interleaved RoPE: the first rot_dim = kv_channels / 2 dims of each head rotate in pairs
    (x[2j], x[2j+1]) by p * theta_j; the rest pass through. `rope_ratio` r applies by the config's rope_rule
    (configuration_chatglm.py): "base" (ChatGLM3, GLM-4): p = position, theta_j = (10000 * r) ** (-2j / rot_dim);
    "positions" (ChatGLM2-6B-32K): p = position / r, theta_j = 10000 ** (-2j / rot_dim).
    Angles are computed from positions on the fly (fp32), so any position works. `inv_freq` is kept only because
    checkpoints carry it (same key and shape as upstream); the math recomputes it from the config."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.rot_dim = config.kv_channels // 2
        ratio = float(config.rope_ratio)
        self.position_divisor = ratio if config.rope_rule == "positions" else 1.0
        self.base = 10000.0 * (1.0 if config.rope_rule == "positions" else ratio)
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=True)  # [rot_dim / 2]

    def compute_inv_freq(self, device=None):  # fp32, the same expression upstream and transformers' Glm use
        return 1.0 / (self.base ** (torch.arange(0, self.rot_dim, 2, dtype=torch.float, device=device) / self.rot_dim))

    def forward(self, position_ids, dtype):  # position_ids [B, T] -> cos, sin [B, T, rot_dim / 2]
        inv_freq = self.compute_inv_freq(position_ids.device)
        positions = position_ids.float()
        if self.position_divisor != 1.0:
            positions = positions / self.position_divisor  # ChatGLM2-6B-32K: linear position interpolation
        angles = positions[..., None] * inv_freq  # [B, T, rot_dim / 2]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """x [B, heads, T, D]; cos/sin [B, T, R/2]; rotates the first R dims in interleaved pairs."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x0, x1 = x_rot.unflatten(-1, (-1, 2)).unbind(-1)  # [B, heads, T, R/2] each
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)  # [B, heads, T, R]
    return torch.cat((out, x_pass), dim=-1)


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x):  # [B, T, H]
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # [B, T, F] each; first half is the gate
        return self.dense_4h_to_h(F.silu(gate) * up)


# ---------------------------------------------------------------------------------------------------------------
# Attention and blocks
# ---------------------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_kv_heads = config.multi_query_group_num if config.multi_query_attention else self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # read by transformers' SDPA path
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.attention_dropout = config.attention_dropout
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size,
                                         bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states, rotary, attention_mask=None, past_key_values=None, **kwargs):
        bsz, seq, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states)  # [B, T, (Hq + 2 Hkv) * D], rows [Q | K | V]
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = k.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # [B, Hkv, T_past + T, D]
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, packed_attention_forward)
        out, _ = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                           dropout=self.attention_dropout if self.training else 0.0, **kwargs)  # [B, T, Hq, D]
        return self.dense(out.reshape(bsz, seq, -1))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.post_residual = config.apply_residual_connection_post_layernorm
        self.input_layernorm = make_norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        self.hidden_dropout = config.hidden_dropout
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, hidden_states, rotary=None, attention_mask=None, past_key_values=None, **kwargs):
        normed = self.input_layernorm(hidden_states)
        attn = self.self_attention(normed, rotary, attention_mask=attention_mask, past_key_values=past_key_values,
                                   **kwargs)
        residual = normed if self.post_residual else hidden_states
        hidden_states = residual + F.dropout(attn, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.post_residual else hidden_states
        return residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = make_norm(config) if config.post_layer_norm else None


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
@force_packed_attention
class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            with torch.no_grad():
                module.inv_freq.copy_(module.compute_inv_freq(module.inv_freq.device))


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, **kwargs) -> BaseModelOutputWithPast:
        """Returns last_hidden_state [B, T, H] after the final norm. attention_mask: 1-D cu_seqlens (packed),
        2-D [B, T(+past)] padding, or None; see packed_attention.prepare_packed_inputs."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)  # [B, T, H]
        bsz, seq = inputs_embeds.shape[:2]
        attention_mask, position_ids, packed_kwargs, cu_seqlens = prepare_packed_inputs(
            attention_mask, position_ids, bsz, seq, inputs_embeds.device)
        if cu_seqlens is not None:
            use_cache = False  # a pack is a training input; nothing to continue from
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.training and any(layer.gradient_checkpointing for layer in self.encoder.layers):
            use_cache = False  # recomputed layers must not write the cache twice
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(seq, device=inputs_embeds.device) + past).unsqueeze(0)  # [1, T]
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  past_key_values=past_key_values, position_ids=position_ids)
        rotary = self.rotary_pos_emb(position_ids, inputs_embeds.dtype)  # cos, sin [B|1, T, R/2]
        hidden_states = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for layer in self.encoder.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            # position_ids reach the attention function as transformers' layers pass them (sequence parallelism
            # gathers them across ranks there)
            hidden_states = layer(hidden_states, rotary=rotary, attention_mask=mask, position_ids=position_ids,
                                  past_key_values=past_key_values, **packed_kwargs, **kwargs)
        if self.encoder.final_layernorm is not None:
            hidden_states = self.encoder.final_layernorm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values,
                                       hidden_states=tuple(all_hidden) if all_hidden is not None else None)


class ChatGLMForConditionalGeneration(PackedCausalLM, ChatGLMPreTrainedModel, GenerationMixin):
    """The causal LM: forward() is packed_attention.PackedCausalLM's (packed inputs, the chunked weighted loss over
    `transformer` and `transformer.output_layer`), the same batch interface as every model of patch/."""

    _tied_weights_keys = {"transformer.output_layer.weight": "transformer.embedding.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value


__all__ = ["ChatGLMConfig", "ChatGLMModel", "ChatGLMForConditionalGeneration", "ChatGLMPreTrainedModel"]
