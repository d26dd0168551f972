"""The shard format (version 1): file names, WebDataset member names and the `shards.json` model.

A shard folder::

    shards.json                 ShardIndex, written last (a folder without it is incomplete)
    manifest.parquet            one row per sample (fwdata.shards.manifest)
    shard-000000.tar ...        WebDataset tar shards, one WebDataset sample per dataset sample

Each WebDataset sample has the key ``%08d`` (the sample's index in the manifest: sample ids may hold
characters WebDataset keys must not) and the members below, each exactly the bytes of the dataset
file it comes from (`MEMBER_PATHS`), plus ``record.json`` (the sample's `SampleRecord`).
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from fwdata.dataset.contract import SampleRecord

FORMAT_NAME = "fwdata-shards"
FORMAT_VERSION = 1
INDEX_FILE = "shards.json"
MANIFEST_FILE = "manifest.parquet"

#: WebDataset member (extension) -> the `SamplePaths` field of the dataset file it holds, byte for byte
MEMBER_PATHS: dict[str, str] = {
    "mp4": "video",
    "depth.npz": "depth",
    "points.npz": "points",
    "camera.json": "camera_json",
    "camera.txt": "camera_txt",
    "ply": "points_ply",
}
#: the member holding the sample's metadata record (`SampleRecord` JSON)
RECORD_MEMBER = "record.json"
#: members every sample has (``ply`` is optional: only when the record names a cloud and it was kept)
REQUIRED_MEMBERS = ("mp4", "depth.npz", "points.npz", "camera.json", "camera.txt", RECORD_MEMBER)

#: tar member metadata fixed so that the same dataset gives the same shard bytes
TAR_MTIME = 0
TAR_USER = "fwdata"
TAR_MODE = 0o444

_SHARD_NAME = re.compile(r"^shard-(\d{6})\.tar$")
_KEY = re.compile(r"^\d{8}$")


class ShardFormatError(ValueError):
    """A shard folder, index or manifest that breaks the format; the message names the file."""


def shard_name(i: int) -> str:
    """File name of the i-th shard: ``shard-000000.tar``."""
    return f"shard-{i:06d}.tar"


def is_shard_name(name: str) -> bool:
    return _SHARD_NAME.match(name) is not None


def sample_key(index: int) -> str:
    """The WebDataset ``__key__`` of the sample at manifest position `index`: ``%08d``."""
    return f"{index:08d}"


def is_sample_key(key: str) -> bool:
    return _KEY.match(key) is not None


def member_files(record: SampleRecord) -> dict[str, str]:
    """Member name -> the dataset-relative path the record names for it (``ply`` only when it names one)."""
    out = {}
    for member, field in MEMBER_PATHS.items():
        rel = getattr(record.paths, field)
        if rel:
            out[member] = rel
    return out


class ShardInfo(BaseModel):
    """One shard of `shards.json`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^shard-\d{6}\.tar$")
    num_samples: int = Field(ge=1)
    bytes: int = Field(ge=0, description="size of the tar file")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    first_index: int = Field(ge=0, description="manifest index of the shard's first sample")


class ShardOptions(BaseModel):
    """How the shards were cut (recorded, so a rerun with other options starts afresh)."""

    model_config = ConfigDict(extra="forbid")

    split: Literal["train", "val", "test", "all"] = "all"
    samples_per_shard: Optional[int] = Field(None, ge=1)
    shard_size: Optional[int] = Field(None, ge=1, description="bytes: a shard is closed before it grows past this")
    ply: bool = Field(True, description="the fused .ply clouds are included")


class ShardIndex(BaseModel):
    """`shards.json`: the index of a shard folder."""

    model_config = ConfigDict(extra="allow")

    format: Literal["fwdata-shards"] = FORMAT_NAME
    version: Literal[1] = FORMAT_VERSION
    dataset_fingerprint: str = Field(description="sha256 over every sample's key, id and member sha256s, in "
                                                 "manifest order (fwdata.shards.manifest.dataset_fingerprint)")
    source: str = Field(description="the dataset folder as given to `fwdata shard`")
    num_samples: int = Field(ge=0)
    shards: list[ShardInfo] = Field(default_factory=list)
    dataset_metadata: dict = Field(default_factory=dict, description="metadata.json's top-level fields other than "
                                                                     "`samples` (name, provenance, splits ...)")
    options: ShardOptions = Field(default_factory=ShardOptions)
    tool_version: str = ""
