"""`fwdata report`: a dataset as pictures. One self-contained HTML page and a PNG contact sheet per sample.

(Not to be confused with `fwdata.validate.report`, the text / JSON / JUnit output of `fwdata validate`.)

`write_report(ReportOptions(dataset=..., out=...))` writes

```
out/index.html            the page: dataset summary, quality metrics, validate (and compare) findings,
                          build failures with their reasons, per sample its contact sheet and an
                          interactive 3-D camera path (plotly.js inlined: works offline; a generated
                          sample with requested_cameras/<id>.json: requested and predicted, with frusta)
out/samples/<id>.png      the contact sheet of each sample (fwdata.report.sheet)
out/samples/<id>.json     where each panel of the sheet is, and the depth colour map's range
```

Everything is read through the dataset readers (`fwdata.dataset`), validated with
`fwdata.validate.validate_dataset` (read-only) and, with a truth, compared and aligned by
`fwdata.compare`. The dataset is never written to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from fwdata.dataset.contract import METADATA_FILE, ContractError, DatasetMetadata, load_metadata
from fwdata.dataset.store import is_inside

__all__ = ["ReportError", "ReportOptions", "ReportResult", "write_report"]


class ReportError(ValueError):
    """Bad input (not a dataset, --out is a file or inside the dataset, unknown sample): exit 2."""


@dataclass
class ReportOptions:
    dataset: Path
    out: Path = Path("report")
    truth: Optional[Path] = None
    samples: list[str] = field(default_factory=list)  # whole ids or unique prefixes; empty: every sample
    gates: Optional[Path] = None  # gate file for the validation (None: built-in defaults)
    workers: int = 1  # validation worker processes (0: in this process)


@dataclass
class ReportResult:
    index: Path
    sheets: list[Path]
    validation_exit_code: int


def _load(path: Path, what: str) -> DatasetMetadata:
    from fwdata.dataset.layout import MARKER_DIR

    if not path.is_dir():
        raise ReportError(f"{what} {path} is not a folder")
    if not (path / METADATA_FILE).exists() and (path / MARKER_DIR).is_dir():
        raise ReportError(f"{what} {path} is an unfinished build (no {METADATA_FILE} yet): run the same "
                          f"`fwdata build ... --out {path}` command again to finish it")
    try:
        return load_metadata(path)
    except ContractError as e:
        raise ReportError(f"{what} {path} is not a readable dataset: {e}") from None


def check_out(out: Path, dataset: Path) -> None:
    """ReportError when `out` is a file, or the dataset or a folder inside it."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder for the report")
    if is_inside(out, dataset):
        raise ReportError(f"--out {out} is inside the dataset; the report never writes into it")


def write_report(opts: ReportOptions, validation=None,
                 progress: Optional[Callable[[str], None]] = None) -> ReportResult:
    """Write the report of `opts.dataset` into `opts.out` (see the module docstring).

    `validation`: a `ValidationReport` already made for this dataset (as `fwdata validate --html`
    has one); otherwise the dataset is validated here. `progress(sample_id)` after each sheet.
    Raises ReportError for bad input.
    """
    from fwdata.report.page import build_page

    dataset = Path(opts.dataset)
    meta = _load(dataset, "dataset")
    check_out(Path(opts.out), dataset)
    truth_meta = _load(Path(opts.truth), "--truth") if opts.truth is not None else None
    samples: list[str] = []
    if opts.samples:  # whole ids, or unique prefixes such as the short ids `fwdata info` prints
        from fwdata.textout import SampleIdError, resolve_sample_ids

        try:
            samples = resolve_sample_ids(opts.samples, [s.id for s in meta.samples])
        except SampleIdError as e:
            raise ReportError(f"--sample: {e}") from None
    if validation is None:
        from fwdata.validate import UsageError, ValidateOptions, validate_dataset

        try:
            validation = validate_dataset(ValidateOptions(dataset=dataset, gates=opts.gates, workers=opts.workers,
                                                          samples=samples))
        except UsageError as e:
            raise ReportError(str(e)) from None
    comparison = None
    if truth_meta is not None:
        from fwdata.compare import CompareError, compare_datasets

        try:
            comparison = compare_datasets(dataset, Path(opts.truth))
        except CompareError as e:
            raise ReportError(str(e)) from None
    out = Path(opts.out)
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    index, sheets = build_page(dataset, meta, out, validation, samples=samples or None,
                               truth=Path(opts.truth) if opts.truth else None, truth_meta=truth_meta,
                               comparison=comparison, progress=progress)
    return ReportResult(index=index, sheets=sheets, validation_exit_code=validation.exit_code)
