"""The value types of main.py's settings: checked for config-file values (with the config key that set them), and
known without importing transformers, so a typo fails before the heavy imports (longsft/train/early_checks.py).

    from longsft.train.setting_types import kind_of_hint, config_type_problems, training_argument_specs
    kinds = {"per_device_train_batch_size": kind_of_hint(int)}
    values, problems = config_type_problems({"per_device_train_batch_size": [1, 2]}, kinds, {}, "sft.yaml")
    # problems: ["config file sft.yaml: per_device_train_batch_size: [1, 2] is not a whole number"]
    python -c "from longsft.train.setting_types import training_argument_specs as t; print(len(t()))"   # ~114

A kind is a tuple of the types a setting takes: "none", "bool", "int", "float", "str", "dict", ("list", member),
("choice", values) and "other" (anything: a type this module does not know, such as accelerate's
ParallelismConfig). `kind_of_hint` reads a typing hint (the dataclasses' own), `kind_of_annotation` the same hint
as source text: `training_argument_specs` reads transformers' TrainingArguments fields from the installed
training_args.py without importing it (importing it takes ~10 s: torch, peft, bitsandbytes), and
`lenient_parser` builds an argparse parser with HfArgumentParser's option strings and value counts from them
(`--name`, `--name-with-dashes`, `--no_name` for a true bool, `nargs="?"` bools, `nargs="+"` lists). Where the
source cannot be read, None: the early checks then leave everything to the full parser. No torch, no transformers.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import importlib.util
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

OTHER = ("other",)


# ----------------------------------------------------------------------------------------------
# Kinds: from typing hints and from annotation source text
# ----------------------------------------------------------------------------------------------

def _union_members(hint) -> tuple:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(hint)
    return (hint,)


def kind_of_hint(hint) -> tuple:
    """The kind of a typing hint (int, Optional[str], list[str], Literal["a", "b"], an Enum, a Union...)."""
    kind = []
    for m in _union_members(hint):
        origin = typing.get_origin(m)
        if m is type(None):
            kind.append("none")
        elif m in (bool, int, float, str):
            kind.append(m.__name__)
        elif m is dict or origin is dict:
            kind.append("dict")
        elif m is list or origin is list:
            args = typing.get_args(m)
            inner = kind_of_hint(args[0]) if args else OTHER
            kind.append(("list", inner[0] if len(inner) == 1 else "other"))
        elif origin is typing.Literal:
            kind.append(("choice", tuple(typing.get_args(m))))
        elif isinstance(m, type) and issubclass(m, enum.Enum):
            kind.append(("choice", tuple(e.value for e in m)))
        else:
            return OTHER
    return tuple(kind)


_NAMES = {"None": "none", "NoneType": "none", "bool": "bool", "int": "int", "float": "float", "str": "str",
          "dict": "dict", "Dict": "dict"}


def kind_of_annotation(node: ast.expr, enums: Optional[dict] = None) -> tuple:
    """The kind of an annotation given as source (`int | None`, `Optional[str]`, `list[str]`, `Literal[False]`, an
    enum named in `enums`: class name -> its values); other names (classes) make it "other"."""
    enums = enums or {}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = kind_of_annotation(node.left, enums), kind_of_annotation(node.right, enums)
        return OTHER if OTHER in (left, right) else left + right
    if isinstance(node, ast.Constant) and node.value is None:
        return ("none",)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a string annotation
        try:
            return kind_of_annotation(ast.parse(node.value, mode="eval").body, enums)
        except SyntaxError:
            return OTHER
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
    if name is not None:
        return (_NAMES[name],) if name in _NAMES else (("choice", enums[name]),) if name in enums else OTHER
    if isinstance(node, ast.Subscript):
        base = kind_of_annotation_name(node.value)
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base == "Optional":
            inner = kind_of_annotation(args[0], enums)
            return OTHER if inner == OTHER else inner + ("none",)
        if base == "Union":
            kinds = [kind_of_annotation(a, enums) for a in args]
            return OTHER if OTHER in kinds else tuple(m for k in kinds for m in k)
        if base in ("list", "List"):
            inner = kind_of_annotation(args[0], enums)
            return (("list", inner[0] if len(inner) == 1 else "other"),)
        if base in ("dict", "Dict"):
            return ("dict",)
        if base == "Literal" and all(isinstance(a, ast.Constant) for a in args):
            return (("choice", tuple(a.value for a in args)),)
    return OTHER


def kind_of_annotation_name(node: ast.expr) -> Optional[str]:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None


# ----------------------------------------------------------------------------------------------
# Values: a config-file value checked (and converted) against a kind
# ----------------------------------------------------------------------------------------------

_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")  # HfArgumentParser's string_to_bool


def to_bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in _TRUE:
        return True
    if str(value).lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _describe(kind: tuple) -> str:
    words = {"none": "null", "bool": "true or false", "int": "a whole number", "float": "a number", "str": "text",
             "dict": "a mapping"}
    out = []
    for m in kind:
        if isinstance(m, tuple) and m[0] == "list":
            out.append(f"a list of {words.get(m[1], 'values')}")
        elif isinstance(m, tuple):
            out.append("one of " + ", ".join(map(repr, m[1])))
        elif m in words and not (m == "none" and len(kind) > 1):
            out.append(words[m])
    return " or ".join(out) or "a value"


def _scalar(value, m: str):
    """value as the scalar type m, or raise ValueError/TypeError (what argparse's type= conversion accepts, from
    text; from YAML's own types: bools only for bool, whole numbers for int)."""
    if m == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return to_bool(value)
        if type(value) is int and value in (0, 1):
            return bool(value)
    elif m == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value)
    elif m == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value)
    elif m == "str":
        if isinstance(value, str):
            return value
    raise TypeError(m)


def coerce(value, kind: tuple):
    """(True, the value converted) when `value` fits `kind`, else (False, what it should be)."""
    if kind == OTHER or "other" in kind:
        return True, value
    if value is None:
        return ("none" in kind, value if "none" in kind else _describe(kind))
    for exact in (True, False):  # values of the right type first, then conversions (text -> number, ...)
        for m in kind:
            try:
                if isinstance(m, tuple) and m[0] == "choice":
                    if value in m[1] or (not exact and str(value) in map(str, m[1])):
                        return True, value if value in m[1] else str(value)
                elif isinstance(m, tuple) and m[0] == "list":
                    items = value if isinstance(value, list) else None if exact else [value]
                    if items is not None:
                        ok = [coerce(v, (m[1],)) for v in items]
                        if all(o for o, _ in ok):
                            return True, [v for _, v in ok]
                elif m == "dict":
                    if isinstance(value, dict):
                        return True, value
                elif m == "none":
                    continue
                elif exact:
                    if type(value) is {"bool": bool, "int": int, "float": float, "str": str}[m] or (
                            m == "float" and type(value) is int):
                        return True, _scalar(value, m)
                elif m == "str" and isinstance(value, (int, float, bool)) and not any(k in kind for k in
                                                                                      ("int", "float", "bool")):
                    return True, str(value).lower() if isinstance(value, bool) else str(value)  # a YAML 600 or true
                else:
                    return True, _scalar(value, m)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                continue
    return False, _describe(kind)


def config_type_problems(config: dict, kinds: dict, sources: dict, path: str) -> tuple[dict, list[str]]:
    """(config with its values converted, problems): each value checked against its setting's kind, a problem
    naming the config key that set it (`sources`: setting -> e.g. "peft_config.r"; else the setting's name)."""
    out, problems = {}, []
    for key, value in config.items():
        kind = kinds.get(key, OTHER)
        ok, converted = coerce(value, kind)
        if ok:
            out[key] = converted
        else:
            problems.append(f"config file {path}: {sources.get(key, key)}: {value!r} is not {converted}")
    return out, problems


# ----------------------------------------------------------------------------------------------
# Field specs: our dataclasses, and TrainingArguments read from transformers' source
# ----------------------------------------------------------------------------------------------

MISSING = dataclasses.MISSING


@dataclass
class FieldSpec:
    name: str
    kind: tuple
    default: Any = None  # MISSING when required; None also when it could not be read
    argparse: dict = dataclasses.field(default_factory=dict)  # metadata keys argparse reads (nargs, const, ...)


ARGPARSE_METADATA = ("nargs", "const", "aliases", "choices")


def dataclass_specs(cls) -> list[FieldSpec]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        out.append(FieldSpec(f.name, kind_of_hint(hints[f.name]), default,
                             {k: f.metadata[k] for k in ARGPARSE_METADATA if k in f.metadata}))
    return out


def _metadata(node: Optional[ast.expr]) -> dict:
    """The argparse keys of a `field(metadata={...})` given as literals."""
    if not (isinstance(node, ast.Call) and kind_of_annotation_name(node.func) == "field"):
        return {}
    meta = next((k.value for k in node.keywords if k.arg == "metadata"), None)
    out = {}
    if isinstance(meta, ast.Dict):
        for k, v in zip(meta.keys, meta.values):
            if isinstance(k, ast.Constant) and k.value in ARGPARSE_METADATA:
                try:
                    out[k.value] = ast.literal_eval(v)
                except ValueError:
                    pass
    return out


def _literal(node: Optional[ast.expr]):
    if node is None:
        return MISSING
    if isinstance(node, ast.Call) and kind_of_annotation_name(node.func) == "field":
        kw = {k.arg: k.value for k in node.keywords}
        if "default" in kw:
            return _literal(kw["default"])
        if "default_factory" in kw:
            return [] if kind_of_annotation_name(kw["default_factory"]) == "list" else None
        return MISSING
    if isinstance(node, ast.Attribute):  # an enum member, e.g. IntervalStrategy.STEPS: its lower-case name
        return node.attr.lower()
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


ENUM_MODULES = ("training_args.py", "trainer_utils.py", "debug_utils.py")  # where TrainingArguments' enums live


def _enums(tree: ast.Module) -> dict:
    """{class name: its string values} of the Enum classes defined in a module's source."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any((kind_of_annotation_name(b) or "").endswith("Enum")
                                                  for b in node.bases):
            values = tuple(st.value.value for st in node.body if isinstance(st, ast.Assign)
                           and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str))
            if values:
                out[node.name] = values
    return out


def training_argument_specs() -> Optional[list[FieldSpec]]:
    """TrainingArguments' init fields as the installed transformers declares them (read from training_args.py, not
    imported; its enums from the modules that define them), or None when its source cannot be found or read."""
    try:
        spec = importlib.util.find_spec("transformers")
        folder = Path(spec.submodule_search_locations[0])
        trees = {name: ast.parse((folder / name).read_text(encoding="utf-8")) for name in ENUM_MODULES}
    except (AttributeError, ImportError, OSError, SyntaxError, TypeError, ValueError):
        return None
    tree, enums = trees["training_args.py"], {}
    for t in trees.values():
        enums.update(_enums(t))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments"), None)
    if cls is None:
        return None
    out = []
    for st in cls.body:
        if not isinstance(st, ast.AnnAssign) or not isinstance(st.target, ast.Name):
            continue
        if isinstance(st.value, ast.Call) and any(k.arg == "init" and isinstance(k.value, ast.Constant) and
                                                  k.value.value is False for k in st.value.keywords):
            continue
        out.append(FieldSpec(st.target.id, kind_of_annotation(st.annotation, enums), _literal(st.value),
                             _metadata(st.value)))
    return out or None


# ----------------------------------------------------------------------------------------------
# A parser with HfArgumentParser's option strings and value counts (types only where they are plain)
# ----------------------------------------------------------------------------------------------

def _hf_member(kind: tuple):
    """What HfArgumentParser makes of a union (one type per argument; see its _parse_dataclass_field)."""
    if len(kind) == 1:
        return kind[0]
    if "none" not in kind:  # e.g. `SaveStrategy | str`, `str | bool`, `str | list[X]`: the member after the first
        return kind[0] if kind[1] == "str" else kind[1]
    if "bool" not in kind:  # e.g. `int | None`, `dict | str | None`: the first member that is not None
        return kind[0] if kind[1] == "none" else kind[1]
    return "bool"  # `bool | None`


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):
        raise SystemExit(f"main.py: {message} (python main.py --help lists the flags)")


def lenient_parser(specs: list[FieldSpec]) -> argparse.ArgumentParser:
    """argparse over `specs` with the option strings and nargs HfArgumentParser gives them; values converted only
    for plain int / float / bool settings, text otherwise (choices and the rest are the full parser's). A bad
    value is one `main.py: argument --x: ...` message (SystemExit), not argparse's usage text."""
    parser = _OneLineErrors(allow_abbrev=False, add_help=False)
    for s in specs:
        aliases = s.argparse.get("aliases", [])
        names = [f"--{s.name}"] + ([f"--{s.name.replace('_', '-')}"] if "_" in s.name else []) + (
            [aliases] if isinstance(aliases, str) else list(aliases))
        member = _hf_member(s.kind) if s.kind != OTHER else "other"
        kw: dict = {"dest": s.name, "default": None if s.default is MISSING else s.default}
        if member == "bool":
            kw["type"] = to_bool
            if "none" not in s.kind or s.default not in (None, MISSING):  # HF: a plain bool, or one with a default
                kw.update(nargs="?", const=True)
        elif isinstance(member, tuple) and member[0] == "list":
            kw.update(nargs="+", type={"int": int, "float": float}.get(member[1], str))
        elif isinstance(member, tuple) and member[0] == "choice":  # HfArgumentParser: Literal and Enum choices
            kw.update(type=str, choices=[str(c) for c in member[1]])
        else:
            kw["type"] = {"int": int, "float": float}.get(member, str)
        kw.update({k: v for k, v in s.argparse.items() if k in ("nargs", "const", "choices")})  # as HF passes them
        parser.add_argument(*names, **kw)
        if member == "bool" and s.default is True:
            parser.add_argument(f"--no_{s.name}", f"--no-{s.name.replace('_', '-')}", action="store_false",
                                dest=s.name)
    return parser
