"""Chat templates by name, through the registry (patch/families.py), and the pre-tokenization run all entries share.

    from longsft.models import load_tokenizer
    from longsft.templates.registry import chat_format, pad_token_id
    tok = load_tokenizer("/tmp/tiny-llama3", "llama3")
    fmt = chat_format("longwriter", tok)              # longsft.templates.llama.LongWriterFormat (a longsft.templates.base.ChatFormat)
    pad_token_id(tok, "llama3", "longwriter")         # <|finetune_right_pad_id|>'s id (the family/template rule)

`pretokenize(args)` is what `pre_tokenize.py` runs: the folder's family (models.family_of) unless the front
end fixes it (`pre_tokenize_glm4.py`: glm4, `pre_tokenize_llama3.py`: llama3), the template (--template, else
the family's default), its tokenizer, then longsft.data.pretokenize.run. An unknown template, one the family's tokenizer cannot
express, or one only registered (not implemented yet) is an error that lists the available ones.
"""

from __future__ import annotations

import importlib
from typing import Optional, Union

from longsft.templates.base import ChatFormat, special_token_ids
from longsft.data.pretokenize import PretokenizeArguments, run
from longsft.data.inputs import InputError
from longsft.data.preference import PairFormat
from longsft.models import as_family, load_tokenizer, require_family
from patch import families
from patch.families import Family


def available() -> str:
    return ", ".join(families.implemented_templates())


def format_class(name: str) -> type[ChatFormat]:
    """The ChatFormat class of template `name` (its `impl` in the registry)."""
    try:
        t = families.template(name)
    except families.RegistryError as e:
        raise InputError(f"--template {name}: {e}") from None
    if t.impl is None:
        raise InputError(f"--template {name}: registered ({t.help}) but not implemented yet; available: "
                         f"{available()}")
    module, _, cls = t.impl.rpartition(".")
    return getattr(importlib.import_module(module), cls)


def chat_format(name: str, tokenizer, args=None) -> ChatFormat:
    """The chat format object of template `name` on `tokenizer`; its `problems` list what the tokenizer lacks.
    `args`: pre_tokenize.py's arguments, for a format that reads its own settings (`takes_args`: auto)."""
    cls = format_class(name)
    return cls(tokenizer, args) if args is not None and getattr(cls, "takes_args", False) else cls(tokenizer)


def check_template(fam: Family, name: Optional[str]) -> str:
    """`name` (default: the family's default template), checked to be a template of `fam` and implemented."""
    name = name or fam.default_template
    format_class(name)
    if name not in fam.templates:
        raise InputError(f"--template {name}: not a template of the {fam.name} family ({fam.title}); its "
                         f"templates: {', '.join(fam.templates)}")
    return name


def family_for_template(fam: Family, name: Optional[str]) -> Family:
    """The family to use for an explicit --template: `fam`, or the sibling family that our own tokenizer class of
    `fam` also builds and that has the template (a ChatGLM3 folder detected as ChatGLM2 because it declares no
    role tokens: `--template chatglm3` loads patch/'s ChatGLMTokenizer with chatglm_version 3)."""
    if not name or name in fam.templates or fam.tokenizer is None:
        return fam
    return next((f for f in families.FAMILIES.values() if f.tokenizer == fam.tokenizer
                 and f.model_class == fam.model_class and name in f.templates), fam)


def pad_token_id(tokenizer, family: Union[Family, str], template: Optional[str] = None) -> Optional[int]:
    """The pad id for data of `family` in `template`, by the registry's rule (patch/families.resolve_pad)."""
    fam = as_family(family)

    def lookup(source: str) -> Optional[int]:
        if source == "pad":
            return tokenizer.pad_token_id
        if source == "eos":
            return tokenizer.eos_token_id
        return special_token_ids(tokenizer, [source], [], "").get(source)

    return families.resolve_pad(families.pad_rule(fam, template), lookup)


def pretokenize(args: PretokenizeArguments, family: Optional[str] = None) -> dict:
    """Encode args.input with the template `args.template` (default: the family's) and write args.output_dir.
    `family`: the front ends' fixed family; None: the family of args.model_name_or_path. Returns the report."""
    fam = as_family(family) if family else require_family(args.model_name_or_path)
    chosen = family_for_template(fam, getattr(args, "template", None))
    if chosen is not fam:
        print(f"note: {args.model_name_or_path} looks like {fam.name} ({fam.title}); --template {args.template} "
              f"reads it as {chosen.name}, whose tokenizer builds that template's tokens", flush=True)
        fam = chosen
    name = check_template(fam, getattr(args, "template", None))
    if getattr(args, "output_dir", None) is None:
        args.output_dir = f"data/{fam.name}/{name}"
    tokenizer = load_tokenizer(args.model_name_or_path, fam, args.trust_remote_code)
    fmt = chat_format(name, tokenizer, args)  # a template's own settings (auto: --rewritten_replies, the limits)
    if getattr(args, "stage", "sft") == "dpo":  # preference records -> pairs (longsft/data/preference.py)
        fmt = PairFormat(fmt)
    pad = pad_token_id(tokenizer, fam, name) if not fmt.problems else None
    return run(args, fmt, template=name, model_family=fam.name, pad_token_id=pad, problems=fmt.problems)
