"""Stage 1, data: chat records read from JSONL / JSON files (inputs.py), encoded by a chat template in parallel into
the on-disk dataset (pretokenize.py, storage.py), then packed and ordered for training (packing.py,
sort_and_group.py). Numpy only: nothing here imports torch."""
