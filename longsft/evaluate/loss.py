"""The eval loss of a test set through the training path: each conversation in the training chat format (the same
ChatFormat.encode pre_tokenize.py runs: every trained reply supervised), the training collator (PaddedCollator: the
first token unlabelled, labels shifted by the model) and the model's own loss with `num_items_in_batch=1`, which
returns the sum of the cross-entropy (main.py's evaluation does the same: trainer.TrainerNoShuffle.prediction_step).

    python evaluate.py --model_dir output/run --test_file dev.jsonl --output_dir eval/dev     # scores.json eval_loss

eval_loss = (sum of the CE of every target of the test set) / (number of targets): the token mean main.py logs.
"""

from __future__ import annotations

import math

import torch

from longsft.data.inputs import Skip
from longsft.data.storage import IGNORE_INDEX
from longsft.evaluate.generate import reads_records, record_samples
from longsft.train.batches import PaddedCollator


def eval_loss(gen, cases: list[dict]) -> dict:
    """{"eval_loss", "eval_targets", "eval_samples", "eval_skipped": {reason: n}} over the test cases
    ({"messages"}, and "record" read by template auto) with the Generator's model and chat format."""
    collate = PaddedCollator(gen.pad_id)
    total, targets, samples, skipped = 0.0, 0, 0, {}
    model = gen.model
    for case in cases:
        try:  # template auto reads the record itself (its tools; a record it splits gives several samples)
            encoded = record_samples(gen.fmt, case["record"]) if "record" in case and reads_records(gen.fmt) \
                else [gen.fmt.encode(case["messages"])]
        except Skip as s:
            skipped[s.reason] = skipped.get(s.reason, 0) + 1
            continue
        for ids, labels in encoded:
            batch = collate([{"input_ids": torch.as_tensor(ids, dtype=torch.long),
                              "labels": torch.as_tensor(labels, dtype=torch.long)}])
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            if n == 0:
                skipped["nothing_to_supervise"] = skipped.get("nothing_to_supervise", 0) + 1
                continue
            batch = {k: v.to(gen.device) for k, v in batch.items()}
            with torch.no_grad():
                out = model(**batch, num_items_in_batch=1, use_cache=False)
            total += float((out["loss"] if isinstance(out, dict) else out[0]).double())
            targets += n
            samples += 1
    return {"eval_loss": total / targets if targets else math.nan, "eval_targets": targets, "eval_samples": samples,
            "eval_skipped": skipped}
