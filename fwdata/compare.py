"""Compare a built dataset with a ground-truth dataset of the same videos: cameras, focal, depth, points.

Researchers check an annotation pipeline on footage whose geometry they know (rendered scenes,
`fwdata synth`, RGB-D captures converted to the contract). `fwdata compare BUILT --truth TRUTH`
does that check, one row per built sample:

- A built sample matches the truth sample whose id, or whose source video's file stem, equals the
  stem of the built sample's source video. Frames are paired by `source_frame` (the frame index in
  the source video), so a clip taken with a stride or offset is compared with the right truth frames.
- Cameras: ATE after a Sim(3) alignment of the camera centres, as a fraction of the truth path's
  extent (`camera.trajectory_metrics`); RPE rotation between consecutive compared frames; `scale`
  is the Sim(3) scale from built units to truth units (about 1 for a metric build in metres).
- Focal: built fx over truth fx, both converted to source-video pixels (`fx / resize_scale`), so
  clips resized differently compare correctly.
- Depth and points (when both samples show the same crop of the source; clips of another size are
  compared on the built grid, against the nearest truth pixel of each pixel centre): depth
  times the clip's one Sim(3) scale against the truth, over pixels valid in both: AbsRel (mean of
  |d - d*| / d*) and delta1 (share of pixels with max(d/d*, d*/d) < 1.25); point maps mapped into the
  truth's world by the Sim(3), error as a fraction of the truth depth at that pixel.

Units: `ate_pct`, `focal_err_pct`, `depth_absrel_pct`, `point_err_pct` and `delta1_pct` are
percentages; `rpe_rot_deg` is degrees. Nothing is modified in either dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from fwdata.dataset import camera
from fwdata.dataset.contract import (
    DEPTH_NPZ,
    POINTS_NPZ,
    CameraFile,
    ContractError,
    DatasetMetadata,
    SampleRecord,
    load_metadata,
    load_npz,
    read_camera_json,
    resolve_inside,
)

#: the table's columns, in order (pandas DataFrame from `compare_datasets`)
COLUMNS = ("sample", "truth", "frames", "registered_pct", "ate_pct", "rpe_rot_deg", "scale", "focal_err_pct",
           "depth_absrel_pct", "delta1_pct", "point_err_pct", "note")


class CompareError(ValueError):
    """The two datasets cannot be compared (unreadable, or no sample in common)."""


@dataclass
class SampleComparison:
    """One built sample against its truth; None where a number could not be computed (see `note`)."""

    sample: str
    truth: str
    frames: int
    registered_pct: float
    ate_pct: Optional[float] = None
    rpe_rot_deg: Optional[float] = None
    scale: Optional[float] = None
    focal_err_pct: Optional[float] = None
    depth_absrel_pct: Optional[float] = None
    delta1_pct: Optional[float] = None
    point_err_pct: Optional[float] = None
    note: str = ""


def match_truth(record: SampleRecord, truth: DatasetMetadata) -> Optional[SampleRecord]:
    """The truth sample for a built one: same id as the built source's file stem, else same source stem."""
    stem = Path(record.source.path).stem
    for t in truth.samples:
        if t.id == stem:
            return t
    for t in truth.samples:
        if Path(t.source.path).stem == stem:
            return t
    return None


def _same_source(record: SampleRecord, truth: SampleRecord) -> bool:
    """Both samples come from the same-sized source and the built clip's crop lies inside the truth's
    (clip sizes and crops may differ: a 16:9 render built into 7:4 clips)."""
    if (record.source.width, record.source.height) != (truth.source.width, truth.source.height):
        return False
    (x, y, w, h), (tx, ty, tw, th) = record.source.crop_xywh, truth.source.crop_xywh
    return bool(x >= tx - 1e-6 and y >= ty - 1e-6 and x + w <= tx + tw + 1e-6 and y + h <= ty + th + 1e-6)


def _truth_pixels(record: SampleRecord, truth: SampleRecord) -> tuple[np.ndarray, np.ndarray]:
    """(rows (H,1), cols (1,W)): the truth pixel under each pixel centre of the built clip, through
    the source pixels both were cut from (nearest; the identity when both are the same crop and size),
    for samples with `_same_source`."""
    (x, y, w, h), (tx, ty, tw, th) = record.source.crop_xywh, truth.source.crop_xywh
    src_u = x + (np.arange(record.width) + 0.5) * w / record.width
    src_v = y + (np.arange(record.height) + 0.5) * h / record.height
    cols = np.floor((src_u - tx) * truth.width / tw).astype(np.int64)
    rows = np.floor((src_v - ty) * truth.height / th).astype(np.int64)
    return np.clip(rows, 0, truth.height - 1)[:, None], np.clip(cols, 0, truth.width - 1)[None, :]


def frame_pairs(cams: CameraFile, gt_cams: CameraFile) -> list[tuple[int, int]]:
    """(built frame index, truth frame index) of the frames that share a `source_frame`, in built order."""
    gt_index = {f.source_frame: f.index for f in gt_cams.frames}
    return [(f.index, gt_index[f.source_frame]) for f in cams.frames if f.source_frame in gt_index]


def aligned_trajectory(built_root: Path, record: SampleRecord, truth_root: Path,
                       truth: SampleRecord) -> tuple[np.ndarray, np.ndarray, float]:
    """The built cameras of the frames shared with the truth, mapped into the truth's world and unit
    by the same Sim(3) `compare_sample` measures with: (aligned built w2c (N,4,4), truth w2c (N,4,4),
    scale). Raises ValueError when fewer than 3 frames are shared or a path does not move."""
    cams = read_camera_json(resolve_inside(built_root, record.paths.camera_json))
    gt_cams = read_camera_json(resolve_inside(truth_root, truth.paths.camera_json))
    pairs = frame_pairs(cams, gt_cams)
    if len(pairs) < 3:
        raise ValueError(f"only {len(pairs)} frames share a source frame with the truth (need 3)")
    bi, ti = (np.array(x) for x in zip(*pairs))
    gt_w2c = gt_cams.w2c_array()[ti]
    s, _, _, aligned = camera.sim3_align(cams.w2c_array()[bi], gt_w2c)
    return aligned, gt_w2c, float(s)


def compare_sample(built_root: Path, record: SampleRecord, truth_root: Path, truth: SampleRecord) -> SampleComparison:
    """Every metric of one built sample against its truth sample (see the module docstring)."""
    cams = read_camera_json(resolve_inside(built_root, record.paths.camera_json))
    gt_cams = read_camera_json(resolve_inside(truth_root, truth.paths.camera_json))
    pairs = frame_pairs(cams, gt_cams)
    registered = 100.0 * np.mean([f.registered for f in cams.frames])
    out = SampleComparison(sample=record.id, truth=truth.id, frames=len(pairs), registered_pct=float(registered))
    if len(pairs) < 3:
        out.note = f"only {len(pairs)} frames share a source frame with the truth (need 3)"
        return out
    bi, ti = (np.array(x) for x in zip(*pairs))
    w2c, gt_w2c = cams.w2c_array()[bi], gt_cams.w2c_array()[ti]
    try:
        m = camera.trajectory_metrics(w2c, gt_w2c)
    except ValueError as e:  # e.g. a truth path that does not move
        out.note = f"cameras not compared: {e}"
        return out
    out.ate_pct, out.rpe_rot_deg, out.scale = 100 * m["ate_rel"], m["rpe_rot_deg"], m["scale"]
    out.focal_err_pct = 100 * float(np.mean(_source_fx(cams, record)[bi] / _source_fx(gt_cams, truth)[ti]) - 1.0)
    if not _same_source(record, truth):
        out.note = "depth and points not compared: the built crop is not inside the truth's view of the source"
        return out
    rows, cols = _truth_pixels(record, truth)
    s, R, t, _ = camera.sim3_align(w2c, gt_w2c)
    depth = load_npz(resolve_inside(built_root, record.paths.depth), DEPTH_NPZ, record.dims)
    gt_depth = load_npz(resolve_inside(truth_root, truth.paths.depth), DEPTH_NPZ, truth.dims)
    d, v = depth["depth"][bi].astype(np.float64) * s, depth["valid"][bi]
    d_gt = gt_depth["depth"][ti][:, rows, cols].astype(np.float64)
    v_gt = gt_depth["valid"][ti][:, rows, cols]
    both = v & v_gt & (d_gt > 0)
    if not both.any():
        out.note = "depth not compared: no pixel is valid in both"
        return out
    absrel, delta1 = depth_errors(d[both], d_gt[both])
    out.depth_absrel_pct, out.delta1_pct = 100 * absrel, 100 * delta1
    points = load_npz(resolve_inside(built_root, record.paths.points), POINTS_NPZ, record.dims)
    gt_points = load_npz(resolve_inside(truth_root, truth.paths.points), POINTS_NPZ, truth.dims)
    gt_pts, gt_pv = gt_points["points"][ti][:, rows, cols], gt_points["valid"][ti][:, rows, cols]
    pv = points["valid"][bi] & gt_pv & (d_gt > 0)
    if pv.any():
        p = s * points["points"][bi][pv].astype(np.float64) @ R.T + t
        err = np.linalg.norm(p - gt_pts[pv].astype(np.float64), axis=1)
        out.point_err_pct = 100 * float(np.mean(err / d_gt[pv]))
    return out


def depth_errors(depth: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(AbsRel, delta1) of depth values against truth values, as fractions (not percent).

    `depth`, `truth`: arrays of one shape (the pixels to compare, already on one scale), truth > 0.
    AbsRel = mean |d - d*| / d*; delta1 = share of values with max(d/d*, d*/d) < 1.25 (a non-positive d
    is never within). Shared by `fwdata compare` and `fwmodel eval` (fwmodel.evaluate).
    """
    ratio = np.asarray(depth, dtype=np.float64) / np.asarray(truth, dtype=np.float64)
    with np.errstate(divide="ignore"):
        within = (ratio > 0) & (np.maximum(ratio, 1.0 / ratio) < 1.25)
    return float(np.mean(np.abs(ratio - 1.0))), float(np.mean(within))


def _source_fx(cams: CameraFile, record: SampleRecord) -> np.ndarray:
    """Focal lengths (T,) in pixels of the source video (undoing the clip's resize)."""
    return np.array([f.fx for f in cams.frames]) / record.source.resize_scale[0]


def compare_datasets(built: Path, truth: Path):
    """Per-sample comparison as a pandas DataFrame (columns `COLUMNS`), and the built ids with no truth.

    Raises CompareError when a dataset cannot be read or no built sample has a truth sample.
    """
    import pandas as pd

    try:
        meta, gt_meta = load_metadata(built), load_metadata(truth)
    except (ContractError, OSError) as e:
        raise CompareError(str(e)) from e
    rows, unmatched = [], []
    for rec in meta.samples:
        gt = match_truth(rec, gt_meta)
        if gt is None:
            unmatched.append(rec.id)
            continue
        try:
            rows.append(vars(compare_sample(Path(built), rec, Path(truth), gt)))
        except (ContractError, OSError, ValueError) as e:  # a damaged file: report it, compare the rest
            rows.append(vars(SampleComparison(sample=rec.id, truth=gt.id, frames=0, registered_pct=float("nan"),
                                              note=f"not compared: {e}")))
    if not rows:
        raise CompareError(f"no sample of {built} has a truth sample in {truth} (matched by source video name); "
                           f"built: {', '.join(unmatched[:5]) or 'none'}")
    return pd.DataFrame(rows, columns=list(COLUMNS)), unmatched
