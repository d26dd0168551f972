"""`fwdata validate`: schema, integrity and cross-consistency checks of a dataset, plus quality gates.

Every check has a stable id (``schema.*``, ``integrity.*``, ``cross.*``, ``gate.*``), a severity
and a one-line description in `REGISTRY` (docs/VALIDATE.md lists them). A check produces
`Finding`s that name the check, the sample and the file. Severities:

- ``error``: the data breaks the contract or fails a dataset gate; the run fails (exit 1).
- ``warning``: suspicious, or a per-sample quality gate failed. A sample with a failed sample gate
  does not *pass*; whether that fails the run is decided by the dataset gates (`gate.pass_fraction`,
  `gate.min_samples`).
- ``info``: recorded for the report only.

Gate files can override any check's severity (or turn it ``off``).

Validation never writes to the dataset: files are opened read-only and nothing is created. Samples
are checked one at a time per worker (``workers`` processes), so peak memory is set by the largest
sample, not by the dataset. Damaged files (npz, mp4, json, txt, ply) become findings, never crashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fwdata import __version__, camera, gates, quality
from fwdata.contract import (
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

# --------------------------------------------------------------------------- registry


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Check:
    """One check: stable id, default severity, where it runs and what it catches."""

    id: str
    severity: Severity
    scope: Literal["dataset", "sample"]
    catches: str

    @property
    def family(self) -> str:
        return self.id.split(".", 1)[0]


REGISTRY: dict[str, Check] = {}


def register(id: str, severity: Severity, scope: Literal["dataset", "sample"], catches: str) -> Check:
    if id in REGISTRY:
        raise ValueError(f"check {id} registered twice")
    REGISTRY[id] = Check(id, severity, scope, catches)
    return REGISTRY[id]


E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFO
# schema: metadata.json and the tree
register("schema.metadata_json", E, "dataset", "metadata.json missing, not JSON, or not a JSON object (exit 2)")
register("schema.version", E, "dataset", "schema_version not known to this tool (exit 2)")
register("schema.metadata_model", E, "dataset", "top-level metadata fields (provenance, failures, splits, statistics) "
                                                 "that break the DatasetMetadata model")
register("schema.sample_record", E, "sample", "a sample record that breaks SampleRecord: bad id, T not 4k+1, H/W not "
                                              "multiples of 16, paths not derived from the id, bad quality values")
register("schema.duplicate_ids", E, "dataset", "two sample records with the same id")
register("schema.path_escape", E, "dataset", "a path in metadata that is absolute or has '..', or a file or symlink "
                                             "in the tree that resolves outside the dataset root")
register("schema.missing_file", E, "sample", "a file named by a sample record that does not exist")
register("schema.orphan_file", W, "dataset", "a file in the dataset that no sample names (left-over temporary files, "
                                             "samples dropped from metadata); .fwdata/ is internal and ignored")
register("schema.splits", E, "dataset", "splits naming unknown ids, or disagreeing with each sample's `split`")
register("schema.statistics", W, "dataset", "statistics that do not match the samples and failures")
# integrity: one sample's files
register("integrity.video_decode", E, "sample", "an mp4 that is truncated, corrupted or not a video (every frame is "
                                                "decoded)")
register("integrity.video_dims", E, "sample", "a video whose frame count or size differs from the record's T, H, W")
register("integrity.video_fps", E, "sample", "a video whose frame rate differs from the record's fps")
register("integrity.depth_file", E, "sample", "a depth npz that cannot be read (truncated, corrupt, pickled "
                                              "objects) or lacks / adds arrays")
register("integrity.depth_dtype", E, "sample", "depth arrays with the wrong dtype (depth float32, valid bool)")
register("integrity.depth_shape", E, "sample", "depth arrays whose shape is not [T,H,W] of the record (dropped frame)")
register("integrity.points_file", E, "sample", "a points npz that cannot be read or lacks / adds arrays")
register("integrity.points_dtype", E, "sample", "point arrays with the wrong dtype (points float16, valid bool)")
register("integrity.points_shape", E, "sample", "point arrays whose shape is not [T,H,W,3] / [T,H,W]")
register("integrity.depth_finite", E, "sample", "NaN or inf depth where valid is True")
register("integrity.depth_positive", E, "sample", "depth <= 0 where valid is True")
register("integrity.points_finite", E, "sample", "NaN or inf points where valid is True (e.g. float16 overflow)")
register("integrity.invalid_zero", W, "sample", "non-zero depth or points where valid is False (the contract stores 0)")
register("integrity.valid_fraction", W, "sample", "frames without a single valid depth pixel")
register("integrity.camera_json", E, "sample", "a camera json that cannot be read or breaks CameraFile (convention, "
                                               "model, frame fields, index order), or whose size/scale differ from "
                                               "the record")
register("integrity.camera_txt", E, "sample", "a camera txt that cannot be parsed (19 finite numbers per line)")
register("integrity.camera_count", E, "sample", "camera json or txt with a frame count other than T")
register("integrity.extrinsics", E, "sample", "w2c that is not 4x4, not finite, or whose last row is not 0 0 0 1")
register("integrity.rotation", E, "sample", "w2c rotations that are not orthonormal or have det -1 (reflections)")
register("integrity.intrinsics", E, "sample", "focal lengths not positive and finite, principal point outside "
                                              "the image")
register("integrity.world_frame", E, "sample", "frame 0 whose w2c is not the identity (frame 0 is the world frame)")
register("integrity.source_frame_order", E, "sample", "source_frame not strictly increasing")
register("integrity.source_trace", W, "sample", "source_frame that does not follow the record's source start_frame, "
                                                "stride and frame count")
register("integrity.ply_file", E, "sample", "a fused-cloud ply that is truncated, corrupt, empty while the sample "
                                            "has valid points, or holds non-finite coordinates")
# cross-consistency
register("cross.camera_txt_json", E, "sample", "camera txt and json that disagree (intrinsics, w2c, frame indices)")
register("cross.valid_masks", E, "sample", "points marked valid where depth is not")
register("cross.points_match_depth", E, "sample", "point maps that are not the depth unprojected with the cameras "
                                                  "(within float16 precision): scaled points, swapped or edited "
                                                  "cameras, depth edited after the points were made")
register("cross.multiview_consistency", W, "sample", "depth warped between frames with the cameras that disagrees "
                                                     "on most overlapping pixels (tolerances.multiview_floor)")
register("cross.ply_matches_points", E, "sample", "a fused cloud that does not lie where the point maps say")
register("cross.recorded_quality", W, "sample", "quality metrics in metadata.json that differ from the values "
                                                "recomputed from the files")
# gates
for _m in gates.METRICS.values():
    register(gates.sample_gate_id(_m.name), W, "sample", f"sample gate on {_m.name}: {_m.description}")
register("gate.min_samples", E, "dataset", "fewer usable samples than dataset.min_samples")
register("gate.pass_fraction", E, "dataset", "fewer status-ok samples passing every check and sample gate than "
                                             "dataset.min_pass_fraction")
register("gate.duplicate_clips", E, "dataset", "more duplicate clips (identical video, or overlapping source frames) "
                                               "than dataset.max_duplicate_clips")
register("gate.split_sizes", E, "dataset", "splits with fewer usable samples than dataset.min_split_sizes")
register("gate.random_init_model", E, "dataset", "data made with a randomly initialised (depth) model; a warning when "
                                                 "dataset.allow_random_init_models is true")
register("gate.split_leakage", W, "dataset", "clips of one source video in several splits; an error when "
                                             "dataset.allow_source_in_several_splits is false")
# the validator itself
register("internal.check_crashed", E, "sample", "a check that raised unexpectedly (a bug in fwdata: please report)")
register("internal.worker_crashed", E, "sample", "a worker process that died on a sample (e.g. a decoder crash)")
del E, W, I


# --------------------------------------------------------------------------- results


class Finding(BaseModel):
    """One problem found by one check."""

    model_config = ConfigDict(extra="forbid")

    check: str = Field(description="check id, e.g. integrity.depth_dtype")
    severity: Severity
    message: str
    sample: Optional[str] = Field(None, description="sample id, when the finding is about one sample")
    file: Optional[str] = Field(None, description="path relative to the dataset root")
    value: Optional[float] = Field(None, description="the measured number, when there is one")


class SampleResult(BaseModel):
    """Outcome of the per-sample checks of one sample (what a worker sends back)."""

    id: str
    status: str = "ok"
    split: str = "train"
    findings: list[Finding] = Field(default_factory=list)
    metrics: dict[str, Optional[float]] = Field(default_factory=dict)
    ran: list[str] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict, description="check id -> why it could not run")
    video_sha1: Optional[str] = None
    seconds: float = 0.0


class CheckSummary(BaseModel):
    id: str
    severity: Severity
    scope: str
    catches: str
    outcome: Literal["passed", "failed", "warned", "skipped", "off"]
    ran: int = Field(0, description="samples (or 1 for dataset checks) the check ran on")
    skipped: int = 0
    findings: int = 0
    skip_reason: Optional[str] = None


class SampleSummary(BaseModel):
    id: str
    status: str
    split: str
    passed: bool
    errors: int
    warnings: int
    metrics: dict[str, Optional[float]]


class Summary(BaseModel):
    samples_total: int = 0
    samples_checked: int = 0
    samples_passed: int = 0
    errors: int = 0
    warnings: int = 0
    infos: int = 0


class ValidationReport(BaseModel):
    """Everything `fwdata validate` found; rendered as a table, JSON or JUnit XML by fwdata.report."""

    tool_version: str = __version__
    dataset: str
    gates: str
    started: str
    duration_s: float = 0.0
    exit_code: int = 0
    passed: bool = True
    summary: Summary = Field(default_factory=Summary)
    checks: list[CheckSummary] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)
    samples: list[SampleSummary] = Field(default_factory=list)


class ValidateOptions(BaseModel):
    """Options of `fwdata validate` (the command parses its flags into this)."""

    model_config = ConfigDict(extra="forbid")

    dataset: Path
    gates: Optional[Path] = Field(None, description="gate TOML file; None = built-in defaults (default.toml)")
    workers: int = Field(1, ge=0, le=256, description="processes checking samples in parallel; 0 = in this process "
                                                         "(no isolation from decoder crashes)")
    samples: list[str] = Field(default_factory=list, description="check only these sample ids (dataset gates skipped)")


class UsageError(ValueError):
    """Bad options: missing dataset folder, unreadable gate file, unknown sample id or check id (exit 2)."""


# --------------------------------------------------------------------------- per-sample checks


@dataclass
class _Ctx:
    root: Path
    rec: SampleRecord
    tol: gates.Tolerances
    result: SampleResult
    _ran: set = field(default_factory=set)

    def emit(self, check: str, message: str, file: Optional[str] = None, value: Optional[float] = None) -> None:
        self.result.findings.append(Finding(check=check, severity=REGISTRY[check].severity, message=message,
                                            sample=self.rec.id, file=file, value=value))

    def skip(self, check: str, reason: str) -> None:
        if check not in self._ran:
            self.result.skipped.setdefault(check, reason)

    @contextlib.contextmanager
    def check(self, check_id: str) -> Iterator[None]:
        """Run one check's code: mark it as run; an unexpected exception becomes internal.check_crashed."""
        self._ran.add(check_id)
        self.result.skipped.pop(check_id, None)
        try:
            yield
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


def _decoder_message(e: Exception, path: Path) -> str:
    """A decoder error in one line, without the file name (the finding names it) or C++ source locations."""
    import re

    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = msg.replace(f"{path}: ", "").replace(str(path), path.name)
    msg = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", msg)
    return msg[:300]


def _check_video(ctx: _Ctx) -> Optional[np.ndarray]:
    from fwdata import video

    rel = ctx.rec.paths.video
    path = ctx.root / rel
    frames = None
    with ctx.check("integrity.video_decode"):
        try:
            with _quiet_stderr():
                info, frames = video.read_video(path)
        except Exception as e:
            ctx.emit("integrity.video_decode", f"video cannot be decoded: {_decoder_message(e, path)}", rel)
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
        ctx.result.video_sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
    return frames


def _check_npz(ctx: _Ctx, kind: str, rel: str, spec: dict[str, ArraySpec]) -> Optional[dict[str, np.ndarray]]:
    file_id, dtype_id, shape_id = f"integrity.{kind}_file", f"integrity.{kind}_dtype", f"integrity.{kind}_shape"
    path = ctx.root / rel
    arrays: Optional[dict[str, np.ndarray]] = None
    with ctx.check(file_id):
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except AttributeError:  # np.load returned a plain array: a .npy, not an npz
            ctx.emit(file_id, "not an npz archive (a single .npy array?)", rel)
        except Exception as e:  # BadZipFile, zlib.error, ValueError (pickles), EOFError ...
            ctx.emit(file_id, f"cannot be read as npz ({type(e).__name__}: {str(e)[:200]})", rel)
        if arrays is not None:
            missing, extra = sorted(set(spec) - set(arrays)), sorted(set(arrays) - set(spec))
            if missing or extra:
                ctx.emit(file_id, f"arrays {sorted(arrays)}: missing {missing}, unexpected {extra}", rel)
                arrays = None
    if arrays is None:
        ctx.skip(dtype_id, f"{rel} not readable")
        ctx.skip(shape_id, f"{rel} not readable")
        return None
    dims = ctx.rec.dims
    ok = True
    with ctx.check(dtype_id):
        bad = [f"{n} is {arrays[n].dtype}, expected {s.dtype}" for n, s in spec.items() if arrays[n].dtype != np.dtype(s.dtype)]
        if bad:
            ctx.emit(dtype_id, "; ".join(bad), rel)
            ok = False
    with ctx.check(shape_id):
        bad = []
        for n, s in spec.items():
            expected = tuple(dims.get(d, d) if isinstance(d, str) else d for d in s.shape)
            if arrays[n].shape != expected:
                bad.append(f"{n} has shape {arrays[n].shape}, expected {expected} {s.shape}")
        if bad:
            ctx.emit(shape_id, "; ".join(bad), rel)
            ok = False
    return arrays if ok else None


_DUMMY_FRAME = {"index": 0, "source_frame": 0, "timestamp": 0.0, "fx": 1.0, "fy": 1.0, "cx": 0.0, "cy": 0.0,
                "w2c": np.eye(4).tolist()}
_FIELD_CHECK = {"fx": "integrity.intrinsics", "fy": "integrity.intrinsics", "cx": "integrity.intrinsics",
                "cy": "integrity.intrinsics", "w2c": "integrity.extrinsics"}


def _check_camera_json(ctx: _Ctx) -> Optional[CameraFile]:
    rel = ctx.rec.paths.camera_json
    rec = ctx.rec
    cams: Optional[CameraFile] = None
    with ctx.check("integrity.camera_json"):
        try:
            raw = json.loads((ctx.root / rel).read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            ctx.emit("integrity.camera_json", f"not valid JSON ({e})", rel)
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


def _check_camera_txt(ctx: _Ctx, cams: Optional[CameraFile]) -> None:
    rel = ctx.rec.paths.camera_txt
    rows = None
    with ctx.check("integrity.camera_txt"):
        try:
            rows = read_camera_txt(ctx.root / rel)
        except ContractError as e:
            ctx.emit("integrity.camera_txt", str(e).replace(str(ctx.root / rel), rel), rel)
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


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def read_ply_xyz(path: Union[str, Path]) -> np.ndarray:
    """Vertex coordinates (N,3) float64 of a PLY point cloud (binary or ascii), read-only and strict.

    Raises ValueError with a clear reason for a truncated or malformed file (no native reader is
    involved, so damage never crashes the process).
    """
    with open(path, "rb") as fh:
        data = fh.read()
    if not data.startswith(b"ply"):
        raise ValueError("does not start with 'ply'")
    end = data.find(b"end_header")
    if end < 0:
        raise ValueError("no end_header line")
    body_start = data.index(b"\n", end) + 1 if b"\n" in data[end:] else len(data)
    try:
        header = data[:end].decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ValueError("header is not ASCII") from None
    fmt, elements = None, []  # [(name, count, [(prop, dtype)])]
    for line in header[1:]:
        parts = line.split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        if parts[0] == "format" and len(parts) >= 2:
            fmt = parts[1]
        elif parts[0] == "element" and len(parts) == 3:
            elements.append((parts[1], int(parts[2]), []))
        elif parts[0] == "property" and elements:
            if parts[1] == "list":
                elements[-1][2].append((parts[-1], None))
            elif len(parts) == 3 and parts[1] in _PLY_TYPES:
                elements[-1][2].append((parts[2], _PLY_TYPES[parts[1]]))
            else:
                raise ValueError(f"bad property line {line!r}")
        else:
            raise ValueError(f"unexpected header line {line!r}")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"unknown format {fmt!r}")
    if not elements or elements[0][0] != "vertex":
        raise ValueError("first element is not 'vertex'")
    _, n, props = elements[0]
    names = [p for p, _ in props]
    if not {"x", "y", "z"} <= set(names) or any(t is None for _, t in props):
        raise ValueError("vertex element lacks x, y, z or has list properties")
    body = data[body_start:]
    if fmt == "ascii":
        lines = body.decode("ascii", errors="replace").split("\n")
        if len([ln for ln in lines[:n] if ln.strip()]) < n:
            raise ValueError(f"declares {n} vertices, holds fewer")
        try:
            table = np.array([[float(x) for x in ln.split()[:len(props)]] for ln in lines[:n]], dtype=np.float64)
        except ValueError:
            raise ValueError("non-numeric vertex data") from None
        if table.shape != (n, len(props)):
            raise ValueError("vertex lines have the wrong number of values")
        return table[:, [names.index(c) for c in "xyz"]]
    endian = "<" if fmt == "binary_little_endian" else ">"
    dt = np.dtype([(p, endian + t) for p, t in props])
    need = n * dt.itemsize
    if len(body) < need:
        raise ValueError(f"truncated: declares {n} vertices ({need} bytes), holds {len(body)} bytes")
    v = np.frombuffer(body, dtype=dt, count=n)
    return np.stack([v["x"], v["y"], v["z"]], axis=-1).astype(np.float64)


def _check_ply(ctx: _Ctx, points: Optional[dict], cams: Optional[CameraFile]) -> None:
    rel = ctx.rec.paths.points_ply
    if not rel:
        return
    xyz = None
    with ctx.check("integrity.ply_file"):
        try:
            xyz = read_ply_xyz(ctx.root / rel)
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


def _compute_metrics(ctx: _Ctx, video_metrics: dict[str, float], depth: Optional[dict],
                     cams: Optional[CameraFile], rotations_ok: bool) -> None:
    rec = ctx.rec
    m: dict[str, Optional[float]] = {k: None for k in gates.METRICS}
    for k in ("reprojection_error_px", "num_points3d", "depth_sfm_absrel"):
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
            mv = quality.multiview_consistency(depth["depth"], valid, cams.intrinsics_array(), cams.w2c_array(),
                                               rel_tol=ctx.tol.multiview_rel_tol, stride=ctx.tol.multiview_stride,
                                               max_pairs=ctx.tol.multiview_max_pairs)
            m["multiview_consistency"] = mv
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
            recorded = getattr(rec.quality, k)
            if recorded is None or m.get(k) is None:
                continue
            if abs(recorded - m[k]) > atol + rtol * abs(m[k]):
                diffs.append(f"{k} recorded {recorded:.4g}, recomputed {m[k]:.4g}")
        if diffs:
            ctx.emit("cross.recorded_quality", "; ".join(diffs), METADATA_FILE)
    ctx.result.metrics = m


def check_sample(root: Union[str, Path], rec: SampleRecord, tol: Optional[gates.Tolerances] = None) -> SampleResult:
    """Run every per-sample check on one sample whose paths were verified to stay inside `root`.

    Loads one sample's files at a time (read-only) and returns its findings and metrics.
    """
    t0 = time.perf_counter()
    ctx = _Ctx(Path(root), rec, tol or gates.Tolerances(), SampleResult(id=rec.id, status=rec.status, split=rec.split))
    present = {rel for rel in rec.paths.all() if (ctx.root / rel).is_file()}
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


def _check_sample_task(args: tuple[str, str, dict]) -> SampleResult:
    root, rec_json, tol = args
    rec = SampleRecord.model_validate_json(rec_json)
    if os.environ.get(CRASH_TEST_ENV) == rec.id:
        os._exit(70)
    return check_sample(root, rec, gates.Tolerances.model_validate(tol))


# --------------------------------------------------------------------------- dataset-level checks


@dataclass
class _MetaResult:
    records: list[SampleRecord]
    findings: list[Finding]
    meta: Optional[DatasetMetadata]  # top level (samples emptied) when valid
    raw_samples: list[Any]
    fatal: bool = False


def _dfind(check: str, message: str, sample: Optional[str] = None, file: Optional[str] = None,
           value: Optional[float] = None) -> Finding:
    return Finding(check=check, severity=REGISTRY[check].severity, message=message, sample=sample, file=file,
                   value=value)


def check_metadata(root: Path) -> _MetaResult:
    """schema.* checks of metadata.json: parse, version, top-level model, each record, paths, ids, splits."""
    out = _MetaResult([], [], None, [])
    f = out.findings
    path = root / METADATA_FILE
    if not path.is_file():
        f.append(_dfind("schema.metadata_json", f"{METADATA_FILE} is missing; is {root} a dataset made by "
                                                f"`fwdata build`?", file=METADATA_FILE))
        out.fatal = True
        return out
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        f.append(_dfind("schema.metadata_json", f"not valid JSON ({e})", file=METADATA_FILE))
        out.fatal = True
        return out
    if not isinstance(raw, dict):
        f.append(_dfind("schema.metadata_json", f"top level is a {type(raw).__name__}, expected an object",
                        file=METADATA_FILE))
        out.fatal = True
        return out
    version = raw.get("schema_version", SUPPORTED_SCHEMA_VERSIONS[0])
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        f.append(_dfind("schema.version", f"schema_version {version!r} is not known to fwdata {__version__} "
                                          f"(known: {', '.join(SUPPORTED_SCHEMA_VERSIONS)})", file=METADATA_FILE))
        out.fatal = True
        return out
    raw_samples = raw.get("samples", [])
    if not isinstance(raw_samples, list):
        f.append(_dfind("schema.metadata_model", "samples is not a list", file=METADATA_FILE))
        raw_samples = []
    out.raw_samples = raw_samples
    try:
        out.meta = DatasetMetadata.model_validate({**raw, "samples": [], "splits": {}})
    except ValidationError as e:
        f.append(_dfind("schema.metadata_model", _pydantic_summary(e), file=METADATA_FILE))
    # ids
    raw_ids = [s.get("id") if isinstance(s, dict) else None for s in raw_samples]
    counts: dict[str, int] = {}
    for sid in raw_ids:
        if isinstance(sid, str):
            counts[sid] = counts.get(sid, 0) + 1
    for sid, n in counts.items():
        if n > 1:
            f.append(_dfind("schema.duplicate_ids", f"{n} sample records share the id {sid!r}", sample=sid,
                            file=METADATA_FILE))
    seen: set[str] = set()
    for i, s in enumerate(raw_samples):
        label = raw_ids[i] if isinstance(raw_ids[i], str) else f"samples[{i}]"
        if not isinstance(s, dict):
            f.append(_dfind("schema.sample_record", "not an object", sample=label, file=METADATA_FILE))
            continue
        escaped = False
        paths = s.get("paths") if isinstance(s.get("paths"), dict) else {}
        for key, rel in paths.items():
            if rel is None:
                continue
            try:
                resolve_inside(root, rel if isinstance(rel, str) else "")
            except PathEscapeError as e:
                f.append(_dfind("schema.path_escape", f"paths.{key}: {e}", sample=label,
                                file=rel if isinstance(rel, str) else None))
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
    # splits and statistics
    splits = raw.get("splits", {})
    if isinstance(splits, dict):
        known = {r.id: r.split for r in out.records}
        all_ids = {sid for sid in raw_ids if isinstance(sid, str)}
        listed: dict[str, str] = {}
        for split, ids in splits.items():
            if not isinstance(ids, list):
                f.append(_dfind("schema.splits", f"split {split!r} is not a list of ids", file=METADATA_FILE))
                continue
            unknown = [i for i in ids if i not in all_ids]
            if unknown:
                f.append(_dfind("schema.splits", f"split {split!r} lists unknown ids {unknown[:5]}",
                                file=METADATA_FILE))
            for i in ids:
                if isinstance(i, str):
                    listed[i] = split
        for sid, split in known.items():
            if listed.get(sid) != split:
                f.append(_dfind("schema.splits", f"record says split {split!r}, splits list it under "
                                                 f"{listed.get(sid)!r}", sample=sid, file=METADATA_FILE))
    else:
        f.append(_dfind("schema.splits", "splits is not an object", file=METADATA_FILE))
    stats = raw.get("statistics")
    if isinstance(stats, dict) and len(out.records) == len(raw_samples):
        expected = DatasetMetadata.model_construct(samples=out.records,
                                                   failures=out.meta.failures if out.meta else []).with_statistics()
        diffs = [f"{k} {stats.get(k)} != {v}" for k, v in expected.statistics.model_dump().items()
                 if k in stats and not _close(stats.get(k), v)]
        if diffs:
            f.append(_dfind("schema.statistics", "statistics disagree with the samples: " + "; ".join(diffs),
                            file=METADATA_FILE))
    return out


def _close(a: Any, b: Any) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(b)))
    except (TypeError, ValueError):
        return False


def check_tree(root: Path, raw_samples: list[Any], reported_escapes: set[str]) -> list[Finding]:
    """Orphan files and symlinks leaving the root. `.fwdata/` (completion markers) is internal."""
    referenced = {METADATA_FILE}
    for s in raw_samples:
        paths = s.get("paths") if isinstance(s, dict) and isinstance(s.get("paths"), dict) else {}
        referenced.update(p for p in paths.values() if isinstance(p, str))
    findings = []
    root_real = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != ".fwdata"]
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
            if name in filenames and rel not in referenced:
                why = "a temporary file left by an interrupted build" if ".tmp-" in name else "named by no sample"
                findings.append(_dfind("schema.orphan_file", f"{rel} is {why}", file=rel))
    return findings


# --------------------------------------------------------------------------- running


def _iter_results(root: Path, records: list[SampleRecord], tol: gates.Tolerances, workers: int) -> Iterator[SampleResult]:
    """Per-sample results in record order.

    workers == 0: in this process. workers >= 1: that many spawned processes, fed through a bounded
    window (so neither tasks nor results pile up), with single-threaded BLAS (the checks only do
    tiny matrix products; threaded BLAS on a busy machine makes them tens of times slower).
    """
    if workers == 0 or not records:
        for rec in records:
            yield check_sample(root, rec, tol)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    tol_d = tol.model_dump()
    workers = min(workers, len(records))
    window = 2 * workers
    env_keys = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    os.environ.update({k: "1" for k in env_keys})  # read by the spawned workers when they start
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    pending: deque = deque()
    it = iter(records)
    try:
        while True:
            while len(pending) < window:
                rec = next(it, None)
                if rec is None:
                    break
                pending.append((rec, pool.submit(_check_sample_task, (str(root), rec.model_dump_json(), tol_d))))
            if not pending:
                return
            rec, fut = pending.popleft()
            try:
                yield fut.result()
            except BrokenProcessPool:
                # a worker died (native crash): every unfinished sample in flight is re-run alone in a
                # fresh process, so only the one that crashes again gets internal.worker_crashed
                pool.shutdown(wait=False, cancel_futures=True)
                for r, f in [(rec, fut)] + list(pending):
                    try:
                        yield f.result()
                    except BrokenProcessPool:
                        yield _isolated(root, r, tol_d, ctx)
                pending.clear()
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _isolated(root: Path, rec: SampleRecord, tol_d: dict, ctx) -> SampleResult:
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as one:
        try:
            return one.submit(_check_sample_task, (str(root), rec.model_dump_json(), tol_d)).result()
        except BrokenProcessPool:
            res = SampleResult(id=rec.id, status=rec.status, split=rec.split)
            res.findings.append(Finding(check="internal.worker_crashed", severity=Severity.ERROR, sample=rec.id,
                                        message="the worker process checking this sample died (a decoder crash on "
                                                "a damaged file?)"))
            return res


def _apply_severity(findings: list[Finding], overrides: dict[str, str]) -> list[Finding]:
    out = []
    for f in findings:
        sev = overrides.get(f.check)
        if sev == "off":
            continue
        if sev is not None:
            f = f.model_copy(update={"severity": Severity(sev)})
        out.append(f)
    return out


def _check_overrides(config: gates.GateConfig) -> None:
    unknown = sorted(set(config.severity) - set(REGISTRY))
    if unknown:
        raise UsageError(f"gate file {config.name!r}: unknown check ids in [severity]: {unknown}")


def validate_dataset(opts: ValidateOptions, progress: Optional[Callable[[str, int, int], None]] = None,
                     config: Optional[gates.GateConfig] = None) -> ValidationReport:
    """Validate the dataset at `opts.dataset` against the gate file `opts.gates` (or `config`).

    Raises UsageError for bad options (missing dataset folder, bad gate file, unknown sample id).
    A dataset that cannot be read at all (no or invalid metadata.json, unknown schema version)
    gives a report with exit_code 2; any error finding gives exit_code 1; otherwise 0.
    `progress(sample_id, done, total)` is called after each sample.
    """
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    root = Path(opts.dataset)
    if not root.is_dir():
        raise UsageError(f"dataset folder {root} does not exist")
    if config is None:
        try:
            config = gates.load_gates(opts.gates)
        except gates.GateError as e:
            raise UsageError(str(e)) from None
    _check_overrides(config)
    overrides = dict(config.severity)
    report = ValidationReport(dataset=str(root), gates=str(opts.gates) if opts.gates else f"{config.name} (built-in)",
                              started=started)
    ran: dict[str, int] = {}
    skipped: dict[str, tuple[int, str]] = {}

    def mark(ids, n=1):
        for cid in ids:
            ran[cid] = ran.get(cid, 0) + n

    meta_res = check_metadata(root)
    dataset_findings = list(meta_res.findings)
    mark(["schema.metadata_json"])
    if meta_res.fatal:
        mark(["schema.version"] if any(x.check == "schema.version" for x in dataset_findings) else [])
        return _finish(report, dataset_findings, [], ran, {}, overrides, fatal=True, t0=t0)
    mark(["schema.version", "schema.metadata_model", "schema.sample_record", "schema.duplicate_ids",
          "schema.path_escape", "schema.missing_file", "schema.splits", "schema.statistics"])
    escapes = {x.file for x in dataset_findings if x.check == "schema.path_escape" and x.file}
    dataset_findings += check_tree(root, meta_res.raw_samples, escapes)
    mark(["schema.orphan_file"])

    records = meta_res.records
    subset = bool(opts.samples)
    if subset:
        known = {r.id for r in records}
        unknown = [s for s in opts.samples if s not in known]
        if unknown:
            raise UsageError(f"unknown (or invalid) sample ids: {', '.join(unknown)}")
        wanted = set(opts.samples)
        records = [r for r in records if r.id in wanted]

    # per sample only a summary, its findings and the facts the dataset gates need are kept
    summaries: list[SampleSummary] = []
    sample_findings: list[Finding] = []
    facts: list[gates.SampleFacts] = []
    for n, res in enumerate(_iter_results(root, records, config.tolerances, opts.workers), start=1):
        rec = records[n - 1]
        gate_fail = gates.evaluate_sample(res.id, res.metrics, config)
        for g in gate_fail:
            sev = Severity(g.severity) if g.severity else REGISTRY[g.check].severity
            if res.status == "gated_out":
                sev = Severity.INFO  # already excluded from training by the build
            metric = gates.METRICS[g.check.split(".", 1)[1]]
            res.findings.append(Finding(check=g.check, severity=sev, message=g.message, sample=res.id,
                                        file=getattr(rec.paths, metric.file, None) or METADATA_FILE, value=g.value))
        res.findings = _apply_severity(res.findings, overrides)
        mark(res.ran)
        mark([gates.sample_gate_id(m) for m in config.sample] + ["internal.check_crashed", "internal.worker_crashed"])
        for cid, why in res.skipped.items():
            c, _ = skipped.get(cid, (0, why))
            skipped[cid] = (c + 1, why)
        passed = not any(f.severity == Severity.ERROR or (f.check.startswith("gate.") and f.severity != Severity.INFO)
                         for f in res.findings)
        summaries.append(SampleSummary(id=res.id, status=res.status, split=res.split, passed=passed,
                                       errors=sum(f.severity == Severity.ERROR for f in res.findings),
                                       warnings=sum(f.severity == Severity.WARNING for f in res.findings),
                                       metrics=res.metrics))
        sample_findings.extend(res.findings)
        facts.append(gates.SampleFacts(id=res.id, split=res.split, status=res.status, source=rec.source.path,
                                       start_frame=rec.source.start_frame, stride=rec.source.stride,
                                       num_frames=rec.num_frames, passed=passed, video_sha1=res.video_sha1))
        if progress:
            progress(res.id, n, len(records))

    for m in gates.METRICS:
        if m not in config.sample:
            skipped[gates.sample_gate_id(m)] = (0, "no threshold in the gate file")
    # provenance: randomly initialised models
    random_models = []
    if meta_res.meta is not None:
        random_models = [f"{m.role} model {m.name!r}" for m in meta_res.meta.provenance.models if m.random_init]
    if not subset:
        for g in gates.evaluate_dataset(facts, random_models, config):
            sev = Severity(g.severity) if g.severity else REGISTRY[g.check].severity
            dataset_findings.append(Finding(check=g.check, severity=sev, message=g.message, sample=g.sample,
                                            file=METADATA_FILE, value=g.value))
        mark(["gate.min_samples", "gate.pass_fraction", "gate.duplicate_clips", "gate.split_sizes",
              "gate.random_init_model", "gate.split_leakage"])
    else:
        for cid in ("gate.min_samples", "gate.pass_fraction", "gate.duplicate_clips", "gate.split_sizes",
                    "gate.split_leakage"):
            skipped[cid] = (1, "dataset gates need the whole dataset (--sample given)")
        for name in random_models:
            dataset_findings.append(_dfind("gate.random_init_model", f"made with the randomly initialised {name}",
                                           file=METADATA_FILE))
        mark(["gate.random_init_model"])
    report.summary.samples_total = len(meta_res.raw_samples)
    return _finish(report, _apply_severity(dataset_findings, overrides) + sample_findings, summaries, ran, skipped,
                   overrides, fatal=False, t0=t0)


def _finish(report: ValidationReport, findings: list[Finding], summaries: list[SampleSummary],
            ran: dict[str, int], skipped: dict[str, tuple[int, str]], overrides: dict[str, str], fatal: bool,
            t0: float) -> ValidationReport:
    per_check: dict[str, list[Finding]] = {}
    for f in findings:
        per_check.setdefault(f.check, []).append(f)
    checks = []
    for cid, c in REGISTRY.items():
        sev = overrides.get(cid, c.severity.value)
        fs = per_check.get(cid, [])
        n_run = ran.get(cid, 0) or (1 if fs else 0)
        n_skip, why = skipped.get(cid, (0, None))
        if sev == "off":
            outcome = "off"
        elif any(f.severity == Severity.ERROR for f in fs):
            outcome = "failed"
        elif any(f.severity == Severity.WARNING for f in fs):
            outcome = "warned"
        elif n_run:
            outcome = "passed"
        else:
            outcome = "skipped"
            why = why or ("the dataset could not be read" if fatal else "not applicable to this dataset")
        checks.append(CheckSummary(id=cid, severity=Severity(sev) if sev != "off" else c.severity, scope=c.scope,
                                   catches=c.catches, outcome=outcome, ran=n_run, skipped=n_skip, findings=len(fs),
                                   skip_reason=why if outcome == "skipped" or n_skip else None))
    report.checks = checks
    report.findings = findings
    report.samples = summaries
    s = report.summary
    s.samples_checked = len(summaries)
    s.samples_passed = sum(r.passed for r in summaries)
    s.errors = sum(f.severity == Severity.ERROR for f in findings)
    s.warnings = sum(f.severity == Severity.WARNING for f in findings)
    s.infos = sum(f.severity == Severity.INFO for f in findings)
    report.exit_code = 2 if fatal else (1 if s.errors else 0)
    report.passed = report.exit_code == 0
    report.duration_s = round(time.perf_counter() - t0, 3)
    return report
