"""Probe videos and plan clips: which source frames each clip takes, and how they are cropped and resized.

A source video yields one or more clips of ``T = 4k + 1`` frames (the Wan VAE frame count). Frames
are taken every ``stride`` source frames (given directly, or derived from a target frame rate),
consecutive clips do not overlap, and each frame is scaled to cover the target size and then
centre-cropped to it (sides are multiples of 16). The crop (in source pixels) and the scale are
recorded in the sample's `SourceRef`, so clip pixels and intrinsics map back to the source:

    u_src = crop_x + (u_clip) / sx        v_src = crop_y + (v_clip) / sy
    K_src = diag(1/sx, 1/sy, 1) @ K_clip + [crop_x, crop_y] on the principal point

(both with pixel centres at +0.5). Frames are decoded in small chunks and resized at once, so only
the clip at its final size is held in memory, never the whole video.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fwdata.dataset.contract import SourceRef, make_sample_id
from fwdata.dataset.video import VideoError, VideoInfo, content_fingerprint, frame_times, probe, read_frames

#: file suffixes `fwdata build` picks up when given a folder
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")


class ClipOptions(BaseModel):
    """How clips are cut from source videos (`[clips]` in a build preset)."""

    model_config = ConfigDict(extra="forbid")

    num_frames: int = Field(81, ge=5, description="frames per clip T; must be 4k+1 (Wan VAE)")
    height: int = Field(336, ge=16, description="clip height H in pixels, a multiple of 16")
    width: int = Field(592, ge=16, description="clip width W in pixels, a multiple of 16")
    orientation: Literal["auto", "fixed"] = Field(
        "auto", description="auto: swap H and W for portrait sources so the crop keeps most of the picture"
    )
    stride: int = Field(0, ge=0, description="source frames between clip frames; 0 = derive from `fps`")
    fps: float = Field(16.0, gt=0, description="target clip frame rate when stride is 0 (stride = round(src_fps / fps))")
    max_clips_per_video: int = Field(0, ge=0, description="most clips taken from one video; 0 = as many as fit")
    clip_gap: int = Field(0, ge=0, description="source frames skipped between consecutive clips")
    chunk_frames: int = Field(16, ge=1, description="frames decoded at once (bounds memory for large sources)")

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, v: int) -> int:
        if (v - 1) % 4:
            raise ValueError(f"num_frames {v} must be 4k+1 (e.g. 33, 49, 81)")
        return v

    @model_validator(mode="after")
    def _multiples_of_16(self) -> "ClipOptions":
        if self.height % 16 or self.width % 16:
            raise ValueError(f"clip size {self.height}x{self.width} (HxW) must have sides that are multiples of 16")
        return self


class ClipError(ValueError):
    """A video that yields no clip (too short, unreadable). The message is one line a user can act on."""


@dataclass(frozen=True)
class ClipPlan:
    """One clip to build: which source frames, at what size, and its stable sample id."""

    source: str  # path as given
    source_size: int
    info: VideoInfo
    start_frame: int
    stride: int
    num_frames: int
    height: int
    width: int
    crop_xywh: tuple[float, float, float, float]
    scale: tuple[float, float]
    sample_id: str
    rotation_deg: int = 0
    fingerprint: str = ""  # content fingerprint of the source when it was probed (fwdata.dataset.video)
    frame_times: tuple[float, ...] = ()  # presentation times of the clip's source frames (empty: index / fps)

    @property
    def source_frames(self) -> list[int]:
        return [self.start_frame + i * self.stride for i in range(self.num_frames)]

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each clip frame in the source: its presentation time (variable frame rates
        included), or index / fps when the container gave none."""
        if len(self.frame_times) == self.num_frames:
            return list(self.frame_times)
        return [f / self.info.fps for f in self.source_frames]

    @property
    def clip_fps(self) -> float:
        return self.info.fps / self.stride

    def source_ref(self) -> SourceRef:
        return SourceRef(
            path=self.source, size_bytes=self.source_size, fps=self.info.fps, num_frames=self.info.num_frames,
            width=self.info.width, height=self.info.height, start_frame=self.start_frame, stride=self.stride,
            crop_xywh=self.crop_xywh, resize_scale=self.scale, rotation_deg=self.rotation_deg,
            fingerprint=self.fingerprint or None,
        )


@dataclass
class VideoPlan:
    """The clips of one input video, or why it has none."""

    source: str
    clips: list[ClipPlan] = field(default_factory=list)
    error: Optional[str] = None  # set when the video has no clip
    stage: str = "probe"


def find_videos(inputs: Sequence[Union[str, Path]]) -> tuple[list[Path], list[str]]:
    """Expand files and folders into a sorted list of video files.

    Folders are searched recursively for `VIDEO_SUFFIXES`; files given explicitly are kept whatever
    their suffix (a non-video file then fails at probe with a reason). Returns (files, missing paths).
    """
    files: list[Path] = []
    missing: list[str] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in VIDEO_SUFFIXES
                                and not any(part.startswith(".") for part in q.relative_to(p).parts)))
        elif p.exists():
            files.append(p)
        else:
            missing.append(str(p))
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, missing


def probe_rotation(path: Union[str, Path]) -> int:
    """Display rotation (degrees, counter-clockwise) stored in the container; decord applies it when decoding.

    0 when absent or when PyAV cannot tell.
    """
    try:
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                return 0
            for frame in container.decode(video=0):
                return int(round(getattr(frame, "rotation", 0) or 0)) % 360
    except Exception:
        return 0
    return 0


def output_size(info: VideoInfo, opts: ClipOptions) -> tuple[int, int]:
    """(H, W) of the clips of a source: the preset size, swapped for portrait sources when orientation=auto."""
    h, w = opts.height, opts.width
    if opts.orientation == "auto" and (info.height > info.width) != (h > w) and h != w:
        h, w = w, h
    return h, w


def crop_and_scale(src_h: int, src_w: int, out_h: int, out_w: int) -> tuple[tuple[float, float, float, float], tuple[float, float]]:
    """Centre crop of the source with the output's aspect ratio, and the scale from crop to output.

    Returns ((x0, y0, crop_w, crop_h) in source pixels, (sx, sy) output pixels per source pixel).
    The crop keeps the whole of the limiting side; sx == sy (square pixels stay square).
    """
    s = max(out_w / src_w, out_h / src_h)  # scale to cover the output
    crop_w, crop_h = out_w / s, out_h / s
    x0, y0 = (src_w - crop_w) / 2.0, (src_h - crop_h) / 2.0
    return (x0, y0, crop_w, crop_h), (out_w / crop_w, out_h / crop_h)


def clip_stride(info: VideoInfo, opts: ClipOptions) -> int:
    if opts.stride > 0:
        return opts.stride
    return max(1, int(round(info.fps / opts.fps)))


@contextlib.contextmanager
def _silence_native_stderr():
    """Hide FFmpeg's own messages (printed by decord's C code) while probing: the reason is recorded instead."""
    fd = 2  # the process's stderr, whatever Python's sys.stderr currently is
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


@dataclass(frozen=True)
class ClipSchedule:
    """Where the clips of one video start and at what size: the one clip-planning rule, used by the
    build (`plan_video`) and by `fwdata doctor`'s estimate."""

    stride: int
    span: int  # source frames one clip covers, (T - 1) * stride + 1
    starts: tuple[int, ...]
    height: int
    width: int
    error: Optional[str] = None  # why the video has no clip


def schedule_clips(info: VideoInfo, opts: ClipOptions) -> ClipSchedule:
    """The clips a probed video yields under `opts` (no decoding): stride from the options or the frame
    rate, consecutive non-overlapping clips `clip_gap` frames apart, at most `max_clips_per_video`."""
    stride = clip_stride(info, opts)
    span = (opts.num_frames - 1) * stride + 1
    out_h, out_w = output_size(info, opts)
    if info.num_frames < span:
        return ClipSchedule(stride, span, (), out_h, out_w,
                            error=f"too short: {info.num_frames} frames, a clip of {opts.num_frames} frames at "
                                  f"stride {stride} needs {span}; lower --frames or --stride")
    starts: list[int] = []
    start = 0
    while start + span <= info.num_frames:
        starts.append(start)
        if opts.max_clips_per_video and len(starts) >= opts.max_clips_per_video:
            break
        start += span + opts.clip_gap
    return ClipSchedule(stride, span, tuple(starts), out_h, out_w)


def probe_for_plan(path: Union[str, Path]) -> tuple[Optional[VideoInfo], Optional[str]]:
    """Probe a video as the build does: (info, None), or (None, the one-line reason it cannot be read)."""
    path = Path(path)
    try:
        with _silence_native_stderr():
            return probe(path), None
    except VideoError as e:
        return None, _video_reason(str(e), path)
    except Exception as e:  # pragma: no cover - decoder crashes we did not foresee
        return None, f"cannot probe the video ({type(e).__name__}: {e})"


def plan_video(path: Union[str, Path], opts: ClipOptions) -> VideoPlan:
    """Probe one video and plan its clips. Never raises for a bad video: the plan carries the reason."""
    path = Path(path)
    plan = VideoPlan(source=str(path))
    info, plan.error = probe_for_plan(path)
    if info is None:
        return plan
    schedule = schedule_clips(info, opts)
    if schedule.error:
        plan.error = schedule.error
        return plan
    stride, out_h, out_w = schedule.stride, schedule.height, schedule.width
    crop, scale = crop_and_scale(info.height, info.width, out_h, out_w)
    size = path.stat().st_size
    fingerprint = content_fingerprint(path)
    rotation = probe_rotation(path)
    try:  # presentation times of every source frame, read once for all clips of the video
        all_times = frame_times(path, range(info.num_frames))
    except VideoError:
        all_times = []
    for start in schedule.starts:
        sid = make_sample_id(path.name, fingerprint, start, stride, opts.num_frames, out_h, out_w)
        idx = [start + i * stride for i in range(opts.num_frames)]
        times = tuple(all_times[i] for i in idx) if all_times else ()
        plan.clips.append(ClipPlan(source=str(path), source_size=size, info=info, start_frame=start, stride=stride,
                                   num_frames=opts.num_frames, height=out_h, width=out_w, crop_xywh=crop, scale=scale,
                                   sample_id=sid, rotation_deg=rotation, fingerprint=fingerprint, frame_times=times))
    return plan


def _video_reason(message: str, path: Path) -> str:
    """The VideoError message without the leading path (FailedInput already names the source)."""
    prefix = f"{path}: "
    message = message[len(prefix):] if message.startswith(prefix) else message
    message = re.sub(r"\[\d\d:\d\d:\d\d\] \S+\.(cc|h):\d+: ", "", message)  # decord's log prefix
    if "av_read_frame failed" in message:
        return "not a readable video (damaged or truncated: decoding failed)"
    if "cannot find video stream" in message:
        return "no video stream (an audio-only file, or not a video)"
    if "Error reading" in message or "ERROR opening" in message:  # decord's wording for "FFmpeg could not open it"
        return "not a readable video (not a video file, or damaged / truncated)"
    return message.replace(str(path), path.name)


def resize_frame(frame: np.ndarray, crop_xywh: tuple[float, float, float, float], out_h: int, out_w: int) -> np.ndarray:
    """Crop (fractional box, source pixels) and resize one uint8 RGB frame to (out_h, out_w, 3)."""
    from PIL import Image

    x0, y0, cw, ch = crop_xywh
    if frame.shape[:2] == (out_h, out_w) and (x0, y0, cw, ch) == (0.0, 0.0, float(out_w), float(out_h)):
        return np.ascontiguousarray(frame)
    img = Image.fromarray(frame)
    resample = Image.Resampling.BICUBIC if cw < out_w else Image.Resampling.LANCZOS  # up- vs down-scaling
    out = img.resize((out_w, out_h), resample=resample, box=(x0, y0, x0 + cw, y0 + ch))
    return np.asarray(out)


def iter_clip_frames(plan: ClipPlan, chunk_frames: int = 16,
                     sizes: Optional[Sequence[tuple[int, int]]] = None) -> Iterator[list[np.ndarray]]:
    """Decode the clip's source frames in chunks; yield each frame cropped and resized to every
    (height, width) of `sizes` (default: the clip's own size), as a list of (h,w,3) uint8."""
    sizes = [(plan.height, plan.width)] if sizes is None else list(sizes)
    idx = plan.source_frames
    for a in range(0, len(idx), chunk_frames):
        chunk = read_frames(plan.source, idx[a:a + chunk_frames])
        if chunk.ndim != 4 or chunk.shape[-1] != 3:
            raise VideoError(f"{plan.source}: decoded frames have shape {chunk.shape}, expected (n, H, W, 3)")
        if chunk.shape[1:3] != (plan.info.height, plan.info.width):
            raise VideoError(f"{plan.source}: frame size changed inside the video "
                             f"({chunk.shape[2]}x{chunk.shape[1]} vs {plan.info.width}x{plan.info.height})")
        for f in chunk:
            yield [resize_frame(f, plan.crop_xywh, h, w) for h, w in sizes]


def geometry_size(plan: ClipPlan, max_side: int) -> Optional[tuple[int, int]]:
    """(height, width) at which to find features: the clip's crop of the source at up to `max_side`
    pixels on the long side, when that is more than the clip has; None = the clip's own size."""
    cw, ch = plan.crop_xywh[2], plan.crop_xywh[3]
    long_clip = max(plan.height, plan.width)
    target = min(max(cw, ch), max_side)
    if max_side <= 0 or target <= long_clip * 1.05:  # less than 5 % more pixels along a side: not worth it
        return None
    s = target / max(cw, ch)
    return int(round(ch * s)), int(round(cw * s))


def load_clip(plan: ClipPlan, chunk_frames: int = 16,
              geometry: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """All frames of a clip at its final size, (T, H, W, 3) uint8, and (with `geometry` = (h, w)) the
    same frames at that size for SfM, from one decode (streamed: only the outputs are held)."""
    sizes = [(plan.height, plan.width)] + ([geometry] if geometry else [])
    frames = np.empty((plan.num_frames, plan.height, plan.width, 3), np.uint8)
    big = np.empty((plan.num_frames, *geometry, 3), np.uint8) if geometry else None
    n = 0
    for i, outs in enumerate(iter_clip_frames(plan, chunk_frames, sizes)):
        frames[i] = outs[0]
        if big is not None:
            big[i] = outs[1]
        n += 1
    if n != plan.num_frames:
        raise VideoError(f"{plan.source}: decoded {n} of {plan.num_frames} frames")
    return frames, big


def scale_intrinsics_to_clip(K_src: np.ndarray, plan: ClipPlan) -> np.ndarray:
    """Intrinsics of the source video (pixels) -> intrinsics of the clip (the crop and resize applied)."""
    x0, y0, _, _ = plan.crop_xywh
    sx, sy = plan.scale
    K = np.array(K_src, dtype=np.float64).copy()
    K[0, 2] -= x0
    K[1, 2] -= y0
    K[0, :] *= sx
    K[1, :] *= sy
    return K


def clip_intrinsics_to_source(K_clip: np.ndarray, plan: ClipPlan) -> np.ndarray:
    """Inverse of `scale_intrinsics_to_clip`: intrinsics of the clip (pixels) -> of the source video."""
    x0, y0, _, _ = plan.crop_xywh
    sx, sy = plan.scale
    K = np.array(K_clip, dtype=np.float64).copy()
    K[0, :] /= sx
    K[1, :] /= sy
    K[0, 2] += x0
    K[1, 2] += y0
    return K


def describe_plan(plans: Sequence[VideoPlan]) -> str:
    n_clips = sum(len(p.clips) for p in plans)
    n_bad = sum(1 for p in plans if p.error)
    from fwdata.textout import plural

    return (f"{plural(len(plans), 'video')} -> {plural(n_clips, 'clip')}"
            + (f" ({plural(n_bad, 'video')} without clips)" if n_bad else ""))

