"""`fwmodel` command line: environment check, model verification, training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fwdata import __version__
from fwdata.cli_common import version_callback
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
