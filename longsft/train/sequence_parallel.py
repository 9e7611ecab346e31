"""Sequence parallelism (DeepSpeed Ulysses) for packed batches: N ranks share each pack, the loss stays exact.

    deepspeed --num_gpus 8 main.py ... --batch_method pack --deepspeed ds_config/stage3.json --sequence_parallel_size 4
    SP_SIZE=4 bash scripts/glm4_longwriter.sh                      # the launch scripts pass SP_SIZE on
    # tiny CPU run (2 processes, gloo): see tests/train/test_sequence_parallel.py

How a pack is split. The world is cut into groups of N consecutive ranks (DeepSpeed's layout: ranks
[g*N, (g+1)*N) form SP group g); the data-parallel size is world / N. All ranks of a group get the same pack
(`sp_order`: each data-parallel rank's batch is repeated N times, so accelerate's own per-rank sharding hands it
to the N ranks of the group). `SequenceParallelCollator` builds the pack as PackCollator does, shifts its targets
(and --pack_loss weights) over the WHOLE pack, pads it to a multiple of N with one target-free segment, and keeps
rank r's contiguous slice [r*L/N, (r+1)*L/N): a target at a shard's end is the next shard's first token, and no
target crosses a sample boundary. The model then sees a [1, L/N] shard with the pack's global boundaries as
transformers' `cu_seq_lens_q/k`, `max_length_q/k`; DeepSpeed's `UlyssesSPAttentionHF` wraps our registered
packed attention ("packed_varlen", all three backends): an all-to-all turns the sequence shard of every head
into the whole pack for heads/N heads, our varlen attention runs with the global cu_seqlens (samples never
attend across boundaries), and a second all-to-all returns the shard. Everything else (embeddings, MLP, norms,
the chunked loss) works on L/N tokens per rank: activation memory per rank is ~1/N of the pack's.

Exact loss. The loss of one step is sum over all targets of w_t CE_t / D with D counted once per target (token
mean) or once per sample (--pack_loss) however many ranks share it: every rank of a group knows the whole
pack's counts, and only SP rank 0 adds them to the step's all-reduce (`num_targets` / `num_sequences` of a
batch). Each rank returns its shard's sum / D, times `gradient_divisor`: what DeepSpeed divides the summed
gradients by. DeepSpeed sums gradients over all ranks and divides by world / N for ZeRO 0/1/2, but by the
world size on ZeRO-3's reduce-scatter path (its default), so the factor is read from the config; ZeRO-3 with
`reduce_scatter: false` mixes both paths and is refused. The logged loss is rescaled to the same meaning as
without SP (TrainerNoShuffle.training_step).

Heads. After the all-to-all every rank holds num_attention_heads / N query heads: N must divide the query heads,
and the key/value heads must be divisible by N or divide N (then DeepSpeed replicates them). GLM-4-9B (32 / 2)
and Llama-3.1-8B (32 / 8) allow N in {2, 4, 8, 16, 32}. `head_problems` says so before anything loads.

What runs where: on CPU (gloo) DeepSpeed's all-to-all and the whole path above run as they do on GPUs (the
tests launch 2 and 4 real processes); only the CUDA attention kernels behind "packed_varlen" differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longsft.data.storage import IGNORE_INDEX
from longsft.train.batches import PackCollator, count_targets
from patch.packed_attention import ATTN_IMPLEMENTATION, shift_targets
from longsft.train.deepspeed_checks import zero_stage

PACK_COUNT_KEYS = ("num_targets", "num_sequences")  # the batch's share of the step's normaliser (see module doc)


# ----------------------------------------------------------------------------------------------
# Layout and checks
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SPLayout:
    """Where this rank sits: `size` ranks share a pack; group `dp_rank` of `dp_size` groups; `rank` in the group."""
    size: int
    rank: int
    dp_size: int
    dp_rank: int

    @classmethod
    def of(cls, world_size: int, global_rank: int, size: int) -> "SPLayout":
        world_size, size = max(1, int(world_size)), max(1, int(size))
        if world_size % size:
            raise ValueError(f"--sequence_parallel_size {size} does not divide the {world_size} ranks")
        return cls(size=size, rank=global_rank % size, dp_size=world_size // size, dp_rank=global_rank // size)


def head_problems(config, size: int) -> list[str]:
    """DeepSpeed Ulysses' head rule for a model config (read as DeepSpeed reads it, from the text config)."""
    if size <= 1:
        return []
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    q = int(getattr(cfg, "num_attention_heads"))
    kv = int(getattr(cfg, "num_key_value_heads", None) or q)
    p = []
    if q % size:
        fits = divisors(q)[1:]
        p.append(f"--sequence_parallel_size {size}: the model has {q} attention heads, which {size} ranks cannot share "
                 f"(it must divide them): " + (f"use one of {fits}" if fits else
                                               "this model cannot use sequence parallelism; leave it at 1"))
    elif kv % size and size % kv:
        p.append(f"--sequence_parallel_size {size}: the model's {kv} key/value heads are neither divisible by {size} "
                 f"nor a divisor of it (DeepSpeed Ulysses' rule)")
    return p


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def gradient_divisor(deepspeed_config: dict, world_size: int, size: int) -> int:
    """What DeepSpeed (0.18-0.19) divides the gradients summed over all ranks by under sequence parallelism:
    world / size for ZeRO 0/1/2 (engine and stage_1_and_2 reduce over the sequence-data-parallel group and divide
    by dp = world / sp), the world size for ZeRO-3's reduce-scatter (reduce_scatter_coalesced pre-divides by the
    group size). tests/train/test_sequence_parallel.py checks both against one process."""
    return world_size if zero_stage(deepspeed_config or {}) == 3 else world_size // size


def configure_deepspeed(hf_deepspeed_config, layout: SPLayout, per_device: int, grad_acc: int) -> None:
    """Tell the DeepSpeed config (TrainingArguments.hf_deepspeed_config, shared with accelerate) about SP: its batch
    check then counts world / size data-parallel ranks. Called before the model loads (ZeRO-3 Init reads it)."""
    cfg = hf_deepspeed_config.config
    cfg["sequence_parallel_size"] = layout.size
    cfg["train_batch_size"] = per_device * grad_acc * layout.dp_size


# ----------------------------------------------------------------------------------------------
# DeepSpeed's Ulysses attention around ours
# ----------------------------------------------------------------------------------------------

def enable_ulysses(model, layout: SPLayout):
    """Wrap the registered packed attention with DeepSpeed's UlyssesSPAttentionHF (once per process) and hand its
    process groups to DeepSpeed (deepspeed.utils.groups.mpu, read by deepspeed.initialize). Returns the mpu."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from deepspeed.utils import groups

    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=ATTN_IMPLEMENTATION,
        sequence_parallel_size=layout.size, micro_batch_size=1, seq_length_is_variable=True)
    got = (mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank())
    if got != (layout.size, layout.rank):  # our sampler and collator assume DeepSpeed's contiguous groups
        raise RuntimeError(f"DeepSpeed's sequence-parallel groups (size, rank) {got} differ from {layout}")
    groups.mpu = mpu
    return mpu


# ----------------------------------------------------------------------------------------------
# Data: the order (every rank of a group gets the same packs) and the per-rank shard
# ----------------------------------------------------------------------------------------------

def sp_order(order: list[int], dp_size: int, size: int, per_device: int) -> list[int]:
    """The sampler order that makes accelerate's per-rank batch sharding give SP group g the batches data-parallel
    rank g would get without SP: every run of per_device items of a data-parallel rank, repeated `size` times.
    `order` has a multiple of dp_size * per_device items (TrainerNoShuffle pads it)."""
    out, step = [], dp_size * per_device
    for start in range(0, len(order), step):
        for d in range(dp_size):
            out += order[start + d * per_device: start + (d + 1) * per_device] * size
    return out


class SequenceParallelCollator:
    """`--batch_method pack --sequence_parallel_size N`: this rank's shard of the pack the N ranks of its group share.

    features: what PackCollator takes (the same on every rank of the group).
    -> {"input_ids": [1, L/N], "position_ids": [1, L/N] (per sample, as in the whole pack), "shift_labels": [1, L/N]
        (targets shifted over the whole pack), "weights": [1, L/N] aligned with shift_labels (pack_loss only),
        "cu_seq_lens_q"/"cu_seq_lens_k": int32 [n+1] the whole padded pack's boundaries, "max_length_q"/"_k": int,
        "num_targets"/"num_sequences": the whole pack's counts on SP rank 0, 0 on the others}
    L is the pack's length padded up to a multiple of N with one extra target-free segment of pad tokens."""

    def __init__(self, size: int, rank: int, pad_token_id: int, pack_loss: bool = False):
        if not 0 <= rank < size:
            raise ValueError(f"sequence-parallel rank {rank} outside [0, {size})")
        self.size, self.rank, self.pad_token_id, self.pack_loss = int(size), int(rank), int(pad_token_id), pack_loss
        self._pack = PackCollator(pack_loss=pack_loss)

    def __call__(self, features: list[dict]) -> dict:
        pack = self._pack(features)
        tokens, sequences = count_targets(pack)
        ids, pos, cu = pack["input_ids"][0], pack["position_ids"][0], pack["attention_mask"].long()
        # [L] each: the next token's label (and its weight), -100 at every sample's last token; the weight there is
        # the next sample's first token's, which is 0 (the collators never label a sample's first token)
        targets, tw = shift_targets(pack["labels"], pack.get("weights"), cu)
        pad = -ids.numel() % self.size
        if pad:  # one more segment: pad tokens attending only to themselves, no targets, weight 0
            ids = torch.cat([ids, torch.full((pad,), self.pad_token_id, dtype=ids.dtype)])
            pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype)])
            targets = torch.cat([targets, torch.full((pad,), IGNORE_INDEX, dtype=targets.dtype)])
            tw = None if tw is None else torch.cat([tw, torch.zeros(pad, dtype=tw.dtype)])
            cu = torch.cat([cu, cu[-1:] + pad])
        shard = ids.numel() // self.size
        sl = slice(self.rank * shard, (self.rank + 1) * shard)
        cu32 = cu.to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        first = self.rank == 0
        batch = {"input_ids": ids[sl][None].clone(), "position_ids": pos[sl][None].clone(),
                 "shift_labels": targets[sl][None].clone(),
                 "cu_seq_lens_q": cu32, "cu_seq_lens_k": cu32, "max_length_q": max_len, "max_length_k": max_len,
                 "num_targets": torch.tensor(tokens if first else 0), "num_sequences": torch.tensor(sequences if first
                                                                                                  else 0)}
        if tw is not None:
            batch["weights"] = tw[sl][None].clone()
        return batch
