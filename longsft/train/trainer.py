"""`TrainerNoShuffle`: the transformers Trainer with a fixed data order and an exact loss on any GPU count.

    from longsft.train.trainer import TrainerNoShuffle
    trainer = TrainerNoShuffle(model=model, args=training_args, train_dataset=ds, data_collator=collator,
                               batch_method="pack", pack_loss=True, processing_class=tokenizer)
    trainer.train()

`main.py` builds it; see its docstring for the commands.

Data order. `pack` and `sort` datasets are already in training order (sort_and_group.py fixed it with
its seed), so they are read sequentially; `naive` is shuffled with `--data_seed` (else `--seed`) and
the epoch number. The order depends on nothing else, so a run resumed from a checkpoint sees exactly
the batches an uninterrupted run would. The dataset is padded to a multiple of (ranks x per-device
batch) with 1-token items that have no targets, so every rank gets the same number of batches and no
sample is repeated at the end of an epoch (accelerate would otherwise wrap around to the start).

Exact loss. transformers fetches all micro-batches of an optimizer step before running them
(`get_batch_samples`). We count, over those micro-batches and all ranks (one all-reduce):
    T = prediction targets            (token mean, the default)
    S = samples with at least one target  (`--pack_loss`, LongAlign Eq. 4)
and pass D = T or S to the model as `num_items_in_batch`; the model returns sum_t w_t CE_t / D with
w_t = 1 (token mean) or 1/N_i (pack loss, `weights` from the collator). DDP and DeepSpeed average
gradients over ranks and transformers does not divide by the accumulation steps when the loss is
already normalized over the step (`loss_is_scaled_for_ga`), so we multiply by the rank count. The
gradient of one step is then exactly that of
    (1/T) sum over all targets of the step of CE_t                  (token mean)
    (1/S) sum_i (1/N_i) sum_{t in i} CE_t                           (pack loss)
whatever the number of ranks, accumulation steps and per-device batch. The logged `loss` is the
all-rank mean of the per-rank sums, i.e. that same quantity, so it means the same on any GPU count.
Evaluation uses the same definitions summed over the whole validation set.

Sequence parallelism (`sequence_parallel=SPLayout`, longsft/train/sequence_parallel.py): N ranks share each pack. The data is
padded and ordered for the world / N data-parallel groups (each group's batch repeated N times so accelerate's
sharding gives it to all N ranks), only SP rank 0 adds a pack's counts to D, and the loss scale follows what
DeepSpeed divides the gradients by (sequence_parallel.gradient_divisor); the logged loss means the same as without.

Checkpoints. A checkpoint-N folder gets `save_complete.json` (longsft/train/checkpoints.py) only after every rank wrote
its files, so a save cut short never looks complete; `--save_total_limit` deletes only the checkpoints of
this run (its run_id, kept across resumes), never other checkpoint-* folders in --output_dir. A run resumed
at its last step trains nothing (transformers would run one more step).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
import transformers
from torch.utils.data import Dataset, Sampler

from longsft.atomic_dir import write_failures_reported
from longsft.train.checkpoints import (SETTINGS_FILE, choose_checkpoint, folder_bytes, mark_in_progress, new_run_id,
                                       read_marker, rotate_own_checkpoints, write_marker)
from longsft.data.storage import IGNORE_INDEX
from longsft.train.batches import count_targets
from longsft.train.sequence_parallel import PACK_COUNT_KEYS, SPLayout, sp_order

from longsft.train.settings import BATCH_METHODS  # noqa: E402,F401  (trainer.BATCH_METHODS, as before)


# ----------------------------------------------------------------------------------------------
# Data order: padding items and the sampler
# ----------------------------------------------------------------------------------------------

def _empty_item(item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 1-token item shaped like `item`, with no target: adds nothing to any loss or count."""
    out = {}
    for k, v in item.items():
        if k == "attention_mask":  # items carry cu_seqlens here (LMPackDataset); padding masks come later
            out[k] = torch.tensor([0, 1], dtype=v.dtype)
        elif k == "labels":
            out[k] = torch.full((1,), IGNORE_INDEX, dtype=v.dtype)
        elif k in ("weights", "position_ids"):
            out[k] = torch.zeros(1, dtype=v.dtype)
        else:
            out[k] = v[:1].clone()
    return out


class PaddedToMultiple(Dataset):
    """`dataset` followed by target-free 1-token items up to a multiple of `multiple` items."""

    def __init__(self, dataset: Dataset, multiple: int):
        self.dataset = dataset
        self.num_real = len(dataset)
        self.num_items = math.ceil(self.num_real / multiple) * multiple if self.num_real else 0
        empty = getattr(dataset, "empty_item", _empty_item)  # a dataset may say what its padding item is (pairs)
        self._empty = empty(dataset[0]) if self.num_real else None

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.dataset[i] if i < self.num_real else self._empty


class EpochSampler(Sampler):
    """Indices 0..num_real-1 in order (sort, pack) or shuffled with seed + epoch (naive), then the padding items.
    With `sequence_parallel` (and the per-device batch size), every data-parallel rank's batch comes
    sequence_parallel.size times in a row (sequence_parallel.sp_order)."""

    def __init__(self, num_real: int, num_items: int, shuffle: bool, seed: int,
                 sequence_parallel: SPLayout | None = None, per_device: int = 1):
        self.num_real, self.num_items, self.shuffle, self.seed = num_real, num_items, shuffle, seed
        self.sequence_parallel, self.per_device = sequence_parallel, per_device
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_items * (self.sequence_parallel.size if self.sequence_parallel else 1)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_real, generator=g).tolist()
        else:
            order = list(range(self.num_real))
        order += list(range(self.num_real, self.num_items))
        sp = self.sequence_parallel
        return iter(sp_order(order, sp.dp_size, sp.size, self.per_device) if sp and sp.size > 1 else order)


def planned_steps(num_items: int, world_size: int, per_device: int, grad_acc: int, max_steps: int,
                  num_train_epochs: float) -> int:
    """Optimizer steps the run will make, as transformers counts them for TrainerNoShuffle's padded data."""
    batches = math.ceil(num_items / (max(1, world_size) * per_device))  # per rank, after PaddedToMultiple
    per_epoch = max(batches // grad_acc + int(batches % grad_acc > 0), 1)
    return max_steps if max_steps > 0 else math.ceil(num_train_epochs * per_epoch)


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------

class TrainerNoShuffle(transformers.Trainer):
    """transformers.Trainer with the data order and the exact step loss described in the module docstring.

    Extra keyword arguments: batch_method ("naive" | "sort" | "pack"), pack_loss (bool), run_id (the run
    the checkpoints belong to; default: the resumed checkpoint's, else a new one), sequence_parallel (an SPLayout
    with size > 1, after sequence_parallel.enable_ulysses; its collator is SequenceParallelCollator). The model's
    forward must accept labels (or shift_labels), weights, pack_loss and num_items_in_batch (patch/ models do)."""

    # compute_loss returns a loss already normalized over the whole optimizer step
    loss_is_scaled_for_ga = True

    def __init__(self, *args, batch_method: str = "pack", pack_loss: bool = False, run_id: str | None = None,
                 sequence_parallel: SPLayout | None = None, gradient_divisor: int | None = None, **kwargs):
        if batch_method not in BATCH_METHODS:
            raise ValueError(f"batch_method {batch_method!r}: expected one of {BATCH_METHODS}")
        self.batch_method = batch_method
        self.pack_loss = pack_loss
        self.run_id = run_id
        self.sequence_parallel = sequence_parallel if sequence_parallel and sequence_parallel.size > 1 else None
        self.gradient_divisor = gradient_divisor  # what DeepSpeed divides summed gradients by (SP); default world
        super().__init__(*args, **kwargs)
        # every micro-batch must reach the model whole (cu_seqlens, weights): never drop "unused" columns
        self.args.remove_unused_columns = False
        self._eval_sums = None

    # ---- data -----------------------------------------------------------------------------------

    def _data_parallel_size(self) -> int:
        """Ranks that read different batches: all of them, or one per sequence-parallel group."""
        return self.sequence_parallel.dp_size if self.sequence_parallel else max(1, self.args.world_size)

    def _pad_for_ranks(self, dataset: Dataset, per_device: int) -> Dataset:
        if dataset is None or isinstance(dataset, PaddedToMultiple):
            return dataset
        return PaddedToMultiple(dataset, self._data_parallel_size() * per_device)

    def get_total_train_batch_size(self, args) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps * self._data_parallel_size()

    def get_train_dataloader(self):
        self.train_dataset = self._pad_for_ranks(self.train_dataset, self._train_batch_size)
        return super().get_train_dataloader()

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        num_real = ds.num_real if isinstance(ds, PaddedToMultiple) else len(ds)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSampler(num_real, len(ds), shuffle=self.batch_method == "naive", seed=seed,
                            sequence_parallel=self.sequence_parallel, per_device=self._train_batch_size)

    def get_eval_dataloader(self, eval_dataset=None):
        if eval_dataset is None or isinstance(eval_dataset, str):
            key = eval_dataset
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._pad_for_ranks(v, self.args.eval_batch_size)
                                     for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = self._pad_for_ranks(self.eval_dataset, self.args.eval_batch_size)
            return super().get_eval_dataloader(key)
        return super().get_eval_dataloader(self._pad_for_ranks(eval_dataset, self.args.eval_batch_size))

    def _get_eval_sampler(self, eval_dataset):
        return EpochSampler(len(eval_dataset), len(eval_dataset), shuffle=False, seed=0,
                            sequence_parallel=self.sequence_parallel, per_device=self.args.eval_batch_size)

    # ---- checkpoints: complete only when marked, rotation of our own only ----------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.run_id is None:
            resumed = read_marker(resume_from_checkpoint) if isinstance(resume_from_checkpoint, (str, Path)) else None
            self.run_id = (resumed or {}).get("run_id") or self._shared(new_run_id())
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _shared(self, value):
        """Rank 0's value on every rank."""
        if self.args.world_size > 1:
            from accelerate.utils import broadcast_object_list

            value = broadcast_object_list([value], from_process=0)[0]
        return value

    def _run_epoch(self, *args, **kwargs):
        if self.state.global_step >= self.state.max_steps:  # resumed at the last step: nothing left to train
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:  # until every rank is done, the folder is ours but not complete
            mark_in_progress(folder, kind="checkpoint", global_step=self.state.global_step, run_id=self.run_id)
        # transformers' rotation deletes any checkpoint-* folder in output_dir: ours runs after the marker
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            with self.save_failures_reported(f"saving {folder}", folder):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (ZeRO partitions, RNG states) are on disk
        if self.args.should_save:
            settings = run_dir / SETTINGS_FILE  # the run's settings travel with it (a resume checks its data order)
            if settings.is_file():
                shutil.copyfile(settings, folder / SETTINGS_FILE)
            write_marker(folder, kind="checkpoint", global_step=self.state.global_step,
                         max_steps=self.state.max_steps, run_id=self.run_id)
            rotate_own_checkpoints(run_dir, self.run_id, limit, keep=(self.state.best_model_checkpoint,))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if _internal_call:  # inside a checkpoint's save: _save_checkpoint reports a failure
            return super().save_model(output_dir, _internal_call)
        folder = Path(output_dir or self.args.output_dir)
        with self.save_failures_reported(f"saving the final output to {folder}", folder, final=True):
            return super().save_model(output_dir, _internal_call)

    def save_state(self):
        folder = Path(self.args.output_dir)
        with self.save_failures_reported(f"saving the trainer state to {folder}", folder, final=True):
            return super().save_state()

    def save_failures_reported(self, what: str, folder: Path, final: bool = False):
        """A context manager: a save that fails for disk reasons (full, file-size limit, read-only) stops the run
        with one message (errors.UserError): what failed, the space a save needs (the newest complete checkpoint's
        size, else the weights and optimizer states held now), what is intact and how to continue."""
        run_dir = Path(self.args.output_dir)

        def needed() -> int | None:
            if final:  # the weights (or adapter) and small files
                return self._state_bytes(optimizer=False)
            done, _ = choose_checkpoint(run_dir)
            return folder_bytes(done) if done is not None else self._state_bytes()

        done, _ = choose_checkpoint(run_dir)
        intact = ((f"The final output in {folder} is marked incomplete. " if final else
                   f"{folder} is marked incomplete (a resume skips it; delete it to free its space). ")
                  + (f"The newest complete checkpoint, {done}, is intact: once there is space, continue with "
                     f"--resume_from_checkpoint true" if done is not None else
                     "No complete checkpoint exists yet: once there is space, start the run again"))
        return write_failures_reported(what, folder, intact, needed)

    def _state_bytes(self, optimizer: bool = True) -> int:
        """Bytes of the weights (all of them, also where ZeRO-3 partitions them; only the trainable ones of a peft
        model, which saves its adapter) and of the optimizer states this process holds: about what one checkpoint
        writes (the final output: the weights alone)."""
        adapter = hasattr(self.model, "peft_config")
        n = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in self.model.parameters()
                if p.requires_grad or not adapter)
        opt = self.optimizer if optimizer else None
        while opt is not None and not isinstance(getattr(opt, "state", None), dict) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        for state in (getattr(opt, "state", None) or {}).values():
            n += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        return n

    def _finalize_training(self, trial, *args, **kwargs):
        # transformers deletes every checkpoint-* but the best with save_total_limit=1: only ours here
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            out = super()._finalize_training(trial, *args, **kwargs)
        finally:
            self.args.save_total_limit = limit
        best = self.state.best_model_checkpoint
        if self.args.should_save and best is not None and limit == 1:
            rotate_own_checkpoints(self._get_output_dir(trial=trial), self.run_id, 1, keep=(best,), keep_newest=False)
        return out

    # ---- exact loss -----------------------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples, device):
        """D of the whole optimizer step: targets (or samples with targets, with --pack_loss), all ranks."""
        if not batch_samples or not {"labels", "shift_labels"} & set(batch_samples[0]):
            return None
        counts = [count_targets(b) for b in batch_samples]
        n = sum(s if self.pack_loss else t for t, s in counts)
        n = torch.tensor(n, dtype=torch.int64, device=device)
        if self.args.world_size > 1:
            n = self.accelerator.reduce(n, reduction="sum")
        return n.clamp(min=1)

    def _model_inputs(self, inputs: dict, num_items_in_batch) -> dict:
        inputs = {k: v for k, v in inputs.items() if k not in PACK_COUNT_KEYS}
        if not self.pack_loss:
            inputs.pop("weights", None)
        else:
            inputs["pack_loss"] = True
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**self._model_inputs(inputs, num_items_in_batch))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if num_items_in_batch is not None:
            # DDP / DeepSpeed average gradients over ranks; the loss is a share of an all-rank sum
            loss = loss * self._gradient_divisor()
        return (loss, outputs) if return_outputs else loss

    def _gradient_divisor(self) -> int:
        """What DDP / DeepSpeed divide the gradients summed over all ranks by: the rank count, unless set (SP)."""
        return self.gradient_divisor or self.accelerator.num_processes

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # logged: the mean over ranks of what they return, i.e. (all-rank sum / D) when scaled by the rank count
        scale = self.accelerator.num_processes / self._gradient_divisor()
        return loss * scale if num_items_in_batch is not None and scale != 1 else loss

    # ---- exact evaluation loss ------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        tokens, sequences = count_targets(inputs)
        d = sequences if self.pack_loss else tokens
        with torch.no_grad(), self.compute_loss_context_manager():
            # num_items_in_batch=1: the model returns the (weighted) sum of the CE over the batch
            outputs = model(**self._model_inputs(inputs, 1))
        total = (outputs["loss"] if isinstance(outputs, dict) else outputs[0]).detach().double()
        if self._eval_sums is not None:
            self._eval_sums += torch.stack([total, torch.tensor(float(d), dtype=torch.float64, device=total.device)])
        return (total / max(d, 1), None, None)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=True,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            sums = self._eval_sums
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
        finally:
            self._eval_sums = None
        output.metrics[f"{metric_key_prefix}_loss"] = float(sums[0] / sums[1].clamp(min=1))
        output.metrics[f"{metric_key_prefix}_{'sequences' if self.pack_loss else 'targets'}"] = int(sums[1])
        return output
