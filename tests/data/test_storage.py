"""The on-disk tokenized format: writer, reader, atomic replace, clear errors."""
import numpy as np
import pytest

from longsft.data import storage
from longsft.data.storage import DatasetFormatError, TokenizedData, TokenizedWriter
from longsft.train.batches import LMDataset


def _write(path, samples, meta=None):
    with TokenizedWriter(path, meta=meta or {}) as w:
        for ids, lab in samples:
            w.add(ids, lab)
        w.commit()


def test_round_trip_and_lengths(tmp_path):
    out = tmp_path / "ds"
    _write(out, [([1, 2, 3], [-100, 2, 3]), ([7, 8], [7, -100])], meta={"template": "x"})
    ds = LMDataset(out)
    assert len(ds) == 2
    assert ds[0]["input_ids"].tolist() == [1, 2, 3]
    assert ds[1]["labels"].tolist() == [7, -100]
    data = TokenizedData(out)
    assert data.lengths.tolist() == [3, 2]
    assert data.meta["template"] == "x" and data.meta["num_tokens"] == 5


def test_uncommitted_writer_leaves_previous_output(tmp_path):
    out = tmp_path / "ds"
    _write(out, [([1, 2], [1, 2])])
    with pytest.raises(RuntimeError):
        with TokenizedWriter(out) as w:
            w.add([5, 6, 7], [5, 6, 7])
            raise RuntimeError("interrupted")
    assert LMDataset(out)[0]["input_ids"].tolist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetFormatError, match="no such folder"):
        LMDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="not a tokenized dataset"):
        LMDataset(tmp_path / "empty")
    out = tmp_path / "ds"
    _write(out, [([1, 2, 3], [1, 2, 3])])
    with open(out / "labels.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(DatasetFormatError, match="labels.bin"):
        LMDataset(out)
    with pytest.raises(ValueError):
        with TokenizedWriter(tmp_path / "bad") as w:
            w.add([1, 2], [1])


def test_check_token_ids_reads_the_arrays_in_chunks(tmp_path):
    out = tmp_path / "ds"
    _write(out, [([1, 2, 3], [-100, 2, 3]), ([7, 8], [7, -100]), ([4, 5, 6], [4, 5, 6])])
    data = TokenizedData(out)
    assert storage.check_token_ids(data, 9) == [] and storage.check_token_ids(data) == []
    ids = np.memmap(out / "input_ids.bin", dtype=np.int32, mode="r+")
    ids[[4, 6, 7]] = [9, 12, 8]        # two ids past 9 rows, in different chunks; 8 is fine
    ids.flush()
    problems = storage.check_token_ids(TokenizedData(out), 9, "the model's 9 embedding rows", chunk_tokens=3)
    assert len(problems) == 2
    assert problems[0].startswith(f"{out / 'input_ids.bin'}: token id 9 at position 4 (sample 1, its token 1) is "
                                  f"not in the range [0, 9) of the model's 9 embedding rows (2 such values; the ids "
                                  f"span [1, 12])")
    assert "max_token_id 8 but input_ids.bin holds ids up to 12" in problems[1]


def test_main_check_data_reads_the_ids_not_meta_json(tmp_path, llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    from longsft.train.data import check_data
    from patch import families

    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    rows = len(tok)
    out = tmp_path / "ds"
    _write(out, [([1, 2, 3], [-100, 2, 3]), ([7, 8], [7, 8])], meta={
        "model_family": "llama3", "tokenizer": {"vocab_size": rows}})
    assert check_data(str(out), "train", "naive", rows, tok, families.family("llama3"))[0] == []
    ids = np.memmap(out / "input_ids.bin", dtype=np.int32, mode="r+")
    ids[3] = rows + 5                  # meta.json still says max_token_id 8
    ids.flush()
    problems, _ = check_data(str(out), "train", "naive", rows, tok, families.family("llama3"))
    assert any(p.startswith(f"--train_file {out}: {out / 'input_ids.bin'}: token id {rows + 5} at position 3 "
                            f"(sample 1, its token 0)") and "embedding rows" in p for p in problems), problems
