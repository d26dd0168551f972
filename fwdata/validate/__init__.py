"""`fwdata validate`: schema, integrity and cross-consistency checks of a dataset, plus quality gates.

Every check has a stable id (``schema.*``, ``integrity.*``, ``cross.*``, ``gate.*``), a severity
and a one-line description in `REGISTRY` (docs/VALIDATE.md lists them). A check produces
`Finding`s that name the check, the sample and the file. Severities:

- ``error``: the data breaks the contract or fails a dataset gate; the run fails (exit 1).
- ``warning``: suspicious, or a per-sample quality gate failed. A sample with a failed sample gate
  does not *pass*; whether that fails the run is decided by the dataset gates (`gate.pass_fraction`,
  `gate.min_samples`).
- ``info``: recorded for the report only.

Gate files can override any check's severity (or turn it ``off``).

Validation never writes to the dataset: files are opened read-only and nothing is created. Samples
are checked one at a time per worker (``workers`` processes), so peak memory is set by the largest
sample, not by the dataset. Damaged files (npz, mp4, json, txt, ply) become findings, never crashes.

A shard folder of `fwdata shard` (holding shards.json) gets the same per-sample checks and gates on
samples streamed from its tars, plus the `shards.*` checks: `fwdata.validate.shards`.
"""

from __future__ import annotations

import errno
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from fwdata.dataset.contract import METADATA_FILE, SampleRecord
from fwdata.runtime import WorkerDied, run_in_processes
from fwdata.validate import gates
from fwdata.validate import shards as _shards
from fwdata.validate.metadata import check_metadata, check_tree, shown_path
from fwdata.validate.registry import INTERNAL_IDS, REGISTRY, CheckTally, Severity, declared, emits
from fwdata.validate.results import (
    CheckSummary,
    Finding,
    SampleResult,
    SampleSummary,
    Summary,
    UsageError,
    ValidateOptions,
    ValidationReport,
)
from fwdata.validate.sample import CRASH_TEST_ENV, _check_sample_task, check_sample

__all__ = ["REGISTRY", "CRASH_TEST_ENV", "Finding", "SampleResult", "Severity", "UsageError", "ValidateOptions",
           "ValidationReport", "check_sample", "validate_dataset"]


def _iter_results(root: Path, records: list[SampleRecord], tol: gates.Tolerances, workers: int) -> Iterator[SampleResult]:
    """Per-sample results in record order.

    workers == 0: in this process. workers >= 1: that many spawned processes (fwdata.runtime: a
    bounded window, crash isolation) with single-threaded BLAS (the checks only do tiny matrix
    products; threaded BLAS on a busy machine makes them tens of times slower).
    """
    if workers == 0 or not records:
        for rec in records:
            yield check_sample(root, rec, tol)
        return
    tol_d = tol.model_dump()
    tasks = [(str(root), rec.model_dump_json(), tol_d) for rec in records]
    for (_, rec_json, _), res, err in run_in_processes(_check_sample_task, tasks, workers, threads=1, ordered=True):
        yield res if err is None else _crash_result(SampleRecord.model_validate_json(rec_json), err)


def _crash_result(rec: SampleRecord, err: BaseException) -> SampleResult:
    """The result of a sample whose worker died or whose checks raised."""
    res = SampleResult(id=rec.id, status=rec.status, split=rec.split)
    if isinstance(err, WorkerDied):
        res.findings.append(Finding(check="internal.worker_crashed", severity=Severity.ERROR, sample=rec.id,
                                    message="the worker process checking this sample died (a decoder crash on "
                                            "a damaged file?)"))
    else:
        res.findings.append(Finding(check="internal.check_crashed", severity=Severity.ERROR, sample=rec.id,
                                    message=f"checking the sample raised {type(err).__name__}: {err}"))
    return res


def check_path_option(what: str, path: Union[str, Path]) -> None:
    """UsageError (one line) for a path option that no system call can take: a NUL byte, too long."""
    text = str(path)
    if "\x00" in text:
        raise UsageError(f"{what} {shown_path(text)}: the path contains a NUL byte")
    try:
        os.stat(text)
    except FileNotFoundError:
        pass  # the caller says what is missing
    except OSError as e:
        if e.errno in (errno.ENAMETOOLONG, errno.ELOOP):
            raise UsageError(f"{what} {shown_path(text)}: {e.strerror}") from None
    except ValueError as e:  # e.g. unencodable characters
        raise UsageError(f"{what} {shown_path(text)}: {e}") from None


def _apply_severity(findings: list[Finding], overrides: dict[str, str]) -> list[Finding]:
    out = []
    for f in findings:
        sev = overrides.get(f.check)
        if sev == "off":
            continue
        if sev is not None:
            f = f.model_copy(update={"severity": Severity(sev)})
        out.append(f)
    return out


def _check_overrides(config: gates.GateConfig) -> None:
    unknown = sorted(set(config.severity) - set(REGISTRY))
    if unknown:
        raise UsageError(f"gate file {config.name!r}: unknown check ids in [severity]: {unknown}")


def _resolve_gates(opts: ValidateOptions, config: Optional[gates.GateConfig]) -> tuple[gates.GateConfig, str]:
    """The gate config (`config`, or loaded from `opts.gates`) with --allow-random-init applied, and its name
    for the report. Raises UsageError."""
    if opts.gates is not None:
        check_path_option("gate file", opts.gates)
    if config is None:
        try:
            config = gates.load_gates(opts.gates)
        except gates.GateError as e:
            raise UsageError(str(e)) from None
    _check_overrides(config)
    gates_name = str(opts.gates) if opts.gates else f"{config.name} (built-in)"
    if opts.allow_random_init and not config.dataset.allow_random_init_models:
        config = config.model_copy(update={"dataset": config.dataset.model_copy(
            update={"allow_random_init_models": True})})
        gates_name += " with --allow-random-init"
    return config, gates_name


def validate_dataset(opts: ValidateOptions, progress: Optional[Callable[[str, int, int], None]] = None,
                     config: Optional[gates.GateConfig] = None) -> ValidationReport:
    """Validate the dataset at `opts.dataset` against the gate file `opts.gates` (or `config`).

    Raises UsageError for bad options (missing dataset folder, bad gate file, unknown sample id).
    A dataset that cannot be read at all (no or invalid metadata.json, unknown schema version)
    gives a report with exit_code 2; any error finding gives exit_code 1; otherwise 0.
    `progress(sample_id, done, total)` is called after each sample.
    """
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    root = Path(opts.dataset)
    check_path_option("dataset folder", root)
    if not root.is_dir():
        raise UsageError(f"dataset folder {root} does not exist")
    config, gates_name = _resolve_gates(opts, config)
    if _shards.is_shard_folder(root):  # a folder of WebDataset shards (`fwdata shard`): fwdata.validate.shards
        return _shards.validate_shards(opts, config, gates_name, progress, started, t0)
    overrides = dict(config.severity)
    report = ValidationReport(dataset=str(root), gates=gates_name, started=started)
    tally = CheckTally()

    meta_res = check_metadata(root, tally)
    dataset_findings = list(meta_res.findings)
    if meta_res.fatal:
        return _finish(report, dataset_findings, [], tally, overrides, fatal=True, t0=t0)
    escapes = {x.file for x in dataset_findings if x.check == "schema.path_escape" and x.file}
    dataset_findings += tally.run(check_tree, root, meta_res.raw_samples, escapes)

    records = meta_res.records
    subset = bool(opts.samples)
    if subset:
        from fwdata.textout import SampleIdError, resolve_sample_ids

        try:  # whole ids, or unique prefixes such as the short ids `fwdata info` prints
            wanted = set(resolve_sample_ids(opts.samples, [r.id for r in records]))
        except SampleIdError as e:
            raise UsageError(str(e)) from None
        records = [r for r in records if r.id in wanted]

    # per sample only a summary, its findings and the facts the dataset gates need are kept
    summaries: list[SampleSummary] = []
    sample_findings: list[Finding] = []
    facts: list[gates.SampleFacts] = []
    for n, res in enumerate(_iter_results(root, records, config.tolerances, opts.workers), start=1):
        rec = records[n - 1]
        _add_sample_result(res, rec, config, overrides, tally, summaries, sample_findings, facts)
        if progress:
            progress(res.id, n, len(records))

    random_models = _random_models(meta_res.meta.provenance) if meta_res.meta is not None else []
    dataset_findings += _dataset_level(facts, random_models, config, subset, tally)
    report.summary.samples_total = len(meta_res.raw_samples)
    return _finish(report, _apply_severity(dataset_findings, overrides) + sample_findings, summaries, tally,
                   overrides, fatal=False, t0=t0)


def _add_sample_result(res: SampleResult, rec: SampleRecord, config: gates.GateConfig, overrides: dict[str, str],
                       tally: CheckTally, summaries: list[SampleSummary], sample_findings: list[Finding],
                       facts: list[gates.SampleFacts]) -> None:
    """Fold one sample's result into the report: its gate findings, severities, counts, summary and the
    facts the dataset gates need (the one implementation for dataset folders and shard folders)."""
    res.findings += _sample_gate_findings(res, rec, config)
    res.findings = _apply_severity(res.findings, overrides)
    tally.add_ran(res.ran + [gates.sample_gate_id(m) for m in config.sample] + sorted(INTERNAL_IDS))
    for cid, why in res.skipped.items():
        tally.add_skipped(cid, why)
    passed = not any(f.severity == Severity.ERROR or (f.check.startswith("gate.") and f.severity != Severity.INFO)
                     for f in res.findings)
    summaries.append(SampleSummary(id=res.id, status=res.status, split=res.split, passed=passed,
                                   errors=sum(f.severity == Severity.ERROR for f in res.findings),
                                   warnings=sum(f.severity == Severity.WARNING for f in res.findings),
                                   metrics=res.metrics))
    sample_findings.extend(res.findings)
    facts.append(gates.SampleFacts(id=res.id, split=res.split, status=res.status, source=rec.source.path,
                                   start_frame=rec.source.start_frame, stride=rec.source.stride,
                                   num_frames=rec.num_frames, passed=passed, video_sha1=res.video_sha1))


def _random_models(provenance) -> list[str]:
    """The randomly initialised models a dataset's `Provenance` names, as the random-init gate words them."""
    return [f"{m.role} model {m.name!r}" for m in provenance.models if m.random_init]


def _dataset_level(facts: list[gates.SampleFacts], random_models: list[str], config: gates.GateConfig, subset: bool,
                   tally: CheckTally) -> list[Finding]:
    """The dataset gates' findings (only the random-init gate for a subset of samples)."""
    for m in gates.METRICS:
        if m not in config.sample:
            tally.skipped[gates.sample_gate_id(m)] = (0, "no threshold in the gate file")
    if not subset:
        return tally.run(_dataset_gates, facts, random_models, config)
    for cid in _dataset_gates.check_ids:
        if cid != "gate.random_init_model":
            tally.add_skipped(cid, "dataset gates need the whole dataset (--sample given)")
    return tally.run(_random_init_gate, random_models, config.dataset.allow_random_init_models)


def _sample_gate_findings(res: SampleResult, rec: SampleRecord, config: gates.GateConfig) -> list[Finding]:
    """Findings of the per-sample quality gates (`gate.<metric>`) on one sample's metrics."""
    out = []
    for g in gates.evaluate_sample(res.id, res.metrics, config):
        sev = Severity(g.severity) if g.severity else REGISTRY[g.check].severity
        if res.status == "gated_out":
            sev = Severity.INFO  # already excluded from training by the build
        metric = gates.METRICS[g.check.split(".", 1)[1]]
        out.append(Finding(check=g.check, severity=sev, message=g.message, sample=res.id,
                           file=getattr(rec.paths, metric.file, None) or METADATA_FILE, value=g.value))
    return out


@emits("gate.min_samples", "gate.pass_fraction", "gate.duplicate_clips", "gate.split_sizes",
       "gate.random_init_model", "gate.split_leakage")
def _dataset_gates(facts: list[gates.SampleFacts], random_models: list[str],
                   config: gates.GateConfig) -> list[Finding]:
    """The dataset-level gates (fwdata.validate.gates) as findings."""
    out = []
    for g in gates.evaluate_dataset(facts, random_models, config):
        sev = Severity(g.severity) if g.severity else declared(g.check).severity
        out.append(Finding(check=g.check, severity=sev, message=g.message, sample=g.sample, file=METADATA_FILE,
                           value=g.value))
    return out


@emits("gate.random_init_model")
def _random_init_gate(random_models: list[str], allowed: bool = False) -> list[Finding]:
    """The one dataset gate that also applies to a subset of samples: data made by a random-init model
    (a warning when the gates allow it)."""
    severity = Severity.WARNING if allowed else declared("gate.random_init_model").severity
    return [Finding(check="gate.random_init_model", severity=severity,
                    message=f"made with the randomly initialised {name}", file=METADATA_FILE)
            for name in random_models]


def _finish(report: ValidationReport, findings: list[Finding], summaries: list[SampleSummary],
            tally: CheckTally, overrides: dict[str, str], fatal: bool, t0: float) -> ValidationReport:
    ran, skipped = tally.ran, tally.skipped
    per_check: dict[str, list[Finding]] = {}
    for f in findings:
        per_check.setdefault(f.check, []).append(f)
    checks = []
    for cid, c in REGISTRY.items():
        sev = overrides.get(cid, c.severity.value)
        fs = per_check.get(cid, [])
        n_run = ran.get(cid, 0) or (1 if fs else 0)
        n_skip, why = skipped.get(cid, (0, None))
        if sev == "off":
            outcome = "off"
        elif any(f.severity == Severity.ERROR for f in fs):
            outcome = "failed"
        elif any(f.severity == Severity.WARNING for f in fs):
            outcome = "warned"
        elif n_run:
            outcome = "passed"
        else:
            outcome = "skipped"
            why = why or ("the dataset could not be read" if fatal else "not applicable to this dataset")
        checks.append(CheckSummary(id=cid, severity=Severity(sev) if sev != "off" else c.severity, scope=c.scope,
                                   catches=c.catches, outcome=outcome, ran=n_run, skipped=n_skip, findings=len(fs),
                                   skip_reason=why if outcome == "skipped" or n_skip else None))
    report.checks = checks
    report.findings = findings
    report.samples = summaries
    s = report.summary
    s.samples_checked = len(summaries)
    s.samples_passed = sum(r.passed for r in summaries)
    s.errors = sum(f.severity == Severity.ERROR for f in findings)
    s.warnings = sum(f.severity == Severity.WARNING for f in findings)
    s.infos = sum(f.severity == Severity.INFO for f in findings)
    report.exit_code = 2 if fatal else (1 if s.errors else 0)
    report.passed = report.exit_code == 0
    report.duration_s = round(time.perf_counter() - t0, 3)
    return report
