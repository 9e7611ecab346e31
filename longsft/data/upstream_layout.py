"""The upstream layout (LongAlign / LongWriter pre-tokenization: dense inputs.npy + labels.npy, [rows, width],
padded) read and converted in place to our format, without re-tokenizing; used by sort_and_group.py.

    python sort_and_group.py --train_file DIR_WITH_INPUTS_NPY [--pad_token_id ID | --model_name_or_path MODEL]

Row length rule: 1 + the last position whose token is not the pad id OR whose label is supervised (!= -100), so a
final EOS equal to the pad id (GLM tokenizers where pad == eos) is kept; all-padding rows are dropped and counted.
Pad id: --pad_token_id, else the pad token a local --model_name_or_path declares (JSON files only; when it declares
none, its family's pad-id rule in patch/families.py), else the most common last-column token of rows whose last
label is -100; a pad id the rows do not end with is refused with the fix. numpy only (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from longsft.errors import UserError
from patch import families
from longsft.data.storage import ARRAY_FILES, IGNORE_INDEX, META_FILE, OFFSETS_FILE, TokenizedWriter


class SortAndGroupError(UserError):
    """Settings or data that sort_and_group.py cannot use; the message lists every problem and its fix."""



def model_pad_token_id(path: str) -> Optional[int]:
    """The pad id a local model/tokenizer folder declares, from its JSON files (no tokenizer code runs); when it
    declares none, its family's pad-id rule (patch/families.py) on the token ids those files list."""
    root = Path(path)
    if not root.is_dir():
        raise SortAndGroupError(f"--model_name_or_path {path}: no such local folder (nothing is downloaded); "
                                f"pass the folder with tokenizer_config.json, or --pad_token_id.")

    def load(name):
        p = root / name
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    tok_config, config = load("tokenizer_config.json"), load("config.json")

    def token_id(text) -> Optional[int]:
        text = text.get("content") if isinstance(text, dict) else text
        if not isinstance(text, str):
            return None
        for tid, tok in tok_config.get("added_tokens_decoder", {}).items():
            if tok.get("content") == text:
                return int(tid)
        for tok in load("tokenizer.json").get("added_tokens", []):
            if tok.get("content") == text:
                return int(tok["id"])
        return None

    def config_id(key) -> Optional[int]:
        pid = config.get(key)
        pid = pid[0] if isinstance(pid, list) and pid else pid
        return int(pid) if isinstance(pid, int) else None

    pad = token_id(tok_config.get("pad_token"))
    if pad is None:
        pad = config_id("pad_token_id")
    fam = families.detect_folder(root) if pad is None else None
    if fam is not None:

        def lookup(source: str) -> Optional[int]:
            if source == "pad":
                return None  # declares none (above)
            if source == "eos":
                eos = token_id(tok_config.get("eos_token"))
                return eos if eos is not None else config_id("eos_token_id")
            return token_id(source)

        pad = families.resolve_pad(families.pad_rule(fam), lookup)
    return pad


def inspect_legacy(data_dir: Path, pad_token_id: Optional[int], model_name_or_path: Optional[str]) -> dict:
    """Open inputs.npy / labels.npy read-only, pick the pad id and measure every row. Writes nothing."""
    arrays = {}
    for name in ("inputs.npy", "labels.npy"):
        try:
            arrays[name] = np.load(data_dir / name, mmap_mode="r")
        except FileNotFoundError:
            raise SortAndGroupError(f"{data_dir}: has inputs.npy but no {name}; both upstream files are needed.")
        except (ValueError, OSError) as e:
            raise SortAndGroupError(f"{data_dir / name}: unreadable or truncated ({e}); re-create it with the "
                                    f"upstream pre-tokenization script.") from e
    ids, lab = arrays["inputs.npy"], arrays["labels.npy"]
    problems = []
    for name, a in arrays.items():
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
            problems.append(f"{data_dir / name}: {a.dtype} array of shape {a.shape}, expected integer [rows, width]")
    if not problems and ids.shape != lab.shape:
        problems.append(f"{data_dir}: inputs.npy is {ids.shape} but labels.npy is {lab.shape}; they must match")
    if not problems and ids.shape[0] == 0:
        problems.append(f"{data_dir}: inputs.npy has no rows")
    if problems:
        raise SortAndGroupError("; ".join(problems) + ".")
    rows, width = ids.shape
    last_ids, last_unsup = np.asarray(ids[:, -1]), np.asarray(lab[:, -1]) == IGNORE_INDEX
    values, counts = np.unique(last_ids[last_unsup], return_counts=True)
    seen = int(values[np.argmax(counts)]) if values.size else None     # most common unsupervised last token
    if pad_token_id is not None:
        pad, source = int(pad_token_id), "--pad_token_id"
    elif model_name_or_path:
        pad, source = model_pad_token_id(model_name_or_path), f"{model_name_or_path} (pad token)"
        if pad is None:
            raise SortAndGroupError(f"--model_name_or_path {model_name_or_path}: declares no pad token; "
                                    f"pass --pad_token_id.")
    elif seen is not None:
        pad, source = seen, "inferred: most common last token of rows with an unsupervised end"
    else:
        pad, source = None, "not needed: every row ends in a supervised token (no padding)"
    if seen is not None and pad != seen and counts.max() > 0.5 * last_unsup.sum():
        raise SortAndGroupError(
            f"{data_dir / 'inputs.npy'}: {int(counts.max())} of {rows} rows end in token {seen}, not the pad id "
            f"{pad} ({source}), so the padding would be read as tokens. Pass --pad_token_id {seen} (upstream "
            f"LongWriter padded GLM-4 data with [MASK], not the tokenizer's pad token).")
    lengths = np.zeros(rows, dtype=np.int64)
    step = max(1, (1 << 23) // width)
    lo, hi = 0, 0
    for a in tqdm(range(0, rows, step), desc="measure rows", unit_scale=step, disable=rows <= step):
        chunk = np.asarray(ids[a:a + step])                                 # [chunk, width]
        keep = np.asarray(lab[a:a + step]) != IGNORE_INDEX
        if pad is not None:
            keep |= chunk != pad
        last = width - np.argmax(keep[:, ::-1], axis=1)                     # 1 + last kept position
        lengths[a:a + step] = np.where(keep.any(axis=1), last, 0)
        lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    if lo < 0 or hi > np.iinfo(np.int32).max:
        raise SortAndGroupError(f"{data_dir / 'inputs.npy'}: token ids range over [{lo}, {hi}], outside [0, 2^31); "
                                f"not token ids of a tokenizer, re-create the file.")
    return {"ids": ids, "labels": lab, "lengths": lengths, "pad_token_id": pad, "pad_source": source,
            "rows": rows, "width": width}


CONVERT_STAGE = "longsft-convert"  # its work folder: DIR/.longsft-convert.tmp-HOST-PID-X (never renamed into place)


def convert_legacy(data_dir: Path, legacy: dict, model_name_or_path: Optional[str]) -> None:
    """Write our format next to inputs.npy / labels.npy (meta.json last, so DIR is valid only when complete)."""
    kept = np.flatnonzero(legacy["lengths"] > 0)
    meta = {"source_format": "upstream inputs.npy/labels.npy", "max_length": legacy["width"],
            "legacy": {"rows": legacy["rows"], "width": legacy["width"], "empty_rows": legacy["rows"] - kept.size,
                       "pad_token_id": legacy["pad_token_id"], "pad_source": legacy["pad_source"]},
            "tokenizer": {"name_or_path": model_name_or_path, "pad_token_id": legacy["pad_token_id"]}}
    with TokenizedWriter(data_dir / CONVERT_STAGE, meta=meta) as w:
        for i in tqdm(kept.tolist(), desc="convert upstream layout", disable=kept.size < 10000):
            n = int(legacy["lengths"][i])
            w.add(legacy["ids"][i, :n], legacy["labels"][i, :n])
        stage = w.finish()
        for fn in [OFFSETS_FILE, *(f for f, _ in ARRAY_FILES.values()), META_FILE]:   # meta.json last
            (stage / fn).replace(data_dir / fn)
    # leaving the block removes the emptied stage folder
