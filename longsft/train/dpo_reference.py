"""The reference of preference training: a second model kept in eval mode, and stored reference log-probs.

    from longsft.train.dpo_reference import load_reference_model, RefLogpsStore
    ref = load_reference_model(model_args, "/models/glm-4-9b", torch.bfloat16)   # like the policy, frozen
    store = RefLogpsStore("data/pairs", identity, lengths)   # DIR/ref_logps/, replaced whole
    store.load() -> float64 [num_samples] or None;  store.save(values)

Where the reference comes from (longsft/train/dpo.reference_kind; main.py --stage dpo):
- `--ref_model PATH`, or without it and without LoRA a frozen copy of --model_name_or_path: loaded through the
  registry like the policy (load_model), eval mode, no gradients; under DeepSpeed it gets its own inference engine
  (`prepare_reference_model`: the run's config without optimizer; ZeRO-3 keeps it sharded across the ranks as it was
  loaded, ZeRO-1/2 hold it whole, as they hold the policy's weights);
- with LoRA: the policy itself with its adapters disabled (peft's disable_adapter), nothing more in memory;
- `--precompute_ref_logps`: one of the above runs once over the training (and validation) pairs before the first
  step, on every rank in parallel (each reads its share of packs, sequence-parallel groups as in training); the
  per-sample sums go to DIR/ref_logps/ (logps.bin float64 [num_samples], NaN for samples not packed; meta.json with
  the reference's identity: model folder, its weight files' sizes and times, dtype, and a digest of the sample
  lengths that entered the packs). A later run (a resume, another run on the same data and reference) reads them
  instead of computing; any difference in that identity computes them again and replaces the folder. The folder is
  written atomically by rank 0 (longsft/atomic_dir.py); a dataset folder that cannot be written keeps them in memory
  only (logged). A --ref_model loaded for the pass is freed after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from longsft.atomic_dir import replace_dir, replace_problem, sweep_stale, work_name, write_json_atomic
from longsft.data.storage import META_FILE, REF_LOGPS_DIR, REF_LOGPS_FORMAT, REF_LOGPS_NAMES

logger = logging.getLogger("longsft.train")
REF_LOGPS_VERSION = 1


# ----------------------------------------------------------------------------------------------
# The reference model
# ----------------------------------------------------------------------------------------------

def load_reference_model(model_args, path: str, dtype: torch.dtype):
    """The reference at `path`, loaded through the registry as the policy is (longsft.train.model.load_model; under
    ZeRO-3 partitioned as it loads), in eval mode with no gradients."""
    from longsft.train.model import load_model, read_model_type

    ref_args = dataclasses.replace(model_args, model_name_or_path=path)
    model = load_model(ref_args, read_model_type(path), dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def prepare_reference_model(model, trainer):
    """The reference ready to run where the policy runs: a DeepSpeed inference engine under DeepSpeed (the run's
    config without optimizer and scheduler; ZeRO stage 3 kept, 1/2 become 0: those stages shard only optimizer
    states), else the model on the run's device. Eval mode."""
    if trainer.is_deepspeed_enabled:
        import copy

        import deepspeed

        config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        zero = config.setdefault("zero_optimization", {})
        if int(zero.get("stage", 0) or 0) != 3:
            zero["stage"] = 0
        zero.pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine
    model.to(trainer.args.device)
    model.eval()
    return model


def release_reference_model(engine) -> None:
    """Free a reference model (after the precomputing pass)."""
    if hasattr(engine, "destroy"):
        engine.destroy()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Stored reference log-probs
# ----------------------------------------------------------------------------------------------

def folder_identity(path: str) -> dict:
    """What identifies a model folder's weights: its real path and its files' names, sizes and modification times."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return {"name": str(path)}
    files = sorted(f for f in p.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".bin", ".json")))
    return {"path": str(p.resolve()),
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def reference_identity(model_path: str, ref_path: str | None, dtype) -> dict:
    """The identity of the reference whose log-probs are stored: which weights (--ref_model, else the initial model,
    which is also a LoRA policy's base), which precision."""
    return {"model": folder_identity(ref_path or model_path), "dtype": str(dtype)}


class RefLogpsStore:
    """DIR/ref_logps of one dataset: the reference log-prob of each sample, stored with what it depends on."""

    def __init__(self, data_dir: str | os.PathLike, identity: dict, sample_lengths: np.ndarray):
        self.data_dir = Path(data_dir)
        self.folder = self.data_dir / REF_LOGPS_DIR
        lengths = np.ascontiguousarray(sample_lengths, dtype=np.int64)
        self.num_samples = int(lengths.size)
        self.key = {**identity, "num_samples": self.num_samples,
                    "sample_lengths_sha1": hashlib.sha1(lengths.tobytes()).hexdigest()}

    def load(self) -> np.ndarray | None:
        """The stored values when they were made by this reference for these samples, else None."""
        try:
            meta = json.loads((self.folder / META_FILE).read_text(encoding="utf-8"))
            if meta.get("format") != REF_LOGPS_FORMAT or meta.get("version") != REF_LOGPS_VERSION \
                    or meta.get("key") != json.loads(json.dumps(self.key)):
                return None
            values = np.fromfile(self.folder / "logps.bin", dtype=np.float64)
        except (OSError, ValueError):
            return None
        return values if values.size == self.num_samples else None

    def save(self, values: np.ndarray) -> bool:
        """Store the values atomically (the folder replaced whole, only if it is ours); False when it cannot be."""
        problem = replace_problem(self.folder, "reference log-probs folder", REF_LOGPS_FORMAT, REF_LOGPS_NAMES)
        if problem:
            logger.warning("reference log-probs not stored: %s", problem)
            return False
        tmp = None
        try:
            sweep_stale(self.folder)
            tmp = work_name(self.folder)
            tmp.mkdir()
            np.ascontiguousarray(values, dtype=np.float64).tofile(tmp / "logps.bin")
            write_json_atomic(tmp / META_FILE, {"format": REF_LOGPS_FORMAT, "version": REF_LOGPS_VERSION,
                                                "key": self.key, "computed": int(np.isfinite(values).sum())})
            replace_dir(tmp, self.folder)
        except OSError as e:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            logger.warning("reference log-probs not stored in %s (%s): kept in memory, a resumed run computes them "
                           "again", self.folder, e)
            return False
        return True
