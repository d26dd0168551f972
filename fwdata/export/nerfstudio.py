"""nerfstudio datasets: `transforms.json` with extracted frames, depth images and a sparse cloud, per sample.

Layout of `OUT/<sample id>/`::

    transforms.json          nerfstudio's format (docs.nerf.studio, "Data conventions")
    images/frame_00001.png   the clip's frames (1-based names, as ns-process-data writes them)
    depth/frame_00001.png    z-depth as 16-bit PNG: value = round(depth * 1000); 0 = no depth
    sparse_pc.ply            a coloured sparse cloud from the depth maps (`ply_file_path`, splatfacto's start)

`transform_matrix` is camera-to-world with nerfstudio's (OpenGL) camera axes: x right, y up, z back
(the camera looks along -z), i.e. our c2w with its y and z columns negated
(`camera.opencv_to_opengl_c2w`). The world frame is the dataset's (frame 0's camera, y down): no
rotation is applied, and nerfstudio's data parser orients and centres the poses itself. Pixel
coordinates agree (pixel centres at +0.5), so fl_x, fl_y, cx, cy are our fx, fy, cx, cy.

Depth: nerfstudio multiplies the PNG values by `depth_unit_scale_factor` (default 1e-3), so they
read back in the dataset unit: metres for a metric dataset. Depth beyond 65.535 units, or not valid,
is written as 0, which nerfstudio's depth losses skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fwdata.dataset import camera
from fwdata.dataset.contract import CameraFile, SampleRecord
from fwdata.export.common import (
    point_subsample,
    ply_bytes,
    replace_folder,
    sample_cameras,
    sample_depth,
    sample_frames,
    temp_folder,
    write_images,
)

TRANSFORMS = "transforms.json"
#: depth PNG value per dataset unit (nerfstudio's default depth_unit_scale_factor is its inverse)
DEPTH_PNG_SCALE = 1000.0
PLY_NAME = "sparse_pc.ply"


def nerfstudio_name(index: int, image_format: str) -> str:
    """File name of frame `index` (0-based): ``frame_00001.png`` (1-based, like ns-process-data)."""
    return f"frame_{index + 1:05d}.{image_format}"


def transform_matrix(w2c: np.ndarray) -> np.ndarray:
    """nerfstudio's transform_matrix (4,4): camera-to-world with OpenGL camera axes, from our OpenCV w2c."""
    return camera.opencv_to_opengl_c2w(camera.invert_pose(w2c))


def transforms(cameras: CameraFile, image_format: str, with_depth: bool = True, with_ply: bool = True) -> dict:
    """The transforms.json document of a sample. Shared intrinsics go at the top, per-frame ones
    (when the frames differ) into each frame, as nerfstudio's parser reads both."""
    keys = {(f.fx, f.fy, f.cx, f.cy) for f in cameras.frames}
    shared = len(keys) == 1
    doc: dict = {"camera_model": "OPENCV"}
    if shared:
        fx, fy, cx, cy = next(iter(keys))
        doc.update(fl_x=fx, fl_y=fy, cx=cx, cy=cy)
    doc.update(w=cameras.width, h=cameras.height, k1=0.0, k2=0.0, p1=0.0, p2=0.0)
    frames = []
    for i, f in enumerate(cameras.frames):
        name = nerfstudio_name(i, image_format)
        entry: dict = {"file_path": f"images/{name}",
                       "transform_matrix": transform_matrix(np.asarray(f.w2c, dtype=np.float64)).tolist()}
        if with_depth:
            entry["depth_file_path"] = f"depth/{nerfstudio_name(i, 'png')}"
        if not shared:
            entry.update(fl_x=f.fx, fl_y=f.fy, cx=f.cx, cy=f.cy)
        frames.append(entry)
    doc["frames"] = frames
    if with_ply:
        doc["ply_file_path"] = PLY_NAME
    return doc


def depth_png(depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H,W) z-depth -> uint16 image of round(depth * DEPTH_PNG_SCALE), 0 where invalid or too far."""
    scaled = np.round(np.where(valid, depth.astype(np.float64), 0.0) * DEPTH_PNG_SCALE)
    scaled[(scaled > np.iinfo(np.uint16).max) | ~np.isfinite(scaled)] = 0
    return scaled.astype(np.uint16)


def export_sample(dataset: Path, record: SampleRecord, out: Path, image_format: str = "png",
                  max_points: int = 100_000) -> Path:
    """Write `out/<id>/` (transforms.json, images, depth, sparse cloud) for one sample; returns the folder."""
    from PIL import Image

    cameras = sample_cameras(dataset, record)
    frames = sample_frames(dataset, record)
    depth, valid = sample_depth(dataset, record)
    cloud = point_subsample(depth, valid, cameras, frames, max_points)
    with_ply = len(cloud.xyz) > 0
    tmp = temp_folder(out, record.id)
    try:
        write_images(tmp / "images", frames, image_format, [nerfstudio_name(i, image_format) for i in range(len(frames))])
        (tmp / "depth").mkdir()
        for i in range(len(depth)):
            Image.fromarray(depth_png(depth[i], valid[i])).save(tmp / "depth" / nerfstudio_name(i, "png"), format="PNG")
        if with_ply:
            (tmp / PLY_NAME).write_bytes(ply_bytes(cloud.xyz, cloud.rgb))
        doc = transforms(cameras, image_format, with_depth=True, with_ply=with_ply)
        (tmp / TRANSFORMS).write_text(json.dumps(doc, indent=2) + "\n")
        replace_folder(tmp, out / record.id)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / record.id
