"""`fwmodel generate`: videos along a camera trajectory from a Stage-2 checkpoint, with the model's geometry.

One generation (B = 1 clip of T = 4k+1 frames at H x W; S = (T-1)/4 + 1 latent frames of H/8 x W/8):

    prompt, negative prompt -> UMT5 (fwmodel.cache.TextEncoder)            text [2, 512, D]
    trajectory (fwmodel.trajectories) -> Plucker rays (FantasyWorldModel.camera_rays, as in training)
                                                                          plucker [2, T, H, W, 6]
    noise ~ N(0, 1) from a CPU generator seeded with `seed`               latents [1, 16, S, H/8, W/8]
    I2V checkpoints only (fwmodel.i2v): the --image file, resized to cover H x W and centre-cropped as
    training crops (fwmodel.data.ResizePlan), 8-bit, in [-1, 1]                first frame [1, 3, H, W]
      -> fwmodel.i2v.first_frame_condition (mask + Wan VAE latent)         condition [2, 20, S, H/8, W/8]
      -> fwmodel.i2v.ImageEncoder (CLIP, penultimate hidden states)        image tokens [2, N, image_dim]
      the same condition and image tokens for the conditional and the negative pass (as diffusers'
      WanImageToVideoPipeline); the condition is concatenated to the latents (36 input channels)
    for each timestep t of diffusers' scheduler for Wan (UniPCMultistepScheduler, flow_prediction,
    flow sigmas shifted by the run's diffusion.shift; or FlowMatchEulerDiscreteScheduler):
        one forward of the conditional and negative prompts as a batch of 2 (fwmodel.inference.predict,
        video=True): velocity v = v_neg + guidance * (v_cond - v_neg); latents = scheduler.step(v, t, latents)
    latents -> Wan VAE decode (fwmodel.cache.VideoEncoder.decode)         the clip [T, H, W, 3] uint8
    geometry: the depth, points and cameras the conditional pass predicted at the last (least noisy) step

Output: a dataset in our contract (`fwdata validate`, `fwdata report`, every viewer read it), written
with the build's own writers (`fwdata.dataset.store.write_sample`): videos/<id>.mp4 (the generated
clip), depth/<id>.npz, points/<id>.npz (the point head's map, moved into frame 0's camera) + .ply,
camera_params/<id>.json|txt (the PREDICTED cameras, relative to frame 0), requested_cameras/<id>.json
(the trajectory asked for, same CameraFile format) and metadata.json. Units: the model's normalised
frame (scale "normalized"). Provenance (checkpoint, sha256, stage, step, prompt, negative prompt,
seed, steps, guidance, sampler, trajectory, encoders, the --image path and its sha256) is in each
record's `provenance.options` and `provenance.models`. Same seed and inputs -> the same bytes (on a CPU;
metadata.json's `created` and `command` excepted, as for `fwdata build`).

`fwmodel.reconstruct` shares the session (`open_session`: checkpoint, dtype, offload, encoders,
memory preflight) and the writers (`prediction_sample`, `write_outputs_metadata`) defined here.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from fwmodel.i2v import RANDOM_TINY
from fwmodel.trajectories import Trajectory, TrajectoryError, resolve_trajectory

#: frame rate of generated clips (Wan2.1 generates 16 fps video)
GENERATED_FPS = 16.0
SAMPLERS = ("unipc", "euler")
#: what points/<id>.npz holds: the depth unprojected with the predicted cameras, or the point head's map
POINT_SOURCES = ("depth", "head")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: the Wan2.1 I2V CLIP ViT-H/14 vision tower in bf16 (632 M parameters)
CLIP_VIT_H_BYTES = 1.27e9


class GenerateError(ValueError):
    """A one-line problem with what generate / reconstruct were asked (stage, sizes, batch file, image)."""


# --------------------------------------------------------------------------- session: model + encoders


@dataclass
class SessionOptions:
    """What `fwmodel generate` and `fwmodel reconstruct` load: the checkpoint, encoders, device, memory knobs."""

    checkpoint: Path
    vae: Optional[str] = None
    text_encoder: Optional[str] = None
    wan_weights: Optional[str] = None
    device: str = "auto"
    dtype: Optional[str] = None  # bf16 | fp32; None: bf16 on a GPU, fp32 on the CPU
    offload: bool = False  # keep each of text encoder / model / VAE on the CPU except while it runs
    vae_tiling: bool = True  # decode / encode the video in tiles when the VAE supports it
    memory_check: bool = True  # refuse (one line) when the estimate exceeds the GPU
    image_encoder: Optional[str] = None  # I2V: the CLIP image encoder (Wan I2V repository, image_encoder/, random-tiny)


@dataclass
class Session:
    """A loaded checkpoint with its encoders, ready to run (see `open_session`)."""

    loaded: object  # fwmodel.inference.LoadedModel
    vae: object  # fwmodel.cache.VideoEncoder
    text: object  # fwmodel.cache.TextEncoder
    dtype: torch.dtype
    offload: bool
    checkpoint_sha256: str
    memory_line: str
    image: Optional[object] = None  # fwmodel.i2v.ImageEncoder of an I2V checkpoint; None for T2V

    @property
    def i2v(self) -> bool:
        """True for an image-to-video checkpoint (it needs a first frame: `i2v_inputs`)."""
        return self.image is not None

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def amp(self) -> Optional[torch.dtype]:
        """Autocast dtype of the model's forward (predict's `amp`): bf16, or None for fp32."""
        return torch.bfloat16 if self.dtype == torch.bfloat16 else None

    @contextmanager
    def running(self, module: torch.nn.Module) -> Iterator[None]:
        """With --offload: `module` on the execution device only while the body runs (diffusers' model CPU
        offload, done by moving whole modules); without it, nothing moves."""
        if self.offload:
            module.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                module.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> UMT5 embeddings [B, 512, D] (float32, on the execution device)."""
        with self.running(self.text.model):
            return self.text(prompts).float()

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 16, S, H/8, W/8]."""
        with self.running(self.vae.vae):
            return self.vae(video).float()

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> video [B, 3, T, H, W] in [-1, 1]."""
        with self.running(self.vae.vae):
            return self.vae.decode(latents)

    @contextmanager
    def model_running(self) -> Iterator[None]:
        with self.running(self.loaded.model):
            yield

    def i2v_inputs(self, first_frame: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """First frame [1, 3, H, W] in [-1, 1] -> (I2V condition [1, 20, S, H/8, W/8], CLIP image tokens
        [1, N, image_dim]), both float32 on the execution device (fwmodel.i2v)."""
        from fwmodel.i2v import first_frame_condition

        first_frame = first_frame.to(self.device)
        with self.running(self.vae.vae):
            condition = first_frame_condition(self.vae, first_frame, num_frames).float()
        with self.running(self.image.model):
            tokens = self.image(first_frame).to(self.device)
        return condition, tokens

    def models(self) -> list:
        """The models that made an output (ModelInfo), random ones marked random_init."""
        from fwdata.dataset.contract import ModelInfo

        cfg, header = self.loaded.config, self.loaded.header
        wan = str(cfg.model.wan_weights)
        vae, text = self.vae.provenance(), self.text.provenance()
        models = [
            ModelInfo(role="geometry, cameras and camera control",
                      name=f"FantasyWorld {header.get('preset')} Stage {self.loaded.stage} step {self.loaded.step}: "
                           f"{self.loaded.path}", revision=f"sha256:{self.checkpoint_sha256}"),
            ModelInfo(role="video backbone", name=f"Wan2.1 {wan}", random_init=wan == "random"),
            ModelInfo(role="vae", name=str(vae.get("path")), random_init=bool(vae.get("random_init"))),
            ModelInfo(role="text encoder", name=str(text.get("path")), random_init=bool(text.get("random_init"))),
        ]
        if self.image is not None:
            image = self.image.provenance()
            models.append(ModelInfo(role="image encoder (CLIP, I2V first frame)", name=str(image["path"]),
                                    random_init=bool(image["random_init"])))
        return models

    def provenance(self) -> dict:
        """The checkpoint and encoders, for each record's provenance.options."""
        info = dict(self.loaded.provenance())
        info["checkpoint_sha256"] = self.checkpoint_sha256
        info["dtype"] = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        info["vae"] = str(self.vae.provenance().get("path"))
        info["text_encoder"] = str(self.text.provenance().get("path"))
        if self.image is not None:
            info["image_encoder"] = str(self.image.provenance()["path"])
        return info


def resolve_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """--dtype: bf16 | fp32; None -> bf16 on a GPU, fp32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise GenerateError(f"--dtype {name!r}: use bf16 or fp32")
    if name == "bf16" and device.type != "cuda":
        raise GenerateError("--dtype bf16 needs a GPU; on the CPU use --dtype fp32 (the default there)")
    return DTYPES[name]


def checkpoint_header(path: Path) -> Optional[dict]:
    """The checkpoint's header without reading its tensors; None when it cannot be read (load_model then
    refuses the file with the training checks' message)."""
    from fwmodel.checkpoint import CheckpointError, read_checkpoint_header

    try:
        return read_checkpoint_header(path)
    except CheckpointError:
        return None


def open_session(opts: SessionOptions, frames: int, height: int, width: int, batch: int,
                 require_stage2: bool = False, what: str = "generate",
                 echo: Callable[[str], None] = lambda s: None) -> Session:
    """Load the checkpoint (the training checks refuse a damaged or mismatched file), after the memory
    preflight; then the VAE and text encoder, and for an I2V checkpoint the CLIP image encoder
    (`image_encoder_path`). Raises CheckpointError, InferenceError, GenerateError, MemoryPreflightError
    (one line each)."""
    from fwmodel.i2v import is_i2v
    from fwmodel.inference import load_encoders, load_model, resolve_device, run_config

    path = Path(opts.checkpoint)
    header = checkpoint_header(path)
    if header is not None and require_stage2 and header.get("stage") == 1:
        raise GenerateError(f"checkpoint {path} is a Stage-1 checkpoint: it has no camera adapters, so it cannot "
                            f"{what} along a camera trajectory; use a Stage-2 checkpoint (fwmodel train --stage 2)")
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    memory_line = ""
    if header is not None:
        from fwmodel.config import get_preset

        cfg = run_config(path, header)
        image_large = False
        if is_i2v(get_preset(cfg.model.preset)):  # the image encoder is found before anything large is loaded
            image_large = image_encoder_path(opts, cfg, path) != RANDOM_TINY
        est = inference_memory(get_preset(cfg.model.preset), int(header.get("stage", 2)), frames, height, width, batch,
                               dtype, opts.offload, text_encoder_large=not _is_tiny(opts.text_encoder, cfg),
                               device=device, image_encoder_large=image_large)
        memory_line = preflight_line(est)
        echo(memory_line)
        if opts.memory_check:
            check_inference_fits(est)
    loaded = load_model(path, wan_weights=opts.wan_weights, device=opts.device)
    if require_stage2 and loaded.stage != 2:
        raise GenerateError(f"checkpoint {path} is a Stage-{loaded.stage} checkpoint: it has no camera adapters; "
                            "use a Stage-2 checkpoint")
    if dtype == torch.float32:
        loaded.model.float()
    else:
        loaded.model.backbone.to(dtype)
    encoder_dtype = dtype
    vae, text = load_encoders(loaded, opts.vae, opts.text_encoder, dtype=encoder_dtype)
    if opts.vae_tiling and hasattr(vae.vae, "enable_tiling"):
        vae.vae.enable_tiling()
    image = None
    if is_i2v(loaded.model.config):
        image = load_image_encoder(image_encoder_path(opts, loaded.config, path), loaded.device, encoder_dtype,
                                   loaded.model.config)
    if opts.offload:
        for module in (loaded.model, vae.vae, text.model, *([image.model] if image is not None else [])):
            module.to("cpu")
    sha = _checkpoint_sha256(path)
    return Session(loaded, vae, text, dtype, opts.offload, sha, memory_line, image)


def image_encoder_path(opts: SessionOptions, cfg, checkpoint: Path) -> str:
    """Where the CLIP image encoder of an I2V checkpoint is: --image-encoder; else the run's
    `model.image_encoder` (when its config has one) or the one its latent cache recorded; else the Wan I2V
    repository that --vae (or the run's model.vae) names, when it holds image_encoder/. GenerateError
    (one line) when none is known."""
    from fwmodel.inference import _cache_encoder

    given = (opts.image_encoder or getattr(cfg.model, "image_encoder", None)
             or _cache_encoder(cfg, "image_encoder"))
    if given is not None:
        return str(given)
    vae = opts.vae or cfg.model.vae
    if vae is not None and str(vae) != RANDOM_TINY:
        vae = Path(str(vae)).expanduser()
        for root in (vae, vae.parent):  # the repository root, or its vae/ folder
            if (root / "image_encoder" / "config.json").is_file():
                return str(root)
    raise GenerateError(f"checkpoint {checkpoint} is an image-to-video model ({cfg.model.preset}): pass "
                        "--image-encoder (the Wan2.1 I2V repository root or its image_encoder/ folder, or "
                        f"{RANDOM_TINY} for a tiny test run)")


def load_image_encoder(path: str, device: torch.device, dtype: torch.dtype, model_config):
    """fwmodel.i2v.load_image_encoder (the preset's token width checked), its error as a GenerateError."""
    from fwmodel.i2v import ImageEncoderError
    from fwmodel.i2v import load_image_encoder as load_checked

    try:
        return load_checked(path, device, dtype, model_config)
    except ImageEncoderError as err:
        raise GenerateError(f"--image-encoder: {err}") from None


def _is_tiny(text_encoder: Optional[str], cfg) -> bool:
    from fwmodel.cache import is_random_encoder

    name = text_encoder or cfg.model.text_encoder
    return name is None or is_random_encoder(name)


def _checkpoint_sha256(path: Path) -> str:
    """The checkpoint's sha256 (from its sidecar, which load_model has just checked against the file)."""
    from fwmodel.checkpoint import file_sha256, read_sidecar

    sidecar = read_sidecar(path) or {}
    return str(sidecar.get("sha256") or file_sha256(path))


# --------------------------------------------------------------------------- memory preflight


def inference_memory(config, stage: int, frames: int, height: int, width: int, batch: int, dtype: torch.dtype,
                     offload: bool, text_encoder_large: bool = True, device: Optional[torch.device] = None,
                     image_encoder_large: bool = True):
    """Estimated peak memory (fwmodel.memory.MemoryEstimate) of inference: no gradients, so the model's weights
    (backbone at `dtype`, our modules in fp32), one block's working set for `batch` clips (the constants of
    fwmodel.memory, measured for training, bound it from above), the DPT heads on one frame chunk, the
    output maps, the Plucker rays, the text encoder (and for I2V presets the CLIP image encoder: it runs
    beside it) and the VAE decode. With `offload` only the largest of the three models is on the device at a
    time."""
    from fwmodel import memory as mem

    n_backbone, _, n_stage2 = mem._parameter_totals(config.model_dump_json())
    wb = 2 if dtype == torch.bfloat16 else 4
    S = (frames - 1) // 4 + 1
    h, w = height // 16, width // 16
    L, G = S * h * w, S * (config.num_special_tokens + h * w)
    pixels = frames * height * width
    chunk = min(config.geometry.dpt_frames_chunk, frames)
    model = {
        "model weights": n_backbone * wb + n_stage2 * 4,
        "activations: one block": batch * (L * config.wan.dim * mem.FROZEN_BLOCK_BYTES_PER_CHANNEL
                                           + G * config.geometry.embed_dim * mem.GEOMETRY_BLOCK_BYTES_PER_CHANNEL)
                                  * wb / 2,
        "activations: DPT heads": batch * chunk * height * width * mem.DPT_ELEMENTS_PER_PIXEL * wb,
        "outputs + Plucker rays": batch * pixels * (6 + 6) * 4,
    }
    text = {"text encoder": mem.UMT5_XXL_BYTES * (wb / 2) if text_encoder_large else 0.05e9}
    if config.wan.image_dim is not None:
        text["image encoder"] = CLIP_VIT_H_BYTES * (wb / 2) if image_encoder_large else 0.01e9
    vae = {"VAE decode": mem.VAE_BYTES * (wb / 2) + mem.VAE_ENCODE_BYTES_PER_PIXEL * pixels * wb / 2}
    est = mem.MemoryEstimate()
    if offload:
        groups = {"model": model, "text encoder": text, "VAE": vae}
        name, largest = max(groups.items(), key=lambda kv: sum(kv[1].values()))
        est.parts.update(largest)
        est.notes.append(f"--offload: one model on the device at a time (the largest: {name})")
    else:
        est.parts.update(model)
        est.parts.update(text)
        est.parts.update(vae)
    est.parts["overhead (10% + 1 GiB)"] = 0.1 * est.total + mem.GIB
    if device is not None:
        est.capacity, est.device = mem.device_capacity(device)
    return est


def preflight_line(est) -> str:
    from fwmodel.memory import GIB

    where = f" of {est.capacity / GIB:.1f} GiB on {est.device}" if est.capacity else " (CPU: not checked)"
    return f"memory preflight: about {est.total / GIB:.2f} GiB needed{where}"


def check_inference_fits(est, limit: float = 0.95) -> None:
    """MemoryPreflightError (one line) when the estimate exceeds `limit` of the GPU."""
    from fwmodel.memory import GIB, MemoryPreflightError

    if est.capacity is None or est.total <= limit * est.capacity:
        return
    raise MemoryPreflightError(
        f"estimated {est.total / GIB:.1f} GiB, but {est.device} has {est.capacity / GIB:.1f} GiB; nothing was loaded. "
        "Try --offload, --dtype bf16, fewer --frames or a smaller --height/--width (or --no-memory-check to try "
        "anyway)")


# --------------------------------------------------------------------------- outputs in the contract


#: the field of view (radians) a predicted camera may have; outside it a pinhole focal is not finite and positive
FOV_RANGE_RAD = (math.radians(1.0), math.radians(179.0))


def prediction_sample(pred, b: int, frames: np.ndarray, fps: float, what: str, points_from: str = "depth",
                      source_frames: Optional[list[int]] = None, timestamps: Optional[list[float]] = None):
    """The contract's SampleData of clip `b` of a GeometryPrediction and its RGB frames [T, H, W, 3] uint8,
    and notes for the record. `source_frames` / `timestamps` of the cameras: default 0..T-1 at `fps`.

    Cameras are re-expressed relative to the predicted frame-0 camera (the contract's world); depth
    (per-camera z) is unchanged. `points_from`: "depth" (default) writes the predicted depth unprojected
    with the predicted cameras (the contract's point map: `fwdata validate` checks that the two agree;
    VGGT found depth + cameras more accurate than its point head), "head" the point head's own map moved
    into frame 0's camera (p' = R0 p + t0; `fwdata validate` then reports where it departs from the depth).
    Depth is valid where finite and at least float16's smallest normal number (6.1e-5, in a frame where the
    scene is ~1 unit away: below it float16 points lose their precision); head points where their depth is
    valid and float16 holds them. A predicted field of view outside `FOV_RANGE_RAD`
    (an untrained camera head can give 0: an infinite focal) is clamped into it, and a note says which
    frames. Raises GenerateError on non-finite poses."""
    from pydantic import ValidationError

    from fwdata.dataset import camera
    from fwdata.dataset.contract import CameraFile
    from fwdata.dataset.store import SampleData

    w2c = pred.w2c[b].double().cpu().numpy()
    K = pred.K[b].double().cpu().numpy()
    H, W = frames.shape[1:3]
    fov = pred.pose_enc[b, :, 7:9].double().cpu().numpy()  # [T, (fov_h, fov_w)] radians
    if not (np.isfinite(w2c).all() and np.isfinite(fov).all()):
        raise GenerateError(f"{what}: the model predicted non-finite cameras; is the checkpoint trained?")
    notes = []
    bad = ((fov < FOV_RANGE_RAD[0]) | (fov > FOV_RANGE_RAD[1])).any(axis=1)
    if bad.any():
        fov = np.clip(fov, *FOV_RANGE_RAD)
        K[:, 1, 1] = camera.fov_to_focal(fov[:, 0], H)
        K[:, 0, 0] = camera.fov_to_focal(fov[:, 1], W)
        notes.append(f"frames {np.flatnonzero(bad).tolist()}: the predicted field of view was outside 1..179 degrees "
                     "and was clamped into it (an untrained camera head?)")
    first = w2c[0].copy()
    w2c = camera.relative_to_first(w2c)
    w2c[0] = np.eye(4)
    depth = pred.depth[b].cpu().numpy().astype(np.float32)
    # depth below float16's normal range (6.1e-5: the scene is ~1 unit away) is not kept: points/ are float16
    depth_valid = np.isfinite(depth) & (depth >= float(np.finfo(np.float16).tiny))
    if points_from not in POINT_SOURCES:
        raise GenerateError(f"--points {points_from!r}: use {' or '.join(POINT_SOURCES)}")
    points = points_valid = None  # "depth": write_sample unprojects the depth with the cameras
    if points_from == "head":
        points = pred.points[b].double().cpu().numpy() @ first[:3, :3].T + first[:3, 3]
        points_valid = np.isfinite(points.astype(np.float16)).all(axis=-1) & depth_valid
        points = np.where(points_valid[..., None], points, 0.0).astype(np.float32)
    T = len(w2c)
    try:
        cams = CameraFile.from_arrays(w2c, K, width=frames.shape[2], height=frames.shape[1], scale="normalized",
                                      source_frames=source_frames,
                                      timestamps=timestamps if timestamps is not None else [i / fps for i in range(T)])
    except ValidationError as err:
        raise GenerateError(f"{what}: the predicted cameras break the contract ({err.errors()[0]['msg']})") from None
    return SampleData(frames=frames, depth=depth, depth_valid=depth_valid, cameras=cams, points=points,
                      points_valid=points_valid), notes


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(1, 2, 3, 0).cpu().numpy())


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers", "numpy", "av"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def write_outputs_metadata(out: Path, command: str, options: dict, models: list):
    """metadata.json of an output folder: every finished sample in it (completion markers), this run's options
    and the models of every sample. Returns what was written."""
    from fwdata import __version__
    from fwdata.dataset.contract import DatasetMetadata, Provenance
    from fwdata.dataset.store import finished_records, write_metadata

    records = finished_records(out)
    models = list(models)
    for r in records:
        for m in (r.provenance.models if r.provenance else []):
            if m not in models:
                models.append(m)
    meta = DatasetMetadata(
        name=out.resolve().name,
        provenance=Provenance(tool="fwmodel", tool_version=__version__,
                              created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command,
                              options=options, models=models, packages=package_versions()),
        samples=records,
    )
    return write_metadata(out, meta)


def check_clip_size(frames: int, height: int, width: int) -> None:
    if frames < 1 or (frames - 1) % 4:
        raise GenerateError(f"--frames {frames} must be 4k+1 (e.g. 49, 81): the Wan VAE compresses 4 frames into one")
    if height < 16 or width < 16 or height % 16 or width % 16:
        raise GenerateError(f"--height/--width {height}x{width} must be positive multiples of 16")


# --------------------------------------------------------------------------- generation


@dataclass
class Request:
    """One clip to generate (a --prompt, or one line of --batch)."""

    prompt: str
    negative_prompt: str = ""
    trajectory: str = "orbit"
    seed: int = 42
    image: Optional[str] = None


@dataclass
class GenerateOptions:
    """`fwmodel generate` (see the module docstring); None sizes: the run's data.num_frames / height / width."""

    session: SessionOptions
    out: Path
    frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: int = 50
    guidance: float = 5.0
    sampler: str = "unipc"
    trajectory_scale: float = 1.0
    trajectory_speed: float = 1.0
    fov: Optional[float] = None
    points: str = "depth"  # POINT_SOURCES
    requests: list[Request] = field(default_factory=list)


def read_batch(path: Path, defaults: Request) -> list[Request]:
    """--batch: a .jsonl of {"prompt", "negative_prompt", "image", "trajectory", "seed"} per line, or a text file
    of one prompt per line (blank lines and lines starting with # skipped). Missing fields: the options'."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise GenerateError(f"--batch {path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    allowed = {"prompt", "negative_prompt", "image", "trajectory", "seed"}
    out = []
    for n, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix.lower() != ".jsonl":
            out.append(Request(line, defaults.negative_prompt, defaults.trajectory, defaults.seed, defaults.image))
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise GenerateError(f"--batch {path}:{n}: not JSON ({err})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise GenerateError(f"--batch {path}:{n}: each line must be a JSON object with a \"prompt\" string")
        extra = sorted(set(item) - allowed)
        if extra:
            raise GenerateError(f"--batch {path}:{n}: unknown keys {extra}; allowed: {', '.join(sorted(allowed))}")
        seed = item.get("seed", defaults.seed)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise GenerateError(f"--batch {path}:{n}: \"seed\" must be an integer")
        out.append(Request(item["prompt"], str(item.get("negative_prompt", defaults.negative_prompt)),
                           str(item.get("trajectory", defaults.trajectory)), seed,
                           item.get("image", defaults.image)))
    if not out:
        raise GenerateError(f"--batch {path}: no prompts")
    return out


def make_scheduler(sampler: str, shift: float, num_train_timesteps: int):
    """diffusers' flow-matching scheduler for Wan: UniPC (WanPipeline's default: flow_prediction, flow sigmas,
    flow_shift) or Euler (FlowMatchEulerDiscreteScheduler, shift); the shift is the run's diffusion.shift."""
    if sampler == "unipc":
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=shift, solver_order=2)
    if sampler == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    raise GenerateError(f"--sampler {sampler!r}: use {' or '.join(SAMPLERS)}")


def _check_image(request: Request, preset_config, n: int = 1, of: int = 1) -> None:
    """--image only with an image-to-video (I2V) checkpoint, and an I2V checkpoint only with one (GenerateError)."""
    from fwmodel.i2v import is_i2v

    if request.image is not None and not is_i2v(preset_config):
        raise GenerateError(f"--image needs an image-to-video (I2V) checkpoint; preset {preset_config.name} is "
                            "text-to-video (no first-frame conditioning)")
    if request.image is None and is_i2v(preset_config):
        where = f" (request {n} of {of} has none: give --image or an \"image\" on each --batch line)" if of > 1 else ""
        raise GenerateError(f"preset {preset_config.name} is an image-to-video (I2V) model: give the first frame with "
                            f"--image PATH (a PNG or JPEG){where}")


@dataclass
class FirstFrame:
    """An I2V first frame read from an image file (`read_first_frame`)."""

    path: str
    sha256: str  # of the file's bytes
    source_hw: tuple[int, int]  # the image's size before the resize and crop
    pixels: torch.Tensor  # [1, 3, H, W] float32 in [-1, 1], 8-bit levels


def cover_crop_uint8(frames: np.ndarray, height: int, width: int):
    """Frames [N, Hs, Ws, 3] uint8 -> ([N, H, W, 3] uint8, the ResizePlan): resized to cover H x W (bilinear,
    antialiased) and centre-cropped as training crops its clips (fwmodel.data.ResizePlan), rounded to 8 bits."""
    from fwmodel.data import ResizePlan

    plan = ResizePlan.cover(tuple(frames.shape[1:3]), (height, width))
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = plan.apply(x, "bilinear").clamp(0, 255).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()), plan


def read_first_frame(path, height: int, width: int) -> FirstFrame:
    """--image: an image file PIL reads (PNG, JPEG, ...; EXIF orientation applied, converted to RGB), resized and
    cropped to H x W by `cover_crop_uint8` (as a clip frame is), in [-1, 1]. GenerateError (one line) when the
    file is missing or not an image."""
    import io

    from PIL import Image, ImageOps

    path = Path(path)
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        why = getattr(err, "strerror", None) or str(err).split("\n")[0]
        raise GenerateError(f"--image {path}: cannot be read as an image ({why})") from None
    frame, _ = cover_crop_uint8(rgb[None], height, width)
    pixels = torch.from_numpy(frame).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return FirstFrame(str(path), hashlib.sha256(data).hexdigest(), tuple(rgb.shape[:2]), pixels)


def sample_id_for(request: Request, traj: Trajectory, opts: GenerateOptions, sha: str, T: int, H: int, W: int,
                  image_sha256: Optional[str] = None) -> str:
    """A stable id: the same checkpoint, prompt, seed, trajectory, first-frame image (by content) and settings
    give the same id."""
    from fwdata.dataset.contract import make_sample_id

    key = json.dumps({"checkpoint": sha, "prompt": request.prompt, "negative": request.negative_prompt,
                      "seed": request.seed, "image": image_sha256 or request.image, "steps": opts.steps,
                      "guidance": opts.guidance,
                      "sampler": opts.sampler, "w2c": np.round(traj.w2c, 9).tolist(),
                      "K": np.round(traj.K, 9).tolist()}, sort_keys=True)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    return make_sample_id(f"gen_{request.prompt[:40]}", fingerprint, 0, 1, T, H, W)


@torch.no_grad()
def sample_clip(session: Session, request: Request, traj: Trajectory, steps: int, guidance: float, sampler: str,
                first_frame: Optional[FirstFrame] = None):
    """Denoise one clip along `traj`. Returns (video [3, T, H, W] in [-1, 1], GeometryPrediction of the last step
    (batch index 0 is the conditional pass), the sigma of that step). An I2V session conditions every step on
    `first_frame` (default: `request.image` read at the clip's size)."""
    from fwmodel.inference import predict

    loaded, dev = session.loaded, session.device
    cfg = loaded.config
    T, H, W = traj.num_frames, traj.height, traj.width
    condition = image_embeds = None
    if session.i2v:
        if first_frame is None:
            _check_image(request, loaded.model.config)
            first_frame = read_first_frame(request.image, H, W)
        if tuple(first_frame.pixels.shape[-2:]) != (H, W):
            raise GenerateError(f"the first frame is {tuple(first_frame.pixels.shape[-2:])}, the clip {(H, W)} (H, W)")
        condition, image_embeds = session.i2v_inputs(first_frame.pixels, T)
    cfg_on = guidance > 1.0  # as WanPipeline: no negative pass when guidance <= 1
    prompts = [request.prompt, request.negative_prompt] if cfg_on else [request.prompt]
    text = session.encode_text(prompts)
    B = len(prompts)
    w2c = torch.from_numpy(traj.w2c).float()[None]
    K = torch.from_numpy(traj.K).float()[None]
    # the rays of the checkpoint's convention (plucker_intrinsics: the release's double scaling for its weights)
    plucker = loaded.model.camera_rays(w2c, K, H, W).expand(B, -1, -1, -1, -1)
    S = (T - 1) // 4 + 1
    generator = torch.Generator(device="cpu").manual_seed(int(request.seed))
    latents = torch.randn((1, 16, S, H // 8, W // 8), generator=generator, dtype=torch.float32).to(dev)
    scheduler = make_scheduler(sampler, cfg.diffusion.shift, cfg.diffusion.num_train_timesteps)
    scheduler.set_timesteps(steps, device=dev)
    last, sigma = None, None
    if condition is not None:  # the same condition and image tokens for both passes (WanImageToVideoPipeline)
        condition, image_embeds = condition.expand(B, -1, -1, -1, -1), image_embeds.expand(B, -1, -1)
    with session.model_running():
        for i, t in enumerate(scheduler.timesteps):
            x = latents.expand(B, -1, -1, -1, -1)
            pred = predict(loaded, x, text, t.expand(B).float(), plucker=plucker, video=True, amp=session.amp,
                           condition=condition, image_embeds=image_embeds)
            v = pred.video.to(dev)
            velocity = v[1:2] + guidance * (v[0:1] - v[1:2]) if cfg_on else v[0:1]
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            last, sigma = pred, float(t) / cfg.diffusion.num_train_timesteps
    video = session.decode_video(latents)[0]
    return video, last, sigma


def generate(opts: GenerateOptions, command: str = "fwmodel generate",
             echo: Callable[[str], None] = lambda s: None):
    """Generate every request of `opts` with one model load; write the dataset at `opts.out`. Returns its
    DatasetMetadata. Raises the one-line errors of `open_session`, GenerateError, TrajectoryError, OSError."""
    from fwdata import __version__
    from fwdata.dataset.contract import REQUESTED_CAMERAS_DIR, SampleProvenance, SampleRecord, SourceRef, sample_paths
    from fwdata.dataset.store import (atomic_write_text, check_output_folder, check_writable_folder, write_lock,
                                      write_sample)
    from fwmodel.config import get_preset
    from fwmodel.inference import run_config

    if not opts.requests:
        raise GenerateError("nothing to generate: give --prompt or --batch")
    if opts.steps < 1:
        raise GenerateError(f"--steps {opts.steps} must be at least 1")
    if not math.isfinite(opts.guidance) or opts.guidance < 0:
        raise GenerateError(f"--guidance {opts.guidance:g} must be a finite number >= 0")
    if opts.sampler not in SAMPLERS:
        raise GenerateError(f"--sampler {opts.sampler!r}: use {' or '.join(SAMPLERS)}")
    path = Path(opts.session.checkpoint)
    header = checkpoint_header(path)
    if header is not None:  # sizes and --image are checked before anything large is loaded
        cfg = run_config(path, header)
        T = opts.frames or cfg.data.num_frames
        H = opts.height or cfg.data.height
        W = opts.width or cfg.data.width
        for n, r in enumerate(opts.requests, start=1):
            _check_image(r, get_preset(header["preset"]), n, len(opts.requests))
    else:
        T, H, W = opts.frames or 81, opts.height or 336, opts.width or 592
    check_clip_size(T, H, W)
    # every trajectory is read before the model loads: a bad file costs nothing
    trajectories = [resolve_trajectory(r.trajectory, T, H, W, opts.trajectory_scale, opts.trajectory_speed, opts.fov)
                    for r in opts.requests]
    # and every --image (I2V first frames: a missing or broken file is one line before the model loads)
    first_frames = [None if r.image is None else read_first_frame(r.image, H, W) for r in opts.requests]
    out = Path(opts.out)
    check_writable_folder(out, create=False)  # a bad --out is one line before the model loads; created after
    batch = 2 if opts.guidance > 1.0 else 1
    session = open_session(opts.session, T, H, W, batch, require_stage2=True, what="generate", echo=echo)
    for n, r in enumerate(opts.requests, start=1):
        _check_image(r, session.loaded.model.config, n, len(opts.requests))
    check_output_folder(out)
    run_info = session.provenance()
    models = session.models()
    seen: dict[str, int] = {}
    with write_lock(out):
        for n, (request, traj, first) in enumerate(zip(opts.requests, trajectories, first_frames), start=1):
            sid = sample_id_for(request, traj, opts, session.checkpoint_sha256, T, H, W,
                                image_sha256=first.sha256 if first else None)
            if sid in seen:
                raise GenerateError(f"request {n} repeats request {seen[sid]} (same prompt, seed, trajectory and "
                                    "image)")
            seen[sid] = n
            video, pred, sigma = sample_clip(session, request, traj, opts.steps, opts.guidance, opts.sampler, first)
            frames = video_to_uint8(video)
            data, notes = prediction_sample(pred, 0, frames, GENERATED_FPS, f"generating {sid}", opts.points)
            settings = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
                        "image": request.image, "steps": opts.steps, "guidance": opts.guidance,
                        "sampler": opts.sampler, "shift": session.loaded.config.diffusion.shift,
                        "trajectory": {"spec": traj.spec, "source": traj.source, "scale": opts.trajectory_scale,
                                       "speed": opts.trajectory_speed, "fov_deg": opts.fov},
                        "geometry_sigma": sigma, "points": opts.points}
            image_note = []
            if first is not None:
                settings["image_sha256"] = first.sha256
                settings["image_size"] = [first.source_hw[1], first.source_hw[0]]  # width, height of the file
                image_note = [f"image-to-video: first frame from {first.path} (sha256 {first.sha256}, "
                              f"{first.source_hw[1]}x{first.source_hw[0]} resized to cover {W}x{H} and centre-cropped)"]
            record = SampleRecord(
                id=sid, paths=sample_paths(sid), num_frames=T, height=H, width=W, fps=GENERATED_FPS,
                scale="normalized",
                scale_source="the model's normalised frame (training scales each clip to mean point distance 1 "
                             "from camera 0)",
                depth_source=f"FantasyWorld geometry branch (fwmodel generate), last step sigma {sigma:.4f}",
                source=SourceRef(path=f"generated:{sid}", fps=GENERATED_FPS, num_frames=T,
                                 width=W, height=H, start_frame=0, stride=1, crop_xywh=(0.0, 0.0, float(W), float(H)),
                                 resize_scale=(1.0, 1.0)),
                notes=[f"generated from the prompt {request.prompt[:200]!r} (seed {request.seed}) along trajectory "
                       f"{traj.spec}; camera_params holds the PREDICTED cameras, "
                       f"{REQUESTED_CAMERAS_DIR}/{sid}.json the requested ones", *image_note, *notes],
                provenance=SampleProvenance(tool_version=__version__, options={"generate": settings, **run_info},
                                            models=models),
            )
            requested = traj.camera_file()
            atomic_write_text(out / REQUESTED_CAMERAS_DIR / f"{sid}.json", requested.model_dump_json(indent=1) + "\n")
            write_sample(out, record, data)
            echo(f"generated {sid} ({n}/{len(opts.requests)}): {traj.source}")
        options = {"frames": T, "height": H, "width": W, "steps": opts.steps, "guidance": opts.guidance,
                   "sampler": opts.sampler, "trajectory_scale": opts.trajectory_scale,
                   "trajectory_speed": opts.trajectory_speed, "fov_deg": opts.fov, "points": opts.points, **run_info}
        return write_outputs_metadata(out, command, {"generate": options}, models)


__all__ = ["GenerateError", "GenerateOptions", "Request", "SessionOptions", "TrajectoryError", "generate",
           "open_session", "read_batch"]
