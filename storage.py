"""The tokenized dataset on disk: layout, atomic writes, the writer and the memory-mapped readers (numpy only).

Written by `pre_tokenize.py` (and its front ends `pre_tokenize_glm4.py` / `pre_tokenize_llama3.py`), extended
by `sort_and_group.py`; read for training through dataset.py's torch datasets. Nothing here imports torch, so
pre-tokenization and packing never load it. Storage grows with real tokens, never with samples x max_length,
and every array is memory-mapped, so a training rank does not load the data into RAM:

    DIR/meta.json        format, version, counts, dtypes, model family and template, tokenizer facts (written
                         last: it marks DIR valid)
    DIR/input_ids.bin    int32 [num_tokens]      all samples' token ids, concatenated
    DIR/labels.bin       int32 [num_tokens]      the same positions; -100 where not supervised
    DIR/offsets.bin      int64 [num_samples + 1] sample i is tokens[offsets[i]:offsets[i + 1]]
    DIR/report.json      what pre-tokenization read, kept and skipped (and why)
    DIR/skipped.jsonl    one line per skipped input line: file, line, reason

`sort_and_group.py --train_file DIR` adds DIR/packs/ (built in a hidden temp folder, renamed into place;
re-running replaces it whole). Sample i enters it with its first min(length, max_length) tokens:

    DIR/packs/meta.json         settings (max_length, group_size, pack_algorithm, seed, over_length, cost model),
                                counts, and the dataset's num_samples/num_tokens (a stale folder is refused)
    DIR/packs/pack_offsets.bin  int64 [num_packs + 1]  pack p = pack_samples[pack_offsets[p]:pack_offsets[p + 1]]
    DIR/packs/pack_samples.bin  int64 [num_packed]     sample indices; packs in training order: each run of
                                                       group_size packs is one step, balanced in compute
    DIR/packs/sort_order.bin    int64 [num_sorted]     sample indices in sorted-batching order
    DIR/packs/targets.bin       int32 [num_samples]    N_i: supervised target tokens of sample i as trained
                                                       (its first token excluded: nothing precedes it)
    DIR/packs/report.json, report.png                  what sort_and_group.py did (lengths, pack fill, balance)

A folder in the upstream LongAlign/LongWriter layout (dense inputs.npy / labels.npy) is converted in place by
sort_and_group.py: input_ids.bin, labels.bin, offsets.bin, then meta.json (meta["legacy"]: rows, width, pad id
and its source, dropped all-padding rows) and packs/ are added; the .npy files stay untouched.

Labels follow the transformers convention: aligned with input_ids, the model shifts them.

    from storage import TokenizedData, PackedData
    data = TokenizedData("data/glm4/longwriter"); data.sample(0)  # (input_ids, labels) int32 views
    PackedData("data/glm4/longwriter").pack(0)  # numpy arrays of one pack (see dataset.LMPackDataset)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

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
        ids, lab = np.asarray(input_ids), np.asarray(labels)
        if ids.ndim != 1 or ids.shape != lab.shape or ids.size == 0:
            raise ValueError(f"sample {len(self._offsets) - 1}: input_ids and labels must be equal-length "
                             f"non-empty 1-D sequences, got {ids.shape} and {lab.shape}")
        self.add_batch(ids, lab, [ids.size])

    def add_batch(self, input_ids: Iterable[int], labels: Iterable[int], lengths: Iterable[int]) -> None:
        """Several samples at once: their input_ids and labels concatenated (equal-length 1-D) and each sample's
        length. Writes what add() per sample would, without per-sample Python work (int32 input is not copied)."""
        ids, lab, lengths = np.asarray(input_ids), np.asarray(labels), np.asarray(lengths, dtype=np.int64)
        first, last = len(self._offsets) - 1, len(self._offsets) - 2 + lengths.size
        where = f"sample {first}" if lengths.size == 1 else f"samples {first}..{last}"
        if ids.ndim != 1 or ids.shape != lab.shape or lengths.ndim != 1 or (lengths <= 0).any() \
                or lengths.sum() != ids.size:
            raise ValueError(f"{where}: input_ids and labels must be equal-length 1-D sequences made of samples of "
                             f"the given (non-empty) lengths, got {ids.shape}, {lab.shape} and lengths {lengths}")
        if ids.size == 0:
            return
        ids = ids if ids.dtype == TOKEN_DTYPE else ids.astype(np.int64)  # any other dtype: checked as int64
        lab = lab if lab.dtype == TOKEN_DTYPE else lab.astype(np.int64)
        if ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max:
            raise ValueError(f"{where}: token id out of int32 range")
        self._max_id = max(self._max_id, int(ids.max()))
        self._files["input_ids"].write(ids.astype(TOKEN_DTYPE, copy=False).tobytes())
        self._files["labels"].write(lab.astype(TOKEN_DTYPE, copy=False).tobytes())
        self._offsets.extend((self._offsets[-1] + np.cumsum(lengths)).tolist())

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
        raise DatasetFormatError(f"{data_dir}: no such folder. Pass the --output_dir of pre_tokenize.py.")
    path = data_dir / META_FILE
    if not path.is_file():
        legacy = (data_dir / "inputs.npy").is_file()
        hint = ("it holds the upstream LongAlign/LongWriter layout (inputs.npy); convert it with "
                "`python sort_and_group.py --train_file DIR` first" if legacy else
                "run pre_tokenize.py with --output_dir pointing here")
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


# ----------------------------------------------------------------------------------------------
# Sorted batching and packs (written by sort_and_group.py)
# ----------------------------------------------------------------------------------------------

PACKS_DIR = "packs"
PACKS_FORMAT = "longsft-packs"
PACKS_VERSION = 1
PACK_FILES = {  # name -> (file, dtype); the lengths are in meta.json
    "pack_offsets": ("pack_offsets.bin", np.int64),  # [num_packs + 1]
    "pack_samples": ("pack_samples.bin", np.int64),  # [num_packed_samples]
    "sort_order": ("sort_order.bin", np.int64),      # [num_sorted_samples]
    "targets": ("targets.bin", np.int32),            # [num_samples]
}


def write_packs(data_dir: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict,
                extra_files: dict[str, bytes] | None = None) -> Path:
    """Write DIR/packs atomically: built in a hidden temp folder, meta.json last, then renamed into place."""
    data_dir = Path(data_dir)
    tmp = data_dir / f".{PACKS_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for key, (fn, dt) in PACK_FILES.items():
            np.ascontiguousarray(arrays[key], dtype=dt).tofile(tmp / fn)
        for name, blob in (extra_files or {}).items():
            (tmp / name).write_bytes(blob)
        full = {**meta, "format": PACKS_FORMAT, "version": PACKS_VERSION,
                **{f"num_{k}": int(np.asarray(arrays[k]).size) for k in PACK_FILES}}
        write_json_atomic(tmp / META_FILE, full)
        replace_dir(tmp, data_dir / PACKS_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return data_dir / PACKS_DIR


class PackedData:
    """A tokenized dataset plus its DIR/packs, memory-mapped and checked on open.

    Sample i enters packs and the sorted order with its first `sample_lengths[i]` tokens
    (= min(length, max_length); `--over_length truncate` is the only way that cuts anything)."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data = TokenizedData(data_dir)
        self.data_dir = self.data.data_dir
        pdir = self.data_dir / PACKS_DIR
        fix = f"run `python sort_and_group.py --train_file {self.data_dir}`"
        if not (pdir / META_FILE).is_file():
            raise DatasetFormatError(f"{self.data_dir}: no packs ({PACKS_DIR}/{META_FILE} missing); {fix} first.")
        try:
            self.meta = json.loads((pdir / META_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{pdir / META_FILE}: unreadable ({e}); {fix} again.") from e
        m = self.meta
        if m.get("format") != PACKS_FORMAT or m.get("version") != PACKS_VERSION:
            raise DatasetFormatError(f"{pdir / META_FILE}: format {m.get('format')!r} version {m.get('version')!r}, "
                                     f"expected {PACKS_FORMAT!r} version {PACKS_VERSION}; {fix} again.")
        src = m.get("source", {})
        if (src.get("num_samples"), src.get("num_tokens")) != (self.data.meta["num_samples"],
                                                                self.data.meta["num_tokens"]):
            raise DatasetFormatError(f"{pdir}: made for a different dataset ({src.get('num_samples')} samples / "
                                     f"{src.get('num_tokens')} tokens, the folder now has "
                                     f"{self.data.meta['num_samples']} / {self.data.meta['num_tokens']}); {fix} again.")
        problems, arrays = [], {}
        for key, (fn, dt) in PACK_FILES.items():
            n, p = int(m[f"num_{key}"]), pdir / fn
            got = p.stat().st_size if p.is_file() else None
            if got != n * np.dtype(dt).itemsize:
                problems.append(f"{fn}: {'missing' if got is None else f'{got} bytes'}, "
                                f"expected {n * np.dtype(dt).itemsize} bytes")
            else:
                arrays[key] = np.memmap(p, dtype=dt, mode="r", shape=(n,)) if n else np.zeros(0, dt)
        if problems:
            raise DatasetFormatError(f"{pdir}: truncated or inconsistent packs ({'; '.join(problems)}); {fix} again.")
        self.pack_offsets, self.pack_samples = arrays["pack_offsets"], arrays["pack_samples"]
        self.sort_order, self.targets = arrays["sort_order"], arrays["targets"]
        n = len(self.data)
        po = np.asarray(self.pack_offsets)
        bad = (po.size < 1 or po[0] != 0 or po[-1] != self.pack_samples.size or np.any(np.diff(po) <= 0)
               or self.targets.size != n)
        for idx in (self.pack_samples, self.sort_order):
            bad = bad or (idx.size > 0 and (int(idx.min()) < 0 or int(idx.max()) >= n))
        if bad:
            raise DatasetFormatError(f"{pdir}: pack index out of range; {fix} again.")
        self.max_length = int(m["max_length"])
        self.group_size = int(m["group_size"])
        self.sample_lengths = np.minimum(self.data.lengths, self.max_length)  # int64 [num_samples]

    @property
    def num_packs(self) -> int:
        return self.pack_offsets.size - 1

    def pack_reduce(self, per_sample: np.ndarray) -> np.ndarray:
        """Sum of a per-sample quantity over each pack, [num_packs]."""
        v = np.asarray(per_sample).astype(np.int64)[np.asarray(self.pack_samples)]
        return np.add.reduceat(v, np.asarray(self.pack_offsets[:-1])) if self.num_packs else v[:0]

    def pack(self, p: int) -> dict[str, np.ndarray]:
        """Pack p as numpy arrays (see LMPackDataset)."""
        if not 0 <= p < self.num_packs:
            raise IndexError(f"pack {p} out of range [0, {self.num_packs})")
        idx = np.asarray(self.pack_samples[self.pack_offsets[p]:self.pack_offsets[p + 1]])
        lens = self.sample_lengths[idx]                                   # [n]
        cu = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])                                       # [n + 1]
        pos = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1], lens)  # [L]
        tok = np.repeat(np.asarray(self.data.offsets)[idx], lens) + pos     # [L] positions in the dataset
        labels = self.data.labels[tok].astype(np.int64)
        labels[cu[:-1]] = IGNORE_INDEX          # a sample's first token has nothing before it to predict it
        sup = labels != IGNORE_INDEX
        n_i = np.add.reduceat(sup.astype(np.int64), cu[:-1])              # [n] supervised tokens per sample
        inv = np.where(n_i > 0, 1.0 / np.maximum(n_i, 1), 0.0)
        weights = np.where(sup, np.repeat(inv, lens), 0.0).astype(np.float32)
        return {"input_ids": self.data.input_ids[tok].astype(np.int64), "labels": labels,
                "attention_mask": cu.astype(np.int32), "position_ids": pos, "weights": weights}
