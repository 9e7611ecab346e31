"""Install this toolkit's model files into a model folder, so `from_pretrained(DIR, trust_remote_code=True)` uses them.

    python patch/install.py --model_dir /models/glm-4-9b          # GLM-4, chatglm format (model_type "chatglm")
    python patch/install.py --model_dir /models/Llama-3.1-8B      # Llama (model_type "llama")
    # tiny CPU run: python tools/make_tiny.py ... then python patch/install.py --model_dir <that folder>

What it does, by family (read from config.json `model_type`):
  chatglm -> copies packed_attention.py, configuration_chatglm.py, modeling_chatglm.py, tokenization_chatglm.py;
             config.json auto_map: AutoConfig -> configuration_chatglm.ChatGLMConfig, AutoModel and
             AutoModelForCausalLM -> modeling_chatglm.ChatGLMForConditionalGeneration (other entries that name a
             class our files lack are dropped); tokenizer_config.json auto_map: AutoTokenizer ->
             tokenization_chatglm.ChatGLM4Tokenizer (GLM-4: a text tokenizer.model of tiktoken ranks) or
             tokenization_chatglm.ChatGLMTokenizer (ChatGLM2/3: a binary SentencePiece tokenizer.model).
  llama   -> copies packed_attention.py, modeling_llama.py; config.json auto_map: AutoModelForCausalLM ->
             modeling_llama.LlamaForCausalLM (config and tokenizer stay transformers' own).
Every file it replaces or rewrites is first copied to DIR/patch_backup/ (an existing backup is never
overwritten: later ones get a numeric suffix). Running it again changes nothing and backs up nothing.
Afterwards it resolves the classes through transformers' remote-code loader (no weights are loaded) to check.
"""
from __future__ import annotations

import ast
import filecmp
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(PATCH_DIR.parent))  # repository root: dataset.write_json_atomic
from dataset import write_json_atomic  # noqa: E402

BACKUP_DIR = "patch_backup"
FAMILIES = {
    "chatglm": {
        "files": ["packed_attention.py", "configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "tokenizer_auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
    },
    "llama": {
        "files": ["packed_attention.py", "modeling_llama.py"],
        "auto_map": {"AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"},
        "tokenizer_auto_map": None,
    },
}


@dataclass
class InstallArguments:
    model_dir: str = field(metadata={"help": "Model folder with config.json (GLM-4 chatglm format or Llama)."})
    verify: bool = field(default=True, metadata={"help": "Resolve the installed classes afterwards (no weights)."})


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
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
    refs = ref if isinstance(ref, list) else [ref]
    for r in refs:
        if r is None:
            continue
        module, _, cls = str(r).rpartition(".")
        if module in available and cls not in available[module]:
            return False
    return True


def _update_json(path: Path, model_dir: Path, updates: dict, available: dict[str, set[str]], log: list[str]):
    data = json.loads(path.read_text(encoding="utf-8"))
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
               + (f"; dropped entries naming classes our files lack: {dropped}" if dropped else ""))


def chatglm_tokenizer_class(model_dir: Path) -> str:
    """ChatGLM4Tokenizer when DIR/tokenizer.model is GLM-4's text file (`<base64> <rank>` lines), else
    ChatGLMTokenizer (ChatGLM2/3's binary SentencePiece model)."""
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        return "ChatGLM4Tokenizer"
    with open(path, "rb") as f:
        first = f.readline(4096).split()
    is_ranks = len(first) == 2 and first[1].isdigit() and all(
        chr(c).isalnum() or chr(c) in "+/=" for c in first[0])
    return "ChatGLM4Tokenizer" if is_ranks else "ChatGLMTokenizer"


def install(model_dir: str | Path, verify: bool = True) -> list[str]:
    """Install into `model_dir`; returns the list of actions taken (also printed by main)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --model_dir must be a model folder with config.json")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{config_path}: model_type {model_type!r} is not supported; this installer handles "
                         f"{sorted(FAMILIES)} (GLM-4 in the chatglm format, Llama)")
    spec = FAMILIES[model_type]
    missing = [name for name in spec["files"] if not (PATCH_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(f"missing in {PATCH_DIR}: {missing} (incomplete checkout of patch/)")
    tok_config = model_dir / "tokenizer_config.json"
    if spec["tokenizer_auto_map"] and not tok_config.is_file():
        raise FileNotFoundError(f"{tok_config} not found: a chatglm-format folder needs its tokenizer files")

    log: list[str] = []
    for name in spec["files"]:
        src, dst = PATCH_DIR / name, model_dir / name
        if dst.exists() and filecmp.cmp(src, dst, shallow=False):
            log.append(f"unchanged {name}")
            continue
        note = f" (backup: {_backup(dst, model_dir).relative_to(model_dir)})" if dst.exists() else ""
        shutil.copyfile(src, dst)
        log.append(f"copied    {name}{note}")

    available = {Path(n).stem: _defined_classes(PATCH_DIR / n) for n in spec["files"]}
    _update_json(config_path, model_dir, spec["auto_map"], available, log)
    if spec["tokenizer_auto_map"]:
        tok_map = {"AutoTokenizer": [f"tokenization_chatglm.{chatglm_tokenizer_class(model_dir)}", None]} \
            if model_type == "chatglm" else spec["tokenizer_auto_map"]
        _update_json(tok_config, model_dir, tok_map, available, log)
    if verify:
        log.append(_verify(model_dir, spec))
    return log


def _verify(model_dir: Path, spec: dict) -> str:
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    cls = get_class_from_dynamic_module(spec["auto_map"]["AutoModelForCausalLM"], str(model_dir))
    return f"verified  AutoModelForCausalLM -> {cls.__module__}.{cls.__name__} (config {type(config).__name__})"


def main(argv: list[str] | None = None) -> list[str]:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(InstallArguments).parse_args_into_dataclasses(args=argv)
    log = install(args.model_dir, verify=args.verify)
    print(f"patch/install.py -> {args.model_dir}")
    for line in log:
        print("  " + line)
    return log


if __name__ == "__main__":
    main()
