"""Elapsed time and ETA for `fwmodel train` (steps) and `fwmodel cache` (samples), as `fwdata build` shows them.

The loop only calls `start(done)`, `update(done)` and `close()`; how the progress looks is decided
here, once, by the mode (see `choose_mode`):

    bar     stdout is a terminal: a rich progress bar (same columns as the build: done/total,
            elapsed, eta), redrawn in place; lines printed meanwhile appear above it
    lines   stdout is a file or a pipe (CI logs, `> log`): no carriage returns, a plain line at the
            first update, then whenever another 5 % of the total is done or 5 minutes have passed,
            and at the end, e.g. `stage 1: step 30/600 (5%) | elapsed 0:00:19 | eta 0:06:01 | 0.63 s/step`
    off     `--quiet`: nothing here; the command prints one summary line at the end (`summary()`)
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Literal, Optional, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

Mode = Literal["bar", "lines", "off"]
LINE_FRACTION = 0.05   # lines mode: a line per 5 % of the total ...
LINE_SECONDS = 300.0   # ... or per 5 minutes, whichever comes first


def choose_mode(quiet: bool, stream: Optional[TextIO] = None) -> Mode:
    """`off` with --quiet, `bar` on a terminal, `lines` otherwise (never carriage returns in a log file)."""
    if quiet:
        return "off"
    stream = sys.stdout if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or fake stream
        return "lines"


def format_duration(seconds: float) -> str:
    """H:MM:SS, as rich's elapsed and remaining columns write it; `-:--:--` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StepProgress:
    """Progress of a loop of `total` units (`unit`: "step", "sample"), labelled `label` ("stage 1")."""

    def __init__(self, label: str, total: int, unit: str = "step", mode: Mode = "lines",
                 echo: Callable[[str], None] = print, console: Optional[Console] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit, self.mode = label, max(int(total), 0), unit, mode
        self.echo, self.console, self.clock = echo, console, clock
        self.t0: Optional[float] = None
        self.first = self.done = 0
        self._last_line: Optional[tuple[int, float]] = None  # (done, time) of the last plain line
        self._bar: Optional[Progress] = None
        self._task = None

    # ------------------------------------------------------------------ the loop's three calls

    def start(self, done: int = 0, total: Optional[int] = None) -> None:
        """The loop begins with `done` units already finished (a resumed run); `total` if only known now."""
        if total is not None:
            self.total = max(int(total), 0)
        self.t0, self.first = self.clock(), done
        self.done = done
        if self.mode == "bar" and self.total:
            self._bar = Progress(SpinnerColumn(), TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(f"{self.unit}s"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=self.console or Console(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=done)

    def update(self, done: int) -> None:
        """`done` units are finished."""
        if self.t0 is None:
            self.start(0)
        self.done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
        elif self.mode == "lines" and self._line_due():
            self._last_line = (done, self.clock())
            self.echo(self.line())

    def close(self) -> None:
        """Stop the bar (also on errors and Ctrl-C: the terminal is left clean)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def item_callback(self) -> Callable[[str, int, int], None]:
        """A `progress(item, n, total)` callback (fwmodel.cache.build_cache): n = 0 starts, n > 0 updates."""
        def on_item(item: str, n: int, total: int) -> None:
            if n == 0 or self.t0 is None:
                self.start(0, total)
            if n:
                self.update(n)
        return on_item

    # ------------------------------------------------------------------ numbers and text

    @property
    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else self.clock() - self.t0

    def seconds_per_unit(self) -> float:
        n = self.done - self.first
        return self.elapsed / n if n > 0 else math.nan

    def eta(self) -> float:
        """Seconds left at the rate of this run so far (nan before the first unit)."""
        return (self.total - self.done) * self.seconds_per_unit()

    def line(self) -> str:
        pct = 100 * self.done / self.total if self.total else 100
        rate = self.seconds_per_unit()
        speed = f" | {rate:.2f} s/{self.unit}" if math.isfinite(rate) else ""
        return (f"{self.label}: {self.unit} {self.done}/{self.total} ({pct:.0f}%) | elapsed "
                f"{format_duration(self.elapsed)} | eta {format_duration(self.eta())}{speed}")

    def summary(self) -> str:
        """`N/M steps in 0:01:02 (0.31 s/step)`: the end-of-run numbers, for the command's last line."""
        rate = self.seconds_per_unit()
        speed = f" ({rate:.2f} s/{self.unit})" if math.isfinite(rate) else ""
        return f"{self.done}/{self.total} {self.unit}s in {format_duration(self.elapsed)}{speed}"

    def _line_due(self) -> bool:
        if self._last_line is None or self.done >= self.total:
            return self._last_line is None or self._last_line[0] != self.done
        every = max(1, math.ceil(self.total * LINE_FRACTION))
        last_done, last_t = self._last_line
        return self.done - last_done >= every or self.clock() - last_t >= LINE_SECONDS


def cache_summary(meter: StepProgress) -> str:
    """The end of `fwmodel cache`'s last line: what this run encoded, and how fast."""
    return f"encoded {meter.summary()}" if meter.total else "every selected sample was already cached"
