"""The OpenCV lens model of the synthetic camera: radial (k1, k2) and tangential (p1, p2) distortion.

A point with pinhole normalised coordinates ``(x, y) = (X/Z, Y/Z)`` is seen at

    r2 = x^2 + y^2,  radial = 1 + k1 r2 + k2 r2^2
    xd = x radial + 2 p1 x y + p2 (r2 + 2 x^2)
    yd = y radial + p1 (r2 + 2 y^2) + 2 p2 x y

and at pixel ``K @ (xd, yd, 1)`` (the same K as the pinhole camera; pixel centres at +0.5), exactly
as ``cv2.projectPoints`` with ``distCoeffs = (k1, k2, p1, p2)``. The renderer casts, for every colour
sample, the ray through `undistort_normalized` of its distorted position, so frames show what such a
lens records; depth, point maps and cameras stay on the undistorted pinhole grid (the contract's
PINHOLE camera). `distort_pixels` / `undistort_pixels` map between the two grids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Lens", "distort_normalized", "undistort_normalized", "distort_pixels", "undistort_pixels",
           "project_distorted", "check_lens", "LensError"]

#: Newton iterations of `undistort_normalized` (converges in 4-6 for realistic lenses)
UNDISTORT_ITERATIONS = 30
#: largest allowed round-trip error of undistort -> distort, in normalised units
UNDISTORT_TOLERANCE = 1e-10


class LensError(ValueError):
    """Distortion that cannot be inverted over the image (the model folds over: too strong for the field of view)."""


@dataclass(frozen=True)
class Lens:
    """OpenCV radial-tangential coefficients (k3 and higher are 0)."""

    k1: float = 0.0
    k2: float = 0.0
    p1: float = 0.0
    p2: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.k1 == 0.0 and self.k2 == 0.0 and self.p1 == 0.0 and self.p2 == 0.0

    def to_dict(self) -> dict:
        """Ground-truth record: model name and parameters (the layout of cv2's distCoeffs)."""
        return {"model": "OPENCV", "k1": self.k1, "k2": self.k2, "p1": self.p1, "p2": self.p2}


def distort_normalized(x: np.ndarray, y: np.ndarray, lens: Lens) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole normalised coordinates -> distorted normalised coordinates (the forward model)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    r2 = x * x + y * y
    radial = 1.0 + lens.k1 * r2 + lens.k2 * r2 * r2
    xd = x * radial + 2.0 * lens.p1 * x * y + lens.p2 * (r2 + 2.0 * x * x)
    yd = y * radial + lens.p1 * (r2 + 2.0 * y * y) + 2.0 * lens.p2 * x * y
    return xd, yd


def _jacobian(x: np.ndarray, y: np.ndarray, lens: Lens) -> tuple[np.ndarray, ...]:
    """d(xd, yd)/d(x, y) -> (a, b, c, d) with J = [[a, b], [c, d]]."""
    r2 = x * x + y * y
    radial = 1.0 + lens.k1 * r2 + lens.k2 * r2 * r2
    dr = 2.0 * (lens.k1 + 2.0 * lens.k2 * r2)  # d radial / d(x or y), divided by x or y
    a = radial + x * x * dr + 2.0 * lens.p1 * y + 6.0 * lens.p2 * x
    b = x * y * dr + 2.0 * lens.p1 * x + 2.0 * lens.p2 * y
    c = x * y * dr + 2.0 * lens.p1 * x + 2.0 * lens.p2 * y
    d = radial + y * y * dr + 6.0 * lens.p1 * y + 2.0 * lens.p2 * x
    return a, b, c, d


def undistort_normalized(xd: np.ndarray, yd: np.ndarray, lens: Lens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distorted -> pinhole normalised coordinates by Newton's method -> (x, y, round-trip error)."""
    xd = np.asarray(xd, dtype=np.float64)
    yd = np.asarray(yd, dtype=np.float64)
    if lens.is_identity:
        return xd.copy(), yd.copy(), np.zeros_like(xd)
    x, y = xd.copy(), yd.copy()
    for _ in range(UNDISTORT_ITERATIONS):
        fx, fy = distort_normalized(x, y, lens)
        ex, ey = fx - xd, fy - yd
        if max(np.abs(ex).max(initial=0.0), np.abs(ey).max(initial=0.0)) < 1e-15:
            break
        a, b, c, d = _jacobian(x, y, lens)
        det = a * d - b * c
        det = np.where(np.abs(det) < 1e-12, 1e-12, det)
        x = x - (d * ex - b * ey) / det
        y = y - (a * ey - c * ex) / det
    fx, fy = distort_normalized(x, y, lens)
    return x, y, np.hypot(fx - xd, fy - yd)


def distort_pixels(uv: np.ndarray, K: np.ndarray, lens: Lens) -> np.ndarray:
    """Pinhole pixel coordinates (...,2) -> where the distorted camera sees them (...,2)."""
    uv = np.asarray(uv, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    x = (uv[..., 0] - K[0, 2]) / K[0, 0]
    y = (uv[..., 1] - K[1, 2]) / K[1, 1]
    xd, yd = distort_normalized(x, y, lens)
    return np.stack([K[0, 0] * xd + K[0, 2], K[1, 1] * yd + K[1, 2]], axis=-1)


def undistort_pixels(uv: np.ndarray, K: np.ndarray, lens: Lens) -> np.ndarray:
    """Distorted pixel coordinates (...,2) -> pinhole pixel coordinates (...,2) (inverse of `distort_pixels`)."""
    uv = np.asarray(uv, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    x, y, _ = undistort_normalized((uv[..., 0] - K[0, 2]) / K[0, 0], (uv[..., 1] - K[1, 2]) / K[1, 1], lens)
    return np.stack([K[0, 0] * x + K[0, 2], K[1, 1] * y + K[1, 2]], axis=-1)


def project_distorted(points: np.ndarray, K: np.ndarray, w2c: np.ndarray, lens: Lens) -> tuple[np.ndarray, np.ndarray]:
    """World points (N,3) -> (distorted pixel coordinates (N,2), camera z (N,))."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    w2c = np.asarray(w2c, dtype=np.float64)
    cam = p @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam[:, 2]
    xd, yd = distort_normalized(cam[:, 0] / z, cam[:, 1] / z, lens)
    K = np.asarray(K, dtype=np.float64)
    return np.stack([K[0, 0] * xd + K[0, 2], K[1, 1] * yd + K[1, 2]], axis=-1), z


def check_lens(lens: Lens, K: np.ndarray, height: int, width: int) -> None:
    """Raise LensError unless every pixel of a height x width image has one pinhole preimage.

    Checks the round trip of `undistort_normalized` on the image border and a grid inside, and
    that the model's Jacobian stays positive (no fold) over the pinhole region the image sees.
    """
    if lens.is_identity:
        return
    K = np.asarray(K, dtype=np.float64)
    n = 65
    us = np.linspace(0.0, width, n)
    vs = np.linspace(0.0, height, n)
    uu, vv = np.meshgrid(us, vs)
    xd = (uu - K[0, 2]) / K[0, 0]
    yd = (vv - K[1, 2]) / K[1, 1]
    x, y, err = undistort_normalized(xd, yd, lens)
    what = (f"lens distortion k1={lens.k1:g} k2={lens.k2:g} p1={lens.p1:g} p2={lens.p2:g} folds over within "
            f"the {width}x{height} image at this field of view (no pinhole ray for some pixels); use a weaker "
            f"distortion (at a 60 degree 16:9 view k1 >= -0.33 with k2 = 0, k1 >= -0.36 with k2 = 0.03) or a "
            f"narrower field of view")
    if not np.all(np.isfinite(err)) or err.max() > UNDISTORT_TOLERANCE:
        raise LensError(what)
    gx = np.linspace(x.min(), x.max(), n)
    gy = np.linspace(y.min(), y.max(), n)
    a, b, c, d = _jacobian(*np.meshgrid(gx, gy), lens)
    if np.any(a * d - b * c <= 0) or np.any(a <= 0) or np.any(d <= 0):
        raise LensError(what)


def lens_from_dict(d: dict) -> Lens:
    """Inverse of `Lens.to_dict`."""
    return Lens(**{k: float(v) for k, v in d.items() if k in asdict(Lens())})
