"""Stage 2: sorted-batching order and near-perfect packs for a tokenized dataset, nothing lost.

Reads the folder pre_tokenize.py (or its front ends pre_tokenize_glm4.py / pre_tokenize_llama3.py) wrote and
adds DIR/packs/ to it (layout in longsft/data/storage.py's docstring; no torch is imported); `dataset.LMPackDataset(DIR)`
and `dataset.LMSortDataset(DIR)` read the result.

    python sort_and_group.py --train_file data/glm4/longwriter                       # defaults below
    python sort_and_group.py --train_file data/glm4/longwriter --max_length 32768 --group_size 8 \\
        --pack_algorithm bfd --seed 42 --over_length error
    # a tiny CPU run on the bundled sample
    python tools/make_tiny.py tokenizer --family glm4 --out /tmp/tiny-glm4
    python pre_tokenize.py --model_name_or_path /tmp/tiny-glm4 --input data/sample.jsonl \\
        --output_dir /tmp/glm4-sample --max_length 8192
    python sort_and_group.py --train_file /tmp/glm4-sample --max_length 8192 --group_size 2
    # data prepared by the upstream LongWriter/LongAlign scripts (inputs.npy, labels.npy): converted in place
    python sort_and_group.py --train_file data/glm4/longwriter --pad_token_id 151330

What it does, the flags and the report: longsft/data/sort_and_group.py (`python sort_and_group.py --help`); the packing
algorithms: longsft/data/packing.py.
"""

from longsft.data.sort_and_group import Arguments, main, run  # noqa: F401  (the entry and what callers use)
from longsft.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
