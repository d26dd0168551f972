"""What deterministic encoding costs: libx264 with and without its assembly, size and time.

    python tests/benchmarks/bench_encode.py [VIDEO ...]

For each video (default: a rendered 81-frame 336x592 clip and the real clips in shared/data/real,
cropped and resized to 336x592 as a build does), encodes the clip's frames with the settings
`fwdata build` uses (`fwdata.dataset.video.X264_OPTIONS`, `asm=0`) and with x264's default assembly
(the baseline, what a plain PyAV/ffmpeg script does), three times each, and prints the encode time
(best of three), the file size, PSNR of the decoded clip against its frames, and whether repeated
encodes gave identical bytes.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fwdata.dataset import video
from fwdata.build.clips import crop_and_scale, resize_frame

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"
H, W, T = 336, 592, 81


def clip_frames(path: Path) -> np.ndarray:
    frames = video.read_frames(path)[:T]
    crop, _ = crop_and_scale(frames.shape[1], frames.shape[2], H, W)
    return np.stack([resize_frame(f, crop, H, W) for f in frames])


def rendered_clip() -> np.ndarray:
    from fwdata.synth import render as synth

    clip = synth.make_clip(0, "orbit", num_frames=T, height=H, width=W)
    return clip.frames


def encode(frames: np.ndarray, params: str) -> tuple[float, int, float, set[str]]:
    opts = dict(video.X264_OPTIONS, **{"x264-params": params})
    saved, video.X264_OPTIONS = video.X264_OPTIONS, opts
    times, hashes = [], set()
    try:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "clip.mp4"
            for _ in range(3):
                t0 = time.perf_counter()
                video.write_mp4(out, frames, fps=16)
                times.append(time.perf_counter() - t0)
                hashes.add(hashlib.sha256(out.read_bytes()).hexdigest())
            decoded = video.read_frames(out).astype(np.float64)
            size = out.stat().st_size
    finally:
        video.X264_OPTIONS = saved
    psnr = 10 * np.log10(255.0 ** 2 / np.mean((decoded - frames) ** 2))
    return min(times), size, float(psnr), hashes


def main(paths: list[str]) -> None:
    inputs = [(Path(p).name, clip_frames(Path(p))) for p in paths]
    if not paths:
        inputs = [("rendered orbit", rendered_clip())] + [(p.name, clip_frames(p)) for p in sorted(REAL.glob("*.mp4"))]
    print(f"{'clip':28s} {'frames':>14s} {'encoder':22s} {'time s':>7s} {'size kB':>8s} {'PSNR dB':>8s} repeatable")
    for name, frames in inputs:
        shape = "x".join(map(str, frames.shape[:3]))
        for label, params in (("x264 default (asm)", "threads=1"), ("fwdata (asm=0)", video.X264_OPTIONS["x264-params"])):
            t, size, psnr, hashes = encode(frames, params)
            print(f"{name:28s} {shape:>14s} {label:22s} {t:7.2f} {size / 1e3:8.1f} {psnr:8.2f} {len(hashes) == 1}")


if __name__ == "__main__":
    main(sys.argv[1:])
