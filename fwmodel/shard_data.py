"""Training on WebDataset shards (`fwdata shard`): the shard index, the selection, a resumable stream.

SHARDS/ (format "fwdata-shards", version 1; a local folder or any fsspec URL):

    shard-000000.tar, ...   one WebDataset sample per dataset sample, in metadata order; __key__ is %08d
                            (the global index); members mp4, depth.npz, points.npz, camera.json,
                            camera.txt, record.json (the sample's SampleRecord)
    manifest.parquet        one row per sample (index, key, id, shard, split, T/H/W, quality)
    shards.json             written last: format, version, num_samples, shards [{name, num_samples,
                            bytes, sha256, first_index}], dataset_metadata (metadata.json less samples)

Selection: shards.json's dataset_metadata plus every sample's record.json (read by seeking over the
other members) is the dataset's metadata again, and `fwmodel.data.select_records` picks the same
samples in the same order as for the dataset folder (so the data fingerprint is the same too).
Samples are decoded in memory by the folder dataset's own code (`fwmodel.data.make_sample` on a
`MemorySource`).

Order of epoch e on rank r of W (B samples per micro-batch per rank), computed from the index alone:

    shards      those holding a selected sample, in manifest order; permuted with (seed, e) when
                data.shuffle
    rank        the shards at positions r, r + W, ... of that order: each rank reads only its own
                shards, so no sample is on two ranks in an epoch
    samples     the rank's samples in shard order, then through a seeded shuffle buffer of
                data.shuffle_buffer samples ((seed, e, r); only when data.shuffle)
    padding     wrapped (as `StepSampler` pads) to M_e x B samples, M_e = the micro-batches of the
                largest rank: every rank steps through the same number of micro-batches per epoch

The rank's micro-batch k (counted over epochs from 0) goes to DataLoader worker (k - start) mod
num_workers, the order in which the DataLoader hands out batches, so a rank sees the same samples
in the same order whatever data.num_workers; `start` (micro-batches consumed, from --resume) skips
exactly what the stopped run used, without reading it. Window seeds are `StepSampler`'s (seed, k,
r * B + b). With data.shuffle = false on one process the order is the manifest order padded like
`StepSampler`'s: the same samples, order and seeds as a run on the dataset folder.

Latent cache: a folder cache (fwmodel.cache.LatentCache, keyed by sample id) is read per sample as on the
dataset folder. A sharded cache (`fwmodel cache SHARDS`, fwmodel.cache.ShardedLatentCache: one cache tar
per data shard, same name and keys) is read beside the data: while a worker reads data shard N it reads
cache shard N forward, taking the latents/text members of the same samples (one open tar each, seeking
over the others), so the order, ranks, workers and resume position above are unchanged. At start the
cache must cover the selection with each sample under its data shard and key, and every cache shard
needed must be present with its size and the keys its index lists; each entry's sha256 is checked when
it is read.

Why plain `tarfile` and not webdataset's pipeline (split_by_node / split_by_worker / shuffle): those
hand whole shards to DataLoader workers, so the order depends on the number of workers, and the
shuffle buffer's rng position cannot be restored mid-epoch without replaying (reading) the stream.
Here the order needs no data, and each worker reads the rank's shards in order (local files, or
fsspec for URLs), seeking over the members of samples that are not its own.
"""

from __future__ import annotations

import math
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from pydantic import ValidationError
from torch.utils.data import IterableDataset, get_worker_info

from fwdata.dataset.contract import DatasetMetadata, SampleRecord
from fwdata.shards.format import INDEX_FILE, MANIFEST_FILE, RECORD_MEMBER, ShardFormatError, ShardIndex, ShardInfo
from fwdata.shards.reader import load_index
from fwmodel.data import DataConfig, DataError, MemorySource, Selection, data_fingerprint, make_sample, mix_seed, \
    select_records

GEOMETRY_MEMBERS = ("depth.npz", "points.npz", "camera.json")  # what training reads; plus "mp4" without a cache


# --------------------------------------------------------------------------- where the shards are


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/+(.*)$")


def location(root) -> str:
    """The shard root as a string: a local path, or a URL (`s3://b/x`; a pathlib.Path made from a URL
    has lost one slash, `s3:/b/x`, which is put back). `file://` URLs become local paths."""
    text = str(root)
    m = _SCHEME.match(text)
    if m is None or len(m.group(1)) == 1:  # no scheme (or a Windows drive letter)
        return text
    if m.group(1) == "file":
        return "/" + m.group(2)
    return f"{m.group(1)}://{m.group(2)}"


def is_url(loc: str) -> bool:
    """A location (`location`) that fsspec opens, not a local path."""
    return "://" in loc


def join_location(loc: str, name: str) -> str:
    """`name` under the location `loc` (a path, or a URL joined with /)."""
    return f"{loc.rstrip('/')}/{name}" if is_url(loc) else str(Path(loc) / name)


def location_exists(loc: str, name: str) -> bool:
    """Whether the file `name` exists under the location `loc` (False when a URL's store cannot be reached)."""
    if not is_url(loc):
        return (Path(loc) / name).is_file()
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(join_location(loc, name))
        return fs.isfile(path)
    except Exception:  # an unknown protocol or an unreachable store: not a shard root we can read
        return False


def open_location(loc: str, name: str):
    """A binary, seekable file object for `name` under the shard root."""
    if not is_url(loc):
        return open(Path(loc) / name, "rb")
    import fsspec

    return fsspec.open(join_location(loc, name), "rb").open()


def is_shard_root(root) -> bool:
    """True when `root` holds shards.json (a finished `fwdata shard` output)."""
    return root is not None and location_exists(location(root), INDEX_FILE)


def check_not_incomplete(root) -> None:
    """DataError when `root` is a local folder with shards but no shards.json (a writer that did not finish)."""
    if root is None or is_url(location(root)):
        return
    folder = Path(location(root))
    if folder.is_dir() and not (folder / INDEX_FILE).is_file() and not (folder / "metadata.json").is_file() and (
            (folder / MANIFEST_FILE).is_file() or any(folder.glob("shard-*.tar"))):
        raise DataError(f"{folder} holds shards but no {INDEX_FILE} (written last by `fwdata shard`): the shards are "
                        f"incomplete; run `fwdata shard DATASET --out {folder}` again to finish them")


# --------------------------------------------------------------------------- reading shards


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: "dir/00000042.depth.npz" -> ("dir/00000042", "depth.npz")."""
    directory, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{directory}/{key}" if directory else key), ext


def iter_shard(loc: str, shard: ShardInfo, want: Callable[[int, str], bool]) -> Iterator[tuple[int, dict[str, bytes]]]:
    """(global index, {member: bytes}) for each sample of one shard, in tar order; only the members for
    which `want(index, member)` holds are read (the others are seeked over). DataError when the shard is
    unreadable or holds a key outside its range."""
    try:
        fh = open_location(loc, shard.name)
    except OSError as err:
        raise DataError(f"shard {join_location(loc, shard.name)} cannot be opened ({err}); check the shard folder "
                        "(`fwdata validate SHARDS`)") from None
    where = join_location(loc, shard.name)
    last = range(shard.first_index, shard.first_index + shard.num_samples)
    with fh:
        try:
            with tarfile.open(fileobj=fh, mode="r:") as tar:
                current, members = None, {}
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = _split_member(info.name)
                    try:
                        index = int(key.rpartition("/")[2])
                    except ValueError:
                        raise DataError(f"{where}: member {info.name!r} has no %08d sample key") from None
                    if index not in last:
                        raise DataError(f"{where}: sample key {key} is outside the shard's range "
                                        f"{last.start}-{last.stop - 1} ({INDEX_FILE})")
                    if index != current:
                        if current is not None:
                            yield current, members
                        current, members = index, {}
                    if want(index, ext):
                        members[ext] = tar.extractfile(info).read()
                if current is not None:
                    yield current, members
        except (tarfile.TarError, EOFError) as err:
            raise DataError(f"shard {where} is damaged ({err}); check it with `fwdata validate SHARDS` and write the "
                            "shards again") from None


class ShardSet:
    """An opened shard root: its index, every sample's record (global index order) and its shard number."""

    def __init__(self, root):
        self.location = location(root)
        self.index = self._read_index()
        self._check_files()
        self.records, self.shard_of = self._read_records()
        self._check_manifest()
        try:
            self.metadata = DatasetMetadata.model_validate({**self.index.dataset_metadata, "samples": self.records})
        except ValidationError as err:
            raise DataError(f"{join_location(self.location, INDEX_FILE)}: dataset_metadata with the shards' records is not a "
                            f"valid metadata.json ({err.errors()[0]['msg']})") from None

    def _read_index(self) -> ShardIndex:
        """shards.json, validated by fwdata.shards (the format's own model)."""
        path = join_location(self.location, INDEX_FILE)
        try:
            if not is_url(self.location):
                index = load_index(self.location)
            else:
                with open_location(self.location, INDEX_FILE) as f:
                    index = ShardIndex.model_validate_json(f.read())
        except ShardFormatError as err:
            raise DataError(str(err)) from None
        except (OSError, ValidationError, ValueError) as err:
            first = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            raise DataError(f"{path} is not a shard index ({first})") from None
        if sum(s.num_samples for s in index.shards) != index.num_samples:
            raise DataError(f"{path}: the shards hold {sum(s.num_samples for s in index.shards)} samples, "
                            f"num_samples says {index.num_samples}")
        return index

    def _check_files(self) -> None:
        """Every shard is there with its size (local files; sha256 is `fwdata validate SHARDS`'s, too slow here)."""
        for shard in self.index.shards:
            if is_url(self.location):
                if not location_exists(self.location, shard.name):
                    raise DataError(f"shard {join_location(self.location, shard.name)} is missing ({INDEX_FILE} lists it)")
                continue
            path = Path(self.location) / shard.name
            if not path.is_file():
                raise DataError(f"shard {path} is missing ({INDEX_FILE} lists {len(self.index.shards)} shards): copy "
                                "the whole shard folder, or write it again with `fwdata shard`")
            if path.stat().st_size != shard.bytes:
                raise DataError(f"shard {path} is damaged: {path.stat().st_size} bytes, {INDEX_FILE} says {shard.bytes} "
                                "(truncated?); write the shards again with `fwdata shard`")

    def _read_records(self) -> tuple[list[SampleRecord], list[int]]:
        records: list[SampleRecord] = []
        shard_of: list[int] = []
        for number, shard in enumerate(self.index.shards):
            where = join_location(self.location, shard.name)
            seen = []
            for index, members in iter_shard(self.location, shard, lambda i, ext: ext == RECORD_MEMBER):
                if RECORD_MEMBER not in members:
                    raise DataError(f"{where}: sample {index:08d} has no record.json")
                try:
                    records.append(SampleRecord.model_validate_json(members[RECORD_MEMBER]))
                except ValidationError as err:
                    raise DataError(f"{where}: {index:08d}.record.json is not a sample record "
                                    f"({err.errors()[0]['msg']})") from None
                shard_of.append(number)
                seen.append(index)
            expected = list(range(shard.first_index, shard.first_index + shard.num_samples))
            if seen != expected:
                raise DataError(f"{where} holds samples {seen[:1]}..{seen[-1:]} ({len(seen)}), {INDEX_FILE} says "
                                f"{shard.num_samples} from {shard.first_index}: the shard does not match its index")
        if len(records) != self.index.num_samples:
            raise DataError(f"{join_location(self.location, INDEX_FILE)}: the shards hold {len(records)} samples, expected "
                            f"{self.index.num_samples} (shards not numbered contiguously?)")
        return records, shard_of

    def _check_manifest(self) -> None:
        import pyarrow.parquet as pq

        path = join_location(self.location, MANIFEST_FILE)
        try:
            with open_location(self.location, MANIFEST_FILE) as f:
                table = pq.read_table(f, columns=["index", "id"])
        except FileNotFoundError:
            raise DataError(f"{path} is missing: the shard folder is incomplete") from None
        except Exception as err:  # pyarrow raises several types for damaged files and missing columns
            raise DataError(f"{path} is unreadable ({str(err).splitlines()[0][:200]})") from None
        rows = dict(zip(table.column("index").to_pylist(), table.column("id").to_pylist()))
        ids = {i: r.id for i, r in enumerate(self.records)}
        if rows != ids:
            bad = next((i for i in sorted(set(rows) | set(ids)) if rows.get(i) != ids.get(i)), None)
            raise DataError(f"{path} does not match the shards (sample {bad}: manifest {rows.get(bad)!r}, shards "
                            f"{ids.get(bad)!r}); write the shards again")

    def select(self, cfg: DataConfig) -> Selection:
        return select_records(self.metadata, cfg, self.location)


# --------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    first: int  # the rank's micro-batch index of the epoch's first micro-batch
    micro_batches: int  # M_e, the same on every rank
    shards: list[int]  # this rank's shards, in reading order
    order: list[int]  # this rank's samples (positions in the selection), M_e x B, padded


class ShardDataset(IterableDataset):
    """The selected samples of a shard root as an infinite, resumable, rank- and worker-aware stream of
    training samples (the dicts of fwmodel.data; see the module docstring for the order).
    `layout(...)` sets the process's place (batch size, ranks, seed, start) before iterating."""

    def __init__(self, cfg: DataConfig, shards: ShardSet, selection: Selection, text_dim: Optional[int] = None,
                 cache=None):
        self.cfg, self.shards = cfg, shards
        self.root = cfg.root
        self.records = selection.records
        self.skipped = selection.skipped
        self.random_init = selection.random_init
        self.fingerprint = data_fingerprint(self.records)
        self.cache = cache
        position = {r.id: i for i, r in enumerate(shards.records)}
        self.global_index = [position[r.id] for r in self.records]  # selection position -> global index
        from fwmodel.cache import ShardedLatentCache

        self.sharded_cache = isinstance(cache, ShardedLatentCache)  # streamed beside the data shards
        if self.sharded_cache:
            cache.check_covers(self.records, text_dim, shards=shards, global_index=self.global_index)
        elif cache is not None:
            cache.check_covers(self.records, text_dim)
        self.selected = {g: i for i, g in enumerate(self.global_index)}  # global index -> selection position
        by_shard: dict[int, list[int]] = {}
        for i, g in enumerate(self.global_index):
            by_shard.setdefault(shards.shard_of[g], []).append(i)
        self.by_shard = by_shard  # shard number -> selection positions, manifest order
        self.members = GEOMETRY_MEMBERS + (() if cache is not None else ("mp4",))
        self.layout()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def uses_cache(self) -> bool:
        return self.cache is not None

    def layout(self, batch_size: int = 1, world_size: int = 1, rank: int = 0, seed: int = 0, start: int = 0
               ) -> "ShardDataset":
        """This process's place: B samples per micro-batch, rank of world_size, the run's seed, and the
        micro-batches already consumed (`start`)."""
        if len(self.by_shard) < world_size:
            raise DataError(
                f"{len(self.by_shard)} shard(s) hold training samples, fewer than the {world_size} processes: each "
                "rank reads its own shards; write more, smaller shards (`fwdata shard --samples-per-shard N`)"
            )
        self.batch_size, self.world_size, self.rank, self.seed, self.start = batch_size, world_size, rank, seed, start
        self._epochs: list[tuple[int, int]] = []  # (first micro-batch, M_e) per epoch computed so far
        self._plan: Optional[EpochPlan] = None
        return self

    # ---- the order (no data read) ----

    def _rank_shards(self, epoch: int) -> list[list[int]]:
        shards = sorted(self.by_shard)
        if self.cfg.shuffle:
            rng = np.random.default_rng(mix_seed(self.seed, epoch, 1))
            shards = [shards[i] for i in rng.permutation(len(shards))]
        return [shards[r::self.world_size] for r in range(self.world_size)]

    def _micro_batches(self, epoch: int) -> int:
        counts = [sum(len(self.by_shard[s]) for s in ss) for ss in self._rank_shards(epoch)]
        return math.ceil(max(counts) / self.batch_size)

    def locate(self, k: int) -> tuple[int, int]:
        """(epoch, micro-batch within it) of the rank's micro-batch k."""
        while not self._epochs or self._epochs[-1][0] + self._epochs[-1][1] <= k:
            first = self._epochs[-1][0] + self._epochs[-1][1] if self._epochs else 0
            self._epochs.append((first, self._micro_batches(len(self._epochs))))
        for epoch, (first, count) in enumerate(self._epochs):  # few epochs in a run: a scan is enough
            if first <= k < first + count:
                return epoch, k - first
        raise AssertionError(k)

    def epoch_of(self, k: int) -> float:
        """Epochs done after k micro-batches (fractional), for the logs."""
        epoch, j = self.locate(k)
        return epoch + j / self._epochs[epoch][1]

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is not None and self._plan.epoch == epoch:
            return self._plan
        self.locate(0)
        while len(self._epochs) <= epoch:
            self.locate(self._epochs[-1][0] + self._epochs[-1][1])
        first, count = self._epochs[epoch]
        shards = self._rank_shards(epoch)[self.rank]
        samples = [i for s in shards for i in self.by_shard[s]]
        if self.cfg.shuffle and self.cfg.shuffle_buffer > 1:
            samples = shuffle_buffer(samples, self.cfg.shuffle_buffer,
                                     np.random.default_rng(mix_seed(self.seed, epoch, self.rank, 2)))
        order = [samples[i % len(samples)] for i in range(count * self.batch_size)]
        self._plan = EpochPlan(epoch, first, count, shards, order)
        return self._plan

    def items(self, k: int) -> list[tuple[int, int]]:
        """(selection position, window seed) of the B samples of the rank's micro-batch k."""
        epoch, j = self.locate(k)
        order = self.plan(epoch).order
        B = self.batch_size
        return [(order[j * B + b], mix_seed(self.seed, k, self.rank * B + b)) for b in range(B)]

    # ---- the data ----

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        k = self.start + worker
        while True:
            epoch, _ = self.locate(k)
            plan = self.plan(epoch)
            end = plan.first + plan.micro_batches
            mine = list(range(k, end, workers))
            yield from self._read(plan, [item for kk in mine for item in self.items(kk)])
            k = mine[-1] + workers if mine else k

    def _read(self, plan: EpochPlan, items: list[tuple[int, int]]) -> Iterator[dict]:
        """Decode `items` (selection position, seed) in order, reading the rank's shards of the epoch once
        in order (again from the start only for padded repeats); bytes are held only from when their
        sample is read until it is used. With a sharded latent cache, cache shard N is read beside data
        shard N, forward, taking the entries of the samples read from the data shard."""
        from fwmodel.cache import advance_to

        remaining = Counter(pos for pos, _ in items)
        held: dict[int, tuple[str, dict[str, bytes], object]] = {}
        reader = None
        loc = self.shards.location

        def wanted(index: int, member: str) -> bool:
            pos = self.selected.get(index)
            return pos is not None and remaining[pos] > 0 and pos not in held and member in self.members

        def stream():
            for number in plan.shards:
                shard = self.shards.index.shards[number]
                target = [-1]  # the data sample whose cache entry the cache reader reads next
                cached = self.cache.reader(shard, lambda i, m: i == target[0]) if self.sharded_cache else None
                try:
                    for index, members in iter_shard(loc, shard, wanted):
                        if not members:
                            continue
                        where = f"{shard.name}/{index:08d}"
                        cache = self.cache
                        if cached is not None:
                            target[0] = index
                            entry = advance_to(cached, index, join_location(self.cache.location, shard.name))
                            cache = self.cache.sample(self.records[self.selected[index]].id, entry,
                                                      join_location(self.cache.location, where))
                        yield self.selected[index], where, members, cache
                finally:
                    if cached is not None:
                        cached.close()

        for pos, seed in items:
            restarted = False
            while pos not in held:
                if reader is None:
                    reader = stream()
                try:
                    got, where, members, cache = next(reader)
                    held[got] = (where, members, cache)
                except StopIteration:
                    if restarted:
                        raise DataError(f"sample {self.records[pos].id} was not found in its shard") from None
                    reader, restarted = None, True
            where, members, cache = held.pop(pos)
            remaining[pos] -= 1
            record = self.records[pos]
            yield make_sample(self.cfg, record, MemorySource(members, join_location(loc, where)), pos, seed, cache)


def shuffle_buffer(items: list[int], size: int, rng: np.random.Generator) -> list[int]:
    """The order a shuffle buffer of `size` gives `items` (webdataset's algorithm: fill, then each new item
    swaps out a uniformly drawn one; drained at random at the end). Deterministic for one rng."""
    out, buffer = [], []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            out.append(buffer.pop())
    while buffer:
        i = int(rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        out.append(buffer.pop())
    return out


def open_shards(cfg: DataConfig) -> Optional[ShardSet]:
    """The ShardSet of data.root when it holds shards.json; None for a dataset folder. DataError for a
    shard folder without shards.json (incomplete) or with missing / damaged shards."""
    check_not_incomplete(cfg.root)
    if not is_shard_root(cfg.root):
        return None
    return ShardSet(cfg.root)
