"""What `fwdata validate` reports: findings, per-sample results, per-check summaries, the report."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from fwdata import __version__
from fwdata.validate.registry import Severity


class Finding(BaseModel):
    """One problem found by one check."""

    model_config = ConfigDict(extra="forbid")

    check: str = Field(description="check id, e.g. integrity.depth_dtype")
    severity: Severity
    message: str
    sample: Optional[str] = Field(None, description="sample id, when the finding is about one sample")
    file: Optional[str] = Field(None, description="path relative to the dataset root")
    value: Optional[float] = Field(None, description="the measured number, when there is one")


class SampleResult(BaseModel):
    """Outcome of the per-sample checks of one sample (what a worker sends back)."""

    id: str
    status: str = "ok"
    split: str = "train"
    findings: list[Finding] = Field(default_factory=list)
    metrics: dict[str, Optional[float]] = Field(default_factory=dict)
    ran: list[str] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict, description="check id -> why it could not run")
    video_sha1: Optional[str] = None
    seconds: float = 0.0


class CheckSummary(BaseModel):
    id: str
    severity: Severity
    scope: str
    catches: str
    outcome: Literal["passed", "failed", "warned", "skipped", "off"]
    ran: int = Field(0, description="samples (or 1 for dataset checks) the check ran on")
    skipped: int = 0
    findings: int = 0
    skip_reason: Optional[str] = None


class SampleSummary(BaseModel):
    id: str
    status: str
    split: str
    passed: bool
    errors: int
    warnings: int
    metrics: dict[str, Optional[float]]


class Summary(BaseModel):
    samples_total: int = 0
    samples_checked: int = 0
    samples_passed: int = 0
    errors: int = 0
    warnings: int = 0
    infos: int = 0


class ValidationReport(BaseModel):
    """Everything `fwdata validate` found; rendered as a table, JSON or JUnit XML by fwdata.validate.report."""

    tool_version: str = __version__
    dataset: str
    gates: str
    started: str
    duration_s: float = 0.0
    exit_code: int = 0
    passed: bool = True
    summary: Summary = Field(default_factory=Summary)
    checks: list[CheckSummary] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)
    samples: list[SampleSummary] = Field(default_factory=list)


class ValidateOptions(BaseModel):
    """Options of `fwdata validate` (the command parses its flags into this)."""

    model_config = ConfigDict(extra="forbid")

    dataset: Path
    gates: Optional[Path] = Field(None, description="gate TOML file or packaged name (strict); None = built-in defaults")
    workers: int = Field(1, ge=0, le=256, description="processes checking samples in parallel; 0 = in this process "
                                                         "(no isolation from decoder crashes)")
    samples: list[str] = Field(default_factory=list, description="check only these sample ids (dataset gates skipped)")
    allow_random_init: bool = Field(False, description="accept data made with randomly initialised models (tests, "
                                                       "demos) as the gate file's dataset.allow_random_init_models "
                                                       "= true does: flagged as a warning, not an error")


class UsageError(ValueError):
    """Bad options: missing dataset folder, unreadable gate file, unknown sample id or check id (exit 2)."""
