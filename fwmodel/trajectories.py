"""Camera trajectories for `fwmodel generate`: T world-to-camera matrices and pinhole intrinsics.

A trajectory is what the camera adapters are conditioned on (as Plucker rays, `fwmodel.data.plucker_for_batch`),
so it is expressed in the model's normalised frame, as in training (`fwmodel.data.load_geometry`):
frame 0's camera is the world (its w2c is the identity), OpenCV axes (x right, y down, z forward),
and the scene is about 1 unit from camera 0 (training scales each clip so the mean point distance
from camera 0 is 1). Intrinsics are pixels of the requested H x W, principal point at (W/2, H/2)
unless a file says otherwise.

Specs (`--trajectory`):

    static    the camera does not move
    orbit     a circle of radius `scale` around the point `scale` in front of camera 0 (the scene
              centre), always looking at it; sweeps `speed` x 90 degrees (positive: to the right)
    forward   moves along +z of camera 0 by `speed` x 0.5 x `scale` units, no rotation
    pan       turns in place about the camera's y axis (to the right) by `speed` x 30 degrees
              (a rotation has no size: `scale` does not apply)
    zoom      stays in place; the focal length grows to (1 + `speed` x `scale`) times the first
    FILE.json our `camera_params/<id>.json` (CameraFile): its cameras, K scaled to H x W
    FILE.txt  the 19-number RealEstate10K layout (a URL first line allowed): fx fy cx cy normalised,
              two zeros, the 3x4 w2c row-major
    DATASET:ID a sample of a dataset in our contract: its cameras normalised exactly as training
              normalises that sample (mean point distance 1), K scaled to H x W

File and dataset paths are re-expressed relative to their first frame and resampled to T frames
(camera centres linear, rotations geodesic, K linear, between neighbouring frames); file
translations are multiplied by `scale` (a file's unit is its own: 1 = as given). `fov` (degrees,
horizontal) sets the intrinsics of the presets (default 60) and, when given, replaces a file's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

PRESETS = ("orbit", "forward", "pan", "zoom", "static")
DEFAULT_FOV_DEG = 60.0
ORBIT_DEGREES = 90.0  # the orbit's sweep at speed 1
PAN_DEGREES = 30.0  # the pan's turn at speed 1
FORWARD_UNITS = 0.5  # the forward move at speed 1, scale 1 (the scene is ~1 unit away)


class TrajectoryError(ValueError):
    """A trajectory spec or file that cannot be used; the message names it and the problem (one line)."""


@dataclass
class Trajectory:
    """T cameras: w2c [T, 4, 4] (frame 0 = identity), K [T, 3, 3] pixels of width x height."""

    w2c: np.ndarray
    K: np.ndarray
    width: int
    height: int
    spec: str  # what was asked (`--trajectory`), for provenance
    source: str  # where the cameras came from: preset, file path, dataset sample

    @property
    def num_frames(self) -> int:
        return len(self.w2c)

    def camera_file(self):
        """As a CameraFile (the contract's camera JSON; scale "normalized")."""
        from fwdata.dataset.contract import CameraFile

        return CameraFile.from_arrays(self.w2c, self.K, width=self.width, height=self.height, scale="normalized")


def fov_intrinsics(fov_deg: float, height: int, width: int) -> np.ndarray:
    """Pinhole K [3, 3] with horizontal field of view `fov_deg`, square pixels, principal point at the centre."""
    from fwdata.dataset.camera import fov_to_focal, intrinsics_matrix

    if not 0 < fov_deg < 180:
        raise TrajectoryError(f"--fov {fov_deg:g}: the horizontal field of view must be between 0 and 180 degrees")
    f = float(fov_to_focal(math.radians(fov_deg), width))
    return intrinsics_matrix(f, f, width / 2, height / 2)


def preset_trajectory(kind: str, num_frames: int, height: int, width: int, scale: float = 1.0, speed: float = 1.0,
                      fov_deg: Optional[float] = None) -> Trajectory:
    """One of `PRESETS` (see the module docstring) for T = `num_frames` frames."""
    from fwdata.dataset.camera import invert_pose, look_at

    if kind not in PRESETS:
        raise TrajectoryError(f"unknown trajectory preset {kind!r}; choose one of {', '.join(PRESETS)}, a camera file "
                              "(.json or .txt) or DATASET:ID")
    if not (math.isfinite(scale) and scale > 0):
        raise TrajectoryError(f"--trajectory-scale {scale:g} must be positive")
    if not math.isfinite(speed):
        raise TrajectoryError(f"--trajectory-speed {speed:g} must be finite")
    K0 = fov_intrinsics(DEFAULT_FOV_DEG if fov_deg is None else fov_deg, height, width)
    u = np.linspace(0.0, 1.0, num_frames) * speed if num_frames > 1 else np.zeros(1)  # progress along the path
    c2w = np.tile(np.eye(4), (num_frames, 1, 1))
    K = np.tile(K0, (num_frames, 1, 1))
    if kind == "orbit":
        centre = np.array([0.0, 0.0, scale])
        for i, a in enumerate(np.radians(ORBIT_DEGREES) * u):
            eye = centre + scale * np.array([math.sin(a), 0.0, -math.cos(a)])
            c2w[i] = look_at(eye, centre)
    elif kind == "forward":
        c2w[:, 2, 3] = FORWARD_UNITS * scale * u
    elif kind == "pan":
        for i, a in enumerate(np.radians(PAN_DEGREES) * u):
            c2w[i] = look_at(np.zeros(3), np.array([math.sin(a), 0.0, math.cos(a)]))
    elif kind == "zoom":
        factor = 1.0 + scale * u
        if (factor <= 0).any():
            raise TrajectoryError(f"zoom with --trajectory-speed {speed:g} x --trajectory-scale {scale:g} shrinks the "
                                  "focal length to zero or below; use a smaller negative speed")
        K[:, 0, 0] *= factor
        K[:, 1, 1] *= factor
    w2c = invert_pose(c2w)
    w2c[0] = np.eye(4)  # exactly (look_at at the start is the identity up to rounding)
    return Trajectory(w2c, K, width, height, spec=kind, source=f"preset {kind} (scale {scale:g}, speed {speed:g})")


def resample(w2c: np.ndarray, K: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """A path of N cameras (w2c [N, 4, 4], K [N, 3, 3]) at T evenly spaced positions from its first to its last
    frame: centres linear, rotations geodesic (`fwdata.synth.effects.interpolate_pose`), K linear. N == T
    returns the cameras unchanged."""
    from fwdata.synth.effects import interpolate_pose

    n = len(w2c)
    if n == num_frames:
        return np.array(w2c, dtype=np.float64), np.array(K, dtype=np.float64)
    xs = np.linspace(0.0, n - 1, num_frames) if num_frames > 1 else np.zeros(1)
    out_w2c = np.stack([interpolate_pose(w2c, x) for x in xs])
    i0 = np.clip(np.floor(xs).astype(int), 0, max(n - 2, 0))
    f = (xs - i0)[:, None, None]
    i1 = np.minimum(i0 + 1, n - 1)
    out_K = (1 - f) * K[i0] + f * K[i1]
    return out_w2c, out_K


def _finish(w2c: np.ndarray, K: np.ndarray, num_frames: int, height: int, width: int, scale: float,
            fov_deg: Optional[float], spec: str, source: str) -> Trajectory:
    """Relative to the first frame, translations x scale, resampled to T frames, `--fov` applied."""
    from fwdata.dataset.camera import relative_to_first

    if not (math.isfinite(scale) and scale > 0):
        raise TrajectoryError(f"--trajectory-scale {scale:g} must be positive")
    if not (np.isfinite(w2c).all() and np.isfinite(K).all()):
        raise TrajectoryError(f"{source}: non-finite camera values")
    w2c = relative_to_first(w2c)
    w2c[:, :3, 3] *= scale
    w2c, K = resample(w2c, K, num_frames)
    w2c[0] = np.eye(4)
    if fov_deg is not None:
        K = np.tile(fov_intrinsics(fov_deg, height, width), (num_frames, 1, 1))
    return Trajectory(w2c, K, width, height, spec=spec, source=source)


def file_trajectory(path: Path, num_frames: int, height: int, width: int, scale: float = 1.0,
                    fov_deg: Optional[float] = None) -> Trajectory:
    """Cameras of a `camera_params/<id>.json` (CameraFile) or a 19-number txt (RealEstate10K layout)."""
    from fwdata.dataset.contract import ContractError, camera_txt_to_arrays, read_camera_json, read_camera_txt
    from fwmodel.data import ResizePlan

    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            cams = read_camera_json(path)
            plan = ResizePlan.cover((cams.height, cams.width), (height, width))  # as training resizes a clip
            w2c, K = cams.w2c_array(), plan.intrinsics(cams.intrinsics_array())
        else:
            w2c, K = camera_txt_to_arrays(read_camera_txt(path), width, height)  # normalised intrinsics
    except ContractError as err:
        raise TrajectoryError(f"trajectory file {err}") from None
    except OSError as err:
        raise TrajectoryError(f"trajectory file {path}: cannot be read ({err.strerror or err})") from None
    return _finish(w2c, K, num_frames, height, width, scale, fov_deg, spec=str(path), source=f"file {path}")


def dataset_trajectory(root: Path, sample: str, num_frames: int, height: int, width: int, scale: float = 1.0,
                       fov_deg: Optional[float] = None) -> Trajectory:
    """The cameras of one sample of a dataset, normalised as training normalises it (`load_geometry`: frame 0 the
    world, the scene's mean point distance 1), K scaled to H x W as training crops it, resampled to T frames."""
    from fwdata.dataset.contract import ContractError, load_metadata
    from fwdata.textout import SampleIdError, resolve_sample_ids
    from fwmodel.data import ResizePlan, load_geometry

    try:
        meta = load_metadata(root)
    except ContractError as err:
        raise TrajectoryError(f"trajectory dataset: {err}") from None
    try:
        (sid,) = resolve_sample_ids([sample], [r.id for r in meta.samples])
    except SampleIdError as err:
        raise TrajectoryError(f"trajectory {root}:{sample}: {err}") from None
    record = meta.sample(sid)
    plan = ResizePlan.cover((record.height, record.width), (height, width))
    try:
        geo = load_geometry(Path(root), record, range(record.num_frames), plan)
    except ContractError as err:
        raise TrajectoryError(f"trajectory {root}:{sid}: {err}") from None
    return _finish(geo["w2c"].double().numpy(), geo["K"].double().numpy(), num_frames, height, width, scale,
                   fov_deg, spec=f"{root}:{sample}", source=f"dataset {root} sample {sid}")


def resolve_trajectory(spec: str, num_frames: int, height: int, width: int, scale: float = 1.0, speed: float = 1.0,
                       fov_deg: Optional[float] = None) -> Trajectory:
    """`--trajectory`: a preset name, a camera file (.json / .txt) or DATASET:ID (see the module docstring)."""
    spec = str(spec).strip()
    if spec in PRESETS:
        return preset_trajectory(spec, num_frames, height, width, scale, speed, fov_deg)
    path = Path(spec).expanduser()
    if path.is_file():
        return file_trajectory(path, num_frames, height, width, scale, fov_deg)
    if ":" in spec:
        root, sample = spec.rsplit(":", 1)
        if Path(root).expanduser().is_dir():
            return dataset_trajectory(Path(root).expanduser(), sample, num_frames, height, width, scale, fov_deg)
        raise TrajectoryError(f"trajectory {spec!r}: {root} is not a dataset folder (DATASET:ID)")
    raise TrajectoryError(f"trajectory {spec!r} is neither a preset ({', '.join(PRESETS)}), an existing camera file "
                          "(.json or .txt) nor DATASET:ID")
