"""Synthetic ground-truth datasets: rendered clips written in the dataset contract.

`fwdata synth OUT` renders scenes with `fwdata.synth.render` and writes them exactly as `fwdata build`
would write a dataset (videos, depth, points, cameras, metadata.json), with the *true* depth and
cameras, in metres. Tests use the videos as build inputs and the rest as ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from fwdata import __version__
from fwdata.synth import render as synth
from fwdata.dataset import camera
from fwdata.dataset.contract import (
    CameraFile,
    DatasetMetadata,
    ModelInfo,
    Provenance,
    SampleRecord,
    SourceRef,
    make_sample_id,
    sample_paths,
)
from fwdata.dataset.store import SampleData, finished_records, is_finished, write_metadata, write_sample


@dataclass
class SynthOptions:
    """Options of `fwdata synth`. Frame count 4k+1 and sides multiples of 16 keep clips in the contract."""

    num_scenes: int = 4
    num_frames: int = 49
    height: int = 192
    width: int = 336
    fov_w_deg: float = 60.0
    fps: float = 16.0
    seed: int = 0
    path_kinds: Sequence[str] = field(default_factory=lambda: list(synth.PATH_KINDS))
    write_ply: bool = True


def check_options(opts: SynthOptions) -> None:
    if (opts.num_frames - 1) % 4:
        raise ValueError(f"--frames {opts.num_frames} must be 4k+1 (e.g. 49, 81)")
    if opts.height % 16 or opts.width % 16:
        raise ValueError(f"--height/--width {opts.height}x{opts.width} must be multiples of 16")
    unknown = [k for k in opts.path_kinds if k not in synth.PATH_KINDS]
    if unknown or not opts.path_kinds:
        raise ValueError(f"unknown camera path kinds {unknown}; choose from {', '.join(synth.PATH_KINDS)}")
    if opts.num_scenes < 1:
        raise ValueError("--scenes must be at least 1")


def clip_plan(opts: SynthOptions) -> list[tuple[int, str]]:
    """(seed, path kind) of each clip: scene i uses seed + i and cycles through the path kinds."""
    kinds = list(opts.path_kinds)
    return [(opts.seed + i, kinds[i % len(kinds)]) for i in range(opts.num_scenes)]


def _source_name(seed: int, kind: str) -> str:
    return f"synth_{kind}_seed{seed}.mp4"


def synthetic_id(seed: int, kind: str, num_frames: int) -> str:
    """Sample id of a synthetic clip (stable, like every sample id)."""
    return make_sample_id(_source_name(seed, kind), f"synthetic seed={seed} path={kind}", 0, 1, num_frames, 0, 0)


def synthetic_sample(clip: "synth.SyntheticClip", opts: SynthOptions) -> tuple[SampleRecord, SampleData]:
    """Record and data of one rendered clip, cameras re-expressed so frame 0 is the world frame."""
    T, H, W = clip.frames.shape[:3]
    source_name = _source_name(clip.seed, clip.path_kind)
    sid = synthetic_id(clip.seed, clip.path_kind, T)
    w2c = camera.relative_to_first(clip.w2c)
    times = [i / clip.fps for i in range(T)]
    cams = CameraFile.from_arrays(w2c, clip.K, width=W, height=H, scale="metric",
                                  source_frames=list(range(T)), timestamps=times)
    record = SampleRecord(
        id=sid,
        paths=sample_paths(sid),
        num_frames=T,
        height=H,
        width=W,
        fps=clip.fps,
        scale="metric",
        scale_source="ground truth (synthetic scene in metres)",
        depth_source="ground truth (ray cast)",
        source=SourceRef(
            path=f"synthetic:{source_name}", size_bytes=0, fps=clip.fps, num_frames=T, width=W, height=H,
            start_frame=0, stride=1, crop_xywh=(0.0, 0.0, float(W), float(H)), resize_scale=(1.0, 1.0),
        ),
        notes=[f"synthetic scene seed={clip.seed} path={clip.path_kind}"],
    )
    depth = clip.depth.astype(np.float32)
    data = SampleData(frames=clip.frames, depth=depth, depth_valid=np.isfinite(depth) & (depth > 0), cameras=cams)
    return record, data


def write_synthetic_dataset(out: Path, opts: SynthOptions,
                            progress: Optional[Callable[[str], None]] = None) -> DatasetMetadata:
    """Render `opts.num_scenes` clips into a dataset at `out`; finished clips are skipped on rerun."""
    check_options(opts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for seed, kind in clip_plan(opts):
        if is_finished(out, synthetic_id(seed, kind, opts.num_frames)):
            continue
        clip = synth.make_clip(seed, kind, num_frames=opts.num_frames, height=opts.height, width=opts.width,
                               fov_w_deg=opts.fov_w_deg, fps=opts.fps)
        record, data = synthetic_sample(clip, opts)
        write_sample(out, record, data, write_ply=opts.write_ply)
        if progress:
            progress(record.id)
    wanted = {synthetic_id(s, k, opts.num_frames) for s, k in clip_plan(opts)}
    records = [r for r in finished_records(out) if r.id in wanted]
    meta = DatasetMetadata(
        name=out.name,
        provenance=Provenance(
            tool_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command="fwdata synth",
            options={k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(opts).items()},
            models=[ModelInfo(role="depth", name="ray caster (ground truth)"),
                    ModelInfo(role="cameras", name="ground truth")],
        ),
        samples=records,
    )
    return write_metadata(out, meta)
