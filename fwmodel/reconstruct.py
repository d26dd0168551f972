"""`fwmodel reconstruct`: the geometry branch of a checkpoint on real videos, written as a dataset in our contract.

Per video (one clip: T frames from `start`, every `stride`-th, resized to cover H x W and centre-cropped
as training crops, `fwmodel.data.ResizePlan`):

    frames [T, H, W, 3] uint8 -> [-1, 1] -> Wan VAE (posterior mode, normalised)   z0 [1, 16, S, H/8, W/8]
    seeded noise at sigma = `noise` (training's convention, fwmodel.losses.add_noise):
        z = (1 - sigma) z0 + sigma eps, timestep = 1000 sigma
    prompt (default "") -> UMT5                                                     text [1, 512, D]
    one geometry-only forward (fwmodel.inference.predict, no camera conditioning)   depth, points, cameras
    I2V checkpoints: conditioned on the clip's own frame 0 (fwmodel.i2v: first-frame condition and CLIP image
    tokens, --image-encoder), as generation conditions on its --image

Written with the build's writers (fwmodel.generate.prediction_sample, fwdata.dataset.store.write_sample):
videos/<id>.mp4 (the clip as the model saw it), depth/, points/ (+ .ply) and camera_params/ (the
predicted cameras, relative to frame 0), metadata.json. The sample id is the one `fwdata build` gives the
same clip (same source content, start, stride, T, H, W: fwdata.dataset.contract.make_sample_id), so a
checkpoint's geometry can be compared sample by sample with a build of the same videos (`fwdata compare`).
Units: the model's normalised frame (scale "normalized"). Works for Stage-1 and Stage-2 checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from fwmodel.generate import (
    GenerateError,
    SessionOptions,
    check_clip_size,
    checkpoint_header,
    cover_crop_uint8,
    open_session,
    prediction_sample,
    write_outputs_metadata,
)


@dataclass
class ReconstructOptions:
    """`fwmodel reconstruct`; None sizes / stride: the training run's data.num_frames, height, width, frame_stride."""

    session: SessionOptions
    videos: list[Path]
    out: Path
    frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    stride: Optional[int] = None
    start: int = 0
    noise: float = 0.05
    prompt: str = ""
    seed: int = 0
    points: str = "depth"  # fwmodel.generate.POINT_SOURCES


def read_clip(path: Path, start: int, stride: int, T: int, H: int, W: int):
    """(frames [T, H, W, 3] uint8 resized and cropped as training does, SourceRef, fps of the clip, id)."""
    from fwdata.dataset.contract import SourceRef, make_sample_id
    from fwdata.dataset.video import VideoError, content_fingerprint, probe, read_frames

    try:
        info = probe(path)
        indices = list(range(start, start + stride * (T - 1) + 1, stride))
        if indices[-1] >= info.num_frames:
            raise GenerateError(f"{path}: has {info.num_frames} frames, fewer than the {indices[-1] + 1} needed for "
                                f"--frames {T} --stride {stride} from frame {start}")
        raw = read_frames(path, indices)
    except VideoError as err:
        raise GenerateError(str(err)) from None
    hs, ws = raw.shape[1:3]
    frames, plan = cover_crop_uint8(raw, H, W)
    sy, sx = plan.scaled_hw[0] / hs, plan.scaled_hw[1] / ws
    (y0, x0) = plan.crop_yx
    fingerprint = content_fingerprint(path)
    source = SourceRef(path=str(path), size_bytes=Path(path).stat().st_size, fingerprint=fingerprint, fps=info.fps,
                       num_frames=info.num_frames, width=int(ws), height=int(hs), start_frame=start, stride=stride,
                       crop_xywh=(x0 / sx, y0 / sy, W / sx, H / sy), resize_scale=(sx, sy))
    sid = make_sample_id(Path(path).name, fingerprint, start, stride, T, H, W)
    return frames, source, info.fps / stride, sid


def reconstruct(opts: ReconstructOptions, command: str = "fwmodel reconstruct",
                echo: Callable[[str], None] = lambda s: None):
    """Run the geometry branch on every video of `opts`; write the dataset at `opts.out`. Returns its metadata."""
    from fwdata import __version__
    from fwdata.dataset.contract import SampleProvenance, SampleRecord, sample_paths
    from fwdata.dataset.store import check_output_folder, check_writable_folder, write_lock, write_sample
    from fwmodel.inference import predict, run_config

    if not opts.videos:
        raise GenerateError("no videos given")
    if not (math.isfinite(opts.noise) and 0 <= opts.noise < 1):
        raise GenerateError(f"--noise {opts.noise:g}: sigma must be in [0, 1)")
    if opts.start < 0:
        raise GenerateError(f"--start {opts.start} must be >= 0")
    missing = [str(v) for v in opts.videos if not Path(v).is_file()]
    if missing:
        raise GenerateError(f"video not found: {missing[0]}")
    path = Path(opts.session.checkpoint)
    header = checkpoint_header(path)
    data_cfg = run_config(path, header).data if header is not None else None
    T = opts.frames or (data_cfg.num_frames if data_cfg else 81)
    H = opts.height or (data_cfg.height if data_cfg else 336)
    W = opts.width or (data_cfg.width if data_cfg else 592)
    stride = opts.stride or (data_cfg.frame_stride if data_cfg else 1)
    if stride < 1:
        raise GenerateError(f"--stride {stride} must be at least 1")
    check_clip_size(T, H, W)
    clips = [read_clip(Path(v), opts.start, stride, T, H, W) for v in opts.videos]  # bad videos before the model
    out = Path(opts.out)
    check_writable_folder(out, create=False)  # a bad --out is one line before the model loads; created after
    session = open_session(opts.session, T, H, W, 1, what="reconstruct", echo=echo)
    check_output_folder(out)
    run_info = session.provenance()
    models = session.models()
    text = session.encode_text([opts.prompt])
    sigma = float(opts.noise)
    seen = set()
    with write_lock(out):
        for n, (frames, source, fps, sid) in enumerate(clips, start=1):
            if sid in seen:
                raise GenerateError(f"{source.path}: the same clip is given twice")
            seen.add(sid)
            video = torch.from_numpy(frames).permute(3, 0, 1, 2).float()[None] / 127.5 - 1.0  # [1, 3, T, H, W]
            z0 = session.encode_video(video)
            g = torch.Generator(device="cpu").manual_seed(int(opts.seed))
            eps = torch.randn(z0.shape, generator=g, dtype=torch.float32).to(z0.device)
            noisy = (1 - sigma) * z0 + sigma * eps
            condition = image_embeds = None
            i2v_note = []
            if session.i2v:  # the clip's own frame 0 is the first-frame condition
                condition, image_embeds = session.i2v_inputs(video[:, :, 0], T)
                i2v_note = ["image-to-video checkpoint: conditioned on the clip's own frame 0 (first-frame latent and "
                            "CLIP image tokens)"]
            with session.model_running():
                pred = predict(session.loaded, noisy, text, torch.tensor([sigma * 1000.0]), amp=session.amp,
                               condition=condition, image_embeds=image_embeds)
            indices = [source.start_frame + i * source.stride for i in range(T)]
            data, notes = prediction_sample(pred, 0, frames, fps, f"reconstructing {source.path}", opts.points,
                                            source_frames=indices, timestamps=[i / source.fps for i in indices])
            record = SampleRecord(
                id=sid, paths=sample_paths(sid), num_frames=T, height=H, width=W, fps=fps, scale="normalized",
                scale_source="the model's normalised frame (training scales each clip to mean point distance 1 "
                             "from camera 0)",
                depth_source=f"FantasyWorld geometry branch (fwmodel reconstruct), latents at sigma {sigma:g}",
                source=source,
                notes=[f"geometry predicted by {session.loaded.path.name} (Stage {session.loaded.stage}, step "
                       f"{session.loaded.step}) from VAE latents noised to sigma {sigma:g} (seed {opts.seed})",
                       *i2v_note, *notes],
                provenance=SampleProvenance(tool_version=__version__, options={
                    "reconstruct": {"noise_sigma": sigma, "seed": opts.seed, "prompt": opts.prompt, "stride": stride,
                                    "points": opts.points},
                    **run_info}, models=models),
            )
            write_sample(out, record, data)
            echo(f"reconstructed {sid} ({n}/{len(clips)}) from {source.path}")
        options = {"frames": T, "height": H, "width": W, "stride": stride, "start": opts.start, "noise_sigma": sigma,
                   "seed": opts.seed, "prompt": opts.prompt, "points": opts.points, **run_info}
        return write_outputs_metadata(out, command, {"reconstruct": options}, models)
