"""`fwmodel package`: one training run as one tar file, to back up or hand on, and its check.

    fwmodel package RUN_DIR --out run.tar [--checkpoint step-N.safetensors] [--with-state]
    fwmodel package --verify run.tar

The tar holds, under `<run name>/`:

```
manifest.json              first member: format, run, checkpoint, stage, step, data fingerprint, and
                           path, size and sha256 of every other member
step-N.safetensors (.json) the checkpoint (default: the run's last) and its sidecar
config.toml train.log metrics.jsonl tb/...   the resolved config, the log, the scalars, TensorBoard events
dataset.json               the dataset fingerprint the run trained on (sidecar extra.data_fingerprint), the
                           data root and split, and the sample ids when the dataset is still readable there
                           and still gives that fingerprint
state/step-N/...           only with --with-state: the optimizer / RNG state to --resume from step N
```

Same run, same bytes: members sorted, mtime fixed (MTIME), owner 0/0 without names, modes 0644 / 0755.
The checkpoint is checked against its sidecar (size, sha256, header) before it is packed. `--verify`
reads the manifest and checks every member's size and sha256, that every listed file is there and
that nothing else is: one line per problem.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fwmodel.run_report import CONFIG_FILE, LOG_FILE, METRICS_FILE, STATE_DIR, TB_DIR, Run, RunCheckpoint, RunError

__all__ = ["PackageError", "PackageResult", "make_package", "verify_package"]

PACKAGE_FORMAT = "fwmodel-run-package"
PACKAGE_VERSION = 1
MANIFEST = "manifest.json"
DATASET_FILE = "dataset.json"
#: every member's mtime: 2020-01-01T00:00:00Z (the same run gives the same bytes)
MTIME = 1577836800


class PackageError(RunError):
    """Bad input for `fwmodel package` (no such run or checkpoint, a damaged checkpoint, --out unusable): exit 2."""


@dataclass
class PackageResult:
    tar: Path
    manifest: dict
    bytes: int


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def dataset_record(run: Run, ck: RunCheckpoint) -> dict:
    """What the run trained on: the fingerprint its checkpoint records, data root and split, and the
    sample ids (with their record fingerprints) when the dataset at the root still gives that fingerprint."""
    from pydantic import ValidationError

    from fwmodel.data import DataConfig, DataError, data_fingerprint, record_fingerprint, select_samples

    data = run.config.get("data", {})
    want = ((ck.sidecar or {}).get("extra") or {}).get("data_fingerprint")
    rec = {"data_fingerprint": want, "data_root": data.get("root"), "split": data.get("split"), "samples": None,
           "note": ""}
    try:
        selection = select_samples(Path(data["root"]), DataConfig(**data))
    except (KeyError, TypeError, ValidationError, DataError, OSError) as e:
        rec["note"] = f"the dataset is not readable here ({type(e).__name__}): no sample list"
        return rec
    found = data_fingerprint(selection.records)
    if found != want:
        rec["note"] = f"the dataset at data_root now gives fingerprint {found}: it changed since training; no sample list"
        return rec
    rec["samples"] = [{"id": r.id, "fingerprint": record_fingerprint(r)} for r in selection.records]
    rec["note"] = "samples: the training selection, read from data_root; its fingerprint matches"
    return rec


def _members(run: Run, ck: RunCheckpoint, with_state: bool) -> list[tuple[str, Path]]:
    root = run.root
    if not ck.sidecar_path.is_file():
        raise PackageError(f"checkpoint {ck.path} has no sidecar {ck.sidecar_path.name}: it holds the size and sha256 "
                           "that prove the copy; a package without it cannot be verified")
    if not (root / CONFIG_FILE).is_file():
        raise PackageError(f"{root} has no {CONFIG_FILE} (the resolved configuration): not the output folder of "
                           "`fwmodel train`?")
    files = [ck.path, ck.sidecar_path, root / CONFIG_FILE]
    files += [root / n for n in (LOG_FILE, METRICS_FILE) if (root / n).is_file()]
    if (root / TB_DIR).is_dir():
        files += _files_under(root / TB_DIR)
    if with_state:
        state = root / STATE_DIR / f"step-{ck.step}"
        if not state.is_dir():
            raise PackageError(f"--with-state: {root} has no {STATE_DIR}/step-{ck.step} for {ck.path.name} (a run keeps "
                               "only its last states: train.keep_states); package a checkpoint whose state is kept")
        files += _files_under(state)
    return sorted((p.relative_to(root).as_posix(), p) for p in files)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def make_package(run_dir: Path, out: Path, checkpoint: Optional[str] = None, with_state: bool = False) -> PackageResult:
    """Write the package of the run in `run_dir` to `out` (see the module docstring). Raises PackageError."""
    from fwmodel.checkpoint import CheckpointError, file_sha256, verify_checkpoint_file
    from fwmodel.run_report import load_run, pick_checkpoint

    out = Path(out)
    if out.is_dir():
        raise PackageError(f"--out {out} is a folder; give the tar file to write (e.g. run.tar)")
    run = load_run(Path(run_dir))
    ck = pick_checkpoint(run, checkpoint)
    try:
        verify_checkpoint_file(ck.path, verify_hash=True)
    except CheckpointError as e:
        raise PackageError(f"not packaged: {e}") from None
    members = _members(run, ck, with_state)
    top = run.root.resolve().name
    dataset = (json.dumps(dataset_record(run, ck), indent=1, sort_keys=True) + "\n").encode()
    listed = [{"path": DATASET_FILE, "size": len(dataset), "sha256": _sha256_bytes(dataset)}]
    listed += [{"path": rel, "size": p.stat().st_size, "sha256": file_sha256(p)} for rel, p in members]
    listed.sort(key=lambda f: f["path"])
    side = ck.sidecar or {}
    manifest = {"format": PACKAGE_FORMAT, "format_version": PACKAGE_VERSION, "run": top, "checkpoint": ck.path.name,
                "stage": side.get("stage"), "step": ck.step, "preset": side.get("preset"),
                "data_fingerprint": (side.get("extra") or {}).get("data_fingerprint"), "with_state": with_state,
                "files": listed}
    blob = (json.dumps(manifest, indent=1) + "\n").encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            dirs = sorted({"/".join(f["path"].split("/")[:i]) for f in listed for i in range(1, f["path"].count("/") + 1)})
            tar.addfile(_info(f"{top}/{MANIFEST}", len(blob)), io.BytesIO(blob))
            for d in [""] + dirs:  # folders first, so an extract makes them with fixed modes and times
                info = _info(f"{top}/{d}".rstrip("/"), 0)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            tar.addfile(_info(f"{top}/{DATASET_FILE}", len(dataset)), io.BytesIO(dataset))
            for rel, p in members:
                with open(p, "rb") as f:
                    tar.addfile(_info(f"{top}/{rel}", p.stat().st_size), f)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PackageError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    return PackageResult(out, manifest, out.stat().st_size)


def _sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def verify_package(tar_path: Path) -> tuple[list[str], Optional[dict]]:
    """(problems, manifest) of a package: one line per problem (empty: every member matches the manifest).

    PackageError only when `tar_path` is no file at all; a damaged tar or manifest is a problem line.
    """
    import hashlib

    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise PackageError(f"{tar_path}: no such file (give a tar written by `fwmodel package`)")
    problems: list[str] = []
    seen: dict[str, tuple[int, str]] = {}
    manifest, top = None, None
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar:
                if m.isdir():
                    continue
                if not m.isfile():
                    problems.append(f"{m.name}: not a regular file (a link or device; a package holds files only)")
                    continue
                f = tar.extractfile(m)
                digest, size = hashlib.sha256(), 0
                # the package's own manifest: <top>/manifest.json (state/step-N/ has one of its own)
                data = b"" if manifest is None and m.name.count("/") == 1 and m.name.endswith("/" + MANIFEST) else None
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
                    size += len(block)
                    if data is not None:
                        data += block
                if data is not None:
                    try:
                        manifest = json.loads(data)
                        top = m.name.rsplit("/", 1)[0]
                    except ValueError:
                        problems.append(f"{m.name}: not JSON (the manifest is damaged)")
                    continue
                seen[m.name] = (size, digest.hexdigest())
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{tar_path}: the tar is damaged ({e})")
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        if isinstance(manifest, dict) or not problems:
            problems.append(f"{tar_path}: no {MANIFEST} of format {PACKAGE_FORMAT} (not made by `fwmodel package`?)")
        return problems, None
    listed = {f"{top}/{f['path']}": f for f in manifest.get("files", []) if isinstance(f, dict) and "path" in f}
    for name, f in sorted(listed.items()):
        if name not in seen:
            problems.append(f"{name}: listed in the manifest but missing from the tar")
            continue
        size, sha = seen[name]
        if size != f.get("size"):
            problems.append(f"{name}: {size} bytes, the manifest says {f.get('size')}")
        elif sha != f.get("sha256"):
            problems.append(f"{name}: sha256 {sha[:16]}... does not match the manifest's {str(f.get('sha256'))[:16]}...")
    for name in sorted(set(seen) - set(listed)):
        problems.append(f"{name}: in the tar but not in the manifest")
    return problems, manifest
