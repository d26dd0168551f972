"""Put per-frame depth on the scale of the SfM cameras, robustly, and record how well it fits.

The sparse SfM points seen by each frame give its true depth up to the clip's one SfM scale. The
depth stage's output is matched to them by its meaning:

- **relative** (affine-invariant inverse depth ``d``): ``1/z = a d + b``. One ``(a, b)`` per clip
  first, then per frame where that is *justified* (below). Depth is ``1 / (a d + b)``; pixels where
  ``a d + b`` is not positive (sky, "infinitely far") get no depth.
- **metric** (z-depth ``d`` in metres): one clip scale ``s`` with ``s z_sfm = d`` turns the SfM unit
  into metres (cameras and points are rescaled: the clip is then metric); then a per-frame factor
  ``c`` (``z = c d``) where justified, to make depth and cameras agree exactly.

Fitting works on *relative* residuals ``r = z_pred / z_sfm - 1`` (written linearly in the
parameters), so near and far points count alike and far points cannot dominate: a seeded RANSAC
over minimal samples finds the inliers (|r| < 10 %), then iteratively reweighted least squares with
a Cauchy loss at the inliers' own spread refines the fit. A per-frame fit is *justified* when it
predicts held-out points of that frame better: the frame's points are split in two halves, each
half's fit (shrunk towards the clip fit) is scored on the other half, and the per-frame
parameters are used only when that cross-validated error is at least `min_gain` lower than the
clip fit's. Residuals (AbsRel against the SfM depths, per frame and overall) are returned and
recorded in the sample's quality metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fwdata import quality
from fwdata.build.depth import DepthResult
from fwdata.build.sfm import SfmResult


class AlignOptions(BaseModel):
    """Alignment options (`[align]` in a build preset)."""

    model_config = ConfigDict(extra="forbid")

    per_frame: Literal["auto", "never", "always"] = Field(
        "auto", description="per-frame refinement: when cross-validation justifies it, never, or always"
    )
    min_points_per_frame: int = Field(40, ge=4, description="fewest sparse points for a per-frame fit")
    min_gain: float = Field(0.1, ge=0, lt=1, description="relative error reduction a per-frame fit must show")
    shrinkage: float = Field(20.0, ge=0, description="pull of per-frame fits towards the clip fit, in points")
    inlier_threshold: float = Field(0.1, gt=0, description="RANSAC inlier threshold on the relative depth residual")
    ransac_iterations: int = Field(256, ge=1)
    max_depth_ratio: float = Field(200.0, gt=1, description="depth beyond this many times the median is invalid")
    max_absrel: float = Field(0.25, ge=0, description="refuse the clip when the aligned depth still disagrees with "
                                                      "the SfM points by more than this mean AbsRel (the cameras or "
                                                      "the depth are wrong); 0 = off. Not checked for depth from a "
                                                      "randomly initialised model")
    seed: int = Field(0, ge=0)


class AlignError(RuntimeError):
    """Depth cannot be put on the SfM scale (too few usable points). One actionable line."""


@dataclass
class AlignResult:
    """Aligned z-depth (T,H,W) float32 + valid, cameras/points in the final unit, and the residuals."""

    depth: np.ndarray
    valid: np.ndarray
    w2c: np.ndarray
    points: np.ndarray
    scale: Literal["metric", "normalized"]
    scale_source: str
    params: np.ndarray  # (T, p): per-frame parameters used ((a, b) relative, (c,) metric)
    refined: np.ndarray  # (T,) bool: frame uses its own fit
    absrel: float  # mean |z - z_sfm| / z_sfm over all observations
    absrel_per_frame: np.ndarray  # (T,) nan where a frame has no usable point
    frames_with_points: int  # frames with at least one usable SfM point
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- robust linear fits


def _irls(X: np.ndarray, theta: np.ndarray, iters: int = 10, prior: Optional[tuple[np.ndarray, float]] = None):
    """Cauchy IRLS on r = X theta - 1. prior = (theta0, weight in points) adds a shrinkage term."""
    n, p = X.shape
    for _ in range(iters):
        r = X @ theta - 1.0
        mad = float(np.median(np.abs(r - np.median(r)))) * 1.4826
        c = max(2.385 * mad, 1e-3)
        w = 1.0 / (1.0 + (r / c) ** 2)
        A = X * np.sqrt(w)[:, None]
        y = np.sqrt(w)
        if prior is not None and prior[1] > 0:
            theta0, lam = prior
            col = np.sqrt(np.mean(X ** 2, axis=0)) + 1e-12  # parameter scale
            A = np.vstack([A, np.sqrt(lam) * np.diag(col)])
            y = np.concatenate([y, np.sqrt(lam) * col * theta0])
        new, *_ = np.linalg.lstsq(A, y, rcond=None)
        if np.allclose(new, theta, rtol=1e-9, atol=1e-12):
            theta = new
            break
        theta = new
    return theta


def robust_fit(X: np.ndarray, rng: np.random.Generator, thresh: float, iterations: int,
               positive_first: bool = True) -> np.ndarray:
    """theta minimising robust |X theta - 1|: RANSAC on minimal samples, then Cauchy IRLS.

    With `positive_first`, the first parameter (the depth's slope) must be positive: a negative
    slope would turn near into far. If no positive solution exists it is clamped to 0.
    """
    n, p = X.shape
    best, best_inl = None, -1
    for _ in range(iterations):
        idx = rng.choice(n, size=p, replace=False)
        try:
            theta = np.linalg.solve(X[idx], np.ones(p)) if p > 1 else np.array([1.0 / X[idx[0], 0]])
        except np.linalg.LinAlgError:
            continue
        if not np.all(np.isfinite(theta)) or (positive_first and theta[0] <= 0):
            continue
        inl = int((np.abs(X @ theta - 1.0) < thresh).sum())
        if inl > best_inl:
            best, best_inl = theta, inl
    if best is None:  # no positive slope fits: keep only the offset (constant depth) or a unit scale
        if p == 1:
            return np.array([1.0 / np.median(X[:, 0])])
        theta = np.zeros(p)
        theta[1] = 1.0 / np.median(X[:, 1])
        return theta
    inliers = np.abs(X @ best - 1.0) < thresh
    theta, *_ = np.linalg.lstsq(X[inliers], np.ones(int(inliers.sum())), rcond=None)
    theta = _irls(X, theta)
    if positive_first and theta[0] <= 0:
        theta = best
    return theta


# --------------------------------------------------------------------------- alignment


def _sparse_samples(depth: DepthResult, sfm: SfmResult):
    """For every SfM observation with valid depth: (frame, row, col, predicted value, SfM depth)."""
    T, H, W = depth.values.shape
    f = sfm.obs_frame
    uv = sfm.obs_uv
    col = np.floor(uv[:, 0]).astype(np.int64)
    row = np.floor(uv[:, 1]).astype(np.int64)
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
    f, col, row, pid = f[inside], col[inside], row[inside], sfm.obs_point[inside]
    w2c = sfm.w2c
    z = np.einsum("nj,nj->n", sfm.points[pid], w2c[f, 2, :3]) + w2c[f, 2, 3]
    d = depth.values[f, row, col]
    ok = depth.valid[f, row, col] & np.isfinite(d) & (z > 0)
    return f[ok], row[ok], col[ok], d[ok].astype(np.float64), z[ok]


def _design(kind: str, d: np.ndarray, z: np.ndarray) -> np.ndarray:
    # relative: (a d + b) z = 1 ;  metric: c d / z = 1
    return np.stack([d * z, z], axis=1) if kind == "relative" else (d / z)[:, None]


def _apply(kind: str, values: np.ndarray, valid: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if kind == "relative":
        inv = theta[0] * values + theta[1]
        ok = valid & (inv > 0)
        z = np.where(ok, 1.0 / np.where(ok, inv, 1.0), 0.0)
    else:
        z = theta[0] * values
        ok = valid & (z > 0)
        z = np.where(ok, z, 0.0)
    return z.astype(np.float32), ok


def align_depth(depth: DepthResult, sfm: SfmResult, opts: AlignOptions) -> AlignResult:
    """Aligned depth and cameras in the final unit (see the module docstring)."""
    rng = np.random.default_rng(opts.seed)
    T = depth.values.shape[0]
    f, row, col, d, z = _sparse_samples(depth, sfm)
    if len(z) < 10:
        raise AlignError(f"only {len(z)} SfM points fall on valid depth; cannot put depth on the camera scale")
    w2c = sfm.w2c.copy()
    points = sfm.points.copy()
    notes = []
    if depth.kind == "metric":
        s = float(np.exp(np.median(np.log(d) - np.log(z))))  # metres per SfM unit
        w2c[:, :3, 3] *= s
        points *= s
        z = z * s
        scale, scale_source = "metric", f"metric depth ({depth.source}): SfM scaled by {s:.6g} m/unit"
    else:
        scale, scale_source = "normalized", "sfm (median sparse point depth = 1)"

    X = _design(depth.kind, d, z)
    theta = robust_fit(X, rng, opts.inlier_threshold, opts.ransac_iterations)
    if depth.kind == "relative" and theta[0] <= 0:
        notes.append("align: depth does not increase with SfM inverse depth; depth set to a constant plane")
    p = len(theta)
    params = np.tile(theta, (T, 1))
    refined = np.zeros(T, bool)
    if opts.per_frame != "never":
        for i in range(T):
            sel = f == i
            if sel.sum() < opts.min_points_per_frame:
                continue
            Xi = X[sel]
            prior = (theta, opts.shrinkage)
            if opts.per_frame == "auto" and not _justified(Xi, theta, prior, opts.min_gain):
                continue
            ti = _irls(Xi, theta.copy(), prior=prior)
            if depth.kind == "relative" and ti[0] <= 0:
                continue
            params[i] = ti
            refined[i] = True

    out = np.zeros(depth.values.shape, np.float32)
    valid = np.zeros(depth.values.shape, bool)
    for i in range(T):
        out[i], valid[i] = _apply(depth.kind, depth.values[i], depth.valid[i], params[i])
    # far-away and non-finite values are no depth
    med = float(np.median(out[valid])) if valid.any() else 1.0
    far = out > opts.max_depth_ratio * med
    valid &= np.isfinite(out) & ~far
    out[~valid] = 0.0

    absrel, per_frame = quality.sparse_depth_absrel(out, valid, points, sfm.obs_frame, sfm.obs_point, sfm.obs_uv, w2c)
    absrel = float("nan") if absrel is None else absrel
    frames_with_points = int(np.isfinite(per_frame).sum())
    notes.append(f"align: {depth.kind} depth, clip fit {np.array2string(theta, precision=4)}, "
                 f"{int(refined.sum())}/{T} frames refined, AbsRel {absrel:.4f} against the SfM points")
    return AlignResult(depth=out, valid=valid, w2c=w2c, points=points, scale=scale, scale_source=scale_source,
                       params=params, refined=refined, absrel=absrel, absrel_per_frame=per_frame,
                       frames_with_points=frames_with_points, notes=notes)


def check_agreement(result: AlignResult, opts: AlignOptions) -> None:
    """Raise AlignError when depth and cameras disagree beyond `opts.max_absrel`.

    A camera solution in a wrong focal basin (e.g. a rotation-dominant clip) can reproject its own
    points well and still give a structure no depth map fits: the per-frame affine fit of a good
    depth prior then leaves tens of percent of relative error, against a few percent on right cameras.
    Either label would be wrong, so the clip is refused rather than written."""
    if opts.max_absrel and np.isfinite(result.absrel) and result.absrel > opts.max_absrel:
        raise AlignError(f"depth and cameras disagree: the aligned depth is off the SfM points by "
                         f"{100 * result.absrel:.0f} % on average (limit {100 * opts.max_absrel:g} %); the "
                         f"cameras (often the focal length) or the depth are wrong; give --intrinsics if known")


def _justified(Xi: np.ndarray, theta: np.ndarray, prior, min_gain: float) -> bool:
    """Two-fold cross-validation: does a per-frame fit predict held-out points of the frame better?"""
    n = len(Xi)
    halves = (np.arange(n) % 2 == 0, np.arange(n) % 2 == 1)
    err_clip = err_frame = 0.0
    for fit, test in (halves, halves[::-1]):
        ti = _irls(Xi[fit], theta.copy(), prior=prior)
        err_frame += float(np.median(np.abs(Xi[test] @ ti - 1.0)))
        err_clip += float(np.median(np.abs(Xi[test] @ theta - 1.0)))
    return err_frame < (1.0 - min_gain) * err_clip
