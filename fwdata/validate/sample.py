"""Per-sample checks: one sample's files, read-only, one sample in memory at a time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

import numpy as np
from pydantic import ValidationError

from fwdata import quality
from fwdata.dataset import camera
from fwdata.dataset.ply import read_ply_xyz
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
    NpzError,
    PathEscapeError,
    SampleRecord,
    camera_txt_to_arrays,
    parse_camera_txt,
    read_npz,
    resolve_inside,
)
from fwdata.validate import gates
from fwdata.validate.registry import REGISTRY, UndeclaredCheck, declared, emits
from fwdata.validate.results import Finding, SampleResult


class SampleFiles:
    """Where one sample's files are read from, by dataset-relative path: a dataset folder (this class)
    or in-memory bytes (`MemoryFiles`, e.g. the members of a WebDataset shard). The checks read every
    file through it, so each check has one implementation whatever holds the files."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def open(self, rel: str) -> BinaryIO:
        return open(self.root / rel, "rb")

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    @contextlib.contextmanager
    def local_path(self, rel: str) -> Iterator[Path]:
        """A path a native reader (the video decoder) can open."""
        yield self.root / rel


class MemoryFiles(SampleFiles):
    """A sample's files as bytes in memory: dataset-relative path -> content. Nothing touches the disk:
    a native reader that needs a path gets an anonymous in-memory file (Linux `memfd_create`; a
    temporary file where that does not exist)."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__(".")
        self.files = files

    def exists(self, rel: str) -> bool:
        return rel in self.files

    def open(self, rel: str) -> BinaryIO:
        import io

        if rel not in self.files:
            raise FileNotFoundError(2, "No such file", rel)
        return io.BytesIO(self.files[rel])

    def read_bytes(self, rel: str) -> bytes:
        if rel not in self.files:
            raise FileNotFoundError(2, "No such file", rel)
        return self.files[rel]

    @contextlib.contextmanager
    def local_path(self, rel: str) -> Iterator[Path]:
        data = self.read_bytes(rel)
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create(Path(rel).name, 0)  # not inheritable: closed in child processes
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                yield Path(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            return
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=Path(rel).suffix) as fh:  # pragma: no cover - not Linux
            fh.write(data)
            fh.flush()
            yield Path(fh.name)


@dataclass
class _Ctx:
    root: Path
    rec: SampleRecord
    tol: gates.Tolerances
    result: SampleResult
    _ran: set = field(default_factory=set)
    files: Optional[SampleFiles] = None

    def __post_init__(self) -> None:
        if self.files is None:
            self.files = SampleFiles(self.root)

    def emit(self, check: str, message: str, file: Optional[str] = None, value: Optional[float] = None) -> None:
        self.result.findings.append(Finding(check=check, severity=declared(check).severity, message=message,
                                            sample=self.rec.id, file=file, value=value))

    def skip(self, check: str, reason: str) -> None:
        if check not in self._ran:
            self.result.skipped.setdefault(check, reason)

    @contextlib.contextmanager
    def check(self, check_id: str) -> Iterator[None]:
        """Run one check's code: mark it as run; an unexpected exception becomes internal.check_crashed."""
        declared(check_id)
        self._ran.add(check_id)
        self.result.skipped.pop(check_id, None)
        try:
            yield
        except UndeclaredCheck:
            raise  # a wrong id is a bug of the registry, never a finding
        except Exception as e:  # a bug in a check must not hide the others
            tb = traceback.extract_tb(e.__traceback__)[-1]
            self.emit("internal.check_crashed", f"{check_id} raised {type(e).__name__}: {e} "
                                                f"({Path(tb.filename).name}:{tb.lineno})")


def _frames_list(mask: np.ndarray, limit: int = 8) -> str:
    idx = np.flatnonzero(mask)
    s = ", ".join(str(i) for i in idx[:limit])
    return s + (f", ... ({len(idx)} frames)" if len(idx) > limit else "")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence native decoder chatter (ffmpeg) written straight to file descriptor 2."""
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no fd 2
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _decoder_message(e: Exception, path: Path, name: Optional[str] = None) -> str:
    """A decoder error in one line, without the file name (the finding names it) or C++ source locations.
    `name`: what to call the file where the message still names it (default: its file name)."""
    import re

    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = msg.replace(f"{path}: ", "").replace(str(path), name or path.name)
    msg = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", msg)
    return msg[:300]


def _file_hashes(files: SampleFiles, rel: str) -> tuple[str, str]:
    """sha1 and sha256 of a file, read once in chunks."""
    h1, h256 = hashlib.sha1(), hashlib.sha256()
    with files.open(rel) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h1.update(chunk)
            h256.update(chunk)
    return h1.hexdigest(), h256.hexdigest()


@emits("integrity.video_decode", "integrity.video_dims", "integrity.video_fps", "cross.video_matches_record")
def _check_video(ctx: _Ctx) -> Optional[np.ndarray]:
    from fwdata.dataset import video

    rel = ctx.rec.paths.video
    hashes: Optional[tuple[str, str]] = None
    expected = ctx.rec.video_sha256
    if expected is None:
        ctx.skip("cross.video_matches_record", "the record has no video_sha256 (a dataset built before it was "
                                               "recorded)")
    else:
        with ctx.check("cross.video_matches_record"):
            hashes = _file_hashes(ctx.files, rel)
            if hashes[1] != expected:
                ctx.emit("cross.video_matches_record", f"the video's sha256 is {hashes[1][:16]}..., the record's "
                                                       f"video_sha256 is {expected[:16]}...: swapped, replaced or "
                                                       f"edited after the build", rel)
    frames = None
    with ctx.check("integrity.video_decode"):
        with ctx.files.local_path(rel) as path, _quiet_stderr():
            try:
                info, frames = video.read_video(path)
            except Exception as e:
                ctx.emit("integrity.video_decode", f"video cannot be decoded: "
                                                   f"{_decoder_message(e, path, Path(rel).name)}", rel)
    if frames is None:
        ctx.skip("integrity.video_dims", "video not decodable")
        ctx.skip("integrity.video_fps", "video not decodable")
        return None
    T, H, W = ctx.rec.num_frames, ctx.rec.height, ctx.rec.width
    with ctx.check("integrity.video_dims"):
        got = (frames.shape[0], frames.shape[1], frames.shape[2])
        if got != (T, H, W) or info.num_frames != T:
            ctx.emit("integrity.video_dims", f"video has {got[0]} frames of {got[2]}x{got[1]}, the record says "
                                             f"{T} frames of {W}x{H}", rel)
    with ctx.check("integrity.video_fps"):
        if abs(info.fps - ctx.rec.fps) > ctx.tol.fps_rel_tol * ctx.rec.fps:
            ctx.emit("integrity.video_fps", f"video plays at {info.fps:.4g} fps, the record says {ctx.rec.fps:.4g}",
                     rel, info.fps)
    with ctx.check("integrity.video_decode"):
        ctx.result.video_sha1 = (hashes or _file_hashes(ctx.files, rel))[0]
    return frames


@emits("integrity.depth_file",
       "integrity.depth_dtype",
       "integrity.depth_shape",
       "integrity.points_file",
       "integrity.points_dtype",
       "integrity.points_shape")
def _check_npz(ctx: _Ctx, kind: str, rel: str, spec: dict[str, ArraySpec]) -> Optional[dict[str, np.ndarray]]:
    """The arrays of one npz, or None. Member names and .npy headers are checked against the spec and
    the record's T, H, W before any array is read (`contract.read_npz`): a decompression bomb or an
    array of the wrong size is refused without being allocated."""
    file_id, dtype_id, shape_id = f"integrity.{kind}_file", f"integrity.{kind}_dtype", f"integrity.{kind}_shape"
    arrays: Optional[dict[str, np.ndarray]] = None
    problems: Optional[list[tuple[str, str]]] = None
    with ctx.check(file_id):
        try:
            with ctx.files.open(rel) as fh:
                arrays = read_npz(fh, spec, ctx.rec.dims, rel)
            problems = []
        except NpzError as e:
            problems = e.problems
        except OSError as e:  # unreadable (permissions, I/O error)
            problems = [("file", f"cannot be opened ({e.strerror or e})")]
        bad = [m for k, m in problems or [] if k == "file"]
        if bad:
            ctx.emit(file_id, "; ".join(bad), rel)
    if problems is None or any(k == "file" for k, _ in problems):
        ctx.skip(dtype_id, f"{rel} not readable")
        ctx.skip(shape_id, f"{rel} not readable")
        return None
    for cid, k in ((dtype_id, "dtype"), (shape_id, "shape")):
        with ctx.check(cid):
            bad = [m for kk, m in problems if kk == k]
            if bad:
                ctx.emit(cid, "; ".join(bad), rel)
    return arrays


_DUMMY_FRAME = {"index": 0, "source_frame": 0, "timestamp": 0.0, "fx": 1.0, "fy": 1.0, "cx": 0.0, "cy": 0.0,
                "w2c": np.eye(4).tolist()}
_FIELD_CHECK = {"fx": "integrity.intrinsics", "fy": "integrity.intrinsics", "cx": "integrity.intrinsics",
                "cy": "integrity.intrinsics", "w2c": "integrity.extrinsics"}


@emits("integrity.camera_json", "integrity.camera_count")
def _check_camera_json(ctx: _Ctx) -> Optional[CameraFile]:
    rel = ctx.rec.paths.camera_json
    rec = ctx.rec
    cams: Optional[CameraFile] = None
    with ctx.check("integrity.camera_json"):
        try:
            raw = json.loads(ctx.files.read_bytes(rel))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            ctx.emit("integrity.camera_json", f"not valid JSON ({e})", rel)
            raw = None
        except RecursionError:
            ctx.emit("integrity.camera_json", "not valid JSON (nested too deeply)", rel)
            raw = None
        if raw is not None and (not isinstance(raw, dict) or not isinstance(raw.get("frames"), list)):
            ctx.emit("integrity.camera_json", "not a camera file (expected an object with a 'frames' list)", rel)
            raw = None
        if raw is not None:
            cams = _parse_cameras(ctx, raw, rel)
    if cams is None:
        return None
    with ctx.check("integrity.camera_count"):
        if cams.num_frames != rec.num_frames:
            ctx.emit("integrity.camera_count", f"{cams.num_frames} frames, the sample has T = {rec.num_frames}", rel)
    return cams


@emits("integrity.camera_json", "integrity.intrinsics", "integrity.extrinsics", "integrity.source_frame_order")
def _parse_cameras(ctx: _Ctx, raw: dict, rel: str) -> Optional[CameraFile]:
    """CameraFile from raw JSON, reporting each kind of problem under its own check id."""
    rec = ctx.rec
    ok = True
    try:
        header = CameraFile.model_validate({**raw, "frames": [_DUMMY_FRAME]})
    except ValidationError as e:
        ctx.emit("integrity.camera_json", _pydantic_summary(e), rel)
        return None
    if (header.width, header.height) != (rec.width, rec.height) or header.scale != rec.scale:
        ctx.emit("integrity.camera_json", f"cameras are for {header.width}x{header.height} ({header.scale}), the "
                                          f"sample is {rec.width}x{rec.height} ({rec.scale})", rel)
        ok = False
    frames: list[FrameCamera] = []
    problems: dict[str, list[str]] = {}
    ctx._ran.update({"integrity.intrinsics", "integrity.extrinsics"})
    for i, f in enumerate(raw["frames"]):
        try:
            frames.append(FrameCamera.model_validate(f))
        except ValidationError as e:
            for err in e.errors():
                name = str(err["loc"][0]) if err["loc"] else ""
                problems.setdefault(_FIELD_CHECK.get(name, "integrity.camera_json"), []).append(
                    f"frame {i} {name}: {err['msg']}")
    for cid, msgs in problems.items():
        more = f" (and {len(msgs) - 3} more)" if len(msgs) > 3 else ""
        ctx.emit(cid, "; ".join(msgs[:3]) + more, rel)
    if problems:
        return None
    ctx._ran.add("integrity.source_frame_order")
    if [f.index for f in frames] != list(range(len(frames))):
        ctx.emit("integrity.camera_json", f"frame indices are {[f.index for f in frames][:10]}..., expected 0..T-1", rel)
        ok = False
    src = np.array([f.source_frame for f in frames])
    bad = np.flatnonzero(np.diff(src) <= 0)
    if len(bad):
        ctx.emit("integrity.source_frame_order", f"source_frame not strictly increasing at frames "
                                                 f"{', '.join(str(i + 1) for i in bad[:8])} "
                                                 f"({', '.join(f'{src[i]}->{src[i + 1]}' for i in bad[:4])})", rel)
    if not ok:
        return None
    # the model validator (index order, increasing source_frame) is reported above under its own ids
    return CameraFile.model_construct(**{**header.__dict__, "frames": frames})


def _pydantic_summary(e: ValidationError, n: int = 3) -> str:
    parts = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
             for err in e.errors()[:n]]
    more = f" (and {e.error_count() - n} more)" if e.error_count() > n else ""
    return "; ".join(parts) + more


@emits("integrity.rotation", "integrity.intrinsics", "integrity.world_frame", "integrity.source_trace")
def _check_camera_values(ctx: _Ctx, cams: CameraFile) -> bool:
    """Rotation, principal point, world frame, source trace. True when the rotations are proper rotations."""
    rel = ctx.rec.paths.camera_json
    tol = ctx.tol
    w2c = cams.w2c_array()
    K = cams.intrinsics_array()
    R = w2c[:, :3, :3]
    with ctx.check("integrity.rotation"):
        ortho = np.abs(np.swapaxes(R, -1, -2) @ R - np.eye(3)).max(axis=(1, 2))
        det = np.linalg.det(R)
        bad = (ortho > tol.rotation_tol) | (np.abs(det - 1.0) > tol.rotation_tol)
        if bad.any():
            worst = int(np.argmax(np.where(bad, np.abs(det - 1.0) + ortho, -1)))
            ctx.emit("integrity.rotation", f"rotation not orthonormal with det +1 at frames {_frames_list(bad)} "
                                           f"(frame {worst}: det {det[worst]:.4g}, |R^T R - I| {ortho[worst]:.2g})",
                     rel, float(det[worst]))
    with ctx.check("integrity.intrinsics"):
        W, H = cams.width, cams.height
        cx, cy = K[:, 0, 2], K[:, 1, 2]
        bad = ~((cx > 0) & (cx < W) & (cy > 0) & (cy < H))
        if bad.any():
            i = int(np.argmax(bad))
            ctx.emit("integrity.intrinsics", f"principal point outside the {W}x{H} image at frames "
                                             f"{_frames_list(bad)} (frame {i}: cx={cx[i]:.4g}, cy={cy[i]:.4g})", rel)
    with ctx.check("integrity.world_frame"):
        dev = float(np.abs(w2c[0] - np.eye(4)).max())
        if dev > tol.world_frame_tol:
            ctx.emit("integrity.world_frame", f"frame 0 w2c differs from the identity by {dev:.3g}; frame 0 must be "
                                              f"the world frame", rel, dev)
    with ctx.check("integrity.source_trace"):
        s = ctx.rec.source
        src = np.array([f.source_frame for f in cams.frames])
        expected = s.start_frame + s.stride * np.arange(len(src))
        if not np.array_equal(src, expected) or src[-1] >= s.num_frames:
            ctx.emit("integrity.source_trace", f"source_frame {src[:4].tolist()}... does not follow source start_frame "
                                               f"{s.start_frame}, stride {s.stride} within {s.num_frames} frames", rel)
    return not any(f.check == "integrity.rotation" for f in ctx.result.findings)


@emits("integrity.camera_txt", "integrity.camera_count", "cross.camera_txt_json")
def _check_camera_txt(ctx: _Ctx, cams: Optional[CameraFile]) -> None:
    rel = ctx.rec.paths.camera_txt
    rows = None
    with ctx.check("integrity.camera_txt"):
        try:
            try:
                text = ctx.files.read_bytes(rel).decode()
            except UnicodeDecodeError:
                raise ContractError(f"{rel}: not a text file") from None
            rows = parse_camera_txt(text, source=rel)
        except ContractError as e:
            ctx.emit("integrity.camera_txt", str(e), rel)
    if rows is None:
        ctx.skip("cross.camera_txt_json", f"{rel} not readable")
        return
    with ctx.check("integrity.camera_count"):
        if len(rows) != ctx.rec.num_frames:
            ctx.emit("integrity.camera_count", f"{len(rows)} lines, the sample has T = {ctx.rec.num_frames}", rel)
    if cams is None:
        ctx.skip("cross.camera_txt_json", f"{ctx.rec.paths.camera_json} not usable")
        return
    with ctx.check("cross.camera_txt_json"):
        if len(rows) != cams.num_frames:
            ctx.emit("cross.camera_txt_json", f"txt has {len(rows)} frames, json has {cams.num_frames}", rel)
            return
        w2c_t, K_t = camera_txt_to_arrays(rows, cams.width, cams.height)
        w2c_j, K_j = cams.w2c_array(), cams.intrinsics_array()
        idx_bad = np.array([r.frame for r in rows]) != np.arange(len(rows))
        scale_w = np.maximum(1.0, np.abs(w2c_j))
        dw = (np.abs(w2c_t - w2c_j) / scale_w).max(axis=(1, 2))
        norm_t = camera.normalize_intrinsics(K_t, cams.width, cams.height)
        norm_j = camera.normalize_intrinsics(K_j, cams.width, cams.height)
        dk = (np.abs(norm_t - norm_j) / np.maximum(1.0, np.abs(norm_j))).max(axis=1)
        bad = idx_bad | (dw > ctx.tol.camera_txt_tol) | (dk > ctx.tol.camera_txt_tol)
        if bad.any():
            ctx.emit("cross.camera_txt_json", f"txt disagrees with json at frames {_frames_list(bad)} (largest "
                                              f"difference: w2c {dw.max():.3g}, intrinsics {dk.max():.3g}"
                                              f"{', frame indices' if idx_bad.any() else ''})", rel,
                     float(max(dw.max(), dk.max())))


def _float16_masks(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(finite, nonzero) masks (T,H,W) of float16 points (T,H,W,3), from the bit patterns (fast),
    frame by frame (no full-size temporaries)."""
    finite = np.empty(points.shape[:-1], dtype=bool)
    nonzero = np.empty(points.shape[:-1], dtype=bool)
    for t in range(points.shape[0]):
        bits = points[t].view(np.uint16)
        special = (bits & 0x7C00) == 0x7C00  # exponent all ones: inf or nan
        nz = (bits & 0x7FFF) != 0
        finite[t] = ~(special[..., 0] | special[..., 1] | special[..., 2])
        nonzero[t] = nz[..., 0] | nz[..., 1] | nz[..., 2]
    return finite, nonzero


@emits("integrity.depth_finite",
       "integrity.depth_positive",
       "integrity.valid_fraction",
       "integrity.points_finite",
       "integrity.invalid_zero",
       "cross.valid_masks")
def _check_values(ctx: _Ctx, depth: Optional[dict], points: Optional[dict]) -> Optional[np.ndarray]:
    """Finite / positive values where valid, zeros where not, valid fractions, and mask agreement.

    Returns the finite mask (T,H,W) of the points (None when the points are not usable).
    """
    rec = ctx.rec
    pfinite = None
    if depth is None:
        for c in ("integrity.depth_finite", "integrity.depth_positive", "integrity.valid_fraction"):
            ctx.skip(c, f"{rec.paths.depth} not usable")
    else:
        d, v = depth["depth"], depth["valid"]
        with ctx.check("integrity.depth_finite"):
            bad = v & ~np.isfinite(d)
            if bad.any():
                ctx.emit("integrity.depth_finite", f"{int(bad.sum())} valid pixels hold NaN/inf depth, frames "
                                                   f"{_frames_list(bad.any(axis=(1, 2)))}", rec.paths.depth,
                         float(bad.sum()))
        with ctx.check("integrity.depth_positive"):
            with np.errstate(invalid="ignore"):
                bad = v & (d <= 0)
            if bad.any():
                ctx.emit("integrity.depth_positive", f"{int(bad.sum())} valid pixels hold depth <= 0, frames "
                                                     f"{_frames_list(bad.any(axis=(1, 2)))}", rec.paths.depth,
                         float(bad.sum()))
        with ctx.check("integrity.valid_fraction"):
            empty = ~v.any(axis=(1, 2))
            if empty.any():
                ctx.emit("integrity.valid_fraction", f"frames without valid depth: {_frames_list(empty)}",
                         rec.paths.depth, float(empty.sum()))
        with ctx.check("integrity.invalid_zero"):
            n = int(np.count_nonzero((d != 0) & ~v))
            if n:
                ctx.emit("integrity.invalid_zero", f"{n} invalid pixels hold non-zero depth", rec.paths.depth, n)
    if points is None:
        ctx.skip("integrity.points_finite", f"{rec.paths.points} not usable")
    else:
        pv = points["valid"]
        pfinite, nonzero = _float16_masks(points["points"])
        with ctx.check("integrity.points_finite"):
            bad = pv & ~pfinite
            if bad.any():
                ctx.emit("integrity.points_finite", f"{int(bad.sum())} valid pixels hold NaN/inf points, frames "
                                                    f"{_frames_list(bad.any(axis=(1, 2)))}", rec.paths.points,
                         float(bad.sum()))
        with ctx.check("integrity.invalid_zero"):
            n = int(np.count_nonzero(nonzero & ~pv))
            if n:
                ctx.emit("integrity.invalid_zero", f"{n} invalid pixels hold non-zero points", rec.paths.points, n)
    if depth is not None and points is not None:
        with ctx.check("cross.valid_masks"):
            extra = points["valid"] & ~depth["valid"]
            if extra.any():
                ctx.emit("cross.valid_masks", f"{int(extra.sum())} pixels have a valid point but no valid depth, "
                                              f"frames {_frames_list(extra.any(axis=(1, 2)))}", ctx.rec.paths.points,
                         float(extra.sum()))
    else:
        ctx.skip("cross.valid_masks", "depth or points not usable")
    return pfinite


def _median_depth(depth: dict) -> float:
    """Typical depth of the sample (median over a subsample of valid pixels); 1.0 when there is none."""
    d, v = depth["depth"][:, ::4, ::4], depth["valid"][:, ::4, ::4]
    good = v & np.isfinite(d) & (d > 0)
    return float(np.median(d[good])) if good.any() else 1.0


@emits("cross.points_match_depth")
def _check_points_match_depth(ctx: _Ctx, depth: dict, points: dict, cams: CameraFile, pfinite: np.ndarray) -> None:
    """points == c2w @ (depth * K^-1 [u+.5, v+.5, 1]) within float16 precision, frame by frame.

    Compared in each frame's camera coordinates (w2c @ points vs depth * ray), which equals the
    world-frame distance for rigid poses and needs no float64 copy of the whole point map.
    """
    tol = ctx.tol
    d = depth["depth"]
    with np.errstate(invalid="ignore"):
        usable = depth["valid"] & points["valid"] & pfinite & np.isfinite(d)
    T, H, W = d.shape
    K = cams.intrinsics_array()
    w2c = cams.w2c_array().astype(np.float32)
    abs2 = (1e-6 * _median_depth(depth)) ** 2
    rel2 = tol.points_rel_tol ** 2
    rays: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
    n_bad = n_total = 0
    bad_frames = np.zeros(T, dtype=bool)
    worst = 0.0
    for t in range(T):
        m = usable[t]
        if not m.any():
            continue
        key = K[t].tobytes()
        if key not in rays:  # x, y of the rays K^-1 [u+.5, v+.5, 1] (z = 1), shared by frames with the same K
            if len(rays) > 8:
                rays.clear()
            r = camera.unproject_depth(np.ones((H, W)), K[t]).astype(np.float32)
            rays[key] = (r[..., 0].copy(), r[..., 1].copy())
        rx, ry = rays[key]
        # component-wise (numpy's matmul on (N,3) x (3,3) is several times slower)
        pc = [points["points"][t][..., i].astype(np.float32) for i in range(3)]
        R, tr = w2c[t, :3, :3], w2c[t, :3, 3]
        dt = d[t]
        err2 = np.zeros((H, W), dtype=np.float32)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite pixels are outside `m` (reported above)
            for i, ref in enumerate((rx * dt, ry * dt, dt)):
                diff = R[i, 0] * pc[0] + R[i, 1] * pc[1] + R[i, 2] * pc[2] + (tr[i] - ref)
                err2 += diff * diff
            p2 = pc[0] * pc[0] + pc[1] * pc[1] + pc[2] * pc[2]
            bad = m & (err2 > rel2 * p2 + abs2)
        n_total += int(m.sum())
        if bad.any():
            n_bad += int(bad.sum())
            bad_frames[t] = True
            worst = max(worst, float(np.sqrt(err2[bad] / np.maximum(p2[bad], abs2)).max()))
    if n_total and n_bad > tol.points_max_bad_fraction * n_total:
        ctx.emit("cross.points_match_depth", f"{n_bad}/{n_total} valid points differ from the depth unprojected with "
                                             f"the cameras by more than {tol.points_rel_tol:.2g} relative (worst "
                                             f"{worst:.3g}), frames {_frames_list(bad_frames)}", ctx.rec.paths.points,
                 n_bad / n_total)


# ---- ply


@emits("integrity.ply_file", "cross.ply_matches_points")
def _check_ply(ctx: _Ctx, points: Optional[dict], cams: Optional[CameraFile]) -> None:
    rel = ctx.rec.paths.points_ply
    if not rel:
        return
    xyz = None
    with ctx.check("integrity.ply_file"):
        try:
            with ctx.files.local_path(rel) as path:
                xyz = read_ply_xyz(path)
        except (ValueError, OSError) as e:
            ctx.emit("integrity.ply_file", f"not a readable point cloud: {e}", rel)
        if xyz is not None:
            has_points = points is not None and bool(points["valid"].any())
            if len(xyz) == 0 and has_points:
                ctx.emit("integrity.ply_file", "the fused cloud is empty although the point maps have valid points", rel)
                xyz = None
            elif not np.isfinite(xyz).all():
                ctx.emit("integrity.ply_file", f"{int((~np.isfinite(xyz)).any(axis=1).sum())} points are not finite",
                         rel)
                xyz = None
    if xyz is None or len(xyz) == 0 or points is None or cams is None or cams.num_frames != ctx.rec.num_frames:
        ctx.skip("cross.ply_matches_points", "ply, points or cameras not usable")
        return
    with ctx.check("cross.ply_matches_points"):
        tol = ctx.tol
        sel = xyz[np.linspace(0, len(xyz) - 1, min(tol.ply_sample_points, len(xyz))).round().astype(int)]
        P, PV = points["points"], points["valid"]
        T, H, W = PV.shape
        uv, z = camera.project_points(sel[None], cams.intrinsics_array(), cams.w2c_array())  # (T,M,2), (T,M)
        u, v = uv[..., 0], uv[..., 1]
        with np.errstate(invalid="ignore"):
            inside = (z > 0) & np.isfinite(u) & np.isfinite(v) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        t_idx, m_idx = np.nonzero(inside)  # every (frame, cloud point) where the point is in view
        row = np.floor(v[t_idx, m_idx]).astype(np.int64)
        col = np.floor(u[t_idx, m_idx]).astype(np.int64)
        dist = np.linalg.norm(P[t_idx, row, col].astype(np.float64) - sel[m_idx], axis=-1)
        close = PV[t_idx, row, col] & (dist <= tol.ply_rel_tol * z[t_idx, m_idx])
        supported = np.zeros(len(sel), dtype=bool)
        supported[m_idx[close]] = True
        frac = float(supported.mean())
        if frac < tol.ply_min_support:
            ctx.emit("cross.ply_matches_points", f"only {frac:.1%} of {len(sel)} sampled cloud points lie on the point "
                                                 f"maps (within {tol.ply_rel_tol:.0%} of depth), need "
                                                 f"{tol.ply_min_support:.0%}", rel, frac)


# ---- metrics

#: recomputed metric -> (absolute tolerance, relative tolerance) for cross.recorded_quality
_RECORDED_TOL = {
    "registered_ratio": (1e-6, 0.0), "multiview_consistency": (0.05, 0.0), "fov_w_deg": (0.5, 0.0),
    "fov_h_deg": (0.5, 0.0), "path_length": (1e-6, 0.02), "rotation_deg": (0.5, 0.0), "blur": (0.0, 0.25),
    "brightness": (5.0, 0.0), "valid_depth_fraction": (0.01, 0.0),
}


def _video_metrics(frames: Optional[np.ndarray]) -> dict[str, float]:
    if frames is None:
        return {}
    return {"blur": quality.blur_score(frames), "brightness": quality.brightness(frames)}


@emits("cross.multiview_consistency", "cross.recorded_quality")
def _compute_metrics(ctx: _Ctx, video_metrics: dict[str, float], depth: Optional[dict],
                     cams: Optional[CameraFile], rotations_ok: bool) -> None:
    rec = ctx.rec
    m: dict[str, Optional[float]] = {k: None for k in gates.METRICS}
    recomputed: dict[str, Optional[float]] = {}  # where the comparison with metadata needs another value than m
    for k, info in gates.METRICS.items():  # the build's SfM statistics: only metadata has them
        if info.source == "recorded":
            m[k] = getattr(rec.quality, k)
    m["duration_s"] = rec.num_frames / rec.fps
    cams_ok = cams is not None and cams.num_frames == rec.num_frames
    m.update(video_metrics)
    if depth is not None:
        m["valid_depth_fraction"] = float(depth["valid"].mean())
    if cams_ok:
        K, w2c = cams.intrinsics_array(), cams.w2c_array()
        m["registered_ratio"] = float(np.mean([f.registered for f in cams.frames]))
        m["fov_h_deg"], m["fov_w_deg"] = quality.field_of_view_deg(K, rec.height, rec.width)
    if cams_ok and rotations_ok:  # motion metrics need proper rotations (integrity.rotation reports the rest)
        K, w2c = cams.intrinsics_array(), cams.w2c_array()
        m["path_length"], m["rotation_deg"] = quality.camera_motion(w2c)
        scene = _median_depth(depth) if depth is not None else 1.0
        m["trajectory_anomalies"] = float(quality.trajectory_anomalies(w2c, scene))
    if cams_ok and depth is not None:
        with ctx.check("cross.multiview_consistency"):
            valid = depth["valid"] & np.isfinite(depth["depth"]) & (depth["depth"] > 0)
            K, w2c = cams.intrinsics_array(), cams.w2c_array()
            mv = ctx.tol.multiview().measure(depth["depth"], valid, K, w2c)
            m["multiview_consistency"] = mv
            # the recorded value is compared with a recomputation under the settings it was measured with
            recorded_settings = rec.quality.multiview_settings or quality.MultiviewSettings()
            recomputed["multiview_consistency"] = (mv if recorded_settings == ctx.tol.multiview()
                                                   else recorded_settings.measure(depth["depth"], valid, K, w2c))
            if mv is not None and mv < ctx.tol.multiview_floor:
                ctx.emit("cross.multiview_consistency", f"only {mv:.1%} of overlapping pixels agree after warping "
                                                        f"depth between frames (floor {ctx.tol.multiview_floor:.0%})",
                         rec.paths.depth, mv)
    else:
        ctx.skip("cross.multiview_consistency", "depth or cameras not usable")
    # unrecorded, non-computed metrics stay None; recorded ones are compared with the recomputation
    for k in m:
        if m[k] is not None and not math.isfinite(m[k]):
            m[k] = None
    with ctx.check("cross.recorded_quality"):
        diffs = []
        for k, (atol, rtol) in _RECORDED_TOL.items():
            recorded, value = getattr(rec.quality, k), recomputed.get(k, m.get(k))
            if recorded is None or value is None or not math.isfinite(value):
                continue
            if abs(recorded - value) > atol + rtol * abs(value):
                diffs.append(f"{k} recorded {recorded:.4g}, recomputed {value:.4g}")
        if diffs:
            ctx.emit("cross.recorded_quality", "; ".join(diffs), METADATA_FILE)
    ctx.result.metrics = m


@emits("cross.points_match_depth")
def check_sample(root: Union[str, Path], rec: SampleRecord, tol: Optional[gates.Tolerances] = None,
                 files: Optional[SampleFiles] = None) -> SampleResult:
    """Run every per-sample check on one sample whose paths were verified to stay inside `root`.

    Loads one sample's files at a time (read-only) and returns its findings and metrics. `files`:
    where the files are read from (default: the folder `root`; `MemoryFiles` for bytes in memory).
    """
    t0 = time.perf_counter()
    ctx = _Ctx(Path(root), rec, tol or gates.Tolerances(), SampleResult(id=rec.id, status=rec.status, split=rec.split),
               files=files)
    present = {rel for rel in rec.paths.all() if ctx.files.exists(rel)}
    frames = _check_video(ctx) if rec.paths.video in present else None
    video_metrics = _video_metrics(frames)
    del frames  # only one sample's arrays in memory at a time, and the frames not even that long
    depth = _check_npz(ctx, "depth", rec.paths.depth, DEPTH_NPZ) if rec.paths.depth in present else None
    points = _check_npz(ctx, "points", rec.paths.points, POINTS_NPZ) if rec.paths.points in present else None
    cams = _check_camera_json(ctx) if rec.paths.camera_json in present else None
    rotations_ok = _check_camera_values(ctx, cams) if cams is not None else False
    if rec.paths.camera_txt in present:
        _check_camera_txt(ctx, cams)
    pfinite = _check_values(ctx, depth, points)
    cams_ok = cams is not None and cams.num_frames == rec.num_frames
    if depth is not None and points is not None and cams_ok:
        with ctx.check("cross.points_match_depth"):
            _check_points_match_depth(ctx, depth, points, cams, pfinite)
    else:
        ctx.skip("cross.points_match_depth", "depth, points or cameras not usable")
    if rec.paths.points_ply in present:
        _check_ply(ctx, points, cams if cams_ok else None)
    _compute_metrics(ctx, video_metrics, depth, cams, rotations_ok)
    for cid, c in REGISTRY.items():  # whatever did not run on this sample, say why
        if c.scope == "sample" and cid not in ctx._ran and not cid.startswith(("gate.", "internal.")):
            ctx.skip(cid, "input file missing or unusable")
    ctx.result.ran = sorted(ctx._ran)
    ctx.result.seconds = time.perf_counter() - t0
    return ctx.result


#: tests set this environment variable to a sample id to make the worker process checking it die,
#: which exercises the crash isolation (honoured in worker processes only)
CRASH_TEST_ENV = "FWDATA_VALIDATE_TEST_CRASH"


def _check_sample_task(args: tuple) -> SampleResult:
    """One sample in a worker process: (root, record JSON, tolerances) or, for files in memory,
    (root, record JSON, tolerances, {relative path: bytes})."""
    root, rec_json, tol = args[:3]
    rec = SampleRecord.model_validate_json(rec_json)
    if os.environ.get(CRASH_TEST_ENV) == rec.id:
        os._exit(70)
    files = MemoryFiles(args[3]) if len(args) > 3 else None
    return check_sample(root, rec, gates.Tolerances.model_validate(tol), files=files)
