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

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fwdata.dataset import camera


#: a try whose free focal ends within this fraction of the focal it was mapped with is settled
FOCAL_SETTLED = 0.03
#: iterations of the two rounds of bundle adjustment: of the keyframes in a focal try (where the focal
#: length has to travel), and of all frames at the end (where it only settles)
BA_ITERATIONS = (30, 10)
FINAL_BA_ITERATIONS = (10, 5)


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
    camera_model: Literal["SIMPLE_PINHOLE", "PINHOLE"] = Field(
        "SIMPLE_PINHOLE", description="one focal (SIMPLE_PINHOLE) or fx, fy (PINHOLE); principal point at the centre"
    )
    intrinsics: Optional[tuple[float, float, float, float]] = Field(
        None, description="known fx, fy, cx, cy in clip pixels (the build converts --intrinsics from source pixels)"
    )
    refine_intrinsics: bool = Field(True, description="refine the focal length (ignored with known intrinsics)")
    initial_fov_deg: Optional[float] = Field(
        None, gt=1, lt=179, description="initial horizontal field of view; None = COLMAP's guess f = 1.2 max(W, H)"
    )
    robust_loss_px: float = Field(0.0, ge=0, description="Cauchy loss scale of the final adjustment; 0 = automatic")
    max_reproj_error_px: float = Field(4.0, gt=0, description="observations above this error are dropped")
    min_features: int = Field(64, ge=1, description="median SIFT features per frame below this = textureless clip")
    min_motion_px: float = Field(1.0, ge=0, description="median feature motion below this everywhere = static clip")
    max_step_ratio: float = Field(10.0, gt=1, description="a camera step this many times the median step is a jump")
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


class SfmError(RuntimeError):
    """The clip has no usable camera trajectory; the message says why (one line)."""


@dataclass
class SfmResult:
    """Cameras and sparse structure of a clip, frame 0 = world, median point depth = 1.

    w2c (T,4,4); K (3,3); points (N,3) world; point_errors (N,) mean reprojection error per point;
    obs_frame / obs_point (M,) which frame sees which point, obs_uv (M,2) the observed pixel
    (pixel centres at +0.5); keyframes: frame indices mapped first; mapped (T,) bool: frames in the
    mapper's model before the registration pass.
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
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.w2c)

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
        eo = pc.FeatureExtractionOptions()
        eo.sift.max_num_features = self.opts.max_features
        eo.sift.first_octave = first_octave(self.H, self.W, self.opts)
        eo.max_image_size = max(self.H, self.W)
        eo.num_threads = _threads(self.opts)
        ro = pc.ImageReaderOptions()
        if self.opts.intrinsics is not None:
            ro.camera_model = "PINHOLE"
            params = list(self.opts.intrinsics)
        else:
            ro.camera_model = self.opts.camera_model
            f = initial_focal(self.W, self.H, self.opts)
            params = [f, self.W / 2.0, self.H / 2.0] if ro.camera_model == "SIMPLE_PINHOLE" else \
                [f, f, self.W / 2.0, self.H / 2.0]
        ro.camera_params = ",".join(repr(float(x)) for x in params)
        _quiet(self.opts)
        pc.extract_features(self.db_path, images, image_names=names, camera_mode=pc.CameraMode.SINGLE,
                            reader_options=ro, extraction_options=eo, device=pc.Device.cpu)
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

    def set_focal(self, focal: float) -> None:
        with self.pc.Database.open(str(self.db_path)) as db:
            cam = db.read_camera(1)
            p = list(cam.params)
            if len(p) == 3:
                p[0] = focal
            else:
                p[0] = p[1] = focal
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
    return mo


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


def _final_adjustment(clip: _Clip, rec, refine_focal: bool, iterations: tuple[int, int] = BA_ITERATIONS) -> None:
    """Global BA of all frames: focal free (if asked), robust loss at the clip's noise level, outliers dropped."""
    pc = clip.pc
    opts = clip.opts
    _quiet(opts)
    for round_ in range(2):
        errs = _observation_errors(rec)
        scale = opts.robust_loss_px or float(np.clip(1.5 * np.median(errs) if len(errs) else 1.0, 0.1, 2.0))
        bao = pc.BundleAdjustmentOptions()
        bao.print_summary = False
        bao.refine_focal_length = refine_focal
        bao.refine_principal_point = False
        bao.refine_extra_params = False
        bao.ceres.loss_function_type = pc.LossFunctionType.CAUCHY
        bao.ceres.loss_function_scale = scale
        bao.ceres.solver_options.num_threads = _threads(opts)
        bao.ceres.solver_options.max_num_iterations = iterations[round_]
        bao.ceres.solver_options.function_tolerance = 1e-6
        config = pc.BundleAdjustmentConfig()
        for image_id in rec.reg_image_ids():
            config.add_image(image_id)
        config.fix_gauge(pc.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
        pc.create_default_bundle_adjuster(bao, config, rec).solve()  # (pc.bundle_adjustment resets the log level)
        pc.ObservationManager(rec).filter_all_points3D(opts.max_reproj_error_px, 1.0)


def _camera_focal(cam) -> float:
    """A pycolmap camera's focal length in pixels (the mean of fx and fy for two-focal models)."""
    return float(np.mean([cam.params[i] for i in cam.focal_length_idxs()]))


def _focal(rec) -> float:
    return _camera_focal(next(iter(rec.cameras.values())))


def _no_initial_pair() -> SfmError:
    return SfmError("mapping found no initial keyframe pair with enough parallax (too little camera "
                    "translation, or too little texture)")


@dataclass
class _Attempt:
    """One mapping of the clip with the focal length held at `f_fixed`, then the final adjustment."""

    f_fixed: float
    f_final: float
    rec: object
    mapped: np.ndarray
    num_models: int
    reproj: float
    registered: int

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


def _attempt(clip: _Clip, keyframes: list[int], f_fixed: float, refine: bool) -> Optional[_Attempt]:
    """Map the keyframes with the focal held at `f_fixed`, then adjust them (with the focal free if `refine`).

    Without `refine` the camera in the database (known intrinsics) is used as it is.
    """
    if refine:
        clip.set_focal(f_fixed)
    t0 = time.perf_counter()
    models = _map_keyframes(clip, keyframes, refine_focal=False)
    clip.timings["mapping"] = clip.timings.get("mapping", 0.0) + time.perf_counter() - t0
    if not models:
        return None
    rec = clip.pc.Reconstruction(models[0])
    mapped = np.zeros(clip.T, bool)
    mapped[list(_registered_frames(rec, clip))] = True
    t0 = time.perf_counter()
    _final_adjustment(clip, rec, refine_focal=refine)
    clip.timings["adjustment"] = clip.timings.get("adjustment", 0.0) + time.perf_counter() - t0
    return _Attempt(f_fixed=f_fixed, f_final=_focal(rec), rec=rec, mapped=mapped, num_models=len(models),
                    reproj=float(rec.compute_mean_reprojection_error()), registered=rec.num_reg_images())


def _solve(clip: _Clip, keyframes: list[int], refine: bool, max_attempts: int = 5) -> list[_Attempt]:
    """Keyframe maps with the focal held fixed at a candidate, each adjusted with the focal free; the
    candidate is replaced by the adjusted focal until it settles (a map built with a wrong focal is
    distorted, and adjustment alone cannot undo that in a flat focal/structure valley).

    Candidates, in order: the initial guess, the view-graph calibration's focal (from the fundamental
    matrices; it rescues clips where the guess breaks mapping up, but can be far off on others), then
    a ladder of fields of view for clips where mapping breaks up. Only keyframes take part, so the
    tries are cheap; the other frames are registered once, afterwards.
    """
    f0 = _focal_from_db(clip)
    if not refine:
        a = _attempt(clip, keyframes, f0, refine=False)
        if a is None:
            raise _no_initial_pair()
        return [a]
    queue: list = [f0, "view-graph"]  # the view-graph focal is computed only when it is needed
    queue += [float(camera.fov_to_focal(np.radians(fov), clip.W)) for fov in (60.0, 45.0, 80.0, 100.0)]
    attempts: list[_Attempt] = []
    tried: list[float] = []
    while queue and len(tried) < max_attempts:
        f = queue.pop(0)
        if f == "view-graph":
            f = _view_graph_focal(clip)
            if f is None:
                continue
        if any(abs(f / t - 1.0) < 0.01 for t in tried):
            continue
        tried.append(f)
        a = _attempt(clip, keyframes, f, refine=True)
        if a is None:
            continue
        attempts.append(a)
        if a.consistent and a.registered == len(keyframes):
            break
        if _plausible(a.f_final, clip.W) and a.num_models == 1:
            queue.insert(0, a.f_final)  # map again with the focal the adjustment found
    if not attempts:
        raise _no_initial_pair()
    return attempts


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
        attempts = _solve(clip, keyframes, refine)
        best = min(attempts, key=lambda a: a.rank)
        mapped, num_models = best.mapped, best.num_models
        t0 = time.perf_counter()
        rec = _extend(clip, best.rec, keyframes)  # every other frame, focal held at the settled value
        clip.timings["registration"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _final_adjustment(clip, rec, refine_focal=refine, iterations=FINAL_BA_ITERATIONS)
        clip.timings["adjustment"] = clip.timings.get("adjustment", 0.0) + time.perf_counter() - t0
        clip.notes.append("sfm: focal tries " + ", ".join(
            f"{a.f_fixed:.1f}->{a.f_final:.1f} ({a.num_models} model{'s' if a.num_models != 1 else ''}, "
            f"{a.reproj:.3f} px)" for a in attempts))
        result = _result(clip, rec, keyframes, mapped, num_models)
    return result


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
    cam = next(iter(rec.cameras.values()))
    p = list(cam.params)
    if len(p) == 3:
        K = camera.intrinsics_matrix(p[0], p[0], p[1], p[2])
    else:
        K = camera.intrinsics_matrix(p[0], p[1], p[2], p[3])

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
        num_models=num_models, timings=dict(clip.timings),
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
