"""`fwdata validate SHARDS/`: the per-sample checks on samples streamed from WebDataset shards, and the
checks of the shard folder itself (index, manifest, checksums, every sample exactly once).

A folder holding `shards.json` (fwdata.shards) is validated here; `validate_dataset` sends it. Each
tar is read once, in one streaming pass (its sha256 is computed on the way); each sample's members
are handed to the same per-sample checks as a dataset folder's files (`check_sample` with
`MemoryFiles`: nothing is unpacked to disk), then to the same gates. Validation never writes.
The checks of metadata.json and the folder tree do not apply (a shard folder has neither); the
record of each sample is its ``record.json`` member.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from pydantic import ValidationError

from fwdata.dataset.contract import SampleRecord
from fwdata.shards.format import (
    INDEX_FILE,
    MANIFEST_FILE,
    RECORD_MEMBER,
    ShardFormatError,
    ShardIndex,
    ShardInfo,
    member_files,
    sample_key,
)
from fwdata.shards.reader import ShardReader, ShardReadError, is_shard_folder, load_index, load_manifest
from fwdata.validate import gates
from fwdata.validate.registry import REGISTRY, CheckTally, Severity, declared, emits, register
from fwdata.validate.results import Finding, SampleResult, SampleSummary, ValidateOptions, ValidationReport
from fwdata.validate.sample import MemoryFiles, _pydantic_summary, check_sample

__all__ = ["SHARD_CHECKS", "is_shard_folder", "validate_shards"]

E = Severity.ERROR
register("shards.index", E, "dataset", "shards.json missing, not JSON or not the fwdata-shards format version 1 "
                                       "(exit 2), or shard counts in it that do not add up")
register("shards.manifest", E, "dataset", "manifest.parquet unreadable or missing columns, index not 0..N-1, keys "
                                          "not %08d of the index, ids listed twice, or rows per shard that differ "
                                          "from shards.json")
register("shards.missing_shard", E, "dataset", "a shard listed in shards.json that is not in the folder")
register("shards.checksum", E, "dataset", "a shard whose size or sha256 differs from shards.json (a flipped byte, "
                                          "a replaced file)")
register("shards.read", E, "dataset", "a shard that cannot be read to its end as a tar (truncated, damaged header, "
                                      "not a tar): one finding per shard")
register("shards.duplicate_sample", E, "dataset", "a sample key or sample id found twice in the shards")
register("shards.manifest_match", E, "dataset", "manifest rows that disagree with the shards: a row naming another "
                                                "shard, id or size than the sample has, a sample without a row, a row "
                                                "whose sample no shard holds")
del E
#: the ids of the shard folder checks
SHARD_CHECKS = tuple(c for c in REGISTRY if c.startswith("shards."))

#: metadata.json and tree checks, which a shard folder has nothing for
_FOLDER_ONLY = ("schema.metadata_json", "schema.version", "schema.metadata_model", "schema.path_escape",
                "schema.orphan_file", "schema.splits", "schema.statistics", "schema.duplicate_ids")
#: manifest columns the checks need
_REQUIRED_COLUMNS = ("index", "key", "id", "shard", "split", "num_frames", "height", "width")


def _find(check: str, message: str, sample: Optional[str] = None, file: Optional[str] = None,
          value: Optional[float] = None) -> Finding:
    return Finding(check=check, severity=declared(check).severity, message=message, sample=sample, file=file,
                   value=value)


@emits("shards.index")
def _read_index(root: Path) -> tuple[Optional[ShardIndex], list[Finding]]:
    try:
        index = load_index(root)
    except ShardFormatError as e:
        return None, [_find("shards.index", str(e).replace(f"{root}/", ""), file=INDEX_FILE)]
    out = []
    total = sum(s.num_samples for s in index.shards)
    if total != index.num_samples:
        out.append(_find("shards.index", f"the shards hold {total} samples, num_samples says {index.num_samples}",
                         file=INDEX_FILE))
    names = [s.name for s in index.shards]
    if len(set(names)) != len(names):
        out.append(_find("shards.index", "a shard is listed twice", file=INDEX_FILE))
    return index, out


@emits("shards.manifest")
def _check_manifest(root: Path, index: ShardIndex) -> tuple[Optional[dict[str, dict]], list[Finding]]:
    """Manifest rows by key (None when the manifest is unusable) and the manifest's own problems."""
    def find(msg: str) -> Finding:
        return _find("shards.manifest", msg, file=MANIFEST_FILE)

    try:
        df = load_manifest(root)
    except ShardFormatError as e:
        return None, [find(str(e).replace(f"{root}/", ""))]
    missing = [c for c in _REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        return None, [find(f"columns {missing} are missing")]
    rows = df.to_dict("records")
    out = []
    if len(rows) != index.num_samples:
        out.append(find(f"{len(rows)} rows, shards.json lists {index.num_samples} samples"))
    indices = [int(r["index"]) for r in rows]
    if sorted(indices) != list(range(len(rows))):
        out.append(find(f"index is not 0..{len(rows) - 1} once each"))
    bad_keys = [str(r["key"]) for r in rows if str(r["key"]) != sample_key(int(r["index"]))]
    if bad_keys:
        out.append(find(f"keys {bad_keys[:4]} are not the %08d of their index"))
    ids = [str(r["id"]) for r in rows]
    twice = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if twice:
        out.append(find(f"sample ids listed more than once: {twice[:4]}"))
    known = {s.name: s for s in index.shards}
    per_shard: dict[str, list[int]] = {}
    for r in rows:
        per_shard.setdefault(str(r["shard"]), []).append(int(r["index"]))
    unknown = sorted(set(per_shard) - set(known))
    if unknown:
        out.append(find(f"rows name shards shards.json does not list: {unknown[:4]}"))
    for name, info in known.items():
        got = per_shard.get(name, [])
        if len(got) != info.num_samples or (got and min(got) != info.first_index):
            out.append(find(f"{len(got)} rows name {name} (first index {min(got) if got else '-'}), shards.json says "
                            f"{info.num_samples} from index {info.first_index}"))
    by_key: dict[str, dict] = {}
    for r in rows:
        by_key.setdefault(str(r["key"]), r)
    return by_key, out


@emits("shards.missing_shard")
def _missing_shard(root: Path, info: ShardInfo) -> list[Finding]:
    path = root / info.name
    if path.is_file():
        return []
    what = "is not a regular file" if path.exists() else "is missing"
    return [_find("shards.missing_shard", f"{info.name} {what} ({info.num_samples} samples from index "
                                          f"{info.first_index})", file=info.name)]


@emits("shards.checksum")
def _checksum(info: ShardInfo, sha256: str, size: int) -> list[Finding]:
    if size != info.bytes:
        return [_find("shards.checksum", f"{info.name} has {size} bytes, shards.json says {info.bytes}", file=info.name,
                      value=size)]
    if sha256 != info.sha256:
        return [_find("shards.checksum", f"{info.name} has sha256 {sha256[:16]}..., shards.json says "
                                         f"{info.sha256[:16]}...: changed or damaged after it was written",
                      file=info.name)]
    return []


@emits("shards.read")
def _read_failed(info: ShardInfo, message: str, sha256: Optional[str], size: Optional[int]) -> list[Finding]:
    extra = ""
    if size is not None and size != info.bytes:
        extra = f" ({size} bytes, shards.json says {info.bytes})"
    elif sha256 is not None and sha256 != info.sha256:
        extra = " (its sha256 differs from shards.json)"
    return [_find("shards.read", message + extra, file=info.name)]


class _Scan:
    """Streams the shards once, in shards.json order; the samples to check come out of `samples()`,
    the findings about the shards and the manifest collect in `findings`."""

    def __init__(self, root: Path, index: ShardIndex, rows: Optional[dict[str, dict]], wanted: Optional[set[str]]):
        self.root, self.index, self.rows, self.wanted = root, index, rows, wanted
        self.findings: list[Finding] = []
        self.seen_keys: dict[str, str] = {}  # key -> shard
        self.seen_ids: dict[str, str] = {}  # id -> key
        self.unread: set[str] = set()  # shards missing or not readable to the end

    def samples(self) -> Iterator[tuple[SampleRecord, dict[str, bytes]]]:
        for info in self.index.shards:
            missing = _missing_shard(self.root, info)
            if missing:
                self.findings += missing
                self.unread.add(info.name)
                continue
            try:
                fh = open(self.root / info.name, "rb")
            except OSError as e:
                self.findings += _read_failed(info, f"{info.name} cannot be opened ({e.strerror or e})", None, None)
                self.unread.add(info.name)
                continue
            with fh:
                reader = ShardReader(fh, info.name)
                error = None
                try:
                    for key, members in reader:
                        entry = self._entry(info.name, key, members)
                        if entry is not None:
                            yield entry
                except ShardReadError as e:
                    error = str(e)
                try:
                    reader.drain()
                except OSError as e:
                    error = error or f"{info.name}: read error ({e.strerror or e})"
            if error is not None:
                self.findings += _read_failed(info, error, reader.sha256, reader.size)
                self.unread.add(info.name)
            else:
                self.findings += _checksum(info, reader.sha256, reader.size)

    @emits("shards.duplicate_sample", "shards.manifest_match", "schema.sample_record", "schema.missing_file")
    def _entry(self, shard: str, key: str, members: dict[str, bytes]) -> Optional[tuple[SampleRecord, dict]]:
        """One sample read from a shard: bookkeeping and member checks; the record and its files by dataset
        path, or None when it cannot (or need not) be checked."""
        where = f"{shard}:{key}"
        if key in self.seen_keys:
            self.findings.append(_find("shards.duplicate_sample", f"sample key {key} in {shard} was already read "
                                                                  f"from {self.seen_keys[key]}", file=shard))
            return None
        self.seen_keys[key] = shard
        if RECORD_MEMBER not in members:
            self.findings.append(_find("schema.sample_record", f"{where} has no {RECORD_MEMBER} member", file=shard))
            return None
        try:
            rec = SampleRecord.model_validate_json(members[RECORD_MEMBER])
        except ValidationError as e:
            self.findings.append(_find("schema.sample_record", f"{where} {RECORD_MEMBER}: {_pydantic_summary(e)}",
                                       file=shard))
            return None
        if rec.id in self.seen_ids:
            self.findings.append(_find("shards.duplicate_sample", f"sample {rec.id} is stored twice: keys "
                                                                  f"{self.seen_ids[rec.id]} and {key} ({shard})",
                                       sample=rec.id, file=shard))
            return None
        self.seen_ids[rec.id] = key
        if self.rows is not None:
            row = self.rows.get(key)
            if row is None:
                self.findings.append(_find("shards.manifest_match", f"{where} ({rec.id}) has no manifest row",
                                           sample=rec.id, file=MANIFEST_FILE))
            else:
                diffs = [f"{col} {row[col]!r} (the sample has {got!r})"
                         for col, got in (("shard", shard), ("id", rec.id), ("split", rec.split),
                                          ("num_frames", rec.num_frames), ("height", rec.height),
                                          ("width", rec.width))
                         if str(row[col]) != str(got)]
                if diffs:
                    self.findings.append(_find("shards.manifest_match", f"manifest row {key} says " + ", ".join(diffs),
                                               sample=rec.id, file=MANIFEST_FILE))
        if self.wanted is not None and rec.id not in self.wanted:
            return None
        files = {}
        for member, rel in member_files(rec).items():
            if member in members:
                files[rel] = members[member]
            elif member != "ply" or self.index.options.ply:
                self.findings.append(_find("schema.missing_file", f"{rel}: {where} has no {member} member",
                                           sample=rec.id, file=rel))
        return rec, files

    @emits("shards.manifest_match")
    def unseen_rows(self) -> list[Finding]:
        """Manifest rows no shard held (rows of missing or unreadable shards are covered by those findings)."""
        if self.rows is None:
            return []
        out = []
        for key, row in self.rows.items():
            if key not in self.seen_keys and str(row["shard"]) not in self.unread:
                out.append(_find("shards.manifest_match", f"manifest row {key} ({row['id']}) names {row['shard']}, "
                                                          f"which does not hold it", sample=str(row["id"]),
                                 file=MANIFEST_FILE))
        return out


class _Tasks:
    """The samples of a scan as worker tasks (a lazy sequence: run_in_processes needs only len and iter)."""

    def __init__(self, scan: _Scan, total: int, root: str, tol: dict):
        self.scan, self.total, self.root, self.tol = scan, total, root, tol

    def __len__(self) -> int:
        return max(1, self.total)

    def __iter__(self):
        for rec, files in self.scan.samples():
            yield self.root, rec.model_dump_json(), self.tol, files


def _results(scan: _Scan, total: int, root: Path, tol: gates.Tolerances, workers: int
             ) -> Iterator[tuple[SampleRecord, SampleResult]]:
    """(record, per-sample result) of every sample streamed from the shards, in shard order."""
    if workers == 0:
        for rec, files in scan.samples():
            yield rec, check_sample(root, rec, tol, files=MemoryFiles(files))
        return
    from fwdata.runtime import run_in_processes
    from fwdata.validate import _crash_result
    from fwdata.validate.sample import _check_sample_task

    tasks = _Tasks(scan, total, str(root), tol.model_dump())
    for (_, rec_json, _, _), res, err in run_in_processes(_check_sample_task, tasks, workers, threads=1, ordered=True):
        rec = SampleRecord.model_validate_json(rec_json)
        yield rec, (res if err is None else _crash_result(rec, err))


def validate_shards(opts: ValidateOptions, config: gates.GateConfig, gates_name: str,
                    progress: Optional[Callable[[str, int, int], None]], started: str, t0: float) -> ValidationReport:
    """Validate the shard folder `opts.dataset` (called by `validate_dataset`, which resolved the gates).

    Exit code 2 when shards.json cannot be read; 1 on any error finding; else 0. Same report as a
    dataset folder's, with the `shards.*` checks run and the metadata.json checks skipped.
    """
    from fwdata.validate import _add_sample_result, _apply_severity, _dataset_level, _finish, _random_models

    root = Path(opts.dataset)
    overrides = dict(config.severity)
    report = ValidationReport(dataset=str(root), gates=gates_name, started=started)
    tally = CheckTally()
    for cid in _FOLDER_ONLY:
        tally.add_skipped(cid, "a shard folder has no metadata.json or dataset tree (validate the dataset folder)")
    index, dataset_findings = _read_index(root)
    tally.add_ran(["shards.index"])
    if index is None:
        return _finish(report, _apply_severity(dataset_findings, overrides), [], tally, overrides, fatal=True, t0=t0)
    rows, found = _check_manifest(root, index)
    dataset_findings += found
    tally.add_ran(["shards.manifest"])
    wanted = None
    subset = bool(opts.samples)
    if subset:
        from fwdata.textout import SampleIdError, resolve_sample_ids
        from fwdata.validate.results import UsageError

        known = [str(r["id"]) for r in rows.values()] if rows is not None else []
        try:
            wanted = set(resolve_sample_ids(opts.samples, known))
        except SampleIdError as e:
            raise UsageError(str(e)) from None
    total = len(wanted) if wanted is not None else (len(rows) if rows is not None else index.num_samples)

    scan = _Scan(root, index, rows, wanted)
    summaries: list[SampleSummary] = []
    sample_findings: list[Finding] = []
    facts: list[gates.SampleFacts] = []
    for n, (rec, res) in enumerate(_results(scan, total, root, config.tolerances, opts.workers), start=1):
        _add_sample_result(res, rec, config, overrides, tally, summaries, sample_findings, facts)
        if progress:
            progress(res.id, n, max(total, n))
    dataset_findings += scan.findings + scan.unseen_rows()
    tally.add_ran(["shards.missing_shard", "shards.checksum", "shards.read", "shards.duplicate_sample",
                   "shards.manifest_match", "schema.sample_record", "schema.missing_file"])

    random_models = []
    provenance = index.dataset_metadata.get("provenance")
    if provenance is not None:
        from fwdata.dataset.contract import Provenance

        try:
            random_models = _random_models(Provenance.model_validate(provenance))
        except ValidationError:
            dataset_findings.append(Finding(check="shards.index", severity=REGISTRY["shards.index"].severity,
                                            message="dataset_metadata.provenance breaks the Provenance model",
                                            file=INDEX_FILE))
    dataset_findings += _dataset_level(facts, random_models, config, subset, tally)
    report.summary.samples_total = len(rows) if rows is not None else index.num_samples
    return _finish(report, _apply_severity(dataset_findings, overrides) + sample_findings, summaries, tally,
                   overrides, fatal=False, t0=t0)
