"""main.py's start-up checks: the config file, and every setting checked before anything heavy loads.

    from longsft.train.settings import split_config, setting_problems, start_problems, model_dir_problems
    config, flags = split_config(["--output_dir", "runs/x", "sft.YAML"], ARG_CLASSES, parser)
    problems = setting_problems(ns) + start_problems(ns)   # ns: main.py's parsed flags; [] when all is well

- `split_config`: a YAML/JSON config file (keys = flag names) anywhere among the arguments, any suffix case;
  a config in GLM-Edge's finetune.py layout (data_config / training_args / peft_config sections) is mapped onto
  main.py's flags by `glm_edge_settings` (its problems join the others through `read_settings`).
- `setting_problems`: numbers that would crash or silently do nothing (batch sizes, accumulation steps, nothing
  to train, --loss_chunk_size 0, step intervals, LoRA sizes, rates), named with the flag to change.
- `start_problems`: required flags, --train_file given a raw input file, the model folder (`model_dir_problems`:
  config.json present and valid, weights present and not truncated), the output folder (longsft/train/checkpoints.py).
- `deepspeed_unknown_keys`: top-level keys of a DeepSpeed config that the installed deepspeed never reads
  (found by letting deepspeed's own config parser read the config and recording what it asks for).

main.py collects all of these into one error; needs no torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from longsft.train.checkpoints import numbered_checkpoint_problem, output_dir_problems

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
BATCH_METHODS = ("naive", "sort", "pack")


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


def read_settings(argv: list[str], arg_classes, parser=None, specs=None) -> tuple[dict, list[str], list[str],
                                                                                list[str]]:
    """(settings of the YAML/JSON config file among argv, or {}; the remaining flags; problems; notes).

    The file may come anywhere (not as the value of a flag), its suffix in any case (.yaml .yml .json). A file in
    GLM-Edge's layout is mapped by `glm_edge_settings`: what cannot be mapped is in problems, what is ignored in
    notes. Every value is checked against its setting's type and converted (setting_types.config_type_problems;
    `specs`: the settings' FieldSpecs, default: read from arg_classes), and against the parser's choices; each
    problem names the config key that set it (`peft_config.r`, not --lora_r)."""
    from longsft.train.setting_types import config_type_problems, dataclass_specs

    argv = list(argv)
    found = [i for i in range(len(argv)) if _is_config_token(argv, i, parser)]
    if not found:
        return {}, argv, [], []
    if len(found) > 1:
        raise SystemExit(f"main.py: several config files given ({', '.join(argv[i] for i in found)}): "
                         f"give one; flags after or before it override it")
    path = argv.pop(found[0])
    config = read_config_file(path)
    specs = specs if specs is not None else [s for cls in arg_classes for s in dataclass_specs(cls)]
    known = {s.name for s in specs}
    problems, notes, sources = [], [], {}
    if is_glm_edge_layout(config):
        config, problems, notes = glm_edge_settings(config, path, known, sources)
    unknown = sorted(set(config) - known)
    if unknown:
        raise SystemExit(f"config file {path}: unknown settings {unknown}; use the names of main.py's "
                         f"flags without the leading -- (python main.py --help lists them)")
    if isinstance(config.get("lora_target_modules"), (list, tuple)):  # a YAML list of module names
        config["lora_target_modules"] = ",".join(map(str, config["lora_target_modules"]))
    config, type_problems = config_type_problems(config, {s.name: s.kind for s in specs}, sources, path)
    problems += type_problems
    for key, value in config.items():
        action = parser._option_string_actions.get(f"--{key}") if parser is not None else None
        choices = [str(getattr(c, "value", c)) for c in (getattr(action, "choices", None) or [])]
        if choices and value is not None and str(getattr(value, "value", value)) not in choices:
            problems.append(f"config file {path}: {sources.get(key, key)}: {value!r} is not one of "
                            f"{', '.join(choices)}")
    return config, argv, problems, notes


def split_config(argv: list[str], arg_classes, parser=None) -> tuple[dict, list[str]]:
    """(settings of the YAML/JSON config file among argv, or {}; the remaining command-line flags)."""
    config, flags, problems, _ = read_settings(argv, arg_classes, parser)
    if problems:
        raise SystemExit("main.py cannot start:\n  - " + "\n  - ".join(problems))
    return config, flags


# ----------------------------------------------------------------------------------------------
# GLM-Edge's config layout (its finetune/configs/lora.yaml)
# ----------------------------------------------------------------------------------------------

GLM_EDGE_SECTIONS = ("data_config", "training_args", "peft_config")
GLM_EDGE_IGNORED = {  # top-level keys of GLM-Edge's configs that main.py has no use for -> why
    "max_input_length": "main.py trains on data pre_tokenize.py already cut: pass --max_length "
                        "(max_input_length + max_output_length = {total}) to pre_tokenize.py",
    "max_output_length": None,  # reported with max_input_length
    "combine": "GLM-Edge's finetune.py option of its own data processing; pre_tokenize.py formats the data",
    "freezeV": "the vision tower of GLM-Edge-V (main.py trains text models only)",
    "swanlab": "use report_to (training_args) for a logger",
}
SEQ2SEQ_ONLY = ("generation_max_length", "generation_num_beams", "sortish_sampler")  # noted, not used
JSONL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv")


def is_glm_edge_layout(config: dict) -> bool:
    return any(k in config for k in GLM_EDGE_SECTIONS + ("max_input_length", "max_output_length"))


def _data_file(setting: str, flag: str, value, where: str, problems: list[str], out: dict) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        problems.append(f"{where}: data_config.{setting}: {value!r} is not a folder path (text)")
        return
    v = value
    if Path(v).is_file() or Path(v).suffix.lower() in JSONL_SUFFIXES:
        problems.append(f"{where}: data_config.{setting} {v} is a raw chat file (GLM-Edge's finetune.py tokenizes "
                        f"it at start); main.py trains on a pre-tokenized folder: run `python pre_tokenize.py "
                        f"--model_name_or_path MODEL --input {v} --output_dir DIR` (then `python sort_and_group.py "
                        f"--train_file DIR` for --batch_method sort/pack) and set data_config.{setting}: DIR")
    else:
        out[flag] = v


def glm_edge_settings(config: dict, path: str, known: set[str], sources: dict | None = None
                      ) -> tuple[dict, list[str], list[str]]:
    """GLM-Edge's finetune.py config layout -> (main.py settings, problems, notes).

        GLM-Edge key                          main.py setting
        data_config.train_file                train_file (a pre_tokenize.py folder; a raw file is a problem)
        data_config.val_file                  validation_file (the same)
        data_config.test_file                 test_file (a raw chat file: generated from and scored after training)
        data_config.num_proc                  ignored, noted (pre_tokenize.py --num_proc tokenizes)
        max_input_length, max_output_length   ignored, noted (pre_tokenize.py --max_length, their sum)
        combine, freezeV, swanlab             ignored, noted
        training_args.NAME                    NAME (a TrainingArguments flag); others a problem
        training_args.generation_config.max_new_tokens   test_max_new_tokens (other generation keys noted)
        training_args.predict_with_generate   - (main.py generates on test_file when there is one)
        training_args.generation_max_length, generation_num_beams, sortish_sampler   ignored, noted
        peft_config.peft_type LORA            use_lora: true (another peft_type is a problem)
        peft_config.task_type CAUSAL_LM       - (another task_type is a problem)
        peft_config.r, lora_alpha, lora_dropout   lora_r, lora_alpha, lora_dropout
        peft_config.target_modules            lora_target_modules (a list or a comma-separated string)
        any other top-level key               itself (main.py's flag names, as in a plain config file)

    A key that is not in the table and not a main.py flag is a problem too. `sources` (if given) is filled with
    main.py setting -> the GLM-Edge key that set it, for messages about its value."""
    where = f"config file {path} (GLM-Edge layout)"
    out, problems, notes = {}, [], []
    sources = {} if sources is None else sources

    def section(name):
        v = config.get(name) or {}
        if not isinstance(v, dict):
            problems.append(f"{where}: {name} must be a mapping, got {type(v).__name__}")
            return {}
        return v

    data = section("data_config")
    _data_file("train_file", "train_file", data.get("train_file"), where, problems, out)
    _data_file("val_file", "validation_file", data.get("val_file"), where, problems, out)
    if data.get("test_file") is not None:  # GLM-Edge's predict_with_generate: a raw chat file, scored after training
        if isinstance(data["test_file"], str):
            out["test_file"] = data["test_file"]
            sources["test_file"] = "data_config.test_file"
        else:
            problems.append(f"{where}: data_config.test_file: {data['test_file']!r} is not a file path (text)")
    if data.get("num_proc") is not None:
        notes.append(f"{where}: data_config.num_proc ignored: the tokenizing processes are pre_tokenize.py's "
                     f"--num_proc")
    for k in sorted(set(data) - {"train_file", "val_file", "test_file", "num_proc"}):
        problems.append(f"{where}: data_config.{k}: unknown (GLM-Edge's data_config has train_file, val_file, "
                        f"test_file, num_proc)")

    lengths = {}
    for k in ("max_input_length", "max_output_length"):
        v = config.get(k)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            problems.append(f"{where}: {k}: {v!r} is not a whole number > 0 (GLM-Edge's finetune.py needs one)")
        elif v is not None:
            lengths[k] = v
    for k, why in GLM_EDGE_IGNORED.items():
        if k in config and why:
            notes.append(f"{where}: {k} ignored: " + why.format(total=sum(lengths.values())))
    if "max_output_length" in config and "max_input_length" not in config:
        notes.append(f"{where}: max_output_length ignored: " + GLM_EDGE_IGNORED["max_input_length"].format(
            total=sum(lengths.values())))

    for k, v in section("training_args").items():
        if k in SEQ2SEQ_ONLY:
            notes.append(f"{where}: training_args.{k} ignored: main.py's generation on data_config.test_file is "
                         f"greedy, up to generation_config.max_new_tokens")
        elif k == "predict_with_generate":
            if v and data.get("test_file") is None:
                notes.append(f"{where}: training_args.predict_with_generate: no data_config.test_file to generate "
                             f"from")
        elif k == "generation_config":
            gen = v if isinstance(v, dict) else {}
            if not isinstance(v, dict):
                problems.append(f"{where}: training_args.generation_config must be a mapping, got "
                                f"{type(v).__name__}")
            if gen.get("max_new_tokens") is not None:
                out["test_max_new_tokens"] = gen["max_new_tokens"]
                sources["test_max_new_tokens"] = "training_args.generation_config.max_new_tokens"
            for g in sorted(set(gen) - {"max_new_tokens"}):
                notes.append(f"{where}: training_args.generation_config.{g} ignored: main.py's generation on "
                             f"data_config.test_file is greedy")
        elif k in known:
            out[k] = v
            sources[k] = f"training_args.{k}"
        else:
            problems.append(f"{where}: training_args.{k}: not a TrainingArguments setting "
                            f"(python main.py --help lists them)")

    peft = section("peft_config")
    if peft:
        ptype = str(peft.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            problems.append(f"{where}: peft_config.peft_type {peft.get('peft_type')}: main.py trains LORA "
                            f"adapters only (or all weights: leave peft_config out)")
        else:
            out["use_lora"] = True
        task = str(peft.get("task_type", "CAUSAL_LM")).upper()
        if task != "CAUSAL_LM":
            problems.append(f"{where}: peft_config.task_type {peft.get('task_type')}: main.py trains causal LMs "
                            f"(CAUSAL_LM)")
        for src, dst in (("r", "lora_r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"),
                         ("target_modules", "lora_target_modules")):
            if peft.get(src) is not None:
                out[dst] = peft[src]
                sources[dst] = f"peft_config.{src}"
        for k in sorted(set(peft) - {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout",
                                     "target_modules"}):
            problems.append(f"{where}: peft_config.{k}: not supported (main.py's LoRA takes r, lora_alpha, "
                            f"lora_dropout, target_modules)")

    for k, v in config.items():
        if k in GLM_EDGE_SECTIONS or k in GLM_EDGE_IGNORED:
            continue
        if k in known:
            out[k] = v
        else:
            problems.append(f"{where}: {k}: neither a GLM-Edge config key nor a main.py setting")
    return out, problems, notes


def explicit_settings(argv: list[str], arg_classes, parser=None) -> list[str]:
    """Names of the settings the config file or the command line set (the rest are defaults)."""
    config, flags, _, _ = read_settings(argv, arg_classes, parser)
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
        if resume and (problem := numbered_checkpoint_problem(ns.output_dir, ns.resume_from_checkpoint)):
            p.append(problem)
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


def read_deepspeed_config(value) -> dict:
    """The --deepspeed value as a dict: a path to a JSON file, a JSON string or a dict already ({} for None).
    Raises OSError / ValueError when it cannot be read."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    text = str(value)
    return json.loads(text if text.lstrip().startswith("{") else Path(text).read_text(encoding="utf-8"))


def deepspeed_unknown_keys(config) -> list[str]:
    """Top-level keys of a DeepSpeed config (path or dict) that the installed deepspeed never reads.

    deepspeed's DeepSpeedConfig reads a config dict key by key and ignores the rest: it reads an empty config
    (every key it knows, at its default) and this one (keys read only when others are set) from a recorder."""
    if isinstance(config, (str, os.PathLike)):
        try:
            config = read_deepspeed_config(config)
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
