"""ChatGLMConfig for GLM-4 checkpoints in the "chatglm" remote-code format (THUDM/glm-4-9b, glm-4-9b-chat,
LongWriter-glm4-9b). Reads their config.json as it is; defaults are glm-4-9b-chat's values.

Differences from upstream's file: `seq_length` is informational only (RoPE is computed for any position, so
it never needs editing); `loss_chunk_size` (tokens per chunk of the chunked loss) is new; generic names used by
transformers (`num_hidden_layers`, `vocab_size`, `head_dim`, `num_key_value_heads`; DeepSpeed's Ulysses sequence
parallelism reads the last two) map onto the chatglm names. Supported transformers: >= 5.0.

Tiny check: python -c "from patch.configuration_chatglm import ChatGLMConfig; print(ChatGLMConfig(num_layers=2))"
"""
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size", "head_dim": "kv_channels"}

    @property
    def num_key_value_heads(self) -> int:
        """Key/value heads: multi_query_group_num with multi_query_attention, else num_attention_heads."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @num_key_value_heads.setter
    def num_key_value_heads(self, value: int) -> None:  # a config.json written by other tools may carry it
        if self.multi_query_attention:
            self.multi_query_group_num = int(value)
        elif int(value) != self.num_attention_heads:
            raise ValueError(f"num_key_value_heads {value} needs multi_query_attention: true (multi_query_group_num)")

    def __init__(
        self,
        num_layers=40,
        padded_vocab_size=151552,
        hidden_size=4096,
        ffn_hidden_size=13696,
        kv_channels=128,  # head dim
        num_attention_heads=32,
        seq_length=131072,  # informational: positions are not limited by it
        hidden_dropout=0.0,
        classifier_dropout=None,
        attention_dropout=0.0,
        layernorm_epsilon=1.5625e-07,
        rmsnorm=True,
        apply_residual_connection_post_layernorm=False,
        post_layer_norm=True,
        add_bias_linear=False,
        add_qkv_bias=True,
        bias_dropout_fusion=True,
        multi_query_attention=True,
        multi_query_group_num=2,  # key/value groups when multi_query_attention
        rope_ratio=1.0,  # RoPE base = 10000 * rope_ratio
        apply_query_key_layer_scaling=True,
        attention_softmax_in_fp32=True,
        fp32_residual_connection=False,
        original_rope=True,
        initializer_range=0.02,
        use_cache=True,
        loss_chunk_size=1024,  # tokens per lm_head/cross-entropy chunk in the training loss
        tie_word_embeddings=False,
        eos_token_id=(151329, 151336, 151338),
        pad_token_id=151329,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.classifier_dropout = classifier_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.bias_dropout_fusion = bias_dropout_fusion
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.rope_ratio = rope_ratio
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.fp32_residual_connection = fp32_residual_connection
        self.original_rope = original_rope
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.loss_chunk_size = loss_chunk_size
        self.tie_word_embeddings = tie_word_embeddings
        self.eos_token_id = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else eos_token_id
        self.pad_token_id = pad_token_id
        super().__init__(**kwargs)


__all__ = ["ChatGLMConfig"]
