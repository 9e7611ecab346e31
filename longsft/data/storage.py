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
    DIR/pairs.bin        int64 [num_pairs, 2]    preference data only (meta "stage": "dpo", `pre_tokenize.py
                                                 --stage dpo`): the (chosen, rejected) samples of every pair,
                                                 always (2p, 2p + 1); SFT datasets have no such file
    DIR/ref_logps/       preference data only: reference log-probs that `main.py --stage dpo
                         --precompute_ref_logps` stored (longsft/train/dpo_reference.py; replaced whole)

Writing (TokenizedWriter, write_packs; the mechanics in longsft/atomic_dir.py): a new folder is built in a hidden sibling
and put in place in one atomic step, so readers and crashes only ever see the old or the new complete folder; a
folder is replaced only if it is provably ours (meta.json of our format, nothing but the files listed here: a
user's NOTES.md inside makes it an error, never a deletion); a symlinked folder is written through; what killed
runs left is removed by the next run. Readers read all files of one version (check_token_ids reads the ids).

`sort_and_group.py --train_file DIR` adds DIR/packs/ (written like a dataset; re-running replaces it whole).
Sample i enters it with its first min(length, max_length) tokens:

    DIR/packs/meta.json         settings (max_length, group_size, pack_algorithm, seed, over_length, cost model),
                                counts, and the dataset's num_samples/num_tokens (a stale folder is refused)
    DIR/packs/pack_offsets.bin  int64 [num_packs + 1]  pack p = pack_samples[pack_offsets[p]:pack_offsets[p + 1]]
    DIR/packs/pack_samples.bin  int64 [num_packed]     sample indices; packs in training order: each run of
                                                       group_size packs is one step, balanced in compute
    DIR/packs/sort_order.bin    int64 [num_sorted]     sample indices in sorted-batching order
    DIR/packs/targets.bin       int32 [num_samples]    N_i: supervised target tokens of sample i as trained
                                                       (its first token excluded: nothing precedes it)
    DIR/packs/report.json, report.png                  what sort_and_group.py did (lengths, pack fill, balance)
    DIR/packs/sample_lengths.bin int64 [num_samples]   preference data only: the tokens of every sample that
                                                       enter the packs (a pair over the limit is cut as a pair)

A folder in the upstream LongAlign/LongWriter layout (dense inputs.npy / labels.npy) is converted in place by
sort_and_group.py: input_ids.bin, labels.bin, offsets.bin, then meta.json (meta["legacy"]: rows, width, pad id
and its source, dropped all-padding rows) and packs/ are added; the .npy files stay untouched.

Labels follow the transformers convention: aligned with input_ids, the model shifts them.

    from longsft.data.storage import TokenizedData, PackedData
    data = TokenizedData("data/glm4/longwriter"); data.sample(0)  # (input_ids, labels) int32 views
    PackedData("data/glm4/longwriter").pack(0)  # numpy arrays of one pack (see dataset.LMPackDataset)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from longsft.errors import UserError
from longsft.atomic_dir import (FolderReader, folder_identity, recover_dir, replace_dir, replace_problem, sweep_stale,
                                work_name, write_json_atomic)

IGNORE_INDEX = -100
FORMAT_NAME = "longsft-tokenized"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.int32
OFFSET_DTYPE = np.int64
ARRAY_FILES = {"input_ids": ("input_ids.bin", TOKEN_DTYPE), "labels": ("labels.bin", TOKEN_DTYPE)}
OFFSETS_FILE = "offsets.bin"
META_FILE = "meta.json"


class DatasetFormatError(UserError):
    """A folder that is not a (complete, consistent) tokenized dataset."""


class DatasetChangedError(UserError):
    """The dataset folder was replaced (pre_tokenize.py wrote it again) while packs for it were being made."""


# ----------------------------------------------------------------------------------------------
# Which folders may be replaced (atomic_dir.replace_problem): ours, holding nothing but our files
# ----------------------------------------------------------------------------------------------

PAIRS_FILE = "pairs.bin"  # preference data: int64 [num_pairs, 2] (chosen, rejected) sample indices
DATASET_NAMES = {META_FILE, OFFSETS_FILE, *(fn for fn, _ in ARRAY_FILES.values()), "report.json", "skipped.jsonl",
                 PAIRS_FILE}
REF_LOGPS_DIR = "ref_logps"  # preference data: stored reference log-probs (longsft/train/dpo_reference.py)
REF_LOGPS_FORMAT = "longsft-ref-logps"
REF_LOGPS_NAMES = {META_FILE, "logps.bin"}


def dataset_replace_problem(out_dir: str | os.PathLike) -> str | None:
    """Why `out_dir` may not be replaced by a new dataset (None: missing, empty, or one of ours with only our files:
    the dataset's files and its packs/)."""
    return replace_problem(out_dir, "tokenized dataset", FORMAT_NAME, DATASET_NAMES,
                           {PACKS_DIR: (PACKS_FORMAT, PACKS_NAMES), REF_LOGPS_DIR: (REF_LOGPS_FORMAT, REF_LOGPS_NAMES)})


def packs_replace_problem(data_dir: str | os.PathLike) -> str | None:
    """Why DIR/packs may not be replaced by new packs (None: missing, empty, or ours with only our files)."""
    return replace_problem(Path(data_dir) / PACKS_DIR, "packs folder", PACKS_FORMAT, PACKS_NAMES)


def _refuse(problem: str) -> DatasetFormatError:
    return DatasetFormatError(f"{problem}; refusing to replace it (that would delete everything in it). Move those "
                              f"files elsewhere, or write to another folder.")


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

    Everything goes into a hidden sibling folder first; `commit()` writes meta.json last and puts the folder in
    place in one step (atomic_dir.replace_dir), so an interrupted run leaves the previous output intact. Only a
    folder that is provably one of our datasets is replaced (DatasetFormatError otherwise, at the start and again
    at commit); a symlinked out_dir is written through. Starting removes what dead runs left beside out_dir
    (`swept`: the removed paths and sizes)."""

    def __init__(self, out_dir: str | os.PathLike, meta: dict | None = None):
        self.out_dir = Path(os.path.realpath(out_dir))
        problem = dataset_replace_problem(self.out_dir)
        if problem:
            raise _refuse(problem)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.swept = sweep_stale(self.out_dir)
        self.tmp_dir = work_name(self.out_dir)
        self.tmp_dir.mkdir()
        self.meta = dict(meta or {})
        self._files = {k: open(self.tmp_dir / fn, "wb") for k, (fn, _) in ARRAY_FILES.items()}
        self._offsets = [0]
        self._max_id = -1
        self.finished = self.committed = False

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

    def finish(self) -> Path:
        """Close the arrays, write offsets.bin and meta.json (last) into the temp folder, now a complete dataset,
        and return it; commit() then puts it in place (convert_legacy of sort_and_group moves its files instead)."""
        if self.finished:
            return self.tmp_dir
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
        self.finished = True
        return self.tmp_dir

    def commit(self) -> Path:
        self.finish()
        problem = dataset_replace_problem(self.out_dir)  # again: a long run gives time to put files there
        if problem:
            raise _refuse(problem)
        replace_dir(self.tmp_dir, self.out_dir)
        self.committed = True
        return self.out_dir

    def abort(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except OSError:  # its buffered bytes cannot be written (the disk trouble that stopped the run)
                pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> "TokenizedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------

def _consistent(paths: list[Path], read):
    """read(*folders) with a FolderReader per path (each inside the previous one), reopened up to twice when a
    commit replaced one of the folders meanwhile, so the files read are all of one version."""
    for attempt in range(3):
        folders: list[FolderReader] = []
        try:
            for p in paths:
                folders.append(FolderReader(p, parent=folders[-1] if folders else None))
            return read(*folders)
        except (DatasetFormatError, OSError):
            if attempt == 2 or not any(f.changed() for f in folders):
                raise
        finally:
            for f in folders:
                f.close()


def _memmap(folder: FolderReader, fn: str, dtype, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=dtype)
    with folder.open(fn) as f:
        return np.memmap(f, dtype=dtype, mode="r", shape=(n,))


def read_meta(data_dir: str | os.PathLike, folder: FolderReader | None = None) -> dict:
    """meta.json of a tokenized dataset, with a clear error when `data_dir` is not one."""
    data_dir = Path(data_dir)
    if folder is None:
        return _consistent([data_dir], lambda f: read_meta(data_dir, f))
    if not folder.exists():
        raise DatasetFormatError(f"{data_dir}: no such folder. Pass the --output_dir of pre_tokenize.py.")
    path = data_dir / META_FILE
    if folder.size(META_FILE) is None:
        legacy = folder.size("inputs.npy") is not None
        hint = ("it holds the upstream LongAlign/LongWriter layout (inputs.npy); convert it with "
                "`python sort_and_group.py --train_file DIR` first" if legacy else
                "run pre_tokenize.py with --output_dir pointing here")
        raise DatasetFormatError(f"{data_dir}: not a tokenized dataset (no {META_FILE}); {hint}.")
    try:
        meta = json.loads(folder.read_text(META_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path}: unreadable ({e}); re-run pre-tokenization.") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        meta = meta if isinstance(meta, dict) else {}
        raise DatasetFormatError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                                 f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}; re-run pre-tokenization.")
    return meta


class TokenizedData:
    """Memory-mapped arrays of one tokenized dataset, checked for consistency on open. Every file is read from
    the same version of the folder (a commit that replaces it meanwhile makes it reopen); a folder that a crash
    left missing is first recovered (atomic_dir.recover_dir)."""

    def __init__(self, data_dir: str | os.PathLike, folder: FolderReader | None = None):
        self.data_dir = Path(data_dir)
        if folder is not None:
            self._read(folder)
        else:
            recover_dir(self.data_dir)
            _consistent([self.data_dir], self._read)

    def _read(self, folder: FolderReader) -> None:
        self.meta = read_meta(self.data_dir, folder)
        n, t = int(self.meta["num_samples"]), int(self.meta["num_tokens"])
        problems = []
        sizes = {OFFSETS_FILE: (n + 1) * np.dtype(OFFSET_DTYPE).itemsize}
        sizes.update({fn: t * np.dtype(dt).itemsize for fn, dt in ARRAY_FILES.values()})
        for fn, want in sizes.items():
            got = folder.size(fn)
            if got != want:
                problems.append(f"{fn}: {'missing' if got is None else f'{got} bytes'}, expected {want} bytes")
        if problems:
            raise DatasetFormatError(f"{self.data_dir}: truncated or inconsistent dataset ("
                                     + "; ".join(problems) + "); re-run pre-tokenization.")
        self.identity = folder.identity()  # this version of the folder (write_packs checks it is still there)
        self.offsets = _memmap(folder, OFFSETS_FILE, OFFSET_DTYPE, n + 1)
        self.input_ids = _memmap(folder, *ARRAY_FILES["input_ids"], t)
        self.labels = _memmap(folder, *ARRAY_FILES["labels"], t)
        if n and (self.offsets[0] != 0 or self.offsets[-1] != t or np.any(np.diff(self.offsets) <= 0)):
            raise DatasetFormatError(f"{self.data_dir}/{OFFSETS_FILE}: offsets are not increasing from 0 to "
                                     f"{t}; the dataset is corrupt, re-run pre-tokenization.")
        self.pairs = _read_pairs(self.data_dir, folder, self.meta, n) if is_pair_data(self.meta) else None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_pairs(self) -> int:
        """Preference pairs (0 for an SFT dataset)."""
        return 0 if self.pairs is None else len(self.pairs)

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


def is_pair_data(meta: dict) -> bool:
    """Whether a dataset's meta.json describes preference pairs (`pre_tokenize.py --stage dpo`)."""
    return meta.get("stage") == "dpo"


def pair_index(num_pairs: int) -> np.ndarray:
    """int64 [num_pairs, 2]: pair p is samples (2p, 2p + 1), chosen then rejected (what pairs.bin holds)."""
    return np.arange(2 * num_pairs, dtype=np.int64).reshape(num_pairs, 2)


def mark_pairs(writer: TokenizedWriter) -> None:
    """Make the dataset `writer` is writing a preference dataset (before its commit): its samples, added as
    (chosen, rejected) pair after pair, get pairs.bin and meta.json's "stage": "dpo" and "num_pairs"."""
    if writer.num_samples % 2:
        raise ValueError(f"{writer.num_samples} samples: a preference dataset holds (chosen, rejected) pairs")
    pair_index(writer.num_samples // 2).tofile(writer.tmp_dir / PAIRS_FILE)
    writer.meta.update(stage="dpo", num_pairs=writer.num_samples // 2)


def _read_pairs(data_dir: Path, folder: FolderReader, meta: dict, num_samples: int) -> np.ndarray:
    """pairs.bin of a preference dataset, checked: every sample in exactly one pair, as (2p, 2p + 1)."""
    num_pairs = int(meta.get("num_pairs", -1))
    want = num_pairs * 2 * np.dtype(np.int64).itemsize
    got = folder.size(PAIRS_FILE)
    if num_pairs * 2 != num_samples or got != want:
        raise DatasetFormatError(f"{data_dir}: a preference dataset (stage dpo) of {num_samples} samples needs "
                                 f"{PAIRS_FILE} with {num_samples // 2} pairs ({num_samples // 2 * 16} bytes), found "
                                 f"{'no file' if got is None else f'{got} bytes'} and num_pairs {num_pairs} in "
                                 f"{META_FILE}; re-run pre_tokenize.py --stage dpo.")
    pairs = _memmap(folder, PAIRS_FILE, np.int64, 2 * num_pairs).reshape(num_pairs, 2)
    if not np.array_equal(pairs, pair_index(num_pairs)):
        raise DatasetFormatError(f"{data_dir}/{PAIRS_FILE}: pair p must be samples (2p, 2p + 1); the file is corrupt, "
                                 f"re-run pre_tokenize.py --stage dpo.")
    return pairs


def check_token_ids(data: TokenizedData, limit: int | None = None, limit_name: str = "the vocabulary",
                    chunk_tokens: int = 1 << 24) -> list[str]:
    """Problems with the ids stored in a dataset, read from the arrays themselves (chunked min / max over the
    memory maps, nothing copied whole): an input id that is negative or >= `limit` (the model's embedding rows, or
    the size of the tokenizer the data was made with; None: only negative ids), a label that is neither -100 nor
    such an id, and a meta.json max_token_id that the data does not bear out. Each names the file, the first bad
    value, its position and sample, and how many there are."""
    t, problems = int(data.meta["num_tokens"]), []
    first: dict[str, tuple[int, int, int]] = {}  # file -> (position, value, count) of the out-of-range values
    lo_all, hi_all = int(np.iinfo(TOKEN_DTYPE).max), -1

    def note(fn: str, start: int, values: np.ndarray, bad: np.ndarray) -> None:
        where = np.flatnonzero(bad)
        pos, value, count = first.get(fn, (start + int(where[0]), int(values[where[0]]), 0))
        first[fn] = (pos, value, count + where.size)

    def outside(v: np.ndarray) -> np.ndarray:  # not a token id below limit
        return (v < 0) | (v >= limit) if limit is not None else v < 0

    for a in range(0, t, chunk_tokens):
        ids = np.asarray(data.input_ids[a:a + chunk_tokens])
        lo, hi = int(ids.min()), int(ids.max())
        lo_all, hi_all = min(lo_all, lo), max(hi_all, hi)
        if lo < 0 or (limit is not None and hi >= limit):
            note("input_ids.bin", a, ids, outside(ids))
        lab = np.asarray(data.labels[a:a + chunk_tokens])
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or (limit is not None and hi >= limit):  # -100 is nearly always there: look closer
            bad = outside(lab) & (lab != IGNORE_INDEX)
            if bad.any():
                note("labels.bin", a, lab, bad)
    offsets = np.asarray(data.offsets)
    allowed = f"in the range [0, {limit}) of {limit_name}" if limit is not None else "a token id (>= 0)"
    fix = ("the data was made for another model or changed after pre-tokenization: re-run pre_tokenize.py with "
           "--model_name_or_path pointing at this model")
    for fn, (pos, value, count) in first.items():
        i = int(np.searchsorted(offsets, pos, side="right")) - 1
        what = f"token id {value}" if fn == "input_ids.bin" else f"label {value}"
        rule = f"is not {allowed}" if fn == "input_ids.bin" else f"is neither -100 nor {allowed}"
        problems.append(f"{data.data_dir / fn}: {what} at position {pos:,} (sample {i}, its token {pos - offsets[i]})"
                        f" {rule} ({count:,} such values; the ids span [{lo_all}, {hi_all}]); {fix}")
    claimed = data.meta.get("max_token_id")
    if t and claimed is not None and int(claimed) != hi_all:
        problems.append(f"{data.data_dir / META_FILE}: says max_token_id {claimed} but input_ids.bin holds ids up "
                        f"to {hi_all}: the folder was changed after pre-tokenization; re-run pre_tokenize.py")
    return problems


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
SAMPLE_LENGTHS_FILE = "sample_lengths.bin"  # preference packs only: int64 [num_samples], tokens entering the packs
PACKS_NAMES = {META_FILE, *(fn for fn, _ in PACK_FILES.values()), "report.json", "report.png", SAMPLE_LENGTHS_FILE}


def write_packs(data_dir: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict,
                extra_files: dict[str, bytes] | None = None, made_from: tuple | None = None) -> Path:
    """Write DIR/packs atomically: built in a hidden temp folder, meta.json last, then put in place in one step.
    Like TokenizedWriter: an existing packs/ must be ours with only our files, a symlinked one is written through,
    and what dead runs left there is removed first. `made_from`: the identity of the dataset version the packs were
    computed from (TokenizedData.identity); if DIR is another version before or after the write (pre_tokenize.py
    replaced it meanwhile), DatasetChangedError: the packs would describe data that is not there."""
    data_dir = Path(data_dir)
    problem = packs_replace_problem(data_dir)
    if problem:
        raise _refuse(problem)
    _check_unchanged(data_dir, made_from)
    pdir = Path(os.path.realpath(data_dir / PACKS_DIR))
    sweep_stale(pdir)
    tmp = work_name(pdir)
    try:
        tmp.mkdir()
        for key, (fn, dt) in PACK_FILES.items():
            np.ascontiguousarray(arrays[key], dtype=dt).tofile(tmp / fn)
        for name, blob in (extra_files or {}).items():
            (tmp / name).write_bytes(blob)
        full = {**meta, "format": PACKS_FORMAT, "version": PACKS_VERSION,
                **{f"num_{k}": int(np.asarray(arrays[k]).size) for k in PACK_FILES}}
        write_json_atomic(tmp / META_FILE, full)
        replace_dir(tmp, pdir)
        written = folder_identity(pdir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # the folder it was written in may have been swapped away: say so first
            _check_unchanged(data_dir, made_from, e)
        raise
    try:
        _check_unchanged(data_dir, made_from)
    except DatasetChangedError:
        if written is not None and folder_identity(pdir) == written:  # they landed in the new version: remove them
            shutil.rmtree(pdir, ignore_errors=True)
        raise
    return data_dir / PACKS_DIR


def _check_unchanged(data_dir: Path, made_from: tuple | None, cause: BaseException | None = None) -> None:
    if made_from is None:
        return
    now = folder_identity(os.path.realpath(data_dir))
    if now != made_from:
        what = "is gone" if now is None else "was replaced by another version (pre_tokenize.py wrote it again?)"
        raise DatasetChangedError(
            f"{data_dir} {what} while its packs were being made: packs of the version read would not match the "
            f"data there, so none were kept. Run `python sort_and_group.py --train_file {data_dir}` again once "
            f"pre_tokenize.py has finished.") from cause


class PackedData:
    """A tokenized dataset plus its DIR/packs, memory-mapped and checked on open (both folders read as one
    version, like TokenizedData).

    Sample i enters packs and the sorted order with its first `sample_lengths[i]` tokens
    (= min(length, max_length); `--over_length truncate` is the only way that cuts anything; preference packs
    store them in sample_lengths.bin, since a pair is cut as a whole)."""

    def __init__(self, data_dir: str | os.PathLike):
        data_dir = Path(data_dir)
        recover_dir(data_dir)
        recover_dir(data_dir / PACKS_DIR)
        _consistent([data_dir, data_dir / PACKS_DIR], self._read)

    def _read(self, top: FolderReader, packs: FolderReader) -> None:
        self.data = TokenizedData(top.path, top)
        self.data_dir = self.data.data_dir
        pdir = self.data_dir / PACKS_DIR
        fix = f"run `python sort_and_group.py --train_file {self.data_dir}`"
        if packs.size(META_FILE) is None:
            raise DatasetFormatError(f"{self.data_dir}: no packs ({PACKS_DIR}/{META_FILE} missing); {fix} first.")
        try:
            self.meta = json.loads(packs.read_text(META_FILE))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetFormatError(f"{pdir / META_FILE}: unreadable ({e}); {fix} again.") from e
        m = self.meta if isinstance(self.meta, dict) else {}
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
            n = int(m[f"num_{key}"])
            got = packs.size(fn)
            if got != n * np.dtype(dt).itemsize:
                problems.append(f"{fn}: {'missing' if got is None else f'{got} bytes'}, "
                                f"expected {n * np.dtype(dt).itemsize} bytes")
            else:
                arrays[key] = _memmap(packs, fn, dt, n)
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
        if m.get("sample_lengths_file"):  # preference packs: each side of an over-length pair cut its own way
            got = packs.size(SAMPLE_LENGTHS_FILE)
            if got != n * 8:
                found = "missing" if got is None else f"{got} bytes"
                raise DatasetFormatError(f"{pdir}: {SAMPLE_LENGTHS_FILE}: {found}, expected {n * 8} bytes; {fix} again.")
            stored = np.asarray(_memmap(packs, SAMPLE_LENGTHS_FILE, np.int64, n))
            if stored.size and (stored.min() < 0 or np.any(stored > self.data.lengths)):
                raise DatasetFormatError(f"{pdir}/{SAMPLE_LENGTHS_FILE}: lengths outside the samples; {fix} again.")
            self.sample_lengths = stored

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
