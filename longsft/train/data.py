"""The training data as main.py reads it: checks of a dataset folder against the model and its tokenizer (every
problem named with its fix), statistics for the start-up log, samples longer than the model's context (a warning
naming the RoPE flags that cover them), and the torch datasets of each --batch_method.

    from longsft.train.data import check_data, build_datasets
    problems, stats = check_data("data/glm4/longwriter", "train", "pack", rows, tokenizer, family)

No processes, no model: only the tokenized folder (longsft/data/storage.py), its packs (sort_and_group.py) and the tokenizer.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from longsft.train import rope
from longsft.train.batches import LMDataset, LMPackDataset, LMSortDataset
from longsft.data.storage import IGNORE_INDEX, DatasetFormatError, PackedData, TokenizedData, check_token_ids
from patch.families import Family

logger = logging.getLogger("longsft.train")

# ----------------------------------------------------------------------------------------------
# Data: datasets, checks and statistics
# ----------------------------------------------------------------------------------------------

def target_stats(data: TokenizedData, chunk_tokens: int = 1 << 26) -> dict:
    """Targets (labels != -100 after each sample's first token) and samples without any, read in chunks."""
    offsets = np.asarray(data.offsets)
    n = len(offsets) - 1
    targets = no_target = 0
    start = 0
    while start < n:
        end = int(np.searchsorted(offsets, offsets[start] + chunk_tokens, side="right")) - 1
        end = min(max(end, start + 1), n)
        a, b = int(offsets[start]), int(offsets[end])
        mask = np.asarray(data.labels[a:b]) != IGNORE_INDEX
        rel = offsets[start:end] - a
        mask[rel] = False  # a sample's first token is never predicted
        per = np.add.reduceat(mask.astype(np.int64), rel)
        targets += int(per.sum())
        no_target += int((per == 0).sum())
        start = end
    return {"targets": targets, "samples_without_targets": no_target}


def check_data(path: str, role: str, batch_method: str, rows: int, tokenizer, family: Optional[Family],
               model_dir: str = "MODEL") -> tuple[list, dict]:
    """(problems, statistics) of one dataset folder against the model and its tokenizer."""
    flag = f"--{role}_file {path}"
    problems, stats = [], {}
    try:
        data = TokenizedData(path)
    except DatasetFormatError as e:
        return [f"{flag}: {e}"], stats
    meta = data.meta
    lengths = data.lengths
    stats.update(samples=len(data), tokens=int(meta["num_tokens"]),
                 mean_length=round(float(lengths.mean()), 1) if len(data) else 0,
                 max_length=int(lengths.max()) if len(data) else 0)
    if len(data) == 0:
        problems.append(f"{flag}: the dataset is empty; check the pre-tokenization report.json in it")
        return problems, stats
    problems += [f"{flag}: {p}" for p in check_token_ids(data, rows, f"the model's {rows} embedding rows")]
    tok_meta = meta.get("tokenizer") or {}
    if tok_meta.get("vocab_size") is not None and int(tok_meta["vocab_size"]) != len(tokenizer):
        problems.append(f"{flag}: tokenized with a {tok_meta['vocab_size']}-token tokenizer "
                        f"({tok_meta.get('name_or_path')}), the model's has {len(tokenizer)}: re-run pre_tokenize "
                        f"with --model_name_or_path pointing at this model")
    made_for = meta.get("model_family")
    if made_for and family and made_for != family.name:
        problems.append(f"{flag}: data made for model family {made_for!r}, the model is {family.name!r} "
                        f"({family.title}); re-run `python pre_tokenize.py --model_name_or_path {model_dir}`"
                        + (f" (or {family.front_end})" if family.front_end else ""))
    stats.update(target_stats(data))
    if stats["targets"] == 0:
        problems.append(f"{flag}: no supervised tokens (every label is -100); check the template/roles of the input "
                        f"and re-run pre_tokenize")
    if batch_method in ("sort", "pack"):
        try:
            ds = _open_dataset(path, batch_method)
        except (DatasetFormatError, FileNotFoundError) as e:
            if role == "validation":
                return problems, stats  # validation falls back to the plain sample reader
            msg = str(e).rstrip(".")
            for prefix in (f"{path}: ", f"{Path(path)}: ", f"{Path(path).resolve()}: "):
                msg = msg[len(prefix):] if msg.startswith(prefix) else msg  # the flag already names the folder
            if "sort_and_group.py" not in msg:
                msg += f"; run `python sort_and_group.py --train_file {path}` first"
            problems.append(f"{flag}: {msg} (needed by --batch_method {batch_method})")
            return problems, stats
        p = ds.packs
        stats.update(group_size=int(ds.group_size), max_length_packing=int(ds.max_length))
        if batch_method == "pack":
            sizes = np.asarray(ds.pack_lengths)
            packed = np.asarray(p.pack_samples)
            stats.update(packs=len(ds), mean_pack_tokens=round(float(sizes.mean()), 1) if sizes.size else 0,
                         max_pack_tokens=int(sizes.max()) if sizes.size else 0,
                         samples_per_pack=round(packed.size / max(len(ds), 1), 2),
                         samples_not_packed=int(len(data) - np.unique(packed).size))
            if sizes.size and int(sizes.max()) > ds.max_length:
                problems.append(f"{flag}: a pack of {int(sizes.max())} tokens exceeds its max_length "
                                f"{ds.max_length}: re-run sort_and_group.py")
            if np.unique(packed).size != packed.size:
                problems.append(f"{flag}: a sample appears in several packs: re-run sort_and_group.py")
        else:
            stats.update(samples_not_sorted=int(len(data) - np.unique(np.asarray(p.sort_order)).size))
    return problems, stats


def context_warning(path: str, role: str, config, rope_plan=None, family: Optional[Family] = None) -> Optional[str]:
    """A sentence naming the samples of `path` longer than the model's context (positions restart per sample, so
    the sample length counts, packed or not) and the flags that would cover them; None when all fit."""
    context = rope.context_length(config)
    lengths = np.asarray(TokenizedData(path).lengths)
    over = int((lengths > context).sum())
    if not over:
        return None
    longest = int(lengths.max())
    if rope_plan is not None:
        return (f"--{role}_file {path}: {over:,} of {len(lengths):,} samples are longer than the model's "
                f"{context:,}-token context even after {rope_plan.describe()} (the longest: {longest:,} tokens): "
                f"--model_max_length {longest} (instead of --rope_factor) would cover them")
    kind = rope.suggested_scaling(config, family)
    return (f"--{role}_file {path}: {over:,} of {len(lengths):,} samples are longer than the model's {context:,}-token "
            f"context (the longest: {longest:,} tokens; positions past it were never trained"
            f"{f' in this {family.name} model' if family else ''}): --rope_scaling {kind} --model_max_length "
            f"{longest} would cover them (types: {', '.join(rope.ROPE_SCALINGS)}; README 'Fit and extend')")


def data_order(path: str, batch_method: str, num_items: int, shuffle_seed: Optional[int]) -> dict:
    """What fixes the order the training items come in (train_settings.json "resolved", checked when a run is
    resumed): the batch method, the item count, the shuffle seed (naive only), and a sha256 of the arrays that
    order and shape the items (the samples' offsets; for sort / pack the sorted order or the packs)."""
    h = hashlib.sha256()
    data = TokenizedData(path)
    h.update(np.ascontiguousarray(data.offsets).tobytes())
    if batch_method in ("sort", "pack"):
        packs = PackedData(path)
        arrays = (packs.pack_offsets, packs.pack_samples) if batch_method == "pack" else (packs.sort_order,)
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
    return {"batch_method": batch_method, "items": int(num_items),
            "shuffle_seed": shuffle_seed if batch_method == "naive" else None, "sha256": h.hexdigest()}


def _open_dataset(path: str, batch_method: str):
    if batch_method == "pack":
        return LMPackDataset(path)
    if batch_method == "sort":
        return LMSortDataset(path)
    return LMDataset(path)


def build_datasets(data_args):
    train = _open_dataset(data_args.train_file, data_args.batch_method)
    val = None
    if data_args.validation_file:
        try:
            val = _open_dataset(data_args.validation_file, data_args.batch_method)
        except (DatasetFormatError, FileNotFoundError):
            val = LMDataset(data_args.validation_file)  # eval order/grouping does not change its loss
            logger.info("validation: %s has no %s artefacts; evaluating its samples as they are",
                        data_args.validation_file, data_args.batch_method)
    return train, val
