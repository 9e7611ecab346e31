"""Stage 3, train: what main.py runs (run.py): its settings (arguments.py, settings.py), the data checked against
the model (data.py), the model and LoRA (model.py), batches (batches.py), the Trainer with the exact loss
(trainer.py), checkpoints (checkpoints.py) and sequence parallelism (sequence_parallel.py)."""
