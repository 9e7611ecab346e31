"""Install this toolkit's model files into a model folder, so `from_pretrained(DIR, trust_remote_code=True)` uses them.

    python patch/install.py --model_dir /models/glm-4-9b          # GLM-4, chatglm format (model_type "chatglm")
    python patch/install.py --model_dir /models/Llama-3.1-8B      # Llama (model_type "llama")
    python patch/install.py --model_dir /models/Qwen2.5-7B        # Qwen2 (also glm, glm4, qwen3, mistral)
    # tiny CPU run: python tools/make_tiny.py ... then python patch/install.py --model_dir <that folder>

What it does, by family (patch/families.py: config.json `model_type`, and for chatglm the tokenizer files):
  chatglm -> copies packed_attention.py, configuration_chatglm.py, modeling_chatglm.py, tokenization_chatglm.py;
             config.json auto_map: AutoConfig -> configuration_chatglm.ChatGLMConfig, AutoModel and
             AutoModelForCausalLM -> modeling_chatglm.ChatGLMForConditionalGeneration (other entries that name a
             class our files lack are dropped); tokenizer_config.json auto_map: AutoTokenizer ->
             tokenization_chatglm.ChatGLM4Tokenizer (GLM-4: a text tokenizer.model of tiktoken ranks) or
             tokenization_chatglm.ChatGLMTokenizer (ChatGLM2/3: a binary SentencePiece tokenizer.model).
  llama   -> copies packed_attention.py, modeling_llama.py; config.json auto_map: AutoModelForCausalLM ->
             modeling_llama.LlamaForCausalLM (config and tokenizer stay transformers' own).
  glm, glm4, qwen2, qwen3, mistral -> copies packed_attention.py, modeling_native.py; config.json auto_map:
             AutoModelForCausalLM -> modeling_native.<transformers' class name> (e.g. Qwen2ForCausalLM). Not needed
             by main.py (it imports patch/ directly), only for other code loading the folder with trust_remote_code.
Every auto_map entry left in the JSON files it rewrites names one of our classes: entries naming other code
(the folder's own .py files, another repository's) are dropped, so trust_remote_code runs only our files.
Every file it replaces or rewrites is first copied to DIR/patch_backup/ (an existing backup is never
overwritten: later ones get a numeric suffix). Running it again changes nothing and backs up nothing.
Afterwards it checks the result without running any code of the folder's own: the installed files must equal
ours, and our config class reads config.json and our model class resolves (no weights are loaded).
A folder without config.json, or with a config.json that is not valid JSON, is refused with one message.
"""
from __future__ import annotations

import ast
import filecmp
import importlib.util
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parent

try:  # imported as patch.install
    from . import families
except ImportError:  # run as `python patch/install.py`: patch/ is sys.path[0]; nothing from the root is imported
    import families

BACKUP_DIR = "patch_backup"


@dataclass
class InstallArguments:
    model_dir: str = field(metadata={"help": "Model folder with config.json (GLM-4 chatglm format or Llama)."})
    verify: bool = field(default=True, metadata={"help": "Resolve the installed classes afterwards (no weights)."})


EXIT_USER_ERROR = 2  # the toolkit's exit status for a user mistake (errors.EXIT_USER_ERROR; patch/ imports no root module)


class InstallError(ValueError):
    """A model folder install.py cannot install into (the message names the folder and what is wrong)."""


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, obj) -> None:
    """JSON through a temp file and a rename: a reader never sees half a file (patch/ imports nothing of ours)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or InstallError naming the file and what is wrong with it."""
    if not path.is_file():
        raise InstallError(f"{path.parent}: no {path.name} in the folder: --model_dir must be a model folder "
                           f"with {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InstallError(f"{path}: not UTF-8 text ({e}); restore the model's {path.name}") from e
    except json.JSONDecodeError as e:
        raise InstallError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); restore the "
                           f"model's {path.name}") from e
    if not isinstance(data, dict):
        raise InstallError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _backup(path: Path, model_dir: Path) -> Path:
    backup_dir = model_dir / BACKUP_DIR
    backup_dir.mkdir(exist_ok=True)
    target, n = backup_dir / path.name, 1
    while target.exists():
        if filecmp.cmp(target, path, shallow=False):
            return target  # this exact content is already backed up
        target, n = backup_dir / f"{path.name}.{n}", n + 1
    shutil.copy2(path, target)
    return target


def _defined_classes(module_file: Path) -> set[str]:
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.ClassDef)}


def _reference_ok(ref, available: dict[str, set[str]]) -> bool:
    """Whether an auto_map value names only classes of our files (a list: [slow, fast] tokenizer, None allowed)."""
    refs = ref if isinstance(ref, list) else [ref]
    for r in refs:
        if r is None:
            continue
        module, _, cls = str(r).rpartition(".")
        if module not in available or cls not in available[module]:
            return False
    return any(r is not None for r in refs)


def _update_json(path: Path, model_dir: Path, updates: dict, available: dict[str, set[str]], log: list[str]):
    data = read_json(path, "its config files")
    old_map = dict(data.get("auto_map") or {})
    new_map = {k: v for k, v in old_map.items() if _reference_ok(v, available)}
    dropped = sorted(set(old_map) - set(new_map))
    new_map.update(updates)
    if new_map == old_map:
        log.append(f"unchanged {path.name} auto_map")
        return
    backup = _backup(path, model_dir)
    data["auto_map"] = new_map
    write_json_atomic(path, data)
    log.append(f"updated   {path.name} auto_map (backup: {backup.relative_to(model_dir)})"
               + (f"; dropped entries naming code that is not ours: {dropped}" if dropped else ""))


def install_spec(model_dir: Path, model_type) -> tuple[str, families.Install]:
    """(family names, what to install) for the folder: by config.json model_type, and when the families of that
    model_type install different things (chatglm: GLM-4 vs ChatGLM2/3 tokenizers), by the tokenizer files."""
    candidates = families.of_model_type(model_type) if model_type else []
    if not candidates:
        raise InstallError(f"{model_dir / 'config.json'}: model_type {model_type!r} is not supported; this installer "
                           f"handles {families.model_types()} ("
                           + "; ".join(f.title for f in families.FAMILIES.values()) + ")")
    if all(f.install == candidates[0].install for f in candidates):
        return "/".join(f.name for f in candidates), candidates[0].install
    read_json(model_dir / "tokenizer_config.json", f"its tokenizer files (a {model_type} folder needs "
              f"tokenizer_config.json)")  # a broken file: say so, rather than "cannot tell the family"
    fam = families.detect_folder(model_dir)
    if fam is None or fam not in candidates:
        raise InstallError(f"{model_dir}: cannot tell which {model_type} family this is, and they install different "
                           f"tokenizer code: {families.why_undetected(families.folder_reader(model_dir))}")
    return fam.name, fam.install


def install(model_dir: str | Path, verify: bool = True) -> list[str]:
    """Install into `model_dir`; returns the list of actions taken (also printed by main)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InstallError(f"--model_dir {model_dir}: no such folder")
    config_path = model_dir / "config.json"
    model_type = read_json(config_path, "config.json (GLM-4 in the chatglm format, or Llama)").get("model_type")
    family_names, spec = install_spec(model_dir, model_type)
    missing = [name for name in spec.files if not (PATCH_DIR / name).is_file()]
    if missing:
        raise InstallError(f"missing in {PATCH_DIR}: {missing} (incomplete checkout of patch/)")
    tok_config = model_dir / "tokenizer_config.json"
    if spec.tokenizer_auto_map:
        read_json(tok_config, f"its tokenizer files (a {family_names} folder needs tokenizer_config.json)")

    log: list[str] = []
    for name in spec.files:
        src, dst = PATCH_DIR / name, model_dir / name
        if dst.exists() and filecmp.cmp(src, dst, shallow=False):
            log.append(f"unchanged {name}")
            continue
        note = f" (backup: {_backup(dst, model_dir).relative_to(model_dir)})" if dst.exists() else ""
        shutil.copyfile(src, dst)
        log.append(f"copied    {name}{note}")

    available = {Path(n).stem: _defined_classes(PATCH_DIR / n) for n in spec.files}
    _update_json(config_path, model_dir, spec.auto_map, available, log)
    if spec.tokenizer_auto_map:
        tok_map = spec.tokenizer_auto_map
        _update_json(tok_config, model_dir, tok_map, available, log)
    if verify:
        log.append(_verify(model_dir, spec))
    return log


def _load_ours(model_dir: Path, module: str, files: list[str]):
    """Module `module` of model_dir after checking that every file of ours there equals ours byte for byte; loaded
    in a package made for the folder (its __init__.py, if any, never runs), so relative imports reach only
    those checked files."""
    for name in files:
        if not filecmp.cmp(model_dir / name, PATCH_DIR / name, shallow=False):
            raise InstallError(f"{model_dir / name}: differs from {PATCH_DIR / name} after the install")
    package = f"_longsft_installed_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(package, model_dir / "__init__.py",
                                                  submodule_search_locations=[str(model_dir)])
    sys.modules[package] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{package}.{module}")


def _verify(model_dir: Path, spec: families.Install) -> str:
    """Resolve the installed classes with our files only (no code of the folder's own runs, no weights load)."""
    module, _, name = spec.auto_map["AutoModelForCausalLM"].rpartition(".")
    cls = getattr(_load_ours(model_dir, module, spec.files), name)
    config = cls.config_class.from_pretrained(model_dir)
    if not isinstance(config, cls.config_class):
        raise InstallError(f"{model_dir / 'config.json'}: read as {type(config).__name__}, not {cls.config_class}")
    return f"verified  AutoModelForCausalLM -> {module}.{cls.__name__} (config {type(config).__name__})"


def main(argv: list[str] | None = None) -> list[str]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(InstallArguments, allow_abbrev=False)  # exact flag names: no --prefix matching
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    log = install(args.model_dir, verify=args.verify)
    print(f"patch/install.py -> {args.model_dir}")
    for line in log:
        print("  " + line)
    return log


if __name__ == "__main__":
    try:
        main()
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
