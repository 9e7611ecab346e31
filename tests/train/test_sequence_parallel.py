"""Sequence parallelism (DeepSpeed Ulysses, longsft/train/sequence_parallel.py): N ranks sharing each pack train exactly as one
process running the same packs whole.

What ran where: everything here runs on CPU. The multi-process tests launch 2 or 4 real processes (torchrun, gloo)
through main.py with DeepSpeed ZeRO-2/3: DeepSpeed's own UlyssesSPAttentionHF does its all-to-all over gloo around
our packed attention (its SDPA backend; the CUDA kernels behind it are the only part that differs on GPUs), the
sampler, collator, normaliser and gradient scale are the ones a GPU run uses. The unit tests check the shard
layout and the data order without processes.
Run: python -m pytest -q tests/train/test_sequence_parallel.py  (the launches are marked slow: ~3 minutes on 2 cores)
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from safetensors.torch import load_file
from torch.utils.data import BatchSampler

import main as train_main
from longsft.train import model as train_model
from longsft.train import sequence_parallel as sp_lib
from longsft.train.deepspeed_checks import sequence_parallel_problems
from longsft.data.storage import IGNORE_INDEX
from longsft.train.batches import PackCollator, count_targets
from patch.packed_attention import shift_targets
from tests.train.test_run import EXACT, glm_dir, llama_dir, losses, run, write_task  # noqa: F401,F811 (fixtures)
from tests.train.test_distributed import eval_losses, launch_ranks
from longsft.tiny.models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]

# (prompt, reply) lengths: packed into 64-token packs by sort_and_group.py these give one pack holding a single
# 64-token sample (it spans every shard), one of two 32-token samples (their boundary is the SP-2 shard boundary),
# and packs of 2-3 samples whose lengths are odd (padded to a multiple of N)
SHAPES = [(8, 56), (6, 26), (5, 27), (4, 20), (10, 30), (3, 9), (7, 21), (9, 14), (5, 40), (6, 18), (4, 12), (8, 25)]


def _sample(n: int, prompt: int, start: int = 0) -> dict:
    ids = torch.arange(start, start + n)
    labels = ids.clone()
    labels[:prompt] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


# ----------------------------------------------------------------------------------------------
# The shard layout (no processes)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("lengths", [[32, 32], [64], [7, 30, 20], [5, 3]])
def test_shards_together_are_the_whole_shifted_pack(size, lengths):
    feats = [_sample(n, prompt=2, start=100 * i) for i, n in enumerate(lengths)]
    whole = PackCollator(pack_loss=True)(feats)
    targets, weights = shift_targets(whole["labels"], whole["weights"], whole["attention_mask"])
    shards = [sp_lib.SequenceParallelCollator(size, r, pad_token_id=7, pack_loss=True)(feats) for r in range(size)]
    total, pad = sum(lengths), -sum(lengths) % size
    cat = {k: torch.cat([s[k][0] for s in shards]) for k in ("input_ids", "position_ids", "shift_labels", "weights")}
    assert all(s["input_ids"].shape == (1, (total + pad) // size) for s in shards)
    assert torch.equal(cat["input_ids"][:total], whole["input_ids"][0])
    assert torch.equal(cat["position_ids"][:total], whole["position_ids"][0])
    assert torch.equal(cat["shift_labels"][:total], targets)  # the last target of a shard: next shard's first token
    real = targets != IGNORE_INDEX
    assert torch.equal(cat["weights"][:total][real], weights[real])
    # the padding: one more segment of pad tokens, positions from 0, no targets, weight 0
    assert torch.equal(cat["input_ids"][total:], torch.full((pad,), 7))
    assert torch.equal(cat["position_ids"][total:], torch.arange(pad))
    assert bool((cat["shift_labels"][total:] == IGNORE_INDEX).all()) and not cat["weights"][total:].any()
    cu = whole["attention_mask"].tolist() + ([total + pad] if pad else [])
    for s in shards:
        assert s["cu_seq_lens_q"].tolist() == cu and s["max_length_q"] == max(lengths)
    # every target and sample counted once: only SP rank 0 carries the pack's counts
    assert [count_targets(s) for s in shards] == [count_targets(whole)] + [(0, 0)] * (size - 1)
    # no target crosses a sample boundary: the last token of each sample predicts nothing
    assert bool((cat["shift_labels"][torch.tensor(cu[1:len(lengths) + 1]) - 1] == IGNORE_INDEX).all())


@pytest.mark.parametrize("dp,size,per_device", [(1, 2, 1), (2, 2, 1), (2, 2, 2), (1, 4, 1), (2, 4, 3)])
def test_sampler_gives_every_rank_of_a_group_the_same_packs(dp, size, per_device):
    """sp_order + accelerate's own per-rank batch sharding (what Trainer's accelerator.prepare uses)."""
    n = 6 * dp * per_device
    order = sp_lib.sp_order(list(range(n)), dp, size, per_device)
    world = dp * size
    batches = BatchSampler(order, batch_size=per_device, drop_last=False)
    seen = {r: [i for b in BatchSamplerShard(batches, num_processes=world, process_index=r) for i in b]
            for r in range(world)}
    layouts = [sp_lib.SPLayout.of(world, r, size) for r in range(world)]
    for r, lay in enumerate(layouts):
        assert seen[r] == seen[lay.dp_rank * size]  # the same packs as the group's first rank
    # the data-parallel groups together read every item once, as dp ranks without SP would
    assert sorted(i for g in range(dp) for i in seen[g * size]) == list(range(n))
    assert [seen[g * size][:per_device] for g in range(dp)] == [list(range(g * per_device, (g + 1) * per_device))
                                                                 for g in range(dp)]


def test_settings_and_heads_are_checked_before_anything_loads(tmp_path, llama_dir):  # noqa: F811
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3, "reduce_scatter": False}}))
    p = sequence_parallel_problems(3, 4, "sort", str(ds))
    assert any("multiple of it" in x for x in p) and any("--batch_method pack" in x for x in p)
    assert any("reduce_scatter" in x for x in p)
    assert any("--deepspeed" in x for x in sequence_parallel_problems(2, 2, "pack", None))
    assert sequence_parallel_problems(2, 4, "pack", str(ROOT / "ds_config" / "stage3.json")) == []
    assert sequence_parallel_problems(1, 3, "naive", None) == []
    cfg = train_model.model_class("llama").config_class.from_pretrained(llama_dir)  # 4 query heads, 2 kv heads
    assert sp_lib.head_problems(cfg, 2) == [] and sp_lib.head_problems(cfg, 4) == []  # kv replicated for 4
    (msg,) = sp_lib.head_problems(cfg, 8)
    assert "4 attention heads" in msg and "[2, 4]" in msg
    cfg.num_attention_heads, cfg.num_key_value_heads = 6, 3  # 6 % 2 == 0, but neither 3 % 2 nor 2 % 3
    assert "key/value heads" in sp_lib.head_problems(cfg, 2)[0]
    # main.py: one error naming the flag, exit status 2 through the CLI wrapper
    with pytest.raises(SystemExit, match="sequence_parallel_size 2 needs --batch_method pack"):
        train_main.parse_args(["--model_name_or_path", str(llama_dir), "--train_file", "x", "--output_dir",
                               str(tmp_path / "o"), "--sequence_parallel_size", "2", "--batch_method", "sort"])


def test_glm4_config_names_its_heads_for_deepspeed(glm_dir):  # noqa: F811
    cfg = train_model.model_class("chatglm").config_class.from_pretrained(glm_dir)
    assert (cfg.head_dim, cfg.num_key_value_heads) == (cfg.kv_channels, cfg.multi_query_group_num)
    assert "head_dim" not in cfg.to_dict() and "num_key_value_heads" not in cfg.to_dict()  # saved as upstream


# ----------------------------------------------------------------------------------------------
# Real launches: SP equals one process
# ----------------------------------------------------------------------------------------------

def weight_errors(init: Path, a: Path, b: Path, name: str = "model.safetensors") -> tuple[float, float]:
    """(max over tensors of |w_a - w_b| / |w_a|, the same relative to the update |w_a - w_init|). The first is the
    issue's measure; the second would be ~0.5 for a gradient scaled 1/2 (what an SP normaliser or divisor error
    gives) and is ~1e-5 at most from fp32 rounding of weights near 1 (norm weights) that move by ~1e-3."""
    w0, wa, wb = (load_file(str(d / name)) for d in (init, a, b))
    assert wa.keys() == wb.keys()
    rel_w = max(((wa[k] - wb[k]).norm() / wa[k].norm().clamp(min=1e-30)).item() for k in wa)
    rel_u = [((wa[k] - wb[k]).norm() / (wa[k] - w0[k]).norm()).item() for k in wa if (wa[k] - w0[k]).norm() > 0]
    assert rel_u
    return rel_w, max(rel_u)


def _task(tmp_path, request, family):
    if family in ("llama3", "glm4"):
        model_dir, template = request.getfixturevalue("llama_dir" if family == "llama3" else "glm_dir"), None
    else:  # transformers' own classes with the packed forward (patch/modeling_native.py)
        model_dir = make_tiny_model(tmp_path / "model", family, request.getfixturevalue("llama3_tokenizer_dir"))
        template = "auto"
    data = write_task(tmp_path / "data", model_dir, family, max_length=64, shapes=SHAPES, template=template)
    val = write_task(tmp_path / "val", model_dir, family, n=5, seed=1, max_length=64, template=template)
    return model_dir, data, val


# nproc, sp, zero stage, family, pack_loss, extra flags. One optimizer step over all 6 packs (one 64-token sample,
# a 32+32 pack, odd packs), accumulated on one process; SP ranks share each pack, DP groups split the packs.
CASES = {
    "sp2-llama-zero2-packloss": (2, 2, 2, "llama3", True, []),
    "sp2-glm4-zero2-tokenmean-lora-gc": (2, 2, 2, "glm4", False, ["--use_lora", "--lora_dropout", 0,  # dropout:
                                                                   "--gradient_checkpointing",  # other masks
                                                                   "--loss_chunk_size", 5]),
    "sp2dp2-llama-zero3-tokenmean": (4, 2, 3, "llama3", False, []),
    "sp2dp2-glm4-zero3-packloss": (4, 2, 3, "glm4", True, ["--loss_chunk_size", 5]),
    "sp4-llama-zero3-packloss-gc": (4, 4, 3, "llama3", True, ["--gradient_checkpointing", "--loss_chunk_size", 5]),
    # ZeRO-3 with parameters and optimizer states offloaded to the CPU (ds_config/stage3_offload.json with the
    # run's SGD instead of the file's AdamW, so the one-process run can do the same step)
    "sp2-llama-zero3offload-packloss": (2, 2, "3_offload", "llama3", True, []),
    # Mistral: a 32-token sliding window, applied per sample on the whole pack after the all-to-all
    "sp2-mistral-zero3-tokenmean": (2, 2, 3, "mistral", False, ["--loss_chunk_size", 5]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sequence_parallel_equals_one_process(tmp_path, request, case):
    nproc, size, stage, family, pack_loss, flags = CASES[case]
    model_dir, data, val = _task(tmp_path, request, family)
    steps = 6  # micro-batches of one pack in the one optimizer step
    extra = EXACT + ["--batch_method", "pack", "--per_device_train_batch_size", 1, "--validation_file", val,
                     "--learning_rate", 0.5, *flags] + (["--pack_loss"] if pack_loss else [])
    one = run(model_dir, data, tmp_path / "one", *extra, "--gradient_accumulation_steps", steps)
    dp = nproc // size
    ds_config = ROOT / "ds_config" / f"stage{stage}.json"
    if stage == "3_offload":
        cfg = json.loads(ds_config.read_text())
        cfg.pop("optimizer")
        cfg["zero_force_ds_cpu_optimizer"] = False  # let DeepSpeed offload a torch optimizer
        ds_config = tmp_path / "offload_sgd.json"
        ds_config.write_text(json.dumps(cfg))
    sp, log = launch_ranks(nproc, model_dir, data, tmp_path / "sp", *extra, "--gradient_accumulation_steps",
                           steps // dp, "--sequence_parallel_size", size,
                           "--deepspeed", ds_config)
    assert f"{dp} data-parallel group(s) x {size} ranks sharing each pack" in log
    name = "adapter_model.safetensors" if "--use_lora" in flags else "model.safetensors"
    init = tmp_path / "init"
    if "--use_lora" in flags:  # the adapter before training: B = 0, A as peft initialises it with the seed
        init.mkdir()
        from safetensors.torch import save_file
        w = load_file(str(tmp_path / "one" / name))
        save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in w.items()}, str(init / name))
    else:
        init = model_dir
    rel_weights, rel_update = weight_errors(init, tmp_path / "one", tmp_path / "sp", name)
    assert rel_weights < 1e-5 and rel_update < 1e-3
    assert len(sp) == 1 and abs(sp[0] - losses(one)[0]) < 1e-5  # the logged loss means the same
    state = json.loads((tmp_path / "sp" / "trainer_state.json").read_text())
    e1, e2 = eval_losses(one.state.log_history), eval_losses(state["log_history"])
    assert e1 and e2 and abs(e1[-1] - e2[-1]) < 1e-5  # evaluation: the same exact mean under SP


@pytest.mark.slow
def test_sequence_parallel_resume_logs_the_same_losses(tmp_path, llama_dir):  # noqa: F811
    """SP 2 with ZeRO-3: a run resumed from its step-1 checkpoint logs the later losses of the uninterrupted one."""
    data = write_task(tmp_path / "data", llama_dir, "llama3", max_length=64, shapes=SHAPES)
    common = ["--batch_method", "pack", "--pack_loss", "--per_device_train_batch_size", 1, "--max_steps", 3,
              "--learning_rate", 1e-2, "--sequence_parallel_size", 2, "--deepspeed", ROOT / "ds_config" / "stage3.json"]
    full, _ = launch_ranks(2, llama_dir, data, tmp_path / "full", *common, "--save_strategy", "steps",
                           "--save_steps", 1)
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-1", tmp_path / "cut" / "checkpoint-1")
    resumed, log = launch_ranks(2, llama_dir, data, tmp_path / "cut", *common, "--resume_from_checkpoint", "true")
    assert len(full) == 3 and len(resumed) == 3
    assert max(abs(a - b) for a, b in zip(full, resumed)) < 1e-6
