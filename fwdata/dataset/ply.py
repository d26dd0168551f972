"""PLY point clouds: the fused, coloured cloud of a sample (open3d) and a strict reader of its vertices.

The reader is our own (not open3d's) on purpose: validation must turn a truncated or malformed
file into a finding with a reason, and a native reader may crash or silently return fewer points.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Optional, Union

import numpy as np


def fused_cloud(points: np.ndarray, valid: np.ndarray, frames: np.ndarray, voxel_size: Optional[float] = None,
                pixel_stride: int = 2, max_points: int = 200_000):
    """Fused, voxel-downsampled, outlier-filtered coloured cloud (open3d PointCloud).

    points (T,H,W,3), valid (T,H,W), frames (T,H,W,3) uint8. `voxel_size` defaults to 1/200 of the
    median point distance from the origin (frame-0 camera), so it adapts to the scene's unit; it
    grows when the downsampled cloud would exceed `max_points` (the outlier filter's cost grows
    with the point count: long, large clips otherwise spend seconds here).
    """
    import open3d as o3d

    sel = valid[:, ::pixel_stride, ::pixel_stride]
    xyz = points[:, ::pixel_stride, ::pixel_stride][sel].astype(np.float64)
    rgb = frames[:, ::pixel_stride, ::pixel_stride][sel].astype(np.float64) / 255.0
    pcd = o3d.geometry.PointCloud()
    if len(xyz) == 0:
        return pcd
    pcd.points = o3d.utility.Vector3dVector(xyz)
    pcd.colors = o3d.utility.Vector3dVector(rgb)
    if voxel_size is None:
        voxel_size = max(float(np.median(np.linalg.norm(xyz, axis=1))) / 200.0, 1e-6)
    down = pcd.voxel_down_sample(voxel_size)
    if len(down.points) > max_points:  # points on surfaces scale with 1 / voxel_size^2
        down = down.voxel_down_sample(voxel_size * 1.05 * float(np.sqrt(len(down.points) / max_points)))
    pcd = down
    if len(pcd.points) > 50:
        pcd, _ = pcd.remove_statistical_outlier(nb_neighbors=20, std_ratio=2.0)
    return pcd


def write_cloud(path: Union[str, Path], cloud) -> None:
    """Write an open3d PointCloud as binary PLY at `path` (the suffix picks the format)."""
    import open3d as o3d

    if not o3d.io.write_point_cloud(str(path), cloud, write_ascii=False):
        raise OSError(f"open3d could not write {path}")
    # open3d reports success after a short write (a full disk): read the file back with our own reader
    try:
        n = len(read_ply_xyz(path))
    except ValueError as e:
        raise OSError(errno.EIO, f"the point cloud written to {path} is incomplete ({e}); is the disk full?") from None
    if n != len(cloud.points):
        raise OSError(errno.EIO, f"the point cloud written to {path} holds {n} of {len(cloud.points)} points")


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def read_ply_xyz(path: Union[str, Path]) -> np.ndarray:
    """Vertex coordinates (N,3) float64 of a PLY point cloud (binary or ascii), read-only and strict.

    Raises ValueError with a clear reason for a truncated or malformed file (no native reader is
    involved, so damage never crashes the process).
    """
    with open(path, "rb") as fh:
        data = fh.read()
    if not data.startswith(b"ply"):
        raise ValueError("does not start with 'ply'")
    end = data.find(b"end_header")
    if end < 0:
        raise ValueError("no end_header line")
    body_start = data.index(b"\n", end) + 1 if b"\n" in data[end:] else len(data)
    try:
        header = data[:end].decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ValueError("header is not ASCII") from None
    fmt, elements = None, []  # [(name, count, [(prop, dtype)])]
    for line in header[1:]:
        parts = line.split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        if parts[0] == "format" and len(parts) >= 2:
            fmt = parts[1]
        elif parts[0] == "element" and len(parts) == 3:
            if not parts[2].isdigit():  # a count is a non-negative integer ("-5" would read the whole body)
                raise ValueError(f"bad element count in {line!r}")
            elements.append((parts[1], int(parts[2]), []))
        elif parts[0] == "property" and elements:
            if parts[1] == "list":
                elements[-1][2].append((parts[-1], None))
            elif len(parts) == 3 and parts[1] in _PLY_TYPES:
                elements[-1][2].append((parts[2], _PLY_TYPES[parts[1]]))
            else:
                raise ValueError(f"bad property line {line!r}")
        else:
            raise ValueError(f"unexpected header line {line!r}")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"unknown format {fmt!r}")
    if not elements or elements[0][0] != "vertex":
        raise ValueError("first element is not 'vertex'")
    _, n, props = elements[0]
    names = [p for p, _ in props]
    if not {"x", "y", "z"} <= set(names) or any(t is None for _, t in props):
        raise ValueError("vertex element lacks x, y, z or has list properties")
    body = data[body_start:]
    if fmt == "ascii":
        lines = body.decode("ascii", errors="replace").split("\n")
        if len([ln for ln in lines[:n] if ln.strip()]) < n:
            raise ValueError(f"declares {n} vertices, holds fewer")
        try:
            table = np.array([[float(x) for x in ln.split()[:len(props)]] for ln in lines[:n]], dtype=np.float64)
        except ValueError:
            raise ValueError("non-numeric vertex data") from None
        if table.shape != (n, len(props)):
            raise ValueError("vertex lines have the wrong number of values")
        return table[:, [names.index(c) for c in "xyz"]]
    endian = "<" if fmt == "binary_little_endian" else ">"
    dt = np.dtype([(p, endian + t) for p, t in props])
    need = n * dt.itemsize
    if len(body) < need:
        raise ValueError(f"truncated: declares {n} vertices ({need} bytes), holds {len(body)} bytes")
    v = np.frombuffer(body, dtype=dt, count=n)
    return np.stack([v["x"], v["y"], v["z"]], axis=-1).astype(np.float64)
