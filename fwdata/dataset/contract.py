"""The dataset contract (v1): the single source of truth for every file a dataset holds.

Layout of a dataset root::

    metadata.json               DatasetMetadata
    videos/<id>.mp4             the clip as annotated: T frames, H x W, H.264
    depth/<id>.npz              DEPTH_NPZ: depth [T,H,W] float32 z-depth, valid [T,H,W] bool
    points/<id>.npz             POINTS_NPZ: points [T,H,W,3] float16 world frame, valid [T,H,W] bool
    points/<id>.ply             fused, downsampled, coloured cloud (viewing only)
    camera_params/<id>.txt      19 numbers per frame, RealEstate10K layout (interop)
    camera_params/<id>.json     CameraFile: full-precision cameras (source of truth)

Conventions: OpenCV camera axes (x right, y down, z forward); extrinsics are world-to-camera
(w2c); the world frame is the camera of the clip's frame 0 (its w2c is the identity); pixel
(u, v) has its centre at image coordinate (u + 0.5, v + 0.5); depth and translations share one
unit, metres when ``scale == "metric"``. Everything else in the project reads these models;
`fwdata schema export` writes them as JSON Schema into docs/schemas/.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal, Optional, Union

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from fwdata.quality import MultiviewSettings

SCHEMA_VERSION = "1.0"
SUPPORTED_SCHEMA_VERSIONS = ("1.0",)

#: sub-directories of a dataset root, one per kind of file
VIDEOS_DIR, DEPTH_DIR, POINTS_DIR, CAMERAS_DIR = "videos", "depth", "points", "camera_params"
#: optional: `requested_cameras/<id>.json` (CameraFile JSON), the cameras a generated sample was asked for
#: (`fwmodel generate`); its camera_params/<id>.json holds the predicted ones. Named by no sample record.
REQUESTED_CAMERAS_DIR = "requested_cameras"
METADATA_FILE = "metadata.json"

ScaleKind = Literal["metric", "normalized"]


class ContractError(ValueError):
    """A file or value that breaks the dataset contract. The message names the file and the rule."""


class PathEscapeError(ContractError):
    """A path in metadata that is absolute, contains '..', or resolves outside the dataset root."""


# --------------------------------------------------------------------------- paths


def _check_relative_path(value: str) -> str:
    """A dataset path: relative, POSIX separators, no '..', no empty or '.' parts."""
    if not isinstance(value, str) or not value:
        raise ValueError("path must be a non-empty string")
    if "\\" in value or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"path {value!r} must use '/' separators and no drive letter")
    p = PurePosixPath(value)
    if p.is_absolute():
        raise ValueError(f"path {value!r} is absolute; paths in metadata must be relative to the dataset root")
    if any(part in ("..", ".", "") for part in value.split("/")):
        raise ValueError(f"path {value!r} contains '..' or '.' or an empty part; it must stay inside the dataset root")
    return value


RelPath = Annotated[str, AfterValidator(_check_relative_path)]


def resolve_inside(root: Union[str, Path], rel: str) -> Path:
    """Join `rel` to the dataset `root` and make sure the result (following symlinks) stays inside.

    Raises PathEscapeError naming the path when it escapes (``..``, absolute, or a symlink whose
    target lies outside the root).
    """
    try:
        _check_relative_path(rel)
    except ValueError as e:
        raise PathEscapeError(str(e)) from None
    root_real = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root_real / rel))
    if target != root_real and root_real not in target.parents:
        raise PathEscapeError(f"path {rel!r} resolves to {target}, outside the dataset root {root_real}")
    return target


# --------------------------------------------------------------------------- sample ids


_SLUG = re.compile(r"[^A-Za-z0-9]+")
SAMPLE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$"


def make_sample_id(source_name: str, fingerprint: str, start_frame: int, stride: int, num_frames: int,
                   height: int, width: int) -> str:
    """Stable id for a clip: the same source content and clip options give the same id on every run.

    `fingerprint` identifies the source file's content (`fwdata.dataset.video.content_fingerprint`),
    so two different files of the same name and size get different ids, and moving or renaming the
    input folder keeps them; the clip's range (start, stride, T) and size (H, W) are in the key too.
    `source_name` only gives the readable prefix. Example: ``kitchen_walk-000120-3f9c2a1b07de``.
    """
    slug = _SLUG.sub("_", Path(source_name).stem).strip("_")[:48] or "clip"
    key = f"{fingerprint}|{start_frame}|{stride}|{num_frames}|{height}x{width}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return f"{slug}-{start_frame:06d}-{digest}"


def sample_paths(sample_id: str) -> "SamplePaths":
    """The contract's relative paths for one sample."""
    return SamplePaths(
        video=f"{VIDEOS_DIR}/{sample_id}.mp4",
        depth=f"{DEPTH_DIR}/{sample_id}.npz",
        points=f"{POINTS_DIR}/{sample_id}.npz",
        points_ply=f"{POINTS_DIR}/{sample_id}.ply",
        camera_txt=f"{CAMERAS_DIR}/{sample_id}.txt",
        camera_json=f"{CAMERAS_DIR}/{sample_id}.json",
    )


# --------------------------------------------------------------------------- cameras


def _finite(x: float, what: str) -> float:
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {x}")
    return x


class FrameCamera(BaseModel):
    """One frame's camera: pinhole intrinsics in pixels and the world-to-camera matrix."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0, description="frame index in the clip (0..T-1)")
    source_frame: int = Field(ge=0, description="frame index in the original video")
    timestamp: float = Field(ge=0, description="time of the frame in the original video, seconds")
    fx: float = Field(gt=0, description="focal length along x, pixels")
    fy: float = Field(gt=0, description="focal length along y, pixels")
    cx: float = Field(description="principal point x, pixels (pixel centres at +0.5)")
    cy: float = Field(description="principal point y, pixels (pixel centres at +0.5)")
    w2c: list[list[float]] = Field(description="4x4 world-to-camera matrix, row-major, OpenCV axes")
    registered: bool = Field(
        True, description="False when this frame was not registered by SfM mapping and its pose was recovered otherwise"
    )

    @field_validator("fx", "fy", "cx", "cy", "timestamp")
    @classmethod
    def _finite_numbers(cls, v: float, info) -> float:
        return _finite(v, info.field_name)

    @field_validator("w2c")
    @classmethod
    def _check_w2c(cls, v: list[list[float]]) -> list[list[float]]:
        m = np.asarray(v, dtype=np.float64)
        if m.shape != (4, 4):
            raise ValueError(f"w2c must be 4x4, got shape {m.shape}")
        if not np.isfinite(m).all():
            raise ValueError("w2c contains non-finite values")
        if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
            raise ValueError(f"w2c last row must be [0, 0, 0, 1], got {m[3].tolist()}")
        return v

    def K(self) -> np.ndarray:
        """Intrinsics matrix (3, 3), pixels."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])


class CameraFile(BaseModel):
    """`camera_params/<id>.json`: every frame's camera at full precision (the source of truth)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: str = SCHEMA_VERSION
    convention: Literal["opencv_w2c"] = "opencv_w2c"
    camera_model: Literal["PINHOLE"] = Field(
        "PINHOLE", description="pixels are undistorted pinhole projections (fx, fy, cx, cy)"
    )
    width: int = Field(gt=0, description="image width W, pixels")
    height: int = Field(gt=0, description="image height H, pixels")
    scale: ScaleKind = Field(description="unit of translations and depth: metres or a normalised unit")
    frames: list[FrameCamera] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_frames(self) -> "CameraFile":
        for i, f in enumerate(self.frames):
            if f.index != i:
                raise ValueError(f"frames[{i}].index is {f.index}; frames must be listed in order 0..T-1")
        src = [f.source_frame for f in self.frames]
        if any(b <= a for a, b in zip(src, src[1:])):
            raise ValueError("source_frame must be strictly increasing")
        return self

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def w2c_array(self) -> np.ndarray:
        """World-to-camera matrices (T, 4, 4), float64."""
        return np.asarray([f.w2c for f in self.frames], dtype=np.float64)

    def intrinsics_array(self) -> np.ndarray:
        """Intrinsics matrices (T, 3, 3), float64, pixels."""
        return np.stack([f.K() for f in self.frames])

    @classmethod
    def from_arrays(
        cls,
        w2c: np.ndarray,
        K: np.ndarray,
        width: int,
        height: int,
        scale: ScaleKind,
        source_frames: Optional[list[int]] = None,
        timestamps: Optional[list[float]] = None,
        registered: Optional[list[bool]] = None,
    ) -> "CameraFile":
        """Build from w2c (T,4,4) and K (3,3) shared or (T,3,3) per frame."""
        w2c = np.asarray(w2c, dtype=np.float64)
        T = w2c.shape[0]
        K = np.broadcast_to(np.asarray(K, dtype=np.float64), (T, 3, 3))
        source_frames = list(range(T)) if source_frames is None else source_frames
        timestamps = [0.0] * T if timestamps is None else timestamps
        registered = [True] * T if registered is None else registered
        frames = [
            FrameCamera(
                index=i,
                source_frame=int(source_frames[i]),
                timestamp=float(timestamps[i]),
                fx=float(K[i, 0, 0]),
                fy=float(K[i, 1, 1]),
                cx=float(K[i, 0, 2]),
                cy=float(K[i, 1, 2]),
                w2c=w2c[i].tolist(),
                registered=bool(registered[i]),
            )
            for i in range(T)
        ]
        return cls(width=width, height=height, scale=scale, frames=frames)


class CameraTxtRow(BaseModel):
    """One line of a RealEstate10K-style camera txt: 19 numbers.

    ``frame fx/W fy/H cx/W cy/H k1 k2 r00 r01 r02 t0 r10 r11 r12 t1 r20 r21 r22 t2``
    where the first number is a frame index (ours) or a timestamp in microseconds
    (RealEstate10K), intrinsics are normalised by the image size, k1 k2 are unused (0) and the
    last 12 numbers are the 3x4 world-to-camera matrix, row-major.
    """

    model_config = ConfigDict(extra="forbid")

    frame: float
    fx_n: float = Field(gt=0)
    fy_n: float = Field(gt=0)
    cx_n: float
    cy_n: float
    k1: float = 0.0
    k2: float = 0.0
    w2c_3x4: list[float] = Field(min_length=12, max_length=12)

    def w2c(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :4] = np.asarray(self.w2c_3x4, dtype=np.float64).reshape(3, 4)
        return m


def format_camera_txt(cameras: CameraFile) -> str:
    """The 19-number text for a CameraFile: one line per frame, full float precision."""
    lines = []
    W, H = cameras.width, cameras.height
    for f in cameras.frames:
        vals = [f.fx / W, f.fy / H, f.cx / W, f.cy / H, 0.0, 0.0] + np.asarray(f.w2c)[:3, :4].reshape(-1).tolist()
        lines.append(" ".join([str(f.index)] + [repr(float(v)) for v in vals]))
    return "\n".join(lines) + "\n"


def parse_camera_txt(text: str, source: str = "<text>") -> list[CameraTxtRow]:
    """Parse a 19-number camera txt. A first line that is not numeric (a RealEstate10K URL) is skipped.

    Raises ContractError naming `source` and the line number on a malformed line.
    """
    rows: list[CameraTxtRow] = []
    lines = text.splitlines()
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        if lineno == 1 and not _is_number(parts[0]):
            continue  # RealEstate10K: the first line is the source video URL
        if len(parts) != 19:
            raise ContractError(f"{source}:{lineno}: expected 19 numbers, found {len(parts)}")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise ContractError(f"{source}:{lineno}: not a number in {line[:80]!r}") from None
        if not all(math.isfinite(x) for x in nums):
            raise ContractError(f"{source}:{lineno}: non-finite number")
        try:
            rows.append(
                CameraTxtRow(
                    frame=nums[0], fx_n=nums[1], fy_n=nums[2], cx_n=nums[3], cy_n=nums[4],
                    k1=nums[5], k2=nums[6], w2c_3x4=nums[7:19],
                )
            )
        except ValidationError as e:
            raise ContractError(f"{source}:{lineno}: {_first_error(e)}") from None
    if not rows:
        raise ContractError(f"{source}: no camera lines")
    return rows


def read_camera_txt(path: Union[str, Path]) -> list[CameraTxtRow]:
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ContractError(f"{path}: not a text file") from None
    return parse_camera_txt(text, source=str(path))


def write_camera_txt(path: Union[str, Path], cameras: CameraFile) -> None:
    Path(path).write_text(format_camera_txt(cameras))


def camera_txt_to_arrays(rows: list[CameraTxtRow], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(w2c (T,4,4), K (T,3,3) in pixels) from parsed txt rows and the image size."""
    w2c = np.stack([r.w2c() for r in rows])
    K = np.zeros((len(rows), 3, 3))
    K[:, 0, 0] = [r.fx_n * width for r in rows]
    K[:, 1, 1] = [r.fy_n * height for r in rows]
    K[:, 0, 2] = [r.cx_n * width for r in rows]
    K[:, 1, 2] = [r.cy_n * height for r in rows]
    K[:, 2, 2] = 1.0
    return w2c, K


def read_camera_json(path: Union[str, Path]) -> CameraFile:
    path = Path(path)
    try:
        return CameraFile.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise ContractError(f"{path}: {_first_error(e)}") from None


# --------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class ArraySpec:
    """Expected dtype and shape of one array; shape entries are letters (T, H, W) or ints."""

    dtype: str
    shape: tuple[Union[str, int], ...]
    description: str

    def check(self, name: str, arr: np.ndarray, dims: dict[str, int], source: str) -> None:
        """Raise ContractError when `arr` does not have this dtype and shape given `dims` (T, H, W)."""
        if arr.dtype != np.dtype(self.dtype):
            raise ContractError(f"{source}: array {name!r} has dtype {arr.dtype}, expected {self.dtype}")
        expected = tuple(dims.get(s, s) if isinstance(s, str) else s for s in self.shape)
        if arr.shape != expected:
            raise ContractError(f"{source}: array {name!r} has shape {arr.shape}, expected {expected} {self.shape}")


#: depth/<id>.npz
DEPTH_NPZ: dict[str, ArraySpec] = {
    "depth": ArraySpec("float32", ("T", "H", "W"), "z-depth along the camera's optical axis, dataset unit; 0 where invalid"),
    "valid": ArraySpec("bool", ("T", "H", "W"), "True where depth is trustworthy"),
}
#: points/<id>.npz
POINTS_NPZ: dict[str, ArraySpec] = {
    "points": ArraySpec("float16", ("T", "H", "W", 3), "x, y, z of each pixel in the world frame (frame-0 camera), dataset unit"),
    "valid": ArraySpec("bool", ("T", "H", "W"), "True where the point is trustworthy"),
}


class NpzError(ContractError):
    """An npz that breaks its spec. `problems` lists ``(kind, message)`` pairs, kind being ``"file"``
    (unreadable, damaged, pickled objects, missing or extra arrays), ``"dtype"`` or ``"shape"``."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(m for _, m in problems))


def _name_problems(names, spec: dict[str, ArraySpec]) -> list[tuple[str, str]]:
    missing, extra = sorted(set(spec) - set(names)), sorted(set(names) - set(spec))
    return ([("file", f"missing arrays {missing}")] if missing else []) + (
        [("file", f"unexpected arrays {extra}")] if extra else [])


def _spec_problems(arrays: dict, spec: dict[str, ArraySpec], dims: dict[str, int]) -> list[tuple[str, str]]:
    """What breaks `spec` in `arrays` (arrays, or .npy headers: anything with .dtype and .shape).
    Names first: with a missing or extra array, dtypes and shapes are not compared."""
    out = _name_problems(arrays, spec)
    if out:
        return out
    for name, s in spec.items():
        a = arrays[name]
        if a.dtype != np.dtype(s.dtype):
            out.append(("dtype", f"array {name!r} has dtype {a.dtype}, expected {s.dtype}"))
        expected = tuple(dims.get(d, d) if isinstance(d, str) else d for d in s.shape)
        if tuple(a.shape) != expected:
            out.append(("shape", f"array {name!r} has shape {tuple(a.shape)}, expected {expected} {s.shape}"))
    return out


def check_npz_arrays(arrays: dict[str, np.ndarray], spec: dict[str, ArraySpec], dims: dict[str, int], source: str) -> None:
    """Check an npz's keys, dtypes and shapes against a spec. Raises ContractError (an `NpzError`)."""
    problems = _spec_problems(arrays, spec, dims)
    if problems:
        raise NpzError(source, problems)


#: the longest .npy header read (numpy's own limit for untrusted files); our headers are ~128 bytes
NPY_MAX_HEADER = 10_000
_NPY_MAGIC = b"\x93NUMPY"
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class NpyHeader:
    """What the header of one .npy member declares, read without touching its data."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool


def _read_npy_header(fh) -> NpyHeader:
    """The header of the .npy stream `fh` (left at the start of the data). The declared header length
    is checked before the header is read, so a member claiming a 4 GB header reads 4 bytes, not 4 GB.
    Raises ValueError."""
    import io
    import struct

    from numpy.lib import format as npy

    version = npy.read_magic(fh)
    if version not in ((1, 0), (2, 0)):  # 3.0 (utf-8 field names) is never needed by the contract
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    size_fmt = "<H" if version == (1, 0) else "<I"
    size = fh.read(struct.calcsize(size_fmt))
    if len(size) != struct.calcsize(size_fmt):
        raise ValueError("the .npy header is truncated")
    (length,) = struct.unpack(size_fmt, size)
    if length > NPY_MAX_HEADER:
        raise ValueError(f"the .npy header declares {length} bytes (at most {NPY_MAX_HEADER} are read)")
    text = fh.read(length)
    if len(text) != length:
        raise ValueError("the .npy header is truncated")
    reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, fortran_order, dtype = reader(io.BytesIO(size + text), max_header_size=NPY_MAX_HEADER)
    return NpyHeader(np.dtype(dtype), tuple(shape), bool(fortran_order))


def _npz_members(zf) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Array name -> zip member name of an open `zipfile.ZipFile` (as numpy names them: ".npy" dropped),
    and the arrays stored twice. Reads only the zip's directory."""
    members: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for info in zf.infolist():
        name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if name in members:
            problems.append(("file", f"array {name!r} is stored twice"))
        members[name] = info.filename
    return members, problems


def read_npz(fh, spec: dict[str, ArraySpec], dims: dict[str, int], source: str) -> dict[str, np.ndarray]:
    """Read the npz in the binary file `fh`, checked against `spec` and `dims` (T, H, W) before any array
    is loaded. Raises NpzError.

    The zip's member names and each member's .npy header (dtype, shape) are read first, and the file
    is refused unless they are exactly what the spec allows for these dims; only then is each array
    read, into memory of exactly that size. So a small file declaring (or inflating to) huge arrays,
    a decompression bomb, is refused without allocating them; object arrays (pickles) are refused too.
    """
    import zipfile

    try:
        head = fh.read(len(_NPY_MAGIC))
        fh.seek(0)
        if head == _NPY_MAGIC:
            raise NpzError(source, [("file", "not an npz archive (a single .npy array?)")])
        with zipfile.ZipFile(fh) as zf:
            members, problems = _npz_members(zf)
            problems += _name_problems(members, spec)
            if problems:
                raise NpzError(source, problems)
            headers = {}
            for name in spec:
                with zf.open(members[name]) as m:
                    headers[name] = _read_npy_header(m)
                if headers[name].dtype.hasobject:
                    raise NpzError(source, [("file", f"cannot be read as npz (array {name!r} holds Python objects, "
                                                     f"which need pickle: refused)")])
            problems = _spec_problems(headers, spec, dims)
            if problems:
                raise NpzError(source, problems)
            return {name: _read_npy_data(zf, members[name], headers[name]) for name in spec}
    except NpzError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, ValueError (bad header), EOFError, RecursionError ...
        raise NpzError(source, [("file", f"cannot be read as npz ({type(e).__name__}: {str(e)[:200]})")]) from None


def _read_npy_data(zf, member: str, header: NpyHeader) -> np.ndarray:
    """The array of one member whose header was checked: exactly the declared bytes, no more."""
    with zf.open(member) as fh:
        if _read_npy_header(fh) != header:
            raise ValueError(f"the header of {member} changed while it was read")
        shape = header.shape[::-1] if header.fortran_order else header.shape
        arr = np.empty(shape, dtype=header.dtype)
        buf = memoryview(arr.reshape(-1).view(np.uint8))
        pos = 0
        while pos < len(buf):
            chunk = fh.read(min(_READ_CHUNK, len(buf) - pos))
            if not chunk:
                raise EOFError(f"{member} holds {pos} of the {len(buf)} bytes its header declares")
            buf[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        if fh.read(1):
            raise ValueError(f"{member} holds more data than its header declares")
    return arr.T if header.fortran_order else arr


def load_npz(path: Union[str, Path], spec: dict[str, ArraySpec], dims: dict[str, int]) -> dict[str, np.ndarray]:
    """Load an npz safely (no pickles, headers checked before any array is allocated: `read_npz`) and
    check it against `spec`. Any damage -> ContractError."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise ContractError(f"{path}: file is missing") from None
    except OSError as e:
        raise ContractError(f"{path}: cannot be opened ({e.strerror})") from None
    with fh:
        return read_npz(fh, spec, dims, str(path))


# --------------------------------------------------------------------------- metadata


class ModelInfo(BaseModel):
    """A model used to make the data."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    role: str = Field(description="what it produced, e.g. 'depth'")
    name: str = Field(description="hub id, local path, or a label such as 'random-tiny'")
    revision: Optional[str] = Field(None, description="commit hash or version when known")
    random_init: bool = Field(False, description="True for randomly initialised models (tests, demos): labels are not real")


class BuildRun(BaseModel):
    """One run of `fwdata build` into the dataset (the dataset-level history; samples carry their own provenance)."""

    model_config = ConfigDict(extra="forbid")

    created: str = Field(description="ISO 8601 UTC time the run finished")
    command: str = ""
    tool_version: str
    built: int = Field(0, ge=0)
    skipped: int = Field(0, ge=0)
    failed: int = Field(0, ge=0)


class Provenance(BaseModel):
    """How the dataset was made."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    tool: str = "fwdata"
    tool_version: str
    created: str = Field(description="ISO 8601 UTC time of the (last) build")
    command: str = Field("", description="the command that made the dataset")
    options: dict = Field(default_factory=dict, description="resolved build options of the last run")
    models: list[ModelInfo] = Field(default_factory=list, description="every model that made a sample of the dataset")
    packages: dict[str, str] = Field(default_factory=dict, description="versions of key packages")
    runs: list[BuildRun] = Field(default_factory=list, description="every build run into the dataset, oldest first")


class SampleProvenance(BaseModel):
    """What made one sample: the tool version, the options that shape the data, the models.

    No time or command here (they are in `Provenance.runs`), so the same inputs and options give
    the same record however the build was run."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    tool_version: str
    options: dict = Field(default_factory=dict, description="build options that shaped this sample")
    models: list[ModelInfo] = Field(default_factory=list)


class SamplePaths(BaseModel):
    """Relative paths of one sample's files (see `sample_paths`)."""

    model_config = ConfigDict(extra="forbid")

    video: RelPath
    depth: RelPath
    points: RelPath
    points_ply: Optional[RelPath] = None
    camera_txt: RelPath
    camera_json: RelPath

    def all(self) -> list[str]:
        return [p for p in (self.video, self.depth, self.points, self.points_ply, self.camera_txt, self.camera_json) if p]


class SourceCamera(BaseModel):
    """The camera of the source video as the build found it (or was given it), in *source* pixels.

    The OpenCV lens model (fwdata.dataset.lens): a pinhole point (x, y) is seen at radial-tangential
    distorted coordinates. A clip whose source lens distorts is resampled onto a pinhole camera: its
    own intrinsics (camera_params) are always pinhole; `pinhole_focal_scale` is the written clip's
    focal / this focal (above 1 when a pincushion lens needed a slight zoom to avoid blank borders).
    `k3` (the r^6 radial term) is written only when it is not 0, with the model FULL_OPENCV (COLMAP's
    k1, k2, p1, p2, k3, k4, k5, k6 with k4 = k5 = k6 = 0); records without it have k3 = 0.
    """

    model_config = ConfigDict(extra="forbid")

    model: Literal["PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV"] = Field(
        description="COLMAP camera model the parameters come from")
    estimated: bool = Field(description="true: estimated from the video by SfM; false: given (--intrinsics)")
    fx: float = Field(gt=0)
    fy: float = Field(gt=0)
    cx: float
    cy: float
    k1: float = 0.0
    k2: float = 0.0
    p1: float = 0.0
    p2: float = 0.0
    k3: float = Field(0.0, description="radial r^6 coefficient (FULL_OPENCV only; omitted from the record when 0)")
    pinhole_focal_scale: float = Field(1.0, gt=0, description="written clip focal / source focal (both per pixel "
                                                              "of their own image, after the resize)")

    @model_validator(mode="after")
    def _k3_needs_full_opencv(self) -> "SourceCamera":
        if self.k3 != 0.0 and self.model != "FULL_OPENCV":
            raise ValueError(f"source camera k3 = {self.k3:g} needs the model FULL_OPENCV, not {self.model}")
        return self

    @model_serializer(mode="wrap")
    def _omit_zero_k3(self, handler):
        """Records of lenses without k3 keep their bytes: no k3 key when it is 0."""
        out = handler(self)
        if self.k3 == 0.0:
            out.pop("k3", None)
        return out


class SourceRef(BaseModel):
    """Where a sample came from, so every frame can be traced back to its source video."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="the source video as given to the build (outside the dataset; informational)")
    size_bytes: Optional[int] = None
    fingerprint: Optional[str] = Field(None, description="content fingerprint of the source file (what the sample "
                                                         "id is derived from; fwdata.dataset.video)")
    fps: float = Field(gt=0, description="frame rate of the source video")
    num_frames: int = Field(ge=1, description="frames in the source video")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    start_frame: int = Field(ge=0, description="first source frame of the clip")
    stride: int = Field(ge=1, description="source frames between consecutive clip frames")
    crop_xywh: tuple[float, float, float, float] = Field(
        description="crop of the source frame (after rotation) in source pixels: x0, y0, width, height"
    )
    resize_scale: tuple[float, float] = Field(description="clip pixels per cropped source pixel, (sx, sy)")
    rotation_deg: int = Field(
        0, description="display rotation (degrees, counter-clockwise) stored in the source container and applied "
                       "by the decoder before cropping; width/height above are after rotation"
    )
    camera: Optional[SourceCamera] = Field(None, description="the source camera and lens (None: older datasets)")


class QualityMetrics(BaseModel):
    """Per-sample quality numbers recorded by the build; quality gates read them. None = not computed."""

    model_config = ConfigDict(extra="forbid")

    registered_ratio: Optional[float] = Field(None, ge=0, le=1, description="frames registered by SfM mapping / T")
    reprojection_error_px: Optional[float] = Field(None, ge=0, description="mean SfM reprojection error, pixels")
    num_points3d: Optional[int] = Field(None, ge=0, description="sparse SfM points")
    depth_sfm_absrel: Optional[float] = Field(None, ge=0, description="AbsRel of aligned depth vs SfM point depths")
    depth_sfm_absrel_max_frame: Optional[float] = Field(
        None, ge=0, description="largest per-frame AbsRel of aligned depth vs the SfM points seen in that frame"
    )
    multiview_consistency: Optional[float] = Field(
        None, ge=0, le=1, description="fraction of overlapping pixels whose depth agrees after warping between frames"
    )
    multiview_settings: Optional[MultiviewSettings] = Field(
        None, description="how multiview_consistency was measured (None: the defaults of fwdata.quality)"
    )
    focal_uncertainty: Optional[float] = Field(
        None, ge=0, description="standard deviation of the estimated focal length / focal length (bundle-adjustment "
                                "cost profile); None with known intrinsics")
    focal_spread: Optional[float] = Field(
        None, ge=0, description="(max - min) / median of the focal lengths independent SfM starts settle at; with "
                                "known intrinsics, how far a free adjustment moves the given focal (fraction)")
    fov_h_deg: Optional[float] = Field(None, gt=0, lt=180)
    fov_w_deg: Optional[float] = Field(None, gt=0, lt=180)
    path_length: Optional[float] = Field(None, ge=0, description="camera path length, dataset unit")
    rotation_deg: Optional[float] = Field(None, ge=0, description="largest rotation from frame 0, degrees")
    blur: Optional[float] = Field(None, ge=0, description="mean variance of the Laplacian (higher = sharper)")
    brightness: Optional[float] = Field(None, ge=0, le=255, description="mean luma, 0..255")
    valid_depth_fraction: Optional[float] = Field(None, ge=0, le=1)


SampleStatus = Literal["ok", "gated_out"]
SplitName = Literal["train", "val", "test"]


class SampleRecord(BaseModel):
    """One sample (clip) of the dataset."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=SAMPLE_ID_PATTERN)
    paths: SamplePaths
    num_frames: int = Field(ge=1, description="T = 4k + 1")
    height: int = Field(gt=0, description="H, a multiple of 16")
    width: int = Field(gt=0, description="W, a multiple of 16")
    fps: float = Field(gt=0, description="frame rate of videos/<id>.mp4")
    scale: ScaleKind
    scale_source: str = Field(description="how the unit was obtained, e.g. 'metric depth model', 'sfm', 'ground truth'")
    depth_source: str = Field(description="e.g. 'depth-anything', 'prior', 'ground truth'")
    source: SourceRef
    split: SplitName = "train"
    status: SampleStatus = "ok"
    quality: QualityMetrics = Field(default_factory=QualityMetrics)
    notes: list[str] = Field(default_factory=list)
    video_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$",
                                        description="sha256 of videos/<id>.mp4 as written (a swapped or replaced "
                                                    "video no longer matches)")
    provenance: Optional[SampleProvenance] = Field(None, description="what made this sample (None: older datasets)")

    @model_validator(mode="after")
    def _check_dims(self) -> "SampleRecord":
        if (self.num_frames - 1) % 4 != 0:
            raise ValueError(f"num_frames {self.num_frames} is not 4k+1 (Wan VAE)")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height x width {self.height}x{self.width} must be multiples of 16")
        expected = sample_paths(self.id)
        for name in ("video", "depth", "points", "camera_txt", "camera_json"):
            if getattr(self.paths, name) != getattr(expected, name):
                raise ValueError(f"paths.{name} is {getattr(self.paths, name)!r}, expected {getattr(expected, name)!r}")
        return self

    @property
    def dims(self) -> dict[str, int]:
        return {"T": self.num_frames, "H": self.height, "W": self.width}


class FailedInput(BaseModel):
    """An input video (or one clip of it) that produced no sample, and why."""

    model_config = ConfigDict(extra="forbid")

    source: str
    reason: str = Field(description="one line a user can act on")
    stage: str = Field(description="pipeline stage that failed: probe, decode, depth, sfm, align, points, write")
    clip_start: Optional[int] = None
    run: Optional[int] = Field(None, ge=0, description="index in provenance.runs of the run that recorded it")


class Statistics(BaseModel):
    """Dataset totals (recomputed on every write)."""

    model_config = ConfigDict(extra="forbid")

    num_samples: int = 0
    num_ok: int = 0
    num_gated_out: int = 0
    num_failed_inputs: int = 0
    total_frames: int = 0
    duration_s: float = 0.0


class DatasetMetadata(BaseModel):
    """`metadata.json`: the index of a dataset."""

    model_config = ConfigDict(extra="forbid")

    schema_version: str = SCHEMA_VERSION
    name: str = ""
    provenance: Provenance
    samples: list[SampleRecord] = Field(default_factory=list)
    failures: list[FailedInput] = Field(default_factory=list)
    splits: dict[SplitName, list[str]] = Field(default_factory=dict, description="sample ids per split")
    statistics: Statistics = Field(default_factory=Statistics)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: str) -> str:
        if v not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(f"schema_version {v!r} is not supported (known: {', '.join(SUPPORTED_SCHEMA_VERSIONS)})")
        return v

    @model_validator(mode="after")
    def _check_ids(self) -> "DatasetMetadata":
        seen: set[str] = set()
        for s in self.samples:
            if s.id in seen:
                raise ValueError(f"duplicate sample id {s.id!r}")
            seen.add(s.id)
        for split, ids in self.splits.items():
            unknown = [i for i in ids if i not in seen]
            if unknown:
                raise ValueError(f"split {split!r} lists unknown sample ids {unknown[:5]}")
        return self

    def sample(self, sample_id: str) -> SampleRecord:
        for s in self.samples:
            if s.id == sample_id:
                return s
        raise KeyError(sample_id)

    def with_statistics(self) -> "DatasetMetadata":
        """A copy with `splits` and `statistics` recomputed from `samples` and `failures`."""
        splits: dict[str, list[str]] = {}
        for s in self.samples:
            splits.setdefault(s.split, []).append(s.id)
        stats = Statistics(
            num_samples=len(self.samples),
            num_ok=sum(s.status == "ok" for s in self.samples),
            num_gated_out=sum(s.status == "gated_out" for s in self.samples),
            num_failed_inputs=len(self.failures),
            total_frames=sum(s.num_frames for s in self.samples),
            duration_s=round(sum(s.num_frames / s.fps for s in self.samples), 3),
        )
        return self.model_copy(update={"splits": splits, "statistics": stats})

    def to_frame(self):
        """A pandas DataFrame with one row per sample: id, split, status, T/H/W, fps and quality metrics."""
        import pandas as pd

        rows = []
        for s in self.samples:
            row = {"id": s.id, "split": s.split, "status": s.status, "T": s.num_frames, "H": s.height,
                   "W": s.width, "fps": s.fps, "scale": s.scale, "source": s.source.path}
            row.update(s.quality.model_dump())
            rows.append(row)
        return pd.DataFrame(rows)


def load_metadata(root: Union[str, Path]) -> DatasetMetadata:
    """Read and validate `root/metadata.json`, including that every path stays inside `root`.

    Raises ContractError (or PathEscapeError) with a message naming the file and the problem.
    """
    root = Path(root)
    path = root / METADATA_FILE
    if not path.is_file():
        raise ContractError(f"{path}: missing; is {root} a dataset made by `fwdata build`?")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ContractError(f"{path}: not valid JSON ({e})") from None
    try:
        meta = DatasetMetadata.model_validate(raw)
    except ValidationError as e:
        raise ContractError(f"{path}: {_first_error(e)}") from None
    for s in meta.samples:
        for rel in s.paths.all():
            resolve_inside(root, rel)
    return meta


def metadata_json(meta: DatasetMetadata) -> str:
    """Serialised metadata.json text (stable key order, indented)."""
    return meta.model_dump_json(indent=2) + "\n"


# --------------------------------------------------------------------------- JSON Schema export

#: file name in docs/schemas -> model
SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "metadata.schema.json": DatasetMetadata,
    "camera.schema.json": CameraFile,
    "camera_txt_row.schema.json": CameraTxtRow,
}


def json_schemas() -> dict[str, str]:
    """File name -> JSON Schema text for every contract model."""
    out = {}
    for name, model in SCHEMA_MODELS.items():
        schema = model.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"fantasyworld-data/{SCHEMA_VERSION}/{name}"
        out[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def export_schemas(directory: Union[str, Path]) -> list[Path]:
    """Write the JSON Schemas into `directory`; returns the written paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in json_schemas().items():
        p = directory / name
        p.write_text(text)
        written.append(p)
    return written


# --------------------------------------------------------------------------- helpers


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{loc}: {err['msg']}{more}" if loc else f"{err['msg']}{more}"
