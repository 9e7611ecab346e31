"""`TrainerNoShuffle`, the transformers Trainer of this toolkit, under the name users and the upstream docs know.

    from trainer import TrainerNoShuffle
    trainer = TrainerNoShuffle(model=model, args=training_args, train_dataset=ds, data_collator=collator,
                               batch_method="pack", pack_loss=True, processing_class=tokenizer)

The code is in the package: longsft/train/trainer.py (fixed data order, the exact loss on any GPU count,
sequence parallelism, checkpoints marked complete); main.py builds it.
"""

from longsft.train.trainer import BATCH_METHODS, EpochSampler, PaddedToMultiple, TrainerNoShuffle, planned_steps  # noqa: F401
