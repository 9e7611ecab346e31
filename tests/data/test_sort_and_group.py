"""sort_and_group.py and the readers of its output (dataset.LMPackDataset / LMSortDataset)."""
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longsft.data import sort_and_group as sg
from longsft.data import upstream_layout
from longsft.data import packing
from longsft.data.storage import IGNORE_INDEX, DatasetFormatError, TokenizedData, TokenizedWriter
from longsft.train.batches import LMDataset, LMPackDataset, LMSortDataset

ROOT = Path(__file__).resolve().parents[2]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_dataset(path, lengths, seed=0, meta=None):
    """Random ids; labels: a random unsupervised prefix, the rest supervised (a length-1 list -> no targets)."""
    rng = np.random.default_rng(seed)
    samples = []
    with TokenizedWriter(path, meta=meta or {}) as w:
        for n in lengths:
            ids = rng.integers(0, 5000, n)
            lab = ids.copy()
            lab[: int(rng.integers(0, n + 1))] = IGNORE_INDEX
            w.add(ids, lab)
            samples.append((ids, lab))
        w.commit()
    return samples


def run(path, *flags):
    return sg.main(["--train_file", str(path), "--plot", "false", *map(str, flags)])


def entries(path):
    return sorted(p.name for p in Path(path).iterdir())


# ---------------------------------------------------------------------------------------------- packing

def reference_bfd_fills(lengths, cap):
    """Textbook best-fit decreasing, one item at a time."""
    rooms = []
    for x in sorted(lengths, reverse=True):
        fits = [i for i, r in enumerate(rooms) if r >= x]
        if fits:
            best = min(fits, key=lambda i: rooms[i])
            rooms[best] -= x
        else:
            rooms.append(cap - x)
    return sorted(cap - r for r in rooms)


def reference_next_fit(lengths, cap):
    """Upstream's loop (LongWriter sort_and_group.py), minus its bugs: the last pack is kept."""
    packs, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if used + n > cap:
            packs.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return packs + ([cur] if cur else [])


def split(order, offsets):
    return [order[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


lengths_and_cap = st.integers(1, 80).flatmap(
    lambda cap: st.tuples(st.lists(st.integers(1, cap), min_size=0, max_size=120), st.just(cap)))


@FAST
@given(lengths_and_cap)
def test_bfd_is_best_fit_decreasing(case):
    lengths, cap = case
    lengths = np.asarray(lengths, dtype=np.int64)
    order, offsets = packing.pack_bfd(lengths, cap)
    assert sorted(order.tolist()) == list(range(lengths.size))          # each sample exactly once
    packs = split(order, offsets)
    assert all(packs)
    fills = [int(lengths[p].sum()) for p in packs]
    assert max(fills, default=0) <= cap
    assert len(packs) >= packing.lower_bound(lengths, cap)
    assert sorted(fills) == reference_bfd_fills(lengths.tolist(), cap)   # same packing as the textbook algorithm


@FAST
@given(lengths_and_cap)
def test_sequential_is_upstream_next_fit(case):
    lengths, cap = case
    order, offsets = packing.pack_sequential(np.asarray(lengths, dtype=np.int64), cap)
    assert split(order, offsets) == reference_next_fit(lengths, cap)


def test_bfd_reaches_the_lower_bound_on_a_longwriter_like_mix():
    rng = np.random.default_rng(1)
    lengths = np.concatenate([np.clip(np.rint(rng.lognormal(np.log(600), 0.8, 58000)), 16, 32768),
                              rng.integers(3000, 32769, 2000)]).astype(np.int64)
    order, offsets = packing.pack_bfd(lengths, 32768)
    lb = packing.lower_bound(lengths, 32768)
    assert offsets.size - 1 <= lb + 0.001 * lb
    _, nf = packing.pack_sequential(lengths, 32768)
    assert nf.size - 1 > offsets.size - 1


@FAST
@given(st.lists(st.floats(0, 1e6), max_size=60), st.integers(1, 9), st.integers(0, 3))
def test_steps_are_balanced_whole_and_seeded(costs, group, seed):
    costs = np.asarray(costs, dtype=np.float64)
    perm = packing.arrange_steps(costs, group, seed)
    assert sorted(perm.tolist()) == list(range(costs.size))
    assert np.array_equal(perm, packing.arrange_steps(costs, group, seed))
    full = costs.size // group
    ranked = np.argsort(-costs, kind="stable")
    steps = {tuple(sorted(ranked[k * group:(k + 1) * group].tolist())) for k in range(full)}
    got = {tuple(sorted(perm[k * group:(k + 1) * group].tolist())) for k in range(full)}
    assert got == steps                                                   # similar-cost packs share a step
    assert sorted(perm[full * group:].tolist()) == sorted(ranked[full * group:].tolist())  # short step last


@FAST
@given(lengths_and_cap, st.integers(1, 5))
def test_uneven_steps_are_repacked_safely(case, group):
    lengths, cap = case
    lengths = np.asarray(lengths, dtype=np.int64)
    order, offsets = packing.pack_bfd(lengths, cap)
    costs = packing.pack_costs(lengths, order, offsets, 50.0)
    order, offsets = packing.reorder_packs(order, offsets, packing.arrange_steps(costs, group, 0))
    before = packing.pack_costs(lengths, order, offsets, 50.0)
    new_order, new_offsets, _ = packing.repack_uneven_steps(lengths, order, offsets, group, cap, 50.0)
    after = packing.pack_costs(lengths, new_order, new_offsets, 50.0)
    assert new_offsets.size == offsets.size and np.all(np.diff(new_offsets) > 0)
    for a in range(0, offsets.size - 1, group):   # samples stay in their step; no step gets slower
        b = min(a + group, offsets.size - 1)
        assert sorted(new_order[new_offsets[a]:new_offsets[b]]) == sorted(order[offsets[a]:offsets[b]])
        assert after[a:b].max() <= before[a:b].max() + 1e-9
    assert max((int(lengths[p].sum()) for p in split(new_order, new_offsets)), default=0) <= cap


def test_a_part_filled_pack_is_evened_out():
    lengths = np.array([60, 30, 5, 5])                  # bfd in 95: [60, 30, 5] and [5]
    order, offsets = packing.pack_bfd(lengths, 95)
    assert np.diff(offsets).tolist() == [3, 1]
    order, offsets, n = packing.repack_uneven_steps(lengths, order, offsets, 2, 95, 1e9)
    assert n == 1 and sorted(int(lengths[p].sum()) for p in split(order, offsets)) == [40, 60]


def test_seed_shuffles_whole_steps():
    costs = np.arange(400, dtype=np.float64)
    a, b = packing.arrange_steps(costs, 8, 1), packing.arrange_steps(costs, 8, 2)
    assert not np.array_equal(a, b)
    assert np.array_equal(np.sort(a.reshape(50, 8), axis=1)[:, 0] % 8, np.zeros(50))
    assert np.array_equal(packing.arrange_steps(costs, 8, 1, shuffle=False), np.arange(400)[::-1])


def test_step_imbalance_model():
    assert packing.step_imbalance(np.ones(16), 8)["mean"] == 1.0
    s = packing.step_imbalance(np.array([1, 1, 1, 5.0]), 4)
    assert s["max"] == pytest.approx(2.5) and s["time_lost"] == pytest.approx(1.5)
    costs = packing.pack_costs(np.array([3, 1, 4]), np.array([0, 1, 2]), np.array([0, 2, 3]), 2.0)
    assert costs.tolist() == [3 + 1 + (9 + 1) / 2, 4 + 16 / 2]


# ---------------------------------------------------------------------------------------------- end to end

def check_packs(path, samples, max_length):
    ds = LMPackDataset(path)
    seen = []
    for p in range(len(ds)):
        item = ds[p]
        assert set(item) == {"input_ids", "labels", "attention_mask", "position_ids", "weights"}
        assert item["input_ids"].dtype == torch.int64 and item["labels"].dtype == torch.int64
        assert item["attention_mask"].dtype == torch.int32 and item["weights"].dtype == torch.float32
        cu = item["attention_mask"].numpy()
        total = item["input_ids"].numel()
        assert cu[0] == 0 and cu[-1] == total <= max_length and np.all(np.diff(cu) > 0)
        idx = ds.packs.pack_samples[ds.packs.pack_offsets[p]:ds.packs.pack_offsets[p + 1]].tolist()
        assert len(idx) == cu.size - 1
        for k, j in enumerate(idx):
            a, b = cu[k], cu[k + 1]
            ids, lab = samples[j][0][: b - a], samples[j][1][: b - a].copy()
            assert b - a == min(len(samples[j][0]), max_length)
            assert item["input_ids"][a:b].tolist() == ids.tolist()
            assert item["position_ids"][a:b].tolist() == list(range(b - a))
            lab[0] = IGNORE_INDEX                                           # nothing predicts a first token
            assert item["labels"][a:b].tolist() == lab.tolist()
            n_i = int((lab != IGNORE_INDEX).sum())
            want = np.where(lab != IGNORE_INDEX, 1.0 / max(n_i, 1), 0.0).astype(np.float32)
            assert np.array_equal(item["weights"][a:b].numpy(), want)
            assert int(ds.packs.targets[j]) == n_i
        seen += idx
        assert ds.pack_lengths[p] == total and ds.pack_num_samples[p] == len(idx)
        assert ds.pack_num_sequences[p] == pytest.approx(float(item["weights"].sum()), abs=1e-4)
        assert ds.pack_num_targets[p] == int((item["labels"] != IGNORE_INDEX).sum())
    return ds, seen


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(1, 40), min_size=1, max_size=40), st.integers(40, 70), st.integers(1, 4),
       st.sampled_from(["bfd", "sequential"]))
def test_packs_hold_every_sample_once_with_consistent_fields(tmp_path_factory, lengths, max_length, group, algo):
    path = tmp_path_factory.mktemp("ds") / "ds"
    samples = write_dataset(path, lengths)
    report = run(path, "--max_length", max_length, "--group_size", group, "--pack_algorithm", algo)
    ds, seen = check_packs(path, samples, max_length)
    assert sorted(seen) == list(range(len(lengths)))
    assert report["packs"] == len(ds) and report["samples"]["packed"] == len(lengths)
    srt = LMSortDataset(path)
    order = srt.packs.sort_order.tolist()
    assert sorted(order) == list(range(len(lengths)))
    for i in range(len(srt)):
        assert srt[i]["input_ids"].tolist() == samples[order[i]][0].tolist()
    full = len(order) // group   # a group is a run of the length-sorted order
    by_len = np.argsort(np.asarray(lengths), kind="stable")
    runs = {tuple(sorted(by_len[k * group:(k + 1) * group])) for k in range(full)}
    assert {tuple(sorted(order[k * group:(k + 1) * group])) for k in range(full)} == runs


def test_report_determinism_and_pickling(tmp_path):
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 300, 500).tolist()
    lengths[7] = 1   # a sample with no supervised target token: weight 0 everywhere, counted
    path = tmp_path / "ds"
    samples = write_dataset(path, lengths)
    report = sg.main(["--train_file", str(path), "--max_length", "512", "--group_size", "4", "--seed", "5"])
    assert report["samples"]["without_targets"] >= 1 and report["lower_bound"] <= report["packs"]
    assert report["packs"] <= report["lower_bound"] + 1 and report["efficiency"] > 0.98
    saved = json.loads((path / "packs" / "report.json").read_text())
    for key in ("samples", "tokens", "packs", "lower_bound", "efficiency", "sequences_per_pack", "step_imbalance"):
        assert saved[key] == report[key]
    assert saved["step_imbalance"]["this_run"]["mean"] <= saved["step_imbalance"]["next_fit_file_order"]["mean"]
    assert (path / "packs" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_packs(path, samples, 512)
    first = {f: (path / "packs" / f).read_bytes() for f in ("pack_samples.bin", "pack_offsets.bin", "sort_order.bin")}
    run(path, "--max_length", 512, "--group_size", 4, "--seed", 5)
    assert all((path / "packs" / f).read_bytes() == b for f, b in first.items())      # same seed, same files
    run(path, "--max_length", 512, "--group_size", 4, "--seed", 6)
    assert (path / "packs" / "sort_order.bin").read_bytes() != first["sort_order.bin"]
    assert (path / "packs" / "pack_samples.bin").read_bytes() != first["pack_samples.bin"]
    assert entries(path) == ["input_ids.bin", "labels.bin", "meta.json", "offsets.bin", "packs"]  # no temp left
    ds, srt = LMPackDataset(path), LMSortDataset(path)
    assert ds.group_size == 4 and ds.max_length == 512 and ds.meta["seed"] == 6
    for obj in (ds, srt):
        clone = pickle.loads(pickle.dumps(obj))
        assert len(pickle.dumps(obj)) < 500 and clone._reader is None
        assert torch.equal(clone[0]["input_ids"], obj[0]["input_ids"])


def test_over_length_error_truncate_skip(tmp_path):
    path = tmp_path / "ds"
    samples = write_dataset(path, [10, 90, 30, 120, 50])
    with pytest.raises(sg.SortAndGroupError) as e:
        run(path, "--max_length", 64)
    msg = str(e.value)
    assert "2 samples are longer than --max_length 64:" in msg and "sample 3 (120 tokens)" in msg
    assert "sample 1 (90 tokens)" in msg and "--max_length 120" in msg and "--over_length truncate" in msg
    assert not (path / "packs").exists() and entries(path)[-1] == "offsets.bin"    # nothing written

    report = run(path, "--max_length", 64, "--over_length", "truncate")
    assert report["samples"]["truncated"] == 2 and report["tokens"]["cut"] == 26 + 56
    ds, seen = check_packs(path, samples, 64)
    assert sorted(seen) == list(range(5))
    assert max(len(LMSortDataset(path)[i]["input_ids"]) for i in range(5)) == 64

    report = run(path, "--max_length", 64, "--over_length", "skip")
    assert report["samples"]["skipped"] == 2 and report["samples"]["packed"] == 3
    assert LMPackDataset(path).meta["samples"]["skipped"] == 2
    assert report["tokens"]["skipped"] == 210
    ds, seen = check_packs(path, samples, 64)
    assert sorted(seen) == [0, 2, 4] and sorted(LMSortDataset(path).packs.sort_order.tolist()) == [0, 2, 4]


def test_bad_input_is_refused_before_writing(tmp_path):
    with pytest.raises(DatasetFormatError, match="no such folder"):
        run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="not a tokenized dataset"):
        run(tmp_path / "empty")
    path = tmp_path / "ds"
    write_dataset(path, [5, 6, 7])
    with pytest.raises(sg.SortAndGroupError) as e:
        run(path, "--max_length", 1, "--group_size", 0)
    assert "--max_length 1" in str(e.value) and "--group_size 0" in str(e.value)   # every problem at once
    with open(path / "labels.bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(DatasetFormatError, match="labels.bin"):
        run(path)
    with pytest.raises(sg.SortAndGroupError, match="(?s)--group_size 0.*labels.bin"):
        run(path, "--group_size", 0)
    short = tmp_path / "short"
    write_dataset(short, [9, 8])
    with pytest.raises(sg.SortAndGroupError, match="would leave nothing"):
        run(short, "--max_length", 4, "--over_length", "skip")
    none = tmp_path / "none"
    with TokenizedWriter(none) as w:
        w.commit()
    with pytest.raises(sg.SortAndGroupError, match="no samples"):
        run(none)
    assert not any((p / "packs").exists() for p in tmp_path.iterdir())
    assert not any(p.name.startswith(".") for d in tmp_path.iterdir() if d.is_dir() for p in d.iterdir())


def test_readers_refuse_missing_stale_or_truncated_packs(tmp_path):
    path = tmp_path / "ds"
    write_dataset(path, [5, 6, 7])
    for cls in (LMPackDataset, LMSortDataset):
        with pytest.raises(DatasetFormatError, match="sort_and_group.py --train_file"):
            cls(path)
    run(path, "--max_length", 16)
    assert len(LMPackDataset(path)) == 2
    saved = tmp_path / "saved"
    shutil.copytree(path / "packs", saved)
    write_dataset(path, [5, 6, 8])            # pre-tokenization re-run: replaces the folder, packs with it
    assert not (path / "packs").exists()
    shutil.copytree(saved, path / "packs")    # an old packs folder next to different data
    with pytest.raises(DatasetFormatError, match="different dataset"):
        LMPackDataset(path)
    write_dataset(path, [5, 6, 7])
    shutil.copytree(saved, path / "packs")
    assert len(LMPackDataset(path)) == 2
    with open(path / "packs" / "pack_samples.bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(DatasetFormatError, match="pack_samples.bin"):
        LMSortDataset(path)


# ---------------------------------------------------------------------------------------------- upstream layout

def write_legacy(path, rows, width, pad, dtype=np.int64):
    """Upstream's dense layout: rows = [(ids, labels)], padded with `pad` / -100 to `width`."""
    path.mkdir(parents=True)
    ids = np.full((len(rows), width), pad, dtype=dtype)
    lab = np.full((len(rows), width), IGNORE_INDEX, dtype=dtype)
    for r, (i, l) in enumerate(rows):
        ids[r, :len(i)], lab[r, :len(l)] = i, l
    np.save(path / "inputs.npy", ids)
    np.save(path / "labels.npy", lab)


def test_upstream_layout_converts_in_place(tmp_path):
    eos = pad = 9   # GLM tokenizers: pad == eos; the final eos is supervised, so it is kept
    rows = [([1, 2, 3, 4, eos], [-100, -100, 3, 4, eos]),
            ([5, 6, eos], [-100, 6, eos]),
            ([], []),                                   # an all-padding row: dropped and counted
            ([7, 8, 9, 7, 8, 2, 3, eos], [-100] * 4 + [8, 2, 3, eos])]
    path = tmp_path / "legacy"
    write_legacy(path, rows, 8, pad)
    before = {f: (path / f).read_bytes() for f in ("inputs.npy", "labels.npy")}
    report = run(path, "--max_length", 16, "--group_size", 2, "--pad_token_id", pad)
    assert report["legacy"]["empty_rows"] == 1 and report["legacy"]["pad_token_id"] == pad
    assert all((path / f).read_bytes() == b for f, b in before.items())          # upstream files untouched
    ds = LMDataset(path)
    kept = [r for r in rows if r[0]]
    assert [ds[i]["input_ids"].tolist() for i in range(len(ds))] == [r[0] for r in kept]
    assert [ds[i]["labels"].tolist() for i in range(len(ds))] == [r[1] for r in kept]
    check_packs(path, [(np.array(i), np.array(l)) for i, l in kept], 16)
    assert TokenizedData(path).meta["legacy"]["rows"] == 4
    run(path, "--max_length", 16)                                                 # now an ordinary dataset


def test_upstream_pad_id_sources(tmp_path):
    mask, eos = 30, 29   # upstream LongWriter GLM-4 data: padded with [MASK], the tokenizer's pad is eos
    rows = [([1, 2, 3, eos], [-100, 2, 3, eos]), ([4, eos], [-100, eos]), ([5, 6, 30, 7, eos], [-100] * 4 + [eos])]
    inferred = tmp_path / "inferred"
    write_legacy(inferred, rows, 6, mask)
    report = run(inferred, "--max_length", 8)
    assert report["legacy"]["pad_token_id"] == mask and "inferred" in report["legacy"]["pad_source"]
    assert [len(LMDataset(inferred)[i]["input_ids"]) for i in range(3)] == [4, 2, 5]

    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(json.dumps(
        {"pad_token": "<|endoftext|>", "added_tokens_decoder": {str(eos): {"content": "<|endoftext|>"}}}))
    assert upstream_layout.model_pad_token_id(str(model)) == eos
    wrong = tmp_path / "wrong"
    write_legacy(wrong, rows, 6, mask)
    with pytest.raises(sg.SortAndGroupError, match=f"Pass --pad_token_id {mask}"):
        run(wrong, "--model_name_or_path", model)
    assert sorted(p.name for p in wrong.iterdir()) == ["inputs.npy", "labels.npy"]
    run(wrong, "--model_name_or_path", model, "--pad_token_id", mask)
    assert len(LMDataset(wrong)) == 3

    right = tmp_path / "right"
    write_legacy(right, rows, 6, eos)
    report = run(right, "--model_name_or_path", model)
    assert report["legacy"]["pad_token_id"] == eos and len(LMPackDataset(right)) == 1
    (model / "tokenizer_config.json").write_text("{}")
    (model / "config.json").write_text(json.dumps({"pad_token_id": 3}))
    assert upstream_layout.model_pad_token_id(str(model)) == 3
    with pytest.raises(sg.SortAndGroupError, match="no such local folder"):
        upstream_layout.model_pad_token_id(str(tmp_path / "nowhere"))


def test_upstream_layout_errors_write_nothing(tmp_path):
    rows = [([1, 2, 3], [-100, 2, 3]), ([], []), ([4, 5, 6, 7, 8, 9], [-100, 5, 6, 7, 8, 9])]
    long_rows = tmp_path / "long"
    write_legacy(long_rows, rows, 8, 0)
    with pytest.raises(sg.SortAndGroupError, match="inputs.npy row 2 \\(6 tokens\\)"):
        run(long_rows, "--max_length", 4)
    negative = tmp_path / "negative"
    write_legacy(negative, [([1, -5, 3], [-100, 2, 3])], 4, 0)
    with pytest.raises(sg.SortAndGroupError, match="token ids range over"):
        run(negative)
    mismatch = tmp_path / "mismatch"
    write_legacy(mismatch, rows, 8, 0)
    np.save(mismatch / "labels.npy", np.zeros((4, 8), dtype=np.int64))
    with pytest.raises(sg.SortAndGroupError, match="must match"):
        run(mismatch)
    truncated = tmp_path / "truncated"
    write_legacy(truncated, rows, 8, 0)
    with open(truncated / "inputs.npy", "r+b") as f:
        f.truncate(150)
    with pytest.raises(sg.SortAndGroupError, match="truncated"):
        run(truncated)
    padding = tmp_path / "padding"
    write_legacy(padding, [([], []), ([], [])], 4, 0)
    with pytest.raises(sg.SortAndGroupError, match="every row is padding"):
        run(padding)
    (tmp_path / "model").mkdir()
    with pytest.raises(sg.SortAndGroupError, match="declares no pad token"):
        run(long_rows, "--model_name_or_path", tmp_path / "model")
    (tmp_path / "half").mkdir()
    np.save(tmp_path / "half" / "inputs.npy", np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(sg.SortAndGroupError, match="no labels.npy"):
        run(tmp_path / "half")
    for d in tmp_path.iterdir():
        if d.name == "model":
            continue
        assert not ({"meta.json", "packs", "input_ids.bin"} & {p.name for p in d.iterdir()})
        assert not any(p.name.startswith(".") for p in d.iterdir())


def test_cli_exits_with_the_message(tmp_path):
    path = tmp_path / "ds"
    write_dataset(path, [30, 40, 50, 60])
    cmd = [sys.executable, str(ROOT / "sort_and_group.py"), "--train_file", str(path), "--max_length", "40"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "error: sort_and_group.py cannot run" in out.stderr
    assert "sample 3 (60 tokens)" in out.stderr and "--over_length skip" in out.stderr
    assert not (path / "packs").exists()


def test_token_ids_are_checked_in_the_data_itself(tmp_path):
    """meta.json's max_token_id is not trusted: the ids themselves are read (against the tokenizer's size when
    meta.json names one), and every problem names the file, the value, its position and sample."""
    path = tmp_path / "ds"
    write_dataset(path, [5, 6, 7], meta={"tokenizer": {"vocab_size": 5000}})
    ids = np.memmap(path / "input_ids.bin", dtype=np.int32, mode="r+")
    ids[7] = 70000                      # sample 1, its token 2: past the vocabulary, meta.json says nothing
    ids.flush()
    with pytest.raises(sg.SortAndGroupError) as e:
        run(path)
    msg = str(e.value)
    assert "input_ids.bin: token id 70000 at position 7 (sample 1, its token 2)" in msg
    assert "[0, 5000) of the 5000 tokens of the tokenizer it was made with" in msg
    assert "says max_token_id" in msg and "up to 70000" in msg and not (path / "packs").exists()

    plain = tmp_path / "plain"          # no vocabulary known: negative ids, odd labels and the meta claim
    write_dataset(plain, [4, 4])
    ids = np.memmap(plain / "input_ids.bin", dtype=np.int32, mode="r+")
    top = int(ids.max())
    ids[5] = top + 1
    ids[2] = -3
    ids.flush()
    lab = np.memmap(plain / "labels.bin", dtype=np.int32, mode="r+")
    lab[6] = -7
    lab.flush()
    with pytest.raises(sg.SortAndGroupError) as e:
        run(plain)
    msg = str(e.value)
    assert "token id -3 at position 2 (sample 0, its token 2) is not a token id" in msg
    assert "labels.bin: label -7 at position 6 (sample 1, its token 2) is neither -100 nor" in msg
    assert f"says max_token_id {top} but input_ids.bin holds ids up to {top + 1}" in msg
    assert not (plain / "packs").exists()
