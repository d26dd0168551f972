"""`fwmodel` command line: environment check, model verification, training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fwdata import __version__
from fwdata.cli_common import fail, version_callback
from fwdata.doctor import DoctorOptions, run_doctor

app = typer.Typer(
    name="fwmodel",
    help="The FantasyWorld model: verify the two-stage configuration, train Stage 1 and Stage 2.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """The FantasyWorld model and its two-stage trainer."""


@app.command()
def doctor(
    output: Path = typer.Option(Path("outputs"), help="Where checkpoints and logs will be written."),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="Wan2.1 weights: a local diffusers-format directory or a single file."
    ),
    need_gpu: bool = typer.Option(False, "--need-gpu", help="Treat a missing GPU as a problem."),
    min_free_gb: float = typer.Option(50.0, help="Free disk required at OUTPUT, in GB."),
) -> None:
    """Check torch, GPUs, disk space, key packages and model weights for training.

    Exits 1 with one line per problem when something required is missing.
    """
    opts = DoctorOptions(
        path=output, required_free_bytes=int(min_free_gb * 1e9), need_gpu=need_gpu, weights=weights, purpose="train"
    )
    raise typer.Exit(run_doctor(opts))


@app.command()
def verify(
    preset: str = typer.Option(
        "wan2.1-t2v-1.3b", "--preset", help="Model preset: tiny, wan2.1-t2v-1.3b or wan2.1-i2v-14b."
    ),
    stage: int = typer.Option(1, "--stage", help="Training stage whose trainable flags to show: 1 or 2."),
    format: str = typer.Option("table", "--format", help="Output format: table or json."),
) -> None:
    """Verify the two-stage configuration: parameters per module, trainable or frozen, and totals.

    Builds the model on the meta device (no weights, no memory; seconds even for 14B).
    """
    from fwmodel.config import PRESET_NAMES
    from fwmodel.params import parameter_report, render_table

    if preset not in PRESET_NAMES:
        fail(f"unknown preset {preset!r}; choose one of: {', '.join(PRESET_NAMES)}")
    if stage not in (1, 2):
        fail(f"--stage must be 1 or 2, got {stage}")
    if format not in ("table", "json"):
        fail(f"--format must be table or json, got {format!r}")
    report = parameter_report(preset, stage)
    if format == "json":
        typer.echo(report.model_dump_json(indent=2))
    else:
        from rich.console import Console

        Console().print(render_table(report))
