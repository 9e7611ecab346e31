"""Model folders through the registry (patch/families.py): a folder's family, its tokenizer and its model class.

    from models import family_of, load_tokenizer, model_class
    fam = family_of("/models/glm-4-9b")             # Family "glm4", from config.json and the tokenizer files
    tok = load_tokenizer("/models/glm-4-9b", fam)   # patch/'s ChatGLM4Tokenizer: no code from the folder runs
    cls = model_class("chatglm")                    # patch.modeling_chatglm.ChatGLMForConditionalGeneration

Tokenizers: a family with its own class in patch/ (GLM-4, ChatGLM2/3) loads it on the folder's tokenizer.model;
the Llama families load transformers' fast tokenizer from tokenizer.json (`PreTrainedTokenizerFast`, which does
not import torch; a local folder without tokenizer.json goes through AutoTokenizer, which does). The folder's own
tokenizer code runs only with trust_remote_code (AutoTokenizer). Nothing here imports torch; `model_class`
imports the patch/ modeling module, which does. User mistakes raise chat_inputs.InputError.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional, Union

from chat_inputs import InputError
from patch import families
from patch.families import Family


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


def family_of(name_or_path: str) -> Optional[Family]:
    """The registry family of a model or tokenizer folder (or hub id), None when no family matches."""
    return families.detect(file_reader(name_or_path))


def require_family(name_or_path: str, flag: str = "--model_name_or_path") -> Family:
    fam = family_of(name_or_path)
    if fam is None:
        raise InputError(f"{flag} {name_or_path}: cannot tell its model family: "
                         f"{families.why_undetected(file_reader(name_or_path))}")
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


def model_class(model_type: str):
    """The patched model class for a config.json model_type (one class serves all of its families)."""
    path = families.model_class_of(model_type)
    if path is None:
        raise InputError(f"config.json model_type {model_type!r} is not supported: expected one of "
                         f"{families.model_types()} (or pass --trust_remote_code to use the folder's own code)")
    return _import(path)


def load_tokenizer(name_or_path: str, family: Union[Family, str], trust_remote_code: bool = False):
    """The tokenizer of a `family` folder, loaded the way the registry says (see the module docstring)."""
    fam = as_family(family)
    path = Path(name_or_path)
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
        return cls.from_pretrained(name_or_path)
    try:
        if path.is_dir() and not all((path / f).is_file() for f in fam.tokenizer_files):
            from transformers import AutoTokenizer  # e.g. only a SentencePiece tokenizer.model: converted

            return AutoTokenizer.from_pretrained(name_or_path)
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise InputError(f"--model_name_or_path {name_or_path}: cannot load a tokenizer ({e})") from e
