"""Reading shard folders: the index, the manifest, and the samples of each tar, streamed in memory.

`iter_samples(folder)` yields ``(key, members)`` for every sample of a shard folder in manifest
order, ``members`` mapping member names (``mp4``, ``depth.npz``, ``record.json`` ...) to their
bytes; nothing is unpacked to disk. `ShardReader` reads one tar from any binary file object
(a local file, an fsspec stream), hashing what it reads, so a reader can verify the shard's
sha256 in the same pass.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

from pydantic import ValidationError

from fwdata.shards.format import INDEX_FILE, MANIFEST_FILE, ShardFormatError, ShardIndex


class ShardReadError(ValueError):
    """A tar shard that cannot be read to its end (truncated, damaged header, not a tar)."""


def is_shard_folder(folder: Union[str, Path]) -> bool:
    """True for a folder holding `shards.json` (written last by `fwdata shard`)."""
    return (Path(folder) / INDEX_FILE).is_file()


def load_index(folder: Union[str, Path]) -> ShardIndex:
    """Read and validate `folder/shards.json`. Raises ShardFormatError (one line naming the file)."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise ShardFormatError(f"{path}: missing; is {folder} a shard folder made by `fwdata shard` (and finished)?")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ShardFormatError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(raw, dict) or raw.get("format") != "fwdata-shards":
        raise ShardFormatError(f"{path}: not an fwdata shard index (format is not 'fwdata-shards')")
    if raw.get("version") != 1:
        raise ShardFormatError(f"{path}: shard format version {raw.get('version')!r} is not supported (known: 1)")
    try:
        return ShardIndex.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ShardFormatError(f"{path}: {loc}: {err['msg']}") from None


def load_manifest(folder: Union[str, Path]):
    """`folder/manifest.parquet` as a pandas DataFrame. Raises ShardFormatError when it cannot be read."""
    import pandas as pd

    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ShardFormatError(f"{path}: missing")
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise ShardFormatError(f"{path}: cannot be read as Parquet ({type(e).__name__}: {str(e)[:200]})") from None


class _HashingReader:
    """A read-only file wrapper that hashes (sha256) and counts every byte read, and remembers where
    the last non-zero byte was (to find data after the tar's end-of-archive blocks)."""

    def __init__(self, fileobj: BinaryIO):
        self._f = fileobj
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.last_nonzero = -1

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data:
            self.sha256.update(data)
            stripped = len(data.rstrip(b"\0"))
            if stripped:
                self.last_nonzero = self.size + stripped - 1
            self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class ShardReader:
    """The samples of one WebDataset tar, read in one streaming pass.

    Iterating yields ``(key, members)``: consecutive tar members ``<key>.<member>`` grouped by key
    (the WebDataset convention: the key ends at the first dot of the file name). Raises
    ShardReadError for a tar that cannot be read to its end, a member that is not a regular file,
    or data after the end-of-archive blocks (what a damaged header leaves: `tarfile` stops there
    silently). After iterating (or `drain()`), `sha256` and `size` describe the whole file.
    """

    def __init__(self, fileobj: BinaryIO, name: str = "<shard>"):
        self.name = name
        self._reader = _HashingReader(fileobj)

    @property
    def sha256(self) -> str:
        return self._reader.sha256.hexdigest()

    @property
    def size(self) -> int:
        return self._reader.size

    def drain(self) -> None:
        """Read (and hash) whatever is left of the file."""
        self._reader.drain()

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        key: Optional[str] = None
        members: dict[str, bytes] = {}
        try:
            tf = tarfile.open(fileobj=self._reader, mode="r|")
            for info in tf:
                if not info.isfile():
                    raise ShardReadError(f"{self.name}: member {info.name!r} is not a regular file")
                base = info.name.rsplit("/", 1)[-1]
                if "." not in base:
                    raise ShardReadError(f"{self.name}: member {info.name!r} has no '<key>.<member>' name")
                k, member = base.split(".", 1)
                fh = tf.extractfile(info)
                data = fh.read() if fh is not None else b""
                if len(data) != info.size:
                    raise ShardReadError(f"{self.name}: member {info.name!r} is truncated")
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                if member in members:
                    raise ShardReadError(f"{self.name}: member {info.name!r} is stored twice")
                members[member] = data
            end = tf.offset
        except ShardReadError:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise ShardReadError(f"{self.name}: not a readable tar after {self._reader.size} bytes "
                                 f"({type(e).__name__}: {str(e)[:200]}): truncated or damaged") from None
        self._reader.drain()
        if self._reader.last_nonzero >= end:
            raise ShardReadError(f"{self.name}: data after the end of the archive at byte {end} (a damaged "
                                 f"member header ends the tar early)")
        if key is not None:
            yield key, members


def iter_shard(path: Union[str, Path]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, members)`` of one local tar shard (see `ShardReader`)."""
    path = Path(path)
    with open(path, "rb") as fh:
        yield from ShardReader(fh, path.name)


def iter_samples(folder: Union[str, Path], shards: Optional[list[str]] = None
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, members)`` of every sample of a shard folder, shard by shard in `shards.json` order
    (which is manifest order), or only of the named `shards`. Raises ShardFormatError / ShardReadError."""
    folder = Path(folder)
    index = load_index(folder)
    names = [s.name for s in index.shards]
    if shards is not None:
        unknown = sorted(set(shards) - set(names))
        if unknown:
            raise ShardFormatError(f"{folder / INDEX_FILE}: lists no shard {unknown[0]!r}")
        names = [n for n in names if n in set(shards)]
    for name in names:
        path = folder / name
        if not path.is_file():
            raise ShardFormatError(f"{path}: missing (listed in {INDEX_FILE})")
        yield from iter_shard(path)
