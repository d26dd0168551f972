"""What a training run reports: `RunLogger` (train.log + console on rank 0, metrics.jsonl and
TensorBoard for the scalars) and `peak_memory_gib` (the mem/peak_gib scalar, also `fwmodel bench`'s).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from fwmodel.train.distributed import Dist
from fwmodel.memory import GIB


class RunLogger:
    """train.log + console on rank 0; metrics.jsonl and TensorBoard for the scalars.

    Messages before `open(output)` (config, data, preflight: before anything is written) are kept
    and written to train.log when the output folder is opened.
    """

    def __init__(self, dist_: Dist, quiet: bool, echo: Callable[[str], None],
                 echo_err: Optional[Callable[[str], None]] = None):
        self.dist, self.quiet, self.echo = dist_, quiet, echo
        self.echo_err = echo_err or (lambda m: print(m, file=sys.stderr, flush=True))
        self.file = None
        self.tb = None
        self.metrics = None
        self.pending: list[str] = []

    def open(self, output: Path, resume_step: Optional[int] = None) -> None:
        if not self.dist.is_main:
            return
        output.mkdir(parents=True, exist_ok=True)
        self.file = open(output / "train.log", "a", buffering=1)
        for line in self.pending:
            self.file.write(line + "\n")
        self.pending = []
        metrics_path = output / "metrics.jsonl"
        if resume_step is not None and metrics_path.is_file():  # drop what a killed run logged after its state
            kept = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            metrics_path.write_text("".join(k + "\n" for k in kept))
        self.metrics = open(metrics_path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        except Exception as err:  # tensorboard missing or broken: keep training, say so
            self.info(f"TensorBoard disabled ({err})")

    def info(self, message: str, console: bool = True) -> None:
        if not self.dist.is_main:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = [f"{stamp} {line}" for line in (message.splitlines() or [""])]
        if self.file:
            for line in lines:
                self.file.write(line + "\n")
        else:
            self.pending += lines
        if console and not self.quiet:
            self.echo(message)

    def summary(self, message: str) -> None:
        """Into train.log and onto the console, also with --quiet: the run's last line."""
        if not self.dist.is_main:
            return
        self.info(message, console=False)
        self.echo(message)

    def warn(self, message: str) -> None:
        """Into train.log and onto stderr, also with --quiet: what the user must not miss."""
        if not self.dist.is_main:
            return
        self.info(message, console=False)
        self.echo_err(message)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        if self.metrics:
            self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        for handle in (self.file, self.metrics):
            if handle:
                handle.close()
        if self.tb:
            self.tb.close()


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process in GiB: torch.cuda.max_memory_allocated on a GPU, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB
