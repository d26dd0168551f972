"""`fwdata build`: raw videos in, a dataset in the contract out.

The pipeline is a list of small steps with one job each (`STEPS`), run for every clip:

    decode -> depth (in the background) -> sfm -> undistort -> align -> points -> quality -> write

(depth runs next to the cameras and stops early when the clip fails; a distorting lens found by SfM
is removed by resampling the clip onto a pinhole camera, and the depth with it). A step
that raises ends the clip: the failure is recorded in metadata.json with the step's name and a
one-line reason, and the build goes on with the next clip. Each clip is written atomically with a
completion marker (`fwdata.dataset.store`), so a rerun skips finished clips (``force`` redoes them) and a
build killed at any moment and run again ends with the same dataset as an uninterrupted one.

Where clips run is the executor's part (`fwdata.build.executors`, ``executor``): ``local`` runs them in
this process (``workers = 1``) or in ``workers`` processes, each holding one clip at a time (frames at
clip size only) and its own copy of the depth model; ``ray`` runs one Ray task per clip on a cluster.
Both run `process_clip`; markers, resume, failures and metadata.json stay here, in the driver.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Protocol, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fwdata import __version__, quality
from fwdata.build.align import AlignError, AlignOptions, AlignResult, align_depth, check_agreement
from fwdata.build.clips import (ClipOptions, ClipPlan, VideoPlan, clip_intrinsics_to_source, find_videos, geometry_size,
                                load_clip, plan_video, scale_intrinsics_to_clip)
from fwdata.dataset.contract import (
    BuildRun,
    CameraFile,
    ContractError,
    DatasetMetadata,
    FailedInput,
    ModelInfo,
    Provenance,
    QualityMetrics,
    SampleProvenance,
    SampleRecord,
    SourceCamera,
    load_metadata,
    sample_paths,
)
from fwdata.dataset.lens import Undistortion
from fwdata.runtime import ConfigFileError, clip_threads, load_config_file
from fwdata.build.depth import DepthError, DepthModelError, DepthOptions, DepthResult, check_model_available, estimate_depth
from fwdata.build.depth import model_info as depth_model_info
from fwdata.build.sfm import Distortion, SfmError, SfmOptions, SfmResult, given_lens, run_sfm
from fwdata.dataset.store import (
    DatasetBusy,
    SampleData,
    check_output_folder,
    is_inside,
    clean_stale_temp_files,
    finished_records,
    is_finished,
    point_maps,
    remove_sample,
    write_metadata,
    write_lock,
    write_sample,
)
from fwdata.dataset.video import X264_OPTIONS, VideoError, content_fingerprint, decode_problems
from fwdata.presets import BUILD_PRESETS, find_preset
from fwdata.build.executors import import_ray, make_executor

PRESET_DIR = BUILD_PRESETS.directory  # the packaged build presets (fwdata/presets/build)


# --------------------------------------------------------------------------- configuration


class SplitOptions(BaseModel):
    """How samples are assigned to splits: by a hash of the source file name, so every clip of a
    video lands in the same split (no leakage between splits)."""

    model_config = ConfigDict(extra="forbid")

    val: float = Field(0.0, ge=0, le=1, description="fraction of source videos in the val split")
    test: float = Field(0.0, ge=0, le=1, description="fraction of source videos in the test split")

    @model_validator(mode="after")
    def _sum(self) -> "SplitOptions":
        if self.val + self.test > 1:
            raise ValueError(f"val + test fractions ({self.val} + {self.test}) exceed 1")
        return self


class BuildConfig(BaseModel):
    """Everything `fwdata build` does, as one validated object (a TOML preset, then CLI overrides)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", description="dataset name written to metadata.json (default: the output folder's name)")
    workers: int = Field(1, ge=0, description="clips processed at once, each in its own process; 0 = one per core "
                                              "(at most the clips to build). Never changes the results")
    threads: int = Field(1, ge=1, description="CPU threads of each clip (torch, and COLMAP when sfm.num_threads is 0). "
                                              "The results depend on this number (fwdata.runtime): keep 1 for "
                                              "datasets that are bit-identical across runs and machines")
    executor: Literal["local", "ray"] = Field("local", description="where clips run: local processes (`workers`) "
                                                                 "or Ray tasks on a cluster (fwdata.build.executors). "
                                                                 "Never changes the results")
    ray_address: Optional[str] = Field(None, description="Ray cluster of the ray executor: 'auto', 'HOST:PORT', "
                                                         "'ray://HOST:PORT'; none: RAY_ADDRESS, else a Ray instance "
                                                         "on this machine")
    ray_max_retries: int = Field(1, ge=0, description="ray executor: times a clip whose worker died is run again "
                                                      "before it is recorded as failed")
    ray_gpus: Optional[float] = Field(None, ge=0, description="ray executor: GPUs per clip task (none: 1 when the "
                                                               "depth model runs on CUDA, else 0)")
    ray_memory_gb: float = Field(0.0, ge=0, description="ray executor: memory per clip task in GiB for Ray's "
                                                        "scheduler (0: not declared)")
    write_ply: bool = Field(True, description="write the fused, coloured .ply cloud of each clip")
    overlap_depth: bool = Field(True, description="run depth in a background thread while the cameras are solved")
    intrinsics: Optional[tuple[float, float, float, float]] = Field(
        None, description="known camera intrinsics fx, fy, cx, cy in *source video* pixels (all inputs)"
    )
    distortion: Optional[Distortion] = Field(
        None, description="known OpenCV lens distortion k1, k2, p1, p2 (or k1, k2, p1, p2, k3) of the source (with "
                          "`intrinsics`); clips are undistorted to pinhole"
    )
    clips: ClipOptions = Field(default_factory=ClipOptions)
    depth: DepthOptions = Field(default_factory=DepthOptions)
    sfm: SfmOptions = Field(default_factory=SfmOptions)
    align: AlignOptions = Field(default_factory=AlignOptions)
    splits: SplitOptions = Field(default_factory=SplitOptions)

    @model_validator(mode="after")
    def _distortion_needs_intrinsics(self) -> "BuildConfig":
        if self.distortion is not None and self.intrinsics is None:
            raise ValueError("distortion is given without intrinsics: give both (--intrinsics fx,fy,cx,cy,k1,k2,p1,p2[,k3])")
        return self


class ConfigError(ConfigFileError):
    """A preset or option that is not valid; the message names the file/key."""


def resolve_preset(preset: Union[str, Path, None]) -> Optional[Path]:
    """A preset file, or a packaged preset by name (`fast` -> fwdata/presets/build/fast.toml); see fwdata.presets."""
    return None if preset is None else find_preset(preset, BUILD_PRESETS, error=ConfigError)


def load_config(preset: Union[str, Path, None] = None, overrides: Optional[dict[str, Any]] = None) -> BuildConfig:
    """BuildConfig from a TOML preset (or the built-in defaults) with nested `overrides` applied last."""
    return load_config_file(BuildConfig, resolve_preset(preset), overrides, error=ConfigError)


# --------------------------------------------------------------------------- one clip


class StepError(RuntimeError):
    """A step failed for a reason we expected (bad data, not a bug)."""


@dataclass
class ClipJob:
    """State of one clip as it moves through the steps (one worker holds one at a time)."""

    plan: ClipPlan
    config: BuildConfig
    out: Path
    frames: Optional[np.ndarray] = None
    geometry_frames: Optional[np.ndarray] = None  # the clip at a higher resolution for SfM (None: `frames`)
    sfm: Optional[SfmResult] = None
    undistortion: Optional[Undistortion] = None
    depth: Optional[DepthResult] = None
    aligned: Optional[AlignResult] = None
    cameras: Optional[CameraFile] = None
    points: Optional[np.ndarray] = None
    points_valid: Optional[np.ndarray] = None
    quality: Optional[QualityMetrics] = None
    timings: dict[str, float] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    pending: dict[str, Future] = field(default_factory=dict)

    def wait(self, stage: str) -> None:
        """Wait for a background step; its failure is raised as a `BackgroundStepError` naming it."""
        fut = self.pending.pop(stage, None)
        if fut is None:
            return
        try:
            self.timings[stage] = fut.result()
        except BaseException as e:
            raise BackgroundStepError(stage, e) from e


class BackgroundStepError(RuntimeError):
    """A step that ran in the background failed; `stage` and `error` are the step's own."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(str(error))
        self.stage = stage
        self.error = error


def step_decode(job: ClipJob) -> None:
    """Read the clip's source frames (streamed, in chunks) at the clip size, from the very file that was
    probed: a source replaced since then would be built under the old content's id."""
    plan = job.plan
    if not Path(plan.source).is_file():
        raise StepError("the source file is gone (deleted or moved since the build started)")
    if plan.fingerprint and content_fingerprint(plan.source) != plan.fingerprint:
        raise StepError("the source file changed since the build started (its content no longer matches); "
                        "run the build again")
    job.frames, job.geometry_frames = load_clip(plan, job.config.clips.chunk_frames,
                                                geometry_size(plan, job.config.sfm.max_image_size))
    times = plan.timestamps
    problems = decode_problems(plan.source, times[0], times[-1])
    if problems:  # decord conceals damage (and prints it to stderr only): such frames are not labelled
        raise StepError(f"the source is damaged: the decoder reported {len(problems)} error(s) in the clip's "
                        f"frames ({problems[0]})")


def step_sfm(job: ClipJob) -> None:
    """Cameras and sparse points with pycolmap (fwdata.build.sfm), on the clip's frames at the geometry
    size when the source has more pixels than the clip, mapped exactly onto the clip's pixels."""
    frames = job.geometry_frames if job.geometry_frames is not None else job.frames
    sy, sx = job.plan.height / frames.shape[1], job.plan.width / frames.shape[2]  # clip px per SfM px
    opts = job.config.sfm
    if job.config.intrinsics is not None:
        fx, fy, cx, cy = job.config.intrinsics
        K = scale_intrinsics_to_clip(np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]]), job.plan)
        K = np.diag([1 / sx, 1 / sy, 1.0]) @ K
        opts = opts.model_copy(update={"intrinsics": (K[0, 0], K[1, 1], K[0, 2], K[1, 2])})
        if job.config.distortion is not None:  # normalised-coordinate coefficients: the same for the clip
            opts = opts.model_copy(update={"distortion": tuple(job.config.distortion)})
    sfm = run_sfm(frames, opts)
    job.geometry_frames = None
    if (sx, sy) != (1.0, 1.0):
        sfm.notes.append(f"sfm: features found at {frames.shape[2]}x{frames.shape[1]}, cameras mapped to the clip")
    job.sfm = sfm.scaled(sx, sy)


def step_undistort(job: ClipJob) -> None:
    """When the lens distorts: the frames resampled onto a pinhole camera of the same size, and the SfM
    observations and intrinsics with them (fwdata.dataset.lens.Undistortion); the depth follows in
    `step_align`. The written clip, depth, points and cameras are then exactly pinhole."""
    sfm = job.sfm
    if sfm.lens.is_identity:
        return
    u = Undistortion.create(sfm.K, sfm.lens, job.plan.height, job.plan.width)
    job.frames = u.frames(job.frames)
    job.undistortion = u
    job.sfm = dataclasses.replace(sfm, K=u.K, obs_uv=u.pixels(sfm.obs_uv))


def step_depth(job: ClipJob) -> None:
    """Per-frame depth from the model (batched) or the imported prior (fwdata.build.depth). Runs in the
    background next to the cameras (see `BACKGROUND_STEPS`) and stops early when the clip fails."""
    job.depth = estimate_depth(job.frames, job.config.depth, job.plan, should_stop=job.cancel.is_set)


def step_align(job: ClipJob) -> None:
    """Depth on the SfM scale (fwdata.build.align); metric depth makes the clip metric."""
    job.wait("depth")
    if job.undistortion is not None:  # the network saw the distorted frames
        values, valid = job.undistortion.maps(job.depth.values, job.depth.valid)
        job.depth = dataclasses.replace(job.depth, values=values, valid=valid)
    job.aligned = align_depth(job.depth, job.sfm, job.config.align)
    job.depth = None  # the raw prediction is no longer needed
    if not depth_model_info(job.config.depth).random_init:  # random weights carry no information to disagree with
        check_agreement(job.aligned, job.config.align)


def step_points(job: ClipJob) -> None:
    """Cameras in the contract's form and per-pixel world points (fwdata.dataset.store.point_maps)."""
    a, p = job.aligned, job.plan
    job.cameras = CameraFile.from_arrays(a.w2c, job.sfm.K, width=p.width, height=p.height, scale=a.scale,
                                         source_frames=p.source_frames, timestamps=p.timestamps,
                                         registered=[True] * p.num_frames)
    job.points, job.points_valid = point_maps(a.depth, a.valid, job.cameras)


def step_quality(job: ClipJob) -> None:
    """Per-clip quality metrics (fwdata.quality), recorded in metadata.json for the gates."""
    job.quality = measure_quality(job.frames, job.aligned, job.sfm, job.cameras)


def step_write(job: ClipJob) -> None:
    """Atomic write of the sample's files, then its completion marker (fwdata.dataset.store)."""
    record = make_record(job)
    data = SampleData(frames=job.frames, depth=job.aligned.depth, depth_valid=job.aligned.valid, cameras=job.cameras,
                      points=job.points, points_valid=job.points_valid)
    write_sample(job.out, record, data, write_ply=job.config.write_ply)


#: the pipeline, in order: (stage name recorded on failure, function)
STEPS: list[tuple[str, Callable[[ClipJob], None]]] = [
    ("decode", step_decode),
    ("depth", step_depth),
    ("sfm", step_sfm),
    ("undistort", step_undistort),
    ("align", step_align),
    ("points", step_points),
    ("quality", step_quality),
    ("write", step_write),
]

#: steps that run in a background thread, next to the steps after them, until a step needs their
#: result (`ClipJob.wait`): the depth network (on the GPU, or on spare cores) runs while COLMAP works.
#: With `overlap_depth = false` every step runs in turn.
BACKGROUND_STEPS = frozenset({"depth"})

_EXPECTED = (VideoError, SfmError, DepthError, AlignError, ContractError, StepError)


def measure_quality(frames: np.ndarray, aligned: AlignResult, sfm: SfmResult, cameras: CameraFile) -> QualityMetrics:
    K, w2c = cameras.intrinsics_array(), cameras.w2c_array()
    T, H, W = frames.shape[:3]
    fov_h, fov_w = quality.field_of_view_deg(K, H, W)
    path, rot = quality.camera_motion(w2c)
    mv_settings = quality.MultiviewSettings()  # recorded beside the value: validation recomputes it the same way
    mv = mv_settings.measure(aligned.depth, aligned.valid, K, w2c)
    per_frame = aligned.absrel_per_frame
    return QualityMetrics(
        registered_ratio=quality.registered_ratio([f.registered for f in cameras.frames]),
        reprojection_error_px=quality.reprojection_error(aligned.points, sfm.obs_frame, sfm.obs_point, sfm.obs_uv,
                                                         K, w2c),
        num_points3d=int(len(sfm.points)),
        depth_sfm_absrel=_finite_or_none(aligned.absrel),
        depth_sfm_absrel_max_frame=_finite_or_none(float(np.nanmax(per_frame)) if np.isfinite(per_frame).any() else None),
        multiview_consistency=mv,
        multiview_settings=mv_settings,
        focal_uncertainty=sfm.focal_uncertainty,
        focal_spread=sfm.focal_spread,
        fov_h_deg=fov_h,
        fov_w_deg=fov_w,
        path_length=path,
        rotation_deg=rot,
        blur=quality.blur_score(frames),
        brightness=quality.brightness(frames),
        valid_depth_fraction=float(aligned.valid.mean()),
    )


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    return float(x) if x is not None and np.isfinite(x) else None


def split_for(source: str, splits: SplitOptions) -> str:
    """Deterministic split of a source video (by its file name), so all its clips share a split."""
    h = int(hashlib.sha1(Path(source).name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < splits.test:
        return "test"
    if h < splits.test + splits.val:
        return "val"
    return "train"


def depth_source_label(config: BuildConfig, depth_kind: str) -> str:
    d = config.depth
    if d.prior_dir is not None:
        return f"prior ({depth_kind}) from {d.prior_dir}"
    if d.model == "random-tiny":
        return "random-tiny (randomly initialised Depth Anything; not real depth)"
    return f"depth-anything ({depth_kind}): {d.model}"


def source_camera(job: ClipJob) -> SourceCamera:
    """The source camera and lens in source pixels (metadata `source.camera`)."""
    sfm, u = job.sfm, job.undistortion
    K_frames = u.K_lens if u is not None else sfm.K
    K = clip_intrinsics_to_source(K_frames, job.plan)
    lens = sfm.lens
    if job.config.intrinsics is not None:
        model = given_lens(job.config.distortion).model if job.config.distortion is not None else "PINHOLE"
    elif lens.is_identity:
        model = "PINHOLE"
    else:
        model = job.config.sfm.camera_model
    return SourceCamera(model=model, estimated=job.config.intrinsics is None, fx=K[0, 0], fy=K[1, 1], cx=K[0, 2],
                        cy=K[1, 2], k1=lens.k1, k2=lens.k2, p1=lens.p1, p2=lens.p2, k3=lens.k3,
                        pinhole_focal_scale=float(u.K[0, 0] / u.K_lens[0, 0]) if u is not None else 1.0)


def make_record(job: ClipJob) -> SampleRecord:
    p, a = job.plan, job.aligned
    kind = "metric" if a.scale == "metric" else "relative"
    paths = sample_paths(p.sample_id)
    if not job.config.write_ply:
        paths = paths.model_copy(update={"points_ply": None})
    return SampleRecord(
        id=p.sample_id,
        paths=paths,
        num_frames=p.num_frames,
        height=p.height,
        width=p.width,
        fps=p.clip_fps,
        scale=a.scale,
        scale_source=a.scale_source,
        depth_source=depth_source_label(job.config, kind),
        source=p.source_ref().model_copy(update={"camera": source_camera(job)}),
        split=split_for(p.source, job.config.splits),
        quality=job.quality,
        notes=list(job.sfm.notes) + list(a.notes),
        provenance=SampleProvenance(tool_version=__version__, options=recorded_options(job.config),
                                    models=run_models(job.config)),
    )


@dataclass
class ClipOutcome:
    """What happened to one clip (sent back from a worker)."""

    sample_id: str
    source: str
    clip_start: int
    ok: bool
    stage: str = ""
    reason: str = ""
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def process_clip(plan: ClipPlan, config: BuildConfig, out: Union[str, Path]) -> ClipOutcome:
    """Run every step on one clip. Never raises: a failing step gives a failed outcome with its stage."""
    job = ClipJob(plan=plan, config=config, out=Path(out))
    t_start = time.perf_counter()
    with clip_threads(config.threads), ThreadPoolExecutor(max_workers=1, thread_name_prefix="fwdata-bg") as background:
        for stage, fn in STEPS:
            if stage in BACKGROUND_STEPS and config.overlap_depth:
                job.pending[stage] = background.submit(_timed, fn, job)
                continue
            t0 = time.perf_counter()
            try:
                fn(job)
            except BaseException as e:
                job.cancel.set()  # background steps stop at their next checkpoint
                for name in list(job.pending):
                    try:
                        job.wait(name)
                    except BackgroundStepError:
                        pass
                if isinstance(e, BackgroundStepError):
                    stage, e = e.stage, e.error
                if isinstance(e, KeyboardInterrupt):
                    raise
                return _failed(plan, stage, _reason(e), t_start, job.timings)
            job.timings[stage] = time.perf_counter() - t0
    return ClipOutcome(plan.sample_id, plan.source, plan.start_frame, True, seconds=time.perf_counter() - t_start,
                       timings=job.timings)


def _timed(fn: Callable[[ClipJob], None], job: ClipJob) -> float:
    t0 = time.perf_counter()
    fn(job)
    return time.perf_counter() - t0


def _reason(e: BaseException) -> str:
    """One line for a failed step: the message of errors we expect, the location of the others."""
    if isinstance(e, _EXPECTED):
        return _one_line(str(e))
    if isinstance(e, MemoryError):
        return "out of memory; use fewer --workers or smaller clips"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ("disk full while writing the sample (nothing of it was kept); free space and run the same "
                "command again: finished clips are kept")
    if isinstance(e, OSError) and e.errno == errno.EIO:
        return f"writing the sample failed ({e.strerror or e}); nothing of it was kept"
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"unexpected {type(e).__name__}: {_one_line(str(e))}{where}"


def _failed(plan: ClipPlan, stage: str, reason: str, t_start: float, timings: dict) -> ClipOutcome:
    return ClipOutcome(plan.sample_id, plan.source, plan.start_frame, False, stage=stage, reason=reason,
                       seconds=time.perf_counter() - t_start, timings=dict(timings))


def _one_line(s: str) -> str:
    s = " ".join(s.strip().split())
    return s[:500] if s else "no message"


# --------------------------------------------------------------------------- the build


class BuildProgress(Protocol):
    """What the build reports while it runs (the CLI draws a progress bar from it).

    A progress object may also have ``in_flight(n)``: it then gets the number of clips in flight (handed
    to the executor's workers, not yet finished) whenever it changes (`fwdata.build.executors.OnFlight`).
    """

    def start(self, total: int, skipped: int) -> None: ...

    def clip_done(self, outcome: ClipOutcome) -> None: ...

    def finish(self) -> None: ...


@dataclass
class BuildSummary:
    out: Path
    num_videos: int
    num_clips: int
    built: int
    skipped: int
    failures: list[FailedInput]
    metadata: DatasetMetadata
    seconds: float
    clip_seconds: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def plan_inputs(inputs: Sequence[Union[str, Path]], clips: ClipOptions,
                exclude: Optional[Path] = None) -> tuple[list[VideoPlan], list[str]]:
    """Plans of every input video (probing each), and the input paths that do not exist.

    Files inside `exclude` (the output dataset) are never inputs: `build same/ --out same/` must not
    build clips of its own clips."""
    files, missing = input_videos(inputs, exclude)
    return [plan_video(f, clips) for f in files], missing


def input_videos(inputs: Sequence[Union[str, Path]], exclude: Optional[Path] = None) -> tuple[list[Path], list[str]]:
    """The video files a build takes from `inputs` (files and folders), none inside `exclude` (the
    output dataset), and the input paths that do not exist."""
    files, missing = find_videos(inputs)
    if exclude is not None:
        files = [f for f in files if not is_inside(f, exclude)]
    return files, missing


#: the clip options that decide which clips a dataset holds; a dataset is built with one set of them
CLIP_DEFINING = ("num_frames", "height", "width", "orientation", "stride", "fps", "max_clips_per_video", "clip_gap")


def check_clip_options(out: Path, config: BuildConfig) -> None:
    """Refuse to add clips cut another way to a dataset (other T, size, stride ...): the two sets would
    overlap silently. The dataset's options come from its samples' provenance (or its metadata)."""
    previous = None
    for rec in finished_records(out):
        if rec.provenance is not None and "clips" in rec.provenance.options:
            previous = rec.provenance.options["clips"]
            break
    if previous is None:
        try:
            meta = load_metadata(out)
            previous = meta.provenance.options.get("clips") if meta.samples else None
        except (ContractError, OSError, ValueError):
            previous = None
    if not previous:
        return
    now = config.clips.model_dump(mode="json")
    differ = [f"{k} {previous.get(k)!r} -> {now[k]!r}" for k in CLIP_DEFINING if k in previous and previous[k] != now[k]]
    if differ:
        raise ConfigError(f"{out} holds clips cut with other options ({', '.join(differ)}); adding these would mix "
                          f"overlapping clips: build into another --out, or use the dataset's options")


def build_dataset(inputs: Sequence[Union[str, Path]], out: Union[str, Path], config: BuildConfig,
                  force: bool = False, progress: Optional[BuildProgress] = None,
                  command: str = "") -> BuildSummary:
    """Build (or continue building) the dataset at `out` from video files and folders.

    Raises ConfigError / DepthModelError for problems that stop the build before it starts (no
    inputs, unloadable depth model). Everything that goes wrong with one input or clip is recorded
    in the summary's failures and in metadata.json.
    """
    t0 = time.time()
    out = Path(out)
    try:
        check_output_folder(out)  # before any work: a bad --out is found in a second, not after every clip
    except OSError as e:
        raise ConfigError(str(e)) from None
    if config.executor == "ray":
        import_ray()  # ConfigError with the install line, before any work
    check_model_available(config.depth)
    plans, missing = plan_inputs(inputs, config.clips, exclude=out)
    if missing:
        raise ConfigError(f"input not found: {', '.join(missing)}")
    if not plans:
        raise ConfigError(f"no video files found in {', '.join(map(str, inputs))}")
    try:
        with write_lock(out):
            return _build_locked(out, plans, config, force, progress, command, t0)
    except DatasetBusy as e:
        raise ConfigError(str(e)) from None


def _build_locked(out: Path, plans: list[VideoPlan], config: BuildConfig, force: bool,
                  progress: Optional[BuildProgress], command: str, t0: float) -> BuildSummary:
    """The build proper, while this process holds the dataset's write lock."""
    check_clip_options(out, config)
    clean_stale_temp_files(out)

    failures: list[FailedInput] = [FailedInput(source=p.source, reason=p.error, stage=p.stage)
                                   for p in plans if p.error]
    clips = [c for p in plans for c in p.clips]
    ids = [c.sample_id for c in clips]
    todo = [c for c in clips if force or not is_finished(out, c.sample_id)]
    skipped = len(clips) - len(todo)
    if progress:
        progress.start(len(clips), skipped)

    outcomes: list[ClipOutcome] = []
    config = _with_threads(config)

    def on_outcome(o: ClipOutcome) -> None:  # in this process, whatever the executor
        _after_clip(out, o, force)
        outcomes.append(o)
        if progress:
            progress.clip_done(o)

    make_executor(config).run(todo, config, out, on_outcome, on_flight=getattr(progress, "in_flight", None))

    by_id = {o.sample_id: o for o in outcomes}
    for plan in clips:  # failures in input order, whatever order the workers finished in
        o = by_id.get(plan.sample_id)
        if o is not None and not o.ok:
            failures.append(FailedInput(source=plan.source, reason=o.reason, stage=o.stage,
                                        clip_start=plan.start_frame))
    try:
        meta = assemble_metadata(out, config, failures, command, built=sum(o.ok for o in outcomes), skipped=skipped,
                                 inputs_seen=[p.source for p in plans])
    except OSError as e:
        raise ConfigError(f"cannot write {out / 'metadata.json'}: {e.strerror or e}; free space and run the same "
                          f"command again (finished clips are kept)") from None
    if progress:
        progress.finish()
    return BuildSummary(out=out, num_videos=len(plans), num_clips=len(clips), built=sum(o.ok for o in outcomes),
                        skipped=skipped, failures=failures, metadata=meta, seconds=time.time() - t0,
                        clip_seconds=[o.seconds for o in outcomes if o.ok])


def _with_threads(config: BuildConfig) -> BuildConfig:
    """SfM threads: the user's choice, or (0) the clip's `threads`; never derived from the machine."""
    if config.sfm.num_threads != 0:
        return config
    sfm = config.sfm.model_copy(update={"num_threads": config.threads})
    return config.model_copy(update={"sfm": sfm})


def resolve_workers(workers: int, num_clips: int) -> int:
    """Worker processes to start: `workers` (0 = one per core), at most one per clip, at least 1."""
    n = workers if workers > 0 else (os.cpu_count() or 1)
    return max(1, min(n, num_clips))


def _after_clip(out: Path, outcome: ClipOutcome, force: bool) -> None:
    """A forced redo that failed must not leave the old sample behind as if it were current."""
    if force and not outcome.ok:
        remove_sample(out, outcome.sample_id)


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("numpy", "torch", "transformers", "pycolmap", "open3d", "decord", "av", "pydantic"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


#: options that say how a build ran, not what it made: left out of provenance, so that a dataset's
#: bytes do not depend on them
RUN_OPTIONS = frozenset({"workers", "executor", "ray_address", "ray_max_retries", "ray_gpus", "ray_memory_gb"})


def recorded_options(config: BuildConfig) -> dict[str, Any]:
    """The build options written to provenance: everything that shapes the data (not `RUN_OPTIONS`)."""
    return config.model_dump(mode="json", exclude=set(RUN_OPTIONS))


def run_models(config: BuildConfig) -> list[ModelInfo]:
    """The models and tools that make a sample with these options (recorded per sample and per dataset)."""
    import pycolmap

    return [depth_model_info(config.depth),
            ModelInfo(role="cameras", name=f"pycolmap {config.sfm.mapper} mapping", revision=pycolmap.__version__),
            ModelInfo(role="video encoding", name="libx264 " + " ".join(f"{k}={v}" for k, v in X264_OPTIONS.items()),
                      revision=f"av {package_versions().get('av', 'unknown')}")]


def previous_history(out: Path) -> tuple[list[BuildRun], list[FailedInput]]:
    """The runs and failures of an existing dataset's metadata.json (empty when there is none or it is
    unreadable)."""
    try:
        meta = load_metadata(out)
    except (ContractError, OSError, ValueError):
        return [], []
    return meta.provenance.runs, meta.failures


def assemble_metadata(out: Path, config: BuildConfig, failures: list[FailedInput], command: str,
                      built: int = 0, skipped: int = 0, inputs_seen: Sequence[str] = ()) -> DatasetMetadata:
    """metadata.json from the completion markers (every finished sample in `out`) and the history:
    earlier runs and their failures from the existing metadata.json, then this run.

    `failures` describe every input the dataset has seen: an earlier failure stays until a run sees
    that input again (`inputs_seen`: the sources this run planned), whose outcome then replaces it.
    """
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs, old_failures = previous_history(out)
    this_run = len(runs)
    seen = set(inputs_seen)
    failures = ([f for f in old_failures if f.source not in seen]
                + [f.model_copy(update={"run": this_run}) for f in failures])
    runs = runs + [BuildRun(created=created, command=command, tool_version=__version__, built=built,
                            skipped=skipped, failed=sum(f.run == this_run for f in failures))]
    records = finished_records(out)
    models = run_models(config)
    for r in records:  # the dataset lists every model that made one of its samples (a rerun may differ)
        for m in (r.provenance.models if r.provenance else []):
            if m not in models:
                models.append(m)
    meta = DatasetMetadata(
        name=config.name or out.resolve().name,
        provenance=Provenance(
            tool_version=__version__,
            created=created,
            command=command,
            options=recorded_options(config),
            models=models,
            packages=package_versions(),
            runs=runs,
        ),
        samples=records,
        failures=failures,
    )
    return write_metadata(out, meta)
