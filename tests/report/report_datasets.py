"""Datasets for the `fwdata report` tests (fixtures in conftest.py): a small synthetic truth, and a "built"
copy of it whose cameras live in another world frame and unit (a known Sim(3)) and whose metadata lists a
failed input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fwdata.dataset import camera
from fwdata.dataset.contract import FailedInput, QualityMetrics, load_metadata, read_camera_json, resolve_inside
from fwdata.dataset.store import atomic_write_text, write_metadata
from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset

#: the built world: X_built = SCALE * ROT @ X_truth + SHIFT
SCALE = 2.5
ROT = camera.quaternion_xyzw_to_rotation(np.array([0.1, -0.3, 0.2, 0.93]) / np.linalg.norm([0.1, -0.3, 0.2, 0.93]))
SHIFT = np.array([0.7, -1.2, 3.0])
FAILURE_REASON = "decoding failed: moov atom not found (deliberate test failure)"
#: the registered_ratio recorded for each built sample
REGISTERED = (0.875, 0.625)


def make_truth(root: Path) -> Path:
    write_synthetic_dataset(root, SynthOptions(num_scenes=2, num_frames=9, height=96, width=160, write_ply=False,
                                               path_kinds=["orbit", "forward"]))
    return root


def make_built(truth_ds: Path, root: Path) -> Path:
    shutil.copytree(truth_ds, root)
    meta = load_metadata(root)
    for rec in meta.samples:
        path = resolve_inside(root, rec.paths.camera_json)
        cams = read_camera_json(path)
        c2w = camera.invert_pose(cams.w2c_array())
        moved = camera.make_pose(ROT @ c2w[:, :3, :3], SCALE * c2w[:, :3, 3] @ ROT.T + SHIFT)
        w2c = camera.invert_pose(moved)
        for f, m in zip(cams.frames, w2c):
            f.w2c = m.tolist()
        atomic_write_text(path, cams.model_dump_json(indent=1))
    for n, rec in enumerate(meta.samples):  # as a build records them
        rec.quality = QualityMetrics(registered_ratio=REGISTERED[n], depth_sfm_absrel=0.0421, num_points3d=1234)
    meta.failures.append(FailedInput(source="raw/broken.mp4", reason=FAILURE_REASON, stage="decode", clip_start=0))
    write_metadata(root, meta)
    return root
