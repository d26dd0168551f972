"""Rendering a ValidationReport: a rich table with a summary line, JSON, or JUnit XML for CI.

- table: one row per check that found something (or every check with ``verbose``), then the
  findings (the first ``max_findings``), then one summary line: PASS/FAIL, counts, exit code.
- json: the whole `ValidationReport` (every finding, every check, per-sample metrics).
- junit: one ``<testcase>`` per check id (classname = its family); a check with error findings is
  a ``<failure>`` listing them, a check that could not run is ``<skipped>``, warnings go to
  ``<system-out>``. CI systems then show each failed check as a failed test.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from enum import Enum
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from fwdata.dataset.store import is_inside
from fwdata.textout import paragraph, plural
from fwdata.validate import Severity, UsageError, ValidateOptions, ValidationReport, check_path_option, validate_dataset


class ReportFormat(str, Enum):
    table = "table"
    json = "json"
    junit = "junit"


_STYLE = {"failed": "bold red", "warned": "yellow", "passed": "green", "skipped": "dim", "off": "dim"}
_SEV_STYLE = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "dim"}


def summary_line(report: ValidationReport) -> str:
    s = report.summary
    verdict = "PASS" if report.exit_code == 0 else ("UNREADABLE" if report.exit_code == 2 else "FAIL")
    failed = sum(c.outcome == "failed" for c in report.checks)
    ran = sum(c.outcome != "skipped" and c.outcome != "off" for c in report.checks)
    return (f"{verdict}: {plural(s.errors, 'error')}, {plural(s.warnings, 'warning')}; {failed} of "
            f"{plural(ran, 'check')} failed; {s.samples_passed}/{plural(s.samples_checked, 'sample')} pass "
            f"(of {s.samples_total}); gates {report.gates}; "
            f"{report.duration_s:.1f} s; exit {report.exit_code}")


def render_table(report: ValidationReport, console: Console, verbose: bool = False, max_findings: int = 40) -> None:
    """Print the checks, the findings and the summary line."""
    console.print(f"[bold]fwdata validate[/] {report.dataset}  (gates: {report.gates})", highlight=False)
    families = Table(title="checks by family", title_justify="left")
    outcomes = ("passed", "failed", "warned", "skipped", "off")
    for col in ("family",) + outcomes:
        families.add_column(col, justify="left" if col == "family" else "right")
    per_family: dict[str, dict[str, int]] = {}
    for c in report.checks:
        per_family.setdefault(c.id.split(".", 1)[0], dict.fromkeys(outcomes, 0))[c.outcome] += 1
    for fam, n in per_family.items():
        families.add_row(fam, *[f"[{_STYLE[o]}]{n[o]}[/]" if n[o] and o in ("failed", "warned") else str(n[o])
                                for o in outcomes])
    console.print(families)
    table = Table(title="checks with findings" if not verbose else "checks", title_justify="left", show_lines=False)
    for col in ("check", "severity", "outcome", "ran", "findings") + (("note",) if verbose else ()):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        if not verbose and c.outcome in ("passed", "skipped", "off"):
            continue
        table.add_row(c.id, c.severity.value, f"[{_STYLE[c.outcome]}]{c.outcome}[/]", str(c.ran), str(c.findings),
                      *((c.skip_reason or "",) if verbose else ()))
    if table.row_count:
        console.print(table)
    if report.findings:
        order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
        shown = sorted(report.findings, key=lambda f: order[f.severity])[:max_findings]
        if console.width >= WIDE_FINDINGS:
            ft = Table(title="findings", title_justify="left")
            for col in ("severity", "check", "where", "message"):
                ft.add_column(col, overflow="fold")
            for f in shown:
                ft.add_row(f"[{_SEV_STYLE[f.severity]}]{f.severity.value}[/]", f.check, _where(f), f.message)
            console.print(ft)
        else:  # a narrow terminal: one paragraph per finding, continuation lines indented
            console.print("findings", style="italic", highlight=False)
            for f in shown:
                console.print(_finding_paragraph(f, console.width), highlight=False, soft_wrap=True)
        if len(report.findings) > max_findings:
            console.print(f"... and {len(report.findings) - max_findings} more findings (use --format json)")
    style = "bold green" if report.exit_code == 0 else "bold red"
    console.print(f"[{style}]{summary_line(report)}[/]", highlight=False)


def to_json(report: ValidationReport) -> str:
    return report.model_dump_json(indent=2) + "\n"


def to_junit(report: ValidationReport) -> str:
    """JUnit XML: a testsuite per check family, a testcase per check id."""
    by_check: dict[str, list] = {}
    for f in report.findings:
        by_check.setdefault(f.check, []).append(f)
    root = ET.Element("testsuites", name="fwdata validate", time=f"{report.duration_s:.3f}")
    suites: dict[str, ET.Element] = {}
    counts: dict[str, dict[str, int]] = {}
    for c in report.checks:
        family = c.id.split(".", 1)[0]
        if family not in suites:
            suites[family] = ET.SubElement(root, "testsuite", name=f"fwdata.validate.{family}")
            counts[family] = {"tests": 0, "failures": 0, "skipped": 0}
        n = counts[family]
        n["tests"] += 1
        tc = ET.SubElement(suites[family], "testcase", classname=f"fwdata.validate.{family}", name=c.id, time="0")
        fs = by_check.get(c.id, [])
        errors = [f for f in fs if f.severity == Severity.ERROR]
        others = [f for f in fs if f.severity != Severity.ERROR]
        if errors:
            n["failures"] += 1
            fail = ET.SubElement(tc, "failure", type=c.id,
                                 message=f"{len(errors)} finding(s): {_one_line(errors[0])}"[:500])
            fail.text = "\n".join(_one_line(f) for f in errors)
        elif c.outcome in ("skipped", "off"):
            n["skipped"] += 1
            ET.SubElement(tc, "skipped", message=c.skip_reason or c.outcome)
        if others:
            ET.SubElement(tc, "system-out").text = "\n".join(f"[{f.severity.value}] {_one_line(f)}" for f in others)
        props = ET.SubElement(tc, "properties")
        ET.SubElement(props, "property", name="catches", value=c.catches)
        ET.SubElement(props, "property", name="severity", value=c.severity.value)
    total = {"tests": 0, "failures": 0, "skipped": 0}
    for family, el in suites.items():
        for k, v in counts[family].items():
            el.set(k, str(v))
            total[k] += v
        el.set("errors", "0")
    for k, v in total.items():
        root.set(k, str(v))
    root.set("errors", "0")
    out = ET.SubElement(root, "system-out")
    out.text = summary_line(report)
    ET.indent(root)
    text = ET.tostring(root, encoding="unicode")
    # characters XML 1.0 cannot hold (a NUL in a key of metadata.json, say) are written escaped
    text = _NOT_XML.sub(lambda m: ascii(m.group())[1:-1], text)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + text + "\n"


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


#: terminals at least this wide show the findings as a table; narrower ones one paragraph each
WIDE_FINDINGS = 120


def _finding_paragraph(f, width: int):
    """`severity check: where: message` wrapped to `width` (the place left out when the message names it)."""
    from rich.text import Text

    where = " ".join(x for x in (f.sample, f.file) if x and x not in f.message)
    body = f"{f.severity.value} {f.check}: " + (f"{where}: " if where else "") + f.message
    text = Text(paragraph(body, width))
    text.stylize(_SEV_STYLE[f.severity], 0, len(f.severity.value))
    return text


def _where(f) -> str:
    """The file (which names the sample), or sample and file when the file does not name it."""
    if f.file and f.sample and f.sample in f.file:
        return f.file
    return "\n".join(x for x in (f.sample, f.file) if x)


def _one_line(f) -> str:
    where = " ".join(x for x in (f.sample, f.file) if x)
    return f"{where + ': ' if where else ''}{f.message}"


def render(report: ValidationReport, fmt: ReportFormat) -> str:
    """The report as text in `fmt` (table -> plain text of the rich rendering)."""
    if fmt == ReportFormat.json:
        return to_json(report)
    if fmt == ReportFormat.junit:
        return to_junit(report)
    console = Console(record=True, width=160, file=io.StringIO(), color_system=None)
    render_table(report, console, verbose=True)
    return console.export_text()


def validate_and_report(opts: ValidateOptions, fmt: ReportFormat = ReportFormat.table, output: Optional[Path] = None,
                        quiet: bool = False, console: Optional[Console] = None, html: Optional[Path] = None) -> int:
    """What `fwdata validate` does: validate with progress, print or write the report; returns the exit code.

    Without `output` the report in `fmt` goes to stdout. With `output` it is written to that file
    instead, and stdout gets one line: the summary line and where the report is (with `quiet`, the
    summary line only on failure). With `html`, also the picture report of `fwdata report` (fwdata.report,
    without a truth) into that folder, made from this validation. Raises fwdata.validate.UsageError for bad options.
    """
    console = console or Console()
    err = Console(stderr=True)
    if output is not None:
        check_path_option("--output", output)
        check_path_option("dataset folder", opts.dataset)
        if is_inside(output, opts.dataset):
            raise UsageError(f"--output {output} is inside the dataset; validation never writes into it")
    if html is not None:
        from fwdata.report import ReportError, check_out

        try:
            check_out(html, opts.dataset)
        except ReportError as e:
            raise UsageError(str(e).replace("--out ", "--html ", 1)) from None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("validating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.description}"), console=err, disable=quiet, transient=True) as progress:
        task = progress.add_task("", total=None)

        def on_sample(sample_id: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, description=sample_id)

        report = validate_dataset(opts, progress=on_sample)
    if html is not None and report.exit_code != 2:  # an unreadable dataset has nothing to draw
        from fwdata.report import ReportError, ReportOptions, write_report

        try:
            page = write_report(ReportOptions(dataset=opts.dataset, out=html, samples=list(opts.samples)),
                                validation=report).index
        except ReportError as e:
            raise UsageError(str(e)) from None
        if not quiet:
            err.print(f"picture report in {page}", highlight=False, soft_wrap=True)
    if output is not None:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(render(report, fmt))
        except OSError as e:
            raise UsageError(f"--output {output}: cannot write the report ({e.strerror or e})") from None
        if not quiet:
            console.print(f"{summary_line(report)}; report in {output}", highlight=False, soft_wrap=True)
        elif report.exit_code:
            console.print(summary_line(report), highlight=False, soft_wrap=True)
    elif fmt == ReportFormat.table:
        if quiet:
            console.print(summary_line(report), highlight=False, soft_wrap=True)
        else:
            render_table(report, console)
    else:
        console.file.write(render(report, fmt))
        console.file.flush()
    return report.exit_code
