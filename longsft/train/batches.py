"""Training-side data: the torch datasets over a tokenized dataset folder, and the training collators.

The on-disk format, its writer and its numpy readers are in longsft/data/storage.py (no torch there; its docstring has the
layout); their names are re-exported here, so `from dataset import TokenizedWriter` keeps working.
Labels follow the transformers convention: aligned with input_ids, the model shifts them.

    from longsft.train.batches import LMDataset
    ds = LMDataset("data/glm4/longwriter"); ds[0]  # {"input_ids": LongTensor[L], "labels": LongTensor[L]}
    LMPackDataset("data/glm4/longwriter")[0]  # + "attention_mask" (cu_seqlens), "position_ids", "weights"
    LMSortDataset("data/glm4/longwriter")[0]  # like LMDataset, in sorted-batching order

Collators (training): `make_collator("naive" | "sort" | "pack", pad_token_id, pack_loss)` -> PaddedCollator
(one right-padded batch of whole samples) or PackCollator (the per-device items concatenated into one pack,
cu_seqlens merged, no padding); `count_targets(batch)` gives the (targets, sequences) the trainer sums over a step.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from longsft.data.storage import (IGNORE_INDEX, DatasetFormatError, PackedData, TokenizedData)

# ----------------------------------------------------------------------------------------------
# Datasets (torch) over the numpy readers
# ----------------------------------------------------------------------------------------------

class _Lazy:
    """Holds a memory-mapped reader (`_reader_cls` of data_dir) that is dropped when pickled and reopened on first
    use, so datasets pickle cheaply into DataLoader workers."""

    _reader_cls = TokenizedData

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = str(data_dir)
        self._reader = self._reader_cls(self.data_dir)  # open once now: fail early on a bad folder

    def _open(self):
        if self._reader is None:
            self._reader = self._reader_cls(self.data_dir)
        return self._reader

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}


class LMDataset(_Lazy, torch.utils.data.Dataset):
    """One unpadded sample per item (`--batch_method naive`).

    ds[i] -> {"input_ids": LongTensor[L], "labels": LongTensor[L]} (labels -100 where not supervised)."""

    data = property(_Lazy._open, doc="the TokenizedData reader")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, lab = self.data.sample(int(i))
        return {"input_ids": torch.from_numpy(ids.astype(np.int64)),
                "labels": torch.from_numpy(lab.astype(np.int64))}


class _LazyPacks(_Lazy):
    """Base of the datasets that read DIR/packs/ (PackedData), opened lazily like LMDataset's reader."""

    _reader_cls = PackedData
    packs = property(_Lazy._open, doc="the PackedData reader")

    @property
    def group_size(self) -> int:
        """--group_size of sort_and_group.py (the GPU count it balanced steps for)."""
        return self.packs.group_size

    @property
    def max_length(self) -> int:
        return self.packs.max_length

    @property
    def meta(self) -> dict:
        """DIR/packs/meta.json: the sort_and_group.py settings and counts."""
        return self.packs.meta


class LMPackDataset(_LazyPacks, torch.utils.data.Dataset):
    """One pack of samples per item (`--batch_method pack`), packs in training order: consecutive runs of
    `group_size` packs were balanced to cost about the same (one optimizer micro-step on group_size ranks).

    ds[i] -> {"input_ids": LongTensor[L], "labels": LongTensor[L] (-100 not supervised, and at the first token of
    every sample), "attention_mask": IntTensor[n + 1] cu_seqlens [0, e1, ..., L], "position_ids": LongTensor[L]
    restarting at 0 per sample, "weights": FloatTensor[L] = 1/N_i on the supervised tokens of sample i, else 0}.
    Per-pack counts for the trainer (numpy [num_packs]): pack_lengths (tokens), pack_num_samples,
    pack_num_sequences (samples with N_i > 0 = sum of the pack's weights), pack_num_targets (sum of N_i)."""

    def __len__(self) -> int:
        return self.packs.num_packs

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.packs.pack(int(i)).items()}

    @property
    def pack_lengths(self) -> np.ndarray:
        return self.packs.pack_reduce(self.packs.sample_lengths)

    @property
    def pack_num_samples(self) -> np.ndarray:
        return np.diff(np.asarray(self.packs.pack_offsets))

    @property
    def pack_num_sequences(self) -> np.ndarray:
        return self.packs.pack_reduce(np.asarray(self.packs.targets) > 0)

    @property
    def pack_num_targets(self) -> np.ndarray:
        return self.packs.pack_reduce(np.asarray(self.packs.targets, dtype=np.int64))


class LMSortDataset(_LazyPacks, torch.utils.data.Dataset):
    """One unpadded sample per item in sorted-batching order (`--batch_method sort`): runs of `group_size`
    samples of similar length, the runs shuffled with --seed (a shorter last run at the end).

    ds[i] -> {"input_ids": LongTensor[L], "labels": LongTensor[L]} like LMDataset (first max_length tokens)."""

    def __len__(self) -> int:
        return self.packs.sort_order.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range [0, {len(self)})")
        j = int(self.packs.sort_order[i])
        ids, lab = self.packs.data.sample(j)
        n = int(self.packs.sample_lengths[j])
        return {"input_ids": torch.from_numpy(ids[:n].astype(np.int64)),
                "labels": torch.from_numpy(lab[:n].astype(np.int64))}

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every item, in this dataset's order."""
        return self.packs.sample_lengths[np.asarray(self.packs.sort_order)]


# ----------------------------------------------------------------------------------------------
# Collators
# ----------------------------------------------------------------------------------------------
# Both collators share one convention, which makes the loss exact and the target counts simple:
#   - the first token of every sample gets label -100: causal models shift labels, so nothing
#     predicts it (a prediction never crosses a sample boundary); every remaining label != -100 is
#     exactly one prediction target;
#   - `weights` (only with pack_loss) = 1 / N_i on the targets of sample i (N_i = its target count),
#     0 elsewhere, recomputed here from the labels so padded and packed batches get the same floats.
# `count_targets(batch)` then gives the per-micro-batch counts the trainer sums over a whole
# optimizer step (all ranks, all accumulation steps) to normalize the loss exactly.

def _segments_of(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Sample index of every position of a pack, LongTensor [length]."""
    seg_len = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(seg_len.numel()), seg_len, output_size=length)


def _sequence_weights(labels: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """1/N_i on the targets of sample i, 0 elsewhere; float32 like `labels` (1-D)."""
    target = labels != IGNORE_INDEX
    n = torch.bincount(segments[target], minlength=int(segments.max()) + 1 if segments.numel() else 0)
    w = torch.zeros(labels.shape, dtype=torch.float32)
    w[target] = 1.0 / n[segments[target]].to(torch.float32)
    return w


class PaddedCollator:
    """`--batch_method naive | sort`: one right-padded batch of whole samples (upstream's meaning).

    features: dicts with 1-D "input_ids" and "labels" (LMDataset / LMSortDataset items).
    -> {"input_ids": [B, T], "attention_mask": [B, T] 0/1, "position_ids": [B, T], "labels": [B, T]
        (-100 at padding and at each row's first token), "weights": [B, T] float32 (only with pack_loss)}
    with T the longest sample of the batch."""

    def __init__(self, pad_token_id: int, pack_loss: bool = False):
        if pad_token_id is None:
            raise ValueError("PaddedCollator needs a pad_token_id (read it from the tokenizer or the data's meta.json)")
        self.pad_token_id = int(pad_token_id)
        self.pack_loss = pack_loss

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        b, t = len(features), max(int(f["input_ids"].numel()) for f in features)
        input_ids = torch.full((b, t), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, t), dtype=torch.long)
        for r, f in enumerate(features):
            n = int(f["input_ids"].numel())
            input_ids[r, :n] = f["input_ids"]
            labels[r, 1:n] = f["labels"][1:]
            attention_mask[r, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "position_ids": torch.arange(t).expand(b, t).clone(), "labels": labels}
        if self.pack_loss:
            rows = torch.arange(b).repeat_interleave(t)
            batch["weights"] = _sequence_weights(labels.reshape(-1), rows).view(b, t)
        return batch


class PackCollator:
    """`--batch_method pack`: the per-device batch as ONE pack, no padding.

    features: LMPackDataset items (each with its own cu_seqlens in "attention_mask") or plain samples
    (LMDataset items: one sequence each). Several features are concatenated and their cu_seqlens merged.
    -> {"input_ids": [1, L], "attention_mask": int32 cu_seqlens [n+1] = [0, e1, ..., L],
        "position_ids": [1, L] restarting at 0 per sample, "labels": [1, L] (-100 at each sample's first
        token), "weights": [1, L] float32 (only with pack_loss)}"""

    def __init__(self, pack_loss: bool = False):
        self.pack_loss = pack_loss

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, labs, bounds, total = [], [], [0], 0
        for f in features:
            n = int(f["input_ids"].numel())
            cu = f.get("attention_mask")
            cu = torch.tensor([0, n]) if cu is None else cu.long()
            if cu.dim() != 1 or int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] <= cu[:-1]).any()):
                raise DatasetFormatError(f"pack with {n} tokens has inconsistent cu_seqlens {cu.tolist()[:8]}...; "
                                         f"re-run sort_and_group.py on the training data")
            ids.append(f["input_ids"].long())
            labs.append(f["labels"].long())
            bounds.extend((cu[1:] + total).tolist())
            total += n
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        input_ids, labels = torch.cat(ids), torch.cat(labs).clone()
        labels[cu_seqlens[:-1].long()] = IGNORE_INDEX
        segments = _segments_of(cu_seqlens, total)
        starts = cu_seqlens[:-1].long()[segments]
        batch = {"input_ids": input_ids[None], "attention_mask": cu_seqlens,
                 "position_ids": (torch.arange(total) - starts)[None], "labels": labels[None]}
        if self.pack_loss:
            batch["weights"] = _sequence_weights(labels, segments)[None]
        return batch


def make_collator(batch_method: str, pad_token_id: int | None = None, pack_loss: bool = False):
    """The collator for `--batch_method`: PaddedCollator for naive/sort, PackCollator for pack."""
    if batch_method == "pack":
        return PackCollator(pack_loss=pack_loss)
    if batch_method in ("naive", "sort"):
        return PaddedCollator(pad_token_id, pack_loss=pack_loss)
    raise ValueError(f"--batch_method {batch_method!r}: expected naive, sort or pack")


def count_targets(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(prediction targets, samples with at least one target) of a collated batch.

    Relies on the collators' convention (no sample's first token is labelled), so every label != -100
    is one target of the shifted causal loss. A sequence-parallel shard (longsft/train/sequence_parallel.py) carries the
    counts it adds to the step's normaliser as num_targets / num_sequences."""
    if "num_targets" in batch:
        return int(batch["num_targets"]), int(batch["num_sequences"])
    target = batch["labels"] != IGNORE_INDEX
    tokens = int(target.sum())
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 1:  # a pack: cu_seqlens
        segments = _segments_of(mask.cpu(), target.shape[-1])
        sequences = int(torch.unique(segments[target.reshape(-1).cpu()]).numel())
    else:
        sequences = int(target.any(dim=-1).sum())
    return tokens, sequences
