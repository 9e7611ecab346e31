"""What main.py (longsft/train/run.py) builds differently for `--stage dpo`: the data checks, the pair datasets,
the collator and the trainer with its reference. Each is one call from run.py; the rest of the run (settings and
model checks, model loading, LoRA, sequence parallelism, logging, saving) is the SFT run's.

    python main.py --stage dpo --model_name_or_path /tmp/tiny-llama3 --train_file /tmp/pairs \\
        --output_dir /tmp/dpo-run --max_steps 5 --logging_steps 1          # a tiny CPU run (README)
"""

from __future__ import annotations

import logging

from longsft.data.storage import TokenizedData
from longsft.train import dpo_settings
from longsft.train.dpo_data import PairCollator, open_pair_dataset, pair_data_problems
from longsft.train.dpo_reference import load_reference_model, reference_identity
from longsft.train.dpo_trainer import DPOTrainer

logger = logging.getLogger("longsft.train")


def data_problems(path: str, role: str, stage: str) -> list[str]:
    """SFT samples given to --stage dpo (or pairs to sft)."""
    return pair_data_problems(path, role, stage)


def datasets(data_args):
    """(training packs of pairs, validation pairs: their packs if sort_and_group.py ran on them, else pair by pair)."""
    train = open_pair_dataset(data_args.train_file, packed=True)
    val = open_pair_dataset(data_args.validation_file, packed=False) if data_args.validation_file else None
    return train, val


def collator(layout, pad_token_id: int) -> PairCollator:
    return PairCollator(layout.size, layout.rank, pad_token_id)


def trainer(model_args, data_args, lora_args, args, dtype, rows: int) -> tuple[type, dict]:
    """(DPOTrainer, its extra keyword arguments): the reference kind, and the reference model when one is needed
    (--ref_model, or a frozen copy of --model_name_or_path; loaded now, like the policy)."""
    kind = dpo_settings.reference_kind(args, lora_args.use_lora)
    ref_model = None
    if kind == "model" or (kind == "precomputed" and args.ref_model):
        path = args.ref_model or model_args.model_name_or_path
        ref_model = load_reference_model(model_args, path, dtype)
        ref_rows = int(getattr(ref_model.config, "padded_vocab_size", None) or ref_model.config.vocab_size)
        max_id = max(int(TokenizedData(f).meta.get("max_token_id", -1))
                     for f in (data_args.train_file, data_args.validation_file) if f)
        if max_id >= ref_rows:
            raise SystemExit(f"--ref_model {path}: {ref_rows} embedding rows, the data holds token ids up to {max_id} "
                             f"(the policy has {rows}): give a reference with the policy's vocabulary")
    identity = reference_identity(model_args.model_name_or_path, args.ref_model, dtype)
    return DPOTrainer, {"reference": kind, "ref_model": ref_model, "ref_identity": identity}
