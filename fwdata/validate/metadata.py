"""Dataset-level checks: metadata.json (parse, version, model, records, ids, splits, statistics) and
the tree (orphans, symlinks out of the root)."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import ValidationError

from fwdata import __version__
from fwdata.dataset.layout import DERIVED_DIRS, INTERNAL_DIR, is_temp_name
from fwdata.dataset.contract import (
    DEPTH_NPZ,
    METADATA_FILE,
    POINTS_NPZ,
    SUPPORTED_SCHEMA_VERSIONS,
    ArraySpec,
    CameraFile,
    ContractError,
    DatasetMetadata,
    FrameCamera,
    PathEscapeError,
    SampleRecord,
    camera_txt_to_arrays,
    read_camera_txt,
    resolve_inside,
)
from fwdata.validate.registry import CheckTally, declared, emits
from fwdata.validate.results import Finding
from fwdata.validate.sample import _pydantic_summary


@dataclass
class _MetaResult:
    records: list[SampleRecord]
    findings: list[Finding]
    meta: Optional[DatasetMetadata]  # top level (samples emptied) when valid
    raw_samples: list[Any]
    fatal: bool = False


def _dfind(check: str, message: str, sample: Optional[str] = None, file: Optional[str] = None,
           value: Optional[float] = None) -> Finding:
    return Finding(check=check, severity=declared(check).severity, message=message, sample=sample, file=file,
                   value=value)


def check_metadata(root: Path, tally: CheckTally) -> _MetaResult:
    """schema.* checks of metadata.json, in order: parse, version, top-level model, ids, records (paths
    inside the root, files present), splits, statistics. Stops after the first two when they fail."""
    out = _MetaResult([], [], None, [])
    raw = tally.run(_read_metadata_json, root, out.findings)
    if raw is None or not tally.run(_check_version, raw, out.findings):
        out.fatal = True
        return out
    tally.run(_check_top_level, raw, out)
    raw_ids = tally.run(_check_ids, out.raw_samples, out.findings)
    tally.run(_check_records, root, out, raw_ids)
    tally.run(_check_splits, raw, raw_ids, out)
    tally.run(_check_statistics, raw, out)
    return out


#: the longest path (bytes) and file name accepted in metadata: Linux's PATH_MAX and NAME_MAX
_PATH_MAX, _NAME_MAX = 4095, 255


def shown_path(rel: str, limit: int = 120) -> str:
    """`rel` for a message: control characters escaped, shortened when long."""
    text = rel if rel.isprintable() else ascii(rel)[1:-1]
    return text if len(text) <= limit else f"{text[:limit]}... ({len(rel)} characters)"


def _plain(text: Any) -> bool:
    """True for a string that can name a sample or file in a report as it is (printable, not huge)."""
    return isinstance(text, str) and text.isprintable() and len(text) <= 300


def check_inside(root: Path, rel: str) -> Path:
    """The real path of `rel` under `root`, checked before anything is opened: a relative path without
    '..', no NUL byte, not longer than the system allows, and the path and every folder it goes
    through resolve inside the root (a folder symlinked out of the root is an escape even when the
    file it leads to is back inside). Raises PathEscapeError."""
    if not isinstance(rel, str):
        raise PathEscapeError(f"path {rel!r} is not a string")
    if "\x00" in rel:
        raise PathEscapeError(f"path {shown_path(rel)} contains a NUL byte")
    try:
        encoded = os.fsencode(rel)
    except UnicodeError:
        raise PathEscapeError(f"path {shown_path(rel)} is not a valid file name (unencodable characters)") from None
    if len(encoded) > _PATH_MAX or any(len(part) > _NAME_MAX for part in encoded.split(b"/")):
        raise PathEscapeError(f"path {shown_path(rel)} is too long ({len(encoded)} bytes; at most {_PATH_MAX}, "
                              f"{_NAME_MAX} per name)")
    try:
        target = resolve_inside(root, rel)
        root_real = os.path.realpath(root)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folder = os.path.realpath(os.path.join(root_real, *parts[:i]))
            if os.path.commonpath([root_real, folder]) != root_real:
                raise PathEscapeError(f"path {rel!r} goes through {'/'.join(parts[:i])!r}, which resolves to "
                                      f"{folder}, outside the dataset root {root_real}")
    except (OSError, ValueError) as e:
        if isinstance(e, PathEscapeError):
            raise
        raise PathEscapeError(f"path {shown_path(rel)} cannot be resolved ({e})") from None
    return target


class _NotRegularFile(OSError):
    pass


def read_regular_file(path: Union[str, Path]) -> bytes:
    """The bytes of a regular file; a FIFO, device or folder raises _NotRegularFile without blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegularFile(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


@emits("schema.metadata_json", "schema.path_escape")
def _read_metadata_json(root: Path, f: list[Finding]) -> Optional[dict]:
    """metadata.json as a JSON object, or None (with a finding) when it is missing, not one, or leaves
    the root. Where it resolves is checked first; a metadata.json outside the root is never opened."""
    path = root / METADATA_FILE
    missing = _dfind("schema.metadata_json", f"{METADATA_FILE} is missing; is {root} a dataset made by "
                                             f"`fwdata build`?", file=METADATA_FILE)
    if not os.path.lexists(path):
        f.append(missing)
        return None
    try:
        real = check_inside(root, METADATA_FILE)
    except PathEscapeError as e:
        f.append(_dfind("schema.path_escape", f"{METADATA_FILE} (a symlink) leaves the dataset root, so it is not "
                                              f"read: {e}", file=METADATA_FILE))
        return None
    try:
        data = read_regular_file(real)
    except FileNotFoundError:  # a dangling symlink
        f.append(missing)
        return None
    except _NotRegularFile:
        f.append(_dfind("schema.metadata_json", f"{METADATA_FILE} is not a regular file (a folder, FIFO or "
                                                f"device?)", file=METADATA_FILE))
        return None
    except OSError as e:
        f.append(_dfind("schema.metadata_json", f"{METADATA_FILE} cannot be read ({e.strerror or e})",
                        file=METADATA_FILE))
        return None
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        f.append(_dfind("schema.metadata_json", f"not valid JSON ({e})", file=METADATA_FILE))
        return None
    except RecursionError:
        f.append(_dfind("schema.metadata_json", "not valid JSON (nested too deeply)", file=METADATA_FILE))
        return None
    if not isinstance(raw, dict):
        f.append(_dfind("schema.metadata_json", f"top level is a {type(raw).__name__}, expected an object",
                        file=METADATA_FILE))
        return None
    return raw


@emits("schema.version")
def _check_version(raw: dict, f: list[Finding]) -> bool:
    """True when this tool knows the dataset's schema version."""
    version = raw.get("schema_version", SUPPORTED_SCHEMA_VERSIONS[0])
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        f.append(_dfind("schema.version", f"schema_version {version!r} is not known to fwdata {__version__} "
                                          f"(known: {', '.join(SUPPORTED_SCHEMA_VERSIONS)})", file=METADATA_FILE))
        return False
    return True


@emits("schema.metadata_model")
def _check_top_level(raw: dict, out: _MetaResult) -> None:
    """The top-level fields against DatasetMetadata (samples and splits are checked on their own)."""
    raw_samples = raw.get("samples", [])
    if not isinstance(raw_samples, list):
        out.findings.append(_dfind("schema.metadata_model", "samples is not a list", file=METADATA_FILE))
        raw_samples = []
    out.raw_samples = raw_samples
    try:
        out.meta = DatasetMetadata.model_validate({**raw, "samples": [], "splits": {}})
    except ValidationError as e:
        out.findings.append(_dfind("schema.metadata_model", _pydantic_summary(e), file=METADATA_FILE))


@emits("schema.duplicate_ids")
def _check_ids(raw_samples: list[Any], f: list[Finding]) -> list[Optional[str]]:
    """The id of each raw record (None when missing); duplicates are findings."""
    raw_ids = [s.get("id") if isinstance(s, dict) else None for s in raw_samples]
    counts: dict[str, int] = {}
    for sid in raw_ids:
        if isinstance(sid, str):
            counts[sid] = counts.get(sid, 0) + 1
    for sid, n in counts.items():
        if n > 1:
            f.append(_dfind("schema.duplicate_ids", f"{n} sample records share the id {sid!r}", sample=sid,
                            file=METADATA_FILE))
    return raw_ids


@emits("schema.sample_record", "schema.path_escape", "schema.missing_file")
def _check_records(root: Path, out: _MetaResult, raw_ids: list[Optional[str]]) -> None:
    """Each record: its paths stay inside the root (checked before anything is opened), it satisfies
    SampleRecord, and its files exist. Valid records (first of each id) go to `out.records`."""
    f = out.findings
    seen: set[str] = set()
    for i, s in enumerate(out.raw_samples):
        label = raw_ids[i] if _plain(raw_ids[i]) else f"samples[{i}]"
        if not isinstance(s, dict):
            f.append(_dfind("schema.sample_record", "not an object", sample=label, file=METADATA_FILE))
            continue
        escaped = False
        paths = s.get("paths") if isinstance(s.get("paths"), dict) else {}
        for key, rel in paths.items():
            if rel is None:
                continue
            try:
                check_inside(root, rel if isinstance(rel, str) else "")
            except PathEscapeError as e:
                f.append(_dfind("schema.path_escape", f"paths.{shown_path(str(key))}: {e}", sample=label,
                                file=rel if _plain(rel) else None))
                escaped = True
        if escaped:
            continue  # never open a file outside the root
        try:
            rec = SampleRecord.model_validate(s)
        except ValidationError as e:
            f.append(_dfind("schema.sample_record", _pydantic_summary(e), sample=label, file=METADATA_FILE))
            continue
        if rec.id in seen:
            continue  # reported by schema.duplicate_ids; its files are checked once
        seen.add(rec.id)
        out.records.append(rec)
        for rel in rec.paths.all():
            if not (root / rel).is_file():
                f.append(_dfind("schema.missing_file", f"{rel} does not exist", sample=rec.id, file=rel))


@emits("schema.splits")
def _check_splits(raw: dict, raw_ids: list[Optional[str]], out: _MetaResult) -> None:
    """`splits` lists known ids only, and agrees with each record's own `split`."""
    f = out.findings
    splits = raw.get("splits", {})
    if not isinstance(splits, dict):
        f.append(_dfind("schema.splits", "splits is not an object", file=METADATA_FILE))
        return
    known = {r.id: r.split for r in out.records}
    all_ids = {sid for sid in raw_ids if isinstance(sid, str)}
    listed: dict[str, str] = {}
    for split, ids in splits.items():
        if not isinstance(ids, list):
            f.append(_dfind("schema.splits", f"split {split!r} is not a list of ids", file=METADATA_FILE))
            continue
        unknown = [i for i in ids if i not in all_ids]
        if unknown:
            f.append(_dfind("schema.splits", f"split {split!r} lists unknown ids {unknown[:5]}", file=METADATA_FILE))
        for i in ids:
            if isinstance(i, str):
                listed[i] = split
    for sid, split in known.items():
        if listed.get(sid) != split:
            f.append(_dfind("schema.splits", f"record says split {split!r}, splits list it under "
                                             f"{listed.get(sid)!r}", sample=sid, file=METADATA_FILE))


@emits("schema.statistics")
def _check_statistics(raw: dict, out: _MetaResult) -> None:
    """`statistics` equal what the samples and failures give (only when every record is valid)."""
    stats = raw.get("statistics")
    if not isinstance(stats, dict) or len(out.records) != len(out.raw_samples):
        return
    expected = DatasetMetadata.model_construct(samples=out.records,
                                               failures=out.meta.failures if out.meta else []).with_statistics()
    diffs = [f"{k} {stats.get(k)} != {v}" for k, v in expected.statistics.model_dump().items()
             if k in stats and not _close(stats.get(k), v)]
    if diffs:
        out.findings.append(_dfind("schema.statistics", "statistics disagree with the samples: " + "; ".join(diffs),
                                   file=METADATA_FILE))


def _close(a: Any, b: Any) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(b)))
    except (TypeError, ValueError):
        return False


@emits("schema.orphan_file", "schema.path_escape")
def check_tree(root: Path, raw_samples: list[Any], reported_escapes: set[str]) -> list[Finding]:
    """Orphan files and symlinks leaving the root, the dataset's own folders included. `INTERNAL_DIR`
    (completion markers, the build lock) holds no orphans, but a symlink in it (or it) leaving the
    root is an escape: a build would write outside the dataset through it."""
    referenced = {METADATA_FILE}
    for s in raw_samples:
        paths = s.get("paths") if isinstance(s, dict) and isinstance(s.get("paths"), dict) else {}
        referenced.update(p for p in paths.values() if isinstance(p, str))
    findings = []
    root_real = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        internal = any(rel_dir == d or rel_dir.startswith(d + os.sep) for d in (INTERNAL_DIR, *DERIVED_DIRS))
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/")
            if os.path.islink(full):
                target = os.path.realpath(full)
                if os.path.commonpath([root_real, target]) != root_real and rel not in reported_escapes:
                    findings.append(_dfind("schema.path_escape", f"{rel} is a symlink to {target}, outside the "
                                                                 f"dataset root", file=rel))
                    reported_escapes.add(rel)
                    continue
            if internal or rel in (INTERNAL_DIR, *DERIVED_DIRS):
                continue
            if name in filenames and rel not in referenced:
                why = "a temporary file left by an interrupted build" if is_temp_name(name) else "named by no sample"
                findings.append(_dfind("schema.orphan_file", f"{rel} is {why}", file=rel))
    return findings
