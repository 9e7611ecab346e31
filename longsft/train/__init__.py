"""Stage 3, train: what main.py runs (run.py): its settings (arguments.py, settings.py), the data checked against
the model (data.py), the model and LoRA (model.py; 4/8-bit base weights: quantization.py; RoPE scaling: rope.py),
batches (batches.py), the Trainer with the exact loss (trainer.py), checkpoints (checkpoints.py) and sequence
parallelism (sequence_parallel.py)."""
import logging

# bitsandbytes (imported by transformers / peft whenever it is installed) warns on every import on CPUs with
# AVX512-BF16 that an optional kernel from the Hugging Face hub is missing; nothing here fetches code from a hub
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
