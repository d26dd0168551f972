"""`fwdata shard`: a dataset folder -> WebDataset tar shards + `manifest.parquet` + `shards.json`.

Samples go into shards in the dataset's metadata order (within `split`), `samples_per_shard` per
shard or until the next sample would take the shard past `shard_size` bytes (a sample larger than
that gets a shard of its own). Each shard is written under a temporary name and renamed; the
manifest next, `shards.json` last (atomically): a folder without it is incomplete. The same
dataset and options give the same bytes in every file.

Incremental rule (a rerun into the same folder, e.g. after the dataset grew): with the same
options, the existing shards are walked in order and kept, untouched, while each one is complete
(not the previous run's last shard, unless that one holds exactly `samples_per_shard` samples),
its file still has the size and sha256 `shards.json` records, and each of its samples is still in
the dataset (and the split) with the same member bytes (sha256 of every member, record.json
included). The first shard that fails ends the kept prefix; every other sample, in metadata order,
fills new shards after it (a planned shard identical to the one already on disk is not rewritten).
So samples keep their keys while their shards are kept, and new samples get the next keys. Other
options, or no readable `shards.json`, start afresh. Shard files no longer listed are removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator

from fwdata import __version__
from fwdata.dataset.contract import METADATA_FILE, ContractError, SampleRecord, load_metadata, resolve_inside
from fwdata.dataset.layout import tmp_name
from fwdata.dataset.store import (
    atomic_write_text,
    check_writable_folder,
    clean_stale_temp_files,
    file_sha256,
    is_inside,
    write_lock,
)
from fwdata.shards import manifest as mf
from fwdata.shards.format import (
    INDEX_FILE,
    MANIFEST_FILE,
    RECORD_MEMBER,
    TAR_MODE,
    TAR_MTIME,
    TAR_USER,
    ShardFormatError,
    ShardIndex,
    ShardInfo,
    ShardOptions,
    is_shard_name,
    member_files,
    sample_key,
    shard_name,
)

#: the shard size when neither samples_per_shard nor shard_size is given
DEFAULT_SHARD_SIZE = 1_000_000_000
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile.RECORDSIZE


class ShardError(ValueError):
    """A dataset that cannot be sharded or an output folder that cannot take shards (one line)."""


class ShardConfig(BaseModel):
    """Options of `fwdata shard` (the command parses its flags into this)."""

    model_config = ConfigDict(extra="forbid")

    dataset: Path
    out: Path
    samples_per_shard: Optional[int] = Field(None, ge=1, description="samples per shard")
    shard_size: Optional[ByteSize] = Field(None, gt=0, description="bytes per shard at most, e.g. '1GB', '500MiB' "
                                                                   "(default 1GB when samples_per_shard is not given)")
    split: Literal["train", "val", "test", "all"] = "all"
    ply: bool = Field(True, description="include the fused .ply clouds")

    @model_validator(mode="after")
    def _one_rule(self) -> "ShardConfig":
        if self.samples_per_shard is not None and self.shard_size is not None:
            raise ValueError("give --samples-per-shard or --shard-size, not both")
        return self

    def options(self) -> ShardOptions:
        size = None if self.samples_per_shard is not None else int(self.shard_size or DEFAULT_SHARD_SIZE)
        return ShardOptions(split=self.split, samples_per_shard=self.samples_per_shard, shard_size=size, ply=self.ply)


@dataclass
class _Sample:
    """One sample to shard: its record, member files and their sha256 / sizes."""

    record: SampleRecord
    files: dict[str, Path]  # member -> absolute path (not record.json)
    record_bytes: bytes
    sha256: dict[str, str] = field(default_factory=dict)  # member -> sha256, record.json included
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def tar_bytes(self) -> int:
        """Bytes this sample takes in a tar: a 512-byte header per member plus its data padded to 512."""
        return sum(_TAR_BLOCK + math.ceil(n / _TAR_BLOCK) * _TAR_BLOCK for n in self.sizes.values())


@dataclass
class ShardResult:
    """What `write_shards` did."""

    index: ShardIndex
    written: list[str]
    reused: list[str]
    removed: list[str]


def record_json(record: SampleRecord) -> bytes:
    """The ``record.json`` member: the record as the dataset's completion markers hold it."""
    return (record.model_dump_json(indent=1) + "\n").encode()


def _check_folders(cfg: ShardConfig) -> None:
    dataset, out = cfg.dataset, cfg.out
    if not dataset.is_dir():
        raise ShardError(f"dataset folder {dataset} does not exist" if not dataset.exists()
                         else f"dataset {dataset} is not a folder")
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} exists and is not a folder")
    if is_inside(out, dataset):
        raise ShardError(f"--out {out} is inside the dataset {dataset}; write shards beside it")
    if (out / METADATA_FILE).exists():
        raise ShardError(f"--out {out} holds a {METADATA_FILE} (a dataset folder); give an empty or shard folder")


def _scan(cfg: ShardConfig, records: list[SampleRecord]) -> list[_Sample]:
    """Member files, sizes and sha256 of every sample (reads each file once)."""
    out = []
    for rec in records:
        files = {}
        for member, rel in member_files(rec).items():
            if member == "ply" and not cfg.ply:
                continue
            try:
                path = resolve_inside(cfg.dataset, rel)
            except ContractError as e:
                raise ShardError(f"{cfg.dataset}: sample {rec.id}: {e}") from None
            if not path.is_file():
                raise ShardError(f"{cfg.dataset}: sample {rec.id}: {rel} is missing; check the dataset with "
                                 f"`fwdata validate {cfg.dataset}`")
            files[member] = path
        s = _Sample(rec, files, record_json(rec))
        for member, path in files.items():
            s.sha256[member] = file_sha256(path)
            s.sizes[member] = path.stat().st_size
        s.sha256[RECORD_MEMBER] = hashlib.sha256(s.record_bytes).hexdigest()
        s.sizes[RECORD_MEMBER] = len(s.record_bytes)
        out.append(s)
    return out


def _previous(out: Path, options: ShardOptions) -> tuple[Optional[ShardIndex], dict[str, list[dict]]]:
    """The previous run's index and manifest rows per shard, when readable and made with `options`."""
    from fwdata.shards.reader import load_index, load_manifest

    if not (out / INDEX_FILE).is_file():
        return None, {}
    try:
        index = load_index(out)
        rows = load_manifest(out).to_dict("records")
    except ShardFormatError:
        return None, {}
    if index.options != options:
        return None, {}
    by_shard: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["index"]):
        by_shard.setdefault(str(row["shard"]), []).append(row)
    return index, by_shard


def _rows_match(old: list[dict], new: list[dict]) -> bool:
    keys = ("index", "key", "id") + tuple(mf.sha_column(m) for m in mf.ALL_MEMBERS)
    return len(old) == len(new) and all(
        all(str(a.get(k, "")) == str(b.get(k, "")) for k in keys) for a, b in zip(old, new))


def _file_matches(path: Path, info: ShardInfo) -> bool:
    return path.is_file() and path.stat().st_size == info.bytes and file_sha256(path) == info.sha256


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what is written."""

    def __init__(self, fh):
        self._f, self.sha256, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def write_tar(path: Path, samples: Iterable[dict]) -> tuple[int, str]:
    """Write WebDataset samples (``{"__key__": key, member: bytes, ...}``, consumed one at a time) to the
    tar `path` atomically (temporary name, fsync, rename), with the format's fixed member metadata
    (mtime, owner, mode), so the same samples give the same bytes. Returns (bytes, sha256) of the file.
    An exception from `samples` leaves nothing at `path` (nor a temporary file)."""
    import webdataset as wds

    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            hw = _HashingWriter(fh)
            with wds.TarWriter(hw, user=TAR_USER, group=TAR_USER, mode=TAR_MODE, encoder=False,
                               mtime=TAR_MTIME) as tw:
                for sample in samples:
                    tw.write(sample)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return hw.size, hw.sha256.hexdigest()


def _write_shard(path: Path, rows: list[dict], samples: list[_Sample]) -> ShardInfo:
    """Write one tar shard atomically (`write_tar`); returns its index entry."""

    def members():
        for row, s in zip(rows, samples):
            sample = {"__key__": row["key"], RECORD_MEMBER: s.record_bytes}
            for member, p in s.files.items():
                data = p.read_bytes()
                if hashlib.sha256(data).hexdigest() != s.sha256[member]:
                    raise ShardError(f"sample {s.record.id}: {p} changed while it was sharded; run again "
                                     f"when the dataset is not being written")
                sample[member] = data
            yield sample

    size, sha256 = write_tar(path, members())
    return ShardInfo(name=path.name, num_samples=len(rows), bytes=size, sha256=sha256,
                     first_index=int(rows[0]["index"]))


def tar_size(member_bytes: int) -> int:
    """Size of a tar (as `tarfile` streams it) whose members take `member_bytes` (headers and padding
    included): two zero blocks end the archive, and the file is padded to whole 10 KiB records."""
    return math.ceil((member_bytes + 2 * _TAR_BLOCK) / _TAR_RECORD) * _TAR_RECORD


def _plan(samples: list[_Sample], options: ShardOptions) -> list[list[_Sample]]:
    """Samples cut into shards, in order: `samples_per_shard` each, or as many as keep the tar within
    `shard_size` bytes (a larger sample gets a shard of its own)."""
    groups: list[list[_Sample]] = []
    size = 0
    for s in samples:
        if options.samples_per_shard is not None:
            full = bool(groups) and len(groups[-1]) >= options.samples_per_shard
        else:
            full = bool(groups) and tar_size(size + s.tar_bytes) > int(options.shard_size)
        if not groups or full:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.tar_bytes
    return groups


def write_shards(cfg: ShardConfig, progress: Optional[Callable[[str, int, int], None]] = None) -> ShardResult:
    """Shard the dataset `cfg.dataset` into `cfg.out` (see the module docstring for the rules).

    Raises ShardError (a missing dataset, an --out that is a file, a sample file missing), ContractError
    (an unreadable metadata.json), OSError (an --out that cannot be written) and DatasetBusy (another
    `fwdata shard` writing the same folder), each with one line. `progress(shard, done, total)` is
    called after each shard.
    """
    _check_folders(cfg)
    meta = load_metadata(cfg.dataset)
    raw_meta = json.loads((cfg.dataset / METADATA_FILE).read_bytes())
    dataset_metadata = {k: v for k, v in raw_meta.items() if k != "samples"}
    records = [r for r in meta.samples if cfg.split == "all" or r.split == cfg.split]
    if not records:
        raise ShardError(f"{cfg.dataset}: no samples" + (f" in split {cfg.split!r}" if cfg.split != "all" else ""))
    options = cfg.options()
    out = cfg.out
    check_writable_folder(out)
    with write_lock(out):
        clean_stale_temp_files(out)
        samples = _scan(cfg, records)
        by_id = {s.record.id: s for s in samples}
        prev, prev_rows = _previous(out, options)

        # the kept prefix: complete previous shards whose samples are unchanged
        shards: list[ShardInfo] = []
        rows: list[dict] = []
        used: set[str] = set()
        if prev is not None:
            for i, ps in enumerate(prev.shards):
                complete = i < len(prev.shards) - 1 or ps.num_samples == options.samples_per_shard
                old = prev_rows.get(ps.name, [])
                if not complete or ps.first_index != len(rows) or len(old) != ps.num_samples:
                    break
                ids = [str(r["id"]) for r in old]
                if any(i_ not in by_id or i_ in used for i_ in ids) or len(set(ids)) != len(ids):
                    break
                new = [mf.manifest_row(len(rows) + j, sample_key(len(rows) + j), ps.name, by_id[i_].record,
                                       by_id[i_].sha256, sum(by_id[i_].sizes.values())) for j, i_ in enumerate(ids)]
                if not _rows_match(old, new) or not _file_matches(out / ps.name, ps):
                    break
                shards.append(ps)
                rows += new
                used.update(ids)
        reused = [s.name for s in shards]

        written: list[str] = []
        rest = [s for s in samples if s.record.id not in used]
        groups = _plan(rest, options)
        total = len(shards) + len(groups)
        prev_by_name = {s.name: s for s in (prev.shards if prev else [])}
        for group in groups:
            name = shard_name(len(shards))
            new = [mf.manifest_row(len(rows) + j, sample_key(len(rows) + j), name, s.record, s.sha256,
                                   sum(s.sizes.values())) for j, s in enumerate(group)]
            old = prev_by_name.get(name)
            if old is not None and _rows_match(prev_rows.get(name, []), new) and _file_matches(out / name, old):
                info = old
                reused.append(name)
            else:
                (out / INDEX_FILE).unlink(missing_ok=True)  # from the first change on, the folder is incomplete
                info = _write_shard(out / name, new, group)
                written.append(name)
            shards.append(info)
            rows += new
            if progress:
                progress(name, len(shards), total)

        tmp = tmp_name(out / MANIFEST_FILE)
        try:
            mf.write_manifest(tmp, rows)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, out / MANIFEST_FILE)
        finally:
            if tmp.exists():
                tmp.unlink()
        index = ShardIndex(dataset_fingerprint=mf.dataset_fingerprint(rows), source=str(cfg.dataset),
                           num_samples=len(rows), shards=shards, dataset_metadata=dataset_metadata,
                           options=options, tool_version=__version__)
        atomic_write_text(out / INDEX_FILE, json.dumps(index.model_dump(mode="json"), indent=1) + "\n")
        listed = {s.name for s in shards}
        removed = []
        for p in sorted(out.iterdir()):
            if is_shard_name(p.name) and p.name not in listed and p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p.name)
    return ShardResult(index=index, written=written, reused=reused, removed=removed)
