"""Video files: probe and decode with decord, encode H.264 mp4 with PyAV.

Frames are uint8 RGB arrays (T, H, W, 3). decord reads frames by index without decoding the
whole file into memory, which is what clip sampling needs; PyAV writes the clips.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np


class VideoError(ValueError):
    """A video that cannot be read or written; the message names the file."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


#: blocks of `FINGERPRINT_BLOCK` bytes read by `content_fingerprint`, evenly spaced from start to end
FINGERPRINT_BLOCKS = 33
FINGERPRINT_BLOCK = 64 * 1024


def content_fingerprint(path: Union[str, Path]) -> str:
    """A fingerprint of a file's content, cheap for any size: BLAKE2b of the size and 33 blocks of 64 KiB
    at evenly spaced offsets (the whole file when it is smaller than that, about 2 MiB).

    Written by hand because no library offers a sampled content hash; a full hash of every source
    video would read terabytes on a large build. Two different videos agreeing on 2 MiB spread over
    the file (headers, both ends, 31 points between) is not a case real footage produces.
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK:
            h.update(f.read())
        else:
            last = size - FINGERPRINT_BLOCK
            for i in range(FINGERPRINT_BLOCKS):
                f.seek(last * i // (FINGERPRINT_BLOCKS - 1))
                h.update(f.read(FINGERPRINT_BLOCK))
    return h.hexdigest()


def _reader(path: Union[str, Path], data: Optional[bytes] = None):
    """A decord reader of the file `path`, or of the mp4 bytes `data` (then `path` only names them in errors)."""
    import decord

    if data is None:
        path = Path(path)
        if not path.is_file():
            raise VideoError(f"{path}: file not found")
    if (len(data) if data is not None else path.stat().st_size) == 0:
        raise VideoError(f"{path}: file is empty")
    try:
        return decord.VideoReader(str(path) if data is None else io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # decord raises DECORDError / RuntimeError with long C++ traces
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise VideoError(f"{path}: not a readable video ({first})") from None


def probe(path: Union[str, Path]) -> VideoInfo:
    """Frame count, fps and size of a video. Raises VideoError for unreadable or empty videos."""
    vr = _reader(path)
    n = len(vr)
    if n == 0:
        raise VideoError(f"{path}: video has no frames")
    try:
        h, w = vr[0].shape[:2]
    except Exception:  # decord: "Failed to seek_accurate to frame 0" for text and other non-video files
        raise VideoError(f"{path}: not a readable video (no frame can be decoded: not a video file, or "
                         f"damaged)") from None
    fps = float(vr.get_avg_fps())
    if not np.isfinite(fps) or fps <= 0:
        raise VideoError(f"{path}: video reports an invalid frame rate ({fps})")
    return VideoInfo(path=str(path), num_frames=n, fps=fps, width=int(w), height=int(h))


def frame_times(path: Union[str, Path], indices: Sequence[int]) -> list[float]:
    """Presentation times (seconds) of the given frames, as the container stores them (so a variable
    frame rate video gets its real times, not index / fps). Raises VideoError for unreadable videos."""
    vr = _reader(path)
    try:
        return [float(t) for t in vr.get_frame_timestamp(list(indices))[:, 0]]
    except Exception as e:
        raise VideoError(f"{path}: cannot read frame times ({str(e).strip().splitlines()[0][:200]})") from None


def decode_problems(path: Union[str, Path], first_time: float, last_time: float) -> list[str]:
    """Errors the FFmpeg decoder reports while decoding the frames between two presentation times
    (seconds): damage the decoder conceals in what decord returns. Empty for a clean stretch.

    A second decode (PyAV, from the keyframe before `first_time`), because decord only prints these
    errors to stderr. Damage that still decodes without a complaint (a flipped byte inside entropy-coded
    data often does) cannot be seen here.
    """
    import av
    import av.logging

    problems: list[str] = []
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture() as logs:
            try:
                with av.open(str(path)) as container:
                    stream = container.streams.video[0]
                    if first_time > 0 and stream.time_base:
                        container.seek(int(first_time / stream.time_base), stream=stream, backward=True)
                    for frame in container.decode(stream):
                        if frame.time is not None and frame.time > last_time + 1e-6:
                            break
            except av.error.FFmpegError as e:
                problems.append(" ".join(str(e).split())[:200])
        problems += [f"{name}: {' '.join(msg.split())}" for level, name, msg in logs
                     if level is not None and level <= av.logging.ERROR]
    finally:
        av.logging.set_level(previous)
    return problems


def read_frames(path: Union[str, Path], indices: Sequence[int] | None = None,
                data: Optional[bytes] = None) -> np.ndarray:
    """Decode frames (all, or the given indices) as uint8 RGB (T, H, W, 3).

    `data`: the mp4's bytes (e.g. a shard member), decoded in memory; `path` then only names it in errors.
    """
    vr = _reader(path, data)
    if indices is None:
        indices = range(len(vr))
    indices = list(indices)
    if not indices:
        raise VideoError(f"{path}: no frames requested")
    if max(indices) >= len(vr) or min(indices) < 0:
        raise VideoError(f"{path}: frame index out of range (video has {len(vr)} frames)")
    try:
        return vr.get_batch(indices).asnumpy()
    except Exception as e:
        raise VideoError(f"{path}: decoding failed ({str(e).strip().splitlines()[0][:200]})") from None


#: libx264 settings of every clip we write (see `write_mp4`); recorded in each sample's provenance
X264_OPTIONS = {"preset": "medium", "threads": "1", "x264-params": "asm=0:threads=1:lookahead-threads=1"}


def write_mp4(path: Union[str, Path], frames: Iterable[np.ndarray], fps: float, crf: int = 18) -> None:
    """Encode uint8 RGB frames (H, W, 3), H and W even, as H.264 (yuv420p) mp4.

    The same frames give the same bytes on every run and every x86-64 / arm64 CPU of one PyAV
    build: x264 runs on one thread and without its hand-written assembly (`asm=0`). Its SIMD
    kernels are picked by CPU at run time and some of them (rate control, macroblock tree) work in
    floating point only to a tolerance, so with assembly the bytes vary between CPUs and were seen
    to vary inside one process. The plain C path costs about 5x the encode time (measured in
    docs/BUILD.md, "Determinism"), a few percent of a clip's build time, and gives the same size.
    """
    import av
    from fractions import Fraction

    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = None
        for frame in frames:
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            if stream is None:
                h, w = frame.shape[:2]
                if h % 2 or w % 2:
                    raise VideoError(f"{path}: frame size {w}x{h} must be even for yuv420p")
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height = w, h
                stream.pix_fmt = "yuv420p"
                stream.thread_count = 1
                stream.options = X264_OPTIONS | {"crf": str(crf)}
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise VideoError(f"{path}: no frames to write")
        for packet in stream.encode():
            container.mux(packet)


def read_video(path: Union[str, Path]) -> tuple[VideoInfo, np.ndarray]:
    """Probe and decode every frame with one reader: (VideoInfo, frames uint8 RGB (T, H, W, 3)).

    Raises VideoError for unreadable, empty or undecodable videos (used by validation, which must
    decode every frame anyway).
    """
    vr = _reader(path)
    n = len(vr)
    if n == 0:
        raise VideoError(f"{path}: video has no frames")
    fps = float(vr.get_avg_fps())
    if not np.isfinite(fps) or fps <= 0:
        raise VideoError(f"{path}: video reports an invalid frame rate ({fps})")
    try:
        frames = vr.get_batch(list(range(n))).asnumpy()
    except Exception as e:
        raise VideoError(f"{path}: decoding failed ({str(e).strip().splitlines()[0][:200]})") from None
    return VideoInfo(path=str(path), num_frames=n, fps=fps, width=int(frames.shape[2]), height=int(frames.shape[1])), frames
