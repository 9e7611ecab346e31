"""The training datasets and collators, under the name users and the upstream docs know (`from dataset import ...`).

    from dataset import LMDataset, LMPackDataset, LMSortDataset, make_collator
    ds = LMPackDataset("data/glm4/longwriter"); ds[0]   # input_ids, labels, attention_mask (cu_seqlens), ...

The code is in the package: longsft/train/batches.py (datasets, collators, count_targets) over the on-disk format of
longsft/data/storage.py (TokenizedData, TokenizedWriter, PackedData: re-exported here too, as before).
"""

from longsft.atomic_dir import replace_dir, write_json_atomic  # noqa: F401
from longsft.data.storage import (ARRAY_FILES, FORMAT_NAME, FORMAT_VERSION, IGNORE_INDEX, META_FILE,  # noqa: F401
                                  OFFSET_DTYPE, OFFSETS_FILE, PACK_FILES, PACKS_DIR, PACKS_FORMAT, PACKS_VERSION,
                                  TOKEN_DTYPE, DatasetFormatError, PackedData, TokenizedData, TokenizedWriter,
                                  check_token_ids, read_meta, write_packs)
from longsft.train.batches import (LMDataset, LMPackDataset, LMSortDataset, PackCollator, PaddedCollator,  # noqa: F401
                                   count_targets, make_collator)
