"""Synthetic ground truth: textured rooms rendered by a small numpy ray caster.

A `Scene` is a closed, axis-aligned room (walls, floor and ceiling facing inward) holding boxes
and spheres. Every surface carries its own procedural texture (multi-octave colour noise plus
random discs, rings, rectangles, crosses and triangles of many sizes), stored in one texture atlas
with a mip pyramid and sampled trilinearly, then lit by fixed Lambert lights. Cameras move inside
a free vertical cylinder around the room centre that no object enters.

Rendering is exact: depth is the z-depth of the ray through each pixel centre; colour is the
average of ``supersample x supersample`` sub-pixel rays (anti-aliasing), with mip-mapped texture
lookups so that distant or grazing surfaces do not shimmer.

Conventions: OpenCV camera axes (x right, y down, z forward), extrinsics world-to-camera (w2c)
4x4, ``K`` in pixels with the centre of pixel ``(u, v)`` at ``(u + 0.5, v + 0.5)``, depth is
z-depth in metres, the world's y axis points down (up is -y; the floor is at ``room_max[1]``).

Optional, for `fwdata.synth.effects`: colour rays through a distorted lens (`fwdata.dataset.lens`;
depth stays the pinhole ground truth) and `MovingSphere` objects added for one instant (in the
depth too). Without them the output is what it always was.

Surface ids (returned by `cast_rays`): ``0..5`` the room faces in `FACES` order, then 6 per box
(same face order, ``scene.box_surface(i)``), then one per sphere (``scene.sphere_surface(j)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from fwdata.dataset.camera import fov_to_focal, intrinsics_matrix, invert_pose, look_at
from fwdata.dataset.lens import Lens, distort_normalized, undistort_normalized

__all__ = [
    "PATH_KINDS",
    "EXTRA_PATH_KINDS",
    "ALL_PATH_KINDS",
    "MovingSphere",
    "FACES",
    "Scene",
    "SyntheticClip",
    "build_scene",
    "make_scene",
    "camera_path",
    "default_intrinsics",
    "cast_rays",
    "render_frame",
    "render_radiance",
    "render_clip",
    "make_clip",
    "surface_distance",
]

PATH_KINDS = ("orbit", "forward", "pan", "rotate")
#: kinds `camera_path` also makes but that are not in the default cycle of `fwdata synth` (so its
#: default output stays the same): "spin" is a rotation-dominant turn (a few centimetres of translation)
EXTRA_PATH_KINDS = ("spin",)
ALL_PATH_KINDS = PATH_KINDS + EXTRA_PATH_KINDS

# Axis-aligned faces: "-x" is the face at the low x of a box (or the room), "+x" at the high x.
FACES = ("-x", "+x", "-y", "+y", "-z", "+z")

TEXELS_PER_METRE = 64.0  # texture resolution on every surface (1.6 cm texels)
MIP_LEVELS = 5  # atlas regions are padded to multiples of 2**(MIP_LEVELS-1) texels
SHAPES_PER_M2 = 40.0  # random discs/rectangles/... per square metre of surface
EYE_HEIGHT = 1.55  # metres above the floor
OBJECT_CLEARANCE = 0.6  # metres between the camera cylinder and any object
PATH_CANDIDATES = 6  # random trajectories tried by camera_path

# Lambert lighting, fixed in the world: ambient + sum of weight * max(n . l, 0).
AMBIENT = 0.5
LIGHTS = (
    (np.array([0.4, -1.0, 0.3]) / np.linalg.norm([0.4, -1.0, 0.3]), 0.4),
    (np.array([-0.6, -0.3, -0.7]) / np.linalg.norm([-0.6, -0.3, -0.7]), 0.25),
)


# --------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------


@dataclass
class Scene:
    """A textured room with boxes and spheres; made by `make_scene` (or `build_scene`).

    Geometry (metres, world frame, y down):
      room_min, room_max: (3,) corners of the room; the floor is the plane y = room_max[1].
      boxes: (Nb, 2, 3) min and max corners.  spheres: (Ns, 4) centre xyz and radius.
      free_center: (3,) centre of the camera cylinder at eye height; free_radius: its radius.
        Cameras of `camera_path` stay within free_radius (horizontally) of free_center; no
        object comes closer than free_radius + OBJECT_CLEARANCE.
    Surfaces (S = 6 + 6 Nb + Ns, see the module docstring for the order):
      surf_axes: (S, 3) int, planes' normal axis, texture u axis, texture v axis.
      surf_origin: (S, 3) plane corner at which texture coordinates are 0, or sphere centre.
      surf_normal: (S, 3) planes' unit normal (into the room for room faces, outward for boxes).
      surf_origin_uv: (S, 2) surf_origin along the u and v axes.
      surf_region: (S, 4) int, atlas region (row, col, height, width) in level-0 texels.
      surf_shade: (S,) Lambert factor of planar surfaces.
    Texture: texels (M,) uint32, RGBA8 (A unused) packed for fast gathers, all mip levels of the
      atlas concatenated; level k is an (atlas_shape[0] >> k, atlas_shape[1] >> k) image that
      starts at texels[level_offset[k]].
    """

    seed: int
    room_min: np.ndarray
    room_max: np.ndarray
    boxes: np.ndarray
    spheres: np.ndarray
    free_center: np.ndarray
    free_radius: float
    surf_axes: np.ndarray
    surf_origin: np.ndarray
    surf_normal: np.ndarray
    surf_origin_uv: np.ndarray
    surf_region: np.ndarray
    surf_shade: np.ndarray
    texels: np.ndarray
    atlas_shape: tuple[int, int]
    level_offset: np.ndarray

    @property
    def num_surfaces(self) -> int:
        return 6 + 6 * len(self.boxes) + len(self.spheres)

    def box_surface(self, i: int) -> int:
        """Surface id of the "-x" face of box i (its faces follow in `FACES` order)."""
        return 6 + 6 * i

    def sphere_surface(self, j: int) -> int:
        """Surface id of sphere j."""
        return 6 + 6 * len(self.boxes) + j

    @property
    def floor_y(self) -> float:
        return float(self.room_max[1])


def _plane_faces(lo: np.ndarray, hi: np.ndarray, inward: bool) -> list[tuple]:
    """The 6 faces of box [lo, hi] in `FACES` order: (axes, origin, normal, size_v, size_u)."""
    faces = []
    for axis in range(3):
        if axis == 1:  # floor/ceiling: texture u along x, v along z
            u_axis, v_axis = 0, 2
        elif axis == 0:  # x walls: u along z, v along y (down)
            u_axis, v_axis = 2, 1
        else:  # z walls: u along x, v along y
            u_axis, v_axis = 0, 1
        for side in (0, 1):
            origin = lo.copy()
            origin[axis] = (lo, hi)[side][axis]
            normal = np.zeros(3)
            outward = -1.0 if side == 0 else 1.0
            normal[axis] = -outward if inward else outward
            faces.append(((axis, u_axis, v_axis), origin, normal,
                          hi[v_axis] - lo[v_axis], hi[u_axis] - lo[u_axis]))
    return faces


def _lambert(normals: np.ndarray) -> np.ndarray:
    """Shading factor (...,) for unit normals (...,3) under the fixed lights."""
    shade = np.full(normals.shape[:-1], AMBIENT, dtype=normals.dtype)
    for direction, weight in LIGHTS:
        shade = shade + weight * np.maximum(normals @ direction.astype(normals.dtype), 0.0)
    return np.minimum(shade, 1.0)


def _pad(n_texels: float) -> int:
    step = 2 ** (MIP_LEVELS - 1)
    return max(step, int(math.ceil(n_texels / step)) * step)


def _pack(sizes: list[tuple[int, int]], width: int) -> tuple[np.ndarray, int]:
    """Shelf-pack (h, w) rectangles into an atlas of the given width -> ((n, 2) row/col, height)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i][0])
    pos = np.zeros((len(sizes), 2), dtype=np.int64)
    row = col = shelf_h = 0
    for i in order:
        h, w = sizes[i]
        if col + w > width:
            row, col, shelf_h = row + shelf_h, 0, 0
        pos[i] = (row, col)
        col += w
        shelf_h = max(shelf_h, h)
    return pos, row + shelf_h


def _noise(shape: tuple[int, int], cell: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth value noise (H, W) float32 with features about `cell` texels wide, unit std."""
    h, w = shape
    grid = rng.standard_normal((h // cell + 3, w // cell + 3)).astype(np.float32)
    up = np.repeat(np.repeat(grid, cell, axis=0), cell, axis=1)
    # Two box filters of the cell width: quadratic B-spline interpolation of the random grid.
    up = ndimage.uniform_filter(ndimage.uniform_filter(up, cell), cell)
    up = up[cell:cell + h, cell:cell + w]
    return (up - up.mean()) / (up.std() + 1e-6)


def _draw_shapes(img: np.ndarray, regions: np.ndarray, areas: np.ndarray, rng: np.random.Generator) -> None:
    """Paint random shapes (discs, rings, rectangles, crosses, triangles) into the atlas regions.

    About SHAPES_PER_M2 per square metre of each surface, radii log-uniform from 1.5 to 30 cm,
    each clipped to its own region. Drawn vectorised in size buckets, biggest first, so small
    shapes stay visible on top of big ones.
    """
    counts = np.maximum(6, rng.poisson(SHAPES_PER_M2 * np.asarray(areas)))
    owner = np.repeat(np.arange(len(regions)), counts)
    n = len(owner)
    r0, c0, h, w = (regions[owner, k] for k in range(4))
    rad = np.exp(rng.uniform(math.log(0.015), math.log(0.30), n)) * TEXELS_PER_METRE
    cy = r0 + rng.uniform(0, 1, n) * h
    cx = c0 + rng.uniform(0, 1, n) * w
    a, b = rad, rad * rng.uniform(0.4, 1.0, n)
    ang = rng.uniform(0, math.pi, n)
    kind = rng.integers(0, 5, n)
    inner = rng.uniform(0.25, 0.6, n)  # ring: inner radius^2 fraction
    color = rng.random((n, 3)).astype(np.float32)
    # Half of the shapes very dark or very bright, for contrast.
    push = rng.integers(0, 4, n)
    color[push == 0] *= 0.25
    color[push == 1] = 0.75 + 0.25 * color[push == 1]
    bounds = [0.0, 2.0, 4.0, 7.0, 11.0, 16.0, np.inf]
    for lo_r, hi_r in reversed(list(zip(bounds[:-1], bounds[1:]))):
        for shape_kind in range(5):
            sel = np.nonzero((rad > lo_r) & (rad <= hi_r) & (kind == shape_kind))[0]
            if len(sel):
                _paint(img, shape_kind, sel, cy, cx, a, b, ang, inner, color, (r0, c0, h, w))


def _paint(img: np.ndarray, shape_kind: int, sel: np.ndarray, cy: np.ndarray, cx: np.ndarray,
           a: np.ndarray, b: np.ndarray, ang: np.ndarray, inner: np.ndarray, color: np.ndarray,
           region: tuple[np.ndarray, ...]) -> None:
    """Paint shapes ``sel`` of one kind (0 ellipse, 1 ring, 2 rectangle, 3 cross, 4 triangle)
    into img, each in a square window around its centre, clipped to its region (r0, c0, h, w)."""
    ext = int(math.ceil(a[sel].max())) + 1
    off = np.arange(-ext, ext + 1)
    py = np.floor(cy[sel]).astype(np.int64)[:, None, None] + off[None, :, None]
    px = np.floor(cx[sel]).astype(np.int64)[:, None, None] + off[None, None, :]
    yy = (py + 0.5 - cy[sel, None, None]).astype(np.float32)
    xx = (px + 0.5 - cx[sel, None, None]).astype(np.float32)
    cos = np.cos(ang[sel])[:, None, None].astype(np.float32)
    sin = np.sin(ang[sel])[:, None, None].astype(np.float32)
    dx, dy = np.abs(xx * cos + yy * sin), yy * cos - xx * sin
    A = a[sel, None, None].astype(np.float32)
    B = b[sel, None, None].astype(np.float32)
    if shape_kind <= 1:
        e = (dx / A) ** 2 + (dy / B) ** 2
        mask = e <= 1.0
        if shape_kind == 1:
            mask &= e >= inner[sel, None, None]
    elif shape_kind == 2:
        mask = (dx <= A) & (np.abs(dy) <= B)
    elif shape_kind == 3:
        mask = ((dx <= A) & (np.abs(dy) <= 0.3 * B)) | ((dx <= 0.3 * B) & (np.abs(dy) <= A))
    else:
        mask = (dy <= B) & (dx <= A * (B - dy) / (2 * B))
    r0, c0, h, w = (x[sel, None, None] for x in region)
    mask &= (py >= r0) & (py < r0 + h) & (px >= c0) & (px < c0 + w)
    j, iy, ix = np.nonzero(mask)
    img[py[j, iy, 0], px[j, 0, ix]] = color[sel[j]]


def _make_texture(regions: np.ndarray, areas: list[float], atlas_shape: tuple[int, int],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Atlas texels of all mip levels -> (texels (M,) RGBA8 packed in uint32, level offsets (L,))."""
    ah, aw = atlas_shape
    palette = rng.random((len(regions), 3, 3)).astype(np.float32)
    # Colour: blend of three per-surface colours by large-scale noise; luminance detail by
    # finer octaves; then random shapes on top.
    m1 = 1.0 / (1.0 + np.exp(-2.5 * _noise((ah, aw), 40, rng)))
    m2 = np.clip(_noise((ah, aw), 20, rng) - 0.3, 0.0, 1.0) * 0.8
    detail = (0.45 * _noise((ah, aw), 10, rng) + 0.3 * _noise((ah, aw), 5, rng)
              + 0.2 * _noise((ah, aw), 3, rng))
    lum = 0.85 + 0.35 * np.tanh(detail)
    img = np.zeros((ah, aw, 3), np.float32)
    for (r0, c0, h, w), (c1, c2, c3) in zip(regions, palette):
        win = np.s_[r0:r0 + h, c0:c0 + w]
        t1, t2 = m1[win][..., None], m2[win][..., None]
        img[win] = ((c1 * (1 - t1) + c2 * t1) * (1 - t2) + c3 * t2) * lum[win][..., None]
    np.clip(img, 0.0, 1.0, out=img)
    _draw_shapes(img, regions, np.asarray(areas), rng)
    levels = [img]
    for _ in range(1, MIP_LEVELS):  # 2x2 box filter; regions are aligned so levels do not bleed
        prev = levels[-1]
        levels.append(0.25 * (prev[0::2, 0::2] + prev[1::2, 0::2] + prev[0::2, 1::2] + prev[1::2, 1::2]))
    offsets = np.cumsum([0] + [lv.shape[0] * lv.shape[1] for lv in levels[:-1]])
    rgb = np.concatenate([lv.reshape(-1, 3) for lv in levels])
    rgba = np.zeros((len(rgb), 4), np.uint8)
    rgba[:, :3] = np.clip(np.rint(rgb * 255.0), 0, 255)
    return rgba.view(np.uint32).ravel(), offsets.astype(np.int64)


def build_scene(room_size: tuple[float, float, float], boxes: np.ndarray, spheres: np.ndarray,
                seed: int, free_radius: float | None = None) -> Scene:
    """Scene from explicit geometry: room centred on the origin, floor at y = room_size[1] / 2.

    ``boxes`` (Nb, 2, 3) min/max corners, ``spheres`` (Ns, 4) centre and radius, in metres.
    Textures are generated from ``seed``. ``free_radius`` defaults to that of `make_scene`.
    """
    rng = np.random.default_rng([seed, 1])
    size = np.asarray(room_size, dtype=np.float64)
    room_min, room_max = -size / 2, size / 2
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 3)
    spheres = np.asarray(spheres, dtype=np.float64).reshape(-1, 4)
    eye_y = room_max[1] - min(EYE_HEIGHT, 0.55 * size[1])
    if free_radius is None:
        free_radius = 0.475 * min(size[0], size[2]) / 2
    surf = _plane_faces(room_min, room_max, inward=True)
    for lo, hi in boxes:
        surf += _plane_faces(lo, hi, inward=False)
    axes = np.array([f[0] for f in surf] + [(0, 0, 0)] * len(spheres), dtype=np.int64).reshape(-1, 3)
    origin = np.array([f[1] for f in surf] + [s[:3] for s in spheres], dtype=np.float64).reshape(-1, 3)
    normal = np.array([f[2] for f in surf] + [(0.0, 0.0, 0.0)] * len(spheres)).reshape(-1, 3)
    sizes_m = [(f[3], f[4]) for f in surf] + [(math.pi * r, 2 * math.pi * r) for r in spheres[:, 3]]
    sizes = [(_pad(h * TEXELS_PER_METRE), _pad(w * TEXELS_PER_METRE)) for h, w in sizes_m]
    atlas_w = max(1024, max(w for _, w in sizes))
    pos, atlas_h = _pack(sizes, atlas_w)
    atlas_h = _pad(atlas_h)
    regions = np.concatenate([pos, np.array(sizes, dtype=np.int64)], axis=1)
    areas = [h * w for h, w in sizes_m]
    texels, level_offset = _make_texture(regions, areas, (atlas_h, atlas_w), rng)
    return Scene(
        seed=seed,
        room_min=room_min,
        room_max=room_max,
        boxes=boxes,
        spheres=spheres,
        free_center=np.array([0.0, eye_y, 0.0]),
        free_radius=float(free_radius),
        surf_axes=axes,
        surf_origin=origin,
        surf_normal=normal,
        surf_origin_uv=np.stack([origin[np.arange(len(axes)), axes[:, 1]],
                                 origin[np.arange(len(axes)), axes[:, 2]]], axis=1),
        surf_region=regions,
        surf_shade=_lambert(normal),
        texels=texels,
        atlas_shape=(atlas_h, atlas_w),
        level_offset=level_offset,
    )


def _horizontal_gap(lo: np.ndarray, hi: np.ndarray, center: np.ndarray) -> float:
    """Horizontal (xz) distance from a point to the footprint of box [lo, hi]."""
    dx = max(lo[0] - center[0], 0.0, center[0] - hi[0])
    dz = max(lo[2] - center[2], 0.0, center[2] - hi[2])
    return math.hypot(dx, dz)


def make_scene(seed: int, room_size: tuple[float, float, float] = (8.0, 3.0, 8.0)) -> Scene:
    """Random room (x width, y height, z depth in metres) with 5-8 boxes and 3-5 spheres.

    Objects stand on the floor or float, never overlap each other (5 cm gap), keep 5 cm from the
    walls and stay outside the camera cylinder plus `OBJECT_CLEARANCE`. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    size = np.asarray(room_size, dtype=np.float64)
    room_min, room_max = -size / 2, size / 2
    free_radius = 0.475 * min(size[0], size[2]) / 2
    keep_out = free_radius + OBJECT_CLEARANCE
    center = np.zeros(3)
    gap = 0.05
    placed: list[tuple[np.ndarray, np.ndarray]] = []  # AABBs of placed objects

    def fits(lo: np.ndarray, hi: np.ndarray) -> bool:
        floor_ok = np.array([-gap, 1e-6, -gap])  # objects may touch the floor, not the walls
        if np.any(lo < room_min + gap) or np.any(hi > room_max + floor_ok):
            return False
        if _horizontal_gap(lo, hi, center) < keep_out:
            return False
        return all(np.any(lo > h2 + gap) or np.any(hi < l2 - gap) for l2, h2 in placed)

    boxes, spheres = [], []
    n_boxes, n_spheres = int(rng.integers(5, 9)), int(rng.integers(3, 6))
    for _ in range(400):
        if len(boxes) >= n_boxes:
            break
        half = np.array([rng.uniform(0.15, 0.6), 0.0, rng.uniform(0.15, 0.6)])
        xz = rng.uniform(room_min + half, room_max - half)
        if rng.random() < 0.7:  # standing on the floor
            height = rng.uniform(0.3, min(2.0, size[1] - 0.3))
            lo = np.array([xz[0] - half[0], room_max[1] - height, xz[2] - half[2]])
            hi = np.array([xz[0] + half[0], room_max[1], xz[2] + half[2]])
        else:  # floating
            half[1] = rng.uniform(0.15, 0.4)
            y = rng.uniform(room_min[1] + half[1] + 0.2, room_max[1] - half[1] - 0.2)
            lo = np.array([xz[0] - half[0], y - half[1], xz[2] - half[2]])
            hi = np.array([xz[0] + half[0], y + half[1], xz[2] + half[2]])
        if fits(lo, hi):
            placed.append((lo, hi))
            boxes.append((lo, hi))
    for _ in range(400):
        if len(spheres) >= n_spheres:
            break
        r = rng.uniform(0.2, 0.6)
        c = rng.uniform(room_min + r, room_max - r)
        if rng.random() < 0.4:  # resting on the floor
            c[1] = room_max[1] - r
        lo, hi = c - r, c + r
        if fits(lo, hi):
            placed.append((lo, hi))
            spheres.append((*c, r))
    return build_scene(room_size, np.array(boxes).reshape(-1, 2, 3), np.array(spheres).reshape(-1, 4),
                       seed, free_radius=free_radius)


def surface_distance(scene: Scene, points: np.ndarray) -> np.ndarray:
    """Unsigned distance (N,) from points (N,3) inside the room to the nearest scene surface."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    dist = np.minimum(p - scene.room_min, scene.room_max - p).min(axis=1)
    dist = np.abs(dist)
    for lo, hi in scene.boxes:
        q = np.abs(p - (lo + hi) / 2) - (hi - lo) / 2
        sdf = np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)
        dist = np.minimum(dist, np.abs(sdf))
    for s in scene.spheres:
        dist = np.minimum(dist, np.abs(np.linalg.norm(p - s[:3], axis=1) - s[3]))
    return dist


# --------------------------------------------------------------------------------------------
# Cameras
# --------------------------------------------------------------------------------------------


def default_intrinsics(height: int, width: int, fov_w_deg: float = 60.0) -> np.ndarray:
    """K (3,3): fx = fy from the horizontal field of view, principal point (W/2, H/2)."""
    f = float(fov_to_focal(math.radians(fov_w_deg), width))
    return intrinsics_matrix(f, f, width / 2.0, height / 2.0)


def _direction(yaw: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """Unit view directions (...,3) from yaw about -y (0 = +z) and pitch (> 0 looks down)."""
    return np.stack([np.cos(pitch) * np.sin(yaw), np.sin(pitch), np.cos(pitch) * np.cos(yaw)], axis=-1)


def _poses(eyes: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """w2c (T,4,4) of cameras at eyes (T,3) looking at targets (T,3), world up -y."""
    return np.stack([invert_pose(look_at(e, t)) for e, t in zip(eyes, targets)])


def camera_path(kind: str, num_frames: int, scene: Scene, seed: int) -> np.ndarray:
    """Smooth camera trajectory inside the scene's free cylinder -> w2c (T,4,4) float64.

    kind: "orbit" (arc of 20-90 degrees around an object, looking at it), "forward" (dolly
    forward with slight sideways drift, a slow 10-16 degree turn and wobble), "pan" (sideways
    truck looking roughly forward, turning 14-20 degrees), "rotate" (in-place yaw of 12-60
    degrees, some tilt, 0.3-0.6 m of translation), "spin" (rotation-dominant: yaw of 30-150
    degrees, about 1.6-2.4 degrees per frame, tilt of about 6 degrees, under 10 cm of translation;
    not in PATH_KINDS, see EXTRA_PATH_KINDS). All views tilt a little (a few degrees).
    Per-frame motion is a few centimetres / about one degree; the total grows with num_frames
    up to what the free space allows. Of PATH_CANDIDATES random paths the one whose views have
    the most depth variety is kept (objects against walls, not one plane filling the view: SfM
    needs that to fix the focal length). Deterministic in (scene, seed).
    """
    if kind not in ALL_PATH_KINDS:
        raise ValueError(f"unknown camera path kind {kind!r}; choose from {', '.join(ALL_PATH_KINDS)}")
    if num_frames < 1:
        raise ValueError("num_frames must be at least 1")
    rng = np.random.default_rng([seed, 2, ALL_PATH_KINDS.index(kind)])
    best, best_score = None, -np.inf
    for _ in range(PATH_CANDIDATES):
        w2c = _random_path(kind, num_frames, scene, rng)
        score = _depth_variety(scene, w2c)
        if score > best_score:
            best, best_score = w2c, score
    return best


def _depth_variety(scene: Scene, w2c: np.ndarray) -> float:
    """Mean over the first, middle and last views (18x32 rays, 60 degree field of view) of the
    standard deviation of inverse depth (parallax varies with it)."""
    h, w = 18, 32
    K = default_intrinsics(h, w, 60.0)
    scores = []
    for pose in w2c[sorted({0, len(w2c) // 2, len(w2c) - 1})]:
        dirs, origin, _ = _camera_rays(K, pose, h, w, 1, np.float64)
        t, _ = _trace(scene, origin, dirs)
        scores.append((1.0 / t).std())
    return float(np.mean(scores))


def _random_path(kind: str, num_frames: int, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One random trajectory of the given kind -> w2c (T,4,4); see `camera_path`."""
    n = num_frames - 1
    s = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    C = scene.free_center
    R = scene.free_radius
    up = np.array([0.0, -1.0, 0.0])
    yaw0 = rng.uniform(-math.pi, math.pi)
    pitch0 = math.radians(rng.uniform(4.0, 12.0))
    bob = 0.03 * np.sin(2 * math.pi * s * rng.uniform(0.5, 1.0) + rng.uniform(0, 2 * math.pi))

    if kind == "orbit":
        centers = [0.5 * (lo + hi) for lo, hi in scene.boxes] + [sp[:3] for sp in scene.spheres]
        if centers:
            centers = np.array(centers)
            dist = np.hypot(centers[:, 0] - C[0], centers[:, 2] - C[2])
            near = np.argsort(dist)[: max(1, min(3, len(dist)))]
            target = centers[rng.choice(near)].copy()
        else:
            target = C + 2.5 * R * _direction(np.array(yaw0), np.array(0.0))
        target[1] = np.clip(target[1], C[1] - 0.5, C[1] + 1.0)
        d = float(np.hypot(target[0] - C[0], target[2] - C[2]))
        e1 = np.array([target[0] - C[0], 0.0, target[2] - C[2]]) / d
        e2 = np.cross(e1, up)
        span = math.radians(np.clip(rng.uniform(1.2, 1.6) * n, 20.0, 90.0))
        while True:  # widest arc (<= span) that fits the free cylinder, centred on it along e1
            rho = 2 * d / (1 + math.cos(span / 2))
            end = math.hypot(d - rho * math.cos(span / 2), rho * math.sin(span / 2))
            if end <= 0.97 * R or span < math.radians(5):
                break
            span *= 0.95
        phi = (s - 0.5) * span * rng.choice([-1.0, 1.0])
        eyes = (target[None] - rho * np.cos(phi)[:, None] * e1 + rho * np.sin(phi)[:, None] * e2)
        eyes[:, 1] = C[1] + bob
        targets = np.repeat(target[None], num_frames, axis=0)
    elif kind in ("forward", "pan"):
        fwd = _direction(np.array(yaw0), np.array(0.0))
        side = np.cross(fwd, up)  # camera right
        offset = rng.uniform(-0.3, 0.3) * R
        speed = rng.uniform(0.035, 0.05)
        drift = rng.uniform(0.04, 0.1) * np.sin(math.pi * s + rng.uniform(0, math.pi))
        chord = 2 * math.sqrt(R**2 - (abs(offset) + 0.12) ** 2)
        length = float(np.clip(speed * n, 0.3, 0.9 * chord))
        if kind == "forward":
            eyes = C + offset * side + ((s - 0.5) * length)[:, None] * fwd + drift[:, None] * side
            # Looking around a little while walking (a 10-16 degree turn plus wobble): without
            # rotation SfM cannot tell the focal length from a stretch of the scene in depth.
            yaw = (yaw0 + math.radians(rng.uniform(10.0, 16.0)) * rng.choice([-1.0, 1.0]) * (s - 0.5)
                   + math.radians(3.0) * np.sin(math.pi * s * rng.uniform(0.5, 1.5) + rng.uniform(0, 3)))
        else:
            sign = rng.choice([-1.0, 1.0])
            eyes = C + offset * fwd + ((s - 0.5) * length * sign)[:, None] * side + drift[:, None] * fwd
            # A slow turn of 14-20 degrees and some tilt over the truck: enough rotation for SfM to
            # fix the focal length (pure translation leaves focal length and depth ambiguous).
            yaw = yaw0 + math.radians(rng.uniform(14.0, 20.0)) * rng.choice([-1.0, 1.0]) * (s - 0.5)
        eyes[:, 1] = C[1] + bob
        pitch = pitch0 + math.radians(4.0) * np.sin(2 * math.pi * s * rng.uniform(0.5, 1.0) + rng.uniform(0, 3))
        targets = eyes + _direction(yaw, pitch)
    elif kind == "spin":
        # Rotation-dominant: the camera turns about an axis a few centimetres behind it and barely
        # moves, so there is little parallax (hard for SfM initialisation and triangulation).
        pivot = C + rng.uniform(0.0, 0.5 * R) * _direction(np.array(rng.uniform(-math.pi, math.pi)), np.array(0.0))
        span = math.radians(np.clip(rng.uniform(1.6, 2.4) * n, 30.0, 150.0)) * rng.choice([-1.0, 1.0])
        yaw = yaw0 + (s - 0.5) * span
        arm = rng.uniform(0.0, 0.05)
        move = rng.uniform(0.0, 0.05) * _direction(np.array(rng.uniform(-math.pi, math.pi)), np.array(0.0))
        eyes = pivot + arm * _direction(yaw, np.zeros_like(yaw)) + (s - 0.5)[:, None] * move
        eyes[:, 1] = C[1] + 0.3 * bob
        pitch = pitch0 + math.radians(6.0) * np.sin(2 * math.pi * s * rng.uniform(0.5, 1.0) + rng.uniform(0, 3))
        targets = eyes + _direction(yaw, pitch)
    else:  # rotate
        pivot = C + rng.uniform(0.0, 0.5 * R) * _direction(np.array(rng.uniform(-math.pi, math.pi)), np.array(0.0))
        span = math.radians(np.clip(rng.uniform(0.7, 1.0) * n, 12.0, 60.0)) * rng.choice([-1.0, 1.0])
        yaw = yaw0 + (s - 0.5) * span
        arm = rng.uniform(0.25, 0.35)  # camera in front of the rotation axis, like a hand-held turn
        move = rng.uniform(0.4, 0.6) * _direction(np.array(rng.uniform(-math.pi, math.pi)), np.array(0.0))
        eyes = pivot + arm * _direction(yaw, np.zeros_like(yaw)) + (s - 0.5)[:, None] * move
        eyes[:, 1] = C[1] + bob
        # Some tilt as well: rotation about two axes pins down the focal length.
        pitch = pitch0 + math.radians(4.0) * np.sin(2 * math.pi * s * rng.uniform(0.5, 1.0) + rng.uniform(0, 3))
        targets = eyes + _direction(yaw, pitch)

    # Safety for unusual room sizes: pull the path towards the centre if it leaves the cylinder.
    radial = np.hypot(eyes[:, 0] - C[0], eyes[:, 2] - C[2]).max()
    if radial > R:
        shift = np.array([C[0], 0.0, C[2]])
        eyes_new = shift + (eyes - shift) * np.array([R / radial, 1.0, R / radial])
        targets = targets + (eyes_new - eyes) if kind != "orbit" else targets
        eyes = eyes_new
    return _poses(eyes, targets)


# --------------------------------------------------------------------------------------------
# Ray casting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LensGrid:
    """A ray grid cast through a distorted lens: the lens and the bounding box (x0, x1, y0, y1) of
    the pinhole normalised coordinates its rays go through."""

    lens: Lens
    bounds: tuple[float, float, float, float]


def _screen_window(lo: np.ndarray, hi: np.ndarray, K: np.ndarray, w2c: np.ndarray,
                   shape: tuple[int, int], lens_grid: _LensGrid | None = None) -> tuple[int, int, int, int] | None:
    """Rows/cols (r0, r1, c0, c1) of a ray grid (rays at (j+0.5) in K's pixels) that may hit
    the AABB [lo, hi]; None when it is entirely behind the camera. With ``lens_grid`` the grid's
    pixels are distorted ones (`_lens_window`)."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    cam = corners @ w2c[:3, :3].T + w2c[:3, 3]
    h, w = shape
    if np.all(cam[:, 2] <= 0):
        return None
    if np.any(cam[:, 2] <= 1e-6):
        return 0, h, 0, w
    if lens_grid is not None:
        return _lens_window(cam, K, shape, lens_grid)
    uv = cam @ K.T
    u, v = uv[:, 0] / uv[:, 2], uv[:, 1] / uv[:, 2]
    c0, c1 = max(0, int(math.floor(u.min() - 0.5)) - 1), min(w, int(math.ceil(u.max() - 0.5)) + 2)
    r0, r1 = max(0, int(math.floor(v.min() - 0.5)) - 1), min(h, int(math.ceil(v.max() - 0.5)) + 2)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, r1, c0, c1


def _lens_window(cam: np.ndarray, K: np.ndarray, shape: tuple[int, int],
                 lens_grid: _LensGrid) -> tuple[int, int, int, int] | None:
    """`_screen_window` for a distorted grid: the object's pinhole rectangle (normalised, from its
    corners in front of the camera), cut to the region the grid sees, with its boundary mapped
    through the lens (the model is checked to be one-to-one there, `lens.check_lens`) plus 2 samples."""
    x, y = cam[:, 0] / cam[:, 2], cam[:, 1] / cam[:, 2]
    bx0, bx1, by0, by1 = lens_grid.bounds
    x0, x1 = max(x.min(), bx0), min(x.max(), bx1)
    y0, y1 = max(y.min(), by0), min(y.max(), by1)
    if x0 > x1 or y0 > y1:
        return None
    t = np.linspace(0.0, 1.0, 33)
    ex = np.concatenate([x0 + (x1 - x0) * t, np.full(33, x1), x1 - (x1 - x0) * t, np.full(33, x0)])
    ey = np.concatenate([np.full(33, y0), y0 + (y1 - y0) * t, np.full(33, y1), y1 - (y1 - y0) * t])
    xd, yd = distort_normalized(ex, ey, lens_grid.lens)
    u, v = K[0, 0] * xd + K[0, 2], K[1, 1] * yd + K[1, 2]
    h, w = shape
    c0, c1 = max(0, int(math.floor(u.min() - 0.5)) - 2), min(w, int(math.ceil(u.max() - 0.5)) + 3)
    r0, r1 = max(0, int(math.floor(v.min() - 0.5)) - 2), min(h, int(math.ceil(v.max() - 0.5)) + 3)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, r1, c0, c1


def _trace(scene: Scene, origin: np.ndarray, dirs: np.ndarray,
           K: np.ndarray | None = None, w2c: np.ndarray | None = None,
           lens_grid: _LensGrid | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of rays ``origin + t * dirs`` -> (t (h,w), surface id (h,w) int64).

    ``dirs`` (h,w,3) need not be unit; t is in units of |dirs|. With ``K``/``w2c`` (the ray grid's
    camera) objects are only tested inside their screen-space bounding rectangle (``lens_grid``:
    the grid's pixels are those of a distorted lens).
    """
    dtype = dirs.dtype
    o = origin.astype(dtype)
    d = np.where(np.abs(dirs) < 1e-12, np.asarray(1e-12, dtype), dirs)
    inv = 1.0 / d
    # Room, seen from inside: the ray leaves through the nearest of the three far slabs.
    t_axes = (np.where(d > 0, scene.room_max.astype(dtype), scene.room_min.astype(dtype)) - o) * inv
    axis = t_axes.argmin(axis=-1)
    t = np.take_along_axis(t_axes, axis[..., None], axis=-1)[..., 0]
    sid = 2 * axis + (np.take_along_axis(d, axis[..., None], axis=-1)[..., 0] > 0)
    full = (0, d.shape[0], 0, d.shape[1])

    for i, (lo, hi) in enumerate(scene.boxes):
        win = full if K is None else _screen_window(lo, hi, K, w2c, d.shape[:2], lens_grid)
        if win is None:
            continue
        r0, r1, c0, c1 = win
        iw = inv[r0:r1, c0:c1]
        t1 = (lo.astype(dtype) - o) * iw
        t2 = (hi.astype(dtype) - o) * iw
        tn = np.minimum(t1, t2)
        t_near = tn.max(axis=-1)
        t_far = np.maximum(t1, t2).min(axis=-1)
        tw, sw = t[r0:r1, c0:c1], sid[r0:r1, c0:c1]
        hit = (t_near <= t_far) & (t_near > 0) & (t_near < tw)
        if not hit.any():
            continue
        ax = tn.argmax(axis=-1)
        face = 2 * ax + (np.take_along_axis(d[r0:r1, c0:c1], ax[..., None], axis=-1)[..., 0] < 0)
        tw[hit] = t_near[hit]
        sw[hit] = scene.box_surface(i) + face[hit]

    for j, sp in enumerate(scene.spheres):
        c, r = sp[:3], sp[3]
        win = full if K is None else _screen_window(c - r, c + r, K, w2c, d.shape[:2], lens_grid)
        if win is None:
            continue
        r0, r1, c0, c1 = win
        dw = dirs[r0:r1, c0:c1]
        oc = (o - c).astype(dtype)
        a = np.einsum("...i,...i->...", dw, dw)
        b = dw @ oc
        disc = b * b - a * (oc @ oc - r * r)
        tw, sw = t[r0:r1, c0:c1], sid[r0:r1, c0:c1]
        hit = disc >= 0
        if not hit.any():
            continue
        th = (-b - np.sqrt(np.maximum(disc, 0))) / a
        hit &= (th > 0) & (th < tw)
        tw[hit] = th[hit]
        sw[hit] = scene.sphere_surface(j)
    return t, sid.astype(np.int64)


def cast_rays(scene: Scene, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hits of rays from ``origin`` (3,) along ``dirs`` (...,3) (float64, not necessarily unit).

    Returns (t (...), surface id (...)); the hit point is ``origin + t * dirs``.
    """
    dirs = np.asarray(dirs, dtype=np.float64)
    shape = dirs.shape[:-1]
    t, sid = _trace(scene, np.asarray(origin, dtype=np.float64), dirs.reshape(1, -1, 3))
    return t.reshape(shape), sid.reshape(shape)


def _camera_rays(K: np.ndarray, w2c: np.ndarray, height: int, width: int, ss: int,
                 dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World ray directions (H*ss, W*ss, 3) with camera-z component 1, the camera centre and the
    intrinsics of the sample grid (sample (j, i) is at pixel coordinate ((i+0.5)/ss, (j+0.5)/ss))."""
    u = (np.arange(width * ss) + 0.5) / ss
    v = (np.arange(height * ss) + 0.5) / ss
    uu, vv = np.meshgrid(u, v)
    pix = np.stack([uu, vv, np.ones_like(uu)], axis=-1)
    rays_cam = pix @ np.linalg.inv(K).T
    rays_cam = rays_cam / rays_cam[..., 2:3]
    c2w = invert_pose(w2c)
    dirs = (rays_cam @ c2w[:3, :3].T).astype(dtype)
    K_grid = np.diag([ss, ss, 1.0]) @ K  # pixels of the sample grid, centres at +0.5 as well
    return dirs, c2w[:3, 3], K_grid


def _distorted_camera_rays(K: np.ndarray, w2c: np.ndarray, height: int, width: int, ss: int, dtype: type,
                           lens: Lens) -> tuple[np.ndarray, np.ndarray, np.ndarray, _LensGrid]:
    """`_camera_rays` of a distorted camera: the sample at distorted pixel coordinate
    ((i+0.5)/ss, (j+0.5)/ss) looks along the pinhole ray of its undistorted position."""
    u = (np.arange(width * ss) + 0.5) / ss
    v = (np.arange(height * ss) + 0.5) / ss
    uu, vv = np.meshgrid(u, v)
    x, y, _ = undistort_normalized((uu - K[0, 2]) / K[0, 0], (vv - K[1, 2]) / K[1, 1], lens)
    rays_cam = np.stack([x, y, np.ones_like(x)], axis=-1)
    c2w = invert_pose(w2c)
    dirs = (rays_cam @ c2w[:3, :3].T).astype(dtype)
    K_grid = np.diag([ss, ss, 1.0]) @ K
    grid = _LensGrid(lens, (float(x.min()), float(x.max()), float(y.min()), float(y.max())))
    return dirs, c2w[:3, 3], K_grid, grid


# --------------------------------------------------------------------------------------------
# Moving objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MovingSphere:
    """A sphere that is not part of the static scene, at one instant: centre (3,) and radius in
    metres, painted with a checker of ``stripes`` bands in longitude and latitude (about the world
    axes) in two colours (RGB in [0, 1]), lit like the scene."""

    center: tuple[float, float, float]
    radius: float
    color_a: tuple[float, float, float] = (0.9, 0.3, 0.1)
    color_b: tuple[float, float, float] = (0.1, 0.2, 0.7)
    stripes: int = 8


def _trace_movers(movers: tuple[MovingSphere, ...], origin: np.ndarray, dirs: np.ndarray,
                  t: np.ndarray) -> np.ndarray:
    """Intersect ``movers`` with the rays, updating t (h,w) in place where one is nearer ->
    index (h,w) int of the mover hit, -1 where none."""
    hit_index = np.full(t.shape, -1, dtype=np.int64)
    dtype = dirs.dtype
    a = np.einsum("...i,...i->...", dirs, dirs)
    for j, m in enumerate(movers):
        oc = (np.asarray(origin, np.float64) - np.asarray(m.center, np.float64)).astype(dtype)
        b = dirs @ oc
        disc = b * b - a * (oc @ oc - m.radius * m.radius)
        hit = disc >= 0
        if not hit.any():
            continue
        th = (-b - np.sqrt(np.maximum(disc, 0))) / a
        hit &= (th > 0) & (th < t)
        t[hit] = th[hit]
        hit_index[hit] = j
    return hit_index


def _shade_movers(movers: tuple[MovingSphere, ...], origin: np.ndarray, dirs: np.ndarray, t: np.ndarray,
                  index: np.ndarray) -> np.ndarray:
    """Colour (N,3) float32 of mover hits: checker times Lambert."""
    p = origin.astype(np.float32) + t[:, None] * dirs
    centers = np.array([m.center for m in movers], np.float32)[index]
    radii = np.array([m.radius for m in movers], np.float32)[index]
    nrm = (p - centers) / radii[:, None]
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    lon = np.arctan2(nrm[:, 2], nrm[:, 0])
    lat = np.arcsin(np.clip(-nrm[:, 1], -1.0, 1.0))
    stripes = np.array([m.stripes for m in movers], np.float32)[index]
    check = (np.floor(lon * stripes / np.pi) + np.floor(lat * stripes / np.pi)) % 2
    ca = np.array([m.color_a for m in movers], np.float32)[index]
    cb = np.array([m.color_b for m in movers], np.float32)[index]
    color = ca * (1 - check[:, None]) + cb * check[:, None]
    return (color * _lambert(nrm)[:, None]).astype(np.float32)


def _bilinear(texels: np.ndarray, lut: np.ndarray, lut_index: np.ndarray, x: np.ndarray,
              y: np.ndarray) -> np.ndarray:
    """Bilinear lookup (N,4) float32 (0..255, A unused) at level-0 texel coordinates x, y (N,).

    ``lut[lut_index]`` rows (level * S + surface) hold the region's first texel index in that mip
    level, its height, width and the level's row width; lookups are clamped to the region (no
    bleeding between surfaces)."""
    base, h, w, row_w = (lut[lut_index, k] for k in range(4))
    scale = np.exp2(-(lut_index // (len(lut) // MIP_LEVELS)).astype(np.float32))
    xs = np.minimum(np.maximum(x * scale - 0.5, 0), w - 1)
    ys = np.minimum(np.maximum(y * scale - 0.5, 0), h - 1)
    x0 = xs.astype(np.int32)
    y0 = ys.astype(np.int32)
    fx = (xs - x0)[:, None]
    fy = (ys - y0)[:, None]
    dx = (x0 + 1 < w).astype(np.int32)  # 0 at the region's last column / row
    dy = (y0 + 1 < h) * row_w
    i00 = base + y0 * row_w + x0

    def tap(idx: np.ndarray) -> np.ndarray:
        return np.take(texels, idx).view(np.uint8).reshape(-1, 4)

    top = tap(i00) * (1 - fx) + tap(i00 + dx) * fx
    bot = tap(i00 + dy) * (1 - fx) + tap(i00 + dy + dx) * fx
    return top * (1 - fy) + bot * fy


def _sample_texture(scene: Scene, sid: np.ndarray, x: np.ndarray, y: np.ndarray,
                    level: np.ndarray) -> np.ndarray:
    """Trilinear lookup (N,3) float32 in [0, 1] at level-0 texel coordinates x, y (N,) of surfaces
    sid (N,) at fractional mip level (N,)."""
    # Look-up table, row (level * S + surface): region start index, height, width, atlas row width.
    S = scene.num_surfaces
    lv = np.repeat(np.arange(MIP_LEVELS), S)
    reg = np.tile(scene.surf_region, (MIP_LEVELS, 1)) >> lv[:, None]
    row_w = scene.atlas_shape[1] >> lv
    lut = np.stack([scene.level_offset[lv] + reg[:, 0] * row_w + reg[:, 1], reg[:, 2], reg[:, 3], row_w],
                   axis=1).astype(np.int32)
    l0 = level.astype(np.int32)  # level >= 0
    frac = level - l0
    row = l0 * S + sid.astype(np.int32)
    out = _bilinear(scene.texels, lut, row, x, y)
    blend = np.nonzero(frac > 1e-3)[0]  # the next level only where it contributes
    if len(blend):
        f = frac[blend, None]
        upper_row = np.minimum(l0[blend] + 1, MIP_LEVELS - 1) * S + sid[blend].astype(np.int32)
        upper = _bilinear(scene.texels, lut, upper_row, x[blend], y[blend])
        out[blend] = out[blend] * (1 - f) + upper * f
    return out[:, :3] * np.float32(1.0 / 255.0)


def _shade(scene: Scene, origin: np.ndarray, dirs: np.ndarray, t: np.ndarray, sid: np.ndarray,
           texels_per_sample: float) -> np.ndarray:
    """Colour (N,3) float32 of hits: texture (mip level from the ray footprint) times Lambert.

    dirs (N,3) float32 ray directions, t (N,) hit parameters, sid (N,) surface ids;
    texels_per_sample: level-0 texels per metre divided by (focal length * supersample).
    """
    p = origin.astype(np.float32) + t[:, None] * dirs
    ray_len = np.sqrt(np.einsum("ij,ij->i", dirs, dirs))
    # Planar surfaces (computed for every ray, spheres overwritten below).
    axes = scene.surf_axes[sid]
    x = np.take_along_axis(p, axes[:, 1:2], axis=1)[:, 0] - scene.surf_origin_uv[sid, 0]
    y = np.take_along_axis(p, axes[:, 2:3], axis=1)[:, 0] - scene.surf_origin_uv[sid, 1]
    cos_inc = np.abs(np.take_along_axis(dirs, axes[:, 0:1], axis=1)[:, 0]) / ray_len
    shade = scene.surf_shade[sid].astype(np.float32)
    stretch = np.ones_like(t)
    sphere = np.nonzero(sid >= scene.sphere_surface(0))[0]
    if len(sphere):
        sp = scene.spheres[sid[sphere] - scene.sphere_surface(0)].astype(np.float32)
        nrm = (p[sphere] - sp[:, :3]) / sp[:, 3:4]
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
        lon = np.arctan2(nrm[:, 2], nrm[:, 0])
        lat = np.arcsin(np.clip(-nrm[:, 1], -1.0, 1.0))
        x[sphere] = sp[:, 3] * (lon + np.pi)
        y[sphere] = sp[:, 3] * (np.pi / 2 - lat)
        cos_inc[sphere] = np.abs(np.einsum("ij,ij->i", nrm, dirs[sphere])) / ray_len[sphere]
        stretch[sphere] = 1.0 / np.maximum(np.cos(lat), 0.1)
        shade[sphere] = _lambert(nrm)
    # Mip level: log2 of the texels one sample covers (distance / focal, stretched by obliquity).
    foot = t * ray_len * np.float32(texels_per_sample) * stretch / np.maximum(cos_inc, 0.1)
    level = np.minimum(np.log2(np.maximum(foot, 1.0)), MIP_LEVELS - 1)
    tex = _sample_texture(scene, sid, x * TEXELS_PER_METRE, y * TEXELS_PER_METRE, level)
    return tex * shade[:, None]


def render_frame(scene: Scene, K: np.ndarray, w2c: np.ndarray, height: int, width: int,
                 supersample: int = 2, lens: Lens | None = None,
                 movers: tuple[MovingSphere, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Render one view -> (rgb (H,W,3) uint8, depth (H,W) float32 z-depth in metres).

    Colour averages supersample**2 rays per pixel; depth comes from the single ray through the
    pixel centre (exact). ``K`` (3,3) pixels, ``w2c`` (4,4) OpenCV world-to-camera. See
    `render_radiance` for ``lens`` and ``movers``.
    """
    color, depth = render_radiance(scene, K, w2c, height, width, supersample, lens, movers)
    rgb = np.clip(np.rint(color * 255.0), 0, 255).astype(np.uint8)
    return rgb, depth


def render_radiance(scene: Scene, K: np.ndarray, w2c: np.ndarray, height: int, width: int,
                    supersample: int = 2, lens: Lens | None = None, movers: tuple[MovingSphere, ...] = (),
                    with_depth: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Render one view before quantisation -> (colour (H,W,3) float32 in [0, 1], depth (H,W) float32).

    ``lens``: colour samples look through the distorted lens (`fwdata.dataset.lens`); depth stays the
    pinhole z-depth of pixel centres (the ground truth in the contract's PINHOLE camera). ``movers``:
    spheres added to the scene for this instant; they are in the depth too (the true depth of what
    is rendered). ``with_depth=False`` skips the depth rays (sub-frames of a motion blur) and
    returns None for the depth.
    """
    K = np.asarray(K, dtype=np.float64)
    w2c = np.asarray(w2c, dtype=np.float64)
    ss = int(supersample)
    if ss < 1:
        raise ValueError("supersample must be >= 1")
    if lens is not None and lens.is_identity:
        lens = None
    movers = tuple(movers)
    depth = None
    lens_grid = None
    if with_depth or (ss == 1 and lens is None):
        # Depth: rays with camera-z component 1, so the hit parameter t is the z-depth.
        dirs, origin, K_grid = _camera_rays(K, w2c, height, width, 1, np.float64)
        t, sid = _trace(scene, origin, dirs, K_grid, w2c)
        mover_index = _trace_movers(movers, origin, dirs, t) if movers else None
        depth = t.astype(np.float32) if with_depth else None
    if lens is not None:
        dirs, origin, K_grid, lens_grid = _distorted_camera_rays(K, w2c, height, width, ss, np.float32, lens)
    elif ss > 1:
        dirs, origin, K_grid = _camera_rays(K, w2c, height, width, ss, np.float32)
    if lens is not None or ss > 1:
        t, sid = _trace(scene, origin, dirs, K_grid, w2c, lens_grid)
        mover_index = _trace_movers(movers, origin, dirs, t) if movers else None
    focal = math.sqrt(K[0, 0] * K[1, 1])
    flat_dirs = dirs.reshape(-1, 3).astype(np.float32)
    flat_t = t.reshape(-1).astype(np.float32)
    if not movers:
        color = _shade(scene, origin, flat_dirs, flat_t, sid.reshape(-1), TEXELS_PER_METRE / (focal * ss))
    else:
        index = mover_index.reshape(-1)
        static, moving = np.nonzero(index < 0)[0], np.nonzero(index >= 0)[0]
        color = np.empty((len(index), 3), np.float32)
        if len(static):
            color[static] = _shade(scene, origin, flat_dirs[static], flat_t[static], sid.reshape(-1)[static],
                                   TEXELS_PER_METRE / (focal * ss))
        if len(moving):
            color[moving] = _shade_movers(movers, origin, flat_dirs[moving], flat_t[moving], index[moving])
    color = color.reshape(height * ss, width * ss, 3)
    color = sum(color[i::ss, j::ss] for i in range(ss) for j in range(ss)) * np.float32(1.0 / ss**2)
    return color, depth


def render_clip(scene: Scene, w2c: np.ndarray, K: np.ndarray, height: int, width: int,
                supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Render every pose of w2c (T,4,4) -> (frames (T,H,W,3) uint8, depth (T,H,W) float32)."""
    w2c = np.asarray(w2c, dtype=np.float64)
    frames = np.empty((len(w2c), height, width, 3), np.uint8)
    depth = np.empty((len(w2c), height, width), np.float32)
    for i, pose in enumerate(w2c):
        frames[i], depth[i] = render_frame(scene, K, pose, height, width, supersample)
    return frames, depth


# --------------------------------------------------------------------------------------------
# Clips
# --------------------------------------------------------------------------------------------


@dataclass
class SyntheticClip:
    """A rendered clip with its ground truth.

    frames (T,H,W,3) uint8; depth (T,H,W) float32 z-depth in metres; K (3,3) pixels;
    w2c (T,4,4) OpenCV world-to-camera in the scene's world frame (frame 0 is not the identity).
    With effects (`fwdata.synth.effects.make_effects_clip`) frames are what the simulated camera
    records; depth, K and w2c stay the exact pinhole ground truth of the mid-exposure pose.
    """

    name: str
    path_kind: str
    seed: int
    frames: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    w2c: np.ndarray
    fps: float = 16.0
    #: the lens the frames were seen through (None: pinhole); depth and cameras are pinhole regardless
    lens: Lens | None = None
    #: ground truth of the camera effects applied (`fwdata.synth.effects`), JSON-ready; empty: none
    effects: dict = field(default_factory=dict)


def make_clip(seed: int, path_kind: str, num_frames: int = 49, height: int = 192, width: int = 336,
              fov_w_deg: float = 60.0, fps: float = 16.0) -> SyntheticClip:
    """make_scene(seed) + camera_path(path_kind, num_frames, scene, seed) + render_clip."""
    scene = make_scene(seed)
    w2c = camera_path(path_kind, num_frames, scene, seed)
    K = default_intrinsics(height, width, fov_w_deg)
    frames, depth = render_clip(scene, w2c, K, height, width)
    return SyntheticClip(name=f"synth_{path_kind}_seed{seed}", path_kind=path_kind, seed=seed,
                         frames=frames, depth=depth, K=K, w2c=w2c, fps=float(fps))
