"""Per-frame depth: Depth Anything through `transformers`, or an imported depth prior.

Two kinds of depth come out of this stage, and the alignment stage treats them by their meaning:

- ``relative``: affine-invariant *inverse* depth (disparity up to an unknown scale and shift), what
  the relative Depth Anything models predict. Larger = closer; 0 or less = "infinitely far" (sky).
- ``metric``: z-depth in metres (metric Depth Anything variants, RGB-D sensors, other metric
  estimators).

The model runs batched over the frames of a clip, on the GPU when there is one. Inputs are resized
on the device as the transformers Depth Anything processor does (keep the aspect ratio, scale as
little as possible so one side is ``input_size``, sides multiples of the 14-pixel ViT patch),
normalised with the model's mean/std, and the prediction is resized back to the clip size.

``--depth-model random-tiny`` builds a small, randomly initialised Depth Anything from a config
(seeded, no download) so the whole pipeline runs offline in tests and demos; its output is
meaningless and the dataset says so (`ModelInfo.random_init`).

``--depth-prior DIR`` imports external depth instead of running a model; see `load_prior` for the
file layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fwdata.dataset.contract import ModelInfo

RANDOM_TINY = "random-tiny"
DEFAULT_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
DepthKind = Literal["relative", "metric"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DepthOptions(BaseModel):
    """Depth stage options (`[depth]` in a build preset)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(DEFAULT_MODEL, description="hub id, local directory, or 'random-tiny'")
    revision: Optional[str] = Field(None, description="hub revision (branch, tag or commit) of the model")
    kind: Literal["auto", "relative", "metric"] = Field(
        "auto", description="what the model predicts; auto reads config.depth_estimation_type"
    )
    prior_dir: Optional[str] = Field(None, description="import depth from this folder instead of running a model")
    batch_size: int = Field(8, ge=1, description="frames per forward pass")
    input_size: int = Field(518, ge=14, description="model input size: the image is scaled as little as possible so "
                                                    "one side has this length (the transformers processor's rule)")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="inference precision on GPU (CPU always runs float32)"
    )


class DepthError(RuntimeError):
    """The depth stage cannot run for a clip (bad prior file, model failure). One actionable line."""


class DepthModelError(RuntimeError):
    """The depth model cannot be loaded at all: a usage error that stops the build before it starts."""


@dataclass
class DepthResult:
    """Depth of every frame of a clip at the clip size.

    values (T,H,W) float32: inverse depth (relative) or z-depth in metres (metric); valid (T,H,W).
    """

    values: np.ndarray
    valid: np.ndarray
    kind: DepthKind
    source: str  # "depth-anything", "prior", ...


# --------------------------------------------------------------------------- models


def random_tiny_model():
    """A small randomly initialised Depth Anything (about 120k parameters), the same on every call.

    The decoder's convolutions get He initialisation (transformers' default std 0.02 would give a
    constant output), so the prediction depends on the image like a real model's would, though it
    means nothing.
    """
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=126,
                            patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                 head_hidden_size=8, reassemble_hidden_size=32, depth_estimation_type="relative")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = DepthAnythingForDepthEstimation(config)
        with torch.no_grad():
            for mod in list(model.neck.modules()) + list(model.head.modules()):
                if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                    if mod.bias is not None:
                        mod.bias.zero_()
            model.head.conv3.bias.fill_(1.0)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def check_model_available(opts: DepthOptions) -> None:
    """Fail fast (DepthModelError) when the depth model's config cannot be found locally or on the hub.

    Only the small config file is read; the weights are loaded by the workers.
    """
    if opts.prior_dir is not None:
        d = Path(opts.prior_dir)
        if not d.is_dir():
            raise DepthModelError(f"--depth-prior {d}: not a folder")
        return
    if opts.model == RANDOM_TINY:
        return
    p = Path(opts.model)
    if p.exists():
        if not (p / "config.json").is_file():
            raise DepthModelError(f"--depth-model {p}: no config.json in this folder; give a transformers model "
                                  f"directory (save_pretrained) or a hub id")
        return
    try:
        from transformers import AutoConfig

        try:  # the local cache first: no network, no retries
            AutoConfig.from_pretrained(opts.model, revision=opts.revision, local_files_only=True)
            return
        except Exception:
            pass
        unreachable = _hub_unreachable()
        if unreachable:  # fail at once instead of half a minute of HTTP retries
            raise OSError(f"not in the local cache, and {unreachable}")
        AutoConfig.from_pretrained(opts.model, revision=opts.revision)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DepthModelError(
            f"--depth-model {opts.model!r} could not be loaded ({first}). Download it first "
            f"(hf download {opts.model}), pass a local directory, or use --depth-model random-tiny "
            f"for a quick offline run") from None


def _hub_unreachable() -> str:
    """Why the model hub cannot be reached right now ("" when it may be): offline mode, or its host
    name does not resolve. A quick local check; a reachable hub still gets the normal request."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:  # pragma: no cover
        host = "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"the hub ({host}) cannot be reached from this machine"
    return ""


def model_info(opts: DepthOptions, revision: Optional[str] = None) -> ModelInfo:
    """How the depth was made, for metadata.json provenance."""
    if opts.prior_dir is not None:
        return ModelInfo(role="depth", name=f"prior:{opts.prior_dir}")
    if opts.model == RANDOM_TINY:
        return ModelInfo(role="depth", name=RANDOM_TINY, revision="seed0", random_init=True)
    return ModelInfo(role="depth", name=opts.model, revision=revision or opts.revision)


def _round14(x: float) -> int:
    return max(14, int(round(x / 14.0)) * 14)


class DepthEstimator:
    """A loaded depth model; `predict(frames)` runs it batched over a clip."""

    def __init__(self, opts: DepthOptions):
        import torch

        self.opts = opts
        if opts.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(opts.device)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.revision: Optional[str] = None
        if opts.model == RANDOM_TINY:
            self.model = random_tiny_model()
            self.input_size = min(opts.input_size, 126)  # tiny model, tiny input
        else:
            from transformers import AutoModelForDepthEstimation

            try:
                self.model = AutoModelForDepthEstimation.from_pretrained(opts.model, revision=opts.revision).eval()
            except Exception as e:
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise DepthModelError(f"cannot load depth model {opts.model!r}: {first}") from None
            self.revision = getattr(self.model.config, "_commit_hash", None)
            self.input_size = opts.input_size
            self._read_normalisation(opts.model)
        declared = getattr(self.model.config, "depth_estimation_type", "relative")
        self.kind: DepthKind = ("metric" if declared == "metric" else "relative") if opts.kind == "auto" else opts.kind
        self.dtype = torch.float32
        if self.device.type == "cuda" and opts.dtype != "float32":
            self.dtype = getattr(torch, opts.dtype)
        self.model.to(device=self.device, dtype=self.dtype)

    def _read_normalisation(self, name: str) -> None:
        p = Path(name) / "preprocessor_config.json"
        try:
            if p.is_file():
                cfg = json.loads(p.read_text())
            else:
                from huggingface_hub import hf_hub_download

                cfg = json.loads(Path(hf_hub_download(name, "preprocessor_config.json", revision=self.opts.revision))
                                 .read_text())
            self.mean = tuple(cfg.get("image_mean", IMAGENET_MEAN))
            self.std = tuple(cfg.get("image_std", IMAGENET_STD))
        except Exception:
            pass  # Depth Anything uses the ImageNet statistics

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """Model input size for a clip, as the transformers Depth Anything processor sizes it: keep the
        aspect ratio, scale as little as possible so one side becomes `input_size`, round to 14."""
        sh, sw = self.input_size / height, self.input_size / width
        s = sw if abs(1.0 - sw) < abs(1.0 - sh) else sh
        return _round14(height * s), _round14(width * s)

    def predict(self, frames: np.ndarray, should_stop: Optional[Callable[[], bool]] = None) -> Optional[DepthResult]:
        """frames (T,H,W,3) uint8 -> DepthResult at (T,H,W); None when `should_stop()` turned True."""
        import torch
        import torch.nn.functional as F

        T, H, W = frames.shape[:3]
        h_in, w_in = self.input_shape(H, W)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        out = np.empty((T, H, W), np.float32)
        with torch.inference_mode():
            for a in range(0, T, self.opts.batch_size):
                if should_stop is not None and should_stop():
                    return None
                x = torch.from_numpy(np.ascontiguousarray(frames[a:a + self.opts.batch_size])).to(self.device)
                x = x.permute(0, 3, 1, 2).float() / 255.0
                x = F.interpolate(x, size=(h_in, w_in), mode="bicubic", align_corners=False, antialias=True)
                x = ((x.clamp(0, 1) - mean) / std).to(self.dtype)
                pred = self.model(pixel_values=x).predicted_depth
                pred = F.interpolate(pred[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]
                out[a:a + len(pred)] = pred.cpu().numpy()
        valid = np.isfinite(out) & (out > 0)
        return DepthResult(values=out, valid=valid, kind=self.kind, source="depth-anything")


_CACHE: dict[str, DepthEstimator] = {}


def get_estimator(opts: DepthOptions) -> DepthEstimator:
    """The process's estimator for these options (loaded once per worker process)."""
    key = opts.model_dump_json()
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = DepthEstimator(opts)
    return _CACHE[key]


# --------------------------------------------------------------------------- priors


def prior_path(prior_dir: Path, sample_id: str, source: str) -> Optional[Path]:
    """`<dir>/<sample id>.npz` (one clip) if present, else `<dir>/<video stem>.npz` (whole video)."""
    for name in (f"{sample_id}.npz", f"{Path(source).stem}.npz"):
        p = Path(prior_dir) / name
        if p.is_file():
            return p
    return None


def load_prior(prior_dir: str, plan) -> DepthResult:
    """Import external depth for one clip (`plan` is a `fwdata.build.clips.ClipPlan`).

    Layout: a folder of ``.npz`` files, looked up as ``<sample id>.npz`` (exactly this clip: T
    slices) or ``<video stem>.npz`` (the whole video: slice i is source frame i, or
    ``frame_indices[i]`` when that array is present). Each file holds exactly one of

    - ``depth``: metric z-depth in metres, (N, h, w) float, 0 / nan where unknown; or
    - ``inverse_depth``: relative, affine-invariant inverse depth (N, h, w) float, larger = closer;

    and optionally ``valid`` (N, h, w) bool. Any h x w works: a whole-video prior covers the source
    frame (the clip's crop is applied); a per-clip prior covers the clip. Values are resampled to
    the clip size with nearest-neighbour lookups (no mixing across depth edges).
    """
    path = prior_path(Path(prior_dir), plan.sample_id, plan.source)
    if path is None:
        raise DepthError(f"no depth prior for this clip: expected {Path(prior_dir) / (plan.sample_id + '.npz')} or "
                         f"{Path(prior_dir) / (Path(plan.source).stem + '.npz')}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DepthError(f"depth prior {path} cannot be read as npz ({type(e).__name__}: {e})") from None
    kinds = [k for k in ("depth", "inverse_depth") if k in arrays]
    if len(kinds) != 1:
        raise DepthError(f"depth prior {path} must hold exactly one of 'depth' (metric) or 'inverse_depth' "
                         f"(relative); found {sorted(arrays)}")
    key = kinds[0]
    values = np.asarray(arrays[key], dtype=np.float32)
    if values.ndim != 3:
        raise DepthError(f"depth prior {path}: {key!r} has shape {values.shape}, expected (frames, height, width)")
    valid = np.asarray(arrays["valid"], dtype=bool) if "valid" in arrays else np.ones(values.shape, bool)
    if valid.shape != values.shape:
        raise DepthError(f"depth prior {path}: 'valid' has shape {valid.shape}, expected {values.shape}")
    per_clip = path.stem == plan.sample_id
    if per_clip:
        if len(values) != plan.num_frames:
            raise DepthError(f"depth prior {path} has {len(values)} frames, the clip has {plan.num_frames}")
        slices = list(range(plan.num_frames))
        box = (0.0, 0.0, float(values.shape[2]), float(values.shape[1]))
        out_h, out_w = plan.height, plan.width
    else:
        frame_idx = arrays.get("frame_indices")
        lookup = ({int(f): i for i, f in enumerate(np.asarray(frame_idx).ravel())} if frame_idx is not None
                  else {i: i for i in range(len(values))})
        missing = [f for f in plan.source_frames if f not in lookup]
        if missing:
            raise DepthError(f"depth prior {path} lacks source frames {missing[:5]}{'...' if len(missing) > 5 else ''} "
                             f"of this clip")
        slices = [lookup[f] for f in plan.source_frames]
        sx_p, sy_p = values.shape[2] / plan.info.width, values.shape[1] / plan.info.height
        x0, y0, cw, ch = plan.crop_xywh
        box = (x0 * sx_p, y0 * sy_p, cw * sx_p, ch * sy_p)
        out_h, out_w = plan.height, plan.width
    out = np.empty((plan.num_frames, out_h, out_w), np.float32)
    ok = np.empty((plan.num_frames, out_h, out_w), bool)
    rows, cols = _nearest_lookup(box, values.shape[1], values.shape[2], out_h, out_w)
    for t, s in enumerate(slices):
        out[t] = values[s][rows[:, None], cols[None, :]]
        ok[t] = valid[s][rows[:, None], cols[None, :]]
    ok &= np.isfinite(out) & ((out > 0) if key == "depth" else np.ones_like(ok))
    out[~ok] = 0.0
    kind: DepthKind = "metric" if key == "depth" else "relative"
    if kind == "relative":
        ok &= out > 0  # inverse depth <= 0 is "infinitely far": no depth
    return DepthResult(values=out, valid=ok, kind=kind, source=f"prior:{path.name}")


def _nearest_lookup(box: tuple[float, float, float, float], in_h: int, in_w: int, out_h: int,
                    out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices into an (in_h, in_w) image for each output pixel centre of a box resize."""
    x0, y0, bw, bh = box
    u = x0 + (np.arange(out_w) + 0.5) * (bw / out_w)
    v = y0 + (np.arange(out_h) + 0.5) * (bh / out_h)
    cols = np.clip(np.floor(u).astype(np.int64), 0, in_w - 1)
    rows = np.clip(np.floor(v).astype(np.int64), 0, in_h - 1)
    return rows, cols


def estimate_depth(frames: np.ndarray, opts: DepthOptions, plan=None,
                   should_stop: Optional[Callable[[], bool]] = None) -> Optional[DepthResult]:
    """The depth stage: a prior when `opts.prior_dir` is set (needs `plan`), else the model.

    `should_stop` is checked between batches; when it returns True the model stops and None is returned.
    """
    if opts.prior_dir is not None:
        if plan is None:
            raise ValueError("a depth prior needs the clip plan")
        return load_prior(opts.prior_dir, plan)
    return get_estimator(opts).predict(frames, should_stop=should_stop)
