"""The peer as a cross-check: TRL's DPOTrainer (trl 1.16, installed for the tests only; requirements.txt) on the same
pairs and model gives the tokens, the step-1 loss, the logged rewards/logps and the SGD step our packed DPO gives;
SimPO and conservative DPO equal TRL's CPOTrainer loss function.

TRL tokenizes the conversational pairs itself (apply_chat_template of the prompt with the generation prompt, and of
prompt + completion): with the Llama-3.1 chat template (a reply ends with <|eot_id|> and nothing after it) its
prompt_ids / chosen_ids / rejected_ids are our shared prompt and completions token for token. TRL's DPOConfig
defaults to bf16 (autocast on CPU): bf16=False here. The reference is another model (perturbed weights), so the
step-1 loss is not log 2.

Run: python -m pytest -q tests/train/test_dpo_trl.py
"""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import pre_tokenize
from longsft.data import sort_and_group
from longsft.data.storage import IGNORE_INDEX, TokenizedData
from longsft.tiny.models import make_tiny_model
from longsft.train import dpo as dpo_lib
from tests.records import write_jsonl
from tests.train.test_run import EXACT, run

trl = pytest.importorskip("trl")

RECORDS = [{"prompt": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
            "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
            "rejected": [{"role": "assistant", "content": f"Maybe {3 * i + 1}, I guess{'.' * i}"}]} for i in range(6)]


@pytest.fixture(scope="module")
def task(tmp_path_factory, chat_tokenizer_dir):
    """(policy folder, reference folder, our packed pairs of RECORDS): a tiny Llama with the Llama-3.1 template."""
    root = tmp_path_factory.mktemp("trl")
    model = make_tiny_model(root / "model", "llama3", chat_tokenizer_dir("llama3"))
    ref = make_tiny_model(root / "ref", "llama3", chat_tokenizer_dir("llama3"))
    w = load_file(str(model / "model.safetensors"))
    torch.manual_seed(1)
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in w.items()}, str(ref / "model.safetensors"))
    data = root / "pairs"
    pre_tokenize.main(["--model_name_or_path", str(model), "--input", str(write_jsonl(root / "pairs.jsonl", RECORDS)),
                       "--output_dir", str(data), "--num_proc", "1", "--no_shuffle", "--stage", "dpo", "--template",
                       "auto"])
    sort_and_group.main(["--train_file", str(data), "--max_length", "256", "--group_size", "1"])
    return model, ref, data


def trl_step(model_dir, ref_dir, out, lr: float, **config):
    """One SGD step of TRL's DPOTrainer over all pairs in one batch: (trainer, its step-1 log)."""
    from datasets import Dataset

    policy = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=len(RECORDS), max_steps=1, learning_rate=lr,
                         optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                         logging_steps=1, report_to="none", save_strategy="no", bf16=False, use_cpu=True,
                         max_length=None, seed=0, **config)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(RECORDS),
                             processing_class=tok)
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    return trainer, log


# (TRL config, our flags)
CASES = {
    "sigmoid": (dict(beta=0.5, loss_type=["sigmoid"]), ["--dpo_beta", 0.5]),
    "sigmoid-sft": (dict(beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.4]),
                    ["--dpo_beta", 0.5, "--dpo_sft_weight", 0.4]),
    "ipo": (dict(beta=0.5, loss_type=["ipo"]), ["--dpo_beta", 0.5, "--dpo_loss", "ipo"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tokens_step_one_loss_and_step_equal_trl(tmp_path, task, case):
    model, ref, data = task
    config, flags = CASES[case]
    lr = 1.0
    trainer, want = trl_step(model, ref, tmp_path / "trl", lr, **config)
    # the same tokens: TRL's prompt / completions are our shared prompt and the two completions
    pairs = TokenizedData(data)
    tokenized = sorted(trainer.train_dataset, key=lambda r: r["prompt"][0]["content"])
    for p, row in enumerate(tokenized):
        (ci, cl), (ri, rl) = pairs.sample(2 * p), pairs.sample(2 * p + 1)
        n = int(np.argmax(cl != IGNORE_INDEX))
        assert ci[:n].tolist() == row["prompt_ids"] == ri[:n].tolist()
        assert ci[n:].tolist() == row["chosen_ids"] and ri[n:].tolist() == row["rejected_ids"]
        assert (cl[n:] != IGNORE_INDEX).all() and (rl[n:] != IGNORE_INDEX).all()
    # our packed run: one optimizer step over every pack
    packs = int(json.loads((data / "packs" / "meta.json").read_text())["num_packs"])
    ours = run(model, data, tmp_path / "ours", *EXACT, "--learning_rate", lr, "--gradient_accumulation_steps", packs,
               "--stage", "dpo", "--ref_model", ref, *flags)
    (got,) = [h for h in ours.state.log_history if "loss" in h and "train_loss" not in h]
    assert abs(got["loss"] - want["loss"]) < 1e-5 and abs(want["loss"] - np.log(2)) > 1e-3
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected"):
        assert abs(got[k] - want[k]) < 1e-4 * max(1.0, abs(want[k])), (k, got[k], want[k])
    theirs = {k: v.detach() for k, v in trainer.model.named_parameters()}
    mine = load_file(str(tmp_path / "ours" / "model.safetensors"))
    init = load_file(str(model / "model.safetensors"))
    rel = max(((mine[k] - theirs[k]).norm() / (theirs[k] - init[k]).norm()).item() for k in mine
              if (theirs[k] - init[k]).norm() > 0)
    assert rel < 1e-3, rel  # the update itself, relative to its size


@pytest.mark.parametrize("loss,smoothing", [("simpo", 0.0), ("simpo", 0.2), ("sigmoid", 0.2)])
def test_simpo_and_conservative_dpo_equal_trl_cpo_loss(loss, smoothing):
    """TRL's CPOTrainer.cpo_loss (SimPO with cpo_alpha 0; its sigmoid with label smoothing on log-ratios is
    conservative DPO) on the same per-sequence log-probs."""
    from trl.experimental.cpo import CPOTrainer

    torch.manual_seed(0)
    policy = -torch.rand(8, dtype=torch.float64) * 40
    reference = -torch.rand(8, dtype=torch.float64) * 40
    lengths = torch.randint(3, 30, (8,))
    beta, gamma = 2.0, 0.7
    losses, rc, rj = dpo_lib.pair_terms(policy, None if loss == "simpo" else reference, lengths, loss, beta,
                                        smoothing, gamma)
    if loss == "simpo":  # CPO's inputs are the length-averaged log-probs
        chosen, rejected = policy[0::2] / lengths[0::2], policy[1::2] / lengths[1::2]
    else:  # DPO's log-ratios in place of CPO's log-probs
        chosen, rejected = policy[0::2] - reference[0::2], policy[1::2] - reference[1::2]
    fake = types.SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=smoothing, loss_type=loss, alpha=0.0,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    want, want_c, want_r = CPOTrainer.cpo_loss(fake, chosen, rejected)
    assert torch.allclose(losses, want, atol=1e-12) and torch.allclose(rc, want_c) and torch.allclose(rj, want_r)
