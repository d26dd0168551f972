"""What every export shares: choosing samples, the output folder rules, a sample's cameras and frames,
frame images, and the deterministic subsample of the point maps that becomes a sparse cloud.

Nothing here writes into the dataset: exports only read it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from fwdata.dataset import camera
from fwdata.dataset.contract import (
    DEPTH_NPZ,
    CameraFile,
    ContractError,
    DatasetMetadata,
    SampleRecord,
    load_metadata,
    load_npz,
    read_camera_json,
    resolve_inside,
)
from fwdata.dataset.store import is_inside
from fwdata.textout import SampleIdError, plural, resolve_sample_ids

#: image formats of the extracted frames (PIL writes both; PNG is lossless against the decoded clip)
IMAGE_FORMATS = ("png", "jpg")
#: JPEG quality of `--image-format jpg`
JPEG_QUALITY = 95
#: default most points in the sparse cloud of one sample
DEFAULT_MAX_POINTS = 100_000
#: frames the sparse cloud is sampled from (evenly spaced, first and last included)
POINT_FRAMES = 9


class ExportError(ValueError):
    """A usage error of an export (bad format, not a dataset, unknown sample, --out a file): exit 2."""


@dataclass(frozen=True)
class SparseCloud:
    """Points sampled from the depth maps: world xyz (N,3) float64, colour (N,3) uint8, and the pixel
    each came from: frame index (N,) and pixel-centre image coordinates (N,2) (``u + 0.5, v + 0.5``)."""

    xyz: np.ndarray
    rgb: np.ndarray
    frame: np.ndarray
    uv: np.ndarray


def open_dataset(dataset: Union[str, Path]) -> DatasetMetadata:
    """The dataset's metadata, or ExportError with one line saying why it is not a dataset."""
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise ExportError(f"{dataset}: not a folder; give a dataset folder (one that holds metadata.json)")
    try:
        return load_metadata(dataset)
    except ContractError as e:
        raise ExportError(str(e)) from None


def select_samples(meta: DatasetMetadata, dataset: Path, sample_ids: Optional[Sequence[str]]) -> list[SampleRecord]:
    """The samples to export: the ones named (any status, in the order given; whole ids or unique prefixes
    such as the short ids `fwdata info` prints), else every `ok` sample."""
    if not sample_ids:
        return [s for s in meta.samples if s.status == "ok"]
    known = {s.id: s for s in meta.samples}
    try:
        resolved = resolve_sample_ids(sample_ids, list(known))
    except SampleIdError as e:
        raise ExportError(f"--sample: {e} ({dataset} has {plural(len(known), 'sample')}; "
                          f"`fwdata info {dataset}` lists them)") from None
    return [known[sid] for sid in resolved]


def check_out(out: Union[str, Path], dataset: Union[str, Path]) -> Path:
    """The output folder, created; ExportError when it is a file or lies inside the dataset (exports never
    write into a dataset: `fwdata validate` would report the files as orphans)."""
    out, dataset = Path(out), Path(dataset)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder to write the export to")
    if is_inside(out, dataset):
        raise ExportError(f"--out {out} is inside the dataset {dataset}; exports never write into a dataset, "
                          f"give a folder outside it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    return out


def sample_cameras(dataset: Path, record: SampleRecord) -> CameraFile:
    """The sample's cameras (camera_params/<id>.json, the source of truth)."""
    return read_camera_json(resolve_inside(dataset, record.paths.camera_json))


def sample_frames(dataset: Path, record: SampleRecord) -> np.ndarray:
    """Every frame of the sample's clip, uint8 RGB (T,H,W,3), decoded with the project's video reader."""
    from fwdata.dataset.video import read_frames

    frames = read_frames(resolve_inside(dataset, record.paths.video))
    if frames.shape[:3] != (record.num_frames, record.height, record.width):
        raise ContractError(f"{record.paths.video}: holds {plural(frames.shape[0], 'frame')} of {frames.shape[2]}x"
                            f"{frames.shape[1]}, metadata says {record.num_frames} of {record.width}x{record.height}")
    return frames


def sample_depth(dataset: Path, record: SampleRecord) -> tuple[np.ndarray, np.ndarray]:
    """z-depth (T,H,W) float32 and its valid mask (T,H,W) bool."""
    arrays = load_npz(resolve_inside(dataset, record.paths.depth), DEPTH_NPZ, record.dims)
    depth, valid = arrays["depth"], arrays["valid"]
    return depth, valid & np.isfinite(depth) & (depth > 0)


def frame_name(index: int, image_format: str) -> str:
    """File name of frame `index` (0-based) among the extracted images: ``000000.png``."""
    return f"{index:06d}.{image_format}"


def write_images(folder: Path, frames: np.ndarray, image_format: str, names: Sequence[str]) -> None:
    """Write frames (T,H,W,3) uint8 as `folder/<name>` with PIL (PNG lossless; JPEG at JPEG_QUALITY)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for frame, name in zip(frames, names):
        img = Image.fromarray(np.ascontiguousarray(frame))
        if image_format == "jpg":
            img.save(folder / name, format="JPEG", quality=JPEG_QUALITY)
        else:
            img.save(folder / name, format="PNG")


def point_subsample(depth: np.ndarray, valid: np.ndarray, cameras: CameraFile, frames: np.ndarray,
                    max_points: int = DEFAULT_MAX_POINTS, num_frames: int = POINT_FRAMES) -> SparseCloud:
    """A deterministic sparse cloud from the depth maps: the valid pixels of a regular grid on
    `num_frames` evenly spaced frames, unprojected with the cameras in float64
    (``X = c2w @ [d K^-1 (u + 0.5, v + 0.5, 1)]``, the definition of the point maps), coloured from the clip.

    The grid step is the smallest that keeps at most `max_points` grid pixels; no randomness, so the same
    sample gives the same cloud. `max_points` 0 gives an empty cloud.
    """
    T, H, W = depth.shape
    empty = SparseCloud(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0, np.int64), np.zeros((0, 2)))
    if max_points <= 0:
        return empty
    picked = np.unique(np.round(np.linspace(0, T - 1, min(T, num_frames))).astype(np.int64))
    step = 1
    while len(picked) * (-(-H // step)) * (-(-W // step)) > max_points:
        step += 1
    off = step // 2
    vs, us = np.arange(off, H, step), np.arange(off, W, step)
    K = cameras.intrinsics_array()
    c2w = camera.invert_pose(cameras.w2c_array())
    xyz, rgb, fidx, uv = [], [], [], []
    for f in picked:
        sel = valid[f][np.ix_(vs, us)]
        vv, uu = np.meshgrid(vs, us, indexing="ij")
        vv, uu = vv[sel], uu[sel]
        if len(vv) == 0:
            continue
        pix = np.stack([uu + 0.5, vv + 0.5], axis=-1).astype(np.float64)
        xyz.append(camera.unproject_depth(depth[f], K[f], c2w[f])[vv, uu])  # the point maps' own maths
        rgb.append(frames[f][vv, uu])
        fidx.append(np.full(len(vv), f, dtype=np.int64))
        uv.append(pix)
    if not xyz:
        return empty
    return SparseCloud(np.concatenate(xyz), np.concatenate(rgb).astype(np.uint8), np.concatenate(fidx),
                       np.concatenate(uv))


def ply_bytes(xyz: np.ndarray, rgb: np.ndarray) -> bytes:
    """A binary little-endian PLY of coloured points: x, y, z float32 and red, green, blue uchar (what
    open3d, nerfstudio and most viewers read). Written with numpy: the same points give the same bytes."""
    vertex = np.empty(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                        ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, c in enumerate("xyz"):
        vertex[c] = xyz[:, i]
    for i, c in enumerate(("red", "green", "blue")):
        vertex[c] = rgb[:, i]
    header = ("ply\nformat binary_little_endian 1.0\ncomment written by fwdata export\n"
              f"element vertex {len(xyz)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    return header.encode("ascii") + vertex.tobytes()


def replace_folder(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` folder to `final`, replacing an earlier export there."""
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def temp_folder(out: Path, name: str) -> Path:
    """An empty temporary folder beside `out/name` (the export is written there, then renamed into place)."""
    tmp = out / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
