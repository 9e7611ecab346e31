"""Generation from a trained model folder in its training chat format: batched, left-padded, KV cache, the model's own
stop tokens; transformers (the registry's patched classes, or stock transformers for a folder no family claims) or
vLLM.

    python evaluate.py --model_dir output/glm4/longwriter --data longbench_write.jsonl --output_dir eval/lbw
    python tools/generate.py --model_dir quickstart_out/run --max_new_tokens 32       # one prompt (tiny CPU check)

    from longsft.evaluate.generate import Generator, Sampling
    gen = Generator.load("output/glm4/longwriter")
    outs = gen.generate([gen.prompt_ids("Write a 500-word story.")], Sampling(max_new_tokens=64, temperature=0))

Model and tokenizer (`load`): config.json's model_type and the tokenizer files give the registry family
(patch/families.py) and its patched model class, never code inside the folder; a folder holding only a LoRA adapter
(adapter_config.json) is loaded on its base model. A folder whose tokenizer no family claims but that has a chat
template (e.g. SmolLM2) loads as stock transformers (AutoModelForCausalLM, AutoTokenizer, no remote code) with
template `auto`. Template: --template, else the one the model was trained on (train_settings.json -> the training
data's meta.json), else the family's default (`auto` without a family). The prompt is the training format's
tokens of the conversation up to where the reply's supervision starts (`prompt_ids`), so inference and training
agree token for token. Stops: the template's stop tokens, generation_config.json's eos ids (families that say so;
always without a family) and the tokenizer's eos.

Batches (`Generator.generate`): prompts left-padded with the pad id (the registry's rule, else a stop id), one
attention mask, transformers' generate with its KV cache; each row cut after its first stop token. Sampling:
temperature 0 is greedy; otherwise temperature, top_p and top_k (LongWriter's 0.5 / 0.8 / 50), the torch seed set
to `seed + first index of the batch` before each batch, so a run resumed at a batch boundary samples what an
uninterrupted one would. `on_tokens(n)` is called as tokens come (a progress bar's tokens/s).

vLLM (`--backend vllm`, the GPU route for 32k-token replies): `vllm.LLM(model=..., tokenizer=..., dtype=...)`
(the context length is the model config's) and `LLM.generate([{"prompt_token_ids": ids}, ...],
SamplingParams(temperature, top_p, top_k, max_tokens, stop_token_ids, seed))`; the same prompt ids and stop ids.
It needs a full (or merged: --save_merged_model) model folder; without vllm installed it is a UserError naming the
install. Not run here (no GPU): the calls follow vLLM's documented API.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from longsft import models
from longsft.data.inputs import InputError, Message
from longsft.data.storage import IGNORE_INDEX
from longsft.errors import UserError
from longsft.templates.registry import chat_format, check_template, format_class, pad_token_id
from patch.families import Family

logger = logging.getLogger("longsft.evaluate")
TRAIN_SETTINGS = "train_settings.json"  # main.py's record of a run (longsft/train/checkpoints.py SETTINGS_FILE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


# ----------------------------------------------------------------------------------------------
# Loading: model, tokenizer, family, template
# ----------------------------------------------------------------------------------------------

def base_folder(model_dir: str) -> str:
    """The folder holding the model's config (an adapter folder's base model, else the folder itself)."""
    adapter_cfg = Path(model_dir) / "adapter_config.json"
    if adapter_cfg.is_file() and not (Path(model_dir) / "config.json").is_file():
        return json.loads(adapter_cfg.read_text(encoding="utf-8"))["base_model_name_or_path"]
    return model_dir


def tokenizer_folder(model_dir: str) -> str:
    return model_dir if any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES) else base_folder(model_dir)


def _has_chat_template(folder: str) -> bool:
    p = Path(folder)
    if (p / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def _base_config(model_dir: str, base_dir: str, config_class=None) -> dict:
    """{"config": ...} for an adapter folder whose run changed its base's config (RoPE scaling:
    models.BASE_CONFIG_FILE), else {}."""
    if base_dir == model_dir:
        return {}
    if config_class is None:
        from transformers import AutoConfig as config_class
    config = models.adapter_base_config(model_dir, config_class)
    return {"config": config} if config is not None else {}


def load(model_dir: str, dtype: torch.dtype = torch.float32, stock_fallback: bool = False):
    """(model, tokenizer, family); a LoRA adapter folder is applied to its base model (built from the adapter
    folder's base_model_config.json when the run wrote one: RoPE scaling). transformers-native model
    types load as transformers' own class with the packed forward (patch/modeling_native.py). With stock_fallback,
    a folder no family claims but with a chat template loads as stock transformers (family None)."""
    base_dir, tok_dir = base_folder(model_dir), tokenizer_folder(model_dir)
    try:
        family = models.family_of(tok_dir, config_from=base_dir)  # an adapter: its base's model_type
        if family is None and stock_fallback and _has_chat_template(tok_dir):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            logger.info("%s: no registered family claims its tokenizer; stock transformers and its own chat "
                        "template (template auto)", model_dir)
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, **_base_config(model_dir, base_dir))
        else:
            cls = models.model_class(models.read_model_type(base_dir))
            family = models.require_family(tok_dir, "--model_dir", config_from=base_dir)
            tokenizer = models.load_tokenizer(tok_dir, family)
            model = cls.from_pretrained(base_dir, dtype=dtype, **_base_config(model_dir, base_dir, cls.config_class))
    except InputError as e:
        raise SystemExit(str(e)) from e
    if base_dir != model_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_dir)
    return model.eval(), tokenizer, family


def chat_format_for(template: str, tokenizer, family: Optional[Family] = None):
    """The chat format object pre-tokenization used for `template` (checked to be one of `family`'s templates)."""
    try:
        fmt = chat_format(check_template(family, template) if family else template, tokenizer)
    except InputError as e:
        raise SystemExit(str(e)) from e
    if fmt.problems:
        raise SystemExit(f"the tokenizer cannot express the {template} template: " + "; ".join(fmt.problems))
    return fmt


def trained_template(model_dir: str) -> Optional[str]:
    """The template a main.py output folder was trained with: train_settings.json -> its train_file's meta.json."""
    try:
        settings = json.loads((Path(model_dir) / TRAIN_SETTINGS).read_text(encoding="utf-8"))
        train_file = settings["data"]["train_file"]
        return json.loads((Path(train_file) / "meta.json").read_text(encoding="utf-8")).get("template")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_template(model_dir: str, template: Optional[str], family: Optional[Family],
                     data_dir: Optional[str] = None) -> str:
    """--template, else a training data folder's meta.json (data_dir), else the run's own (trained_template), else
    the family's default (`auto` without a family)."""
    if template:
        return template
    if data_dir and (Path(data_dir) / "meta.json").is_file():
        found = json.loads((Path(data_dir) / "meta.json").read_text(encoding="utf-8")).get("template")
        if found:
            return found
    return trained_template(model_dir) or (family.default_template if family else "auto")


def prompt_ids(fmt, prompt: str, system: Optional[str] = None) -> list[int]:
    """Tokens of [system], user `prompt`, and the start of the assistant turn, exactly as in training."""
    messages = ([Message("system", system)] if system else []) + [Message("user", prompt),
                                                                  Message("assistant", "x", train=True)]
    return context_prompt_ids(fmt, messages)


def _until_supervised(fmt, ids, supervised, roles: list[str]) -> list[int]:
    """The tokens before the first supervised one: the prompt of a stand-in reply."""
    first = next((i for i, s in enumerate(supervised) if s), None)
    if first is None:
        raise UserError(f"the {fmt.name} template supervises nothing in {roles}: no prompt")
    return [int(i) for i in ids[:first]]


def context_prompt_ids(fmt, context: list[Message]) -> list[int]:
    """The tokens of a conversation ending in a stand-in supervised reply, cut where its supervision starts."""
    ids, labels = fmt.encode(context)
    return _until_supervised(fmt, ids, [lab != IGNORE_INDEX for lab in labels], [m.role for m in context])


def _encode_one(fmt, conv):
    """(ids, supervised, sample lengths) of one template-auto Conversation; its Skip raised."""
    ids, supervised, lengths, outcomes, _ = fmt.encode_batch([conv])
    if outcomes[0] is not None:
        raise outcomes[0]
    return ids, supervised, lengths


def record_samples(fmt, record: dict) -> list[tuple[list[int], list[int]]]:
    """Template auto: a test record as pre_tokenize.py trains it ((input_ids, labels) per sample): read by the
    format itself, so its tools, tool calls and results reach the chat template in the shape it writes them (the
    generic Messages carry no tool schemas). A Skip when the template cannot write it."""
    ids, supervised, lengths = _encode_one(fmt, fmt.parse_record(record)[1])
    out, at = [], 0
    for n in lengths.tolist():
        sample, sup = ids[at:at + n], supervised[at:at + n]
        out.append(([int(i) for i in sample], [int(i) if s else IGNORE_INDEX for i, s in zip(sample, sup)]))
        at += n
    return out


def record_prompt_ids(fmt, record: dict) -> list[int]:
    """Template auto: the prompt of a test record's final reply: every turn before it (unsupervised) with the
    record's tools, then the inference prompt of the template, where a stand-in reply's supervision starts."""
    from longsft.data.inputs import Skip
    from longsft.templates.auto_records import Conversation, Turn

    _, conv = fmt.parse_record(record)
    if not conv or conv[-1].role != "assistant":
        raise Skip("no_reference", "the record does not end with an assistant reply (the reference)")
    turns = [Turn(t.role, t.message, False, t.where) for t in conv[:-1]]
    turns.append(Turn("assistant", {"role": "assistant", "content": "x"}, True, "the reply"))
    ids, supervised, lengths = _encode_one(fmt, Conversation(turns, conv.tools))
    n = int(lengths[-1])  # the last sample holds the final reply
    return _until_supervised(fmt, ids[-n:], supervised[-n:].tolist(), [t.role for t in turns])


def reads_records(fmt) -> bool:
    """Whether the format reads raw records itself (template auto) rather than the generic Messages."""
    return getattr(fmt, "name", None) == "auto" and hasattr(fmt, "parse_record")


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------

@dataclass
class Sampling:
    max_new_tokens: int = 32768
    temperature: float = 0.5  # 0: greedy
    top_p: Optional[float] = 0.8
    top_k: Optional[int] = 50
    seed: int = 42


@dataclass
class Output:
    ids: list[int]  # new tokens, through the first stop token
    text: str  # decoded without special tokens, stripped
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)


class _TokenCounter:
    """A transformers streamer that reports how many rows are still generating at each step."""

    def __init__(self, batch: int, stops: list[int], on_tokens: Callable[[int], None]):
        self.alive = torch.ones(batch, dtype=torch.bool)
        self.stops = torch.tensor(stops or [-1])
        self.on_tokens, self.prompt_seen = on_tokens, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call is the prompt
            self.prompt_seen = True
            return
        steps = value.reshape(len(self.alive), -1)
        for k in range(steps.shape[1]):
            self.on_tokens(int(self.alive.sum()))
            self.alive &= ~torch.isin(steps[:, k], self.stops)

    def end(self) -> None:
        pass


@dataclass
class Generator:
    model_dir: str
    model: object
    tokenizer: object
    family: Optional[Family]
    fmt: object
    template: str
    stops: list[int]
    pad_id: int
    backend: str = "hf"
    device: str = "cpu"
    _vllm: object = field(default=None, repr=False)

    @classmethod
    def load(cls, model_dir: str, template: Optional[str] = None, backend: str = "hf", dtype: str = "auto",
             data_dir: Optional[str] = None, model=None, tokenizer=None) -> "Generator":
        """`model`/`tokenizer` given: use those (already loaded, e.g. by a test), else load from model_dir."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = resolve_dtype(dtype, device)
        if backend not in ("hf", "vllm"):
            raise UserError(f"--backend {backend}: expected hf (transformers) or vllm")
        if backend == "vllm":
            _require_vllm()
            if base_folder(model_dir) != model_dir:
                raise UserError(f"--model_dir {model_dir} holds a LoRA adapter: vLLM needs a full model folder; "
                                f"train with --save_merged_model and pass OUTPUT_DIR/merged, or use --backend hf")
        if model is None:
            if backend == "vllm":  # only the tokenizer here; vLLM loads the weights itself
                tok_dir, base = tokenizer_folder(model_dir), base_folder(model_dir)
                family = models.family_of(tok_dir, config_from=base)
                tokenizer = models.load_tokenizer(tok_dir, family) if family else _auto_tokenizer(tok_dir)
            else:
                model, tokenizer, family = load(model_dir, torch_dtype, stock_fallback=True)
                model.to(device)
        else:
            family = models.family_of(tokenizer_folder(model_dir), config_from=base_folder(model_dir))
        name = resolve_template(model_dir, template, family, data_dir)
        fmt = chat_format_for(name, tokenizer, family) if family else _checked(format_class(name)(tokenizer), name)
        base = base_folder(model_dir)
        if family is not None:
            stops = models.stop_token_ids(base, family, fmt.stop_token_ids)
        else:
            stops = list(dict.fromkeys([int(i) for i in fmt.stop_token_ids] + models.generation_stop_ids(base)
                                       + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))
        pad = pad_token_id(tokenizer, family, name) if family else tokenizer.pad_token_id
        pad = stops[0] if pad is None else int(pad)
        gen = cls(model_dir, model, tokenizer, family, fmt, name, stops, pad, backend, device)
        if backend == "vllm":
            gen._vllm = _vllm_engine(model_dir, dtype)
        return gen

    def prompt_ids(self, prompt: str, system: Optional[str] = None) -> list[int]:
        return prompt_ids(self.fmt, prompt, system)

    def context_ids(self, context: list[Message], record: Optional[dict] = None) -> list[int]:
        """The prompt of a test case: from its raw `record` for template auto (tools included), else `context`."""
        if record is not None and reads_records(self.fmt):
            return record_prompt_ids(self.fmt, record)
        return context_prompt_ids(self.fmt, context)

    def _finish(self, new: list[int]) -> Output:
        stop_set = set(self.stops)
        cut = next((k + 1 for k, t in enumerate(new) if t in stop_set), None)
        ids = new[:cut] if cut is not None else new
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Output(ids, text, "stop" if cut is not None else "length")

    def generate(self, prompts: list[list[int]], sampling: Sampling, first_index: int = 0,
                 on_tokens: Optional[Callable[[int], None]] = None) -> list[Output]:
        """One batch of prompt token lists -> their replies."""
        if self.backend == "vllm":
            return self._generate_vllm(prompts, sampling, first_index)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        greedy = sampling.temperature <= 0
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy, use_cache=True,
                      eos_token_id=self.stops, pad_token_id=self.pad_id)
        if not greedy:  # a None top_p / top_k: the model's generation_config decides
            kwargs.update({k: v for k, v in (("temperature", sampling.temperature), ("top_p", sampling.top_p),
                                              ("top_k", sampling.top_k)) if v is not None})
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if on_tokens is not None:
            kwargs["streamer"] = _TokenCounter(len(prompts), self.stops, on_tokens)
        torch.manual_seed(sampling.seed + first_index)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                      **kwargs)
        return [self._finish(row[width:].tolist()) for row in out.cpu()]

    def _generate_vllm(self, prompts: list[list[int]], sampling: Sampling, first_index: int) -> list[Output]:
        from vllm import SamplingParams

        greedy = sampling.temperature <= 0
        params = SamplingParams(n=1, temperature=0.0 if greedy else sampling.temperature,
                                top_p=1.0 if greedy else sampling.top_p, top_k=-1 if greedy else sampling.top_k,
                                max_tokens=sampling.max_new_tokens, stop_token_ids=self.stops,
                                seed=sampling.seed + first_index, skip_special_tokens=True)
        results = self._vllm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=params,
                                      use_tqdm=False)
        return [self._finish(list(r.outputs[0].token_ids)) for r in results]


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise UserError(f"--dtype {dtype}: expected auto, bfloat16, float16 or float32") from None


def _checked(fmt, name: str):
    if fmt.problems:
        raise UserError(f"the tokenizer cannot express the {name} template: " + "; ".join(fmt.problems))
    return fmt


def _auto_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UserError("--backend vllm: vLLM is not installed; on a CUDA machine `pip install vllm` (it brings "
                        "its own CUDA torch: use a separate environment), or use --backend hf") from None


def _vllm_engine(model_dir: str, dtype: str):
    from vllm import LLM

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    # chatglm folders name their code in auto_map; main.py copied OUR patch/ files there (never the hub's)
    remote = config.get("model_type") == "chatglm"
    return LLM(model=model_dir, tokenizer=model_dir, dtype=dtype, trust_remote_code=remote, seed=0)


def generation_settings(gen: Generator) -> dict:
    """What the model folder resolved to (recorded beside the requested settings)."""
    return {"resolved_template": gen.template, "stop_token_ids": gen.stops, "pad_token_id": gen.pad_id}
