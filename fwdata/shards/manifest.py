"""`manifest.parquet`: one row per sharded sample, in shard order (pandas + pyarrow).

Columns: ``index`` (int64, the manifest position), ``key`` (``%08d`` of index, the WebDataset key),
``id``, ``shard`` (file name), ``split``, ``status``, ``num_frames``, ``height``, ``width``, ``fps``,
``scale``, ``depth_source``, ``source`` (the source video path), ``video_sha256``, every
`QualityMetrics` field as a float column (NaN where the record has none; ``multiview_settings``
flattened to ``multiview_settings.rel_tol`` ...), ``bytes`` (the sample's member bytes) and
``sha256.<member>`` for each member (``sha256.mp4``, ``sha256.record.json`` ...; empty for an
absent ``ply``): what an incremental `fwdata shard` compares to reuse a shard.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence, Union

from fwdata.dataset.contract import QualityMetrics, SampleRecord
from fwdata.quality import MultiviewSettings
from fwdata.shards.format import MEMBER_PATHS, RECORD_MEMBER

#: every member a sample can have, in the order the sha256 columns are written
ALL_MEMBERS = tuple(MEMBER_PATHS) + (RECORD_MEMBER,)


def sha_column(member: str) -> str:
    return f"sha256.{member}"


def quality_columns(record: SampleRecord) -> dict[str, float]:
    """The record's quality metrics as flat float columns, NaN where absent."""
    out: dict[str, float] = {}
    q = record.quality
    for name in QualityMetrics.model_fields:
        value = getattr(q, name)
        if name == "multiview_settings":
            for sub in MultiviewSettings.model_fields:
                out[f"{name}.{sub}"] = float(getattr(value, sub)) if value is not None else math.nan
        else:
            out[name] = float(value) if value is not None else math.nan
    return out


def manifest_row(index: int, key: str, shard: str, record: SampleRecord, member_sha256: dict[str, str],
                 member_bytes: int) -> dict:
    """One manifest row (see the module docstring for the columns)."""
    row = {"index": index, "key": key, "id": record.id, "shard": shard, "split": record.split,
           "status": record.status, "num_frames": record.num_frames, "height": record.height,
           "width": record.width, "fps": float(record.fps), "scale": record.scale,
           "depth_source": record.depth_source, "source": record.source.path,
           "video_sha256": record.video_sha256 or ""}
    row.update(quality_columns(record))
    row["bytes"] = int(member_bytes)
    for m in ALL_MEMBERS:
        row[sha_column(m)] = member_sha256.get(m, "")
    return row


def manifest_frame(rows: Sequence[dict]):
    """The manifest DataFrame of `rows` (fixed column order and dtypes, also when empty)."""
    import pandas as pd

    if rows:
        df = pd.DataFrame(list(rows))
    else:
        df = pd.DataFrame({"index": pd.Series([], dtype="int64"), "key": pd.Series([], dtype="str"),
                           "id": pd.Series([], dtype="str"), "shard": pd.Series([], dtype="str")})
    for col in ("index", "num_frames", "height", "width", "bytes"):
        if col in df:
            df[col] = df[col].astype("int64")
    return df


def write_manifest(path: Union[str, Path], rows: Sequence[dict]) -> None:
    """Write the manifest to `path` (a temporary name the caller renames: see fwdata.shards.writer)."""
    manifest_frame(rows).to_parquet(path, index=False, engine="pyarrow")


def dataset_fingerprint(rows: Sequence[dict]) -> str:
    """sha256 over each row's key, id and member sha256s, in manifest order: equal fingerprints mean the
    same samples with the same bytes under the same keys."""
    h = hashlib.sha256()
    for row in rows:
        h.update(f"{row['key']} {row['id']}".encode())
        for m in ALL_MEMBERS:
            h.update(f" {m}={row[sha_column(m)]}".encode())
        h.update(b"\n")
    return h.hexdigest()
