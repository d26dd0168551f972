"""WebDataset shards of a dataset for training at scale (`fwdata shard`), and their reader.

- `fwdata.shards.format`: file names, member names, the `shards.json` model (format version 1);
- `fwdata.shards.writer`: `write_shards` (atomic, deterministic, incremental);
- `fwdata.shards.manifest`: `manifest.parquet`, one row per sample;
- `fwdata.shards.reader`: `iter_samples(folder)` -> ``(key, members)`` streamed from the tars.

docs/DATA_FORMAT.md ("Shards") describes the format.
"""

from fwdata.shards.format import INDEX_FILE, MANIFEST_FILE, MEMBER_PATHS, ShardFormatError, ShardIndex
from fwdata.shards.reader import ShardReadError, ShardReader, is_shard_folder, iter_samples, load_index, load_manifest

__all__ = ["INDEX_FILE", "MANIFEST_FILE", "MEMBER_PATHS", "ShardFormatError", "ShardIndex", "ShardReadError",
           "ShardReader", "is_shard_folder", "iter_samples", "load_index", "load_manifest"]
