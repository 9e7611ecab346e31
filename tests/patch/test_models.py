"""patch/ models on tiny random configs, fp32 on CPU: peers, packing exactness, loss, generate (install: test_install.py).

    python -m pytest -q tests/patch/test_models.py
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import GlmConfig, GlmForCausalLM, LlamaConfig
from transformers import LlamaForCausalLM as StockLlama
from transformers.modeling_layers import GradientCheckpointingLayer

from patch import packed_attention as PA
from patch.configuration_chatglm import ChatGLMConfig
from patch.modeling_chatglm import ChatGLMForConditionalGeneration
from patch.modeling_llama import LlamaForCausalLM
from tests.tiny_native import NATIVE, maker

VOCAB = 101
TOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Tiny models and their peers
# ----------------------------------------------------------------------------------------------
def llama_config(**over) -> LlamaConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, rope_theta=5000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
              tie_word_embeddings=False)
    kw.update(over)
    return LlamaConfig(**kw)


def glm_config(**over) -> ChatGLMConfig:
    kw = dict(num_layers=2, padded_vocab_size=VOCAB, hidden_size=48, ffn_hidden_size=80, kv_channels=16,
              num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
              rope_ratio=3.0, layernorm_epsilon=1e-5, seq_length=8, eos_token_id=[97, 98, 99], pad_token_id=97)
    kw.update(over)
    return ChatGLMConfig(**kw)


def make_llama(seed=0, **over):
    torch.manual_seed(seed)
    ours = LlamaForCausalLM(llama_config(**over)).eval()
    stock = StockLlama(llama_config(**over)).eval()
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def native_glm_state_dict(sd: dict, cfg: ChatGLMConfig) -> dict:
    """chatglm state dict -> transformers GlmForCausalLM keys (REFERENCE 1)."""
    q = cfg.num_attention_heads * cfg.kv_channels
    kv = (cfg.multi_query_group_num if cfg.multi_query_attention else cfg.num_attention_heads) * cfg.kv_channels
    out = {"model.embed_tokens.weight": sd["transformer.embedding.word_embeddings.weight"],
           "model.norm.weight": sd["transformer.encoder.final_layernorm.weight"],
           "lm_head.weight": sd["transformer.output_layer.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            t = sd[src + f"self_attention.query_key_value.{kind}"]
            out[dst + f"self_attn.q_proj.{kind}"] = t[:q]
            out[dst + f"self_attn.k_proj.{kind}"] = t[q:q + kv]
            out[dst + f"self_attn.v_proj.{kind}"] = t[q + kv:]
        out[dst + "self_attn.o_proj.weight"] = sd[src + "self_attention.dense.weight"]
        out[dst + "mlp.gate_up_proj.weight"] = sd[src + "mlp.dense_h_to_4h.weight"]
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.dense_4h_to_h.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
    return out


def make_glm(seed=0, config: ChatGLMConfig | None = None, **over):
    """Our chatglm-format model (GLM-4 tiny config, or `config`) and transformers' GlmForCausalLM peer."""
    torch.manual_seed(seed)
    cfg = config if config is not None else glm_config(**over)
    ours = ChatGLMForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a mis-mapped norm would show
        for name, p in ours.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    native_cfg = GlmConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.multi_query_group_num if cfg.multi_query_attention else cfg.num_attention_heads,
        head_dim=cfg.kv_channels, rms_norm_eps=cfg.layernorm_epsilon, attention_bias=cfg.add_qkv_bias,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * cfg.rope_ratio,
                         "partial_rotary_factor": 0.5},
        eos_token_id=cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else list(cfg.eos_token_id),
        pad_token_id=cfg.pad_token_id, tie_word_embeddings=False)
    peer = GlmForCausalLM(native_cfg).eval()
    result = peer.load_state_dict(native_glm_state_dict(ours.state_dict(), cfg), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, peer


def tiny_hub_config(hub: dict, **over) -> ChatGLMConfig:
    """A hub config.json (below) read as it is, at tiny sizes: every other field (no rope_ratio, layer scaling,
    fp32 softmax, eos/pad ids, seq_length) stays the hub's."""
    sizes = dict(num_layers=2, padded_vocab_size=VOCAB, hidden_size=48, ffn_hidden_size=80, kv_channels=16,
                 num_attention_heads=4, multi_query_group_num=2)
    return ChatGLMConfig.from_dict({**hub, **sizes, **over})


def make_chatglm2(seed=0, **over):
    return make_glm(seed, config=tiny_hub_config(CHATGLM2_6B_CONFIG, **over))


def make_chatglm3(seed=0, **over):
    return make_glm(seed, config=tiny_hub_config(CHATGLM3_6B_CONFIG, **over))


FAMILIES = {"llama": make_llama, "glm4": make_glm, "chatglm2": make_chatglm2, "chatglm3": make_chatglm3,
            # transformers' own classes with the packed forward (patch/modeling_native.py) vs the stock ones
            **{f"hf_{kind}": maker(kind) for kind in NATIVE}}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------------------
# 1-2. Peers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_peer(family):
    ours, peer = FAMILIES[family]()
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        assert (ours(ids).logits - peer(ids).logits).abs().max().item() <= TOL
        a, b = ours(ids, attention_mask=mask).logits, peer(ids, attention_mask=mask).logits
        assert (a - b)[mask.bool()].abs().max().item() <= TOL
        # labels alone: the usual mean cross-entropy over supervised tokens, as the peer returns it
        labels = ids.clone()
        labels[:, :5] = -100
        out = ours(ids, labels=labels)
        assert out.logits is None
        assert abs(out.loss.item() - peer(ids, labels=labels).loss.item()) <= TOL


GLM4_9B_CHAT_CONFIG = {  # the hub's config.json fields (REFERENCE 1), including ones our code does not use
    "_name_or_path": "THUDM/glm-4-9b-chat", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                 "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
    "attn_implementation": "sdpa", "bias_dropout_fusion": True, "ffn_hidden_size": 13696,
    "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096, "kv_channels": 128,
    "layernorm_epsilon": 1.5625e-07, "multi_query_attention": True, "multi_query_group_num": 2,
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_layers": 40, "rope_ratio": 500, "original_rope": True,
    "padded_vocab_size": 151552, "post_layer_norm": True, "rmsnorm": True, "seq_length": 131072, "use_cache": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.44.0", "tie_word_embeddings": False,
    "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
}


_CHATGLM_6B_AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
CHATGLM2_6B_CONFIG = {  # chatglm2-6b's config.json fields (REFERENCE 5): no rope_ratio
    "_name_or_path": "THUDM/chatglm2-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "auto_map": _CHATGLM_6B_AUTO_MAP, "add_bias_linear": False, "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696, "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096,
    "kv_channels": 128, "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": 2,
    "num_attention_heads": 32, "num_layers": 28, "original_rope": True, "padded_vocab_size": 65024,
    "post_layer_norm": True, "rmsnorm": True, "seq_length": 32768, "use_cache": True, "torch_dtype": "float16",
    "transformers_version": "4.27.1", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
}
CHATGLM3_6B_CONFIG = {**CHATGLM2_6B_CONFIG, "_name_or_path": "THUDM/chatglm3-6b", "seq_length": 8192,
                      "transformers_version": "4.30.2"}


@pytest.mark.parametrize("hub, layers, rows, total", [
    (None, 40, 151552, 9_399_951_360), (CHATGLM2_6B_CONFIG, 28, 65024, 6_243_584_000),
    (CHATGLM3_6B_CONFIG, 28, 65024, 6_243_584_000)], ids=["glm-4-9b", "chatglm2-6b", "chatglm3-6b"])
def test_checkpoint_layout_full_size(hub, layers, rows, total):
    """The exact keys and shapes of REFERENCE 1 (glm-4-9b) / 5 (chatglm2-6b, chatglm3-6b config.json read as it
    is) and their parameter counts, built on the meta device."""
    cfg = ChatGLMConfig() if hub is None else ChatGLMConfig.from_dict(dict(hub))
    if hub is not None:  # no rope_ratio in the file: 1, RoPE base 10000; the numerical-trick flags are read
        assert "rope_ratio" not in hub and cfg.rope_ratio == 1.0 and cfg.seq_length == hub["seq_length"]
        assert cfg.apply_query_key_layer_scaling and cfg.attention_softmax_in_fp32 and cfg.dtype == torch.float16
        assert cfg.eos_token_id == 2 and cfg.pad_token_id == 0
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(cfg)
    if hub is not None:
        assert model.transformer.rotary_pos_emb.base == 10000.0 and model.generation_config.eos_token_id == 2
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == total
    layer = f"transformer.encoder.layers.{layers - 1}."
    expected = {
        "transformer.embedding.word_embeddings.weight": (rows, 4096),
        layer + "input_layernorm.weight": (4096,),
        layer + "self_attention.query_key_value.weight": (4608, 4096),
        layer + "self_attention.query_key_value.bias": (4608,),
        layer + "self_attention.dense.weight": (4096, 4096),
        layer + "post_attention_layernorm.weight": (4096,),
        layer + "mlp.dense_h_to_4h.weight": (27392, 4096),
        layer + "mlp.dense_4h_to_h.weight": (4096, 13696),
        "transformer.encoder.final_layernorm.weight": (4096,),
        "transformer.output_layer.weight": (rows, 4096),
        "transformer.rotary_pos_emb.inv_freq": (32,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert len(shapes) == 4 + layers * 7


def test_glm4_hub_config_reads_as_is():
    cfg = ChatGLMConfig.from_dict(dict(GLM4_9B_CHAT_CONFIG))
    assert (cfg.num_layers, cfg.num_hidden_layers, cfg.vocab_size, cfg.rope_ratio) == (40, 40, 151552, 500)
    assert cfg.eos_token_id == [151329, 151336, 151338] and cfg.pad_token_id == 151329
    assert cfg.dtype == torch.bfloat16 and cfg.tie_word_embeddings is False
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(cfg)
    assert model.config._attn_implementation == PA.ATTN_IMPLEMENTATION  # "sdpa" in the file is overridden
    assert model.generation_config.eos_token_id == [151329, 151336, 151338]


def test_glm4_rope_any_position():
    """Positions far beyond config.seq_length work and match the peer (no RoPE cache to resize)."""
    ours, peer = make_glm(seq_length=8)
    ids = torch.randint(3, 97, (1, 20))
    pos = torch.arange(20).unsqueeze(0) + 5000
    with torch.no_grad():
        a = ours(ids, position_ids=pos).logits
        b = peer(ids, position_ids=pos).logits
    assert (a - b).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------
# 3. Packing is exact
# ----------------------------------------------------------------------------------------------
def _pack(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    samples, labels = [], []
    for n in lengths:
        ids = torch.randint(3, 97, (n,), generator=g)
        lab = ids.clone()
        lab[: max(1, n // 3)] = -100  # prompt part
        lab[0] = ids[0]  # a supervised first token: a prediction into it would cross the boundary
        samples.append(ids)
        labels.append(lab)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    weights = []
    for lab in labels:
        n_targets = int((lab[1:] != -100).sum())  # the first token has nothing before it
        weights.append(torch.where(lab != -100, 1.0 / max(n_targets, 1), 0.0))
    return samples, labels, weights, cu


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("positions", ["reset", "running"])
def test_packing_exact(family, positions):
    ours, _ = FAMILIES[family]()
    lengths = [5, 9, 1, 7]
    samples, labels, weights, cu = _pack(lengths)
    ids = torch.cat(samples)[None]
    pos = None if positions == "reset" else torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        packed = ours(ids, attention_mask=cu, position_ids=pos).logits[0]
        for i, s in enumerate(samples):
            solo = ours(s[None]).logits[0]
            assert rel_err(packed[cu[i]:cu[i + 1]], solo) <= TOL

    # Weighted loss (LongAlign): same value and parameter gradients as the solo runs summed
    denom = 3.0  # a trainer-supplied normaliser
    ours.train()
    ours.zero_grad()
    loss = ours(ids, attention_mask=cu, position_ids=pos, labels=torch.cat(labels)[None],
                weights=torch.cat(weights)[None], pack_loss=True, num_items_in_batch=denom).loss
    loss.backward()
    grads_packed = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    total = 0.0
    for s, lab, w in zip(samples, labels, weights):
        part = ours(s[None], labels=lab[None], weights=w[None], pack_loss=True,
                    num_items_in_batch=torch.tensor(denom)).loss
        part.backward()
        total += part.item()
    assert abs(loss.item() - total) <= TOL * max(1.0, abs(total))
    for name, p in ours.named_parameters():
        if p.grad is None or p.grad.abs().max() == 0:
            continue
        assert rel_err(grads_packed[name], p.grad) <= TOL, name


def test_position_ids_derived_from_cu_seqlens():
    cu = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32)
    assert PA.position_ids_from_cu_seqlens(cu, 8).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]


def _varlen_math(q, k, v, cu, max_len, scale):
    # what torch's CUDA-only varlen_attn computes, on CPU: per-sample causal attention with equal head counts
    assert q.shape[1] == k.shape[1], "this signature has no GQA: the caller must repeat the KV heads"
    return PA._attn_sdpa_per_sample(q, k, v, cu, max_len, q.shape[-1] ** -0.5 if scale is None else scale)


def _varlen_torch_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal
    return _varlen_math(query, key, value, cu_seq_q, max_q, None)  # no `scale` argument: the default D**-0.5


def _varlen_torch_2_10_on(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                          window_size=(-1, -1), enable_gqa=False):
    assert tuple(window_size) == (-1, 0)
    if enable_gqa:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    return _varlen_math(query, key, value, cu_seq_q, max_q, scale)


@pytest.mark.parametrize("fn", [_varlen_torch_2_9, _varlen_torch_2_10_on], ids=["torch2.9", "torch2.10+"])
@pytest.mark.parametrize("scale", [8**-0.5, 0.2])  # GLM/Llama use the default; 0.2 needs the q pre-scaling
def test_torch_varlen_call_fits_each_signature(fn, scale):
    """The torch_varlen backend adapts to the varlen_attn signature it finds (2.9: is_causal, no scale/GQA; later:
    window_size, scale, enable_gqa): same result as per-sample SDPA with grouped heads and any scale."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 10, 11], dtype=torch.int32)
    q, k, v = torch.randn(11, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    out = PA._attn_torch_varlen(q, k, v, cu, 7, scale, fn=fn)
    ref = PA.varlen_attention(q, k, v, cu, 7, scale, backend="sdpa")
    assert out.shape == (11, 4, 8)
    assert rel_err(out, ref) <= TOL


def test_bad_packed_mask_is_reported():
    ours, _ = make_llama()
    ids = torch.randint(3, 97, (1, 6))
    with pytest.raises(ValueError, match="end at the sequence length 6"):
        ours(ids, attention_mask=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="batch size is 2"):
        ours(ids.repeat(2, 1), attention_mask=torch.tensor([0, 6], dtype=torch.int32))


# ----------------------------------------------------------------------------------------------
# 4. Loss: weighting, chunking
# ----------------------------------------------------------------------------------------------
def _targets(labels, cu):
    """Shifted targets [T-1] for positions 0..T-2, -100 where a prediction would cross a sample boundary."""
    targets = labels[0, 1:].clone()
    for end in cu[1:-1].tolist():
        targets[end - 1] = -100  # position end-1 would predict the next sample's first token
    return targets


def _reference_loss(logits, labels, weights, cu, denom=None):
    """Unchunked reference on full fp32 logits: sum_t w_t CE_t / D (D defaults to sum w_t)."""
    targets, w = _targets(labels, cu), weights[0, 1:]
    keep = targets != -100
    ce = F.cross_entropy(logits[0, :-1].float()[keep], targets[keep], reduction="none")
    return (ce * w[keep]).sum() / (w[keep].sum() if denom is None else denom)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chunked_loss_equals_unchunked(family):
    ours, _ = FAMILIES[family]()
    samples, labels, weights, cu = _pack([6, 11, 4])
    ids, lab, w = torch.cat(samples)[None], torch.cat(labels)[None], torch.cat(weights)[None]
    params = [p for p in ours.parameters()]

    logits = ours(ids, attention_mask=cu).logits
    ref = _reference_loss(logits, lab, w, cu)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    for chunk in (1, 3, 4096):
        loss = ours(ids, attention_mask=cu, labels=lab, weights=w, pack_loss=True, loss_chunk_size=chunk).loss
        assert abs(loss.item() - ref.item()) <= TOL * abs(ref.item())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for g, r in zip(grads, ref_grads):
            if r is not None:
                assert rel_err(g, r) <= TOL
    # labels alone -> token mean; pack_loss without weights -> token mean too; explicit D
    plain_ref = _reference_loss(logits, lab, torch.ones_like(w), cu, denom=1.0)
    n = int((_targets(lab, cu) != -100).sum())
    with torch.no_grad():
        assert abs(ours(ids, attention_mask=cu, labels=lab).loss.item() - plain_ref.item() / n) <= TOL
        assert abs(ours(ids, attention_mask=cu, labels=lab, pack_loss=True).loss.item() - plain_ref.item() / n) <= TOL
        got = ours(ids, attention_mask=cu, labels=lab, num_items_in_batch=7).loss.item()
        assert abs(got - plain_ref.item() / 7) <= TOL
        # nothing supervised: a finite zero
        none = ours(ids, attention_mask=cu, labels=torch.full_like(lab, -100)).loss
        assert none.item() == 0.0


def test_chunked_ce_function_matches_autograd():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(1, 13, 8, requires_grad=True)
    labels = torch.randint(0, 50, (1, 13))
    labels[0, :3] = -100
    loss = PA.causal_lm_loss(hidden, head, labels, chunk_size=2)
    g1 = torch.autograd.grad(loss, [hidden, head.weight])
    ref = F.cross_entropy(head(hidden[0, :-1]), labels[0, 1:])
    g2 = torch.autograd.grad(ref, [hidden, head.weight])
    assert abs(loss.item() - ref.item()) <= TOL
    for a, b in zip(g1, g2):
        assert rel_err(a, b) <= TOL


# ----------------------------------------------------------------------------------------------
# 5. Gradient checkpointing and generate
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradient_checkpointing(family):
    ours, _ = FAMILIES[family]()
    samples, labels, _, cu = _pack([5, 8])
    ids, lab = torch.cat(samples)[None], torch.cat(labels)[None]
    ours.train()
    ours(ids, attention_mask=cu, labels=lab).loss.backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    for kwargs in ({}, {"gradient_checkpointing_kwargs": {"use_reentrant": False}}):
        ours.zero_grad()
        ours.gradient_checkpointing_enable(**kwargs)
        layers = [m for m in ours.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert len(layers) == 2 and all(layer.gradient_checkpointing for layer in layers)
        ours(ids, attention_mask=cu, labels=lab).loss.backward()
        for n, p in ours.named_parameters():
            assert torch.allclose(p.grad, plain[n], rtol=1e-5, atol=1e-7), (kwargs, n)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_matches_peer(family):
    ours, peer = FAMILIES[family]()
    torch.manual_seed(5)
    ids = torch.randint(3, 97, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # batched, left-padded
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=ours.config.pad_token_id)
    a = ours.generate(ids, attention_mask=mask, **kw)
    b = peer.generate(ids, attention_mask=mask, **kw)
    assert a.tolist() == b.tolist()


def test_glm4_generate_stops_on_eos_list():
    ours, _ = make_glm()
    assert ours.generation_config.eos_token_id == [97, 98, 99]
    ids = torch.randint(3, 97, (1, 5))
    free = ours.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[100], pad_token_id=97)[0, 5:]
    assert len(free) == 8
    stop_at = next(i for i in range(1, 8) if int(free[i]) not in free[:i].tolist())
    eos = [int(t) for t in (100, free[stop_at], 99)]  # the stop token is the second entry of the list
    ours.generation_config.eos_token_id = eos
    out = ours.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=97)[0, 5:]
    assert out.tolist() == free[: stop_at + 1].tolist()


# ----------------------------------------------------------------------------------------------
# 7. DeepSpeed ZeRO-3: the chunked loss calls lm_head as a module, so partitioned weights are gathered
# ----------------------------------------------------------------------------------------------
def _zero3_check(port: int) -> None:
    """Run in a fresh process (it initialises torch.distributed): ZeRO-3 grads == plain grads, both families."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}, "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "zero_allow_untested_optimizer": True}
    samples, labels, weights, cu = _pack([6, 11, 4])
    ids, lab, w = torch.cat(samples)[None], torch.cat(labels)[None], torch.cat(weights)[None]
    for family in ("glm4", "llama", "hf_qwen3"):  # chatglm2/3 run glm4's model code; qwen3: tied embeddings
        ref, _ = FAMILIES[family]()
        ref.train()
        kw = dict(attention_mask=cu, labels=lab, weights=w, pack_loss=True, num_items_in_batch=3, loss_chunk_size=4)
        ref(ids, **kw).loss.backward()
        model = copy.deepcopy(ref)
        model.zero_grad()
        # deepspeed.initialize partitions the parameters (stage 3, none kept whole)
        engine, *_ = deepspeed.initialize(model=model, config=ds_cfg, model_parameters=model.parameters())
        assert model.transformer.output_layer.weight.numel() == 0 if family == "glm4" else \
            model.lm_head.weight.numel() == 0  # really partitioned: the plain attribute is an empty placeholder
        engine.backward(engine(ids, **kw).loss)
        grads = dict(ref.named_parameters())
        for name, p in engine.module.named_parameters():
            assert rel_err(safe_get_full_grad(p), grads[name].grad) <= TOL, (family, name)
        print(f"zero3 ok: {family}")


@pytest.mark.slow
def test_chunked_loss_under_deepspeed_zero3():
    import subprocess
    import sys
    from pathlib import Path

    from tests.launch import free_port

    port = free_port()
    root = Path(__file__).resolve().parents[2]
    code = f"import sys; sys.path[:0] = [{str(root)!r}]; " \
           f"import tests.conftest; from tests.patch import test_models; test_models._zero3_check({port})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f"zero3 ok: {f}" in proc.stdout for f in ("glm4", "llama", "hf_qwen3")), proc.stdout
