"""A trained checkpoint, loaded for inference, and one forward pass of it.

Every after-training command (`fwmodel generate`, `reconstruct`, `eval`) loads its model here, so a
damaged, mismatched or wrong-stage file is refused with exactly the messages training gives
(`fwmodel.checkpoint`), and the model is built the way training built it (`fwmodel.train.model.build_model`):

- the run's own config comes from the checkpoint's sidecar (`extra.train`, written by `save_state`);
  options given here (`wan_weights`, `device`) override only where a path or the device differs;
- the frozen Wan backbone is the weights the run names (or `wan_weights`); a run trained on the
  tiny preset's `random` backbone gets the same seeded random backbone back (same `train.seed`);
- the trainable parts (geometry branch, and for Stage 2 the camera adapters and bi-cross-attention)
  come from the checkpoint through `load_trainable`.

Conventions of the outputs (`GeometryPrediction`): the model's normalised frame, as in training
(`fwmodel.data.load_geometry`): frame 0's camera is the world, the scene scaled so the mean point
distance from camera 0 is about 1. Depth is z-depth in those units; points are world (= camera-0) xyz;
cameras are w2c with pinhole K in pixels of the model's frame size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from fwmodel.checkpoint import CheckpointError, load_trainable, read_sidecar, verify_checkpoint_file
from fwmodel.pose import decode_pose

if TYPE_CHECKING:
    from fwmodel.config import ModelConfig


class InferenceError(ValueError):
    """A one-line problem with what inference was asked to load or run (paths, devices, encoders)."""


@dataclass
class LoadedModel:
    """A checkpoint's model ready for inference (eval mode, no gradients)."""

    model: torch.nn.Module  # FantasyWorldModel
    config: object  # fwmodel.train.config.TrainConfig of the run that wrote the checkpoint
    header: dict  # the checkpoint's header: format, preset, fingerprint, stage, step
    path: Path
    device: torch.device
    log: list[str]  # what loading did (backbone source, etc.), for provenance and -v output

    @property
    def stage(self) -> int:
        return int(self.header["stage"])

    @property
    def step(self) -> Optional[int]:
        return self.header.get("step")

    def provenance(self) -> dict:
        """What to record beside an output: the checkpoint and how the model was built."""
        return {"checkpoint": str(self.path), "preset": self.header.get("preset"), "stage": self.stage,
                "step": self.step, "fingerprint": self.header.get("fingerprint"),
                "wan_weights": self.config.model.wan_weights}


class _CollectLog:
    """The `log.info` that `build_model` calls, keeping the lines instead of printing them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, console: bool = True) -> None:
        self.lines.append(message)


def resolve_device(name: str = "auto") -> torch.device:
    """auto: the first GPU when there is one, else the CPU; or an explicit cpu / cuda / cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise InferenceError(f"device {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceError(f"device {name} asked for, but no GPU is visible (check CUDA_VISIBLE_DEVICES)")
    return torch.device(name)


def run_config(path: Path, header: dict):
    """The TrainConfig of the run that wrote checkpoint `path` (its sidecar's `extra.train`).

    A checkpoint without it (written by other tools, or with --allow-missing-sidecar) gets the
    defaults for its preset and stage: the backbone must then be given (`wan_weights`).
    """
    from pydantic import ValidationError

    from fwmodel.train.config import TrainConfig

    sidecar = read_sidecar(path) or {}
    train = (sidecar.get("extra") or {}).get("train")
    try:
        cfg = TrainConfig.model_validate(train) if train else TrainConfig()
    except ValidationError as err:
        first = err.errors()[0]
        raise CheckpointError(
            f"the sidecar of checkpoint {path} holds a training config this version cannot read "
            f"({'.'.join(str(p) for p in first['loc'])}: {first['msg']}); it was written by another fwmodel version"
        ) from None
    cfg.train.stage = int(header["stage"])
    cfg.model.preset = header["preset"]
    return cfg


def load_model(checkpoint: str | Path, wan_weights: Optional[str] = None, device: str = "auto",
               allow_missing_sidecar: bool = False, release_preset: Optional[str | ModelConfig] = None) -> LoadedModel:
    """Load `checkpoint` (a step-N.safetensors of `fwmodel train`) for inference.

    Also the released FantasyWorld weights (fwmodel.release): a release-layout .safetensors (no sidecar;
    built as `release_preset` (a preset name, default wan2.1-i2v-14b, with the release switches, or a
    ModelConfig that has them); the backbone must be
    given: `wan_weights`), or a `fwmodel convert-release` checkpoint (its header names the release
    switches). A release .pth is refused with the conversion command.

    Raises CheckpointError (damaged, mismatched, unreadable: the training checks) or
    ConfigError/BackboneWeightsError (the backbone cannot be found) with one-line messages,
    before any large weights are read when the checkpoint itself is bad.
    """
    from fwmodel.release import RELEASE_PRESET, model_config_for, read_release_file, release_source
    from fwmodel.train.model import build_model

    path = Path(checkpoint)
    kind = release_source(path)
    if kind == "pickle":
        read_release_file(path)  # refuses the pickle with the conversion command
    if kind == "release":
        return _load_release(path, wan_weights, device, release_preset or RELEASE_PRESET)
    header = verify_checkpoint_file(path, verify_hash=True, allow_missing_sidecar=allow_missing_sidecar)
    if header.get("stage") not in (1, 2):
        raise CheckpointError(f"checkpoint {path} has stage {header.get('stage')!r}; fwmodel writes stage 1 or 2")
    cfg = run_config(path, header)
    if wan_weights is not None:
        cfg.model.wan_weights = wan_weights
    dev = resolve_device(device)
    if dev.type == "cpu":
        cfg.model.backbone_dtype = "float32"  # bf16 matmuls on a CPU are slow and gain nothing here
    log = _CollectLog()
    config = model_config_for(header["preset"], header.get("fingerprint"), (read_sidecar(path) or {}).get("config"))
    model = build_model(cfg, dev, log, config=config)
    load_trainable(model, path, int(header["stage"]), verify_hash=False, allow_missing_sidecar=allow_missing_sidecar)
    model.eval().requires_grad_(False)
    return LoadedModel(model, cfg, header, path, dev, log.lines)


def _load_release(path: Path, wan_weights: Optional[str], device: str, preset) -> LoadedModel:
    """A release-layout file as a Stage-2 model of `release_config(preset)` (see `load_model`)."""
    from fwmodel.release import RELEASE_FORMAT, load_release, release_config
    from fwmodel.train.config import TrainConfig
    from fwmodel.train.model import build_model

    config = release_config(preset) if isinstance(preset, str) else preset
    preset = config.name
    cfg = TrainConfig()
    cfg.train.stage, cfg.model.preset, cfg.model.wan_weights = 2, preset, wan_weights
    dev = resolve_device(device)
    if dev.type == "cpu":
        cfg.model.backbone_dtype = "float32"
    log = _CollectLog()
    model = build_model(cfg, dev, log, config=config)
    log.info(load_release(model, path).line())
    model.eval().requires_grad_(False)
    header = {"format": RELEASE_FORMAT, "preset": preset, "fingerprint": config.fingerprint(), "stage": 2,
              "step": None}
    return LoadedModel(model, cfg, header, path, dev, log.lines)


@dataclass
class GeometryPrediction:
    """The geometry branch's outputs for B clips of T frames at H x W (the model's normalised frame)."""

    depth: torch.Tensor  # [B, T, H, W] z-depth
    depth_conf: torch.Tensor  # [B, T, H, W]
    points: torch.Tensor  # [B, T, H, W, 3] world (camera-0) xyz
    points_conf: torch.Tensor  # [B, T, H, W]
    w2c: torch.Tensor  # [B, T, 4, 4]
    K: torch.Tensor  # [B, T, 3, 3] pixels of H x W, principal point at the centre
    pose_enc: torch.Tensor  # [B, T, 9] the camera head's last iteration
    video: Optional[torch.Tensor] = None  # [B, 16, S, Hl, Wl] the predicted flow velocity (video=True)


@torch.no_grad()
def predict(loaded: LoadedModel, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor,
            plucker: Optional[torch.Tensor] = None, video: bool = False,
            amp: Optional[torch.dtype] = torch.bfloat16, condition: Optional[torch.Tensor] = None,
            image_embeds: Optional[torch.Tensor] = None) -> GeometryPrediction:
    """One forward pass: latents [B, 16, S, Hl, Wl] at `timestep` [B] (0..1000), text [B, 512, D].

    `plucker` [B, T, H, W, 6] conditions the camera adapters (Stage 2); `video=True` also runs the
    video half and returns Wan's velocity prediction (generation); geometry-only otherwise.
    `amp`: the autocast dtype on a GPU (None: no autocast, e.g. `fwmodel generate --dtype fp32`).
    I2V models also take `condition` [B, 20, S, Hl, Wl] and `image_embeds` [B, N, image_dim]
    (fwmodel.i2v), cast like the latents.
    """
    model, dev = loaded.model, loaded.device
    dtype = next(model.backbone.parameters()).dtype
    autocast = (torch.autocast(dev.type, dtype=amp) if dev.type == "cuda" and amp is not None
                else _nullcontext())
    with autocast:
        out = model(latents.to(dev, dtype), timestep.to(dev), text.to(dev, dtype),
                    condition=None if condition is None else condition.to(dev, dtype),
                    image_embeds=None if image_embeds is None else image_embeds.to(dev, dtype),
                    plucker=None if plucker is None else plucker.to(dev), video=video and loaded.stage == 2)
    depth = out["depth"][..., 0].float()
    H, W = depth.shape[-2:]
    pose_enc = out["pose_enc"].float()
    w2c, K = decode_pose(pose_enc, float(H), float(W))
    return GeometryPrediction(
        depth=depth, depth_conf=out["depth_conf"].float(), points=out["points"].float(),
        points_conf=out["points_conf"].float(), w2c=w2c, K=K, pose_enc=pose_enc,
        video=None if out.get("video") is None else out["video"].float(),
    )


def _nullcontext():
    from contextlib import nullcontext

    return nullcontext()


def load_encoders(loaded: LoadedModel, vae: Optional[str | Path] = None, text_encoder: Optional[str | Path] = None,
                  dtype: torch.dtype = torch.float32):
    """The Wan VAE and UMT5 text encoder (fwmodel.cache's, as the latent cache uses them).

    Paths: the options, else the run's `model.vae` / `model.text_encoder`, else the encoders recorded
    by the run's latent cache (its provenance). `random-tiny` names the tests' tiny random encoders.
    Returns (VideoEncoder, TextEncoder).
    """
    from fwmodel.cache import TextEncoder, VideoEncoder

    cfg = loaded.config
    vae = vae or cfg.model.vae or _cache_encoder(cfg, "vae")
    text_encoder = text_encoder or cfg.model.text_encoder or _cache_encoder(cfg, "text_encoder")
    missing = [flag for flag, value in (("--vae", vae), ("--text-encoder", text_encoder)) if value is None]
    if missing:
        raise InferenceError(
            f"no {' or '.join(missing)} known for checkpoint {loaded.path}: pass {' and '.join(missing)} (the Wan2.1 "
            "repository root, e.g. weights/wan, or random-tiny for a tiny test run)")
    from fwmodel.config import get_preset

    text_dim = get_preset(cfg.model.preset).wan.text_dim
    return (VideoEncoder(Path(str(vae)), loaded.device, dtype),
            TextEncoder(Path(str(text_encoder)), loaded.device, dtype, text_dim=text_dim))


def _cache_encoder(cfg, which: str) -> Optional[str]:
    """The encoder path the run's latent cache recorded (`random-tiny` for the tiny random ones), if any."""
    import json

    from fwmodel.cache import cache_root

    if cfg.data.root is None:
        return None
    root = cache_root(Path(cfg.data.root), cfg.data.cache_dir)
    for info in sorted(root.glob("*/cache.json")) if root.is_dir() else []:
        try:
            manifest = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        path = (manifest.get(which) or {}).get("path")  # `random-tiny` for the tiny random encoders
        if path not in (None, "None"):
            return str(path)
    return None
