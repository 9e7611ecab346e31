"""CUDA checks for patch/ (skipped without a GPU): every available packed-attention backend against per-sample
SDPA in bf16 (with and without a sliding window), packed vs unpacked gradients in bf16 (Llama, GLM-4 and
transformers' own GLM-Edge / Qwen3 / Mistral classes with the packed forward), and the chunked loss on GPU.

    python -m pytest -q tests/patch/test_models_gpu.py
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from patch import packed_attention as PA

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _cuda_backends():
    if not torch.cuda.is_available():
        return ["flash_attn", "torch_varlen"]  # collected but skipped
    return [b for b in PA.available_backends(CUDA, torch.bfloat16) if b != "sdpa"]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("backend", _cuda_backends())
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("window", [None, 50])  # a sliding window (Mistral, Qwen's sliding layers)
def test_backend_matches_per_sample_sdpa_bf16(backend, heads, window):
    if backend not in PA.available_backends(CUDA, torch.bfloat16, window=window is not None):
        pytest.skip(f"{backend} not available here" + (" with a sliding window" if window else ""))
    hq, hkv = heads
    torch.manual_seed(0)
    lengths = [1, 17, 128, 333, 64]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=CUDA)
    total = sum(lengths)
    q = torch.randn(total, hq, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, hkv, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, hkv, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(total, hq, 64, device=CUDA, dtype=torch.bfloat16)
    out = PA.varlen_attention(q, k, v, cu, max(lengths), 64**-0.5, backend=backend, window=window)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad)
    ref = PA.varlen_attention(q, k, v, cu, max(lengths), 64**-0.5, backend="sdpa", window=window)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad)
    assert out.shape == ref.shape == (total, hq, 64)
    assert (out.float() - ref.float()).abs().max().item() < 2e-2
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        assert _rel(a, b) < 2e-2


def _tiny(family):
    if family.startswith("hf_"):  # transformers' own class + the packed forward (patch/modeling_native.py)
        from tests.tiny_native import OURS, native_config

        kind = family[3:]
        return OURS[kind](native_config(kind, vocab_size=512, hidden_size=256, intermediate_size=512, head_dim=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=1))
    if family == "llama":
        from transformers import LlamaConfig

        from patch.modeling_llama import LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
        return LlamaForCausalLM(cfg)
    from patch.configuration_chatglm import ChatGLMConfig
    from patch.modeling_chatglm import ChatGLMForConditionalGeneration

    cfg = ChatGLMConfig(num_layers=2, padded_vocab_size=512, hidden_size=256, ffn_hidden_size=512, kv_channels=64,
                        num_attention_heads=4, multi_query_group_num=2, rope_ratio=500, eos_token_id=[1],
                        pad_token_id=0)
    return ChatGLMForConditionalGeneration(cfg)


@pytest.mark.parametrize("family", ["llama", "glm4", "hf_glm", "hf_qwen3", "hf_mistral"])  # mistral: window 6
@pytest.mark.parametrize("backend", _cuda_backends() + ["sdpa"])
def test_packed_vs_unpacked_grads_bf16(family, backend, monkeypatch):
    if backend not in PA.available_backends(CUDA, torch.bfloat16, window=family == "hf_mistral"):
        pytest.skip(f"{backend} not available here")
    monkeypatch.setenv("PACKED_ATTN_BACKEND", backend)
    torch.manual_seed(0)
    model = _tiny(family).to(CUDA, torch.bfloat16).train()
    lengths = [40, 7, 90]
    samples = [torch.randint(2, 512, (n,), device=CUDA) for n in lengths]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=CUDA)
    n_targets = sum(n - 1 for n in lengths)
    model(torch.cat(samples)[None], attention_mask=cu, labels=torch.cat(samples)[None],
          num_items_in_batch=n_targets).loss.backward()
    packed = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for s in samples:
        model(s[None], labels=s[None], num_items_in_batch=n_targets).loss.backward()
    for n, p in model.named_parameters():
        assert _rel(packed[n], p.grad) < 3e-2, n


def test_chunked_loss_gpu_bf16_value_grads_and_memory():
    torch.manual_seed(0)
    vocab, hidden, tokens = 151552, 256, 8192
    head = torch.nn.Linear(hidden, vocab, bias=False, device=CUDA, dtype=torch.bfloat16)
    h = torch.randn(1, tokens, hidden, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens), device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = PA.causal_lm_loss(h, head, labels, chunk_size=1024)
    g_h, g_w = torch.autograd.grad(loss, (h, head.weight))
    peak = torch.cuda.max_memory_allocated() - before
    full_fp32_logits = tokens * vocab * 4
    assert peak < full_fp32_logits / 2, (peak, full_fp32_logits)
    logits = head(h[0, :-1]).float()
    ref = F.cross_entropy(logits, labels[0, 1:])
    r_h, r_w = torch.autograd.grad(ref, (h, head.weight))
    assert abs(loss.item() - ref.item()) < 1e-3 * ref.item()
    assert _rel(g_h, r_h) < 2e-2 and _rel(g_w, r_w) < 2e-2
