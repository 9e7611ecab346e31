"""main.py's start-up checks: the config file, and every setting checked before anything heavy loads.

    from train_setup import split_config, setting_problems, start_problems, model_dir_problems
    config, flags = split_config(["--output_dir", "runs/x", "sft.YAML"], ARG_CLASSES, parser)
    problems = setting_problems(ns) + start_problems(ns)   # ns: main.py's parsed flags; [] when all is well

- `split_config`: a YAML/JSON config file (keys = flag names) anywhere among the arguments, any suffix case.
- `setting_problems`: numbers that would crash or silently do nothing (batch sizes, accumulation steps, nothing
  to train, --loss_chunk_size 0, step intervals, LoRA sizes, rates), named with the flag to change.
- `start_problems`: required flags, --train_file given a raw input file, the model folder (`model_dir_problems`:
  config.json present and valid, weights present and not truncated), the output folder (checkpoints.py).
- `deepspeed_unknown_keys`: top-level keys of a DeepSpeed config that the installed deepspeed never reads
  (found by letting deepspeed's own config parser read the config and recording what it asks for).

main.py collects all of these into one error; needs no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Optional

from checkpoints import output_dir_problems

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


# ----------------------------------------------------------------------------------------------
# The config file
# ----------------------------------------------------------------------------------------------

def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"config file {path}: not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            cfg = json.loads(text)
        else:
            import yaml
            cfg = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise SystemExit(f"config file {path}: cannot parse ({e})") from e
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise SystemExit(f"config file {path}: expected a mapping of flag names to values, got {type(cfg).__name__}")
    return cfg


def _is_config_token(argv: list[str], i: int, parser) -> bool:
    tok = argv[i]
    if tok.startswith("-") or Path(tok).suffix.lower() not in CONFIG_SUFFIXES:
        return False
    if i == 0 or parser is None:
        return True
    prev = argv[i - 1]
    action = parser._option_string_actions.get(prev) if prev.startswith("-") and "=" not in prev else None
    if action is None or action.nargs == "?" or action.nargs == 0:
        return True  # after a positional, a --flag=value, a bool flag or a store_true flag: not a value
    return action.nargs == "+" and Path(tok).is_file()  # a list flag would take it as an item otherwise


def split_config(argv: list[str], arg_classes, parser=None) -> tuple[dict, list[str]]:
    """(settings of the YAML/JSON config file among argv, or {}; the remaining command-line flags).

    The file may come anywhere (not as the value of a flag), its suffix in any case (.yaml .yml .json)."""
    argv = list(argv)
    found = [i for i in range(len(argv)) if _is_config_token(argv, i, parser)]
    if not found:
        return {}, argv
    if len(found) > 1:
        raise SystemExit(f"main.py: several config files given ({', '.join(argv[i] for i in found)}): "
                         f"give one; flags after or before it override it")
    path = argv.pop(found[0])
    config = read_config_file(path)
    known = {f.name for cls in arg_classes for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(config) - known)
    if unknown:
        raise SystemExit(f"config file {path}: unknown settings {unknown}; use the names of main.py's "
                         f"flags without the leading -- (python main.py --help lists them)")
    return config, argv


def explicit_settings(argv: list[str], arg_classes, parser=None) -> list[str]:
    """Names of the settings the config file or the command line set (the rest are defaults)."""
    config, flags = split_config(argv, arg_classes, parser)
    names = list(config)
    for a in flags:
        if a.startswith("--"):
            name = a[2:].split("=")[0].replace("-", "_")
            if name not in names:
                names.append(name)
    return names


# ----------------------------------------------------------------------------------------------
# Settings (values only: nothing is read from disk)
# ----------------------------------------------------------------------------------------------

def _strategy(value) -> str:
    return str(getattr(value, "value", value)).lower()


def setting_problems(ns) -> list[str]:
    """Values of main.py's settings that would crash the run later or make it train nothing."""
    p = []
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(ns, name) < 1:
            p.append(f"--{name} {getattr(ns, name)}: must be at least 1")
    if ns.max_steps == 0:
        p.append("--max_steps 0 trains nothing: give the number of optimizer steps, or -1 (the default) to train "
                 "--num_train_epochs epochs")
    elif ns.max_steps < 0 and not (ns.num_train_epochs > 0 and math.isfinite(ns.num_train_epochs)):
        p.append(f"--num_train_epochs {ns.num_train_epochs} trains nothing: give a positive number of epochs, or "
                 f"--max_steps N")
    if ns.loss_chunk_size is not None and ns.loss_chunk_size < 1:
        p.append(f"--loss_chunk_size {ns.loss_chunk_size}: must be at least 1 (tokens per chunk); leave it out for "
                 f"the model config's value")
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps"):
        v = getattr(ns, name)
        if not (v >= 0 and math.isfinite(v)):
            p.append(f"--{name} {v}: must be a number >= 0")
    for name, strategy in (("logging_steps", "logging_strategy"), ("save_steps", "save_strategy"),
                           ("eval_steps", "eval_strategy")):
        v = getattr(ns, name)
        if _strategy(getattr(ns, strategy)) == "steps" and v is not None and not v > 0:
            p.append(f"--{name} {v}: must be > 0 with --{strategy} steps (a fraction < 1 means that share of "
                     f"the run)")
    if ns.dataloader_num_workers < 0:
        p.append(f"--dataloader_num_workers {ns.dataloader_num_workers}: must be >= 0")
    if ns.use_lora:
        if ns.lora_r < 1:
            p.append(f"--lora_r {ns.lora_r}: must be at least 1")
        if not ns.lora_alpha > 0:
            p.append(f"--lora_alpha {ns.lora_alpha}: must be > 0")
        if not 0 <= ns.lora_dropout < 1:
            p.append(f"--lora_dropout {ns.lora_dropout}: must be in [0, 1)")
    return p


# ----------------------------------------------------------------------------------------------
# The model folder
# ----------------------------------------------------------------------------------------------

def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a .safetensors file is unusable (missing, truncated, bad header), or None; reads only the header."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                return f"{path.name} is truncated ({size:,} bytes, its header alone needs {8 + n:,})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} has no readable safetensors header ({e})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and "data_offsets" in t]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"{path.name} is truncated ({size:,} bytes, its header lists {need:,})"
    return None


def _weights_problems(d: Path) -> list[str]:
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = d / index_name
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                return [f"{index_name} is not a valid weight index ({e})"]
            if kind == "safetensors":
                return [p for f in files if (p := _safetensors_problem(d / f))]
            return [f"{f} is missing" for f in files if not (d / f).is_file()]
    if (d / "model.safetensors").exists():
        return [p] if (p := _safetensors_problem(d / "model.safetensors")) else []
    if (d / "pytorch_model.bin").is_file():
        return [] if (d / "pytorch_model.bin").stat().st_size else ["pytorch_model.bin is empty"]
    return ["no weights (model.safetensors, model-*.safetensors with model.safetensors.index.json, or "
            "pytorch_model.bin)"]


def model_dir_problems(model: str) -> list[str]:
    """What is missing or broken in a model folder (config.json, weights), before anything loads it.

    A name that is not a local folder is looked up in the Hugging Face cache (its weights are then checked by
    from_pretrained)."""
    flag = f"--model_name_or_path {model}"
    d = Path(model).expanduser()
    local = d.is_dir()
    if not local and (d.is_absolute() or model.startswith((".", "~")) or d.exists()):
        return [f"{flag}: no such folder" if not d.exists() else f"{flag}: not a folder"]
    if not local:
        try:
            from transformers.utils import cached_file
            found = cached_file(model, "config.json", _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError) as e:
            return [f"{flag}: no such folder, and not a model in the Hugging Face cache ({e})"]
        if found is None:
            return [f"{flag}: no such folder, and no config.json for it in the Hugging Face cache"]
        d = Path(found).parent
    cfg = d / "config.json"
    if not cfg.is_file():
        return [f"{flag}: no config.json in the folder (a model folder holds config.json, the weights and the "
                f"tokenizer files; tools/make_tiny.py model builds a tiny one)"]
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        return [f"{flag}: config.json is not UTF-8 text ({e})"]
    except json.JSONDecodeError as e:
        return [f"{flag}: config.json is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})"]
    if not isinstance(config, dict) or not config.get("model_type"):
        return [f"{flag}: config.json has no model_type (expected a model's config, e.g. \"llama\" or \"chatglm\")"]
    return [f"{flag}: {p}" for p in _weights_problems(d)] if local else []


# ----------------------------------------------------------------------------------------------
# Everything main.py checks before it loads anything
# ----------------------------------------------------------------------------------------------

def _input_file_problem(flag: str, path: str) -> Optional[str]:
    if Path(path).is_file():
        return (f"--{flag} {path} is a file; main.py trains on a tokenized dataset folder: run "
                f"`python pre_tokenize.py --model_name_or_path MODEL --input {path} --output_dir DIR` "
                f"(then `python sort_and_group.py --train_file DIR` for --batch_method sort/pack) and pass "
                f"--{flag} DIR")
    return None


def start_problems(ns, batch_methods) -> list[str]:
    """Required flags, choices, input paths, the model folder and the output folder."""
    p = [f"--{name} is required (python main.py --help)" for name in ("model_name_or_path", "train_file",
                                                                      "output_dir") if not getattr(ns, name)]
    if ns.batch_method not in batch_methods:
        p.append(f"--batch_method {ns.batch_method!r}: expected one of {', '.join(batch_methods)}")
    if ns.save_merged_model and not ns.use_lora:
        p.append("--save_merged_model needs --use_lora (a full fine-tune already saves the whole model)")
    for flag in ("train_file", "validation_file"):
        if getattr(ns, flag) and (problem := _input_file_problem(flag, getattr(ns, flag))):
            p.append(problem)
    if ns.model_name_or_path:
        p += model_dir_problems(ns.model_name_or_path)
    if ns.output_dir:
        resume = ns.resume_from_checkpoint is not None and str(ns.resume_from_checkpoint).lower() not in (
            "", "false", "no", "0", "none")
        p += output_dir_problems(ns.output_dir, ns.model_name_or_path, resume)
    return p


# ----------------------------------------------------------------------------------------------
# DeepSpeed config keys
# ----------------------------------------------------------------------------------------------

class _Recorder(dict):
    """A dict that records every top-level key looked up in it (get, [], in, in .keys())."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def keys(self):
        outer = self

        class _Keys:
            def __contains__(self, key):
                return outer.__contains__(key)

            def __iter__(self):
                return iter(dict.keys(outer))

            def __len__(self):
                return len(dict.keys(outer))

        return _Keys()

    def __copy__(self):
        new = _Recorder(self)
        new.asked = self.asked
        return new


def _without_auto(value):
    if isinstance(value, dict):
        return {k: _without_auto(v) for k, v in value.items() if v != "auto"}
    return value


def deepspeed_unknown_keys(config) -> list[str]:
    """Top-level keys of a DeepSpeed config (path or dict) that the installed deepspeed never reads.

    deepspeed's DeepSpeedConfig reads a config dict key by key and ignores the rest: it reads an empty config
    (every key it knows, at its default) and this one (keys read only when others are set) from a recorder."""
    if isinstance(config, (str, os.PathLike)):
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []  # transformers reports an unreadable file itself
    if not isinstance(config, dict):
        return []
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        return []
    asked = set()
    filled = {**_without_auto(config), "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
              "gradient_accumulation_steps": 1}
    for probe in ({}, filled):
        rec = _Recorder(probe)
        try:
            DeepSpeedConfig(rec)
        except Exception:  # noqa: BLE001 - only the keys it asked for matter here
            pass
        asked |= rec.asked
    return sorted(k for k in config if k not in asked)
