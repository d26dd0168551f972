"""COLMAP models: one per sample, written with pycolmap's Reconstruction API (COLMAP and GLOMAP read it).

Layout of `OUT/<sample id>/` (the layout COLMAP, GLOMAP, 3-D Gaussian Splatting and nerfstudio's
`colmap` data parser expect)::

    images/000000.png ...   the clip's frames, decoded with the project's video reader
    sparse/0/cameras.bin    PINHOLE cameras: one per distinct (fx, fy, cx, cy) of the sample (usually one)
    sparse/0/images.bin     one image per frame: cam_from_world = our w2c (both OpenCV axes, world-to-camera)
    sparse/0/points3D.bin   a sparse coloured cloud sampled from the depth maps (common.point_subsample)
    sparse/0/rigs.bin, frames.bin   trivial rigs and frames (COLMAP >= 3.12; older readers ignore them)

Pixel conventions agree (COLMAP's: pixel centres at +0.5, as ours), so the intrinsics are copied as
they are. Each 3-D point has exactly one observation: the pixel of the frame it was unprojected from
(a 2-D point of that image at the pixel centre). There are no multi-view tracks: the dataset keeps
no SfM tracks, only depth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fwdata.dataset.contract import CameraFile, SampleRecord
from fwdata.export.common import (
    SparseCloud,
    frame_name,
    point_subsample,
    replace_folder,
    sample_cameras,
    sample_depth,
    sample_frames,
    temp_folder,
    write_images,
)

MODEL_DIR = "sparse/0"
IMAGES_DIR = "images"


def model_spec(cameras: CameraFile, cloud: SparseCloud, image_format: str) -> dict:
    """Everything the COLMAP model holds, as plain numbers (what `write_model` writes).

    cameras: [(camera_id, width, height, [fx, fy, cx, cy])]; images: [(image_id, name, camera_id,
    w2c 3x4, keypoints (n,2))]; points: xyz (N,3), rgb (N,3) and the (image_id, point2D index) of
    each point's one observation. Ids start at 1 (COLMAP's convention); image i + 1 is frame i.
    """
    intrinsics: dict[tuple, int] = {}
    images = []
    w2c = cameras.w2c_array()
    obs_image = np.zeros(len(cloud.xyz), dtype=np.int64)
    obs_index = np.zeros(len(cloud.xyz), dtype=np.int64)
    for i, f in enumerate(cameras.frames):
        key = (f.fx, f.fy, f.cx, f.cy)
        cam_id = intrinsics.setdefault(key, len(intrinsics) + 1)
        mine = np.flatnonzero(cloud.frame == i)
        obs_image[mine] = i + 1
        obs_index[mine] = np.arange(len(mine))
        images.append((i + 1, frame_name(i, image_format), cam_id, w2c[i, :3, :4], cloud.uv[mine]))
    cams = [(cid, cameras.width, cameras.height, list(key)) for key, cid in intrinsics.items()]
    return {"cameras": cams, "images": images, "xyz": cloud.xyz, "rgb": cloud.rgb,
            "obs_image": obs_image, "obs_index": obs_index}


def write_model(folder: Path, spec: dict, text: bool = False) -> None:
    """Write `spec` (model_spec) as a COLMAP model into `folder` (binary, or text with `text`).

    pycolmap is imported here, not at module level: importing it before other native libraries
    (decord, PyAV) has crashed processes. The export decodes the clip first and imports pycolmap
    only now; tests/test_export.py runs both the library and the CLI in one process to check it.
    """
    import pycolmap

    rec = pycolmap.Reconstruction()
    for cam_id, width, height, params in spec["cameras"]:
        rec.add_camera_with_trivial_rig(pycolmap.Camera(model="PINHOLE", width=width, height=height,
                                                         params=params, camera_id=cam_id))
    for image_id, name, cam_id, w2c, keypoints in spec["images"]:
        image = pycolmap.Image(name=name, keypoints=np.asarray(keypoints, dtype=np.float64).reshape(-1, 2),
                               camera_id=cam_id, image_id=image_id)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(np.asarray(w2c, dtype=np.float64)))
    for xyz, rgb, image_id, idx in zip(spec["xyz"], spec["rgb"], spec["obs_image"], spec["obs_index"]):
        rec.add_point3D(np.asarray(xyz, dtype=np.float64),
                        pycolmap.Track([pycolmap.TrackElement(int(image_id), int(idx))]),
                        np.asarray(rgb, dtype=np.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    if text:
        rec.write_text(str(folder))
    else:
        rec.write_binary(str(folder))


def export_sample(dataset: Path, record: SampleRecord, out: Path, image_format: str = "png",
                  max_points: int = 100_000, text: bool = False) -> Path:
    """Write `out/<id>/` (images and sparse/0) for one sample; returns that folder."""
    cameras = sample_cameras(dataset, record)
    frames = sample_frames(dataset, record)
    depth, valid = sample_depth(dataset, record)
    cloud = point_subsample(depth, valid, cameras, frames, max_points)
    tmp = temp_folder(out, record.id)
    try:
        write_images(tmp / IMAGES_DIR, frames, image_format,
                     [frame_name(i, image_format) for i in range(len(frames))])
        write_model(tmp / MODEL_DIR, model_spec(cameras, cloud, image_format), text=text)
        replace_folder(tmp, out / record.id)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / record.id
