"""The strict PLY reader: what open3d writes is read back exactly; malformed headers are refused."""

from __future__ import annotations

import numpy as np
import pytest

from fwdata.dataset.ply import fused_cloud, read_ply_xyz, write_cloud


def _cloud(tmp_path):
    rng = np.random.default_rng(0)
    points = rng.normal(size=(2, 8, 8, 3)).astype(np.float32) + np.array([0, 0, 5], np.float32)
    frames = rng.integers(0, 255, size=(2, 8, 8, 3), dtype=np.uint8)
    cloud = fused_cloud(points, np.ones((2, 8, 8), bool), frames, voxel_size=1e-6, pixel_stride=1)
    path = tmp_path / "cloud.ply"
    write_cloud(path, cloud)
    return path, np.asarray(cloud.points)


def test_reads_back_what_open3d_wrote(tmp_path):
    path, xyz = _cloud(tmp_path)
    np.testing.assert_allclose(read_ply_xyz(path), xyz, rtol=1e-6)


@pytest.mark.parametrize("count", ["-5", "5x", "-0"])
def test_a_bad_vertex_count_is_refused(tmp_path, count):
    path, _ = _cloud(tmp_path)
    data = path.read_bytes()
    head, rest = data.split(b"end_header", 1)
    lines = [ln if not ln.startswith(b"element vertex") else b"element vertex " + count.encode()
             for ln in head.split(b"\n")]
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"\n".join(lines) + b"end_header" + rest)
    with pytest.raises(ValueError, match="element count"):
        read_ply_xyz(bad)
