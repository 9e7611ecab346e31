"""Which transformers model types train through the packed path: one check per model type, and the table the
registry reads (patch/model_types.json: accepted types with their class, refused ones with the reason).

    python -m longsft.model_types --types gemma phi3 mamba   # check some types (tiny CPU run: well under 1 s each)
    python -m longsft.model_types                            # check every causal LM of the installed transformers
    python -m longsft.model_types --write                    # ... and write patch/model_types.json (18 s on 2 cores)

The check of a model type (`check`), on a tiny random config of it (`tiny_config`: 2-4 layers of width 64, 4 query
heads, every kind of layer the type has, sliding windows of 6 tokens, dropout 0, logit scalings and soft-caps set):
  1. transformers has a causal-LM class for it (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), a text decoder (no vision or
     audio sub-model), whose attention goes through transformers' attention interface (`_supports_attention_backend`)
     and whose forward takes `position_ids`;
  2. our packed class (`patch.packed_attention.packed_causal_lm`) and transformers' stock class, same weights, fp32:
     three samples of 5, 11 and 3 tokens packed into one row give, per sample, the logits the stock class gives that
     sample alone (relative error <= LOGITS_TOL), and the gradients of the packed token-mean loss equal those of the
     same loss summed from the stock logits one sample at a time (<= GRAD_TOL, every parameter).
Anything else is refused with what went wrong: attention extras the packed kernels lack (soft-capping, sinks),
samples that see each other when packed (recurrent or convolution state, bidirectional encoders), a logits
transform the packed forward does not apply, or a config that cannot be built small. The registry family
`transformers` (patch/families.py) covers exactly the accepted types; on another transformers version than the
table's, longsft.models re-runs this check for the type at run time before it trains.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

TABLE = Path(__file__).resolve().parents[1] / "patch" / "model_types.json"
VOCAB = 128
LOGITS_TOL = 1e-5
GRAD_TOL = 1e-4
GRAD_FLOOR = 1e-3  # a parameter's gradient error is relative to its own norm, or to this share of the whole norm
SAMPLE_LENGTHS = (5, 11, 3)  # one sample longer than the sliding window below
WINDOW = 6

# Config fields set at tiny sizes, by the names configs use for them (each applied only where the config has it).
_TINY = {
    "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embedding_size": 64, "hidden_size_per_layer_input": 16,
    "intermediate_size": 96, "ffn_hidden_size": 96, "n_inner": 96, "ffn_dim": 96,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    "shared_expert_intermediate_size": 32, "shared_experts_intermediate_size": 32,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "zero_expert_num": 2,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_top_k": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "num_dense_layers": 1,
    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "index_topk": 4, "index_head_dim": 16, "index_n_heads": 2,
    "max_position_embeddings": 256, "n_positions": 256, "max_seq_len": 256,
}
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")
_OPTIONAL = {"q_lora_rank": 24, "sliding_window": WINDOW}  # set only when the default is not None
_REQUIRED = {"head_dim": 16, "n_shared_experts": 1}  # set where the config has the field, even when it is None
# logits transforms, set to values that change the logits so a transform the packed forward misses shows
_LOGIT_FIELDS = {"logit_scale": 0.25, "logits_scaling": 4.0, "final_logit_softcapping": 3.0, "logits_soft_cap": 3.0}
_MULTIMODAL = ("vision", "audio", "image", "speech", "vq", "depth")


@dataclass
class Verdict:
    model_type: str
    accepted: bool
    model_class: Optional[str]  # transformers' causal-LM class name (None: transformers has none)
    reason: str  # why refused ("" when accepted)
    layer_types: tuple = ()  # the layer kinds the tiny config had (config *layer_types values)
    note: str = ""  # accepted without the layer kinds found only in its code: why those failed
    logits_err: Optional[float] = None
    grad_err: Optional[float] = None
    seconds: float = 0.0


class Refused(Exception):
    """A model type the packed path cannot train; the message is the reason."""


# ----------------------------------------------------------------------------------------------
# Tiny configs
# ----------------------------------------------------------------------------------------------

def causal_lm_types() -> dict[str, str]:
    """model_type -> transformers' causal-LM class name, for every type of the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


_KIND_TESTS = (re.compile(r"""(?<![\w])layer_types?\b(?:\[[^\]]*\])?\s*[!=]=\s*["'](\w+)["']"""),
               re.compile(r"""["'](\w+)["']\s*(?:not\s+)?in\s+(?:self\.)?(?:config\.)?layer_types\b"""))


def source_layer_kinds(model_type: str) -> list[str]:
    """Layer kinds the model's code tests `layer_types` against (e.g. "conv" in LFM2's), which a config's
    default layer_types may lack: the tiny config gets a layer of each, so the check covers them."""
    import importlib

    name = causal_lm_types().get(model_type)
    try:
        import transformers

        module = importlib.import_module(getattr(transformers, name).__module__)
        text = inspect.getsource(module)
    except Exception:  # noqa: BLE001 - no source: the defaults alone
        return []
    return sorted({k for rx in _KIND_TESTS for k in rx.findall(text)})


def _layer_pattern(defaults: dict, extra_kinds: list[str] = ()) -> dict:
    """Per-layer lists (layer_types, mlp_layer_types, ...) cut to one layer of every kind they hold (at least 2
    layers; layer_types also gets `extra_kinds`), with the layer count to match."""
    lists = {k: v for k, v in defaults.items() if k.endswith("layer_types") and isinstance(v, list) and v}
    if not lists:
        return {}
    kinds = {k: list(dict.fromkeys(v + (list(extra_kinds) if k == "layer_types" else []))) for k, v in lists.items()}
    n = max(2, *(len(v) for v in kinds.values()))
    out = {k: [v[i % len(v)] for i in range(n)] for k, v in kinds.items()}
    out.update({k: n for k in _LAYER_COUNTS if k in defaults})
    return out


def _tiny_fields(defaults: dict, vocab_size: int, extra_kinds: list[str] = ()) -> dict:
    """The overrides that make a config with these default fields tiny."""
    over = {k: v for k, v in _TINY.items() if k in defaults and not isinstance(defaults[k], bool)}
    over.update({k: 2 for k in _LAYER_COUNTS if k in defaults})
    over.update({k: v for k, v in _OPTIONAL.items() if defaults.get(k) is not None})
    over.update({k: v for k, v in _REQUIRED.items() if k in defaults})
    if "qk_rope_head_dim" in defaults:  # multi-head latent attention: head_dim follows the rope dims
        over.pop("head_dim", None)
    heads, kv = defaults.get("num_attention_heads"), defaults.get("num_key_value_heads", 0)
    if isinstance(heads, int) and (kv is None or isinstance(kv, int)):  # keep MHA / GQA / MQA
        over["num_key_value_heads"] = 4 if kv in (None, heads) else 2 if kv > 1 else 1
    for k in ("vocab_size", "vocab_size_per_layer_input"):
        if k in over:
            over[k] = vocab_size
    if "per_layer_config" in defaults:
        over["per_layer_config"] = None
    over.update(_layer_pattern(defaults, extra_kinds))
    if any("sliding" in str(k) for k in over.get("layer_types", ())) and "sliding_window" in defaults:
        over["sliding_window"] = WINDOW  # sliding layers need a window (Qwen's default is none: switched off)
        if "use_sliding_window" in defaults:
            over["use_sliding_window"] = True
    for k, v in defaults.items():
        if isinstance(v, float) and ("dropout" in k or k.endswith("pdrop")):
            over[k] = 0.0
        if k.endswith("_token_id") and isinstance(v, int) and v >= vocab_size:
            over[k] = vocab_size - 1
        if k.endswith("_token_id") and isinstance(v, list):
            over[k] = [min(i, vocab_size - 1) for i in v]
    over.update({k: v for k, v in _LOGIT_FIELDS.items() if k in defaults})
    return over


def tiny_config(model_type: str, vocab_size: int = VOCAB, extra_kinds: Optional[list[str]] = None, **overrides):
    """A tiny config of `model_type` (module docstring), built through its config class so derived fields follow;
    a text_config inside is made tiny the same way. Its layer_types get a layer of each of `extra_kinds` (default:
    `source_layer_kinds`; [] for the config's own kinds only). `overrides` are set last."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    extra = source_layer_kinds(model_type) if extra_kinds is None else list(extra_kinds)
    fields = _tiny_fields(defaults, vocab_size, extra)
    if isinstance(defaults.get("text_config"), dict):
        sub = defaults["text_config"]
        fields["text_config"] = {**sub, **_tiny_fields(sub, vocab_size, extra)}
    return cls(**{**fields, **overrides})


def multimodal_parts(model_type: str) -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    subs = getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {}
    return sorted(k for k in subs if any(m in k for m in _MULTIMODAL))


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------

def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _state_hint(config) -> str:
    """What in a config makes packed samples see each other."""
    if getattr(config, "is_decoder", None) is False:
        return f"an encoder ({type(config).__name__} is_decoder false: bidirectional attention), not a causal decoder"
    other = sorted(set(layer_kinds(config)) - {"full_attention", "sliding_attention", "attention", "dense", "sparse", "moe", "mlp"})
    if other:
        return f"layers that carry state along the row ({', '.join(other)}): a sample sees the ones before it"
    return "packed samples see each other (a mask, a state or a position rule the packed path does not apply)"


def _pair(model_type: str, upstream, extra_kinds: Optional[list[str]] = None):
    """(our packed class, stock class) on one tiny config, the same weights, eval mode, fp32."""
    import torch

    from patch.packed_attention import packed_causal_lm

    try:
        config = tiny_config(model_type, extra_kinds=extra_kinds)
    except Exception as e:  # noqa: BLE001 - any failure is the verdict's reason
        raise Refused(f"could not build a tiny config to check it: {type(e).__name__}: {str(e)[:160]}") from e
    torch.manual_seed(0)
    try:
        ours = packed_causal_lm(upstream)(copy.deepcopy(config)).float().eval()
        stock = upstream(copy.deepcopy(config)).float().eval()
    except Exception as e:  # noqa: BLE001 - any failure is the verdict's reason
        raise Refused(f"could not build a tiny model to check it: {type(e).__name__}: {str(e)[:160]}") from e
    with torch.no_grad():  # 1-D weights (norms, biases, scales) away from their init, so a misplaced one shows
        for p in ours.parameters():
            if p.dim() == 1 and p.dtype.is_floating_point:
                p.uniform_(0.5, 1.5)
    missing = stock.load_state_dict(ours.state_dict(), strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise Refused(f"the packed class's weights differ from the stock class's ({missing})")
    return ours, stock


def layer_kinds(config) -> tuple:
    """The values of a config's *layer_types lists (and its text_config's), sorted."""
    kinds = set()
    for c in (config, getattr(config, "text_config", None)):
        for k, v in (c.to_dict() if c is not None else {}).items():
            if k.endswith("layer_types") and isinstance(v, list):
                kinds |= {str(x) for x in v}
    return tuple(sorted(kinds))


def _compare(ours, stock) -> tuple[float, float, float]:
    """(packed-vs-stock logits error per sample, our unpacked-vs-stock logits error, gradient error)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, VOCAB - 4, (n,), generator=g) for n in SAMPLE_LENGTHS]
    cu = torch.tensor([0, *torch.tensor(SAMPLE_LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.cat(samples)[None]  # [1, L]
    with torch.no_grad():
        packed = ours(ids, attention_mask=cu).logits[0]  # [L, V]
        refs = [stock(s[None]).logits[0] for s in samples]
        alone = ours(samples[1][None]).logits[0]
    logits_err = max(_rel(packed[cu[i]:cu[i + 1]], r) for i, r in enumerate(refs))
    alone_err = _rel(alone, refs[1])
    targets = sum(n - 1 for n in SAMPLE_LENGTHS)
    ours.zero_grad()
    ours(ids, attention_mask=cu, labels=ids).loss.backward()  # token mean over the pack's targets
    stock.zero_grad()
    ref = sum(F.cross_entropy(stock(s[None]).logits[0, :-1].float(), s[1:], reduction="sum") for s in samples)
    (ref / targets).backward()
    grads = dict(stock.named_parameters())
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in grads.values() if p.grad is not None))
    grad_err = 0.0
    for name, p in ours.named_parameters():
        a, b = p.grad, grads[name].grad
        if a is None and b is None:
            continue
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        grad_err = max(grad_err, ((a - b).norm() / torch.maximum(b.norm(), GRAD_FLOOR * norm)).item())
    return logits_err, alone_err, grad_err


def _check_pair(model_type: str, name: str, upstream, verdict: Verdict, extra_kinds: Optional[list[str]]) -> None:
    """Build the pair on a tiny config (with `extra_kinds` layers) and compare; raises Refused, else fills verdict."""
    import torch

    ours, stock = _pair(model_type, upstream, extra_kinds)
    verdict.layer_types = layer_kinds(stock.config)
    try:
        logits_err, alone_err, grad_err = _compare(ours, stock)
    except NotImplementedError as e:
        raise Refused(f"its attention needs what the packed attention kernels lack: {str(e)[:200]}") from e
    except Refused:
        raise
    except RecursionError as e:  # its message varies from run to run
        raise Refused("the packed forward fails on it: RecursionError: maximum recursion depth exceeded") from e
    except Exception as e:  # noqa: BLE001 - any failure is the verdict's reason
        raise Refused(f"the packed forward fails on it: {type(e).__name__}: {str(e)[:200]}") from e
    verdict.logits_err, verdict.grad_err = logits_err, grad_err
    if not torch.isfinite(torch.tensor([logits_err, grad_err])).all():
        raise Refused("non-finite logits or gradients on the tiny config")
    if alone_err > LOGITS_TOL and getattr(stock.config, "is_decoder", None) is False:
        raise Refused(f"an encoder ({type(stock.config).__name__} is_decoder false: bidirectional attention), "
                      f"not a causal decoder: its logits differ from causal attention's ({alone_err:.1e})")
    if alone_err > LOGITS_TOL:
        raise Refused(f"{name}'s logits differ from the packed forward's on a single sample (relative error "
                      f"{alone_err:.1e}): its forward does something PackedCausalLM's does not (a logits "
                      f"transform, a mask of its own)")
    if logits_err > LOGITS_TOL:
        raise Refused(f"{_state_hint(stock.config)}: packed logits differ from one sample at a time "
                      f"(relative error {logits_err:.1e})")
    if grad_err > GRAD_TOL:
        raise Refused(f"packed gradients differ from one sample at a time (relative error {grad_err:.1e})")


def check(model_type: str) -> Verdict:
    """Whether `model_type` trains through the packed path (module docstring), and why not."""
    import transformers

    start = time.time()
    name = causal_lm_types().get(model_type)
    verdict = Verdict(model_type, False, name, "")
    try:
        if name is None:
            raise Refused("transformers has no causal-LM class for it")
        parts = multimodal_parts(model_type)
        if parts:
            raise Refused(f"a multimodal model ({', '.join(parts)}): not a text decoder; train its text model "
                          f"type if transformers has one")
        upstream = getattr(transformers, name)
        if not getattr(upstream, "_supports_attention_backend", False):
            raise Refused(f"{name}'s attention does not go through transformers' attention interface "
                          f"(recurrent, state-space or hand-written attention): the packed attention cannot replace it")
        if "position_ids" not in inspect.signature(upstream.forward).parameters:
            raise Refused(f"{name}.forward takes no position_ids: positions cannot restart per sample")
        extra = source_layer_kinds(model_type)
        try:
            _check_pair(model_type, name, upstream, verdict, extra)
        except Refused as e:
            if not extra:
                raise
            _check_pair(model_type, name, upstream, verdict, [])  # the config's own layer kinds only; a folder
            # with a kind found only in the code (e.g. LFM2's "conv") is then refused by the registry
            if not str(e).startswith("could not build a tiny config"):
                verdict.note = f"with a layer of each kind its code names ({', '.join(extra)}): {str(e)[:240]}"
        verdict.accepted = True
    except Refused as e:
        verdict.reason = str(e)
    verdict.seconds = round(time.time() - start, 2)
    return verdict


def walk(types: Optional[list[str]] = None, progress=None) -> list[Verdict]:
    """`check` for every causal-LM model type of the installed transformers (or `types`)."""
    import logging
    import warnings

    quiet = [logging.getLogger(n) for n in ("transformers", "patch.packed_attention")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    out = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in types or list(causal_lm_types()):
                out.append(check(t))
                if progress:
                    progress(out[-1])
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return out


# ----------------------------------------------------------------------------------------------
# The table (patch/model_types.json)
# ----------------------------------------------------------------------------------------------

def table(verdicts: list[Verdict]) -> dict:
    import torch
    import transformers

    return {"about": "model types that train through the packed path (patch/families.py family 'transformers'); "
                     "made by `python -m longsft.model_types --write`, checked by tests/patch/test_model_types.py",
            "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
            "accepted": {v.model_type: {"class": v.model_class, "layer_types": list(v.layer_types),
                                        **({"note": v.note} if v.note else {})}
                         for v in verdicts if v.accepted},
            "refused": {v.model_type: v.reason for v in verdicts if not v.accepted}}


def read_table(path: Path = TABLE) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def describe(verdict: Verdict) -> str:
    if verdict.accepted:
        return (f"{verdict.model_type:26s} accepted  {verdict.model_class} (logits {verdict.logits_err:.1e}, "
                f"grads {verdict.grad_err:.1e}, {verdict.seconds:.1f} s)")
    return f"{verdict.model_type:26s} refused   {verdict.reason}"


def main(argv: Optional[list[str]] = None) -> list[Verdict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--types", nargs="+", default=None, help="model types to check (default: every causal LM)")
    parser.add_argument("--write", action="store_true", help=f"write the table to {TABLE} (all types only)")
    parser.add_argument("--json", default=None, help="also write every verdict (errors, seconds) to this JSON file")
    args = parser.parse_args(argv)
    if args.write and args.types:
        parser.error("--write records every type: leave out --types")
    verdicts = walk(args.types, progress=lambda v: print(describe(v), flush=True))
    accepted = sum(v.accepted for v in verdicts)
    print(f"{accepted} of {len(verdicts)} model types accepted, {len(verdicts) - accepted} refused")
    if args.write:
        from longsft.atomic_dir import write_json_atomic

        write_json_atomic(TABLE, table(verdicts))
        print(f"wrote {TABLE}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(v) for v in verdicts], indent=1) + "\n")
    return verdicts


if __name__ == "__main__":
    from longsft.errors import run_cli

    run_cli(main)
