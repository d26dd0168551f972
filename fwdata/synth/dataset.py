"""Synthetic ground-truth datasets: rendered clips written in the dataset contract.

`fwdata synth OUT` renders scenes with `fwdata.synth.render` and writes them exactly as `fwdata build`
would write a dataset (videos, depth, points, cameras, metadata.json), with the *true* depth and
cameras, in metres. Tests use the videos as build inputs and the rest as ground truth.

`SynthOptions.effects` (`fwdata.synth.effects`, all off by default; `--preset realistic`) adds what
real cameras do. Then a clip's id and source name differ from the clean clip's (``..._fx``), and
its record carries the ground truth of every effect in ``provenance.options["ground_truth"]`` (the
lens model and parameters among them: the camera json stays PINHOLE) plus one line per effect in
``notes``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from fwdata import __version__
from fwdata.synth import render as synth
from fwdata.synth.effects import Effects, encode_h264, h264_bitrate, make_effects_clip, preset
from fwdata.dataset import camera
from fwdata.dataset.contract import (
    CameraFile,
    DatasetMetadata,
    ModelInfo,
    Provenance,
    SampleProvenance,
    SampleRecord,
    SourceRef,
    make_sample_id,
    sample_paths,
)
from fwdata.dataset.layout import marker_path, tmp_name
from fwdata.dataset.store import (
    SampleData,
    atomic_write_text,
    check_output_folder,
    file_sha256,
    finished_records,
    is_finished,
    write_metadata,
    write_sample,
)


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
    #: camera effects (`fwdata.synth.effects`); the default is none (the clean renderer)
    effects: Effects = field(default_factory=Effects)


def realistic_options(**overrides) -> SynthOptions:
    """SynthOptions of the ``realistic`` preset: `fwdata.synth.effects.REALISTIC` and every path kind
    (the rotation-dominant "spin" too). ``overrides`` are other SynthOptions fields."""
    effects, kinds = preset("realistic")
    return SynthOptions(**({"effects": effects, "path_kinds": list(kinds)} | overrides))


def check_options(opts: SynthOptions) -> None:
    if (opts.num_frames - 1) % 4:
        raise ValueError(f"--frames {opts.num_frames} must be 4k+1 (e.g. 49, 81)")
    if opts.height % 16 or opts.width % 16:
        raise ValueError(f"--height/--width {opts.height}x{opts.width} must be multiples of 16")
    unknown = [k for k in opts.path_kinds if k not in synth.ALL_PATH_KINDS]
    if unknown or not opts.path_kinds:
        raise ValueError(f"unknown camera path kinds {unknown}; choose from {', '.join(synth.ALL_PATH_KINDS)}")
    if opts.num_scenes < 1:
        raise ValueError("--scenes must be at least 1")
    opts.effects.check(synth.default_intrinsics(opts.height, opts.width, opts.fov_w_deg), opts.height, opts.width)


def clip_plan(opts: SynthOptions) -> list[tuple[int, str]]:
    """(seed, path kind) of each clip: scene i uses seed + i and cycles through the path kinds."""
    kinds = list(opts.path_kinds)
    return [(opts.seed + i, kinds[i % len(kinds)]) for i in range(opts.num_scenes)]


def _source_name(seed: int, kind: str, effects: Optional[Effects] = None) -> str:
    tag = "_fx" if effects is not None and effects.active else ""
    return f"synth_{kind}_seed{seed}{tag}.mp4"


def _effects_key(effects: Effects) -> str:
    return json.dumps(effects.changed(), sort_keys=True, separators=(",", ":"))


def synthetic_id(seed: int, kind: str, num_frames: int, effects: Optional[Effects] = None,
                 height: int = 0, width: int = 0) -> str:
    """Sample id of a synthetic clip (stable, like every sample id). Clips with effects have their own
    ids (the effects and the frame size are in the key); clean clips keep their ids."""
    if effects is None or not effects.active:
        return make_sample_id(_source_name(seed, kind), f"synthetic seed={seed} path={kind}", 0, 1, num_frames, 0, 0)
    return make_sample_id(_source_name(seed, kind, effects),
                          f"synthetic seed={seed} path={kind} effects={_effects_key(effects)}",
                          0, 1, num_frames, height, width)


def _clip_id(opts: SynthOptions, seed: int, kind: str) -> str:
    return synthetic_id(seed, kind, opts.num_frames, opts.effects, opts.height, opts.width)


def _effect_notes(truth: dict) -> list[str]:
    """One readable line per effect of a clip's ground truth."""
    notes = []
    if "lens" in truth:
        L = truth["lens"]
        k3 = f" k3={L['k3']:g}" if "k3" in L else ""
        notes.append(f"lens {L['model']} k1={L['k1']:g} k2={L['k2']:g} p1={L['p1']:g} p2={L['p2']:g}{k3}: the video "
                     f"is distorted; depth, points and cameras are the undistorted pinhole camera")
    if "noise" in truth:
        notes.append(f"sensor noise gaussian std={truth['noise']['std']:g} (8-bit levels)")
    if "motion_blur" in truth:
        mb = truth["motion_blur"]
        notes.append(f"motion blur shutter={mb['shutter']:g} frame, {mb['samples']} sub-frames; cameras at mid-exposure")
    if "gains_rgb" in truth:
        fx = truth["effects"]
        notes.append(f"exposure drift {fx.get('exposure_drift', 0.0):g} stops, white-balance drift "
                     f"{fx.get('wb_drift', 0.0):g} stops over the clip")
    if "keyframe_step" in truth:
        notes.append(f"keyframe step {truth['keyframe_step']}: frames are poses 0, k, 2k, ... of a k times denser path")
    if "low_texture_faces" in truth:
        notes.append(f"nearly uniform room faces {', '.join(truth['low_texture_faces'])}")
    if "moving_object" in truth:
        notes.append(f"moving sphere r={truth['moving_object']['radius']:.3f} m crossing the view; its depth is in "
                     f"the ground truth (not static geometry)")
    if "h264" in truth:
        h = truth["h264"]
        what = f"{h['bit_rate']} bit/s ({h['bpp']:g} bits per pixel)" if "bit_rate" in h else f"crf {h['crf']}"
        notes.append(f"video re-encoded with H.264 at {what}")
    return notes


def synthetic_sample(clip: "synth.SyntheticClip", opts: SynthOptions) -> tuple[SampleRecord, SampleData]:
    """Record and data of one rendered clip, cameras re-expressed so frame 0 is the world frame."""
    T, H, W = clip.frames.shape[:3]
    source_name = _source_name(clip.seed, clip.path_kind, opts.effects)
    sid = synthetic_id(clip.seed, clip.path_kind, T, opts.effects, H, W)
    w2c = camera.relative_to_first(clip.w2c)
    times = [i / clip.fps for i in range(T)]
    cams = CameraFile.from_arrays(w2c, clip.K, width=W, height=H, scale="metric",
                                  source_frames=list(range(T)), timestamps=times)
    paths = sample_paths(sid)
    if not opts.write_ply:  # without the fused cloud the record names none (as `fwdata build` does)
        paths = paths.model_copy(update={"points_ply": None})
    record = SampleRecord(
        id=sid,
        paths=paths,
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
    if opts.effects.active:
        truth = dict(clip.effects)
        bit_rate = h264_bitrate(opts.effects, H, W, clip.fps)
        if bit_rate is not None:
            truth["h264"] = {"bit_rate": bit_rate, "bpp": opts.effects.h264_bpp}
        elif opts.effects.h264_crf is not None:
            truth["h264"] = {"crf": opts.effects.h264_crf}
        record = record.model_copy(update={
            "notes": record.notes + _effect_notes(truth),
            "provenance": SampleProvenance(
                tool_version=__version__,
                options={"synthetic": {"seed": clip.seed, "path": clip.path_kind, "fov_w_deg": opts.fov_w_deg},
                         "ground_truth": truth},
                models=[ModelInfo(role="depth", name="ray caster (ground truth)"),
                        ModelInfo(role="cameras", name="ground truth")],
            ),
        })
    depth = clip.depth.astype(np.float32)
    data = SampleData(frames=clip.frames, depth=depth, depth_valid=np.isfinite(depth) & (depth > 0), cameras=cams)
    return record, data


def write_synthetic_dataset(out: Path, opts: SynthOptions,
                            progress: Optional[Callable[[str], None]] = None) -> DatasetMetadata:
    """Render `opts.num_scenes` clips into a dataset at `out`; finished clips are skipped on rerun.

    Raises ValueError for bad options and OSError (one line) for an `out` that cannot be a dataset
    folder (an existing file, not writable), both before anything is rendered."""
    check_options(opts)
    out = Path(out)
    check_output_folder(out)  # the build's check of --out: a file there is one line, before any work
    for seed, kind in clip_plan(opts):
        if is_finished(out, _clip_id(opts, seed, kind)):
            continue
        if opts.effects.active:
            clip = make_effects_clip(seed, kind, opts.effects, num_frames=opts.num_frames, height=opts.height,
                                     width=opts.width, fov_w_deg=opts.fov_w_deg, fps=opts.fps)
        else:
            clip = synth.make_clip(seed, kind, num_frames=opts.num_frames, height=opts.height, width=opts.width,
                                   fov_w_deg=opts.fov_w_deg, fps=opts.fps)
        record, data = synthetic_sample(clip, opts)
        record = write_sample(out, record, data, write_ply=opts.write_ply)
        if opts.effects.h264_bpp is not None or opts.effects.h264_crf is not None:
            _reencode_video(out, record, data.frames, opts)
        if progress:
            progress(record.id)
    wanted = {_clip_id(opts, s, k) for s, k in clip_plan(opts)}
    records = [r for r in finished_records(out) if r.id in wanted]
    meta = DatasetMetadata(
        name=out.name,
        provenance=Provenance(
            tool_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command="fwdata synth",
            options=_recorded_options(opts),
            models=[ModelInfo(role="depth", name="ray caster (ground truth)"),
                    ModelInfo(role="cameras", name="ground truth")],
        ),
        samples=records,
    )
    return write_metadata(out, meta)


def _recorded_options(opts: SynthOptions) -> dict:
    """The options in metadata.json: the clean renderer's as always, `effects` only when some are on."""
    options = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(opts).items() if k != "effects"}
    if opts.effects.active:
        options["effects"] = opts.effects.changed()
    return options


def _reencode_video(out: Path, record: SampleRecord, frames: np.ndarray, opts: SynthOptions) -> SampleRecord:
    """Replace the sample's video by an encode of the same frames at the effects' bitrate or CRF.

    The completion marker goes first and comes back (with the new sha256) last, so an interruption
    leaves the sample unfinished (rendered again on a rerun), never a marker naming another video.
    """
    fx = opts.effects
    marker = marker_path(out, record.id)
    marker.unlink()
    video = out / record.paths.video
    tmp = tmp_name(video)
    try:
        encode_h264(tmp, frames, record.fps, bit_rate=h264_bitrate(fx, record.height, record.width, record.fps),
                    crf=fx.h264_crf)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, video)
    finally:
        if tmp.exists():
            tmp.unlink()
    record = record.model_copy(update={"video_sha256": file_sha256(video)})
    atomic_write_text(marker, record.model_dump_json(indent=1) + "\n")
    return record
