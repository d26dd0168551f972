"""The PNG contact sheet of one sample (matplotlib): frames, depth, valid mask, point cloud, camera path.

Layout (one row each): a few frames of the video; their depth with one colour map and colour bar
(invalid pixels light grey); their valid masks; the fused point cloud from two views, the camera
path seen from above (with the aligned truth when given, or the requested path of a generated sample,
requested_cameras/<id>.json) and the sample's key numbers.

Beside `<id>.png` goes `<id>.json`, the sheet's panel map: for every depth panel the frame shown,
its pixel box in the PNG, the colour map and its value range, and the path drawn from above. A
reader can map the colours of the depth panels back to depth values with it (the tests do, against
the depth file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from fwdata.dataset import camera
from fwdata.dataset.contract import (
    DEPTH_NPZ,
    POINTS_NPZ,
    REQUESTED_CAMERAS_DIR,
    CameraFile,
    ContractError,
    SampleRecord,
    load_npz,
    read_camera_json,
    resolve_inside,
)

#: colour map of the depth panels (perceptually uniform, so its colours map back to one value each)
DEPTH_CMAP = "viridis"
#: colour of pixels without valid depth in the depth panels (not a colour of DEPTH_CMAP)
INVALID_COLOUR = "#d9d9d9"
#: frames shown per sample
NUM_FRAMES = 4
#: most points drawn in each point-cloud view
CLOUD_POINTS = 12000
DPI = 100


@dataclass
class SampleView:
    """What the sheet and the page draw of one sample; None (with a line in `problems`) where a file
    could not be read."""

    record: SampleRecord
    frame_index: list[int]
    frames: Optional[np.ndarray] = None  # (n,H,W,3) uint8, the frames of frame_index
    depth: Optional[np.ndarray] = None  # (n,H,W) float32
    valid: Optional[np.ndarray] = None  # (n,H,W) bool
    cloud: Optional[np.ndarray] = None  # (N,3) world points, subsampled
    cloud_rgb: Optional[np.ndarray] = None  # (N,3) float 0..1
    w2c: Optional[np.ndarray] = None  # (T,4,4)
    K: Optional[np.ndarray] = None  # (T,3,3) pixels
    requested_w2c: Optional[np.ndarray] = None  # (T',4,4) requested_cameras/<id>.json (a generated sample)
    requested_K: Optional[np.ndarray] = None  # (T',3,3) pixels
    truth_w2c: Optional[np.ndarray] = None  # (N,4,4) truth cameras of the shared frames
    aligned_w2c: Optional[np.ndarray] = None  # (N,4,4) built cameras in the truth's world (compare's Sim(3))
    problems: list[str] = field(default_factory=list)


def shown_frames(num_frames: int, n: int = NUM_FRAMES) -> list[int]:
    """n frame indices spread evenly over the clip, first and last included."""
    return sorted({int(round(x)) for x in np.linspace(0, num_frames - 1, min(n, num_frames))})


def load_view(root: Path, rec: SampleRecord, cameras: Optional[CameraFile] = None) -> SampleView:
    """Read what is drawn of one sample through the dataset readers; damage becomes `problems`."""
    from fwdata.dataset.video import VideoError, read_frames

    view = SampleView(record=rec, frame_index=shown_frames(rec.num_frames))
    step = max(1, rec.num_frames // 8)
    cloud_index = list(range(0, rec.num_frames, step))
    wanted = sorted(set(view.frame_index) | set(cloud_index))
    rgb = None
    try:
        decoded = read_frames(resolve_inside(root, rec.paths.video), wanted)
        rgb = dict(zip(wanted, decoded))
        view.frames = np.stack([rgb[i] for i in view.frame_index])
    except (VideoError, ContractError, OSError, RuntimeError) as e:
        view.problems.append(f"video: {e}")
    try:
        d = load_npz(resolve_inside(root, rec.paths.depth), DEPTH_NPZ, rec.dims)
        view.depth, view.valid = d["depth"][view.frame_index], d["valid"][view.frame_index]
    except (ContractError, OSError) as e:
        view.problems.append(f"depth: {e}")
    try:
        p = load_npz(resolve_inside(root, rec.paths.points), POINTS_NPZ, rec.dims)
        view.cloud, view.cloud_rgb = _subsample_cloud(p["points"], p["valid"], cloud_index, rgb)
    except (ContractError, OSError) as e:
        view.problems.append(f"points: {e}")
    try:
        cams = cameras or read_camera_json(resolve_inside(root, rec.paths.camera_json))
        view.w2c, view.K = cams.w2c_array(), cams.intrinsics_array()
    except (ContractError, OSError) as e:
        view.problems.append(f"cameras: {e}")
    requested = requested_cameras_path(root, rec.id)
    if requested.is_file():
        try:
            req = read_camera_json(requested)
            view.requested_w2c, view.requested_K = req.w2c_array(), req.intrinsics_array()
        except (ContractError, OSError) as e:
            view.problems.append(f"requested cameras: {e}")
    return view


def requested_cameras_path(root: Path, sample_id: str) -> Path:
    """`requested_cameras/<id>.json`: the cameras a generated sample was asked for (optional)."""
    return Path(root) / REQUESTED_CAMERAS_DIR / f"{sample_id}.json"


def _subsample_cloud(points: np.ndarray, valid: np.ndarray, index: list[int], rgb: Optional[dict]):
    """At most CLOUD_POINTS valid points of the frames `index` (every second pixel, then a seeded
    random choice) and their colours from the video (grey without it)."""
    sel = (slice(None), slice(None, None, 2), slice(None, None, 2))
    pts = points[index][sel].astype(np.float64)
    ok = valid[index][sel] & np.isfinite(pts).all(axis=-1)
    if rgb is not None:
        cols = np.stack([rgb[i] for i in index])[sel].astype(np.float64) / 255.0
    else:
        cols = np.full(pts.shape, 0.5)
    pts, cols = pts[ok], cols[ok]
    if len(pts) > CLOUD_POINTS:
        keep = np.sort(np.random.default_rng(0).choice(len(pts), CLOUD_POINTS, replace=False))
        pts, cols = pts[keep], cols[keep]
    return pts, cols


def depth_range(depth: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """The colour map's value range: 1st to 99th percentile of the valid depth shown (robust to a few
    far pixels); (0, 1) when nothing is valid."""
    v = depth[valid & np.isfinite(depth)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(v, [1, 99]))
    if not hi > lo:
        hi = lo + max(abs(lo), 1.0) * 1e-3
    return lo, hi


def _up(xyz: np.ndarray) -> np.ndarray:
    """OpenCV world (x right, y down, z forward) -> plot axes (x, z, -y): z up on the screen."""
    return np.stack([xyz[:, 0], xyz[:, 2], -xyz[:, 1]], axis=1)


def _limits(ax, xyz: np.ndarray) -> None:
    lo, hi = np.percentile(xyz, [1, 99], axis=0)
    centre, half = (lo + hi) / 2, max(float(np.max(hi - lo)) / 2, 1e-6)
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_zlim(centre[2] - half, centre[2] + half)
    ax.set_box_aspect((1, 1, 1))


def _message(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_axis_off()


def _image_box(fig, ax, width: int, height: int) -> list[int]:
    """[x0, y0, x1, y1] in PNG pixels (origin top left) of an imshow'd image of width x height."""
    (x0, y0), (x1, y1) = ax.transData.transform([(-0.5, height - 0.5), (width - 0.5, -0.5)])
    fig_h = fig.bbox.height
    return [int(round(x0)), int(round(fig_h - y1)), int(round(x1)), int(round(fig_h - y0))]


def draw_sheet(view: SampleView, png: Path) -> dict:
    """Draw the contact sheet of `view` to `png`; write and return its panel map (`<png stem>.json`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = view.record
    n = len(view.frame_index)
    aspect = rec.height / rec.width
    panel_w = 3.4
    img_h = panel_w * aspect
    heights = [img_h, img_h, img_h, panel_w * 0.95]
    fig = plt.figure(figsize=(panel_w * n + 0.9, sum(heights) + 1.3), dpi=DPI)
    gs = fig.add_gridspec(4, n + 1, width_ratios=[1] * n + [0.06], height_ratios=heights,
                          left=0.02, right=0.95, top=1 - 0.55 / (sum(heights) + 1.3), bottom=0.02,
                          wspace=0.05, hspace=0.18)
    fig.suptitle(f"{rec.id}   {rec.num_frames}x{rec.height}x{rec.width} @ {rec.fps:g} fps   {rec.scale}   "
                 f"{rec.split} / {rec.status}", fontsize=11)
    cmap = matplotlib.colormaps[DEPTH_CMAP].with_extremes(bad=INVALID_COLOUR)
    vmin, vmax = depth_range(view.depth, view.valid) if view.depth is not None else (0.0, 1.0)
    panels: dict = {"sample": rec.id, "frames": view.frame_index, "depth": [], "cmap": DEPTH_CMAP,
                    "vmin": vmin, "vmax": vmax, "invalid_colour": INVALID_COLOUR, "problems": list(view.problems)}
    depth_axes = []
    for j, fi in enumerate(view.frame_index):
        ax = fig.add_subplot(gs[0, j])
        if view.frames is not None:
            ax.imshow(view.frames[j], interpolation="nearest")
            ax.set_title(f"frame {fi}", fontsize=9)
            ax.set_axis_off()
        else:
            _message(ax, "video not readable")
        ax = fig.add_subplot(gs[1, j])
        if view.depth is not None:
            d = np.ma.masked_array(view.depth[j], mask=~view.valid[j])
            im = ax.imshow(d, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(f"depth {fi}", fontsize=9)
            ax.set_axis_off()
            depth_axes.append((fi, ax))
        else:
            _message(ax, "depth not readable")
        ax = fig.add_subplot(gs[2, j])
        if view.valid is not None:
            ax.imshow(view.valid[j], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"valid {fi}: {100 * view.valid[j].mean():.1f} % (white)", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])  # keep the frame: an all-valid mask is all white
        else:
            _message(ax, "valid mask not readable")
    if view.depth is not None:
        cb = fig.colorbar(im, cax=fig.add_subplot(gs[1, n]))
        cb.set_label(f"depth ({'m' if rec.scale == 'metric' else 'dataset unit'})", fontsize=8)
        cb.ax.tick_params(labelsize=7)

    bottom = gs[3, :n].subgridspec(1, 4, wspace=0.25)
    centres = camera.camera_centers(view.w2c) if view.w2c is not None else None
    for k, (elev, azim, title) in enumerate(((12, -90, "points, from behind frame 0"),
                                             (35, -35, "points, from the side"))):
        ax = fig.add_subplot(bottom[0, k], projection="3d")
        if view.cloud is not None and len(view.cloud):
            xyz = _up(view.cloud)
            ax.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], c=view.cloud_rgb, s=0.6, depthshade=False, linewidths=0)
            if centres is not None:
                c = _up(centres)
                ax.plot(c[:, 0], c[:, 1], c[:, 2], color="red", lw=1.5)
            _limits(ax, xyz)
            ax.view_init(elev=elev, azim=azim)
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=6)
        else:
            _message(ax, "no valid points" if view.cloud is not None else "points not readable")
    ax = fig.add_subplot(bottom[0, 2])
    panels["path_top"] = _draw_path_top(ax, view, centres)
    ax = fig.add_subplot(bottom[0, 3])
    ax.set_axis_off()
    q = {k: v for k, v in rec.quality.model_dump().items() if isinstance(v, (int, float)) and v is not None}
    lines = [f"{k}: {v:.4g}" for k, v in q.items()] or ["no quality metrics"]
    lines += [f"! {p[:60]}" for p in view.problems]
    ax.text(0, 1, "\n".join(lines[:18]), va="top", ha="left", fontsize=7.5, family="monospace",
            transform=ax.transAxes)

    fig.canvas.draw()
    for fi, ax in depth_axes:
        panels["depth"].append({"frame": fi, "box": _image_box(fig, ax, rec.width, rec.height)})
    panels["size"] = [int(fig.bbox.width), int(fig.bbox.height)]
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    png.with_suffix(".json").write_text(json.dumps(panels, indent=1) + "\n")
    return panels


def _draw_path_top(ax, view: SampleView, centres: Optional[np.ndarray]) -> dict:
    """Camera centres from above (x right, z forward), start marked; the truth and the built path
    aligned onto it (compare's Sim(3)) when a truth was given. Returns the drawn (x, z) per line."""
    if centres is None:
        _message(ax, "cameras not readable")
        return {}
    if view.truth_w2c is not None:
        gt = camera.camera_centers(view.truth_w2c)
        al = camera.camera_centers(view.aligned_w2c)
        ax.plot(gt[:, 0], gt[:, 2], "-", color="black", lw=2, label="truth")
        ax.plot(al[:, 0], al[:, 2], "--", color="tab:red", lw=1.5, label="built, aligned")
        ax.plot(gt[0, 0], gt[0, 2], "o", color="black", ms=5)
        ax.set_title("camera path from above (truth world)", fontsize=9)
        drawn = {"truth": gt[:, [0, 2]].tolist(), "built_aligned": al[:, [0, 2]].tolist()}
    else:
        drawn = {}
        if view.requested_w2c is not None:  # a generated sample: the path asked for, beside the predicted one
            req = camera.camera_centers(view.requested_w2c)
            ax.plot(req[:, 0], req[:, 2], "--", color="tab:blue", lw=1.5, label="requested")
            ax.plot(req[0, 0], req[0, 2], "s", color="tab:blue", ms=4)
            drawn["requested"] = req[:, [0, 2]].tolist()
        label = "predicted" if view.requested_w2c is not None else "camera"
        ax.plot(centres[:, 0], centres[:, 2], "-", color="tab:red", lw=1.5, label=label)
        ax.plot(centres[0, 0], centres[0, 2], "o", color="tab:red", ms=5, label="frame 0")
        c2w = camera.invert_pose(view.w2c)
        step = max(1, len(c2w) // 8)
        fwd = c2w[::step, :3, 2]
        ax.quiver(centres[::step, 0], centres[::step, 2], fwd[:, 0], fwd[:, 2], angles="xy", width=0.006,
                  color="tab:blue", alpha=0.7)
        ax.set_title("camera path from above" + (": requested and predicted" if "requested" in drawn else ""),
                     fontsize=9)
        drawn["built"] = centres[:, [0, 2]].tolist()
    ax.set_xlabel("x", fontsize=8)
    ax.set_ylabel("z (forward)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return drawn
