"""The toolkit's data format: the tokenized dataset on disk, its readers, and the training collators.

A tokenized dataset is a folder (written by `pre_tokenize_glm4.py` / `pre_tokenize_llama3.py`,
extended by `sort_and_group.py`). Storage grows with real tokens, never with samples x max_length,
and every array is memory-mapped, so a training rank does not load the data into RAM:

    DIR/meta.json        format, version, counts, dtypes, tokenizer facts (written last: it marks DIR valid)
    DIR/input_ids.bin    int32 [num_tokens]      all samples' token ids, concatenated
    DIR/labels.bin       int32 [num_tokens]      the same positions; -100 where not supervised
    DIR/offsets.bin      int64 [num_samples + 1] sample i is tokens[offsets[i]:offsets[i + 1]]
    DIR/report.json      what pre-tokenization read, kept and skipped (and why)
    DIR/skipped.jsonl    one line per skipped input line: file, line, reason

Labels follow the transformers convention: aligned with input_ids, the model shifts them.

    from dataset import LMDataset
    ds = LMDataset("data/glm4/longwriter"); ds[0]  # {"input_ids": LongTensor[L], "labels": LongTensor[L]}
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

IGNORE_INDEX = -100
FORMAT_NAME = "longsft-tokenized"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.int32
OFFSET_DTYPE = np.int64
ARRAY_FILES = {"input_ids": ("input_ids.bin", TOKEN_DTYPE), "labels": ("labels.bin", TOKEN_DTYPE)}
OFFSETS_FILE = "offsets.bin"
META_FILE = "meta.json"


class DatasetFormatError(ValueError):
    """A folder that is not a (complete, consistent) tokenized dataset."""


# ----------------------------------------------------------------------------------------------
# Atomic file and folder writes
# ----------------------------------------------------------------------------------------------

def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to `path` through a temp file and a rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished `tmp_dir` into place as `out_dir`, replacing an older one.

    The old folder is renamed aside first and removed only after the new one is in place, so a
    crash at any moment leaves either the old or the new dataset, never a half-written one."""
    out_dir = Path(out_dir)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------

class TokenizedWriter:
    """Streams samples into a new dataset folder, written atomically.

        with TokenizedWriter(out_dir, meta={...}) as w:
            w.add(input_ids, labels)
            ...
            w.write_json("report.json", report)
            w.commit()            # without commit() (an exception, Ctrl-C) nothing replaces out_dir

    Everything goes into a hidden sibling folder first; `commit()` writes meta.json last and renames
    the folder into place, so an interrupted run leaves the previous output intact.
    """

    def __init__(self, out_dir: str | os.PathLike, meta: dict | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.out_dir.with_name(f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp_dir.mkdir()
        self.meta = dict(meta or {})
        self._files = {k: open(self.tmp_dir / fn, "wb") for k, (fn, _) in ARRAY_FILES.items()}
        self._offsets = [0]
        self._max_id = -1
        self.committed = False

    def add(self, input_ids: Iterable[int], labels: Iterable[int]) -> None:
        ids = np.asarray(input_ids, dtype=np.int64)
        lab = np.asarray(labels, dtype=np.int64)
        if ids.ndim != 1 or ids.shape != lab.shape or ids.size == 0:
            raise ValueError(f"sample {len(self._offsets) - 1}: input_ids and labels must be equal-length "
                             f"non-empty 1-D sequences, got {ids.shape} and {lab.shape}")
        if ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max:
            raise ValueError(f"sample {len(self._offsets) - 1}: token id out of int32 range")
        self._max_id = max(self._max_id, int(ids.max()))
        self._files["input_ids"].write(ids.astype(TOKEN_DTYPE).tobytes())
        self._files["labels"].write(lab.astype(TOKEN_DTYPE).tobytes())
        self._offsets.append(self._offsets[-1] + ids.size)

    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.tmp_dir / name, obj)

    def write_text(self, name: str, text: str) -> None:
        (self.tmp_dir / name).write_text(text, encoding="utf-8")

    @property
    def num_samples(self) -> int:
        return len(self._offsets) - 1

    def commit(self) -> Path:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        np.asarray(self._offsets, dtype=OFFSET_DTYPE).tofile(self.tmp_dir / OFFSETS_FILE)
        meta = {
            **self.meta,
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_samples": self.num_samples,
            "num_tokens": int(self._offsets[-1]),
            "max_token_id": self._max_id,
            "token_dtype": np.dtype(TOKEN_DTYPE).name,
            "offset_dtype": np.dtype(OFFSET_DTYPE).name,
        }
        write_json_atomic(self.tmp_dir / META_FILE, meta)
        replace_dir(self.tmp_dir, self.out_dir)
        self.committed = True
        return self.out_dir

    def abort(self) -> None:
        for f in self._files.values():
            if not f.closed:
                f.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> "TokenizedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------

def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a tokenized dataset, with a clear error when `data_dir` is not one."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetFormatError(f"{data_dir}: no such folder. Pass the --output_dir of pre_tokenize_*.py.")
    path = data_dir / META_FILE
    if not path.is_file():
        legacy = (data_dir / "inputs.npy").is_file()
        hint = ("it holds the upstream LongAlign/LongWriter layout (inputs.npy); convert it with "
                "`python sort_and_group.py --train_file DIR` first" if legacy else
                "run pre_tokenize_glm4.py or pre_tokenize_llama3.py with --output_dir pointing here")
        raise DatasetFormatError(f"{data_dir}: not a tokenized dataset (no {META_FILE}); {hint}.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}: unreadable ({e}); re-run pre-tokenization.") from e
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise DatasetFormatError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                                 f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}; re-run pre-tokenization.")
    return meta


class TokenizedData:
    """Memory-mapped arrays of one tokenized dataset, checked for consistency on open."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        n, t = int(self.meta["num_samples"]), int(self.meta["num_tokens"])
        problems = []
        sizes = {OFFSETS_FILE: (n + 1) * np.dtype(OFFSET_DTYPE).itemsize}
        sizes.update({fn: t * np.dtype(dt).itemsize for fn, dt in ARRAY_FILES.values()})
        for fn, want in sizes.items():
            p = self.data_dir / fn
            got = p.stat().st_size if p.is_file() else None
            if got != want:
                problems.append(f"{fn}: {'missing' if got is None else f'{got} bytes'}, expected {want} bytes")
        if problems:
            raise DatasetFormatError(f"{self.data_dir}: truncated or inconsistent dataset ("
                                     + "; ".join(problems) + "); re-run pre-tokenization.")
        self.offsets = np.memmap(self.data_dir / OFFSETS_FILE, dtype=OFFSET_DTYPE, mode="r", shape=(n + 1,))
        self.input_ids = self._map("input_ids", t)
        self.labels = self._map("labels", t)
        if n and (self.offsets[0] != 0 or self.offsets[-1] != t or np.any(np.diff(self.offsets) <= 0)):
            raise DatasetFormatError(f"{self.data_dir}/{OFFSETS_FILE}: offsets are not increasing from 0 to "
                                     f"{t}; the dataset is corrupt, re-run pre-tokenization.")

    def _map(self, key: str, t: int) -> np.ndarray:
        fn, dt = ARRAY_FILES[key]
        if t == 0:
            return np.zeros(0, dtype=dt)
        return np.memmap(self.data_dir / fn, dtype=dt, mode="r", shape=(t,))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every sample, int64 [num_samples]."""
        return np.diff(np.asarray(self.offsets))

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of sample i as int32 views into the memory map."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[a:b], self.labels[a:b]


class _Lazy:
    """Opens TokenizedData on first use, so datasets pickle cheaply into DataLoader workers."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = str(data_dir)
        self._data = TokenizedData(self.data_dir)  # open once now: fail early on a bad folder

    @property
    def data(self) -> TokenizedData:
        if self._data is None:
            self._data = TokenizedData(self.data_dir)
        return self._data

    def __getstate__(self):
        return {**self.__dict__, "_data": None}


class LMDataset(_Lazy, torch.utils.data.Dataset):
    """One unpadded sample per item (`--batch_method naive`).

    ds[i] -> {"input_ids": LongTensor[L], "labels": LongTensor[L]} (labels -100 where not supervised)."""

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, lab = self.data.sample(int(i))
        return {"input_ids": torch.from_numpy(ids.astype(np.int64)),
                "labels": torch.from_numpy(lab.astype(np.int64))}
