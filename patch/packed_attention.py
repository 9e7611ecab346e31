"""Packed-sequence attention, a lean chunked cross-entropy and the packed causal-LM forward, shared by every model
file of patch/ (modeling_llama.py, modeling_native.py, modeling_chatglm.py).

A packed batch is one row of several samples laid end to end ([1, L] input_ids) with their boundaries given as
`cu_seqlens = [0, e1, ..., L]` (int32) in the 1-D `attention_mask`, the format LongAlign/LongWriter use. This
module provides what both model files need for it:

- `prepare_packed_inputs`: validates a 1-D cu_seqlens mask, derives per-sample position ids, and returns the
  keyword arguments (`cu_seq_lens_q/k`, `max_length_q/k`, transformers' own names) that carry the boundaries
  down to the attention layers.
- `varlen_attention`: causal attention where each sample attends only to itself. The backend is chosen at run
  time and logged once: `flash_attn_varlen_func` (flash-attn installed, CUDA, fp16/bf16) -> PyTorch's
  `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16) -> scaled-dot-product attention per sample
  (CPU or anywhere). Grouped/multi-query heads and a sliding window (Mistral, Qwen's sliding layers: each query
  sees its `window` latest tokens, itself included) are supported by every backend; dropout is always 0.
- `packed_attention_forward`: the same thing as a transformers attention function, registered under the name
  `ATTN_IMPLEMENTATION` (with a matching mask builder); unpacked inputs fall through to transformers' SDPA path
  (unpadded rows longer than a sliding window go through varlen_attention, one sample per row).
- `PackedCausalLM`: the forward of a packed *ForCausalLM (packed inputs, chunked weighted loss), mixed into any
  transformers causal LM whose attention goes through the attention interface (`packed_causal_lm(cls)`), so
  transformers' own modeling code (weights, RoPE, norms, cache, generate) is used unchanged; also the forward of
  modeling_chatglm.ChatGLMForConditionalGeneration.
- `causal_lm_loss`: sum_t w_t * CE_t / D over supervised targets (labels shifted inside, never across a sample
  boundary), computed `chunk_size` tokens at a time through the lm_head module under activation checkpointing,
  so fp32 logits for the whole pack exist neither in forward nor in backward.
- `causal_lm_token_logps`: the same chunked path giving log p(target) of every supervised position instead of a
  loss (the forward's `return_token_logps=True`): what preference training (DPO) sums per sequence.

Tiny CPU check (from the repository root):
    python -c "import torch, patch.packed_attention as P; q=torch.randn(7,4,8); k=v=torch.randn(7,2,8); \
print(P.varlen_attention(q, k, v, torch.tensor([0,3,7], dtype=torch.int32), 4, 8**-0.5).shape)"
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # transformers >= 5: attention/mask registries and the stock SDPA path for unpacked batches
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError as exc:  # pragma: no cover - only on unsupported transformers versions
    raise ImportError(
        "patch/packed_attention.py needs transformers >= 5.0 (AttentionInterface, masking_utils); "
        f"install the version pinned in requirements.txt ({exc})"
    ) from exc

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ATTN_IMPLEMENTATION = "packed_varlen"  # name registered in transformers' attention + mask registries
DEFAULT_LOSS_CHUNK_SIZE = 1024  # tokens per lm_head/CE chunk: 1024 x 151,552 x 4 B = 0.62 GB of fp32 logits
BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
_logged: set[str] = set()


def _log_once(key: str, message: str) -> None:
    if key in _logged:
        return
    _logged.add(key)
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info(message)


# ---------------------------------------------------------------------------------------------------------------
# Packed batch inputs
# ---------------------------------------------------------------------------------------------------------------
def is_packed_mask(attention_mask) -> bool:
    """True when `attention_mask` is the upstream packed form: a 1-D integer cu_seqlens tensor."""
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Per-sample positions restarting at 0: [0, e1, e1+e2] -> [0..e1-1, 0..e2-1]. Returns LongTensor [1, total]."""
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]  # [n]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)  # [total]
    return (torch.arange(total, device=cu.device) - starts).unsqueeze(0)


def prepare_packed_inputs(attention_mask, position_ids, batch_size: int, seq_len: int, device):
    """Split the `attention_mask` argument into (mask for the model, position_ids, attention kwargs, cu_seqlens).

    1-D integer mask = packed cu_seqlens: requires batch_size 1, returns mask None, per-sample positions if none
    were given, kwargs with `cu_seq_lens_q/k` (int32) and `max_length_q/k` (python ints), and cu_seqlens.
    Anything else (2-D padding mask or None) is returned unchanged with empty kwargs and cu_seqlens None.
    """
    if not is_packed_mask(attention_mask):
        return attention_mask, position_ids, {}, None
    cu = attention_mask
    problems = []
    if cu.dtype.is_floating_point or cu.dtype == torch.bool:
        problems.append(f"dtype is {cu.dtype}; cu_seqlens must be an integer tensor")
    if batch_size != 1:
        problems.append(f"batch size is {batch_size}; a packed batch is one row (collate packs as [1, L])")
    values = cu.tolist()  # n+1 small ints: the one host sync a packed forward needs (max_seqlen for the kernels)
    if len(values) < 2 or values[0] != 0 or values[-1] != seq_len:
        problems.append(f"cu_seqlens must start at 0 and end at the sequence length {seq_len}, got {values[:3]}..."
                        f"{values[-2:]} (a 1-D attention_mask is read as packed boundaries [0, e1, ..., L])")
    if any(b < a for a, b in zip(values, values[1:])):
        problems.append("cu_seqlens must be non-decreasing")
    if problems:
        raise ValueError("Invalid packed attention_mask (cu_seqlens): " + "; ".join(problems))
    cu = cu.to(device=device, dtype=torch.int32)
    max_len = max(b - a for a, b in zip(values, values[1:]))
    if position_ids is None:
        position_ids = position_ids_from_cu_seqlens(cu, seq_len)
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}
    return None, position_ids, kwargs, cu


# ---------------------------------------------------------------------------------------------------------------
# Variable-length causal attention (one function, three backends)
# ---------------------------------------------------------------------------------------------------------------
def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _torch_varlen():
    try:
        module = importlib.import_module("torch.nn.attention.varlen")
    except ImportError:
        return None
    return getattr(module, "varlen_attn", None)


def _torch_varlen_has_window(fn=None) -> bool:
    fn = fn or _torch_varlen()
    return fn is not None and "window_size" in inspect.signature(fn).parameters


def available_backends(device: torch.device, dtype: torch.dtype, window: bool = False) -> list[str]:
    """Backends usable for tensors on `device` with `dtype` (and a sliding window if `window`), best first (the
    last one, sdpa, always works). torch's first varlen_attn (2.9) has no window: it is left out for windows."""
    out = []
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _flash_attn_available():
            out.append("flash_attn")
        if _torch_varlen() is not None and (not window or _torch_varlen_has_window()):
            out.append("torch_varlen")
    out.append("sdpa")
    return out


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # [T, H_kv, D] -> [T, H_kv * n_rep, D]; query head h uses kv head h // n_rep
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _attn_flash(q, k, v, cu, max_len, scale, window=None):
    from flash_attn import flash_attn_varlen_func

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    extra = {} if window is None else {"window_size": (window - 1, 0)}  # (left, right) tokens besides itself
    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=True,
                                  **extra)


def _attn_torch_varlen(q, k, v, cu, max_len, scale, fn=None, window=None):
    """torch's varlen_attn across its versions: the first (2.9) takes `is_causal` and no `scale`, later ones
    `window_size`, `scale` and `enable_gqa` (read off the signature, whatever the version number). Without a
    `scale` argument q is pre-scaled (softmax(s q.k) = softmax(s0 (s/s0) q.k), s0 = D**-0.5 the kernel's own);
    without `enable_gqa` the KV heads are repeated; a sliding `window` needs `window_size`. `fn` defaults to
    torch's."""
    fn = fn or _torch_varlen()
    params = inspect.signature(fn).parameters
    if window is not None and "window_size" not in params:
        raise ValueError(f"this torch's varlen_attn has no window_size: it cannot apply the sliding window of "
                         f"{window} tokens; set PACKED_ATTN_BACKEND=flash_attn or sdpa")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12 * scale:
        q = q * (scale / q.shape[-1] ** -0.5)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, q.shape[1] // k.shape[1]), _repeat_kv(v, q.shape[1] // k.shape[1])
    if "window_size" in params:  # newer torch: causal is window (-1, 0), a sliding window (window - 1, 0)
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)
    else:  # older torch: explicit flag
        kwargs["is_causal"] = True
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _attn_sdpa_per_sample(q, k, v, cu, max_len, scale, window=None):
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    bounds = cu.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # 4-D [1, H, L_i, D]: with 3-D inputs the CPU kernel falls back to the math path ([H, L_i, L_i] scores)
        qi, ki, vi = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if window is not None and end - start > window:  # band: key j visible from query i when i-window < j <= i
            i = torch.arange(end - start, device=q.device)
            band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # [L_i, L_i] bool
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=band, scale=scale)
        else:
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)  # [1, H, L_i, D]
        outs.append(oi[0].transpose(0, 1))  # [L_i, H, D]
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


_BACKEND_FNS = {"flash_attn": _attn_flash, "torch_varlen": _attn_torch_varlen, "sdpa": _attn_sdpa_per_sample}


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, scale: float, backend: str | None = None,
                     window: int | None = None):
    """Causal attention within each packed sample.

    q: [T, H_q, D], k/v: [T, H_kv, D] (H_q a multiple of H_kv), cu_seqlens: int32 [n+1] on q's device.
    `window`: a sliding window (each query sees its `window` latest tokens, itself included; transformers'
    `sliding_window`), None = full causal. Returns [T, H_q, D]. `backend` forces one of BACKENDS (else: env
    PACKED_ATTN_BACKEND, else the best available).
    """
    window = int(window) if window is not None and int(window) < max_seqlen else None  # no sample reaches it
    choice = backend or os.environ.get("PACKED_ATTN_BACKEND") or \
        available_backends(q.device, q.dtype, window is not None)[0]
    if choice not in _BACKEND_FNS:
        raise ValueError(f"unknown packed attention backend {choice!r}; choose one of {BACKENDS}")
    _log_once(f"backend:{choice}", f"packed attention backend: {choice} ({q.device.type}, {q.dtype})")
    extra = {} if window is None else {"window": window}
    return _BACKEND_FNS[choice](q, k, v, cu_seqlens, max_seqlen, scale, **extra)


# ---------------------------------------------------------------------------------------------------------------
# transformers attention interface: registered under ATTN_IMPLEMENTATION
# ---------------------------------------------------------------------------------------------------------------
UNSUPPORTED_EXTRAS = ("softcap", "s_aux", "sinks")  # attention kwargs some models pass; varlen_attention has none


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, **kwargs):
    """transformers AttentionInterface function. query [B, H_q, T_q, D], key/value [B, H_kv, T_k, D].

    With `cu_seq_lens_q` in kwargs (a packed batch, B == 1, no cache): varlen attention, with the layer's
    `sliding_window` if it has one. Without a mask, without a cache, rows longer than a sliding window: varlen
    attention with one sample per row (the mask builder built no mask). Otherwise transformers' own SDPA path with
    the mask transformers built (2-D padding, KV cache decoding, plain causal). Returns ([B, T_q, H_q, D], None).
    """
    bad = [k for k in UNSUPPORTED_EXTRAS if kwargs.get(k) is not None]
    if bad:
        raise NotImplementedError(f"{type(module).__name__} passes {bad} to its attention; packed attention "
                                  f"({ATTN_IMPLEMENTATION}) does not implement them")
    cu = kwargs.get("cu_seq_lens_q")
    b, _, t_q, _ = query.shape
    window = int(sliding_window) if sliding_window is not None else None
    unpacked_window = cu is None and attention_mask is None and window is not None and t_q == key.shape[2] > window
    if (cu is not None or unpacked_window) and t_q == key.shape[2]:
        if dropout:
            _log_once("dropout", "packed attention ignores attention dropout (always 0)")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if cu is None:  # B rows of T_q tokens = B samples laid end to end
            cu, max_len = torch.arange(0, b * t_q + 1, t_q, dtype=torch.int32, device=query.device), t_q
        else:
            max_len = int(kwargs["max_length_q"])
        q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))  # [B*T, H, D]
        out = varlen_attention(q, k, v, cu, max_len, scale, window=window)  # [B*T, H_q, D]
        return out.view(b, t_q, *out.shape[1:]), None
    _log_once("sdpa-unpacked", "unpacked batch: using transformers' SDPA attention")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  sliding_window=sliding_window, **kwargs)


def packed_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, **kwargs):
    """Mask builder for ATTN_IMPLEMENTATION: no mask at all without padding and cache (the attention function
    applies causality itself, per sample when packed, so no [T, T] mask is ever built for a pack); otherwise
    the stock SDPA mask."""
    if attention_mask is None and q_length == kv_length:
        return None
    extra = {} if mask_function is None else {"mask_function": mask_function}
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **extra, **kwargs)


ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, packed_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, packed_attention_mask)


def force_packed_attention(model_cls):
    """Class decorator for a PreTrainedModel: whatever `attn_implementation` is requested, use ours (it is the only
    one that honours cu_seqlens on every device; unpacked batches still go through SDPA inside it)."""

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        if attn_implementation not in (None, ATTN_IMPLEMENTATION):
            _log_once(f"attn:{attn_implementation}", f"attn_implementation={attn_implementation!r} replaced by "
                      f"{ATTN_IMPLEMENTATION!r} (packed varlen attention; SDPA for unpacked batches)")
        return ATTN_IMPLEMENTATION

    model_cls._check_and_adjust_attn_implementation = _check_and_adjust_attn_implementation
    return model_cls


# ---------------------------------------------------------------------------------------------------------------
# Loss: sum_t w_t * CE_t / D, chunked
# ---------------------------------------------------------------------------------------------------------------
def shift_targets(labels: torch.Tensor, weights: torch.Tensor | None, cu_seqlens: torch.Tensor | None):
    """Targets for each position: the next token's label, IGNORE_INDEX at the last position of every row and of
    every packed sample (a prediction never crosses a sample boundary). labels/weights [B, T] -> flat [B*T]."""
    targets = F.pad(labels[:, 1:].long(), (0, 1), value=IGNORE_INDEX)  # [B, T]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].to(torch.long) - 1  # last token of each sample
        ends = ends[ends >= 0]
        targets = targets.clone()
        targets[0, ends] = IGNORE_INDEX
    shifted_w = None if weights is None else F.pad(weights[:, 1:], (0, 1), value=0.0).reshape(-1)
    return targets.reshape(-1), shifted_w


class _WeightedCrossEntropy(torch.autograd.Function):
    """sum_i coef_i * (logsumexp(logits_i) - logits_i[target_i]) in fp32, for one chunk of rows.
    Backward builds the logits' gradient in one fp32 [rows, V] buffer instead of autograd's several."""

    @staticmethod
    def forward(ctx, logits, target, coef):
        x = logits.float()  # [c, V]
        lse = torch.logsumexp(x, dim=-1)  # [c]
        picked = x.gather(1, target[:, None]).squeeze(1)  # [c]
        ctx.save_for_backward(logits, target, coef, lse)
        return ((lse - picked) * coef).sum()

    @staticmethod
    def backward(ctx, grad_out):
        logits, target, coef, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        grad.copy_(logits).sub_(lse[:, None]).exp_()  # softmax [c, V]
        grad.scatter_add_(1, target[:, None], torch.full_like(lse[:, None], -1.0))  # softmax - onehot
        grad.mul_((coef * grad_out)[:, None])
        return grad.to(logits.dtype), None, None


def transform_logits(logits, scale: float = 1.0, softcap: float | None = None):
    """What some models do to lm_head's output: multiply by `scale` (Cohere's logit_scale, 1 / Granite's
    logits_scaling), then soft-cap to (-softcap, softcap) with tanh (Gemma-2/3's final_logit_softcapping)."""
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_loss(hidden, target, coef, lm_head, scale=1.0, softcap=None):
    logits = transform_logits(lm_head(hidden), scale, softcap)  # lm_head: [c, H] -> [c, V]
    return _WeightedCrossEntropy.apply(logits, target, coef)


def causal_lm_loss(hidden_states, lm_head, labels, *, weights=None, pack_loss=False, num_items_in_batch=None,
                   cu_seqlens=None, chunk_size=None, shift_labels=None, logit_scale=1.0, logit_softcap=None):
    """Weighted next-token cross-entropy: loss = sum_t w_t * CE_t / D.

    hidden_states [B, T, H] (after the final norm), lm_head: module [N, H] -> [N, V] (called as a module so hooks
    such as DeepSpeed ZeRO-3 gathering or PEFT wrappers apply), labels [B, T] aligned with input_ids (-100 = not
    supervised), weights [B, T] aligned with labels. w_t = weights at the target if pack_loss and weights is not
    None, else 1. D = num_items_in_batch if given (the trainer's constant for a whole optimizer step), else sum w_t.
    Only supervised positions go through lm_head, `chunk_size` rows at a time, each chunk under activation
    checkpointing (its logits are recomputed in backward), so at most one chunk of logits exists at any time.
    `shift_labels` [B, T] (instead of labels): the target of every position, already shifted over the whole pack,
    with `weights` aligned with it: what one rank's shard of a sequence-parallel pack carries (its last target
    is the first token of the next rank's shard). `logit_scale`, `logit_softcap`: the model's logits transform
    (`transform_logits`), applied to each chunk's logits before the cross-entropy.
    """
    hid = hidden_states.shape[-1]
    use_w = pack_loss and weights is not None
    if shift_labels is not None:
        targets = shift_labels.to(hidden_states.device).reshape(-1)  # [B*T]
        shifted_w = weights.to(hidden_states.device).reshape(-1) if use_w else None
    else:
        targets, shifted_w = shift_targets(labels.to(hidden_states.device),
                                           weights.to(hidden_states.device) if use_w else None, cu_seqlens)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # [N] supervised positions
    flat = hidden_states.reshape(-1, hid)  # [B*T, H]
    if rows.numel() == 0:  # nothing supervised: a zero loss that still touches every trainable weight
        rows = torch.zeros(1, dtype=torch.long, device=flat.device)
        target, coef = torch.zeros(1, dtype=torch.long, device=flat.device), torch.zeros(1, device=flat.device)
    else:
        target = targets[rows]  # [N]
        w = shifted_w[rows].float() if shifted_w is not None else torch.ones(rows.numel(), device=flat.device)
        denom = w.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=flat.device,
                                                                           dtype=torch.float32)
        coef = w / denom  # [N] fp32
    hidden = flat.index_select(0, rows)  # [N, H]
    chunk = int(chunk_size or DEFAULT_LOSS_CHUNK_SIZE)
    if chunk <= 0:
        raise ValueError(f"loss_chunk_size must be a positive number of tokens, got {chunk_size}")
    parts = [(hidden[i:i + chunk], target[i:i + chunk], coef[i:i + chunk]) for i in range(0, hidden.shape[0], chunk)]
    # ZeRO-3: every lm_head call gathers its weight collectively, so all ranks must make the same number of calls
    # (forward and checkpoint recompute); a rank with fewer chunks adds 1-row chunks of weight 0.
    padding = (hidden[:1], target[:1], torch.zeros_like(coef[:1]))
    parts += [padding] * (_max_chunks_across_ranks(len(parts), lm_head, flat.device) - len(parts))
    total = None
    for h, t, c in parts:
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_loss, h, t, c, lm_head, logit_scale, logit_softcap, use_reentrant=False)
        else:
            part = _chunk_loss(h, t, c, lm_head, logit_scale, logit_softcap)
        total = part if total is None else total + part
    return total


class _TargetLogProbs(torch.autograd.Function):
    """log softmax(logits_i)[target_i] in fp32 for one chunk of rows -> [c]; backward builds the logits' gradient
    g_i * (onehot - softmax) in one fp32 [rows, V] buffer, like _WeightedCrossEntropy."""

    @staticmethod
    def forward(ctx, logits, target):
        x = logits.float()  # [c, V]
        lse = torch.logsumexp(x, dim=-1)  # [c]
        picked = x.gather(1, target[:, None]).squeeze(1)  # [c]
        ctx.save_for_backward(logits, target, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out):
        logits, target, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        grad.copy_(logits).sub_(lse[:, None]).exp_().neg_()  # -softmax [c, V]
        grad.scatter_add_(1, target[:, None], torch.ones_like(lse[:, None]))  # onehot - softmax
        grad.mul_(grad_out.float()[:, None])
        return grad.to(logits.dtype), None


def _chunk_logps(hidden, target, lm_head, scale=1.0, softcap=None):
    logits = transform_logits(lm_head(hidden), scale, softcap)  # lm_head: [c, H] -> [c, V]
    return _TargetLogProbs.apply(logits, target)  # -> [c] fp32


def causal_lm_token_logps(hidden_states, lm_head, labels, *, cu_seqlens=None, chunk_size=None, shift_labels=None,
                          logit_scale=1.0, logit_softcap=None):
    """log p(target) at every position whose (shifted) target is supervised, 0 elsewhere: fp32 [B, T].

    Arguments as causal_lm_loss: `labels` [B, T] aligned with input_ids and shifted here (never across a sample
    boundary), or `shift_labels` [B, T] already shifted (a sequence-parallel shard). Only supervised positions go
    through lm_head, `chunk_size` rows at a time under activation checkpointing: at most one chunk of logits exists
    at a time, forward and backward. Summing the result over a sample's positions gives the sample's completion
    log-prob, differentiable (what DPO compares). Every rank makes the same number of lm_head calls (ZeRO-3), and
    a rank without supervised positions still touches every weight (a zero-weighted row), as in causal_lm_loss.
    `logit_scale`, `logit_softcap`: the model's logits transform (`transform_logits`), as in causal_lm_loss."""
    b, t, hid = hidden_states.shape
    if shift_labels is not None:
        targets = shift_labels.to(hidden_states.device).reshape(-1)  # [B*T]
    else:
        targets, _ = shift_targets(labels.to(hidden_states.device), None, cu_seqlens)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # [N]
    flat = hidden_states.reshape(-1, hid)  # [B*T, H]
    chunk = int(chunk_size or DEFAULT_LOSS_CHUNK_SIZE)
    if chunk <= 0:
        raise ValueError(f"loss_chunk_size must be a positive number of tokens, got {chunk_size}")
    hidden, target = flat.index_select(0, rows), targets[rows]  # [N, H], [N]
    parts = [(hidden[i:i + chunk], target[i:i + chunk]) for i in range(0, rows.numel(), chunk)]
    n_real = len(parts)
    # dummy 1-row chunks, weighted 0: ZeRO-3's equal lm_head call counts, and every weight touched without rows
    dummy = (flat[:1], torch.zeros(1, dtype=torch.long, device=flat.device))
    parts += [dummy] * (max(_max_chunks_across_ranks(n_real, lm_head, flat.device), 1 if n_real == 0 else 0)
                        - n_real)
    values = []
    for h, tg in parts:
        values.append(checkpoint(_chunk_logps, h, tg, lm_head, logit_scale, logit_softcap, use_reentrant=False)
                      if torch.is_grad_enabled() else _chunk_logps(h, tg, lm_head, logit_scale, logit_softcap))
    out = torch.zeros(b * t, dtype=torch.float32, device=flat.device)
    if n_real:
        out = out.index_put((rows,), torch.cat(values[:n_real]))
    if len(values) > n_real:  # zero, but part of the graph: the dummy chunks run in backward too
        out = out + 0.0 * torch.stack([v.sum() for v in values[n_real:]]).sum()
    return out.view(b, t)


def _max_chunks_across_ranks(n_chunks: int, lm_head, device) -> int:
    """The largest chunk count of any rank when lm_head's weight is partitioned by DeepSpeed ZeRO-3 (it carries a
    `ds_id`), else `n_chunks`. One all-reduce of a single integer per forward."""
    weight = getattr(lm_head, "weight", None)
    dist = torch.distributed
    if weight is None or not hasattr(weight, "ds_id") or not (dist.is_available() and dist.is_initialized()):
        return n_chunks
    count = torch.tensor([n_chunks], dtype=torch.long, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


# ---------------------------------------------------------------------------------------------------------------
# The packed forward of a transformers *ForCausalLM (transformers' own modules below it)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PackedCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus `token_logps` [B, T] fp32 (forward(..., return_token_logps=True)): a ModelOutput
    field, so wrappers that rebuild outputs (DDP, DeepSpeed, peft) keep it."""

    token_logps: torch.FloatTensor | None = None


class PackedCausalLM:
    """Mixin for a transformers causal LM with `base_model` (the decoder) and an output embedding (lm_head):
    `class XForCausalLM(PackedCausalLM, transformers.XForCausalLM)` (see `packed_causal_lm`). Only forward()
    changes: packed inputs and the chunked weighted loss; the decoder, weights, RoPE, cache and generate() are
    transformers' own. Batch interface (the same for every model of patch/):
      attention_mask: 1-D int cu_seqlens [n+1] (input_ids [1, L]: n samples laid end to end), 2-D [B, T] 0/1
        padding, or None; position_ids: [B, T], derived per sample from cu_seqlens when packed and None;
      labels [B, T] (-100 = not supervised), weights [B, T], pack_loss, num_items_in_batch, loss_chunk_size:
        loss = sum_t w_t * CE_t / D (causal_lm_loss); with labels given, `logits` is None;
      shift_labels [B, T] instead of labels: targets already shifted, for one rank's shard of a sequence-parallel
        pack, whose boundaries then come as kwargs cu_seq_lens_q/k, max_length_q/k (the whole pack's);
      return_token_logps: with labels / shift_labels, `token_logps` [B, T] (causal_lm_token_logps: log p(target)
        at each supervised position, chunked) instead of the loss."""

    def logits_transform(self) -> tuple[float, float | None]:
        """(scale, softcap) of `transform_logits`, from the config fields transformers' classes read after lm_head:
        Cohere's `logit_scale` (multiplied), Granite's and MiniCPM3's `logits_scaling` (divided), Gemma-2/3's
        `final_logit_softcapping` (RecurrentGemma's `logits_soft_cap`). longsft/model_types.py checks each model
        type with these set against transformers' own forward."""
        cfg = self.config
        scale = 1.0
        if getattr(cfg, "logit_scale", None) is not None:
            scale *= float(cfg.logit_scale)
        if getattr(cfg, "logits_scaling", None) is not None:
            scale /= float(cfg.logits_scaling)
        softcap = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logits_soft_cap", None)
        return scale, (float(softcap) if softcap else None)

    def forward(
        self,
        input_ids=None,  # [B, T]
        attention_mask=None,  # 1-D int cu_seqlens [n+1] (B == 1), 2-D [B, T] 0/1 padding, or None
        position_ids=None,  # [B, T]; derived per sample from cu_seqlens when packed and None
        past_key_values=None,
        inputs_embeds=None,  # [B, T, H]
        labels=None,  # [B, T] aligned with input_ids, -100 = not supervised
        use_cache=None,
        logits_to_keep=0,
        weights=None,  # [B, T] float, aligned with labels (e.g. 1/N_i per supervised token of sample i)
        shift_labels=None,  # [B, T] targets already shifted (a sequence-parallel shard; weights aligned with them)
        pack_loss=False,  # use `weights` in the loss
        num_items_in_batch=None,  # normaliser D (number or 0-d tensor); default: sum of the token weights
        loss_chunk_size=None,  # tokens per lm_head/CE chunk; default config.loss_chunk_size or 1024
        return_dict=None,  # False: a tuple, as transformers models return
        return_token_logps=False,  # with labels/shift_labels: `token_logps` [B, T] instead of the loss (DPO)
        **kwargs,
    ):
        ref = input_ids if input_ids is not None else inputs_embeds
        attention_mask, position_ids, packed_kwargs, cu_seqlens = prepare_packed_inputs(
            attention_mask, position_ids, ref.shape[0], ref.shape[1], ref.device
        )
        if cu_seqlens is not None:
            use_cache = False  # a pack is a training input; nothing to continue from
        outputs = self.base_model(
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
        lm_head = self.get_output_embeddings()  # [H] -> [V]
        scale, softcap = self.logits_transform()
        loss = logits = token_logps = None
        if return_token_logps and (labels is not None or shift_labels is not None):
            token_logps = causal_lm_token_logps(
                hidden_states, lm_head, labels, cu_seqlens=cu_seqlens, shift_labels=shift_labels,
                chunk_size=loss_chunk_size or getattr(self.config, "loss_chunk_size", None),
                logit_scale=scale, logit_softcap=softcap,
            )
        elif labels is not None or shift_labels is not None:
            loss = causal_lm_loss(
                hidden_states, lm_head, labels, weights=weights, pack_loss=pack_loss,
                num_items_in_batch=num_items_in_batch, cu_seqlens=cu_seqlens, shift_labels=shift_labels,
                chunk_size=loss_chunk_size or getattr(self.config, "loss_chunk_size", None),
                logit_scale=scale, logit_softcap=softcap,
            )
        else:
            # an int keeps the last `logits_to_keep` positions (0 = all), a tensor selects positions; written out
            # because transformers.modeling_utils.slice_logits_to_keep is missing from older 5.x (5.17 has none)
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = transform_logits(lm_head(hidden_states[:, keep, :]), scale, softcap)  # [B, T', V]
        output = (CausalLMOutputWithPast if token_logps is None else PackedCausalLMOutput)(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **({} if token_logps is None else {"token_logps": token_logps}),  # [B, T] fp32, 0 where no target
        )
        return output if return_dict is not False else output.to_tuple()


def packed_causal_lm(upstream_cls, module: str | None = None):
    """`upstream_cls` (a transformers *ForCausalLM) with PackedCausalLM's forward and our attention, under the same
    class name (so config.json's `architectures` names transformers' class and the saved folder loads in stock
    transformers). Modeling files define their classes as `class X(PackedCausalLM, upstream)` directly; this builds
    one at run time. Requires attention through the attention interface (`_supports_attention_backend`)."""
    if not getattr(upstream_cls, "_supports_attention_backend", False):
        raise ValueError(f"{upstream_cls.__name__} does not route attention through transformers' attention "
                         f"interface: packed attention cannot be applied to it")
    cls = type(upstream_cls.__name__, (PackedCausalLM, upstream_cls),
               {"__module__": module or __name__, "__doc__": f"{upstream_cls.__name__} with packed batches "
                                                           f"(patch/packed_attention.PackedCausalLM)."})
    return force_packed_attention(cls)
