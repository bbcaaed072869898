"""The pseudo-label shards' layout: schema, format tag, row-group size.

Kept apart from `pseudo_labels` (which imports torch) so that Ray Data's write tasks, which
unpickle the shard sink, start without importing torch.
"""

import pyarrow as pa

SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("mask_png", pa.binary()),
    ("confidence_png", pa.binary()),
    ("stability", pa.float64()),
    ("ckpt_miou", pa.list_(pa.float64())),
    ("ckpt_epochs", pa.list_(pa.int32())),
    ("confidence", pa.float64()),
    ("entropy", pa.float64()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("image_path", pa.string()),
])

# Stage fingerprints of labeling passes chain this: shards of an older layout are relabeled, not read.
SHARD_FORMAT = "image_path"

# A student reading one image's pseudo-label decodes the group holding it: 16 masks, not a shard.
ROWS_PER_GROUP = 16
