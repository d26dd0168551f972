"""Per-clip quality metrics shared by the build (recorded in metadata) and validation (recomputed).

All functions take contract arrays: frames (T,H,W,3) uint8, depth (T,H,W) z-depth with valid
(T,H,W) bool, K (T,3,3) pixels, w2c (T,4,4) OpenCV world-to-camera.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from fwdata.dataset import camera


def frame_pairs(num_frames: int, gaps: Sequence[int] = (1, 4), max_pairs: int = 32) -> list[tuple[int, int]]:
    """Frame pairs (i, i + gap) spread evenly over the clip, at most `max_pairs` of them."""
    pairs = [(i, i + g) for g in gaps for i in range(num_frames - g)]
    if len(pairs) > max_pairs:
        idx = np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int)
        pairs = [pairs[i] for i in idx]
    return pairs


def _strided_points(depth: np.ndarray, valid: np.ndarray, K: np.ndarray, stride: int,
                    rays: Optional[dict] = None) -> np.ndarray:
    """Camera-frame points (N,3) of the valid pixels among every `stride`-th pixel (row-major order).

    `rays`: a dict caching the unit-depth rays per K (clips usually share one K).
    """
    d = depth[::stride, ::stride]
    m = valid[::stride, ::stride]
    if rays is None:
        return camera.unproject_depth(d, camera.subsample_intrinsics(K, stride))[m]
    key = (K.tobytes(), d.shape)
    if key not in rays:
        rays[key] = camera.unproject_depth(np.ones(d.shape), camera.subsample_intrinsics(K, stride))
    return rays[key][m] * d[m][:, None].astype(np.float64)


def _agreement(points_a: np.ndarray, w2c_a: np.ndarray, depth_b: np.ndarray, valid_b: np.ndarray,
               K_b: np.ndarray, w2c_b: np.ndarray, rel_tol: float) -> tuple[int, int]:
    """(agreeing, overlapping) of frame-a camera points warped into frame b."""
    if not len(points_a):
        return 0, 0
    uv_b, z_b = camera.project_points(points_a, K_b, w2c_b @ camera.invert_pose(w2c_a))
    sampled, inside = camera.sample_depth_nearest(depth_b, uv_b)
    idx = np.flatnonzero(inside & (z_b > 0))
    cols = np.floor(uv_b[idx, 0]).astype(np.int64)
    rows = np.floor(uv_b[idx, 1]).astype(np.int64)
    idx = idx[valid_b[rows, cols]]
    if not len(idx):
        return 0, 0
    agree = np.abs(z_b[idx] - sampled[idx]) <= rel_tol * sampled[idx]
    return int(agree.sum()), int(len(idx))


def depth_agreement(depth_a: np.ndarray, valid_a: np.ndarray, K_a: np.ndarray, w2c_a: np.ndarray,
                    depth_b: np.ndarray, valid_b: np.ndarray, K_b: np.ndarray, w2c_b: np.ndarray,
                    rel_tol: float = 0.05, stride: int = 2) -> tuple[int, int]:
    """Warp frame a's depth into frame b and compare with frame b's depth.

    Returns (agreeing, overlapping): pixels of a (every `stride`-th) that land inside b on a
    valid pixel, and how many of those have |z_warped - depth_b| <= rel_tol * depth_b.
    Occlusions count as disagreement, so a perfect scene scores slightly below 1.
    """
    points_a = _strided_points(depth_a, valid_a, K_a, stride)  # only the pixels compared are warped
    return _agreement(points_a, w2c_a, depth_b, valid_b, K_b, w2c_b, rel_tol)


class MultiviewSettings(BaseModel):
    """How `multiview_consistency` is measured. The build records them beside the value
    (`QualityMetrics.multiview_settings`), so validation recomputes it the same way whatever the
    tolerances of its gate file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rel_tol: float = Field(0.05, gt=0, description="depth agreement tolerance, relative")
    stride: int = Field(2, ge=1, description="every stride-th pixel is warped")
    max_pairs: int = Field(16, ge=1, description="frame pairs (gaps 1 and 4, spread over the clip)")

    def measure(self, depth: np.ndarray, valid: np.ndarray, K: np.ndarray, w2c: np.ndarray) -> Optional[float]:
        """`multiview_consistency` with these settings."""
        return multiview_consistency(depth, valid, K, w2c, rel_tol=self.rel_tol, stride=self.stride,
                                     max_pairs=self.max_pairs)


def multiview_consistency(depth: np.ndarray, valid: np.ndarray, K: np.ndarray, w2c: np.ndarray,
                          rel_tol: float = 0.05, pairs: Optional[list[tuple[int, int]]] = None,
                          stride: int = 2, max_pairs: int = 32) -> Optional[float]:
    """Fraction of overlapping pixels whose depth agrees (within rel_tol) after warping between frames.

    Uses `frame_pairs(T, max_pairs=max_pairs)` by default and every `stride`-th pixel (the sum of
    `depth_agreement` over the pairs; each frame is unprojected once). None when no pair overlaps
    (e.g. a single frame).
    """
    T = depth.shape[0]
    pairs = frame_pairs(T, max_pairs=max_pairs) if pairs is None else pairs
    by_source: dict[int, list[int]] = {}
    for i, j in pairs:
        by_source.setdefault(i, []).append(j)
    agree = total = 0
    rays: dict = {}
    for i, targets in by_source.items():  # each source frame unprojected once, then dropped
        points_i = _strided_points(depth[i], valid[i], K[i], stride, rays)
        for j in targets:
            a, n = _agreement(points_i, w2c[i], depth[j], valid[j], K[j], w2c[j], rel_tol)
            agree += a
            total += n
    return agree / total if total else None


def blur_score(frames: np.ndarray, max_frames: int = 16) -> float:
    """Mean variance of the Laplacian of the luma over up to `max_frames` frames (higher = sharper)."""
    idx = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    scores = [ndimage.laplace(luma(frames[i])).var() for i in idx]
    return float(np.mean(scores))


def luma(frame: np.ndarray) -> np.ndarray:
    """BT.601 luma (H,W) float64 in 0..255 of an RGB uint8 frame (H,W,3)."""
    return frame[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def brightness(frames: np.ndarray) -> float:
    """Mean luma 0..255 over the clip."""
    step = max(1, len(frames) // 16)
    return float(np.mean([luma(f).mean() for f in frames[::step]]))


def camera_motion(w2c: np.ndarray) -> tuple[float, float]:
    """(path length of the camera centres in the dataset unit, largest rotation from frame 0 in degrees)."""
    centres = camera.camera_centers(w2c)
    path = float(np.linalg.norm(np.diff(centres, axis=0), axis=1).sum()) if len(w2c) > 1 else 0.0
    R0 = w2c[0, :3, :3]
    rel = w2c[:, :3, :3] @ R0.T
    rot = float(camera.rotation_angle_deg(rel).max())
    return path, rot


def trajectory_anomalies(w2c: np.ndarray, scene_scale: float = 1.0, factor: float = 2.5,
                         min_step_rel: float = 2e-3, min_step_deg: float = 0.1) -> int:
    """Frames where the camera motion breaks a constant-velocity model: jumps, teleports, swapped poses.

    SpatialVID-style trajectory anomaly count. For each frame t in 1..T-2 the change of velocity
    (second difference) of the camera centre, and the rotation between consecutive frame-to-frame
    rotations, are compared with the clip's typical step (median step size, floored at
    `min_step_rel * scene_scale` and `min_step_deg`). A frame counts when either exceeds `factor`
    typical steps. `scene_scale` is a typical scene depth in the dataset unit (e.g. median depth),
    so a camera that barely moves is not flagged for noise. Smooth paths give 0.
    """
    w2c = np.asarray(w2c, dtype=np.float64)
    if len(w2c) < 3:
        return 0
    centres = camera.camera_centers(w2c)
    steps = np.diff(centres, axis=0)  # (T-1, 3)
    step_len = np.linalg.norm(steps, axis=1)
    typical_t = max(float(np.median(step_len)), min_step_rel * float(scene_scale))
    jerk_t = np.linalg.norm(np.diff(steps, axis=0), axis=1)  # (T-2,)
    R = w2c[:, :3, :3]
    rel = R[1:] @ np.swapaxes(R[:-1], -1, -2)  # frame-to-frame rotations (T-1, 3, 3)
    step_deg = camera.rotation_angle_deg(rel)
    typical_r = max(float(np.median(step_deg)), min_step_deg)
    jerk_r = camera.rotation_angle_deg(rel[1:] @ np.swapaxes(rel[:-1], -1, -2))  # (T-2,)
    flagged = (jerk_t > factor * typical_t) | (jerk_r > factor * typical_r)
    return int(flagged.sum())


def field_of_view_deg(K: np.ndarray, height: int, width: int) -> tuple[float, float]:
    """(vertical, horizontal) field of view in degrees of K (3,3) (or the mean over (T,3,3))."""
    K = np.asarray(K).reshape(-1, 3, 3)
    fov_h = np.degrees(camera.focal_to_fov(K[:, 1, 1].mean(), height))
    fov_w = np.degrees(camera.focal_to_fov(K[:, 0, 0].mean(), width))
    return float(fov_h), float(fov_w)


# --------------------------------------------------------------------------- build-only (SfM) metrics
# These need the sparse SfM points, which the dataset does not store: the build records them and
# validation reads the recorded values. Sparse observations are given as parallel arrays:
# obs_frame (M,) frame index, obs_point (M,) index into points (N,3) world, obs_uv (M,2) observed
# pixel (pixel centres at +0.5).


def registered_ratio(registered: Sequence[bool]) -> float:
    """Fraction of frames whose pose comes from SfM registration (camera json `registered`)."""
    registered = np.asarray(registered, dtype=bool)
    return float(registered.mean()) if registered.size else 0.0


def reprojection_errors(points: np.ndarray, obs_frame: np.ndarray, obs_point: np.ndarray, obs_uv: np.ndarray,
                        K: np.ndarray, w2c: np.ndarray) -> np.ndarray:
    """Pixel distance (M,) between each observation and its point projected with the clip's cameras.

    K (3,3) shared or (T,3,3); w2c (T,4,4). Points behind the camera give inf.
    """
    K = np.broadcast_to(np.asarray(K, dtype=np.float64), (len(w2c), 3, 3))
    uv, z = camera.project_points(points[obs_point][:, None, :], K[obs_frame], w2c[obs_frame])
    err = np.linalg.norm(uv[:, 0] - obs_uv, axis=1)
    return np.where(z[:, 0] > 0, err, np.inf)


def reprojection_error(points: np.ndarray, obs_frame: np.ndarray, obs_point: np.ndarray, obs_uv: np.ndarray,
                       K: np.ndarray, w2c: np.ndarray) -> Optional[float]:
    """Mean reprojection error in pixels (None without observations)."""
    err = reprojection_errors(points, obs_frame, obs_point, obs_uv, K, w2c)
    err = err[np.isfinite(err)]
    return float(err.mean()) if err.size else None


def sparse_depth_absrel(depth: np.ndarray, valid: np.ndarray, points: np.ndarray, obs_frame: np.ndarray,
                        obs_point: np.ndarray, obs_uv: np.ndarray, w2c: np.ndarray) -> tuple[Optional[float], np.ndarray]:
    """AbsRel of z-depth maps against the depth of the SfM points each frame sees.

    Returns (mean of |z_map - z_sfm| / z_sfm over all observations on valid depth, per-frame mean (T,)
    with nan for frames without such an observation). Depth is looked up at the observed pixel.
    """
    T, H, W = depth.shape
    col = np.floor(obs_uv[:, 0]).astype(np.int64)
    row = np.floor(obs_uv[:, 1]).astype(np.int64)
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
    f, col, row, pid = obs_frame[inside], col[inside], row[inside], obs_point[inside]
    z = np.einsum("nj,nj->n", points[pid], w2c[f, 2, :3]) + w2c[f, 2, 3]
    zm = depth[f, row, col].astype(np.float64)
    ok = valid[f, row, col] & (z > 0) & np.isfinite(zm) & (zm > 0)
    rel = np.abs(zm[ok] - z[ok]) / z[ok]
    per_frame = np.full(T, np.nan)
    if rel.size:
        sums = np.bincount(f[ok], weights=rel, minlength=T)
        counts = np.bincount(f[ok], minlength=T)
        per_frame = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return (float(rel.mean()) if rel.size else None), per_frame
