"""Preference pairs as main.py --stage dpo reads them: the torch datasets and the collator (packed, or one rank's
shard of a pack under sequence parallelism).

    from longsft.train.dpo_data import PairPackDataset, PairCollator
    ds = PairPackDataset("data/pairs")       # packs of whole pairs (sort_and_group.py on pre_tokenize.py --stage dpo)
    batch = PairCollator()([ds[0]])          # PackCollator's pack + where each target's sequence is

A pair dataset (longsft/data/storage.py: meta "stage": "dpo", pairs.bin) holds pair p as samples 2p (chosen) and
2p + 1 (rejected); sort_and_group.py puts both in one pack, side by side. Items:
- PairPackDataset[i]: LMPackDataset's pack i plus "sample_ids" [n] (the dataset samples in it, pairs adjacent);
- PairDataset[i]: pair i alone as a two-sample pack (validation data without packs: nothing to run first).
PairCollator concatenates the per-device items (PackCollator: one pack, merged cu_seqlens) and adds, for the loss:
    dpo_sequence [1, T]    the pair-sequence (0..2P-1, chosen 2k, rejected 2k+1) whose target each position holds
                           (-1: none), aligned with the model's shifted targets
    dpo_lengths [2P]       completion targets of each sequence (the whole pack's, on every rank)
    dpo_sample_ids [2P]    dataset sample of each sequence (precomputed reference log-probs are looked up by it)
    dpo_num_pairs, dpo_chosen_targets   the batch's share of the step's normalisers (P and T_c; under sequence
                           parallelism only on the group's first rank, like sequence_parallel.PACK_COUNT_KEYS)
With sequence parallelism (size > 1) the model inputs are SequenceParallelCollator's shard and dpo_sequence is the
same slice of the whole padded pack. Trainer padding items (TrainerNoShuffle's PaddedToMultiple) are
`empty_item`s: one target-free token, sample id -1, no pair.
"""

from __future__ import annotations

import numpy as np
import torch

from longsft.data.storage import IGNORE_INDEX, DatasetFormatError, TokenizedData
from longsft.train.batches import LMPackDataset, PackCollator, _Lazy, _segments_of
from longsft.train.sequence_parallel import SequenceParallelCollator
from patch.packed_attention import shift_targets

DPO_KEYS = ("dpo_sequence", "dpo_lengths", "dpo_sample_ids", "dpo_num_pairs", "dpo_chosen_targets")


def _empty_pair_item(item: dict) -> dict:
    """A padding item: one token without target, no sample (sample id -1)."""
    return {"input_ids": item["input_ids"][:1].clone(), "labels": torch.full((1,), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.tensor([0, 1], dtype=torch.int32), "position_ids": torch.zeros(1, dtype=torch.long),
            "sample_ids": torch.full((1,), -1, dtype=torch.long)}


class PairPackDataset(LMPackDataset):
    """Packs of whole preference pairs (`--batch_method pack --stage dpo`); see the module docstring."""

    def __init__(self, data_dir):
        super().__init__(data_dir)
        p = self.packs
        if p.data.pairs is None:
            raise DatasetFormatError(f"{data_dir}: holds SFT samples, not preference pairs; make pairs with "
                                     f"pre_tokenize.py --stage dpo (then sort_and_group.py)")
        if p.meta.get("stage") != "dpo":
            raise DatasetFormatError(f"{data_dir}/packs: made before the pairs were known (it may split pairs); run "
                                     f"`python sort_and_group.py --train_file {data_dir}` again")
        samples = np.asarray(p.pack_samples)
        chosen, rejected = samples[0::2], samples[1::2]
        if samples.size % 2 or np.any(chosen % 2) or np.any(rejected != chosen + 1) or \
                np.any(np.diff(np.asarray(p.pack_offsets)) % 2):
            raise DatasetFormatError(f"{data_dir}/packs: a pack splits a pair; run `python sort_and_group.py "
                                     f"--train_file {data_dir}` again")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        p = self.packs
        item["sample_ids"] = torch.from_numpy(np.array(p.pack_samples[p.pack_offsets[i]:p.pack_offsets[i + 1]],
                                                       dtype=np.int64))
        return item

    @staticmethod
    def empty_item(item: dict) -> dict:
        return _empty_pair_item(item)

    @property
    def num_pairs(self) -> int:
        return int(self.packs.pack_samples.size // 2)

    @property
    def sample_lengths(self) -> np.ndarray:
        """Tokens of every dataset sample as packed (int64 [num_samples])."""
        return self.packs.sample_lengths


class PairDataset(_Lazy, torch.utils.data.Dataset):
    """Pair i as a two-sample pack, in dataset order (a validation set without packs/)."""

    data = property(_Lazy._open, doc="the TokenizedData reader")

    def __init__(self, data_dir):
        super().__init__(data_dir)
        if self.data.pairs is None:
            raise DatasetFormatError(f"{data_dir}: holds SFT samples, not preference pairs; make pairs with "
                                     f"pre_tokenize.py --stage dpo")

    def __len__(self) -> int:
        return self.data.num_pairs

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range [0, {len(self)})")
        (c_ids, c_lab), (r_ids, r_lab) = self.data.sample(2 * i), self.data.sample(2 * i + 1)
        lc, lr = len(c_ids), len(r_ids)
        return {"input_ids": torch.from_numpy(np.concatenate([c_ids, r_ids]).astype(np.int64)),
                "labels": torch.from_numpy(np.concatenate([c_lab, r_lab]).astype(np.int64)),
                "attention_mask": torch.tensor([0, lc, lc + lr], dtype=torch.int32),
                "position_ids": torch.cat([torch.arange(lc), torch.arange(lr)]),
                "sample_ids": torch.tensor([2 * i, 2 * i + 1], dtype=torch.long)}

    @staticmethod
    def empty_item(item: dict) -> dict:
        return _empty_pair_item(item)

    @property
    def num_pairs(self) -> int:
        return len(self)

    @property
    def sample_lengths(self) -> np.ndarray:
        return self.data.lengths


class PairCollator:
    """The per-device pair items as one pack (or this rank's shard of it) plus the DPO keys (module docstring)."""

    def __init__(self, sp_size: int = 1, sp_rank: int = 0, pad_token_id: int = 0):
        self.size, self.rank = int(sp_size), int(sp_rank)
        self._pack = PackCollator(pack_loss=False)
        self._shard = SequenceParallelCollator(sp_size, sp_rank, pad_token_id) if sp_size > 1 else None

    def __call__(self, features: list[dict]) -> dict:
        whole = self._pack(features)
        sample_ids = torch.cat([f["sample_ids"].long() for f in features])     # [n] per sequence, -1: padding
        real = sample_ids >= 0
        ids = sample_ids[real]
        if ids.numel() % 2 or bool((ids[0::2] % 2 != 0).any()) or bool((ids[1::2] != ids[0::2] + 1).any()):
            raise DatasetFormatError(f"a batch's samples {ids.tolist()[:8]}... are not whole (chosen, rejected) pairs; "
                                     f"re-run sort_and_group.py on the preference data")
        cu = whole["attention_mask"].long()
        total = whole["input_ids"].shape[1]
        targets, _ = shift_targets(whole["labels"], None, cu)                    # [L]
        seg = _segments_of(cu, total)                                           # [L] sequence of each position
        rank_of = torch.cumsum(real.long(), 0) - 1                              # [n] pair-sequence index
        sequence = torch.where((targets != IGNORE_INDEX) & real[seg], rank_of[seg], torch.full_like(seg, -1))
        lengths = torch.bincount(sequence[sequence >= 0], minlength=ids.numel())  # [2P]
        if self._shard is None:
            batch = {k: v for k, v in whole.items() if k != "weights"}
        else:
            batch = self._shard(features)
            pad = -total % self.size
            sequence = torch.cat([sequence, torch.full((pad,), -1, dtype=sequence.dtype)])
            n = sequence.numel() // self.size
            sequence = sequence[self.rank * n:(self.rank + 1) * n]
        first = self.rank == 0
        batch.update({"dpo_sequence": sequence[None].clone(), "dpo_lengths": lengths, "dpo_sample_ids": ids,
                      "dpo_num_pairs": torch.tensor(ids.numel() // 2 if first else 0),
                      "dpo_chosen_targets": torch.tensor(int(lengths[0::2].sum()) if first else 0)})
        return batch


def open_pair_dataset(path: str, packed: bool):
    """The training set (packs of pairs) or a validation set (its packs when it has them, else its pairs)."""
    if packed:
        return PairPackDataset(path)
    try:
        return PairPackDataset(path)
    except (DatasetFormatError, FileNotFoundError):
        return PairDataset(path)


def pair_data_problems(path: str, role: str, stage: str) -> list[str]:
    """A dataset that does not hold what --stage trains: SFT samples for dpo, or preference pairs for sft."""
    try:
        data = TokenizedData(path)
    except DatasetFormatError:
        return []  # check_data names it
    flag = f"--{role}_file {path}"
    if stage == "dpo" and data.pairs is None:
        return [f"{flag}: holds SFT samples, not preference pairs; --stage dpo trains pairs made by "
                f"`python pre_tokenize.py --stage dpo ...` (then sort_and_group.py)"]
    if stage == "sft" and data.pairs is not None:
        return [f"{flag}: holds preference pairs (pre_tokenize.py --stage dpo): train them with --stage dpo, or "
                f"make SFT samples with pre_tokenize.py --stage sft"]
    return []
