"""What real cameras do to the synthetic clips: a harder test world, every effect seeded and off by default.

`Effects` lists them (see docs/SYNTH.md for ranges): lens distortion (OpenCV k1, k2, p1, p2,
`fwdata.dataset.lens`), Gaussian sensor noise, motion blur (sub-frame renders averaged over the
shutter), exposure and white-balance drift over the clip, H.264 at a target bitrate or CRF, large
frame-to-frame motion (every k-th pose of a k times denser path), nearly uniform room faces (low
texture) and a sphere crossing the view. `REALISTIC` combines them at moderate values.

Ground truth stays exact: depth, point maps and cameras are those of the undistorted pinhole
camera at the mid-exposure pose (the path's pose of the frame), and the moving sphere is in the
depth (the true depth of what is rendered). What each effect did (lens parameters, per-frame gains,
the sphere's per-frame centre, ...) is returned in `SyntheticClip.effects` and written into the
sample's record (`provenance.options["ground_truth"]`).

Order of operations per frame: radiance (through the lens, with the sphere at each sub-frame
instant) -> mean over the sub-frames -> times exposure and white-balance gains -> plus noise ->
rounded to uint8 -> (when writing) H.264.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import numpy as np
from scipy.spatial.transform import Rotation

from fwdata.dataset.camera import camera_centers, invert_pose, transform_points
from fwdata.synth import render
from fwdata.dataset.lens import Lens, check_lens

__all__ = ["Effects", "REALISTIC", "PRESETS", "preset", "make_effects_clip", "flatten_room_faces",
           "moving_sphere_path", "interpolate_pose", "exposure_gains", "white_balance_gains", "encode_h264",
           "h264_bitrate"]


@dataclass(frozen=True)
class Effects:
    """Camera and scene effects of a synthetic clip. The defaults are all off (the clean renderer).

    k1, k2, p1, p2, k3: OpenCV lens distortion (k1 about -0.35..0.15; k2 -0.1..0.1; p1, p2 -0.005..0.005;
      k3, the r^6 term, 0 for most lenses; wide or calibrated lenses -1..1.2).
    noise_std: std of additive Gaussian noise, 8-bit levels (0..10; phones 1-4 in daylight).
    blur_shutter: exposure time as a fraction of the frame interval (0..1); blur_samples renders
      averaged over it (2..16).
    exposure_drift: stops of exposure change from the first to the last frame (-2..2), linear in
      stops and centred on the clip's middle frame.
    wb_drift: stops between the red and blue gains from the first to the last frame (0..1), in a
      seeded direction (warmer or cooler, with a little green tint).
    h264_bpp: re-encode the video at this many bits per pixel per frame (0.02..0.5); or h264_crf:
      at this x264 CRF (18..45). At most one of them.
    keyframe_step: frames are every k-th pose of a path k times denser (1..8): k times larger steps.
    low_texture_walls: how many room faces (walls first, in a seeded order, then ceiling, floor;
      0..6) are nearly uniform: their mean colour times 1 + low_texture_contrast x smooth noise.
    moving_object: a textured sphere (radius 12-22 cm) crossing the middle frame's view at 1.2-2 m.
    """

    k1: float = 0.0
    k2: float = 0.0
    p1: float = 0.0
    p2: float = 0.0
    k3: float = 0.0
    noise_std: float = 0.0
    blur_shutter: float = 0.0
    blur_samples: int = 5
    exposure_drift: float = 0.0
    wb_drift: float = 0.0
    h264_bpp: Optional[float] = None
    h264_crf: Optional[int] = None
    keyframe_step: int = 1
    low_texture_walls: int = 0
    low_texture_contrast: float = 0.02
    moving_object: bool = False

    @property
    def lens(self) -> Lens:
        return Lens(self.k1, self.k2, self.p1, self.p2, self.k3)

    def changed(self) -> dict:
        """The fields that differ from the defaults (what a record stores), in field order."""
        default = Effects()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    @property
    def active(self) -> bool:
        """True when any effect changes the rendered frames or the video."""
        changed = self.changed()
        changed.pop("blur_samples", None)  # no effect without a shutter
        changed.pop("low_texture_contrast", None)  # no effect without low-texture walls
        return bool(changed)

    def replace(self, **kw) -> "Effects":
        return dataclasses.replace(self, **kw)

    def check(self, K: Optional[np.ndarray] = None, height: Optional[int] = None, width: Optional[int] = None) -> None:
        """ValueError for values out of range (and, with K/height/width, a lens that folds over)."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("k1", "k2", "p1", "p2", "k3", "noise_std", "blur_shutter", "exposure_drift", "wb_drift",
                     "low_texture_contrast"):
            need(math.isfinite(getattr(self, name)), f"--{name.replace('_', '-')} must be finite")
        need(-1.0 <= self.k1 <= 1.0 and -1.0 <= self.k2 <= 1.0, "lens k1/k2 must be within [-1, 1]")
        need(abs(self.p1) <= 0.05 and abs(self.p2) <= 0.05, "lens p1/p2 must be within [-0.05, 0.05]")
        need(-2.0 <= self.k3 <= 2.0, "lens k3 must be within [-2, 2]")
        need(0.0 <= self.noise_std <= 64.0, "--noise must be within [0, 64] (8-bit levels)")
        need(0.0 <= self.blur_shutter <= 1.0, "--blur must be within [0, 1] (fraction of the frame interval)")
        need(1 <= self.blur_samples <= 64, "--blur-samples must be within [1, 64]")
        need(abs(self.exposure_drift) <= 4.0, "--exposure-drift must be within [-4, 4] stops")
        need(0.0 <= self.wb_drift <= 2.0, "--wb-drift must be within [0, 2] stops")
        need(self.h264_bpp is None or self.h264_crf is None, "give --h264-bpp or --h264-crf, not both")
        need(self.h264_bpp is None or (math.isfinite(self.h264_bpp) and 0.001 <= self.h264_bpp <= 24.0),
             "--h264-bpp must be within [0.001, 24] bits per pixel")
        need(self.h264_crf is None or 0 <= self.h264_crf <= 51, "--h264-crf must be within [0, 51]")
        need(1 <= self.keyframe_step <= 64, "--keyframe-step must be within [1, 64]")
        need(0 <= self.low_texture_walls <= 6, "--low-texture-walls must be within [0, 6] room faces")
        need(0.0 <= self.low_texture_contrast <= 1.0, "low_texture_contrast must be within [0, 1]")
        if K is not None:
            check_lens(self.lens, K, int(height), int(width))


#: moderate values of every effect: what a hand-held phone clip looks like
REALISTIC = Effects(
    k1=-0.12, k2=0.03, p1=0.0008, p2=-0.0005,
    noise_std=2.5,
    blur_shutter=0.5, blur_samples=5,
    exposure_drift=0.5, wb_drift=0.25,
    h264_bpp=0.2,
    keyframe_step=2,
    low_texture_walls=2, low_texture_contrast=0.02,
    moving_object=True,
)
#: path kinds of the realistic preset: the default four plus the rotation-dominant "spin"
REALISTIC_PATH_KINDS = render.ALL_PATH_KINDS

PRESETS: dict[str, tuple[Effects, tuple[str, ...]]] = {"realistic": (REALISTIC, REALISTIC_PATH_KINDS)}


def preset(name: str) -> tuple[Effects, tuple[str, ...]]:
    """(effects, path kinds) of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------------------------
# Scene: low-texture faces
# --------------------------------------------------------------------------------------------


def flatten_room_faces(scene: render.Scene, count: int, contrast: float,
                       rng: np.random.Generator) -> tuple[render.Scene, list[int]]:
    """A copy of the scene whose first ``count`` room faces (the four walls in a random order, then
    the ceiling, then the floor) are nearly uniform -> (scene, surface ids flattened)."""
    walls = [render.FACES.index(f) for f in ("-x", "+x", "-z", "+z")]
    order = [walls[i] for i in rng.permutation(4)] + [render.FACES.index("-y"), render.FACES.index("+y")]
    faces = order[:count]
    if not faces:
        return scene, []
    rgba = scene.texels.view(np.uint8).reshape(-1, 4).copy()
    ah, aw = scene.atlas_shape
    for sid in faces:
        r0, c0, h, w = (int(x) for x in scene.surf_region[sid])
        level0 = rgba[scene.level_offset[0]:scene.level_offset[0] + ah * aw].reshape(ah, aw, 4)
        mean = level0[r0:r0 + h, c0:c0 + w, :3].reshape(-1, 3).astype(np.float64).mean(axis=0) / 255.0
        img = (mean[None, None, :] * (1.0 + contrast * render._noise((h, w), 24, rng))[..., None]).astype(np.float32)
        for k in range(render.MIP_LEVELS):
            lh, lw = ah >> k, aw >> k
            level = rgba[scene.level_offset[k]:scene.level_offset[k] + lh * lw].reshape(lh, lw, 4)
            level[r0 >> k:(r0 >> k) + img.shape[0], c0 >> k:(c0 >> k) + img.shape[1], :3] = \
                np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
            if k + 1 < render.MIP_LEVELS:
                img = 0.25 * (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2])
    texels = rgba.view(np.uint32).ravel()
    return dataclasses.replace(scene, texels=texels), faces


# --------------------------------------------------------------------------------------------
# Cameras: poses between path samples, a sphere crossing the view
# --------------------------------------------------------------------------------------------


def interpolate_pose(w2c: np.ndarray, x: float) -> np.ndarray:
    """w2c (4,4) at fractional index x of the path w2c (N,4,4): camera centre linear and rotation
    geodesic between neighbouring poses (extrapolated along the end segments outside [0, N-1])."""
    w2c = np.asarray(w2c, dtype=np.float64)
    n = len(w2c)
    if n == 1:
        return w2c[0].copy()
    i0 = int(min(max(math.floor(x), 0), n - 2))
    f = x - i0
    if f == 0.0:
        return w2c[i0].copy()
    c2w0, c2w1 = invert_pose(w2c[i0]), invert_pose(w2c[i0 + 1])
    rel = Rotation.from_matrix(c2w1[:3, :3] @ c2w0[:3, :3].T).as_rotvec()
    c2w = np.eye(4)
    c2w[:3, :3] = Rotation.from_rotvec(f * rel).as_matrix() @ c2w0[:3, :3]
    c2w[:3, 3] = c2w0[:3, 3] + f * (c2w1[:3, 3] - c2w0[:3, 3])
    return invert_pose(c2w)


def blur_offsets(shutter: float, samples: int) -> np.ndarray:
    """Sub-frame times (frame units, relative to the frame) of a shutter open for ``shutter`` frame
    intervals, centred on the frame: ``shutter * ((j + 0.5) / samples - 0.5)``."""
    j = np.arange(samples)
    return shutter * ((j + 0.5) / samples - 0.5)


@dataclass(frozen=True)
class SpherePath:
    """A sphere moving at constant velocity: centre(t) = start + t * velocity (t in frames, world frame)."""

    start: np.ndarray
    velocity: np.ndarray
    radius: float
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]

    def center(self, t: float) -> np.ndarray:
        return self.start + t * self.velocity

    def at(self, t: float) -> tuple[render.MovingSphere, ...]:
        return (render.MovingSphere(tuple(float(v) for v in self.center(t)), self.radius, self.color_a, self.color_b),)


def moving_sphere_path(w2c: np.ndarray, K: np.ndarray, width: int, rng: np.random.Generator,
                       clearance: float = 0.35) -> SpherePath:
    """A sphere crossing the view of the middle frame from one side to the other over the clip, at
    1.2-2 m (pushed further while it would come within ``clearance`` of a camera centre)."""
    T = len(w2c)
    mid = invert_pose(w2c[T // 2])
    radius = float(rng.uniform(0.12, 0.22))
    depth = float(rng.uniform(1.2, 2.0))
    sign = float(rng.choice([-1.0, 1.0]))
    y = float(rng.uniform(-0.1, 0.15))
    hue = rng.random(3)
    color_a = tuple(float(c) for c in 0.55 + 0.45 * hue)
    color_b = tuple(float(c) for c in 0.25 * (1.0 - hue))
    centres = camera_centers(w2c)
    times = np.arange(T, dtype=np.float64)
    for _ in range(12):
        half = depth * (width / 2.0) / K[0, 0] + 1.2 * radius  # just outside the view at either end
        a = np.array([-sign * half, y * depth, depth])
        b = np.array([sign * half, y * depth, depth])
        start = transform_points(mid, a[None])[0]
        end = transform_points(mid, b[None])[0]
        velocity = (end - start) / max(T - 1, 1)
        path = start[None] + times[:, None] * velocity[None]
        if np.linalg.norm(path - centres, axis=1).min() >= radius + clearance:
            break
        depth += 0.25
    return SpherePath(start, velocity, radius, color_a, color_b)


# --------------------------------------------------------------------------------------------
# Sensor
# --------------------------------------------------------------------------------------------


def _ramp(num_frames: int) -> np.ndarray:
    """Clip position s - 0.5 of each frame (s from 0 to 1)."""
    return (np.arange(num_frames) / max(num_frames - 1, 1)) - 0.5


def exposure_gains(num_frames: int, drift_stops: float) -> np.ndarray:
    """Exposure gain (T,) of each frame: 2 ** (drift * (s - 0.5)), s = i / (T - 1)."""
    return np.exp2(drift_stops * _ramp(num_frames))


def white_balance_gains(num_frames: int, drift_stops: float, rng: np.random.Generator) -> np.ndarray:
    """RGB gains (T,3): log2 gains a * (cos q, 0.5 sin q, -cos q), a = drift * (s - 0.5), q seeded."""
    q = float(rng.uniform(0.0, 2 * math.pi))
    direction = np.array([math.cos(q), 0.5 * math.sin(q), -math.cos(q)])
    return np.exp2(drift_stops * _ramp(num_frames)[:, None] * direction[None])


def _sensor(color: np.ndarray, gain: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Radiance (H,W,3) float in [0, 1] -> uint8 frame: gains (3,), noise, rounding, clipping."""
    if noise_std == 0 and np.all(gain == 1.0):  # exactly what render.render_frame makes
        return np.clip(np.rint(color * 255.0), 0, 255).astype(np.uint8)
    value = color.astype(np.float64) * 255.0 * gain[None, None, :]
    if noise_std > 0:
        value = value + rng.normal(0.0, noise_std, value.shape)
    return np.clip(np.rint(value), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Clips
# --------------------------------------------------------------------------------------------


def make_effects_clip(seed: int, path_kind: str, effects: Effects, num_frames: int = 49, height: int = 192,
                      width: int = 336, fov_w_deg: float = 60.0, fps: float = 16.0,
                      supersample: int = 2) -> render.SyntheticClip:
    """`render.make_clip` with camera effects (H.264 excepted: it is applied when the video is written).

    The same (seed, kind, effects, size) give the same clip. Depth, K and w2c are the exact pinhole
    ground truth of each frame's pose; the moving sphere is in the depth.
    """
    K = render.default_intrinsics(height, width, fov_w_deg)
    effects.check(K, height, width)
    # Every effect draws from its own stream [seed, 5, i]: the scene and the path are those of the clean clip.
    scene = render.make_scene(seed)
    scene, flat_faces = flatten_room_faces(scene, effects.low_texture_walls, effects.low_texture_contrast,
                                           np.random.default_rng([seed, 5, 1]))
    k = effects.keyframe_step
    T = num_frames
    dense = render.camera_path(path_kind, (T - 1) * k + 1, scene, seed)
    w2c = dense[::k]
    lens = effects.lens
    sphere = moving_sphere_path(w2c, K, width, np.random.default_rng([seed, 5, 2])) if effects.moving_object else None
    gains = exposure_gains(T, effects.exposure_drift)[:, None] * white_balance_gains(
        T, effects.wb_drift, np.random.default_rng([seed, 5, 3]))
    offsets = blur_offsets(effects.blur_shutter, effects.blur_samples) if effects.blur_shutter > 0 else np.zeros(1)

    frames = np.empty((T, height, width, 3), np.uint8)
    depth = np.empty((T, height, width), np.float32)
    for i in range(T):
        movers = sphere.at(i) if sphere else ()
        color, depth[i] = render.render_radiance(scene, K, w2c[i], height, width, supersample, lens, movers)
        if len(offsets) > 1:
            acc = np.zeros_like(color)
            for o in offsets:
                if o == 0.0:
                    acc += color
                    continue
                pose = interpolate_pose(dense, i * k + o * k)
                sub, _ = render.render_radiance(scene, K, pose, height, width, supersample, lens,
                                                sphere.at(i + o) if sphere else (), with_depth=False)
                acc += sub
            color = acc / np.float32(len(offsets))
        frames[i] = _sensor(color, gains[i], effects.noise_std, np.random.default_rng([seed, 5, 4, i]))

    first = w2c[0]  # the dataset's world frame is frame 0's camera
    truth: dict = {"effects": effects.changed()}
    if not lens.is_identity:
        truth["lens"] = lens.to_dict() | {"applies_to": "video frames; depth, points and cameras are pinhole"}
    if effects.noise_std > 0:
        truth["noise"] = {"model": "additive gaussian, 8-bit levels, per pixel and channel", "std": effects.noise_std}
    if effects.blur_shutter > 0:
        truth["motion_blur"] = {"shutter": effects.blur_shutter, "samples": effects.blur_samples,
                                "sub_frame_offsets": [float(o) for o in offsets],
                                "pose": "cameras are the mid-exposure poses"}
    if effects.exposure_drift or effects.wb_drift:
        truth["gains_rgb"] = np.round(gains, 6).tolist()
    if k > 1:
        truth["keyframe_step"] = k
    if flat_faces:
        truth["low_texture_faces"] = [render.FACES[f] for f in flat_faces]
    if sphere is not None:
        centres = transform_points(first, np.array([sphere.center(i) for i in range(T)]))
        truth["moving_object"] = {"kind": "sphere", "radius": sphere.radius, "in_depth": True,
                                  "centers": np.round(centres, 6).tolist(),
                                  "frame": "frame-0 camera (the dataset's world frame), metres, per frame"}
    return render.SyntheticClip(name=f"synth_{path_kind}_seed{seed}_fx", path_kind=path_kind, seed=seed,
                                frames=frames, depth=depth, K=K, w2c=w2c, fps=float(fps),
                                lens=None if lens.is_identity else lens, effects=truth)


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------


def h264_bitrate(effects: Effects, height: int, width: int, fps: float) -> Optional[int]:
    """Target bitrate in bits per second of `effects.h264_bpp` (None without it)."""
    if effects.h264_bpp is None:
        return None
    return int(round(effects.h264_bpp * height * width * fps))


def encode_h264(path: Union[str, Path], frames: np.ndarray, fps: float, bit_rate: Optional[int] = None,
                crf: Optional[int] = None) -> None:
    """Encode uint8 RGB frames as H.264 mp4 at a target bitrate (bits/s, x264's one-pass ABR) or a CRF,
    with the deterministic x264 settings of `fwdata.dataset.video.write_mp4`."""
    import av

    from fwdata.dataset.video import X264_OPTIONS, VideoError

    if (bit_rate is None) == (crf is None):
        raise ValueError("give a bit rate or a crf")
    rate = Fraction(fps).limit_denominator(1001)
    T, h, w = frames.shape[:3]
    if h % 2 or w % 2:
        raise VideoError(f"{path}: frame size {w}x{h} must be even for yuv420p")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        if bit_rate is not None:
            stream.bit_rate = int(bit_rate)
            stream.options = dict(X264_OPTIONS)
        else:
            stream.options = X264_OPTIONS | {"crf": str(int(crf))}
        for frame in frames:
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
