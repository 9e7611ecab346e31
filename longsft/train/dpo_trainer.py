"""`DPOTrainer`: TrainerNoShuffle for preference pairs (main.py --stage dpo); the loss math is longsft/train/dpo.py.

    from longsft.train.dpo_trainer import DPOTrainer
    trainer = DPOTrainer(model=model, args=training_args, train_dataset=PairPackDataset(DIR),
                         data_collator=PairCollator(), reference="model", ref_model=frozen_copy)
    trainer.train()

What it adds to TrainerNoShuffle (data order, padding items, checkpoints, SP layout and gradient scale are its):
- normaliser: the step's pairs P and chosen targets T_c, counted over every micro-batch and rank (one all-reduce)
  from the collator's dpo_num_pairs / dpo_chosen_targets, passed as num_items_in_batch;
- compute_loss: the reference's per-sequence sums (`reference`: "none", "precomputed", "model", "adapters"), then
  the policy's from one packed forward (`return_token_logps`), summed per sequence in float64 and, under sequence
  parallelism, over the group; the step's share of (1/P) sum l + w (1/T_c) NLL_chosen, times 1/N under SP, times
  what DeepSpeed / DDP divide the summed gradients by;
- logs: TRL's rewards/* and logps/* as exact means over the pairs of the logged steps (sums all-reduced when
  logging), eval_* the same over the whole validation set (with eval_pairs);
- precomputed reference log-probs: computed with the initial weights before the first step (under DeepSpeed after
  the engine is built and before a checkpoint is loaded into it; otherwise before train() loads the checkpoint),
  or read back (longsft/train/dpo_reference.RefLogpsStore).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
import transformers

from longsft.train import dpo as dpo_lib
from longsft.train.dpo_data import DPO_KEYS
from longsft.train.dpo_reference import RefLogpsStore, prepare_reference_model, release_reference_model
from longsft.train.sequence_parallel import PACK_COUNT_KEYS
from longsft.train.trainer import PaddedToMultiple, TrainerNoShuffle

logger = logging.getLogger("longsft.train")
REFERENCES = ("none", "precomputed", "model", "adapters")


class DPOTrainer(TrainerNoShuffle):
    """Extra keyword arguments: reference (REFERENCES), ref_model (the loaded reference for "model", or for the
    precomputing pass with --ref_model), ref_identity (the stored log-probs' key, see dpo_reference)."""

    def __init__(self, *args, reference: str = "model", ref_model=None, ref_identity: dict | None = None, **kwargs):
        if reference not in REFERENCES:
            raise ValueError(f"reference {reference!r}: expected one of {REFERENCES}")
        kwargs.update(batch_method="pack", pack_loss=False)
        super().__init__(*args, **kwargs)
        self.reference = reference
        self.ref_model, self._ref_engine, self.ref_identity = ref_model, None, ref_identity or {}
        self._ref_pending = reference == "precomputed"
        self._ref_logps: dict[str, np.ndarray] = {}
        self._sums = {"train": None, "eval": None}  # metric sums (dpo.METRICS) since the last log / in evaluation
        if isinstance(self.eval_dataset, dict):
            raise ValueError("--stage dpo evaluates one validation set")

    # ---- normaliser --------------------------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples, device):
        """(P, T_c) of the whole optimizer step, float64 [2]."""
        if not batch_samples:
            return None
        n = torch.tensor([[float(b["dpo_num_pairs"]), float(b["dpo_chosen_targets"])] for b in batch_samples],
                         dtype=torch.float64, device=device).sum(0)
        if self.args.world_size > 1:
            n = self.accelerator.reduce(n, reduction="sum")
        return n.clamp(min=1)

    # ---- log-probs ---------------------------------------------------------------------------------

    def _sp_group(self):
        from deepspeed.utils import groups

        return groups.mpu.get_sequence_parallel_group()

    def _sequence_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64 [2P] completion log-prob sums of the batch's sequences, a zero that holds the whole graph)."""
        feed = {k: v for k, v in inputs.items() if k not in DPO_KEYS and k not in PACK_COUNT_KEYS}
        out = model(**feed, return_token_logps=True)
        token_logps = out["token_logps"]  # [1, T] fp32
        sums = dpo_lib.sequence_logps(token_logps, inputs["dpo_sequence"], int(inputs["dpo_lengths"].numel()))
        if self.sequence_parallel:
            sums = dpo_lib.sum_over_group(sums, self._sp_group())
        return sums, 0.0 * token_logps.sum()

    @contextlib.contextmanager
    def _as_reference(self, model):
        """The policy as its own reference: eval mode, and with LoRA its adapters disabled."""
        was_training = model.training
        model.eval()
        try:
            if self.reference == "adapters" or (self.reference == "precomputed" and self.ref_model is None
                                                and _is_peft(self.accelerator.unwrap_model(model))):
                with self.accelerator.unwrap_model(model).disable_adapter():
                    yield model
            else:
                yield model
        finally:
            model.train(was_training)

    def _reference_logps(self, model, inputs, split: str) -> torch.Tensor | None:
        if self.reference == "none":
            return None
        device = inputs["dpo_lengths"].device
        if self.reference == "precomputed":
            ids = inputs["dpo_sample_ids"].cpu().numpy()
            values = self._ref_logps[split][ids]
            if not np.isfinite(values).all():
                raise RuntimeError(f"no precomputed reference log-prob for samples {ids[~np.isfinite(values)][:8]} "
                                   f"of the {split} data")
            return torch.from_numpy(values).to(device)
        with torch.no_grad():
            if self.reference == "adapters":
                with self._as_reference(model):
                    return self._sequence_logps(model, inputs)[0]
            return self._sequence_logps(self._ref_engine, inputs)[0]

    def _add_sums(self, split: str, metrics: torch.Tensor) -> None:
        if self.sequence_parallel and self.sequence_parallel.rank:
            return  # the group's first rank counts its pairs; the others hold the same values
        self._sums[split] = metrics if self._sums[split] is None else self._sums[split] + metrics

    def _reduced_sums(self, split: str) -> torch.Tensor:
        sums = self._sums[split]
        sums = torch.zeros(len(dpo_lib.METRICS), dtype=torch.float64, device=self.args.device) if sums is None \
            else sums.to(self.args.device)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        self._sums[split] = None
        return sums

    # ---- loss --------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reference = self._reference_logps(model, inputs, "train")
        policy, anchor = self._sequence_logps(model, inputs)
        lengths = inputs["dpo_lengths"].to(policy.device)
        loss_sum, nll_sum, metrics = dpo_lib.batch_sums(policy, reference, lengths, self.args)
        if num_items_in_batch is None:  # a lone batch (no step normaliser): its own means
            num_items_in_batch = metrics[[0, 3]].clamp(min=1)
        pairs, tokens = num_items_in_batch.to(policy.device)
        loss = loss_sum / pairs
        if self.args.dpo_sft_weight:
            loss = loss + self.args.dpo_sft_weight * nll_sum / tokens
        if self.sequence_parallel:  # each rank of the group holds the group's loss; the N shares add up to it
            loss = loss / self.sequence_parallel.size
        self._add_sums("train", metrics)
        loss = (loss + anchor).float() * self._gradient_divisor()
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """A training log gets the exact DPO metrics over its steps (an all-reduce on every rank, as the loss's)."""
        if "loss" in logs and "eval_loss" not in logs:
            values = dpo_lib.metric_values(self._reduced_sums("train"), self.args.dpo_sft_weight)
            values.pop("loss")
            logs.update({k: round(v, 6) for k, v in values.items()})
        super().log(logs, *args, **kwargs)

    # ---- evaluation: the same quantities over the whole validation set ------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            reference = self._reference_logps(model, inputs, "eval")
            policy, _ = self._sequence_logps(model, inputs)
            loss_sum, _, metrics = dpo_lib.batch_sums(policy, reference, inputs["dpo_lengths"].to(policy.device),
                                                      self.args)
        self._add_sums("eval", metrics)
        return (loss_sum.detach().float() / max(float(metrics[0]), 1.0), None, None)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._sums["eval"] = None
        output = transformers.Trainer.evaluation_loop(self, dataloader, description, prediction_loss_only=True,
                                                      ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        sums = self._reduced_sums("eval")
        values = dpo_lib.metric_values(sums, self.args.dpo_sft_weight)
        output.metrics[f"{metric_key_prefix}_loss"] = values.pop("loss")
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in values.items()})
        output.metrics[f"{metric_key_prefix}_pairs"] = int(sums[0])
        return output

    # ---- the reference: a model made ready, or log-probs computed before the first step ---------------

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if not (self._ref_pending or (self.reference == "model" and self._ref_engine is None)):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        # the engine first, the reference next (its pass needs the initial weights), a checkpoint's weights last
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        self._ready_reference()
        if resume_from_checkpoint is not None:
            self._load_after_reference(resume_from_checkpoint)
        return model, train_dataloader

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if model is None and self._ref_pending:  # train() without DeepSpeed: the weights are still the initial ones
            self._ready_reference()
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_after_reference(self, checkpoint: str) -> None:
        """What transformers' _prepare_for_training does with a checkpoint (it ran without one, see above)."""
        if self.is_deepspeed_enabled:
            from transformers.integrations.deepspeed import deepspeed_load_checkpoint

            deepspeed_load_checkpoint(self.model_wrapped, checkpoint,
                                      load_module_strict=not _is_peft(self.accelerator.unwrap_model(self.model)))
        self._load_optimizer_and_scheduler(checkpoint)
        self._load_scaler(checkpoint)

    def _ready_reference(self) -> None:
        if self.ref_model is not None and self._ref_engine is None:
            self._ref_engine = prepare_reference_model(self.ref_model, self)
        if self._ref_pending:
            self._precompute()
            self._ref_pending = False
            if self._ref_engine is not None:  # --ref_model was only needed for the pass: free it
                release_reference_model(self._ref_engine)
                self._ref_engine = self.ref_model = None

    def _precompute(self) -> None:
        for split, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
            if dataset is None:
                continue
            base = dataset.dataset if isinstance(dataset, PaddedToMultiple) else dataset
            store = RefLogpsStore(base.data_dir, self.ref_identity, base.sample_lengths)
            values = self._shared(store.load() if self.args.process_index == 0 else None)
            if values is not None:
                logger.info("reference log-probs of the %s pairs read from %s", split, store.folder)
            else:
                values = self._reference_pass(base, store.num_samples)
                if self.args.process_index == 0 and store.save(values):
                    logger.info("reference log-probs of the %s pairs computed and stored in %s", split, store.folder)
            self._ref_logps[split] = values

    def _reference_pass(self, dataset, num_samples: int) -> np.ndarray:
        """One no-grad pass of the reference over `dataset`, every rank its share; float64 [num_samples]."""
        loader = self._get_dataloader(dataset=self._pad_for_ranks(dataset, self.args.eval_batch_size),
                                      description="reference", batch_size=self.args.eval_batch_size,
                                      sampler_fn=self._get_eval_sampler)
        model = self._ref_engine if self._ref_engine is not None else (
            self.model_wrapped if self.is_deepspeed_enabled else self.model)
        ids, values = [], []
        context = contextlib.nullcontext(model) if self._ref_engine is not None else self._as_reference(model)
        with torch.no_grad(), context:
            for batch in loader:
                batch = self._prepare_inputs(batch)
                sums, _ = self._sequence_logps(model, batch)
                if not (self.sequence_parallel and self.sequence_parallel.rank):
                    ids.append(batch["dpo_sample_ids"].cpu().numpy())
                    values.append(sums.detach().cpu().numpy())
        local = (np.concatenate(ids) if ids else np.zeros(0, np.int64),
                 np.concatenate(values) if values else np.zeros(0))
        parts = [local]
        if self.args.world_size > 1:
            parts = [None] * self.args.world_size
            torch.distributed.all_gather_object(parts, local)
        out = np.full(num_samples, np.nan)
        for i, v in parts:
            out[i] = v
        return out


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
