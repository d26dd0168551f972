"""The OpenCV lens model: radial (k1, k2, k3) and tangential (p1, p2) distortion, and undistortion to a pinhole.

A point with pinhole normalised coordinates ``(x, y) = (X/Z, Y/Z)`` is seen at

    r2 = x^2 + y^2,  radial = 1 + k1 r2 + k2 r2^2 + k3 r2^3
    xd = x radial + 2 p1 x y + p2 (r2 + 2 x^2)
    yd = y radial + p1 (r2 + 2 y^2) + 2 p2 x y

and at pixel ``K @ (xd, yd, 1)`` (the same K as the pinhole camera; pixel centres at +0.5), exactly
as ``cv2.projectPoints`` with ``distCoeffs = (k1, k2, p1, p2, k3)``. COLMAP's SIMPLE_RADIAL and RADIAL
cameras are this model with (k1) and (k1, k2), its OPENCV camera (k1, k2, p1, p2), and its FULL_OPENCV
camera (k1, k2, p1, p2, k3, k4, k5, k6; a rational radial term) with k4 = k5 = k6 = 0 (k4-k6 are not
supported). `distort_pixels` / `undistort_pixels` map between the distorted grid and the pinhole grid.

Users: the synthetic renderer casts, for every colour sample, the ray through `undistort_normalized`
of its distorted position (frames show what such a lens records; depth, point maps and cameras stay
on the pinhole grid); the build estimates a lens with SfM and resamples the clip onto the pinhole
grid with `Undistortion`, so the written clip is exactly the contract's PINHOLE camera.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Lens", "distort_normalized", "undistort_normalized", "distort_pixels", "undistort_pixels",
           "project_distorted", "check_lens", "LensError",
           "Undistortion", "pinhole_focal_scale"]

#: Newton iterations of `undistort_normalized` (converges in 4-6 for realistic lenses)
UNDISTORT_ITERATIONS = 30
#: largest allowed round-trip error of undistort -> distort, in normalised units
UNDISTORT_TOLERANCE = 1e-10


class LensError(ValueError):
    """Distortion that cannot be inverted over the image (the model folds over: too strong for the field of view)."""


@dataclass(frozen=True)
class Lens:
    """OpenCV radial-tangential coefficients in cv2's distCoeffs order (k1, k2, p1, p2, k3); k4 and
    higher are 0."""

    k1: float = 0.0
    k2: float = 0.0
    p1: float = 0.0
    p2: float = 0.0
    k3: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.k1 == 0.0 and self.k2 == 0.0 and self.p1 == 0.0 and self.p2 == 0.0 and self.k3 == 0.0

    @property
    def model(self) -> str:
        """COLMAP's name of the smallest camera model holding this lens: OPENCV, or FULL_OPENCV when k3 != 0."""
        return "OPENCV" if self.k3 == 0.0 else "FULL_OPENCV"

    def describe(self) -> str:
        """The coefficients as text for messages ('k1=-0.1 k2=0 p1=0 p2=0', plus k3 when it is not 0)."""
        text = f"k1={self.k1:g} k2={self.k2:g} p1={self.p1:g} p2={self.p2:g}"
        return text if self.k3 == 0.0 else f"{text} k3={self.k3:g}"

    def to_dict(self) -> dict:
        """Ground-truth record: model name and parameters (the layout of cv2's distCoeffs). Without k3 it
        is {"model": "OPENCV", k1, k2, p1, p2}; with k3 != 0, {"model": "FULL_OPENCV", ..., "k3"} (COLMAP's
        FULL_OPENCV with k4 = k5 = k6 = 0)."""
        d = {"model": self.model, "k1": self.k1, "k2": self.k2, "p1": self.p1, "p2": self.p2}
        return d if self.k3 == 0.0 else d | {"k3": self.k3}


def _radial(r2: np.ndarray, lens: Lens) -> np.ndarray:
    """1 + k1 r2 + k2 r2^2 + k3 r2^3 (the k3 term only when k3 != 0, so lenses without it keep their
    bits)."""
    radial = 1.0 + lens.k1 * r2 + lens.k2 * r2 * r2
    if lens.k3 != 0.0:
        radial = radial + lens.k3 * r2 * r2 * r2
    return radial


def distort_normalized(x: np.ndarray, y: np.ndarray, lens: Lens) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole normalised coordinates -> distorted normalised coordinates (the forward model)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    r2 = x * x + y * y
    radial = _radial(r2, lens)
    xd = x * radial + 2.0 * lens.p1 * x * y + lens.p2 * (r2 + 2.0 * x * x)
    yd = y * radial + lens.p1 * (r2 + 2.0 * y * y) + 2.0 * lens.p2 * x * y
    return xd, yd


def _jacobian(x: np.ndarray, y: np.ndarray, lens: Lens) -> tuple[np.ndarray, ...]:
    """d(xd, yd)/d(x, y) -> (a, b, c, d) with J = [[a, b], [c, d]]."""
    r2 = x * x + y * y
    radial = _radial(r2, lens)
    dr = lens.k1 + 2.0 * lens.k2 * r2
    if lens.k3 != 0.0:
        dr = dr + 3.0 * lens.k3 * r2 * r2
    dr = 2.0 * dr  # d radial / d(x or y), divided by x or y
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
    what = (f"lens distortion {lens.describe()} folds over within "
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
    """Inverse of `Lens.to_dict` (a record without k3 has k3 = 0)."""
    return Lens(**{k: float(v) for k, v in d.items() if k in asdict(Lens())})


def pinhole_focal_scale(K: np.ndarray, lens: Lens, height: int, width: int, steps: int = 40) -> float:
    """The smallest focal scale s >= 1 for which a height x width pinhole image with focal s * f sees
    only rays the distorted image recorded (no blank border), by bisection on the image border.

    Barrel lenses (k1 < 0) give 1; pincushion lenses zoom in slightly.
    """
    K = np.asarray(K, dtype=np.float64)
    n = 129
    t = np.linspace(0.0, 1.0, n)
    border = np.concatenate([np.stack([t * width, np.zeros(n)], 1), np.stack([t * width, np.full(n, height)], 1),
                             np.stack([np.zeros(n), t * height], 1), np.stack([np.full(n, width), t * height], 1)])

    def inside(s: float) -> bool:
        Ks = K.copy()
        Ks[0, 0] *= s
        Ks[1, 1] *= s
        x = (border[:, 0] - Ks[0, 2]) / Ks[0, 0]
        y = (border[:, 1] - Ks[1, 2]) / Ks[1, 1]
        xd, yd = distort_normalized(x, y, lens)
        u, v = K[0, 0] * xd + K[0, 2], K[1, 1] * yd + K[1, 2]
        eps = 1e-9
        return bool(np.all((u >= -eps) & (u <= width + eps) & (v >= -eps) & (v <= height + eps)))

    if lens.is_identity or inside(1.0):
        return 1.0
    lo, hi = 1.0, 2.0
    if not inside(hi):
        raise LensError(f"lens {lens.describe()}: no pinhole view within 2x the focal fits the image")
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if inside(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class Undistortion:
    """Resampling of frames seen through `lens` with intrinsics `K_lens` onto a pinhole camera `K`
    of the same size (pixels; pixel centres at +0.5). `K` has the same principal point and the
    focal scaled by `pinhole_focal_scale`, so every output pixel has a recorded source.

    Written by hand (not cv2.undistort / COLMAP's undistorter): the output must keep the clip's size
    (a multiple of 16) and be exactly the pinhole `K`; COLMAP changes the image size, and OpenCV
    is not a dependency. The resampling itself is scipy's `map_coordinates`.
    """

    K_lens: np.ndarray
    lens: Lens
    K: np.ndarray
    height: int
    width: int

    @classmethod
    def create(cls, K_lens: np.ndarray, lens: Lens, height: int, width: int) -> "Undistortion":
        K_lens = np.asarray(K_lens, dtype=np.float64)
        s = pinhole_focal_scale(K_lens, lens, height, width)
        K = K_lens.copy()
        K[0, 0] *= s
        K[1, 1] *= s
        return cls(K_lens=K_lens, lens=lens, K=K, height=height, width=width)

    def source_coordinates(self) -> np.ndarray:
        """(2, H, W) array indices (row, col) in the distorted frame sampled by each output pixel."""
        u = np.arange(self.width) + 0.5
        v = np.arange(self.height) + 0.5
        uu, vv = np.meshgrid(u, v)
        x = (uu - self.K[0, 2]) / self.K[0, 0]
        y = (vv - self.K[1, 2]) / self.K[1, 1]
        xd, yd = distort_normalized(x, y, self.lens)
        col = self.K_lens[0, 0] * xd + self.K_lens[0, 2] - 0.5
        row = self.K_lens[1, 1] * yd + self.K_lens[1, 2] - 0.5
        return np.stack([row, col])

    def frames(self, frames: np.ndarray) -> np.ndarray:
        """Undistorted frames (T,H,W,C) uint8: bilinear, edges clamped to the nearest recorded pixel."""
        from scipy import ndimage

        coords = self.source_coordinates()
        out = np.empty_like(frames)
        for t in range(len(frames)):
            for c in range(frames.shape[-1]):
                v = ndimage.map_coordinates(frames[t, ..., c].astype(np.float32), coords, order=1, mode="nearest")
                out[t, ..., c] = np.clip(np.rint(v), 0, 255).astype(np.uint8)
        return out

    def maps(self, values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel maps (T,H,W) and their valid masks resampled by nearest neighbour (depth must not be
        blended across edges); an output pixel is valid when its source pixel is."""
        coords = np.rint(self.source_coordinates()).astype(np.int64)
        row = np.clip(coords[0], 0, self.height - 1)
        col = np.clip(coords[1], 0, self.width - 1)
        return values[:, row, col], valid[:, row, col]

    def pixels(self, uv: np.ndarray) -> np.ndarray:
        """Observed pixel coordinates (...,2) in the distorted frame -> the same rays in the pinhole frame."""
        p = undistort_pixels(uv, self.K_lens, self.lens)
        x = (p[..., 0] - self.K_lens[0, 2]) / self.K_lens[0, 0]
        y = (p[..., 1] - self.K_lens[1, 2]) / self.K_lens[1, 1]
        return np.stack([self.K[0, 0] * x + self.K[0, 2], self.K[1, 1] * y + self.K[1, 2]], axis=-1)
