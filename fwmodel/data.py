"""Training data: samples of a dataset in the contract (v1), as tensors for one training stage.

One sample (`TrainingDataset[i]`), for a stage that trains on T = 4k+1 frames at H x W:

    frames          T source frames: start, start + stride, ..., from the clip (window "start",
                    "center" or "random")
    resize + crop   to cover H x W, then a centred crop; intrinsics follow (bilinear for video,
                    nearest for depth / points / masks, so no value is invented across an edge)
    normalise       cameras relative to the first sampled frame (w2c_0 = identity), points moved
                    into that frame; depth, points and translations divided by one per-sample scale
                    s = mean distance of the valid points (all frames) from camera 0 (VGGT)
    masks           depth > 0 and finite, points finite, and the dataset's own valid masks;
                    invalid values are set to 0 (never NaN)

returns a dict of tensors (and the sample id):

    latents   [16, S, H/8, W/8]   Wan VAE latents (from the cache), or
    video     [3, T, H, W]        RGB in [-1, 1] when there is no cache (the trainer encodes it)
    text      [512, text_dim]     UMT5 embedding (from the cache), or `prompt` (a string) without one
    condition [20, S, H/8, W/8]   image-to-video presets with a cache: mask + first-frame latent
    image_embeds [N, image_dim]   ... and the first frame's CLIP tokens (fwmodel.i2v; without a cache
                                  the trainer encodes both from `video`)
    depth     [T, H, W]           z-depth / s,            depth_valid  [T, H, W] bool
    points    [T, H, W, 3]        points in camera 0 / s, points_valid [T, H, W] bool
    w2c       [T, 4, 4]           relative to frame 0, translation / s
    K         [T, 3, 3]           pixel intrinsics at H x W
    pose_enc  [T, 9]              the 9-d encoding [t, q_xyzw, fov_h, fov_w] of (w2c, K)
    scale     []                  s, in the dataset's unit

Plucker rays [B, T, H, W, 6] (Stage-2 camera conditioning) are built on the training device from
`w2c` and `K` by `plucker_for_batch` (they are 6 floats per pixel: too big to ship through the
loader at 81 x 336 x 592).

Which samples: those of `split` (or all) whose status is "ok"; gated-out samples only with
`include_gated_out`. Samples too short for T frames at the stride are skipped and reported.
The sample's files come from a `FolderSource` (the dataset folder) or a `MemorySource` (the members of
one WebDataset sample of a shard, in memory: fwmodel.shard_data); `load_frames` / `load_geometry`
read either, so both give the same tensors.

Samples whose labels were made by a randomly initialised model (`random_init` in the sample's
`provenance.models`, or in metadata.json's `provenance.models` for samples without their own) are
listed in `Selection.random_init`; the trainer refuses them unless `allow_random_init_labels`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch.utils.data import Dataset, Sampler

from fwdata.dataset import camera as cam
from fwdata.textout import plural
from fwdata.dataset.contract import (
    DEPTH_NPZ,
    POINTS_NPZ,
    CameraFile,
    ContractError,
    DatasetMetadata,
    SampleRecord,
    load_metadata,
    load_npz,
    read_camera_json,
    read_npz,
    resolve_inside,
)

Window = Literal["start", "center", "random"]


class DataError(ValueError):
    """The dataset cannot feed this training run; the message says why and what to do (one line).

    One raised in a DataLoader worker (a damaged shard or cache entry, read by the worker) is raised
    again in the trainer by torch as ``DataError("Caught DataError in DataLoader worker process N.\\n
    Original Traceback ...\\nfwmodel.data.DataError: MESSAGE")`` (the same class); that keeps MESSAGE."""

    def __init__(self, message: str = ""):
        if isinstance(message, str) and message.startswith("Caught ") and "\nOriginal Traceback" in message:
            last = message.rstrip().rsplit("\n", 1)[-1]
            name = f"{type(self).__module__}.{type(self).__qualname__}: "
            if last.startswith(name):
                message = last[len(name):]
        super().__init__(message)


class DataConfig(BaseModel):
    """The `[data]` section of a training config."""

    model_config = ConfigDict(extra="forbid")

    root: Optional[Path] = Field(None, description="dataset folder holding metadata.json, or WebDataset shards "
                                 "(a folder or URL holding shards.json, `fwdata shard`) (--data)")
    split: Literal["train", "val", "test", "all"] = "train"
    include_gated_out: bool = Field(False, description="also train on samples the quality gates rejected")
    num_frames: int = Field(81, description="T = 4k+1 frames per training sample")
    height: int = Field(336, description="H, a multiple of 16")
    width: int = Field(592, description="W, a multiple of 16")
    frame_stride: int = Field(1, ge=1, description="clip frames between consecutive sampled frames")
    window: Window = Field("start", description="where the T frames start in the clip (random: each time)")
    cache: Literal["auto", "require", "off"] = Field(
        "auto", description="latent/text cache: use it when present (auto), insist on it, or ignore it"
    )
    cache_dir: Optional[Path] = Field(None, description="default: DATASET/.fwmodel_cache")
    prompt: str = Field("", description="text prompt for every sample when encoding online (no cache)")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per GPU")
    max_samples: Optional[int] = Field(None, ge=1, description="use only the first N samples (overfit, smoke)")
    shuffle: bool = True
    shuffle_buffer: int = Field(
        16, ge=1, description="shards only (fwmodel.shard_data): samples in the seeded shuffle buffer of each rank "
        "(about this many samples' bytes held in memory per rank); 1 = shard order only"
    )
    allow_random_init_labels: bool = Field(
        False, description="train on labels (depth, points) or cached latents/text made by randomly initialised "
        "models (`random-tiny`: tests and demos only), with a warning; false refuses them"
    )

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if (self.num_frames - 1) % 4 or self.num_frames < 1:
            raise ValueError(f"data.num_frames {self.num_frames} must be 4k+1 (Wan VAE), e.g. 21, 49, 81")
        if self.height % 16 or self.width % 16 or self.height <= 0 or self.width <= 0:
            raise ValueError(f"data.height x data.width {self.height}x{self.width} must be positive multiples of 16")
        return self

    @property
    def span(self) -> int:
        """Clip frames covered by one training sample."""
        return 1 + (self.num_frames - 1) * self.frame_stride

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (16, (self.num_frames - 1) // 4 + 1, self.height // 8, self.width // 8)

    def clip_spec(self) -> "ClipSpec":
        return ClipSpec(self.num_frames, self.height, self.width, self.frame_stride, self.window)


@dataclass(frozen=True)
class ClipSpec:
    """What one training sample looks like; the latent cache is keyed by it."""

    num_frames: int
    height: int
    width: int
    frame_stride: int
    window: Window

    @property
    def key(self) -> str:
        return f"{self.num_frames}x{self.height}x{self.width}-s{self.frame_stride}-{self.window}"

    @property
    def span(self) -> int:
        return 1 + (self.num_frames - 1) * self.frame_stride


# --------------------------------------------------------------------------- which samples


@dataclass
class Selection:
    records: list[SampleRecord]
    skipped: dict[str, str]  # sample id -> why it is not used
    random_init: dict[str, list[str]] = field(default_factory=dict)  # sample id -> "role: model" made randomly


def random_init_models(record: SampleRecord, dataset_models: Sequence = ()) -> list[str]:
    """The randomly initialised models ("role: name") that made this sample's labels: from the sample's own
    provenance, or from the dataset's (metadata.json provenance.models) when the sample has none."""
    models = record.provenance.models if record.provenance is not None else dataset_models
    return [f"{m.role}: {m.name}" for m in models if m.random_init]


def select_samples(root: Path, cfg: DataConfig) -> Selection:
    """The samples a run trains on (split, status, long enough), in metadata order."""
    try:
        meta = load_metadata(root)
    except ContractError as err:
        raise DataError(str(err)) from None
    return select_records(meta, cfg, root)


def select_records(meta: DatasetMetadata, cfg: DataConfig, where) -> Selection:
    """`select_samples` on metadata already read (a dataset folder's, or rebuilt from shards); `where`
    names the data in the error when nothing is left."""
    chosen, skipped = [], {}
    for record in meta.samples:
        if cfg.split != "all" and record.split != cfg.split:
            continue
        if record.status != "ok" and not cfg.include_gated_out:
            skipped[record.id] = "gated out by the quality gates (use data.include_gated_out to train on it)"
            continue
        if record.num_frames < cfg.span:
            skipped[record.id] = (
                f"{record.num_frames} frames, fewer than the {cfg.span} needed for "
                f"{cfg.num_frames} frames at stride {cfg.frame_stride}"
            )
            continue
        chosen.append(record)
    if cfg.max_samples is not None:
        chosen = chosen[: cfg.max_samples]
    random_init = {r.id: m for r in chosen if (m := random_init_models(r, meta.provenance.models))}
    if not chosen:
        counts = f"{plural(len(meta.samples), 'sample')}, {sum(s.split == cfg.split for s in meta.samples)} in split {cfg.split!r}"
        reasons = "; ".join(sorted(set(skipped.values())))[:300]
        raise DataError(
            f"no training samples in {where} ({counts}){': ' + reasons if reasons else ''}; "
            "check data.split, data.num_frames / data.frame_stride, or data.include_gated_out."
        )
    return Selection(chosen, skipped, random_init)


def data_fingerprint(records: Sequence[SampleRecord]) -> str:
    """Hash of the exact sample records a run trains on (ids, files, quality, status)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.model_dump_json().encode())
    return digest.hexdigest()[:16]


def record_fingerprint(record: SampleRecord) -> str:
    return hashlib.sha256(record.model_dump_json().encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- one clip, numpy


def window_start(num_source_frames: int, spec: ClipSpec, rng: Optional[np.random.Generator] = None) -> int:
    room = num_source_frames - spec.span
    if room < 0:
        raise DataError(f"clip has {num_source_frames} frames, fewer than the {spec.span} needed")
    if spec.window == "start":
        return 0
    if spec.window == "center":
        return room // 2
    rng = rng or np.random.default_rng()
    return int(rng.integers(0, room + 1))


@dataclass(frozen=True)
class ResizePlan:
    """Resize (src -> scaled) then crop (offset y0, x0) to (height, width)."""

    scaled_hw: tuple[int, int]
    crop_yx: tuple[int, int]
    out_hw: tuple[int, int]
    src_hw: tuple[int, int]

    @classmethod
    def cover(cls, src_hw: tuple[int, int], out_hw: tuple[int, int]) -> "ResizePlan":
        (hs, ws), (h, w) = src_hw, out_hw
        s = max(h / hs, w / ws)
        scaled = (max(h, round(hs * s)), max(w, round(ws * s)))
        crop = ((scaled[0] - h) // 2, (scaled[1] - w) // 2)
        return cls(scaled, crop, out_hw, src_hw)

    @property
    def identity(self) -> bool:
        return self.src_hw == self.out_hw

    def intrinsics(self, K: np.ndarray) -> np.ndarray:
        """Pixel intrinsics (..., 3, 3) after the resize and crop (pixel centres at +0.5)."""
        sy, sx = self.scaled_hw[0] / self.src_hw[0], self.scaled_hw[1] / self.src_hw[1]
        K = np.array(K, dtype=np.float64, copy=True)
        K[..., 0, 0] *= sx
        K[..., 0, 2] = K[..., 0, 2] * sx - self.crop_yx[1]
        K[..., 1, 1] *= sy
        K[..., 1, 2] = K[..., 1, 2] * sy - self.crop_yx[0]
        return K

    def apply(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """x [N, C, Hs, Ws] -> [N, C, H, W]."""
        if self.identity:
            return x
        if mode == "bilinear":
            x = F.interpolate(x, size=self.scaled_hw, mode="bilinear", align_corners=False, antialias=True)
        else:
            x = F.interpolate(x, size=self.scaled_hw, mode="nearest-exact")
        (y0, x0), (h, w) = self.crop_yx, self.out_hw
        return x[..., y0 : y0 + h, x0 : x0 + w]


# --------------------------------------------------------------------------- where a sample's files are


class FolderSource:
    """One sample's files in the dataset folder (the relative paths of its record), read with the
    contract's own readers."""

    def __init__(self, root: Path, record: SampleRecord):
        self.root, self.record = Path(root), record

    def path(self, member: str) -> Path:
        rel = {"mp4": self.record.paths.video, "depth.npz": self.record.paths.depth,
               "points.npz": self.record.paths.points, "camera.json": self.record.paths.camera_json}[member]
        return resolve_inside(self.root, rel)

    def frames(self, indices: Sequence[int]) -> np.ndarray:
        """[T, Hs, Ws, 3] uint8 RGB of the clip at `indices`."""
        from fwdata.dataset.video import read_frames

        return read_frames(self.path("mp4"), list(indices))

    def npz(self, member: str, spec: dict, dims: dict) -> dict:
        return load_npz(self.path(member), spec, dims)

    def cameras(self) -> CameraFile:
        return read_camera_json(self.path("camera.json"))


class MemorySource:
    """One sample's files as bytes in memory: the members of a WebDataset sample ("mp4", "depth.npz",
    "points.npz", "camera.json" -> bytes); `where` names them in errors (e.g. "shard-000001.tar/00000042").
    Decoded from memory, never written to disk."""

    def __init__(self, members: dict[str, bytes], where: str):
        self.members, self.where = members, where

    def data(self, member: str) -> bytes:
        if member not in self.members:
            raise ContractError(f"{self.where}: member {member!r} is missing from the shard sample")
        return self.members[member]

    def frames(self, indices: Sequence[int]) -> np.ndarray:
        """[T, Hs, Ws, 3] uint8 RGB, decoded in memory from the mp4 bytes (fwdata.dataset.video.read_frames)."""
        from fwdata.dataset.video import read_frames

        return read_frames(f"{self.where}.mp4", list(indices), data=self.data("mp4"))

    def npz(self, member: str, spec: dict, dims: dict) -> dict:
        return read_npz(io.BytesIO(self.data(member)), spec, dims, f"{self.where}.{member}")

    def cameras(self) -> CameraFile:
        try:
            return CameraFile.model_validate_json(self.data("camera.json"))
        except ValidationError as e:
            err = e.errors()[0]
            raise ContractError(f"{self.where}.camera.json: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def load_frames(source, record: SampleRecord, indices: Sequence[int], plan: ResizePlan) -> torch.Tensor:
    """RGB frames of the clip at `indices`, resized: [3, T, H, W] float32 in [-1, 1].

    `source`: a FolderSource / MemorySource, or the dataset root (a path: the record's files in it)."""
    from fwdata.dataset.video import VideoError

    if not isinstance(source, (FolderSource, MemorySource)):
        source = FolderSource(source, record)
    try:
        frames = source.frames(indices)  # [T, Hs, Ws, 3] uint8
    except VideoError as err:
        raise DataError(str(err)) from None
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, Hs, Ws]
    x = plan.apply(x, "bilinear").clamp(0, 255)
    return (x / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()


def load_geometry(source, record: SampleRecord, indices: Sequence[int], plan: ResizePlan) -> dict:
    """Ground truth of one training sample, normalised (see the module docstring). numpy/torch mix in, torch out.

    `source`: a FolderSource / MemorySource, or the dataset root (a path)."""
    if not isinstance(source, (FolderSource, MemorySource)):
        source = FolderSource(source, record)
    dims = record.dims
    cameras = source.cameras()
    depth_npz = source.npz("depth.npz", DEPTH_NPZ, dims)
    points_npz = source.npz("points.npz", POINTS_NPZ, dims)
    idx = np.asarray(indices)

    w2c = cameras.w2c_array()[idx]  # [T, 4, 4] float64
    K = plan.intrinsics(cameras.intrinsics_array()[idx])
    depth = torch.from_numpy(depth_npz["depth"][idx].astype(np.float32))
    depth_valid = torch.from_numpy(depth_npz["valid"][idx])
    points = torch.from_numpy(points_npz["points"][idx].astype(np.float32))
    points_valid = torch.from_numpy(points_npz["valid"][idx])

    # Resize with nearest neighbours: masks stay masks, no depth is averaged across an edge.
    depth = plan.apply(depth[:, None], "nearest")[:, 0]
    depth_valid = plan.apply(depth_valid[:, None].float(), "nearest")[:, 0] > 0.5
    points = plan.apply(points.permute(0, 3, 1, 2), "nearest").permute(0, 2, 3, 1)
    points_valid = plan.apply(points_valid[:, None].float(), "nearest")[:, 0] > 0.5

    # Cameras relative to the first sampled frame; world points moved into that camera's frame.
    first = w2c[0]
    w2c = cam.relative_to_first(w2c)
    R0, t0 = torch.from_numpy(first[:3, :3]).float(), torch.from_numpy(first[:3, 3]).float()
    points = points @ R0.T + t0

    depth_valid &= torch.isfinite(depth) & (depth > 0)
    points_valid &= torch.isfinite(points).all(dim=-1)
    depth = torch.where(depth_valid, depth, torch.zeros(()))
    points = torch.where(points_valid[..., None], points, torch.zeros(()))

    scale = normalisation_scale(points, points_valid, depth, depth_valid)
    depth = depth / scale
    points = points / scale
    w2c = w2c.copy()
    w2c[:, :3, 3] /= scale
    H, W = plan.out_hw
    pose_enc = cam.encode_pose(w2c, K, H, W)
    pose_ok = np.isfinite(pose_enc).all(axis=-1)
    pose_enc = np.where(pose_ok[:, None], pose_enc, 0.0)
    return {
        "depth": depth,
        "depth_valid": depth_valid,
        "points": points,
        "points_valid": points_valid,
        "w2c": torch.from_numpy(w2c).float(),
        "K": torch.from_numpy(K).float(),
        "pose_enc": torch.from_numpy(pose_enc).float(),
        "pose_valid": torch.from_numpy(pose_ok),
        "scale": torch.tensor(scale, dtype=torch.float32),
    }


def normalisation_scale(
    points: torch.Tensor, points_valid: torch.Tensor, depth: torch.Tensor, depth_valid: torch.Tensor
) -> float:
    """Mean distance of the valid points from camera 0 (all frames), clamped to [1e-6, 1e6].

    Falls back to the mean valid depth when no point is valid, and to 1 when nothing is.
    """
    if points_valid.any():
        s = points[points_valid].double().norm(dim=-1).mean().item()
    elif depth_valid.any():
        s = depth[depth_valid].double().mean().item()
    else:
        s = 1.0
    if not math.isfinite(s) or s <= 0:
        s = 1.0
    return float(min(max(s, 1e-6), 1e6))


# --------------------------------------------------------------------------- the dataset


class TrainingDataset(Dataset):
    """Samples of one dataset for one stage. Items are `index` or `(index, seed)` (see StepSampler)."""

    def __init__(self, cfg: DataConfig, text_dim: Optional[int] = None, cache=None):
        if cfg.root is None:
            raise DataError("no dataset given: pass --data DATASET or set data.root in the config")
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.spec = cfg.clip_spec()
        selection = select_samples(self.root, cfg)
        self.records = selection.records
        self.skipped = selection.skipped
        self.random_init = selection.random_init  # sample id -> random models that made its labels
        self.fingerprint = data_fingerprint(self.records)
        self.cache = cache
        if cache is not None:
            cache.check_covers(self.records, text_dim)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def uses_cache(self) -> bool:
        return self.cache is not None

    def __getitem__(self, item) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, None)
        record = self.records[index]
        return make_sample(self.cfg, record, FolderSource(self.root, record), index, seed, self.cache)


def make_sample(cfg: DataConfig, record: SampleRecord, source, index: int, seed: Optional[int], cache=None) -> dict:
    """One training sample (the dict of the module docstring) of `record`, its files read from `source`
    (FolderSource or MemorySource); `seed` draws a random window; `index` is the sample's position in the
    run's selection."""
    spec = cfg.clip_spec()
    rng = np.random.default_rng(seed)
    if cache is not None:
        start = cache.window_start(record.id)
    else:
        start = window_start(record.num_frames, spec, rng)
    indices = list(range(start, start + spec.span, spec.frame_stride))
    plan = ResizePlan.cover((record.height, record.width), (cfg.height, cfg.width))
    sample = {"id": record.id, "index": index}
    try:
        sample.update(load_geometry(source, record, indices, plan))
        if cache is not None:
            sample["latents"], sample["text"] = cache.load(record.id)
            if cache.i2v:  # an image-to-video run (LatentCache.check_i2v passed)
                sample["condition"], sample["image_embeds"] = cache.load_i2v(record.id)
        else:
            sample["video"] = load_frames(source, record, indices, plan)
            sample["text"] = cfg.prompt
    except ContractError as err:
        raise DataError(f"sample {record.id}: {err}") from None
    return sample


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def plucker_for_batch(w2c: torch.Tensor, K: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Plucker rays [B, T, H, W, 6] from w2c [B, T, 4, 4] and K [B, T, 3, 3] (same as fwdata.dataset.camera.plucker_rays)."""
    from fwmodel.pose import plucker_rays

    return plucker_rays(K, torch.linalg.inv(w2c), height, width)


# --------------------------------------------------------------------------- order of samples


class StepSampler(Sampler):
    """Infinite, resumable, rank-aware order of samples.

    Global micro-batch k (G = batch_size x world_size samples) is slice k of the epoch's order
    (a seeded permutation per epoch, padded by wrapping to a multiple of G); rank r takes
    positions [r*B, (r+1)*B) of it. So the same global batch is seen whatever the number of ranks,
    and a run resumed at micro-batch k sees exactly what an uninterrupted run would.
    Yields (index, seed) with a seed unique to (run seed, k, position) for random windows.
    """

    def __init__(
        self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int, shuffle: bool, start: int = 0
    ):
        self.n, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed, self.shuffle, self.start = seed, shuffle, start
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = math.ceil(num_samples / self.global_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        size = self.batches_per_epoch * self.global_batch
        return [order[i % self.n] for i in range(size)]

    def positions(self, k: int) -> list[tuple[int, int]]:
        """(sample index, global position) of this rank's samples in global micro-batch k."""
        epoch, j = divmod(k, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        first = j * self.global_batch + self.rank * self.batch_size
        return [(order[first + b], self.rank * self.batch_size + b) for b in range(self.batch_size)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        k = self.start
        cached_epoch, order = None, None
        while True:
            epoch, j = divmod(k, self.batches_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, self.epoch_order(epoch)
            first = j * self.global_batch + self.rank * self.batch_size
            for b in range(self.batch_size):
                position = self.rank * self.batch_size + b
                yield order[first + b], _mix(self.seed, k, position)
            k += 1

    def epoch_of(self, k: int) -> float:
        return k / self.batches_per_epoch


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(json.dumps(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


mix_seed = _mix
