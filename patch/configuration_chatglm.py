"""ChatGLMConfig for GLM-4 checkpoints in the "chatglm" remote-code format (THUDM/glm-4-9b, glm-4-9b-chat,
LongWriter-glm4-9b). Reads their config.json as it is; defaults are glm-4-9b-chat's values.

Differences from upstream's file: `seq_length` is informational only (RoPE is computed for any position, so
it never needs editing); `loss_chunk_size` (tokens per chunk of the chunked loss) is new; generic names used by
transformers (`num_hidden_layers`, `vocab_size`, `head_dim`, `num_key_value_heads`; DeepSpeed's Ulysses sequence
parallelism reads the last two) map onto the chatglm names. Supported transformers: >= 5.0.

`rope_ratio` means two things in THUDM's files (REFERENCE 11), and `rope_ratio_mode` says which:
  "positions"  ChatGLM2-6B-32K: positions are divided by it (linear position interpolation; angle of pair j at
               position p = (p / rope_ratio) * 10000 ** (-2j / rot_dim)); LL-BaiYang's "elastic" RoPE;
  "base"       ChatGLM3-6B-32K/128K and GLM-4: the base is multiplied (angle = p * (10000 * rope_ratio) **
               (-2j / rot_dim)).
config.json's own `rope_ratio_mode` wins (main.py writes it into every config it saves). Without it, and with a
rope_ratio other than 1, `from_pretrained` tells the generation from the folder (`rope_ratio_mode_of_folder`):
  1. the folder's own (hub) modeling_chatglm.py, or its copy in patch_backup/ (patch/install.py), says which rule
     it implements: `base = base * self.rope_ratio` (ChatGLM3, GLM-4) or `... / self.rope_ratio` on the positions
     (ChatGLM2-6B-32K); our own file (it imports packed_attention) says nothing;
  2. else the tokenizer files, by the rule that tells the model family (patch/families.py, which is not copied
     into model folders: the same rule here, tests/patch/test_chatglm_rope.py checks they agree): a tiktoken
     `tokenizer.model` is GLM-4 ("base"); a SentencePiece one is ChatGLM3 ("base") when tokenizer_config.json
     says `chatglm_version: 3` or names ChatGLM3's role tokens (tokenization_chatglm.detect_chatglm_version), or
     the folder's own tokenization_chatglm.py builds them (older chatglm3-6b snapshots), else ChatGLM2
     ("positions");
  3. else (no such files; or a config built in code without the key): "base", as this file always did.

Tiny check: python -c "from patch.configuration_chatglm import ChatGLMConfig; print(ChatGLMConfig(num_layers=2))"
"""
import json
import logging
import os
import re
from pathlib import Path

from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

ROPE_RATIO_MODES = ("positions", "base")
_HUB_BASE_RULE = re.compile(r"base\s*=\s*base\s*\*\s*self\.rope_ratio")
_HUB_POSITION_RULE = re.compile(r"arange\([^)]*\)\s*/\s*self\.rope_ratio")
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")


def rope_ratio_mode_of_folder(folder) -> tuple[str, str]:
    """(mode, why) for a chatglm-format model folder whose config.json has no `rope_ratio_mode` (module docstring:
    the folder's own modeling file, else its tokenizer files, else "base")."""
    root = Path(folder)
    for name in ("modeling_chatglm.py", "patch_backup/modeling_chatglm.py"):
        p = root / name
        text = p.read_text(encoding="utf-8", errors="replace") if p.is_file() else ""
        if "packed_attention" in text:
            continue  # our own file: it reads rope_ratio_mode, it does not define the folder's rule
        if _HUB_BASE_RULE.search(text):
            return "base", f"{name} multiplies the RoPE base by rope_ratio (ChatGLM3 / GLM-4)"
        if _HUB_POSITION_RULE.search(text):
            return "positions", f"{name} divides the positions by rope_ratio (ChatGLM2-6B-32K)"
    model = root / "tokenizer.model"
    if model.is_file():
        with open(model, "rb") as f:
            head = f.read(512)
        if _TIKTOKEN_LINE.match(head):
            return "base", "tokenizer.model is GLM-4's tiktoken vocabulary"
        tok_config = {}
        if (root / "tokenizer_config.json").is_file():
            try:
                tok_config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
            except ValueError:
                tok_config = {}
        from .tokenization_chatglm import SP_ROLE_TOKENS, detect_chatglm_version

        version = tok_config.get("chatglm_version") or detect_chatglm_version(tok_config)
        code = root / "tokenization_chatglm.py"  # the hub's tokenizer code, read as text (ours names every token)
        text = code.read_text(encoding="utf-8", errors="replace") if code.is_file() else ""
        if "def detect_chatglm_version(" not in text and any(t in text for t in SP_ROLE_TOKENS):
            version = version if "chatglm_version" in tok_config else 3
        if int(version) == 3:
            return "base", "the tokenizer is ChatGLM3's (role tokens / chatglm_version 3)"
        return "positions", "the tokenizer is ChatGLM2's (SentencePiece, no role tokens)"
    return "base", "neither a hub modeling file nor tokenizer files tell ChatGLM2 from ChatGLM3 / GLM-4"


def _local_folder(name_or_path, kwargs: dict):
    """The folder config.json was read from: a local folder, or the hub cache's snapshot (None if unknown)."""
    path = os.path.join(str(name_or_path), kwargs.get("subfolder") or "")
    if os.path.isdir(path):
        return path
    if os.path.isfile(str(name_or_path)):
        return os.path.dirname(str(name_or_path)) or "."
    try:
        from transformers.utils import cached_file

        found = cached_file(str(name_or_path), "config.json", cache_dir=kwargs.get("cache_dir"),
                            revision=kwargs.get("revision"), subfolder=kwargs.get("subfolder") or "",
                            _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - offline, gated, ...: the folder is unknown, the default rule applies
        return None
    return os.path.dirname(found) if found else None


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size", "head_dim": "kv_channels"}

    @property
    def num_key_value_heads(self) -> int:
        """Key/value heads: multi_query_group_num with multi_query_attention, else num_attention_heads."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def rope_rule(self) -> str:
        """How `rope_ratio` applies: "positions" (divide positions) or "base" (multiply the base); see above."""
        return "positions" if self.rope_ratio_mode == "positions" else "base"

    def to_dict(self) -> dict:
        """As saved: `rope_ratio_mode` only once it is known (a hub config.json never has it)."""
        out = super().to_dict()
        if out.get("rope_ratio_mode") is None:
            out.pop("rope_ratio_mode", None)
        return out

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """config.json as a dict; a rope_ratio other than 1 without `rope_ratio_mode` gets the mode its folder
        tells (rope_ratio_mode_of_folder), so the model, and every config saved from it, says which rule runs."""
        folder_kwargs = {k: kwargs.get(k) for k in ("subfolder", "cache_dir", "revision")}
        config_dict, rest = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if float(config_dict.get("rope_ratio") or 1) != 1 and not config_dict.get("rope_ratio_mode"):
            folder = _local_folder(pretrained_model_name_or_path, folder_kwargs)
            mode, why = rope_ratio_mode_of_folder(folder) if folder else ("base", "the model folder is unknown")
            logger.info("%s: rope_ratio %s applies to the %s (%s)", pretrained_model_name_or_path,
                        config_dict["rope_ratio"], "positions" if mode == "positions" else "RoPE base", why)
            config_dict = {**config_dict, "rope_ratio_mode": mode}
        return config_dict, rest

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
        rope_ratio=1.0,  # RoPE base x rope_ratio, or positions / rope_ratio: see rope_ratio_mode
        rope_ratio_mode=None,  # "positions" (ChatGLM2-6B-32K) | "base" (ChatGLM3, GLM-4) | None: "base"
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
        if rope_ratio_mode not in (None, *ROPE_RATIO_MODES):
            raise ValueError(f"rope_ratio_mode {rope_ratio_mode!r}: expected one of {ROPE_RATIO_MODES} (or none)")
        self.rope_ratio_mode = rope_ratio_mode
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


__all__ = ["ChatGLMConfig", "rope_ratio_mode_of_folder"]
