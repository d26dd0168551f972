"""Cameras for a clip with pycolmap: SIFT, video-aware matching, keyframe mapping, every frame registered.

The recipe (why each step is there is measured in docs/BUILD.md):

1. **Features** in memory: SIFT on each frame's luma (no image files), written straight into a
   temporary COLMAP database with one shared camera (``SIMPLE_PINHOLE``, or ``PINHOLE`` with the
   user's known intrinsics) and images named by frame index, so the order is never in doubt.
2. **Motion probe**: a few short frame pairs are matched first. Too few features means a
   textureless clip, no feature motion a static one: both fail here with a reason. The measured
   motion picks the keyframe step (about `keyframe_flow` of the image diagonal between keyframes).
3. **Matching** of chosen pairs only: each keyframe with its next `overlap` keyframes, each other
   frame with the keyframes before and after it, plus optional loop-closure pairs between
   keyframes that look alike (a clip-local bag of SIFT words). The number of pairs grows linearly
   with the clip length, unlike exhaustive matching.
4. **Mapping of the keyframes** (incremental, or global = GLOMAP) with the focal length *held
   fixed* at its initial guess. Refining the focal length while the map is still small lets
   nearly-critical motions (sideways pans) slide into a wrong focal/structure basin.
5. **Registration of every other frame** (and of keyframes left out of the main model) by
   absolute pose against the map, nearest-in-time first, with triangulation and local bundle
   adjustment, so several partial models become one trajectory.
6. **Final bundle adjustment** of all frames with the focal length free and a robust (Cauchy)
   loss scaled to the clip's own reprojection noise; observations far off are dropped and the
   adjustment repeated. If the focal length moved a lot, the keyframes are mapped again with the
   new focal held fixed (once).
7. **Checks**: every frame must have a pose and the path must not jump; otherwise the clip fails
   with the reason. The trajectory is returned relative to frame 0 (identity) and scaled so the
   median depth of the sparse points is 1 (the "normalized" unit).

All randomness (RANSAC, mapper) is seeded, so the same clip gives the same cameras on every run.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fwdata.dataset import camera
from fwdata.dataset.lens import Lens


#: a try whose free focal ends within this fraction of the focal it was mapped with is settled
FOCAL_SETTLED = 0.03
#: iterations of the two rounds of bundle adjustment: of the keyframes in a focal try (where the focal
#: length has to travel), and of all frames at the end (where it only settles)
BA_ITERATIONS = (30, 10)
FINAL_BA_ITERATIONS = (10, 5)
#: an estimated |k1| at or below this is no distortion (the clip is not resampled)
LENS_MIN_K1 = 0.005

#: a given OpenCV lens: (k1, k2, p1, p2) or (k1, k2, p1, p2, k3), cv2's distCoeffs order
Distortion = Union[tuple[float, float, float, float], tuple[float, float, float, float, float]]


class SfmOptions(BaseModel):
    """Camera stage options (`[sfm]` in a build preset)."""

    model_config = ConfigDict(extra="forbid")

    max_features: int = Field(2048, ge=64, description="SIFT features per frame")
    first_octave: Optional[int] = Field(
        None, ge=-1, le=2, description="SIFT first octave; -1 upsamples first (needed on small frames for accurate "
                                       "focal lengths); None = -1 when the shorter side is under 320 px, else 0"
    )
    keyframe_step: int = Field(0, ge=0, description="frames between keyframes; 0 = from the measured motion")
    max_keyframe_step: int = Field(4, ge=1, description="largest automatic keyframe step")
    keyframe_flow: float = Field(0.03, gt=0, description="target feature motion between keyframes, fraction of the "
                                                         "image diagonal (automatic step)")
    overlap: int = Field(4, ge=1, description="each keyframe is matched with this many following keyframes")
    loop_detection: bool = Field(False, description="also match keyframes that look alike but are far apart in time")
    loop_candidates: int = Field(3, ge=1, description="loop-closure partners tried per keyframe")
    mapper: Literal["incremental", "global"] = Field("incremental", description="COLMAP incremental or GLOMAP global")
    camera_model: Literal["SIMPLE_RADIAL", "RADIAL", "SIMPLE_PINHOLE", "PINHOLE"] = Field(
        "RADIAL", description="camera estimated when the intrinsics are unknown: one focal and radial k1 "
                                     "(SIMPLE_RADIAL), k1 and k2 (RADIAL), or no distortion (SIMPLE_PINHOLE; PINHOLE: "
                                     "fx and fy); principal point at the centre. A lens whose distortion is not "
                                     "measurably above its uncertainty is written as a pinhole"
    )
    intrinsics: Optional[tuple[float, float, float, float]] = Field(
        None, description="known fx, fy, cx, cy in clip pixels (the build converts --intrinsics from source pixels)"
    )
    distortion: Optional[Distortion] = Field(
        None, description="known OpenCV lens distortion k1, k2, p1, p2 or k1, k2, p1, p2, k3 (with `intrinsics`); "
                          "the clip is undistorted"
    )
    focal_hypotheses: int = Field(3, ge=1, description="independent focal-length starts whose keyframe maps must agree "
                                                       "(the wrong-basin check; 1 = no check)")
    max_focal_spread: float = Field(0.03, gt=0, description="a clip whose plausible focal hypotheses differ by more "
                                                            "than this fraction is refused as ambiguous")
    max_focal_uncertainty: float = Field(0.02, gt=0, description="a clip whose focal standard deviation (profile of "
                                                                 "the reprojection cost) exceeds this fraction is "
                                                                 "refused as weakly determined")
    hypothesis_tolerance: float = Field(0.10, ge=0, description="a hypothesis is plausible when its reprojection "
                                                                "error is within this fraction of the best one's")
    refine_intrinsics: bool = Field(True, description="refine the focal length (ignored with known intrinsics)")
    initial_fov_deg: Optional[float] = Field(
        None, gt=1, lt=179, description="initial horizontal field of view; None = COLMAP's guess f = 1.2 max(W, H)"
    )
    robust_loss_px: float = Field(0.0, ge=0, description="Cauchy loss scale of the final adjustment; 0 = automatic")
    max_reproj_error_px: float = Field(4.0, gt=0, description="observations above this error are always dropped")
    outlier_factor: float = Field(4.0, ge=0, description="observations above this many times the clip's median point "
                                                         "error (at least 1 px) are dropped too; 0 = off")
    min_features: int = Field(64, ge=1, description="median SIFT features per frame below this = textureless clip")
    peak_threshold: float = Field(0.02 / 3, gt=0, description="SIFT contrast threshold (COLMAP's default)")
    min_features_target: int = Field(500, ge=0, description="fewer median SIFT features per frame than this: extract "
                                                            "again, upsampled, with a third of the peak threshold")
    min_motion_px: float = Field(1.0, ge=0, description="median feature motion below this everywhere = static clip")
    max_step_ratio: float = Field(10.0, gt=1, description="a camera step this many times the median step is a jump")
    max_dense_pairs: int = Field(1500, ge=0, description="when mapping splits or leaves keyframes out, match every "
                                                         "keyframe pair if that is at most this many pairs, and retry")
    max_image_size: int = Field(1024, ge=0, description="long side (px) of the frames features are found on when the "
                                                        "source has more pixels than the clip; 0 = the clip's size")
    num_threads: int = Field(0, ge=-1, description="threads for matching and adjustment; 0 = the build's `threads` "
                                                  "(1 when run alone), -1 = all cores. More than 1 makes the cameras "
                                                  "differ run to run at ~1e-16 (Ceres)")
    seed: int = Field(0, ge=0, description="seed of every random choice (reproducible cameras)")
    verbose: bool = Field(False, description="show COLMAP's log")

    @field_validator("intrinsics")
    @classmethod
    def _positive_focal(cls, v):
        if v is not None and (v[0] <= 0 or v[1] <= 0):
            raise ValueError("intrinsics fx, fy must be positive")
        return v

    @model_validator(mode="after")
    def _distortion_needs_intrinsics(self) -> "SfmOptions":
        if self.distortion is not None and self.intrinsics is None:
            raise ValueError("distortion is given without intrinsics: give both (fx, fy, cx, cy, k1, k2, p1, p2[, k3])")
        return self

    @property
    def estimates_lens(self) -> bool:
        return self.intrinsics is None and self.camera_model in ("SIMPLE_RADIAL", "RADIAL")


class SfmError(RuntimeError):
    """The clip has no usable camera trajectory; the message says why (one line)."""


@dataclass
class SfmResult:
    """Cameras and sparse structure of a clip, frame 0 = world, median point depth = 1.

    w2c (T,4,4); K (3,3) and lens: the camera of the frames as given (K is the pinhole part; a
    non-identity lens means the frames are distorted and the build undistorts them,
    fwdata.dataset.lens.Undistortion); points (N,3) world; point_errors (N,) mean reprojection
    error per point; obs_frame / obs_point (M,) which frame sees which point, obs_uv (M,2) the
    observed pixel (pixel centres at +0.5); keyframes: frame indices mapped first; mapped (T,)
    bool: frames in the mapper's model before the registration pass.

    focal_uncertainty: standard deviation of the focal length / focal length, from the profile of the
    reprojection cost (`_profile_uncertainty`; None with known intrinsics);
    focal_hypotheses: the settled focal length (px) of each independent start that mapped every
    keyframe in one model with a plausible reprojection error; focal_spread: (max - min) / median
    of them (with known intrinsics: how far a free adjustment moves the given focal, as a fraction).
    """

    w2c: np.ndarray
    K: np.ndarray
    points: np.ndarray
    point_errors: np.ndarray
    obs_frame: np.ndarray
    obs_point: np.ndarray
    obs_uv: np.ndarray
    keyframes: list[int]
    mapped: np.ndarray
    reprojection_error: float
    num_models: int
    lens: Lens = field(default_factory=Lens)
    focal_uncertainty: Optional[float] = None
    focal_spread: Optional[float] = None
    focal_hypotheses: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.w2c)

    def scaled(self, sx: float, sy: float) -> "SfmResult":
        """The same cameras for the frames resized by (sx, sy) (pixel centres at +0.5: u' = sx u)."""
        if (sx, sy) == (1.0, 1.0):
            return self
        S = np.diag([sx, sy, 1.0])
        return dataclasses.replace(self, K=S @ self.K, obs_uv=self.obs_uv * np.array([sx, sy]))

    def frame_observations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(point indices, observed uv) of frame i."""
        sel = self.obs_frame == i
        return self.obs_point[sel], self.obs_uv[sel]


# --------------------------------------------------------------------------- helpers


def _name(i: int) -> str:
    return f"{i:06d}.bmp"


def _luma8(frame: np.ndarray) -> np.ndarray:
    """BT.601 luma as uint8 (what COLMAP computes from an RGB image)."""
    y = frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.ascontiguousarray(np.clip(np.rint(y), 0, 255).astype(np.uint8))


def initial_focal(width: int, height: int, opts: SfmOptions) -> float:
    if opts.initial_fov_deg is not None:
        return float(camera.fov_to_focal(np.radians(opts.initial_fov_deg), width))
    return 1.2 * max(width, height)  # COLMAP's default prior


def given_lens(distortion: Optional[Distortion]) -> Optional[Lens]:
    """The lens of a given distortion (k1, k2, p1, p2[, k3]); None when none is given."""
    return None if distortion is None else Lens(*(float(v) for v in distortion))


def initial_camera(height: int, width: int, opts: SfmOptions) -> tuple[str, list[float]]:
    """(COLMAP camera model, its parameters) of the clip's shared camera before mapping: the known
    intrinsics (OPENCV with a known lens, FULL_OPENCV (k1, k2, p1, p2, k3, k4 = k5 = k6 = 0) when its
    k3 is not 0, else PINHOLE), or the estimated model at the initial focal with the principal point at
    the centre and no distortion."""
    if opts.intrinsics is not None:
        lens = given_lens(opts.distortion)
        if lens is not None and lens.k3 != 0.0:
            return "FULL_OPENCV", list(opts.intrinsics) + [lens.k1, lens.k2, lens.p1, lens.p2, lens.k3, 0.0, 0.0, 0.0]
        if lens is not None:
            return "OPENCV", list(opts.intrinsics) + [lens.k1, lens.k2, lens.p1, lens.p2]
        return "PINHOLE", list(opts.intrinsics)
    f = initial_focal(width, height, opts)
    cx, cy = width / 2.0, height / 2.0
    return opts.camera_model, {"SIMPLE_PINHOLE": [f, cx, cy], "PINHOLE": [f, f, cx, cy],
                               "SIMPLE_RADIAL": [f, cx, cy, 0.0], "RADIAL": [f, cx, cy, 0.0, 0.0]}[opts.camera_model]


def camera_intrinsics(cam) -> tuple[np.ndarray, Lens]:
    """(K (3,3), lens) of a pycolmap camera of the models `initial_camera` makes."""
    p = [float(x) for x in cam.params]
    model = cam.model.name
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        K = camera.intrinsics_matrix(p[0], p[0], p[1], p[2])
        lens = Lens(k1=p[3] if len(p) > 3 else 0.0, k2=p[4] if len(p) > 4 else 0.0)
    elif model in ("PINHOLE", "OPENCV"):
        K = camera.intrinsics_matrix(p[0], p[1], p[2], p[3])
        lens = Lens(*p[4:8]) if model == "OPENCV" else Lens()
    elif model == "FULL_OPENCV":  # k1, k2, p1, p2, k3, k4, k5, k6; the rational k4-k6 are held at 0
        if any(p[9:12]):
            raise SfmError(f"COLMAP camera FULL_OPENCV with k4-k6 = {p[9:12]}: only k4 = k5 = k6 = 0 is supported")
        K = camera.intrinsics_matrix(p[0], p[1], p[2], p[3])
        lens = Lens(*p[4:9])
    else:
        raise SfmError(f"unexpected COLMAP camera model {model}")
    return K, lens


def _quiet(opts: SfmOptions) -> None:
    """COLMAP logs only errors unless verbose (set before every call: some pycolmap calls reset it)."""
    import pycolmap as pc

    pc.logging.minloglevel = 0 if opts.verbose else 2


def first_octave(height: int, width: int, opts: SfmOptions) -> int:
    """The SIFT first octave: the option, or -1 (upsample) for frames whose shorter side is under 320 px."""
    if opts.first_octave is not None:
        return opts.first_octave
    return -1 if min(height, width) < 320 else 0


def _threads(opts: SfmOptions) -> int:
    """Threads to use: the option, 1 for 0 (unset, run alone), all cores for -1."""
    if opts.num_threads < 0:
        return os.cpu_count() or 1
    return max(1, opts.num_threads)


class _Clip:
    """The temporary COLMAP database of one clip and everything known about its frames."""

    def __init__(self, frames: np.ndarray, opts: SfmOptions, workdir: Path):
        import pycolmap

        self.pc = pycolmap
        self.opts = opts
        self.T, self.H, self.W = frames.shape[:3]
        self.dir = workdir
        self.db_path = workdir / "clip.db"
        self.image_ids: dict[int, int] = {}
        self.keypoints: list[np.ndarray] = []
        self.descriptors: list[np.ndarray] = []
        self.matched: set[tuple[int, int]] = set()
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []

    # ---- features ------------------------------------------------------------------------

    def extract(self, frames: np.ndarray) -> None:
        """SIFT on every frame into the database, with one shared camera.

        Frames are written as lossless 8-bit grey BMPs (a few ms each) so COLMAP's own extractor runs
        on all `num_threads` threads; the in-memory extractor holds Python's GIL, one frame at a time.
        Images are named by frame index, so order never depends on how they were imported.
        """
        pc = self.pc
        t0 = time.perf_counter()
        from PIL import Image

        images = self.dir / "frames"
        images.mkdir()
        names = [_name(i) for i in range(self.T)]
        for name, frame in zip(names, frames):
            Image.fromarray(_luma8(frame)).save(images / name)
        octave, peak = first_octave(self.H, self.W, self.opts), self.opts.peak_threshold
        self._extract_sift(images, names, octave, peak)
        n = self._median_features()
        if n < self.opts.min_features_target:
            # low-contrast frames (indoor, compressed): upsample first and lower the contrast threshold,
            # once; the clip is refused as textureless only if that finds too few too
            self.db_path.unlink()
            octave, peak = -1, peak / 3.0
            self._extract_sift(images, names, octave, peak)
            self.notes.append(f"sfm: {n} SIFT features per frame (median); extracted again upsampled with "
                              f"peak threshold {peak:.4f}: {self._median_features()}")
        with pc.Database.open(str(self.db_path)) as db:
            if db.num_images() != self.T:
                raise SfmError(f"feature extraction read {db.num_images()} of {self.T} frames")
            cam = db.read_camera(1)
            cam.has_prior_focal_length = self.opts.intrinsics is not None
            db.update_camera(cam)
            by_name = {im.name: im.image_id for im in db.read_all_images()}
            for i, name in enumerate(names):
                image_id = by_name[name]
                self.image_ids[i] = image_id
                self.keypoints.append(np.asarray(db.read_keypoints(image_id), dtype=np.float32)[:, :2].copy())
                self.descriptors.append(np.asarray(db.read_descriptors(image_id).data))
        self.names = names
        self.timings["features"] = time.perf_counter() - t0

    def _extract_sift(self, images: Path, names: list[str], octave: int, peak: float) -> None:
        pc = self.pc
        eo = pc.FeatureExtractionOptions()
        eo.sift.max_num_features = self.opts.max_features
        eo.sift.first_octave = octave
        eo.sift.peak_threshold = peak
        eo.max_image_size = max(self.H, self.W)
        eo.num_threads = _threads(self.opts)
        ro = pc.ImageReaderOptions()
        ro.camera_model, params = initial_camera(self.H, self.W, self.opts)
        ro.camera_params = ",".join(repr(float(x)) for x in params)
        _quiet(self.opts)
        pc.extract_features(self.db_path, images, image_names=names, camera_mode=pc.CameraMode.SINGLE,
                            reader_options=ro, extraction_options=eo, device=pc.Device.cpu)

    def _median_features(self) -> int:
        with self.pc.Database.open(str(self.db_path)) as db:
            return int(np.median([db.num_keypoints_for_image(im.image_id) for im in db.read_all_images()]))

    # ---- matching ------------------------------------------------------------------------

    def match(self, pairs: list[tuple[int, int]]) -> None:
        pc = self.pc
        todo = sorted({(min(a, b), max(a, b)) for a, b in pairs if a != b} - self.matched)
        if not todo:
            return
        t0 = time.perf_counter()
        _quiet(self.opts)
        path = self.dir / f"pairs{len(self.matched)}.txt"
        path.write_text("".join(f"{_name(a)} {_name(b)}\n" for a, b in todo))
        mo = pc.FeatureMatchingOptions()
        mo.num_threads = _threads(self.opts)
        po = pc.ImportedPairingOptions()
        po.match_list_path = str(path)
        vo = pc.TwoViewGeometryOptions()
        vo.ransac.random_seed = self.opts.seed
        pc.match_image_pairs(str(self.db_path), matching_options=mo, pairing_options=po, verification_options=vo,
                             device=pc.Device.cpu)
        self.matched.update(todo)
        self.timings["matching"] = self.timings.get("matching", 0.0) + time.perf_counter() - t0

    def inlier_motion(self, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, float]]:
        """(number of verified matches, median feature displacement in px) of matched pairs."""
        out = {}
        with self.pc.Database.open(str(self.db_path)) as db:
            for a, b in pairs:
                ia, ib = self.image_ids[a], self.image_ids[b]
                if not db.exists_two_view_geometry(ia, ib):
                    out[(a, b)] = (0, 0.0)
                    continue
                tvg = db.read_two_view_geometry(ia, ib)  # matches oriented as asked: (a's keypoint, b's)
                m = np.asarray(tvg.inlier_matches)
                if len(m) == 0:
                    out[(a, b)] = (0, 0.0)
                    continue
                d = np.linalg.norm(self.keypoints[a][m[:, 0]] - self.keypoints[b][m[:, 1]], axis=1)
                out[(a, b)] = (len(m), float(np.median(d)))
        return out

    def set_camera(self, focal: float, extra: Optional[list[float]] = None) -> None:
        """Set the shared camera's focal length (and distortion parameters) in the database."""
        with self.pc.Database.open(str(self.db_path)) as db:
            cam = db.read_camera(1)
            p = list(cam.params)
            for i in cam.focal_length_idxs():
                p[i] = focal
            for i, v in zip(cam.extra_params_idxs(), extra if extra is not None else []):
                p[i] = v
            cam.params = p
            db.update_camera(cam)


# --------------------------------------------------------------------------- planning


def motion_probe_pairs(T: int, n: int = 8) -> list[tuple[int, int]]:
    """Consecutive pairs spread over the clip plus first/middle/last pairs (static detection)."""
    starts = np.unique(np.linspace(0, T - 2, min(n, T - 1)).round().astype(int))
    pairs = [(int(i), int(i) + 1) for i in starts]
    mid = T // 2
    pairs += [(0, mid), (mid, T - 1), (0, T - 1)]
    return sorted({p for p in pairs if p[0] != p[1]})


def choose_keyframes(T: int, step: int) -> list[int]:
    kf = list(range(0, T, step))
    if kf[-1] != T - 1:
        kf.append(T - 1)
    return kf


def matching_pairs(T: int, keyframes: list[int], overlap: int) -> list[tuple[int, int]]:
    """Keyframe i with the next `overlap` keyframes; every other frame with the keyframe before and after it."""
    pairs = set()
    for a, i in enumerate(keyframes):
        for b in range(a + 1, min(a + 1 + overlap, len(keyframes))):
            pairs.add((i, keyframes[b]))
    kf = np.asarray(keyframes)
    for i in range(T):
        if i in keyframes:
            continue
        prev = int(kf[kf < i].max())
        nxt = int(kf[kf > i].min())
        pairs.add((prev, i))
        pairs.add((i, nxt))
    return sorted(pairs)


def loop_pairs(descriptors: list[np.ndarray], keyframes: list[int], overlap: int, candidates: int,
               seed: int = 0, words: int = 64) -> list[tuple[int, int]]:
    """Loop-closure candidates: keyframes far apart in time whose bags of SIFT words are most alike.

    The vocabulary is learned on the clip itself (k-means on a sample of its descriptors), so no
    vocabulary-tree file is needed. Pairs closer than `overlap` keyframes are already matched.
    """
    from scipy.cluster.vq import kmeans2, vq

    rng = np.random.default_rng(seed)
    data = np.concatenate([descriptors[k] for k in keyframes]).astype(np.float32)
    if len(data) < words * 4 or len(keyframes) <= overlap + 1:
        return []
    sample = data[rng.choice(len(data), size=min(len(data), 20000), replace=False)]
    centroids, _ = kmeans2(sample, words, minit="++", rng=np.random.default_rng(seed))
    hist = np.zeros((len(keyframes), words))
    for a, k in enumerate(keyframes):
        codes, _ = vq(descriptors[k].astype(np.float32), centroids)
        hist[a] = np.bincount(codes, minlength=words)
    idf = np.log(len(keyframes) / (1.0 + (hist > 0).sum(0)))
    v = hist * idf
    v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-12
    sim = v @ v.T
    pairs = set()
    for a in range(len(keyframes)):
        far = [b for b in range(len(keyframes)) if abs(a - b) > overlap]
        for b in sorted(far, key=lambda b: -sim[a, b])[:candidates]:
            pairs.add((keyframes[min(a, b)], keyframes[max(a, b)]))
    return sorted(pairs)


# --------------------------------------------------------------------------- mapping


def _mapper_options(opts: SfmOptions, refine_focal: bool):
    import pycolmap as pc

    mo = pc.IncrementalMapperOptions()
    mo.num_threads = _threads(opts)
    mo.random_seed = opts.seed
    mo.abs_pose_refine_focal_length = refine_focal
    mo.abs_pose_refine_extra_params = False
    mo.init_min_tri_angle = 4.0  # video: keyframes are close; COLMAP's 16 degrees wastes the init search
    mo.max_extra_param = max_extra_param(opts)
    return mo


def max_extra_param(opts: SfmOptions) -> float:
    """COLMAP's bound on |distortion coefficient| above which it calls a camera bogus and registers no
    image with it: its default 1, or twice the largest given coefficient (a calibrated lens such as
    TUM fr1's, k3 = 1.16, is not bogus)."""
    if opts.distortion is None:
        return 1.0
    return max(1.0, 2.0 * max(abs(float(v)) for v in opts.distortion))


def _map_keyframes(clip: _Clip, keyframes: list[int], refine_focal: bool):
    """Reconstructions of the keyframes (largest first)."""
    pc = clip.pc
    _quiet(clip.opts)
    out = clip.dir / f"map{len(os.listdir(clip.dir))}"
    out.mkdir()
    names = [_name(i) for i in keyframes]
    if clip.opts.mapper == "global":
        go = pc.GlobalPipelineOptions()
        go.image_names = names
        go.num_threads = _threads(clip.opts)
        go.random_seed = clip.opts.seed
        go.mapper.random_seed = clip.opts.seed
        go.mapper.bundle_adjustment.refine_focal_length = refine_focal
        go.mapper.global_positioning.use_gpu = False
        recs = pc.global_mapping(str(clip.db_path), str(clip.dir), str(out), go)
    else:
        io = pc.IncrementalPipelineOptions()
        io.image_names = names
        io.num_threads = _threads(clip.opts)
        io.random_seed = clip.opts.seed
        io.extract_colors = False
        io.min_model_size = 3
        io.ba_refine_focal_length = refine_focal
        io.ba_refine_extra_params = False
        io.max_extra_param = max_extra_param(clip.opts)
        io.mapper = _mapper_options(clip.opts, refine_focal)
        recs = pc.incremental_mapping(str(clip.db_path), str(clip.dir), str(out), io)
    return sorted(recs.values(), key=lambda r: -r.num_reg_images())


def _registered_frames(rec, clip: _Clip) -> set[int]:
    ids = {v: k for k, v in clip.image_ids.items()}
    return {ids[i] for i in rec.reg_image_ids()}


def _extend(clip: _Clip, rec, keyframes: list[int]):
    """Register every frame it can into `rec` (nearest to the registered ones first). Returns the model."""
    pc = clip.pc
    opts = clip.opts
    _quiet(opts)
    mo = _mapper_options(opts, refine_focal=False)
    tri = pc.IncrementalTriangulatorOptions()
    tri.random_seed = opts.seed
    bao = pc.BundleAdjustmentOptions()
    bao.print_summary = False
    bao.refine_focal_length = False
    bao.refine_extra_params = False
    bao.ceres.solver_options.num_threads = _threads(opts)
    with pc.Database.open(str(clip.db_path)) as db:
        cache = pc.DatabaseCache.create(db, pc.DatabaseCacheOptions())
    mapper = pc.IncrementalMapper(cache)
    mapper.begin_reconstruction(rec)
    done = _registered_frames(mapper.reconstruction, clip)
    kf = set(keyframes)
    progress = True
    while progress and len(done) < clip.T:
        progress = False
        reg = np.array(sorted(done))
        todo = [i for i in range(clip.T) if i not in done]
        todo.sort(key=lambda i: (int(np.abs(reg - i).min()), i))
        for i in todo:
            image_id = clip.image_ids[i]
            try:
                if not mapper.register_next_image(mo, image_id):
                    continue
            except IndexError:  # not in the mapper's cache: a frame without usable features (blank, black)
                continue
            done.add(i)
            progress = True
            mapper.triangulate_image(tri, image_id)
            if i in kf:
                mapper.adjust_local_bundle(mo, bao, tri, image_id, mapper.get_modified_points3D())
                mapper.clear_modified_points3D()
    result = pc.Reconstruction(mapper.reconstruction)
    mapper.end_reconstruction(False)
    return result


def _observation_errors(rec) -> np.ndarray:
    rec.update_point_3d_errors()
    errs = [p.error for p in rec.points3D.values()]
    return np.asarray(errs, dtype=np.float64) if errs else np.zeros(0)


def _solve_bundle(clip: _Clip, rec, refine_focal: bool, refine_lens: bool, iterations: int,
                  function_tolerance: float, cauchy_scale: Optional[float] = None) -> None:
    """One bundle adjustment of every registered frame (gauge: two cameras), principal point fixed;
    a Cauchy loss at `cauchy_scale` px, or a plain squared loss when None."""
    pc = clip.pc
    _quiet(clip.opts)
    bao = pc.BundleAdjustmentOptions()
    bao.print_summary = False
    bao.refine_focal_length = refine_focal
    bao.refine_principal_point = False
    bao.refine_extra_params = refine_lens
    if cauchy_scale is not None:
        bao.ceres.loss_function_type = pc.LossFunctionType.CAUCHY
        bao.ceres.loss_function_scale = cauchy_scale
    bao.ceres.solver_options.num_threads = _threads(clip.opts)
    bao.ceres.solver_options.max_num_iterations = iterations
    bao.ceres.solver_options.function_tolerance = function_tolerance
    config = pc.BundleAdjustmentConfig()
    for image_id in rec.reg_image_ids():
        config.add_image(image_id)
    config.fix_gauge(pc.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    pc.create_default_ceres_bundle_adjuster(bao, config, rec).solve()  # (pc.bundle_adjustment resets the log level)


def _final_adjustment(clip: _Clip, rec, refine_focal: bool, refine_lens: bool = False,
                      iterations: tuple[int, int] = BA_ITERATIONS) -> None:
    """Global BA of all frames: focal (and lens distortion) free if asked, robust loss at the clip's
    noise level, outliers dropped; twice."""
    opts = clip.opts
    for round_ in range(2):
        errs = _observation_errors(rec)
        scale = opts.robust_loss_px or float(np.clip(1.5 * np.median(errs) if len(errs) else 1.0, 0.1, 2.0))
        _solve_bundle(clip, rec, refine_focal, refine_lens, iterations[round_], 1e-6, cauchy_scale=scale)
        clip.pc.ObservationManager(rec).filter_all_points3D(_outlier_threshold(rec, opts), 1.0)


def _outlier_threshold(rec, opts: SfmOptions) -> float:
    """Reprojection error (px) above which observations are dropped: `outlier_factor` times the clip's
    median point error, between 1 px and `max_reproj_error_px`. A fixed 4 px keeps the tracks of a
    moving object, which pull the focal length; the clip's own noise level does not."""
    errs = _observation_errors(rec)
    if not len(errs) or not opts.outlier_factor:
        return opts.max_reproj_error_px
    return float(np.clip(opts.outlier_factor * np.median(errs), 1.0, opts.max_reproj_error_px))


def _camera_focal(cam) -> float:
    """A pycolmap camera's focal length in pixels (the mean of fx and fy for two-focal models)."""
    return float(np.mean([cam.params[i] for i in cam.focal_length_idxs()]))


def _camera_extra(cam) -> list[float]:
    """A pycolmap camera's distortion parameters."""
    return [float(cam.params[i]) for i in cam.extra_params_idxs()]


def _focal(rec) -> float:
    return _camera_focal(next(iter(rec.cameras.values())))


def _no_initial_pair() -> SfmError:
    return SfmError("mapping found no initial keyframe pair with enough parallax (too little camera "
                    "translation, or too little texture)")


@dataclass
class _Attempt:
    """One mapping of the keyframes with the camera held at (`f_fixed`, `extra_fixed`), then an
    adjustment with the focal (and lens) free: where it ended (`f_final`, `extra_final`)."""

    f_fixed: float
    f_final: float
    extra_final: list[float]
    rec: object
    mapped: np.ndarray
    num_models: int
    reproj: float
    registered: int
    start: float = 0.0  # the focal this hypothesis started from

    @property
    def consistent(self) -> bool:
        """One model, and the free focal stayed near the one the map was built with."""
        return self.num_models == 1 and abs(self.f_final / self.f_fixed - 1.0) < FOCAL_SETTLED

    @property
    def rank(self) -> tuple:
        return (-self.registered, not self.consistent, self.num_models, self.reproj)


def _plausible(f: float, width: int) -> bool:
    fov = float(np.degrees(camera.focal_to_fov(f, width)))
    return 10.0 <= fov <= 150.0


def _view_graph_focal(clip: _Clip) -> Optional[float]:
    """Focal length from the pairwise fundamental matrices (GLOMAP view-graph calibration), on a copy
    of the database; None when it fails or leaves the initial guess unchanged."""
    import shutil

    pc = clip.pc
    copy = clip.dir / "vgc.db"
    shutil.copyfile(clip.db_path, copy)
    vo = pc.ViewGraphCalibrationOptions()
    vo.random_seed = clip.opts.seed
    try:
        if not pc.calibrate_view_graph(str(copy), vo):
            return None
        f = _focal_from_db(clip, copy)
    except Exception:
        return None
    finally:
        copy.unlink(missing_ok=True)
    f0 = _focal_from_db(clip)
    return f if abs(f / f0 - 1.0) > 0.02 and _plausible(f, clip.W) else None


def _attempt(clip: _Clip, keyframes: list[int], f_fixed: float, extra: Optional[list[float]],
             refine: bool) -> Optional[_Attempt]:
    """Map the keyframes with the camera held at `f_fixed` (and distortion `extra`, None = 0), then
    adjust them (with the focal and the lens free if `refine`).

    Without `refine` the camera in the database (known intrinsics) is used as it is.
    """
    if refine:
        clip.set_camera(f_fixed, extra if extra is not None else [0.0] * 8)
    t0 = time.perf_counter()
    models = _map_keyframes(clip, keyframes, refine_focal=False)
    clip.timings["mapping"] = clip.timings.get("mapping", 0.0) + time.perf_counter() - t0
    if not models:
        return None
    rec = clip.pc.Reconstruction(models[0])
    mapped = np.zeros(clip.T, bool)
    mapped[list(_registered_frames(rec, clip))] = True
    t0 = time.perf_counter()
    _final_adjustment(clip, rec, refine_focal=refine, refine_lens=refine and clip.opts.estimates_lens)
    clip.timings["adjustment"] = clip.timings.get("adjustment", 0.0) + time.perf_counter() - t0
    cam = next(iter(rec.cameras.values()))
    return _Attempt(f_fixed=f_fixed, f_final=_camera_focal(cam), extra_final=_camera_extra(cam), rec=rec,
                    mapped=mapped, num_models=len(models), reproj=float(rec.compute_mean_reprojection_error()),
                    registered=rec.num_reg_images())


#: a focal within this fraction of one a map was already built with is that map (its result is reused;
#: the nearest such map). The same resolution as FOCAL_SETTLED: a map whose adjusted focal ends this close
#: to the one it was built with is a fixed point, so two focals this close are one point of the search
#: (the 81-frame forward clip's 30-degree chain adjusts to 613.5 px, 1.4 % from the 604.8 px map of the
#: first chain, and follows it into the same cycle instead of building 613.5 and 462.8 again: 8 maps -> 6)
FOCAL_REVISIT = FOCAL_SETTLED


@dataclass
class _Chain:
    """One focal hypothesis followed to its end (`_settle`)."""

    start: float
    steps: list  # the attempts along the chain, in order (some may be shared with other chains)
    end: Optional[_Attempt]  # the chain's result: its fixed point, or its cycle's / its own best map
    settled: bool  # True for a fixed point or a cycle; False when it ran out of rounds or failed
    num_keyframes: int

    @property
    def complete(self) -> bool:
        """The chain's result maps every keyframe in one model."""
        return self.end is not None and self.end.num_models == 1 and self.end.registered == self.num_keyframes


def _settle(clip: _Clip, keyframes: list[int], f_start: float, visited: list[_Attempt],
            max_rounds: int = 4) -> _Chain:
    """One focal hypothesis: map with the focal held at `f_start`, adjust with it free, and map again
    with the adjusted camera until the focal settles (a map built with a wrong focal is distorted,
    and adjustment alone cannot undo that in a flat focal/structure valley).

    The maps are a function of the focal they are built with, so a focal within FOCAL_REVISIT of one
    already mapped (by this chain or another: `visited`, extended here) reuses that map instead of
    building it again. The chain ends at a fixed point (the free focal stays where the map was built:
    `_Attempt.consistent`), at a cycle (weak focal constraints, e.g. forward motion, can make the
    adjusted focal alternate between two values: the cycle's best-reprojecting map is its result),
    or unsettled after `max_rounds` new maps (or when a map fails): its best-reprojecting map is then its
    result.
    """
    steps: list[_Attempt] = []
    f, extra, built = f_start, None, 0
    while True:  # ends: every step is either a new map (at most max_rounds) or one already in `visited`
        a = min((v for v in visited if abs(f / v.f_fixed - 1.0) < FOCAL_REVISIT),
                key=lambda v: abs(f / v.f_fixed - 1.0), default=None)
        if a is None:
            if built == max_rounds:
                break
            a = _attempt(clip, keyframes, f, extra, refine=True)
            built += 1
            if a is None:
                break
            a.start = f_start
            visited.append(a)
        if a in steps:  # a cycle: the maps from here on repeat
            cycle = steps[steps.index(a):]
            return _Chain(f_start, steps, min(cycle, key=lambda c: c.reproj), True, len(keyframes))
        steps.append(a)
        if a.consistent:
            return _Chain(f_start, steps, a, True, len(keyframes))
        if a.num_models != 1 or not _plausible(a.f_final, clip.W):
            break
        f, extra = a.f_final, a.extra_final
    # unsettled (out of rounds, a failed map, an implausible focal): its best-reprojecting map stands for it
    # (a map that jumped to a far worse focal, e.g. under forward motion, does not)
    return _Chain(f_start, steps, min(steps, key=lambda c: c.reproj) if steps else None, False, len(keyframes))


@dataclass
class _Solution:
    """The chosen keyframe map and what the hypotheses said about the focal length."""

    best: _Attempt
    attempts: list[_Attempt]
    hypotheses: list[float]  # the adjusted focal of each plausible complete keyframe map
    spread: Optional[float]
    starts: int = 1  # focal starts that gave a complete keyframe map


def hypothesis_spread(focals: list[float]) -> Optional[float]:
    """(max - min) / median of focal lengths; None for fewer than two."""
    if len(focals) < 2:
        return None
    f = np.asarray(focals, dtype=np.float64)
    return float((f.max() - f.min()) / np.median(f))


def _solve(clip: _Clip, keyframes: list[int], refine: bool) -> _Solution:
    """Keyframe maps from several independent focal hypotheses, each settled (`_settle`).

    Starts, in order: the initial guess, the view-graph calibration's focal (from the fundamental
    matrices), then a ladder of fields of view, until `focal_hypotheses` of them map every keyframe
    in one model (or the ladder ends). A hypothesis is plausible when its reprojection error is
    within `hypothesis_tolerance` of the best one's; the spread of the plausible focal lengths says
    whether the data pick one basin (small) or several (the clip is ambiguous). Only keyframes take
    part, so the tries are cheap; the other frames are registered once, afterwards.
    """
    f0 = _focal_from_db(clip)
    if not refine:
        a = _attempt(clip, keyframes, f0, None, refine=False)
        if a is None:
            raise _no_initial_pair()
        return _Solution(best=a, attempts=[a], hypotheses=[a.f_final], spread=None)
    opts = clip.opts
    queue: list = [f0, "view-graph"]  # the view-graph focal is computed only when it is needed
    queue += [float(camera.fov_to_focal(np.radians(fov), clip.W)) for fov in (75.0, 30.0, 60.0, 100.0)]
    attempts: list[_Attempt] = []  # every map built, in order (shared by the chains)
    chains: list[_Chain] = []
    while queue and sum(c.complete for c in chains) < opts.focal_hypotheses:
        f = queue.pop(0)
        if f == "view-graph":
            f = _view_graph_focal(clip)
            if f is None:
                continue
        # a start next to a map already built would only reuse it (`_settle`): it is no independent start
        near = [a for a in attempts if min(abs(f / g - 1.0) for g in (a.f_fixed, a.f_final, a.start)) < FOCAL_REVISIT]
        if any(abs(f / c.start - 1.0) < FOCAL_REVISIT for c in chains) or near:
            continue
        chains.append(_settle(clip, keyframes, f, attempts))
    if not attempts:
        raise _no_initial_pair()
    best = min(attempts, key=lambda a: a.rank)
    complete = [c for c in chains if c.complete]
    basins = [c.end for c in complete if c.settled]  # where a chain came to rest (a fixed point or a cycle)
    if basins:
        best = min(basins, key=lambda a: a.reproj)
        limit = best.reproj * (1.0 + opts.hypothesis_tolerance)
        # every plausible basin, and the end of any chain still travelling that already reprojects
        # better than the chosen basin (a better solution the tries did not settle in: ambiguous)
        hypotheses = [a.f_final for a in basins if a.reproj <= limit]
        hypotheses += [c.end.f_final for c in complete if not c.settled and c.end.reproj < best.reproj]
    elif complete:
        best = min((c.end for c in complete), key=lambda a: a.reproj)
        limit = best.reproj * (1.0 + opts.hypothesis_tolerance)
        hypotheses = [c.end.f_final for c in complete if c.end.reproj <= limit]
    else:
        hypotheses = [best.f_final]
    starts_complete = len(complete)
    return _Solution(best=best, attempts=attempts, hypotheses=hypotheses, spread=hypothesis_spread(hypotheses),
                     starts=starts_complete)


def _stat(x: float) -> float:
    """A recorded statistic to 3 significant digits (it is an estimate; more digits say nothing)."""
    return float(f"{float(x):.3g}")


def _squared_residuals(rec) -> tuple[float, int]:
    """(sum of squared reprojection errors in px^2, number of observations) of a reconstruction."""
    total, n = 0.0, 0
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        obs = image.get_observation_points2D()
        if not obs:
            continue
        xyz = np.array([rec.points3D[p.point3D_id].xyz for p in obs])
        uv = np.array([p.xy for p in obs])
        cam_pts = (xyz @ image.cam_from_world().matrix()[:, :3].T) + image.cam_from_world().matrix()[:, 3]
        proj = np.array(rec.cameras[image.camera_id].img_from_cam(cam_pts), dtype=np.float64).reshape(-1, 2)
        total += float(np.sum((proj - uv) ** 2))
        n += len(obs)
    return total, n


def _adjust(clip: _Clip, rec, refine_focal: bool, refine_lens: bool, iterations: int = 30) -> None:
    """One bundle adjustment of all frames with a plain squared loss and no outlier filtering (the
    observations stay the same, so costs before and after compare)."""
    _solve_bundle(clip, rec, refine_focal, refine_lens, iterations, 1e-8)


def _profile_uncertainty(clip: _Clip, rec, refine_lens: bool, delta: float = 0.02) -> Optional[float]:
    """Focal std / focal from the profile of the reprojection cost: with the focal held at f (1 +- delta)
    and everything else (the lens too) re-adjusted, sigma_f = delta f / sqrt(delta chi^2), chi^2 =
    cost / per-coordinate noise variance, on the same observations."""
    base_rec = clip.pc.Reconstruction(rec)
    _adjust(clip, base_rec, refine_focal=True, refine_lens=refine_lens)  # the same loss as the profile
    base, n = _squared_residuals(base_rec)
    if n < 10 or base <= 0:
        return None
    var = base / (2 * n)  # per-coordinate noise variance
    f = _focal(base_rec)
    rises = []
    for sign in (-1.0, 1.0):
        copy = clip.pc.Reconstruction(base_rec)
        cam = next(iter(copy.cameras.values()))
        p = list(cam.params)
        for i in cam.focal_length_idxs():
            p[i] = f * (1.0 + sign * delta)
        cam.params = p
        _adjust(clip, copy, refine_focal=False, refine_lens=refine_lens)
        cost, _ = _squared_residuals(copy)
        rises.append(max(cost - base, 1e-12) / var)
    return _stat(delta / np.sqrt(np.mean(rises)))


def _given_focal_disagreement(clip: _Clip, rec) -> Optional[float]:
    """With known intrinsics: how far (fraction) a free adjustment of a copy of the final model moves
    the given focal length. Large when the video contradicts the given intrinsics."""
    copy = clip.pc.Reconstruction(rec)
    f_given = _focal(copy)
    try:
        _final_adjustment(clip, copy, refine_focal=True, iterations=FINAL_BA_ITERATIONS)
    except Exception:
        return None
    return abs(_focal(copy) / f_given - 1.0)


# --------------------------------------------------------------------------- main entry


def run_sfm(frames: np.ndarray, opts: SfmOptions, workdir: Optional[Path] = None) -> SfmResult:
    """Cameras for a clip (T,H,W,3) uint8. Raises SfmError with a reason when the clip has no usable trajectory."""
    import pycolmap as pc

    _quiet(opts)
    T, H, W = frames.shape[:3]
    if T < 3:
        raise SfmError(f"a clip needs at least 3 frames for cameras, got {T}")
    with tempfile.TemporaryDirectory(prefix="fwdata-sfm-", dir=workdir) as tmp:
        clip = _Clip(frames, opts, Path(tmp))
        clip.extract(frames)
        n_feat = np.array([len(k) for k in clip.keypoints])
        if np.median(n_feat) < opts.min_features:
            raise SfmError(f"textureless clip: median {int(np.median(n_feat))} SIFT features per frame "
                           f"(need {opts.min_features})")

        # motion probe: static clips and the keyframe step
        probe = motion_probe_pairs(T)
        clip.match(probe)
        motion = clip.inlier_motion(probe)
        matched = {p: m for p, m in motion.items() if m[0] >= 15}
        if matched and max(m[1] for m in matched.values()) < opts.min_motion_px:
            raise SfmError(f"static clip: features move at most {max(m[1] for m in matched.values()):.2f} px "
                           f"between frames (need {opts.min_motion_px:g}); the camera does not move")
        if not matched:
            raise SfmError("no frame pair could be matched (too little overlapping texture)")
        consecutive = [m[1] for p, m in matched.items() if p[1] == p[0] + 1]
        per_frame = float(np.median(consecutive)) if consecutive else 0.0
        if opts.keyframe_step:
            step = opts.keyframe_step
        else:
            target = opts.keyframe_flow * float(np.hypot(H, W))
            step = int(np.clip(round(target / max(per_frame, 1e-6)), 1, opts.max_keyframe_step))
        keyframes = choose_keyframes(T, step)
        pairs = matching_pairs(T, keyframes, opts.overlap)
        if opts.loop_detection:
            pairs += loop_pairs(clip.descriptors, keyframes, opts.overlap, opts.loop_candidates, opts.seed)
        clip.match(pairs)

        known = opts.intrinsics is not None
        refine = opts.refine_intrinsics and not known
        solution = _solve(clip, keyframes, refine)
        if _incomplete(solution, keyframes) and len(keyframes) > opts.overlap + 1:
            # mapping split or left keyframes out: match every keyframe pair (and each frame with two
            # keyframes on each side), as the plain exhaustive recipe would, and solve again
            denser = dense_pairs(T, keyframes, opts.max_dense_pairs)
            if denser:
                clip.match(denser)
                clip.notes.append(f"sfm: mapping was incomplete; retried with {len(clip.matched)} matched pairs")
                retry = _solve(clip, keyframes, refine)
                if _complete_rank(retry) < _complete_rank(solution):
                    solution = retry
        best = solution.best
        if refine and solution.spread is not None and solution.spread > opts.max_focal_spread:
            raise SfmError(f"focal length ambiguous: keyframe maps from {solution.starts} focal starts end at "
                           f"{', '.join(f'{f:.0f}' for f in sorted(solution.hypotheses))} px "
                           f"({100 * solution.spread:.0f} % apart, limit {100 * opts.max_focal_spread:g} %) with "
                           f"equally good reprojection; give --intrinsics")
        mapped, num_models = best.mapped, best.num_models
        t0 = time.perf_counter()
        rec = _extend(clip, best.rec, keyframes)  # every other frame, camera held at the settled value
        clip.timings["registration"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        estimate_lens = refine and opts.estimates_lens
        _final_adjustment(clip, rec, refine_focal=refine, refine_lens=estimate_lens, iterations=FINAL_BA_ITERATIONS)
        # The focal's std from the profile of the cost (deterministic). COLMAP's covariance
        # (pycolmap.estimate_ba_covariance) is not used: whether its solver succeeds differed between
        # runs of the same clip in different processes, and the recorded bytes must not.
        focal_unc = _profile_uncertainty(clip, rec, estimate_lens) if refine else None
        if estimate_lens and not _lens_significant(rec):
            # no measurable distortion: the lens stays a pinhole (no resampling of the frames)
            _zero_lens(rec)
            _final_adjustment(clip, rec, refine_focal=True, refine_lens=False, iterations=FINAL_BA_ITERATIONS)
            clip.notes.append(f"sfm: lens distortion not significant (|k1| <= {LENS_MIN_K1}); pinhole kept")
        clip.timings["adjustment"] = clip.timings.get("adjustment", 0.0) + time.perf_counter() - t0
        spread = solution.spread
        if known:
            spread = _given_focal_disagreement(clip, rec)
        clip.notes.append("sfm: focal tries " + ", ".join(
            f"{a.f_fixed:.1f}->{a.f_final:.1f} ({a.num_models} model{'s' if a.num_models != 1 else ''}, "
            f"{a.reproj:.3f} px)" for a in solution.attempts))
        result = _result(clip, rec, keyframes, mapped, num_models)
        result.focal_uncertainty = focal_unc
        result.focal_hypotheses = [float(f) for f in solution.hypotheses]
        result.focal_spread = _stat(spread) if spread is not None else None
        if refine and focal_unc is not None and focal_unc > opts.max_focal_uncertainty:
            raise SfmError(f"focal length weakly determined by this camera motion: standard deviation "
                           f"{100 * focal_unc:.1f} % (limit {100 * opts.max_focal_uncertainty:g} %); give --intrinsics")
    return result


def _incomplete(solution: "_Solution", keyframes: list[int]) -> bool:
    return solution.best.num_models != 1 or solution.best.registered < len(keyframes)


def _complete_rank(solution: "_Solution") -> tuple:
    return (-solution.best.registered, solution.best.num_models, solution.best.reproj)


def dense_pairs(T: int, keyframes: list[int], max_pairs: int) -> list[tuple[int, int]]:
    """Every keyframe pair, and each other frame with the two keyframes before and after it; []
    when that is more than `max_pairs` pairs."""
    pairs = {(a, b) for n, a in enumerate(keyframes) for b in keyframes[n + 1:]}
    kf = np.asarray(keyframes)
    for i in range(T):
        if i in keyframes:
            continue
        for k in list(kf[kf < i][-2:]) + list(kf[kf > i][:2]):
            pairs.add((min(i, int(k)), max(i, int(k))))
    return sorted(pairs) if len(pairs) <= max_pairs else []


def _lens_significant(rec) -> bool:
    """Distortion counts when |k1| is above LENS_MIN_K1: a radial term that changes the image corners
    by well under a pixel is noise."""
    extra = _camera_extra(next(iter(rec.cameras.values())))
    return bool(extra) and abs(extra[0]) > LENS_MIN_K1


def _zero_lens(rec) -> None:
    cam = next(iter(rec.cameras.values()))
    p = list(cam.params)
    for i in cam.extra_params_idxs():
        p[i] = 0.0
    cam.params = p  # the reconstruction's own camera (pycolmap returns a reference)


def _focal_from_db(clip: _Clip, db_path: Optional[Path] = None) -> float:
    """The focal length of the clip's shared camera in its database (or in the copy at `db_path`)."""
    with clip.pc.Database.open(str(db_path or clip.db_path)) as db:
        return _camera_focal(db.read_camera(1))


def _result(clip: _Clip, rec, keyframes: list[int], mapped: np.ndarray, num_models: int) -> SfmResult:
    T = clip.T
    frame_of = {v: k for k, v in clip.image_ids.items()}
    w2c = np.full((T, 4, 4), np.nan)
    have = np.zeros(T, bool)
    for image_id in rec.reg_image_ids():
        i = frame_of[image_id]
        m = np.eye(4)
        m[:3, :4] = rec.images[image_id].cam_from_world().matrix()
        w2c[i] = m
        have[i] = True
    if not have.all():
        missing = np.flatnonzero(~have).tolist()
        raise SfmError(f"{len(missing)} of {T} frames could not be registered (frames {_ranges(missing)}); "
                       f"the mapping split into {num_models} model(s) that could not be joined")
    K, lens = camera_intrinsics(next(iter(rec.cameras.values())))

    rec.update_point_3d_errors()
    ids = sorted(rec.points3D.keys())
    index = {pid: n for n, pid in enumerate(ids)}
    pts = np.array([rec.points3D[pid].xyz for pid in ids], dtype=np.float64).reshape(-1, 3)
    errs = np.array([rec.points3D[pid].error for pid in ids], dtype=np.float64)
    of, op, ouv = [], [], []
    for image_id in rec.reg_image_ids():
        i = frame_of[image_id]
        for p2d in rec.images[image_id].get_observation_points2D():
            of.append(i)
            op.append(index[p2d.point3D_id])
            ouv.append(p2d.xy)
    obs_frame = np.asarray(of, dtype=np.int32)
    obs_point = np.asarray(op, dtype=np.int64)
    obs_uv = np.asarray(ouv, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 10:
        raise SfmError(f"only {len(pts)} sparse points survived bundle adjustment")

    # frame 0 = world; unit = median depth of the observed points
    w0 = w2c[0].copy()
    w2c = camera.relative_to_first(w2c)
    pts = camera.transform_points(w0, pts)
    z = np.einsum("nj,nj->n", pts[obs_point], w2c[obs_frame, 2, :3]) + w2c[obs_frame, 2, 3]
    zpos = z[z > 0]
    if len(zpos) < 10:
        raise SfmError("sparse points lie behind the cameras; the reconstruction is degenerate")
    s = 1.0 / float(np.median(zpos))
    w2c[:, :3, 3] *= s
    pts *= s

    centres = camera.camera_centers(w2c)
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    med = float(np.median(steps))
    floor = 0.02  # 2% of the median scene depth: noise of a nearly still camera is no jump
    jumps = np.flatnonzero(steps > max(clip.opts.max_step_ratio * med, floor))
    if len(jumps):
        j = int(jumps[0])
        raise SfmError(f"camera path jumps between frames {j} and {j + 1} ({steps[j] / max(med, 1e-12):.0f}x the "
                       f"median step); a frame was probably registered wrongly")
    return SfmResult(
        w2c=w2c, K=K, points=pts, point_errors=errs, obs_frame=obs_frame, obs_point=obs_point, obs_uv=obs_uv,
        keyframes=keyframes, mapped=mapped, reprojection_error=float(rec.compute_mean_reprojection_error()),
        num_models=num_models, lens=lens, timings=dict(clip.timings),
        notes=clip.notes + [f"sfm: {len(keyframes)} keyframes (step {keyframes[1] - keyframes[0] if len(keyframes) > 1 else 1}), "
               f"{num_models} model(s) from mapping, {int(mapped.sum())} frames mapped, "
               f"{T - int(mapped.sum())} registered afterwards"],
    )


def _ranges(idx: list[int]) -> str:
    out = []
    start = prev = idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)
