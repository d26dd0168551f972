"""Quality gates: thresholds on per-sample metrics and dataset-level rules, loaded from TOML.

A gate file (a TOML file, or a packaged one by name: ``fwdata/presets/gates/*.toml``, e.g. `strict`)
is a `GateConfig`::

    name = "strict"
    [sample]                      # per-sample metric ranges; a missing bound is open
    registered_ratio = { min = 0.995 }
    fov_w_deg = { min = 30, max = 120 }
    [dataset]                     # dataset-level gates
    min_samples = 1
    min_pass_fraction = 1.0
    [tolerances]                  # numeric tolerances of the consistency checks
    points_rel_tol = 0.000977
    [severity]                    # override a check's severity: error | warning | info | off
    "schema.orphan_file" = "error"

Every table and key is checked (unknown keys are errors), so a typo never silently disables a
gate. `GateConfig()` (no file) is the built-in default and equals the packaged `default` gate file.

This module only knows metrics and thresholds; `fwdata.validate` computes the metrics, turns
`GateFailure`s into findings and decides the exit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fwdata.quality import MultiviewSettings
from fwdata.presets import GATE_FILES, find_preset
from fwdata.runtime import ConfigFileError, load_config_file
from fwdata.textout import plural


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MetricInfo:
    """A per-sample metric that gates can threshold."""

    name: str
    description: str
    source: Literal["computed", "recorded", "both"]  # computed by validation, recorded by the build, or both
    file: str  # the sample file it is measured on: a SamplePaths field, or "metadata" (metadata.json)


#: every metric a `[sample]` table may name. "computed" metrics are recomputed by validation from
#: the files (a recorded value is only compared with the recomputation); "recorded" ones come from
#: metadata.json `quality` (the build's SfM statistics, which cannot be recomputed from the files).
METRICS: dict[str, MetricInfo] = {m.name: m for m in [
    MetricInfo("registered_ratio", "fraction of frames registered by SfM mapping (camera json `registered`)", "both",
               "camera_json"),
    MetricInfo("reprojection_error_px", "mean SfM reprojection error, pixels", "recorded", "metadata"),
    MetricInfo("num_points3d", "sparse SfM points", "recorded", "metadata"),
    MetricInfo("depth_sfm_absrel", "AbsRel of the aligned depth against SfM point depths", "recorded", "metadata"),
    MetricInfo("multiview_consistency", "fraction of overlapping pixels whose depth agrees (5%) after warping "
                                        "between frames with the cameras", "both", "depth"),
    MetricInfo("focal_uncertainty", "standard deviation of the estimated focal length / focal length (SfM "
                                    "reprojection-cost profile)", "recorded", "metadata"),
    MetricInfo("focal_spread", "disagreement of independent focal-length hypotheses (fraction); with given "
                               "intrinsics, how far the video pulls the given focal", "recorded", "metadata"),
    MetricInfo("fov_w_deg", "horizontal field of view, degrees", "both", "camera_json"),
    MetricInfo("fov_h_deg", "vertical field of view, degrees", "both", "camera_json"),
    MetricInfo("path_length", "length of the camera path, dataset unit", "both", "camera_json"),
    MetricInfo("rotation_deg", "largest camera rotation from frame 0, degrees", "both", "camera_json"),
    MetricInfo("trajectory_anomalies", "frames where the camera motion breaks a constant-velocity model "
                                       "(jumps, swapped poses)", "computed", "camera_json"),
    MetricInfo("blur", "mean variance of the Laplacian of the luma (higher = sharper)", "both", "video"),
    MetricInfo("brightness", "mean luma, 0..255", "both", "video"),
    MetricInfo("valid_depth_fraction", "fraction of pixels with valid depth", "both", "depth"),
    MetricInfo("duration_s", "clip length, seconds (T / fps)", "computed", "video"),
]}


class MetricRange(BaseModel):
    """Allowed range of one metric. `required`: a sample without the metric fails the gate."""

    model_config = ConfigDict(extra="forbid")

    min: Optional[float] = Field(None, description="smallest allowed value (inclusive)")
    max: Optional[float] = Field(None, description="largest allowed value (inclusive)")
    required: bool = Field(False, description="fail samples for which the metric is not available")

    @model_validator(mode="after")
    def _ordered(self) -> "MetricRange":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is larger than max {self.max}")
        return self

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"[{self.min:g}, {self.max:g}]"
        if self.min is not None:
            return f">= {self.min:g}"
        if self.max is not None:
            return f"<= {self.max:g}"
        return "any"


def _default_sample_gates() -> dict[str, MetricRange]:
    # permissive: only values that make a sample useless for geometry training
    return {
        "registered_ratio": MetricRange(min=0.5),
        "reprojection_error_px": MetricRange(max=4.0),
        "multiview_consistency": MetricRange(min=0.5),
        "focal_uncertainty": MetricRange(max=0.02),
        "focal_spread": MetricRange(max=0.03),
        "fov_w_deg": MetricRange(min=10.0, max=170.0),
        "valid_depth_fraction": MetricRange(min=0.01),
        "blur": MetricRange(min=1.0),
        "brightness": MetricRange(min=5.0, max=250.0),
    }


class DatasetGates(BaseModel):
    """Gates on the dataset as a whole."""

    model_config = ConfigDict(extra="forbid")

    min_samples: int = Field(1, ge=0, description="fewest usable samples (status ok, no errors, every sample gate passed)")
    min_pass_fraction: float = Field(
        0.5, ge=0, le=1, description="fewest fraction of status-ok samples that pass every check and sample gate"
    )
    max_duplicate_clips: int = Field(
        0, ge=0, description="most samples that duplicate another (identical video, or the same source frames)"
    )
    duplicate_overlap: float = Field(
        0.5, gt=0, le=1, description="two clips of one source count as duplicates when their source frame ranges "
                                     "overlap by more than this fraction of the shorter clip"
    )
    min_split_sizes: dict[Literal["train", "val", "test"], int] = Field(
        default_factory=lambda: {"train": 1}, description="fewest usable samples per split"
    )
    allow_random_init_models: bool = Field(
        False, description="accept data made with randomly initialised models (tests, demos); they are flagged anyway"
    )
    allow_source_in_several_splits: bool = Field(
        True, description="accept clips of one source video in more than one split (train/val leakage)"
    )


class Tolerances(BaseModel):
    """Numeric tolerances of the integrity and cross-consistency checks (not quality thresholds)."""

    model_config = ConfigDict(extra="forbid")

    points_rel_tol: float = Field(
        2.0 ** -10, gt=0, description="|points - unprojected depth| <= points_rel_tol * |point| (float16 keeps 2^-11)"
    )
    points_max_bad_fraction: float = Field(1e-3, ge=0, le=1, description="valid pixels allowed outside points_rel_tol")
    camera_txt_tol: float = Field(1e-6, gt=0, description="camera txt vs json, relative to max(1, |value|)")
    rotation_tol: float = Field(1e-4, gt=0, description="max |R^T R - I| and |det R - 1|")
    world_frame_tol: float = Field(1e-6, gt=0, description="max |w2c[0] - I|")
    fps_rel_tol: float = Field(0.01, ge=0, description="video fps vs metadata fps, relative")
    # defaults: fwdata.quality.MultiviewSettings, what the build measures with
    multiview_rel_tol: float = Field(MultiviewSettings().rel_tol, gt=0,
                                     description="depth agreement tolerance of multiview_consistency")
    multiview_stride: int = Field(MultiviewSettings().stride, ge=1,
                                  description="pixel stride of the multi-view consistency check")
    multiview_max_pairs: int = Field(MultiviewSettings().max_pairs, ge=1,
                                     description="frame pairs (gaps 1 and 4, spread over the clip) of the multi-view "
                                                 "consistency check")
    multiview_floor: float = Field(
        0.5, ge=0, le=1, description="cross.multiview_consistency fires below this (depth and cameras disagree)"
    )
    ply_sample_points: int = Field(1000, ge=1, description="fused-cloud points checked against the point maps")

    def multiview(self) -> MultiviewSettings:
        """The multi-view consistency settings of this gate file."""
        return MultiviewSettings(rel_tol=self.multiview_rel_tol, stride=self.multiview_stride,
                                 max_pairs=self.multiview_max_pairs)
    ply_rel_tol: float = Field(0.03, gt=0, description="a cloud point is supported when a point map holds a point "
                                                        "within ply_rel_tol * depth of it")
    ply_min_support: float = Field(0.9, ge=0, le=1, description="fewest fraction of cloud points supported")


Severity = Literal["error", "warning", "info", "off"]


class GateConfig(BaseModel):
    """A gate file: per-sample metric ranges, dataset gates, tolerances and severity overrides."""

    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    description: str = "permissive: reject only clearly broken or unusable samples"
    sample: dict[str, MetricRange] = Field(default_factory=_default_sample_gates,
                                           description="metric name -> allowed range (see METRICS)")
    dataset: DatasetGates = Field(default_factory=DatasetGates)
    tolerances: Tolerances = Field(default_factory=Tolerances)
    severity: dict[str, Severity] = Field(default_factory=dict, description="check id -> severity override")

    @field_validator("sample")
    @classmethod
    def _known_metrics(cls, v: dict[str, MetricRange]) -> dict[str, MetricRange]:
        unknown = sorted(set(v) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
        return v


class GateError(ConfigFileError):
    """A gate file that cannot be read or does not satisfy GateConfig; the message names the file."""


def load_gates(path: Union[str, Path, None]) -> GateConfig:
    """Read a gate TOML file, or a packaged one by name (`strict`; None -> the built-in defaults).
    Raises GateError naming the file and key."""
    if path is None:
        return GateConfig()
    path = find_preset(path, GATE_FILES, error=GateError)
    try:
        return load_config_file(GateConfig, path, error=GateError, missing_hint="`fwdata presets` lists the packaged "
                                "gate files", defaults={"name": Path(path).stem})
    except RecursionError:  # tomllib recurses per nesting level
        raise GateError(f"{path}: not valid TOML (nested too deeply)") from None


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class GateFailure:
    """A gate that did not pass. `check` is the check id (`gate.<metric>` or a dataset gate id)."""

    check: str
    message: str
    sample: Optional[str] = None
    value: Optional[float] = None
    severity: Optional[str] = None  # None: the check's registered severity


def sample_gate_id(metric: str) -> str:
    return f"gate.{metric}"


def evaluate_sample(sample_id: str, metrics: dict[str, Optional[float]], config: GateConfig) -> list[GateFailure]:
    """Per-sample gates: each configured metric range against the sample's metrics."""
    out = []
    for name, rng in config.sample.items():
        value = metrics.get(name)
        if value is None:
            if rng.required:
                out.append(GateFailure(sample_gate_id(name), f"{name} is not available but the gate requires it "
                                                             f"({rng.describe()})", sample_id))
            continue
        if (rng.min is not None and value < rng.min) or (rng.max is not None and value > rng.max):
            out.append(GateFailure(sample_gate_id(name), f"{name} = {value:.4g}, gate {rng.describe()}", sample_id,
                                   float(value)))
    return out


@dataclass
class SampleFacts:
    """What the dataset gates need to know about one sample."""

    id: str
    split: str
    status: str  # ok | gated_out
    source: str
    start_frame: int
    stride: int
    num_frames: int
    passed: bool  # no errors and every sample gate passed
    video_sha1: Optional[str] = None


def find_duplicates(samples: Iterable[SampleFacts], overlap: float) -> list[tuple[str, str, str]]:
    """(duplicate id, original id, reason) for samples with an identical video or overlapping source frames.

    Two clips of one source overlap when the intersection of their source frame ranges is more
    than `overlap` of the shorter range. Each sample is reported once, against the first it repeats.
    """
    out: list[tuple[str, str, str]] = []
    seen_hash: dict[str, str] = {}
    by_source: dict[str, list[SampleFacts]] = {}
    for s in samples:
        if s.video_sha1 and s.video_sha1 in seen_hash:
            out.append((s.id, seen_hash[s.video_sha1], "identical video file"))
            continue
        if s.video_sha1:
            seen_hash[s.video_sha1] = s.id
        lo, hi = s.start_frame, s.start_frame + (s.num_frames - 1) * s.stride
        for o in by_source.get(s.source, []):
            olo, ohi = o.start_frame, o.start_frame + (o.num_frames - 1) * o.stride
            inter = min(hi, ohi) - max(lo, olo) + 1
            shorter = min(hi - lo, ohi - olo) + 1
            if inter > overlap * shorter:
                out.append((s.id, o.id, f"source frames {lo}-{hi} overlap {olo}-{ohi} of {s.source}"))
                break
        else:
            by_source.setdefault(s.source, []).append(s)
    return out


def evaluate_dataset(samples: list[SampleFacts], random_init_models: list[str], config: GateConfig) -> list[GateFailure]:
    """Dataset gates: usable samples, pass fraction, duplicates, split sizes, random-init models, leakage."""
    g = config.dataset
    out: list[GateFailure] = []
    ok = [s for s in samples if s.status == "ok"]
    usable = [s for s in ok if s.passed]
    if len(usable) < g.min_samples:
        out.append(GateFailure("gate.min_samples", f"{len(usable)} usable samples (status ok, passing every check), "
                                                   f"gate needs at least {g.min_samples}", value=len(usable)))
    if ok:
        frac = len(usable) / len(ok)
        if frac < g.min_pass_fraction:
            out.append(GateFailure("gate.pass_fraction", f"{len(usable)}/{len(ok)} = {frac:.1%} of status-ok samples "
                                                         f"pass, gate needs {g.min_pass_fraction:.1%}", value=frac))
    dups = find_duplicates(samples, g.duplicate_overlap)
    if len(dups) > g.max_duplicate_clips:
        for dup, orig, why in dups:
            out.append(GateFailure("gate.duplicate_clips", f"duplicates {orig}: {why} ({plural(len(dups), 'duplicate')}, gate "
                                                           f"allows {g.max_duplicate_clips})", sample=dup))
    for split, need in g.min_split_sizes.items():
        have = sum(s.split == split for s in usable)
        if have < need:
            out.append(GateFailure("gate.split_sizes", f"split {split!r} has {have} usable samples, gate needs {need}",
                                   value=have))
    for name in random_init_models:
        out.append(GateFailure("gate.random_init_model",
                               f"made with the randomly initialised {name}: its labels are not real "
                               + ("(allowed by the gates: for tests and demos only)" if g.allow_random_init_models
                                  else "(not allowed; for tests and demos allow it with `fwdata validate "
                                       "--allow-random-init` or dataset.allow_random_init_models = true in the gate "
                                       "file)"),
                               severity="warning" if g.allow_random_init_models else None))
    splits_of: dict[str, set[str]] = {}
    for s in samples:
        splits_of.setdefault(s.source, set()).add(s.split)
    for source, splits in sorted(splits_of.items()):
        if len(splits) > 1:
            out.append(GateFailure("gate.split_leakage", f"source {source} has clips in splits {sorted(splits)}",
                                   severity="warning" if g.allow_source_in_several_splits else "error"))
    return out
