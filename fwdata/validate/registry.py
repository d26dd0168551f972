"""The checks of `fwdata validate`: every check id with its severity and what it catches, and the
functions that emit them.

A check function declares the ids it may emit (`@emits(...)`); emitting any other id is a bug and
raises `UndeclaredCheck` (tests run every check, so a wrong id fails them). What ran and what was
skipped, per check id, is counted in one `CheckTally`.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Literal, TypeVar

from fwdata.validate import gates

# --------------------------------------------------------------------------- ids

class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Check:
    """One check: stable id, default severity, where it runs and what it catches."""

    id: str
    severity: Severity
    scope: Literal["dataset", "sample"]
    catches: str

    @property
    def family(self) -> str:
        return self.id.split(".", 1)[0]


REGISTRY: dict[str, Check] = {}


def register(id: str, severity: Severity, scope: Literal["dataset", "sample"], catches: str) -> Check:
    if id in REGISTRY:
        raise ValueError(f"check {id} registered twice")
    REGISTRY[id] = Check(id, severity, scope, catches)
    return REGISTRY[id]


E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFO
# schema: metadata.json and the tree
register("schema.metadata_json", E, "dataset", "metadata.json missing, not a regular file, not JSON (or nested too "
                                               "deeply), or not a JSON object (exit 2)")
register("schema.version", E, "dataset", "schema_version not known to this tool (exit 2)")
register("schema.metadata_model", E, "dataset", "top-level metadata fields (provenance, failures, splits, statistics) "
                                                 "that break the DatasetMetadata model")
register("schema.sample_record", E, "sample", "a sample record that breaks SampleRecord: bad id, T not 4k+1, H/W not "
                                              "multiples of 16, paths not derived from the id, bad quality values")
register("schema.duplicate_ids", E, "dataset", "two sample records with the same id")
register("schema.path_escape", E, "dataset", "a path in metadata that is absolute, has '..' or a NUL byte, or is too "
                                             "long; or a file, folder or symlink in the tree (the dataset's own "
                                             "folders, .fwdata/ and metadata.json included) that resolves outside "
                                             "the dataset root")
register("schema.missing_file", E, "sample", "a file named by a sample record that does not exist")
register("schema.orphan_file", W, "dataset", "a file in the dataset that no sample names (left-over temporary files, "
                                             "samples dropped from metadata); .fwdata/ (internal) and "
                                             ".fwmodel_cache/ (the trainer's cache) hold none")
register("schema.splits", E, "dataset", "splits naming unknown ids, or disagreeing with each sample's `split`")
register("schema.statistics", W, "dataset", "statistics that do not match the samples and failures")
# integrity: one sample's files
register("integrity.video_decode", E, "sample", "an mp4 that is truncated, corrupted or not a video (every frame is "
                                                "decoded)")
register("integrity.video_dims", E, "sample", "a video whose frame count or size differs from the record's T, H, W")
register("integrity.video_fps", E, "sample", "a video whose frame rate differs from the record's fps")
register("integrity.depth_file", E, "sample", "a depth npz that cannot be read (truncated, corrupt, pickled "
                                              "objects) or lacks / adds arrays")
register("integrity.depth_dtype", E, "sample", "depth arrays with the wrong dtype (depth float32, valid bool)")
register("integrity.depth_shape", E, "sample", "depth arrays whose shape is not [T,H,W] of the record (dropped frame)")
register("integrity.points_file", E, "sample", "a points npz that cannot be read or lacks / adds arrays")
register("integrity.points_dtype", E, "sample", "point arrays with the wrong dtype (points float16, valid bool)")
register("integrity.points_shape", E, "sample", "point arrays whose shape is not [T,H,W,3] / [T,H,W]")
register("integrity.depth_finite", E, "sample", "NaN or inf depth where valid is True")
register("integrity.depth_positive", E, "sample", "depth <= 0 where valid is True")
register("integrity.points_finite", E, "sample", "NaN or inf points where valid is True (e.g. float16 overflow)")
register("integrity.invalid_zero", W, "sample", "non-zero depth or points where valid is False (the contract stores 0)")
register("integrity.valid_fraction", W, "sample", "frames without a single valid depth pixel")
register("integrity.camera_json", E, "sample", "a camera json that cannot be read or breaks CameraFile (convention, "
                                               "model, frame fields, index order), or whose size/scale differ from "
                                               "the record")
register("integrity.camera_txt", E, "sample", "a camera txt that cannot be parsed (19 finite numbers per line)")
register("integrity.camera_count", E, "sample", "camera json or txt with a frame count other than T")
register("integrity.extrinsics", E, "sample", "w2c that is not 4x4, not finite, or whose last row is not 0 0 0 1")
register("integrity.rotation", E, "sample", "w2c rotations that are not orthonormal or have det -1 (reflections)")
register("integrity.intrinsics", E, "sample", "focal lengths not positive and finite, principal point outside "
                                              "the image")
register("integrity.world_frame", E, "sample", "frame 0 whose w2c is not the identity (frame 0 is the world frame)")
register("integrity.source_frame_order", E, "sample", "source_frame not strictly increasing")
register("integrity.source_trace", W, "sample", "source_frame that does not follow the record's source start_frame, "
                                                "stride and frame count")
register("integrity.ply_file", E, "sample", "a fused-cloud ply that is truncated, corrupt, empty while the sample "
                                            "has valid points, or holds non-finite coordinates")
# cross-consistency
register("cross.camera_txt_json", E, "sample", "camera txt and json that disagree (intrinsics, w2c, frame indices)")
register("cross.valid_masks", E, "sample", "points marked valid where depth is not")
register("cross.points_match_depth", E, "sample", "point maps that are not the depth unprojected with the cameras "
                                                  "(within float16 precision): scaled points, swapped or edited "
                                                  "cameras, depth edited after the points were made")
register("cross.multiview_consistency", W, "sample", "depth warped between frames with the cameras that disagrees "
                                                     "on most overlapping pixels (tolerances.multiview_floor)")
register("cross.ply_matches_points", E, "sample", "a fused cloud that does not lie where the point maps say")
register("cross.recorded_quality", W, "sample", "quality metrics in metadata.json that differ from the values "
                                                "recomputed from the files")
register("cross.video_matches_record", E, "sample", "a video whose sha256 differs from the record's video_sha256: "
                                                    "swapped, replaced or edited after the build")
# gates
for _m in gates.METRICS.values():
    register(gates.sample_gate_id(_m.name), W, "sample", f"sample gate on {_m.name}: {_m.description}")
register("gate.min_samples", E, "dataset", "fewer usable samples than dataset.min_samples")
register("gate.pass_fraction", E, "dataset", "fewer status-ok samples passing every check and sample gate than "
                                             "dataset.min_pass_fraction")
register("gate.duplicate_clips", E, "dataset", "more duplicate clips (identical video, or overlapping source frames) "
                                               "than dataset.max_duplicate_clips")
register("gate.split_sizes", E, "dataset", "splits with fewer usable samples than dataset.min_split_sizes")
register("gate.random_init_model", E, "dataset", "data made with a randomly initialised (depth) model; a warning when "
                                                 "dataset.allow_random_init_models is true")
register("gate.split_leakage", W, "dataset", "clips of one source video in several splits; an error when "
                                             "dataset.allow_source_in_several_splits is false")
# the validator itself
register("internal.check_crashed", E, "sample", "a check that raised unexpectedly (a bug in fwdata: please report)")
register("internal.worker_crashed", E, "sample", "a worker process that died on a sample (e.g. a decoder crash)")
del E, W, I


# --------------------------------------------------------------------------- check functions


class UndeclaredCheck(AssertionError):
    """A check function emitted an id it did not declare with `@emits` (a bug in fwdata)."""


@dataclass(frozen=True)
class CheckFunction:
    """A function that runs checks, and the ids it may emit."""

    name: str
    ids: tuple[str, ...]


#: every check function, by qualified name
CHECK_FUNCTIONS: dict[str, CheckFunction] = {}
_RUNNING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("fwdata_validate_running", default=())

F = TypeVar("F", bound=Callable)


def emits(*ids: str) -> Callable[[F], F]:
    """Declare the check ids a function may emit (each must be registered). While it runs, emitting
    another id raises `UndeclaredCheck`."""
    unknown = [i for i in ids if i not in REGISTRY]
    if unknown:
        raise ValueError(f"@emits names unregistered check ids {unknown}")

    def wrap(fn: F) -> F:
        name = f"{fn.__module__}.{fn.__qualname__}"
        CHECK_FUNCTIONS[name] = CheckFunction(name, tuple(ids))

        @functools.wraps(fn)
        def run(*args, **kwargs):
            token = _RUNNING.set(tuple(ids))
            try:
                return fn(*args, **kwargs)
            finally:
                _RUNNING.reset(token)

        run.check_ids = tuple(ids)  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return wrap


#: ids of the validator itself, which any check function may emit (a check that crashed)
INTERNAL_IDS = frozenset({"internal.check_crashed", "internal.worker_crashed"})


def declared(check_id: str) -> Check:
    """The registered check `check_id`, if the running check function declared it; else UndeclaredCheck."""
    running = _RUNNING.get()
    if check_id not in running and check_id not in INTERNAL_IDS:
        raise UndeclaredCheck(f"{check_id} emitted by a check function that declares {list(running)}")
    return REGISTRY[check_id]


# --------------------------------------------------------------------------- counts


@dataclass
class CheckTally:
    """How often each check ran, and how often (and why) it was skipped, over one validation."""

    ran: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, tuple[int, str]] = field(default_factory=dict)

    def add_ran(self, ids, n: int = 1) -> None:
        for cid in ids:
            self.ran[cid] = self.ran.get(cid, 0) + n

    def add_skipped(self, check_id: str, why: str, n: int = 1) -> None:
        count, first_why = self.skipped.get(check_id, (0, why))
        self.skipped[check_id] = (count + n, first_why)

    def run(self, fn: Callable, *args, **kwargs):
        """Call a dataset-level check function and count every id it declares as run."""
        out = fn(*args, **kwargs)
        self.add_ran(fn.check_ids)
        return out
