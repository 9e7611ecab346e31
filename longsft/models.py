"""Model folders through the registry (patch/families.py): a folder's family, its tokenizer and its model class.

    from longsft.models import family_of, load_tokenizer, model_class
    fam = family_of("/models/glm-4-9b")             # Family "glm4", from config.json and the tokenizer files
    tok = load_tokenizer("/models/glm-4-9b", fam)   # patch/'s ChatGLM4Tokenizer: no code from the folder runs
    cls = model_class("chatglm")                    # patch.modeling_chatglm.ChatGLMForConditionalGeneration
    model_class("qwen2")                            # patch.modeling_native.Qwen2ForCausalLM (transformers' + packing)
    model_class("gemma")                            # family `transformers`: built from transformers' GemmaForCausalLM
    stop_token_ids("/models/Qwen2.5-7B-Instruct", "qwen2")  # its generation_config.json eos_token_id list
    decoder_linear_names(model)                     # LoRA's default for the `transformers` family

Model types: the named families' (patch/families.py) and every type patch/model_types.json accepts (the
`transformers` family: any tokenizer transformers loads, template auto); that table is made by a check of each
type (longsft/model_types.py) on the transformers version it names. On another installed version, a type only the
`transformers` family covers is checked again here, once per process (about a second), before its class is used.

Tokenizers: a family with its own class in patch/ (GLM-4, ChatGLM2/3) loads it on the folder's tokenizer.model;
the Llama families load transformers' fast tokenizer from tokenizer.json (`PreTrainedTokenizerFast`, which does
not import torch; a local folder without tokenizer.json goes through AutoTokenizer, which does). The folder's own
tokenizer code runs only with trust_remote_code (AutoTokenizer). Nothing here imports torch at import time;
`model_class` imports the patch/ modeling module, `decoder_linear_names` and a run-time check torch itself. User
mistakes raise longsft.data.inputs.InputError.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional, Union

from longsft.data.inputs import InputError
from patch import families
from patch.families import Family


BASE_CONFIG_FILE = "base_model_config.json"  # beside a LoRA adapter: its base's config as the run trained it


def adapter_base_config(model_dir: str, config_class):
    """The base model's config a LoRA adapter folder was trained with (main.py writes BASE_CONFIG_FILE there when
    the run changed it, e.g. --rope_scaling), read with `config_class`; None when the folder has none."""
    path = Path(model_dir) / BASE_CONFIG_FILE
    return config_class.from_pretrained(str(path)) if path.is_file() else None


def file_reader(name_or_path: str) -> families.Reader:
    """Reads a file of a local folder, or of a hub model through transformers' cache (None when absent)."""
    if Path(name_or_path).is_dir():
        return families.folder_reader(name_or_path)

    def read(name: str) -> Optional[bytes]:
        from transformers.utils import cached_file

        try:
            path = cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except (OSError, ValueError):
            return None
        return Path(path).read_bytes() if path else None

    return read


def _reader(name_or_path: str, config_from: Optional[str] = None) -> families.Reader:
    """The folder's files, config.json taken from `config_from` when given (a LoRA adapter's base model)."""
    read = file_reader(name_or_path)
    if config_from is None:
        return read
    read_config = file_reader(config_from)
    return lambda name: read_config(name) if name == "config.json" else read(name)


def family_of(name_or_path: str, config_from: Optional[str] = None) -> Optional[Family]:
    """The registry family of a model or tokenizer folder (or hub id), None when no family matches.
    `config_from`: the folder whose config.json gives the model_type (e.g. the base model of an adapter folder)."""
    return families.detect(_reader(name_or_path, config_from))


def require_family(name_or_path: str, flag: str = "--model_name_or_path", config_from: Optional[str] = None) -> Family:
    fam = family_of(name_or_path, config_from)
    if fam is None:
        raise InputError(f"{flag} {name_or_path}: cannot tell its model family: "
                         f"{families.why_undetected(_reader(name_or_path, config_from))}")
    return fam


def as_family(family: Union[Family, str]) -> Family:
    try:
        return families.family(family) if isinstance(family, str) else family
    except families.RegistryError as e:
        raise InputError(str(e)) from None


def read_model_type(model_dir: str) -> str:
    """config.json's model_type, from a local folder or the hub cache (the path's name plays no part)."""
    raw = file_reader(model_dir)("config.json")
    if raw is None:
        raise InputError(f"--model_name_or_path {model_dir}: no config.json; pass a model folder "
                         f"(tools/make_tiny.py model builds a tiny one)")
    return json.loads(raw).get("model_type", "")


def _import(module_class: str, package: str = "patch"):
    module, _, name = module_class.rpartition(".")
    return getattr(importlib.import_module(f"{package}.{module}" if package else module), name, None)


def native_class_name(model_type: str) -> Optional[str]:
    """transformers' own *ForCausalLM class name for a model_type, None when transformers has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def _installed_transformers() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


_RECHECKED: dict[str, str] = {}  # model_type -> reason ("" = passed) of the run-time check on this transformers


def recheck_reason(model_type: str) -> str:
    """"" when `model_type` passes the packed check on the installed transformers (run here when that is not the
    version patch/model_types.json was made with, and the type is only the `transformers` family's), else why not."""
    table_version = families.MODEL_TYPES["transformers"]
    if model_type in families.named_model_types() or table_version == _installed_transformers():
        return ""
    if model_type not in _RECHECKED:
        import logging

        from longsft import model_types

        verdict = model_types.check(model_type)
        _RECHECKED[model_type] = "" if verdict.accepted else verdict.reason
        logging.getLogger("longsft").info(
            "model_type %s: packed check on transformers %s (patch/model_types.json is from %s): %s", model_type,
            _installed_transformers(), table_version, "passed" if verdict.accepted else verdict.reason)
    return _RECHECKED[model_type]


def model_class(model_type: str):
    """The patched model class for a config.json model_type (one class serves all of its families): for the
    transformers-native types, transformers' own class with the packed forward (patch/modeling_native.py)."""
    path = families.model_class_of(model_type)
    native = native_class_name(model_type) if model_type else None
    if path is None:
        refused = families.refused_reason(model_type) if model_type else None
        if refused:
            raise InputError(f"config.json model_type {model_type!r} ({native}) is not supported by packed training: "
                             f"{refused}")
        hint = (f"; transformers {_installed_transformers()} implements it ({native}), but patch/model_types.json "
                f"(transformers {families.MODEL_TYPES['transformers']}) has not checked it: run `python -m "
                f"longsft.model_types --types {model_type}`, and `--write` to record it"
                if native else " (or pass --trust_remote_code to use the folder's own code)")
        raise InputError(f"config.json model_type {model_type!r} is not supported: expected one of "
                         f"{families.model_types()}{hint}")
    reason = recheck_reason(model_type)
    if reason:
        raise InputError(f"config.json model_type {model_type!r} ({native}) is not supported by packed training on "
                         f"transformers {_installed_transformers()}: {reason}")
    return _import(path)


def decoder_linear_names(model) -> list[str]:
    """The names (last part) of every linear layer inside the model's decoder blocks (transformers'
    GradientCheckpointingLayer, else the longest ModuleList), lm_head and anything outside the blocks left out:
    the LoRA targets of a model type no family names."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.pytorch_utils import Conv1D

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    return sorted({name.rsplit(".", 1)[-1] for block in blocks for name, m in block.named_modules()
                   if name and isinstance(m, (torch.nn.Linear, Conv1D))})


def generation_stop_ids(name_or_path: str) -> list[int]:
    """The eos_token_id(s) of the folder's generation_config.json (else config.json), read at run time."""
    read = file_reader(name_or_path)
    for name in ("generation_config.json", "config.json"):
        raw = read(name)
        value = json.loads(raw).get("eos_token_id") if raw else None
        if value is not None:
            return [int(v) for v in (value if isinstance(value, list) else [value])]
    return []


def stop_token_ids(name_or_path: str, family: Union[Family, str], template_ids=()) -> list[int]:
    """What generation stops on: the template's stop ids, then (families with generation_stops) the model folder's
    generation_config.json eos ids; each once, in that order."""
    ids = [int(i) for i in template_ids]
    if as_family(family).generation_stops:
        ids += generation_stop_ids(name_or_path)
    return list(dict.fromkeys(ids))


def saved_added_tokens(folder: Path, facts: families.TokenizerFacts) -> Optional[dict]:
    """tokenizer.json's added tokens as transformers' from_pretrained reads them when tokenizer_config.json has no
    added_tokens_decoder (folders saved by transformers 5): {id: the token's settings}, from the folder's `facts`
    (families.tokenizer_facts, which read both files). Given to from_pretrained, they spare it a second parse of the
    whole tokenizer.json after the Rust one (0.4 s for Qwen's 151k tokens); the tokenizer is the same
    (tests/test_tokenizer_loading.py). None wherever transformers would read something else: a config that lists
    them, special_tokens_map.json or added_tokens.json present, another tokenizer file."""
    if not folder.is_dir() or not (folder / "tokenizer_config.json").is_file() or \
            any((folder / f).exists() for f in ("special_tokens_map.json", "added_tokens.json")):
        return None
    items = facts.added_entries
    if {"added_tokens_decoder", "fast_tokenizer_files"} & facts.settings.keys() or not isinstance(items, list) or \
            not all(isinstance(t, dict) and type(t.get("id")) is int and isinstance(t.get("content"), str)
                    for t in items):
        return None
    return {t["id"]: {k: v for k, v in t.items() if k != "id"} for t in items}


def load_tokenizer(name_or_path: str, family: Union[Family, str], trust_remote_code: bool = False):
    """The tokenizer of a `family` folder, loaded the way the registry says (see the module docstring)."""
    fam = as_family(family)
    path = Path(name_or_path)
    facts = families.tokenizer_facts(file_reader(name_or_path))
    bad = facts.problems
    if bad:
        raise InputError(f"--model_name_or_path {name_or_path}: " + "; ".join(bad))
    if trust_remote_code:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True)
    if fam.tokenizer:
        missing = [f for f in fam.tokenizer_files if not (path / f).is_file()]
        if path.exists() and missing:
            raise InputError(f"--model_name_or_path {path}: no {' or '.join(missing)} (the tokenizer file of "
                             f"{fam.title}). Pass a {fam.name} model folder.")
        cls = _import(fam.tokenizer)
        if cls is None:
            raise InputError(f"the {fam.name} tokenizer class {fam.tokenizer} is not in patch/ (yet); "
                             f"pass --trust_remote_code to use the folder's own tokenizer code")
        # the setting that tells the family (ChatGLM3's chatglm_version 3) is what our tokenizer is built with
        told = dict([fam.detect.setting]) if fam.detect.setting else {}
        return cls.from_pretrained(name_or_path, **told)
    try:
        if path.is_dir() and not all((path / f).is_file() for f in fam.tokenizer_files):
            from transformers import AutoTokenizer  # e.g. only a SentencePiece tokenizer.model: converted

            return AutoTokenizer.from_pretrained(name_or_path)
        from transformers import PreTrainedTokenizerFast

        saved = saved_added_tokens(path, facts)
        return PreTrainedTokenizerFast.from_pretrained(name_or_path, **({"added_tokens_decoder": saved} if saved
                                                                         else {}))
    except (OSError, ValueError) as e:
        raise InputError(f"--model_name_or_path {name_or_path}: cannot load a tokenizer ({e})") from e
