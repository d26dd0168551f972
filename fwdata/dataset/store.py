"""Writing datasets: atomic files, one sample at a time, and metadata.json.

A sample's files are written under temporary names in their final folders and renamed into
place only when all of them are complete; then a small marker `.fwdata/done/<id>.json` holding
the sample's record is written (last). A sample counts as finished only when its marker exists,
so a killed build never leaves a half sample that looks whole, and a rerun skips what is done
(the datatrove "completion marker" pattern). `metadata.json` is assembled from the markers.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from fwdata.dataset import camera
from fwdata.dataset.contract import (
    DEPTH_NPZ,
    METADATA_FILE,
    POINTS_NPZ,
    CameraFile,
    ContractError,
    DatasetMetadata,
    SampleRecord,
    check_npz_arrays,
    format_camera_txt,
    metadata_json,
    sample_paths,
)
from fwdata.dataset.layout import INTERNAL_DIR, LOCK_FILE, MARKER_DIR, dataset_dirs, is_temp_name, marker_path, temp_writer_pid, tmp_name
from fwdata.dataset.ply import fused_cloud, write_cloud
from fwdata.dataset.video import write_mp4

# --------------------------------------------------------------------------- atomic files


def clean_stale_temp_files(root: Union[str, Path]) -> int:
    """Delete temporary files left by a writer that was killed (its process is gone). Returns the count."""
    root = Path(root)
    removed = 0
    for d in [root, *dataset_dirs(root), root / MARKER_DIR]:
        if not d.is_dir() or (d != root and not is_inside(d, root)):
            continue  # never delete anything outside the dataset
        for p in d.iterdir():
            pid = temp_writer_pid(p.name)
            if pid is not None and not p.is_symlink() and p.is_file() and not _pid_alive(pid):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def is_inside(path: Union[str, Path], root: Union[str, Path]) -> bool:
    """True when `path` (symlinks resolved) lies inside `root` (resolved)."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, base]) == base


def check_output_folder(root: Union[str, Path]) -> None:
    """Make sure a dataset can be written at `root` before any work: a folder (created if missing),
    writable, whose own folders (videos/, depth/, points/, camera_params/, .fwdata/) do not lead
    outside it. Raises OSError with one line naming the problem."""
    root = Path(root)
    check_writable_folder(root)
    for d in [*dataset_dirs(root), root / INTERNAL_DIR, root / MARKER_DIR]:
        if (d.is_symlink() or d.exists()) and not is_inside(d, root):
            raise OSError(f"{d} leads outside the dataset (a symlink to {os.path.realpath(d)}); a dataset's own "
                          f"folders must be inside it")


def check_writable_folder(root: Union[str, Path], create: bool = True) -> None:
    """Make sure `root` is a folder we can write into (created if missing), before any work: the one
    check of every output folder (`fwdata build --out`, `fwdata synth OUT`, `fwmodel train --output`).
    With `create=False` a missing `root` is left missing (a run refused later leaves nothing behind):
    its nearest existing ancestor must be a writable folder.
    Raises OSError with one line naming the problem (e.g. `out.txt exists and is not a folder`)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise OSError(f"{root} exists and is not a folder")
    if not create and not root.exists():
        parent = root.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise OSError(f"cannot create {root}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OSError(f"cannot create {root}: {parent} is not writable")
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create {root}: {e.strerror or e}") from None
    probe = tmp_name(root / ".write-test")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write into {root}: {e.strerror or e}") from None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode())


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed npz (no pickled objects) as bytes."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


# --------------------------------------------------------------------------- point maps



def point_maps(depth: np.ndarray, valid: np.ndarray, cameras: CameraFile) -> tuple[np.ndarray, np.ndarray]:
    """World points (T,H,W,3) float32 from z-depth (T,H,W) and the cameras; valid (T,H,W) bool.

    Computed in float64 one frame at a time: the float64 temporaries of a whole clip would take
    about 100 bytes per pixel (3 GB for 161 frames of 336x592).
    """
    K = cameras.intrinsics_array()
    c2w = camera.invert_pose(cameras.w2c_array())
    ok = valid & np.isfinite(depth) & (depth > 0)
    pts = np.empty(depth.shape + (3,), dtype=np.float32)
    for i in range(len(depth)):
        pts[i] = camera.unproject_depth(depth[i].astype(np.float64), K[i], c2w[i])
    pts[~ok] = 0.0
    return pts, ok


# --------------------------------------------------------------------------- samples


@dataclass
class SampleData:
    """Everything one sample holds. frames (T,H,W,3) uint8; depth (T,H,W) z-depth; depth_valid (T,H,W) bool.

    points / points_valid are computed from depth and cameras when not given.
    """

    frames: np.ndarray
    depth: np.ndarray
    depth_valid: np.ndarray
    cameras: CameraFile
    points: Optional[np.ndarray] = None
    points_valid: Optional[np.ndarray] = None


def write_sample(root: Union[str, Path], record: SampleRecord, data: SampleData, write_ply: bool = True) -> SampleRecord:
    """Write one sample's files atomically, then its completion marker; returns the record as written
    (with the video's sha256).

    The arrays are checked against the contract before anything is written; a ContractError
    means nothing of this sample was written.
    """
    root = Path(root)
    T, H, W = record.num_frames, record.height, record.width
    dims = {"T": T, "H": H, "W": W}
    if data.frames.shape != (T, H, W, 3) or data.frames.dtype != np.uint8:
        raise ContractError(f"sample {record.id}: frames are {data.frames.dtype}{data.frames.shape}, expected uint8{(T, H, W, 3)}")
    if data.cameras.num_frames != T or (data.cameras.width, data.cameras.height) != (W, H):
        raise ContractError(f"sample {record.id}: cameras are for {data.cameras.num_frames} frames of "
                            f"{data.cameras.width}x{data.cameras.height}, expected {T} of {W}x{H}")
    valid = data.depth_valid & np.isfinite(data.depth) & (data.depth > 0)
    depth = np.where(valid, data.depth, 0).astype(np.float32)
    depth_arrays = {"depth": depth, "valid": valid}
    if data.points is None:
        pts, pvalid = point_maps(depth, valid, data.cameras)
    else:
        pts, pvalid = data.points, data.points_valid
    points_arrays = {"points": pts.astype(np.float16), "valid": np.asarray(pvalid, dtype=bool)}
    check_npz_arrays(depth_arrays, DEPTH_NPZ, dims, f"sample {record.id} depth")
    check_npz_arrays(points_arrays, POINTS_NPZ, dims, f"sample {record.id} points")

    p = record.paths
    finals: list[tuple[Path, Path]] = []  # (tmp, final)

    def stage(rel: str) -> Path:
        final = root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(final)
        finals.append((tmp, final))
        return tmp

    try:
        video_tmp = stage(p.video)
        write_mp4(video_tmp, data.frames, fps=record.fps)
        record = record.model_copy(update={"video_sha256": file_sha256(video_tmp)})
        for rel, arrays in ((p.depth, depth_arrays), (p.points, points_arrays)):
            stage(rel).write_bytes(npz_bytes(arrays))
        stage(p.camera_json).write_text(data.cameras.model_dump_json(indent=1) + "\n")
        stage(p.camera_txt).write_text(format_camera_txt(data.cameras))
        if write_ply and p.points_ply:
            cloud = fused_cloud(pts.astype(np.float32), np.asarray(pvalid, bool), data.frames)
            write_cloud(stage(p.points_ply), cloud)
        for tmp, _ in finals:
            _fsync_file(tmp)
        for tmp, final in finals:
            os.replace(tmp, final)
    finally:
        for tmp, _ in finals:
            if tmp.exists():
                tmp.unlink()
    atomic_write_text(marker_path(root, record.id), record.model_dump_json(indent=1) + "\n")
    return record


def file_sha256(path: Union[str, Path]) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def finished_records(root: Union[str, Path]) -> list[SampleRecord]:
    """Records of every sample whose completion marker exists, sorted by id."""
    d = Path(root) / MARKER_DIR
    if not d.is_dir():
        return []
    markers = [p for p in d.glob("*.json") if not is_temp_name(p.name)]  # not a marker still being written
    return sorted((SampleRecord.model_validate_json(p.read_bytes()) for p in markers), key=lambda r: r.id)


def is_finished(root: Union[str, Path], sample_id: str) -> bool:
    return marker_path(root, sample_id).is_file()


def remove_sample(root: Union[str, Path], sample_id: str) -> None:
    """Delete one sample's marker (first, so it stops counting as finished) and its files."""
    marker = marker_path(root, sample_id)
    if marker.exists():
        marker.unlink()
    for rel in sample_paths(sample_id).all():
        p = Path(root) / rel
        if p.exists():
            p.unlink()


def write_metadata(root: Union[str, Path], meta: DatasetMetadata) -> DatasetMetadata:
    """Recompute splits/statistics and write metadata.json atomically. Returns what was written."""
    meta = meta.with_statistics()
    atomic_write_text(Path(root) / METADATA_FILE, metadata_json(meta))
    return meta




# --------------------------------------------------------------------------- one writer at a time


class DatasetBusy(RuntimeError):
    """Another process holds the dataset's write lock; the message names it (pid, host, since when)."""


@contextlib.contextmanager
def write_lock(root: Union[str, Path]) -> Iterator[None]:
    """Hold the dataset's exclusive write lock (`LOCK_FILE`) while the body runs.

    An advisory `flock` on `.fwdata/lock`: the kernel releases it when its holder dies, however it
    dies, so the lock of a killed build is taken over by the next one without any stale-lock
    guessing. The holder's pid, host and start time are written into the file, so a second writer
    says who holds it. (flock works on local file systems and on NFSv4; on a shared file system
    without it, run one builder per dataset.)
    """
    import fcntl
    import json
    import socket
    from datetime import datetime, timezone

    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']} since {h['since']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise DatasetBusy(f"{root} is being written by {who}; wait for it to finish (or stop it) and run "
                              f"again") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
