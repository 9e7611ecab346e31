"""Preference training (main.py --stage dpo) on packed pairs equals the loss computed pair by pair, unpacked, with
transformers' stock classes; settings and data errors; the logged TRL metrics.

Run: python -m pytest -q tests/train/test_dpo.py   (one process each; multi-process runs: test_dpo_distributed.py)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

import main as train_main
from longsft.data import sort_and_group
from longsft.data.storage import IGNORE_INDEX, TokenizedData, TokenizedWriter, mark_pairs
from longsft.train import model as train_model
from longsft.train.dpo_data import PairCollator, PairDataset, PairPackDataset
from tests.train.test_run import EXACT, llama_dir, run, task_meta, write_task  # noqa: F401 (fixture)

# ----------------------------------------------------------------------------------------------
# Helpers: pair data written directly, and the stock reference
# ----------------------------------------------------------------------------------------------


def write_pair_task(out: Path, model_dir: Path, family: str = "llama3", n: int = 10, seed: int = 0,
                    max_length: int = 64, group: bool = True, template: str | None = None,
                    shapes: list[tuple[int, int, int]] | None = None, group_size: int = 2) -> Path:
    """Preference pairs as pre_tokenize.py --stage dpo lays them out: a shared random prompt (not supervised), a
    chosen reply counting up from the prompt's last token, a rejected reply of random tokens. `shapes`: (prompt,
    chosen, rejected) lengths of every pair. Then sort_and_group.py (whole pairs in packs)."""
    meta = task_meta(model_dir, family, template, max_length)
    rng = np.random.default_rng(seed)
    with TokenizedWriter(out, meta) as w:
        for i in range(n if shapes is None else len(shapes)):
            p, c, r = (int(rng.integers(3, 9)), int(rng.integers(3, 14)), int(rng.integers(3, 14))) \
                if shapes is None else shapes[i]
            prompt = rng.integers(20, 100, size=p).tolist()
            chosen = [(prompt[-1] + k) % 100 + 20 for k in range(1, c + 1)]
            rejected = rng.integers(20, 100, size=r).tolist()
            for reply in (chosen, rejected):
                w.add(prompt + reply, [IGNORE_INDEX] * p + reply)
        mark_pairs(w)
        w.commit()
    if group:
        sort_and_group.main(["--train_file", str(out), "--max_length", str(max_length), "--group_size",
                             str(group_size)])
    return out


def stock_logps(model, ids: np.ndarray, labels: np.ndarray) -> torch.Tensor:
    """Sum of log p(label[t+1] | ids[:t+1]) over the supervised labels of one unpacked sequence (stock forward)."""
    logits = model(torch.tensor(ids, dtype=torch.long)[None]).logits[0].float()
    logp = logits.log_softmax(-1)
    lab = torch.tensor(labels, dtype=torch.long)
    t = torch.nonzero(lab[1:] != IGNORE_INDEX).squeeze(1)
    return logp[t, lab[1:][t]].double().sum()


def stock_dpo(policy, reference, data_dir: Path, loss: str, beta: float, smoothing: float = 0.0,
              gamma: float = 0.0, sft_weight: float = 0.0):
    """The DPO objective over all pairs of the dataset, pair by pair, unpacked: (loss, metrics)."""
    data = TokenizedData(data_dir)
    losses, rewards_c, rewards_r, nll, chosen_tokens, pcs, prs = [], [], [], 0.0, 0, [], []
    for p in range(data.num_pairs):
        (ic, lc), (ir, lr) = data.sample(2 * p), data.sample(2 * p + 1)
        pc, pr = stock_logps(policy, ic, lc), stock_logps(policy, ir, lr)
        nc, nr = int((lc[1:] != IGNORE_INDEX).sum()), int((lr[1:] != IGNORE_INDEX).sum())
        if loss == "simpo":
            rc, rr = beta * pc / nc, beta * pr / nr
            d = rc - rr - gamma
            loss_p = -(1 - smoothing) * F.logsigmoid(d) - smoothing * F.logsigmoid(-d)
        else:
            with torch.no_grad():
                refc, refr = stock_logps(reference, ic, lc), stock_logps(reference, ir, lr)
            rc, rr = beta * (pc - refc), beta * (pr - refr)
            if loss == "sigmoid":
                d = rc - rr
                loss_p = -(1 - smoothing) * F.logsigmoid(d) - smoothing * F.logsigmoid(-d)
            else:  # ipo, length-normalised (TRL)
                loss_p = ((pc - refc) / nc - (pr - refr) / nr - 1 / (2 * beta)) ** 2
        losses.append(loss_p)
        rewards_c.append(rc.detach())
        rewards_r.append(rr.detach())
        pcs.append(pc.detach())
        prs.append(pr.detach())
        nll = nll - pc
        chosen_tokens += nc
    total = torch.stack(losses).mean() + (sft_weight * nll / chosen_tokens if sft_weight else 0.0)
    rc, rr = torch.stack(rewards_c), torch.stack(rewards_r)
    metrics = {"rewards/chosen": rc.mean().item(), "rewards/rejected": rr.mean().item(),
               "rewards/accuracies": (rc > rr).double().mean().item(), "rewards/margins": (rc - rr).mean().item(),
               "logps/chosen": torch.stack(pcs).mean().item(), "logps/rejected": torch.stack(prs).mean().item()}
    return total, metrics


def stock_sgd_step(model_dir: Path, data_dir: Path, lr: float, stock: bool = True, **dpo) -> tuple[dict, float, dict]:
    """One SGD step of the stock class on the unpacked objective: (new weights, loss, metrics). stock=False: our
    class of the folder (a family transformers has no class for), still run pair by pair, unpacked."""
    if stock:
        load = transformers.AutoModelForCausalLM.from_pretrained
    else:
        cls = train_model.model_class(train_model.read_model_type(str(model_dir)))
        load = cls.from_pretrained
    policy = load(model_dir, dtype=torch.float32)
    reference = load(model_dir, dtype=torch.float32).eval()
    assert type(policy).__module__.startswith("transformers.") == stock  # the stock class, not ours
    policy.eval()  # no dropout in these configs; eval keeps the forward deterministic
    loss, metrics = stock_dpo(policy, reference, data_dir, **dpo)
    loss.backward()
    with torch.no_grad():
        new = {k: (p - lr * p.grad).detach().clone() for k, p in policy.named_parameters()}
    return new, float(loss.detach()), metrics


def weight_errors(model_dir: Path, trained: Path, want: dict) -> tuple[float, float]:
    """(max relative error of the trained weights, max error relative to the update)."""
    got = load_file(str(trained / "model.safetensors"))
    init = load_file(str(model_dir / "model.safetensors"))
    rel_w = max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)
    rel_u = max(((got[k] - want[k]).norm() / (want[k] - init[k]).norm()).item() for k in want
                if (want[k] - init[k]).norm() > 0)
    return rel_w, rel_u


def history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


DPO_FLAGS = {"loss": "--dpo_loss", "beta": "--dpo_beta", "smoothing": "--dpo_label_smoothing",
             "gamma": "--simpo_gamma", "sft_weight": "--dpo_sft_weight"}


def dpo_argv(**dpo) -> list:
    return ["--stage", "dpo"] + [x for k, v in dpo.items() for x in (DPO_FLAGS[k], v)]


# ----------------------------------------------------------------------------------------------
# One SGD step of packed DPO == the stock class, pair by pair, unpacked
# ----------------------------------------------------------------------------------------------

CASES = {
    "sigmoid": dict(loss="sigmoid", beta=0.5),
    "sigmoid-sft-smoothing": dict(loss="sigmoid", beta=0.5, smoothing=0.1, sft_weight=0.7),
    "simpo": dict(loss="simpo", beta=2.0, gamma=0.3),
    "simpo-sft": dict(loss="simpo", beta=2.0, gamma=0.3, sft_weight=0.5),
    "ipo": dict(loss="ipo", beta=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_equals_the_stock_class_pair_by_pair(tmp_path, llama_dir, case):  # noqa: F811
    dpo = CASES[case]
    data = write_pair_task(tmp_path / "pairs", llama_dir, n=10, max_length=64)
    packs = PairPackDataset(data)
    assert 10 > len(packs) and packs.num_pairs == 10  # several pairs per pack
    lr = 2.0
    trainer = run(llama_dir, data, tmp_path / "out", *EXACT, "--learning_rate", lr, "--per_device_train_batch_size",
                  1, "--gradient_accumulation_steps", len(packs), "--loss_chunk_size", 7, *dpo_argv(**dpo))
    want, loss, metrics = stock_sgd_step(llama_dir, data, lr, **dpo)
    rel_w, rel_u = weight_errors(llama_dir, tmp_path / "out", want)
    assert rel_w < 1e-5 and rel_u < 1e-3, (rel_w, rel_u)
    (log,) = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert abs(log["loss"] - loss) < 1e-5
    for k, v in metrics.items():
        assert abs(log[k] - v) < 1e-4 * max(1.0, abs(v)), (k, log[k], v)


@pytest.mark.parametrize("family", ["qwen3", "mistral", "glm4"])
def test_one_step_on_other_families(tmp_path, llama3_tokenizer_dir, family):
    """Every model class shares the packed forward: Qwen3 (tied embeddings) and Mistral (a sliding window shorter
    than the samples) against transformers' stock classes; GLM-4 (chatglm format, no stock class) against its own
    class run pair by pair, unpacked."""
    from longsft.tiny.models import make_tiny_model

    over = {"sliding_window": 8} if family == "mistral" else {}
    model_dir = make_tiny_model(tmp_path / "model", family, None if family == "glm4" else llama3_tokenizer_dir,
                                **over)
    data = write_pair_task(tmp_path / "pairs", model_dir, family, n=6, template=None if family == "glm4" else "auto")
    dpo = dict(loss="sigmoid", beta=0.5, sft_weight=0.5)
    packs = len(PairPackDataset(data))
    trainer = run(model_dir, data, tmp_path / "out", *EXACT, "--learning_rate", 2.0, "--gradient_accumulation_steps",
                  packs, *dpo_argv(**dpo))
    want, loss, _ = stock_sgd_step(model_dir, data, 2.0, stock=family != "glm4", **dpo)
    rel_w, rel_u = weight_errors(model_dir, tmp_path / "out", want)
    assert rel_w < 1e-5 and rel_u < 1e-3, (rel_w, rel_u)
    (log,) = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert abs(log["loss"] - loss) < 1e-5


def test_lora_reference_is_the_base_with_adapters_disabled(tmp_path, llama_dir):  # noqa: F811
    """With LoRA (B = 0 at the start) the reference is the base model: the first step's rewards are 0 and the loss
    log 2, as with a frozen copy; the trained adapter moves the policy."""
    data = write_pair_task(tmp_path / "pairs", llama_dir, n=6)
    trainer = run(llama_dir, data, tmp_path / "out", *EXACT, "--use_lora", "--lora_dropout", 0,
                  "--gradient_accumulation_steps", 4, "--stage", "dpo", "--dpo_beta", 0.5)
    (log,) = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert abs(log["loss"] - np.log(2)) < 1e-6 and log["rewards/margins"] == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# Collator and datasets
# ----------------------------------------------------------------------------------------------

def test_collator_marks_each_target_with_its_pair_sequence(tmp_path, llama_dir):  # noqa: F811
    data = write_pair_task(tmp_path / "pairs", llama_dir, shapes=[(3, 4, 2), (5, 3, 6)], max_length=64,
                           group_size=1)
    packs = PairPackDataset(data)
    assert len(packs) == 1
    batch = PairCollator()([packs[0], PairPackDataset.empty_item(packs[0])])
    seq = batch["dpo_sequence"][0]
    ids = batch["dpo_sample_ids"].tolist()
    assert sorted(ids) == [0, 1, 2, 3] and ids[0::2] == [i - 1 for i in ids[1::2]]  # (chosen, rejected) adjacent
    lengths = {0: 4, 1: 2, 2: 3, 3: 6}  # completion tokens of each sample
    assert batch["dpo_lengths"].tolist() == [lengths[i] for i in ids]
    assert torch.bincount(seq[seq >= 0]).tolist() == batch["dpo_lengths"].tolist()
    assert int(batch["dpo_num_pairs"]) == 2 and int(batch["dpo_chosen_targets"]) == lengths[0] + lengths[2]
    # the target of position t is the label at t + 1: never across a sample, never in the padding item
    cu = batch["attention_mask"].tolist()
    assert all(int(seq[e - 1]) == -1 for e in cu[1:])
    # sequence parallelism: the shards' slices together are the whole pack's, counts only on the first rank
    shards = [PairCollator(2, r, pad_token_id=0)([packs[0]]) for r in range(2)]
    whole = PairCollator()([packs[0]])
    cat = torch.cat([s["dpo_sequence"][0] for s in shards])
    assert torch.equal(cat[:whole["dpo_sequence"].shape[1]], whole["dpo_sequence"][0])
    assert [int(s["dpo_num_pairs"]) for s in shards] == [2, 0]
    # a validation set without packs: pair by pair
    pairs = PairDataset(data)
    assert len(pairs) == 2 and PairCollator()([pairs[1]])["dpo_sample_ids"].tolist() == [2, 3]


# ----------------------------------------------------------------------------------------------
# Settings and data: one error naming the problem
# ----------------------------------------------------------------------------------------------

def test_settings_are_checked_before_anything_loads(tmp_path, llama_dir):  # noqa: F811
    base = ["--model_name_or_path", str(llama_dir), "--train_file", "x", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="add --stage dpo"):
        train_main.parse_args(base + ["--dpo_beta", "0.2"])
    with pytest.raises(SystemExit) as e:
        train_main.parse_args(base + ["--stage", "dpo", "--dpo_beta", "0", "--pack_loss", "--dpo_loss", "simpo",
                                      "--precompute_ref_logps", "--dpo_label_smoothing", "0.6",
                                      "--batch_method", "sort"])
    msg = str(e.value)
    for part in ("--dpo_beta 0", "--pack_loss", "uses no reference", "--dpo_label_smoothing 0.6",
                 "--batch_method pack"):
        assert part in msg, part
    with pytest.raises(SystemExit, match="needs --dpo_loss simpo"):
        train_main.parse_args(base + ["--stage", "dpo", "--simpo_gamma", "1"])
    args = train_main.parse_args(base + ["--stage", "dpo"])[3]
    assert args.stage == "dpo" and train_main.parse_args(base + ["--stage", "dpo"])[1].batch_method == "pack"


def test_sft_data_for_dpo_and_pairs_for_sft_are_named(tmp_path, llama_dir):  # noqa: F811
    sft = write_task(tmp_path / "sft", llama_dir, "llama3", max_length=64)
    pairs = write_pair_task(tmp_path / "pairs", llama_dir)
    with pytest.raises(SystemExit, match="not preference pairs"):
        run(llama_dir, sft, tmp_path / "o1", "--stage", "dpo", "--max_steps", 1)
    with pytest.raises(SystemExit, match="train them with --stage dpo"):
        run(llama_dir, pairs, tmp_path / "o2", "--batch_method", "pack", "--max_steps", 1)


# ----------------------------------------------------------------------------------------------
# The reference: precomputed == a live reference model == (LoRA) the policy with adapters disabled
# ----------------------------------------------------------------------------------------------

def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in history(out) if "loss" in h and "train_loss" not in h]


def _two_steps(tmp_path, model_dir, data, name, *flags):
    out = tmp_path / name
    run(model_dir, data, out, "--optim", "sgd", "--learning_rate", 2.0, "--max_steps", 2, "--lr_scheduler_type",
        "constant", "--max_grad_norm", 0, "--gradient_accumulation_steps", 2, "--stage", "dpo", "--dpo_beta", 0.5,
        "--validation_file", data, "--eval_strategy", "steps", "--eval_steps", 2, *flags)
    h = history(out)
    return _losses(out), [e["eval_loss"] for e in h if "eval_loss" in e], out


def _same_weights(a: Path, b: Path, name: str = "model.safetensors") -> float:
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    return max(((wa[k] - wb[k]).norm() / wa[k].norm()).item() for k in wa)


def test_precomputed_reference_equals_the_live_reference_model(tmp_path, llama_dir):  # noqa: F811
    """Full fine-tuning: a frozen copy, --ref_model (a copy of the folder elsewhere) and --precompute_ref_logps give
    the same second-step loss (the reference matters once the policy moved) and weights; a different --ref_model,
    live or precomputed, changes them and is the same either way. The stored log-probs are reused."""
    data = write_pair_task(tmp_path / "pairs", llama_dir, n=8)
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(llama_dir, copy)
    other = tmp_path / "other"
    shutil.copytree(llama_dir, other)
    w = load_file(str(other / "model.safetensors"))
    from safetensors.torch import save_file
    torch.manual_seed(1)
    save_file({k: v + 0.02 * torch.randn_like(v) for k, v in w.items()}, str(other / "model.safetensors"))

    frozen = _two_steps(tmp_path, llama_dir, data, "frozen")
    live = _two_steps(tmp_path, llama_dir, data, "ref_model", "--ref_model", copy)
    pre = _two_steps(tmp_path, llama_dir, data, "precomputed", "--precompute_ref_logps")
    assert (data / "ref_logps" / "logps.bin").is_file()
    for got in (live, pre):
        assert np.allclose(got[0], frozen[0], atol=1e-6, rtol=0) and np.allclose(got[1], frozen[1], atol=1e-6)
        assert _same_weights(frozen[2], got[2]) < 1e-6
    other_live = _two_steps(tmp_path, llama_dir, data, "other_live", "--ref_model", other)
    other_pre = _two_steps(tmp_path, llama_dir, data, "other_pre", "--ref_model", other, "--precompute_ref_logps")
    assert abs(other_live[0][0] - frozen[0][0]) > 1e-3  # another reference: another loss from step 1 on
    assert np.allclose(other_pre[0], other_live[0], atol=1e-6) and np.allclose(other_pre[1], other_live[1], atol=1e-6)
    assert _same_weights(other_live[2], other_pre[2]) < 1e-6
    # the stored log-probs are the last reference's; the initial model's are computed again, then read back
    again = _two_steps(tmp_path, llama_dir, data, "again", "--precompute_ref_logps")
    assert np.allclose(again[0], pre[0], atol=1e-9)


def test_lora_reference_three_ways(tmp_path, llama_dir):  # noqa: F811
    """LoRA: the adapters disabled live, precomputed with them disabled, and --ref_model = the base folder agree."""
    data = write_pair_task(tmp_path / "pairs", llama_dir, n=8)
    lora = ["--use_lora", "--lora_dropout", 0, "--lora_r", 4]
    live = _two_steps(tmp_path, llama_dir, data, "adapters", *lora)
    pre = _two_steps(tmp_path, llama_dir, data, "precomputed", *lora, "--precompute_ref_logps")
    ref = _two_steps(tmp_path, llama_dir, data, "ref_model", *lora, "--ref_model", llama_dir)
    for got in (pre, ref):
        assert np.allclose(got[0], live[0], atol=1e-6) and np.allclose(got[1], live[1], atol=1e-6)
        assert _same_weights(live[2], got[2], "adapter_model.safetensors") < 1e-6
    assert live[0][1] != live[0][0]  # the adapter moved between the steps


@pytest.mark.parametrize("reference", ["stored", "deleted", "frozen-copy"])
def test_resume_logs_the_same_losses(tmp_path, llama_dir, reference):  # noqa: F811
    """A run resumed from its step-1 checkpoint logs the uninterrupted run's later losses: with the precomputed
    reference read back, with it deleted (so computed again from the initial weights, not the checkpoint's), and with
    a live frozen copy of the initial model."""
    import shutil
    data = write_pair_task(tmp_path / "pairs", llama_dir, n=8)
    common = ["--optim", "sgd", "--learning_rate", 2.0, "--max_steps", 3, "--lr_scheduler_type", "constant",
              "--stage", "dpo", "--dpo_beta", 0.5, "--dpo_sft_weight", 0.2]
    common += ["--precompute_ref_logps"] if reference != "frozen-copy" else []
    run(llama_dir, data, tmp_path / "full", *common, "--save_strategy", "steps", "--save_steps", 1)
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-1", tmp_path / "cut" / "checkpoint-1")
    if reference == "deleted":
        shutil.rmtree(data / "ref_logps")
    run(llama_dir, data, tmp_path / "cut", *common, "--resume_from_checkpoint", "true")
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert len(full) == len(resumed) == 3 and max(abs(a - b) for a, b in zip(full, resumed)) < 1e-6
    assert (data / "ref_logps" / "logps.bin").is_file() == (reference != "frozen-copy")
