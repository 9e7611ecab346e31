"""Training on CPU with tiny models: main.py end to end, TrainerNoShuffle's exact loss, collators, LoRA, resume.

Multi-process (2 ranks) exactness is in test_distributed.py. Run: python -m pytest -q tests/train/test_run.py
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import main as train_main
from longsft.train import model as train_model
from longsft.data import sort_and_group
from longsft.data.storage import IGNORE_INDEX, TokenizedWriter
from longsft.train.batches import LMDataset, PackCollator, PaddedCollator, count_targets, make_collator
from patch import families
from longsft.tiny.models import make_tiny_model

# ----------------------------------------------------------------------------------------------
# Helpers: a tiny model per family and a learnable synthetic dataset
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, llama3_tokenizer_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama3"), "llama3", llama3_tokenizer_dir)


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory, glm4_tokenizer_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_glm4"), "glm4", glm4_tokenizer_dir)


def task_meta(model_dir: Path, family: str, template: str | None, max_length: int) -> dict:
    """meta.json of a dataset written directly, as pre_tokenize_* writes it (template: the family's name unless
    given)."""
    from longsft.data.pretokenize import token_info

    tok = train_model.load_tokenizer(str(model_dir), family)
    return {"model_family": family, "template": template or family, "max_length": max_length,
            "tokenizer": token_info(tok, tok.pad_token_id)}


def write_task(out: Path, model_dir: Path, family: str, n: int = 16, seed: int = 0, max_token: int | None = None,
               group: bool = True, max_length: int = 96, template: str | None = None,
               shapes: list[tuple[int, int]] | None = None) -> Path:
    """A learnable task: a random prompt (not supervised), then a reply that counts up from the prompt's last
    token. Written with TokenizedWriter (meta like pre_tokenize_*), then sort_and_group.py (packs + sort order).
    meta's template: `template`, else the family's name. `shapes`: the (prompt, reply) lengths of every sample
    (instead of n random ones)."""
    meta = task_meta(model_dir, family, template, max_length)
    rng = np.random.default_rng(seed)
    with TokenizedWriter(out, meta) as w:
        for i in range(n if shapes is None else len(shapes)):
            p, r = (int(rng.integers(3, 12)), int(rng.integers(4, 30))) if shapes is None else shapes[i]
            prompt = rng.integers(20, 100, size=p).tolist()
            reply = [(prompt[-1] + k) % 100 + 20 for k in range(1, r + 1)]
            if max_token is not None:
                reply[-1] = max_token
            w.add(prompt + reply, [IGNORE_INDEX] * p + reply)
        w.commit()
    if group:
        sort_and_group.main(["--train_file", str(out), "--max_length", str(max_length), "--group_size", "2"])
    return out


def run(model_dir, data, out, *extra, callbacks=None):
    argv = ["--model_name_or_path", str(model_dir), "--train_file", str(data), "--output_dir", str(out),
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--seed", "0", *map(str, extra)]
    return train_main.main(argv, callbacks=callbacks)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


EXACT = ["--optim", "sgd", "--learning_rate", "1.0", "--max_steps", "1", "--lr_scheduler_type", "constant",
         "--max_grad_norm", "0", "--weight_decay", "0"]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


# ----------------------------------------------------------------------------------------------
# Collators
# ----------------------------------------------------------------------------------------------

def _sample(ids, labels):
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def test_collators_padded_and_packed_agree():
    a = _sample([5, 6, 7, 8], [5, -100, 7, 8])  # the first label can never be a target: masked
    b = _sample([9, 10], [-100, -100])           # no target at all
    c = _sample([11, 12, 13], [-100, 12, 13])
    pad = PaddedCollator(pad_token_id=0, pack_loss=True)([a, b, c])
    assert pad["input_ids"].shape == (3, 4) and pad["attention_mask"].tolist()[1] == [1, 1, 0, 0]
    assert pad["labels"].tolist() == [[-100, -100, 7, 8], [-100] * 4, [-100, 12, 13, -100]]
    assert count_targets(pad) == (4, 2)
    w = pad["weights"]
    assert torch.allclose(w[0], torch.tensor([0, 0, .5, .5])) and w[1].sum() == 0
    assert torch.allclose(w[2], torch.tensor([0, .5, .5, 0]))

    # two "packs" (one made of plain samples), concatenated with merged cu_seqlens, no padding
    pack1 = {"input_ids": torch.tensor([5, 6, 7, 8, 9, 10]), "labels": torch.tensor([5, -100, 7, 8, -100, -100]),
             "attention_mask": torch.tensor([0, 4, 6], dtype=torch.int32)}
    packed = PackCollator(pack_loss=True)([pack1, c])
    assert packed["attention_mask"].tolist() == [0, 4, 6, 9] and packed["attention_mask"].dtype == torch.int32
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert packed["labels"].tolist() == [[-100, -100, 7, 8, -100, -100, -100, 12, 13]]
    assert count_targets(packed) == (4, 2)
    assert torch.allclose(packed["weights"], torch.tensor([[0, 0, .5, .5, 0, 0, 0, .5, .5]]))
    assert "weights" not in make_collator("pack", pack_loss=False)([c])
    with pytest.raises(ValueError, match="batch_method"):
        make_collator("random")


# ----------------------------------------------------------------------------------------------
# Arguments: config file + overrides
# ----------------------------------------------------------------------------------------------

def test_config_file_and_cli_overrides(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("model_name_or_path: /m\ntrain_file: /d\nbatch_method: pack\npack_loss: true\n"
                   "learning_rate: 1.0e-5\nlora_target_modules: [q_proj, v_proj]\noutput_dir: /o\n")
    m, d, lora, args = train_main.parse_args([str(cfg), "--learning_rate", "2e-5", "--batch_method", "sort"])
    assert (m.model_name_or_path, d.train_file, d.pack_loss) == ("/m", "/d", True)
    assert d.batch_method == "sort" and args.learning_rate == 2e-5  # the flag wins over the file
    assert lora.lora_target_modules == "q_proj,v_proj" and args.output_dir == "/o"
    assert not args.bf16  # CPU: fp32
    js = tmp_path / "sft.json"
    js.write_text(json.dumps({"model_name_or_path": "/m", "per_device_train_batch_size": 3}))
    assert train_main.parse_args([str(js)])[3].per_device_train_batch_size == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: /m\nlearning_rat: 1\n")
    with pytest.raises(SystemExit, match="learning_rat"):
        train_main.parse_args([str(bad)])


def test_config_file_sets_sequence_parallel_size(tmp_path, monkeypatch):
    """sequence_parallel_size in a YAML config reaches DataArguments, and its checks run on it (the launcher's
    WORLD_SIZE: 4 processes); a flag still wins over the file."""
    ds = Path(__file__).resolve().parents[2] / "ds_config" / "stage3.json"
    cfg = tmp_path / "sp.yaml"
    cfg.write_text(f"model_name_or_path: /m\ntrain_file: /d\noutput_dir: /o\nbatch_method: pack\n"
                   f"deepspeed: {ds}\nsequence_parallel_size: 2\n")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train_main.parse_args([str(cfg)])[1].sequence_parallel_size == 2
    assert train_main.parse_args([str(cfg), "--sequence_parallel_size", "4"])[1].sequence_parallel_size == 4
    with pytest.raises(SystemExit, match="sequence_parallel_size 3: the 4 rank"):
        train_main.parse_args([str(cfg), "--sequence_parallel_size", "3"])
    cfg.write_text(cfg.read_text().replace("batch_method: pack", "batch_method: sort"))
    with pytest.raises(SystemExit, match="sequence_parallel_size 2 needs --batch_method pack"):
        train_main.parse_args([str(cfg)])


# ----------------------------------------------------------------------------------------------
# Each batch method trains; the output folder reloads
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,batch_method,pack_loss", [("llama3", "naive", False), ("llama3", "sort", True),
                                                           ("llama3", "pack", True), ("glm4", "pack", False)])
def test_batch_method_trains_and_loss_falls(tmp_path, request, family, batch_method, pack_loss):
    model_dir = request.getfixturevalue("llama_dir" if family == "llama3" else "glm_dir")
    if family == "glm4":  # the hub-like folder ships remote code (auto_map): it must never run without the flag
        model_dir = Path(shutil.copytree(model_dir, tmp_path / "model"))
        for py in model_dir.glob("*.py"):
            py.write_text("raise RuntimeError('remote code was executed')\n")
    data = write_task(tmp_path / "data", model_dir, family)
    val = write_task(tmp_path / "val", model_dir, family, n=6, seed=1, group=False)
    extra = ["--pack_loss"] if pack_loss else []
    trainer = run(model_dir, data, tmp_path / "out", "--batch_method", batch_method, "--validation_file", val,
                  "--per_device_train_batch_size", 1 if batch_method == "pack" else 4, "--per_device_eval_batch_size",
                  3, "--max_steps", 16, "--learning_rate", 1e-2, "--warmup_steps", 0, *extra)
    curve = losses(trainer)
    assert len(curve) == 16
    assert np.mean(curve[-3:]) < 0.8 * np.mean(curve[:2]), curve
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and evals[-1]["eval_loss"] < curve[0]
    assert evals[-1]["eval_sequences" if pack_loss else "eval_targets"] > 0

    out = tmp_path / "out"
    settings = json.loads((out / train_main.SETTINGS_FILE).read_text())
    assert settings["data"]["batch_method"] == batch_method and settings["resolved"]["world_size"] == 1
    model_type = train_model.read_model_type(str(out))
    model = train_model.model_class(model_type).from_pretrained(out)  # the saved folder reloads as it was
    fam = train_model.model_family(str(out))
    assert fam.name == family == train_model.model_family(str(model_dir)).name  # the saved folder: same family
    assert settings["resolved"]["model_family"] == family
    tok = train_model.load_tokenizer(str(out), fam)
    assert len(tok) == len(train_model.load_tokenizer(str(model_dir), fam))
    sample = LMDataset(data)[0]
    with torch.no_grad():
        loss = model(input_ids=sample["input_ids"][None], labels=sample["labels"][None]).loss
    assert torch.isfinite(loss)


CHAT = [{"messages": [{"role": "user", "content": f"Count on from {n}."},
                      {"role": "assistant", "content": " ".join(str(n + k) for k in range(1, 13))},
                      {"role": "user", "content": "And back?"},
                      {"role": "assistant", "content": " ".join(str(n - k) for k in range(1, 9))}]}
        for n in range(20, 44)]


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3", "llama2"])
def test_chat_data_to_trained_model(tmp_path, request, family):
    """LongAlign's families end to end: chat records -> pre_tokenize.py (the family's default template) ->
    sort_and_group.py -> main.py, packed with the per-sequence loss; the loss falls and the model reloads."""
    import pre_tokenize

    model_dir = make_tiny_model(tmp_path / "model", family, request.getfixturevalue(f"{family}_tokenizer_dir"))
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    data = tmp_path / "data"
    rep = pre_tokenize.main(["--model_name_or_path", str(model_dir), "--input", str(src), "--output_dir", str(data),
                             "--num_proc", "1"])
    assert rep["samples_kept"] == len(CHAT) and json.loads((data / "meta.json").read_text())["template"] == family
    sort_and_group.main(["--train_file", str(data), "--max_length", "512", "--group_size", "2"])
    trainer = run(model_dir, data, tmp_path / "out", "--batch_method", "pack", "--pack_loss",
                  "--per_device_train_batch_size", 1, "--max_steps", 12, "--learning_rate", 1e-2, "--warmup_steps", 0)
    curve = losses(trainer)
    assert len(curve) == 12 and np.mean(curve[-3:]) < 0.8 * np.mean(curve[:2]), curve
    out = tmp_path / "out"
    fam = train_model.model_family(str(out))
    assert fam.name == family and json.loads((out / train_main.SETTINGS_FILE).read_text())["resolved"][
        "model_family"] == family
    model = train_model.model_class(train_model.read_model_type(str(out))).from_pretrained(out)
    sample = LMDataset(data)[0]
    with torch.no_grad():
        loss = model(input_ids=sample["input_ids"][None], labels=sample["labels"][None]).loss
    assert torch.isfinite(loss) and loss.item() < curve[0]


# ----------------------------------------------------------------------------------------------
# Exactness: one SGD step, packed vs padded, token mean and pack loss, accumulation included
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pack_loss", [False, True])
def test_pack_and_naive_give_the_same_step(tmp_path, llama_dir, pack_loss):
    data = write_task(tmp_path / "data", llama_dir, "llama3", n=10)
    num_packs = len(__import__("dataset").LMPackDataset(data))
    assert num_packs >= 2
    extra = EXACT + (["--pack_loss"] if pack_loss else [])
    naive = run(llama_dir, data, tmp_path / "naive", "--batch_method", "naive", "--per_device_train_batch_size",
                10, *extra)
    # packs one per micro-batch, accumulated over the step
    pack = run(llama_dir, data, tmp_path / "pack", "--batch_method", "pack", "--per_device_train_batch_size", 1,
               "--gradient_accumulation_steps", num_packs, *extra)
    # sorted batching, two micro-batches of 5 padded samples
    sort = run(llama_dir, data, tmp_path / "sort", "--batch_method", "sort", "--per_device_train_batch_size", 5,
               "--gradient_accumulation_steps", 2, *extra)
    assert max_weight_diff(tmp_path / "naive", tmp_path / "pack") < 1e-6
    assert max_weight_diff(tmp_path / "naive", tmp_path / "sort") < 1e-6
    assert abs(losses(naive)[0] - losses(pack)[0]) < 1e-5 and abs(losses(naive)[0] - losses(sort)[0]) < 1e-5
    # and the step really moved the weights
    assert max_weight_diff(tmp_path / "naive", Path(llama_dir)) > 1e-4


def test_pack_loss_is_the_sequence_mean(tmp_path, llama_dir):
    """The logged step loss equals (1/S) sum_i mean CE_i computed sample by sample with the plain model."""
    data = write_task(tmp_path / "data", llama_dir, "llama3", n=6)
    trainer = run(llama_dir, data, tmp_path / "o", "--batch_method", "pack", "--pack_loss", "--max_steps", 1,
                  "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--learning_rate", 0.0)
    model = train_model.model_class("llama").from_pretrained(llama_dir)
    per_sample = []
    with torch.no_grad():
        for i in range(6):
            s = LMDataset(data)[i]
            per_sample.append(model(input_ids=s["input_ids"][None], labels=s["labels"][None]).loss.item())
    assert abs(losses(trainer)[0] - float(np.mean(per_sample))) < 1e-5


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------

def test_lora_trains_saves_adapter_and_merged_model(tmp_path, llama_dir):
    data = write_task(tmp_path / "data", llama_dir, "llama3")
    out = tmp_path / "lora"
    trainer = run(llama_dir, data, out, "--batch_method", "pack", "--use_lora", "--lora_r", 4, "--lora_alpha", 8,
                  "--lora_dropout", 0.0, "--learning_rate", 2e-2, "--max_steps", 12, "--save_merged_model")
    curve = losses(trainer)
    assert np.mean(curve[-3:]) < np.mean(curve[:2]) - 0.3, curve  # adapters only: slower than a full fine-tune
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == set(families.family("llama3").lora_targets) and cfg["r"] == 4
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    settings = json.loads((out / train_main.SETTINGS_FILE).read_text())["resolved"]
    assert 0 < settings["trainable_parameters"] < settings["parameters"] / 2

    from peft import PeftModel
    cls = train_model.model_class("llama")
    merged = cls.from_pretrained(out / "merged")
    with_adapter = PeftModel.from_pretrained(cls.from_pretrained(llama_dir), out)
    ids = LMDataset(data)[0]["input_ids"][None]
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
        base = cls.from_pretrained(llama_dir)(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, base, atol=1e-4)
    assert (out / "merged" / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------

class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_logs_the_same_losses(tmp_path, llama_dir):
    # naive: shuffled with the seed, 8 samples / 2 per step = 4 steps per epoch; stop mid-epoch, cross an epoch
    data = write_task(tmp_path / "data", llama_dir, "llama3", n=8, group=False)
    common = ["--batch_method", "naive", "--per_device_train_batch_size", 2, "--max_steps", 6, "--learning_rate",
              5e-3, "--save_strategy", "steps", "--save_steps", 3]
    full = losses(run(llama_dir, data, tmp_path / "full", *common))
    first = losses(run(llama_dir, data, tmp_path / "cut", *common, callbacks=[StopAt(3)]))
    assert (tmp_path / "cut" / "checkpoint-3").is_dir() and len(first) == 3
    resumed = run(llama_dir, data, tmp_path / "cut", *common, "--resume_from_checkpoint", "true")
    again = losses(resumed)
    assert len(again) == 6
    np.testing.assert_allclose(again, full, rtol=0, atol=1e-6)
    np.testing.assert_allclose(first, full[:3], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Data checks before training
# ----------------------------------------------------------------------------------------------

def test_bad_data_fails_with_one_message(tmp_path, llama_dir):
    rows = train_model.vocab_rows(transformers.AutoConfig.from_pretrained(llama_dir))
    big = write_task(tmp_path / "big", llama_dir, "llama3", n=4, max_token=rows + 5, group=False)
    nopacks = write_task(tmp_path / "nopacks", llama_dir, "llama3", n=4, group=False)
    with pytest.raises(SystemExit) as e:
        run(llama_dir, nopacks, tmp_path / "o", "--batch_method", "pack", "--validation_file", big)
    msg = str(e.value)
    assert f"--train_file {nopacks}" in msg and "sort_and_group.py" in msg
    assert f"--validation_file {big}" in msg and f"token id {rows + 5}" in msg and "re-run pre_tokenize" in msg

    glm_family = write_task(tmp_path / "glm", llama_dir, "llama3", n=4, group=False)
    meta = json.loads((glm_family / "meta.json").read_text())
    meta["model_family"] = "glm4"
    (glm_family / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="pre_tokenize_llama3.py"):
        run(llama_dir, glm_family, tmp_path / "o2", "--batch_method", "naive")


def test_warmup_fraction_never_trains_a_step_at_lr_0(tmp_path):
    """--warmup_steps 0.03 (the scripts' WARMUP): rounded down, and 1 step of warmup is none, so a short run's step 1
    trains (transformers' linear warmup gives its first step lr 0; ceil(0.03 x 20) = 1 wasted it)."""
    args = train_main.parse_args(["--output_dir", str(tmp_path), "--warmup_steps", "0.03"])[3]
    assert [args.get_warmup_steps(n) for n in (20, 33, 40, 66, 67, 1000)] == [0, 0, 0, 0, 2, 30]
    assert train_main.parse_args(["--output_dir", str(tmp_path), "--warmup_steps", "1"])[3].get_warmup_steps(20) == 1
    args = train_main.parse_args(["--output_dir", str(tmp_path), "--warmup_steps", "0.03", "--learning_rate", "1e-3",
                                  "--lr_scheduler_type", "cosine"])[3]
    from transformers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(20),
                          num_training_steps=20)
    assert sched.get_last_lr()[0] == 1e-3  # the learning rate of step 1
