"""main.py's checks of --deepspeed and --sequence_parallel_size, before anything loads (no torch, no deepspeed).

    from longsft.train.deepspeed_checks import deepspeed_config_problems, sequence_parallel_problems
    deepspeed_config_problems('{"zero_optimization": {"stage": "auto"}}')
    # ['--deepspeed ...: zero_optimization.stage is \\'auto\\': must be 0, 1, 2 or 3 (DeepSpeed fills no "auto" here)']
    sequence_parallel_problems(4, 8, "pack", "ds_config/stage3.json")   # [] : 8 ranks, 2 groups of 4

A DeepSpeed config is read defensively: the file or JSON text must parse, be an object, and the keys main.py and
the HF integration read must have their types (sections objects, `zero_optimization.stage` 0-3, batch sizes and
`sequence_parallel_size` whole numbers or "auto", `reduce_scatter` true/false); each problem names the key. The
sequence-parallel rules (longsft/train/sequence_parallel.py's docstring) need a readable config.
"""

from __future__ import annotations

from longsft.train.settings import read_deepspeed_config

SECTIONS = ("zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "activation_checkpointing",
            "flops_profiler", "data_types", "comms_logger", "tensorboard", "wandb", "csv_monitor")
WHOLE_OR_AUTO = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "sequence_parallel_size")
ZERO_STAGES = (0, 1, 2, 3)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def zero_stage(cfg: dict) -> int:
    """The ZeRO stage of a config that deepspeed_config_problems accepted (0 when not set)."""
    zero = cfg.get("zero_optimization") or {}
    return int(zero.get("stage", 0) or 0)


def deepspeed_config_problems(value) -> list[str]:
    """What in the --deepspeed config (a path, JSON text or a dict) cannot be used, each naming its key; [] if
    fine (or not given)."""
    if value is None or value == "":
        return []
    flag = f"--deepspeed {value if isinstance(value, str) else '(mapping)'}"
    try:
        cfg = read_deepspeed_config(value)
    except (OSError, ValueError) as e:
        return [f"{flag}: cannot read it as a JSON DeepSpeed config ({e})"]
    if not isinstance(cfg, dict):
        return [f"{flag}: a DeepSpeed config is a JSON object ({{\"zero_optimization\": {{...}}, ...}}), not a "
                f"{type(cfg).__name__}"]
    p = []
    for key in SECTIONS:
        if key in cfg and not isinstance(cfg[key], dict):
            p.append(f"{flag}: {key} is {cfg[key]!r}: must be an object {{...}} (e.g. \"zero_optimization\": "
                     f"{{\"stage\": 3}})")
    for key in WHOLE_OR_AUTO:
        v = cfg.get(key)
        if v is not None and v != "auto" and not (_whole(v) and v >= 1):
            p.append(f"{flag}: {key} is {v!r}: must be a whole number >= 1 or \"auto\"")
    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict):
        stage = zero.get("stage", 0)
        if not (_whole(stage) and stage in ZERO_STAGES):
            p.append(f"{flag}: zero_optimization.stage is {stage!r}: must be 0, 1, 2 or 3 (DeepSpeed fills no "
                     f"\"auto\" here)")
        for key in ("offload_param", "offload_optimizer"):
            if key in zero and not isinstance(zero[key], dict):
                p.append(f"{flag}: zero_optimization.{key} is {zero[key]!r}: must be an object "
                         f"(e.g. {{\"device\": \"cpu\"}})")
        if "reduce_scatter" in zero and not isinstance(zero["reduce_scatter"], bool):
            p.append(f"{flag}: zero_optimization.reduce_scatter is {zero['reduce_scatter']!r}: must be true or false")
    return p


def sequence_parallel_problems(size: int, world_size: int, batch_method: str, deepspeed) -> list[str]:
    """What stops --sequence_parallel_size SIZE from running (before anything loads); [] when fine or SIZE is 1.
    The rules that read the DeepSpeed config are skipped when it is unusable (deepspeed_config_problems says why)."""
    flag = f"--sequence_parallel_size {size}"
    if size < 1:
        return [f"{flag}: must be at least 1 (1 = no sequence parallelism)"]
    if size == 1:
        return []
    p = []
    if world_size % size:
        p.append(f"{flag}: the {world_size} rank(s) must be a multiple of it (data-parallel size = ranks / it); "
                 f"launch a multiple of {size} processes")
    if batch_method != "pack":
        p.append(f"{flag} needs --batch_method pack (a shard is a slice of one pack), not {batch_method}")
    if not deepspeed:
        p.append(f"{flag} runs on DeepSpeed's Ulysses: add --deepspeed ds_config/stage3.json (or stage1/2)")
        return p
    if deepspeed_config_problems(deepspeed):  # reported by main.py's settings check, each naming its key
        return p
    cfg = read_deepspeed_config(deepspeed)
    zero = cfg.get("zero_optimization") or {}
    if zero_stage(cfg) == 3 and zero.get("reduce_scatter", True) is False:
        p.append(f"{flag} with ZeRO-3 and \"reduce_scatter\": false: DeepSpeed then averages some gradient buckets "
                 f"over the world and others over world / sequence-parallel size, so no loss scale is exact; remove "
                 f"\"reduce_scatter\" from zero_optimization in --deepspeed")
    given = cfg.get("sequence_parallel_size")
    if given not in (None, "auto") and given != size:
        p.append(f"--deepspeed sets sequence_parallel_size {given}, {flag} asks for {size}: remove the key from the "
                 f"DeepSpeed config (main.py sets it)")
    return p
