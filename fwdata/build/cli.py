"""What `fwdata build` shows a person: a progress bar while clips run, then a summary.

The command in `fwdata.cli` only parses options; this module turns them into a `BuildConfig`,
runs `fwdata.build.pipeline.build_dataset` with a rich progress bar (clips done / failed / in flight,
throughput, ETA) and prints the result. Exit codes: 0 every input succeeded, 1 some failed (the rest
is written and listed), 2 usage errors (bad options or preset, missing inputs, depth model not available).
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from fwdata.runtime import Terminated, sigterm_as_interrupt
from fwdata.build.pipeline import BuildConfig, BuildSummary, ClipOutcome, ConfigError, build_dataset, load_config
from fwdata.cli_common import EXIT_USAGE
from fwdata.textout import plural
from fwdata.build.depth import DepthModelError


def progress_status(ok: int, failed: int, in_flight: Optional[int], seconds: Optional[float]) -> str:
    """The status part of the build's progress line (rich markup), e.g. ``3 ok 1 failed 2 in flight
    1.50 clips/min``: failures only when there are any, in flight once the executor reported it (None:
    not yet), the throughput of this run (clips done per minute of `seconds` elapsed) once one is done."""
    s = f"[green]{ok} ok[/]"
    if failed:
        s += f" [red]{failed} failed[/]"
    if in_flight is not None:
        s += f" [cyan]{in_flight} in flight[/]"
    done = ok + failed
    if done and seconds is not None:
        s += f" {60 * done / max(seconds, 1e-9):.2f} clips/min"
    return s


class RichBuildProgress:
    """Progress bar: clips done (ok + failed) of all, failures so far, clips in flight, throughput,
    elapsed and remaining time."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self.progress: Optional[Progress] = None
        self.task = None
        self.ok = self.failed = 0
        self.flight: Optional[int] = None  # clips in flight, as the executor last reported (None: not yet)
        self.t_start: Optional[float] = None

    def start(self, total: int, skipped: int) -> None:
        if self.quiet:
            return
        if skipped:
            self.console.print(f"{skipped} of {plural(total, 'clip')} already built (skipped; --force redoes them)", soft_wrap=True)
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]building"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=self.console, transient=False)
        self.progress.start()
        self.t_start = time.monotonic()
        self.task = self.progress.add_task("build", total=total, completed=skipped, status=self._status())

    def _status(self) -> str:
        seconds = time.monotonic() - self.t_start if self.t_start is not None else None
        return progress_status(self.ok, self.failed, self.flight, seconds)  # skipped clips do not count

    def in_flight(self, n: int) -> None:
        """The executor's count of clips in flight changed (`fwdata.build.executors.OnFlight`)."""
        self.flight = n
        if self.progress is not None:
            self.progress.update(self.task, status=self._status())

    def clip_done(self, outcome: ClipOutcome) -> None:
        if outcome.ok:
            self.ok += 1
        else:
            self.failed += 1
        if self.progress is not None:
            self.progress.update(self.task, advance=1, status=self._status())
            if not outcome.ok:
                self.progress.console.print(f"  [red]failed[/] {_shown(Path(outcome.source).name)} (clip at frame "
                                            f"{outcome.clip_start}) {_shown(f'[{outcome.stage}]')} "
                                            f"{_shown(outcome.reason)}", highlight=False, soft_wrap=True)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _shown(text: str) -> str:
    """Text safe to print on one line: rich markup escaped, control characters (a newline in a file
    name could forge a summary line) shown as escapes such as \\n."""
    return escape("".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text)))


def parse_intrinsics(text: str) -> tuple[tuple[float, float, float, float], Optional[tuple[float, ...]]]:
    """'fx,fy,cx,cy[,k1[,k2[,p1,p2[,k3]]]]' (source-video pixels; OpenCV distortion in cv2's distCoeffs
    order) -> ((fx, fy, cx, cy), (k1, k2, p1, p2), (k1, k2, p1, p2, k3) when k3 is given and not 0, or
    None); ValueError with the expected form otherwise."""
    try:
        vals = tuple(float(x) for x in text.replace(" ", "").split(","))
    except ValueError:
        vals = ()
    if len(vals) not in (4, 5, 6, 8, 9) or vals[0] <= 0 or vals[1] <= 0 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"--intrinsics {text!r}: expected 'fx,fy,cx,cy' in source-video pixels (fx and fy > 0), "
                         f"optionally followed by OpenCV distortion 'k1', 'k1,k2', 'k1,k2,p1,p2' or 'k1,k2,p1,p2,k3'")
    dist = None
    if len(vals) > 4:
        d = list(vals[4:]) + [0.0] * (9 - len(vals))
        dist = (d[0], d[1], d[2], d[3]) if d[4] == 0.0 else (d[0], d[1], d[2], d[3], d[4])
    return (vals[0], vals[1], vals[2], vals[3]), dist


def overrides_from_options(**opts: Any) -> dict[str, Any]:
    """Nested config overrides from command-line options; options left at None are not applied."""
    table = {
        "frames": ("clips", "num_frames"), "height": ("clips", "height"), "width": ("clips", "width"),
        "stride": ("clips", "stride"), "fps": ("clips", "fps"), "max_clips": ("clips", "max_clips_per_video"),
        "depth_model": ("depth", "model"), "depth_prior": ("depth", "prior_dir"), "device": ("depth", "device"),
        "batch_size": ("depth", "batch_size"), "mapper": ("sfm", "mapper"), "loop_detection": ("sfm", "loop_detection"),
        "verbose": ("sfm", "verbose"), "workers": ("workers",), "threads": ("threads",), "write_ply": ("write_ply",), "name": ("name",),
        "intrinsics": ("intrinsics",), "distortion": ("distortion",),
        "executor": ("executor",), "ray_address": ("ray_address",),
    }
    out: dict[str, Any] = {}
    for key, value in opts.items():
        if value is None:
            continue
        path = table[key]
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = str(value) if key == "depth_prior" else value
    return out


def print_summary(console: Console, summary: BuildSummary) -> None:
    st = summary.metadata.statistics
    console.print(f"[bold]{summary.out}[/]: {plural(st.num_samples, 'sample')} ({plural(st.total_frames, 'frame')}, "
                  f"{st.duration_s:.1f} s of video) from {plural(summary.num_videos, 'video')}; this run built "
                  f"{summary.built}, skipped {summary.skipped} finished, {len(summary.failures)} failed "
                  f"in {summary.seconds:.0f} s", highlight=False, soft_wrap=True)
    if summary.clip_seconds:
        n = len(summary.clip_seconds)
        console.print(f"  {sum(summary.clip_seconds) / n:.1f} s per clip on average", highlight=False, soft_wrap=True)
    for f in summary.failures:
        where = f" (clip at frame {f.clip_start})" if f.clip_start is not None else ""
        console.print(f"  [red]failed[/] {_shown(f.source)}{where} {_shown(f'[{f.stage}]')} {_shown(f.reason)}",
                      highlight=False, soft_wrap=True)
    random = [m.name for m in summary.metadata.provenance.models if m.random_init]
    if random:
        console.print(f"  [yellow]note[/]: depth from the randomly initialised model {', '.join(random)}: the "
                      f"dataset exercises the pipeline but its depth is not real (validation flags it)", soft_wrap=True)


def run_build_command(videos: Sequence[Path], out: Path, preset: Optional[str], overrides: dict[str, Any],
                      force: bool, quiet: bool, console: Console, err_console: Console, command: str = "") -> int:
    """Run a build from parsed command-line options; returns the exit code."""
    try:
        config: BuildConfig = load_config(preset, overrides)
    except ConfigError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    command = command or "fwdata " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    progress = RichBuildProgress(console, quiet=quiet)
    try:
        with sigterm_as_interrupt():
            summary = build_dataset(videos, out, config, force=force, progress=progress, command=command)
    except (ConfigError, DepthModelError) as e:
        progress.finish()
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        progress.finish()
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        err_console.print(f"{what}: finished clips are kept; run the same command again to continue",
                          highlight=False, soft_wrap=True)
        return 143 if isinstance(e, Terminated) else 130
    if quiet:
        console.print(f"{summary.out}: {plural(summary.metadata.statistics.num_samples, 'sample')}, built {summary.built}, "
                      f"skipped {summary.skipped}, failed {len(summary.failures)}", highlight=False, soft_wrap=True)
        for f in summary.failures:
            console.print(f"  failed {_shown(f.source)} {_shown(f'[{f.stage}]')} {_shown(f.reason)}", highlight=False,
                          soft_wrap=True)
    else:
        print_summary(console, summary)
    return summary.exit_code


def run_demo_build(videos: Path, out: Path, console: Console, quiet: bool = False, frames: int = 17,
                   height: int = 192, width: int = 336, stride: int = 2) -> BuildSummary:
    """`make demo`'s build step: the rendered example videos through the whole pipeline, offline.

    Uses the fast preset at the examples' size (by default 17 frames taken every 2nd frame of the
    33-frame renders, 192x336), the randomly initialised `random-tiny` depth model (no download) and
    two worker processes, so it takes about a minute on two cores.
    """
    config = load_config("fast", {"workers": 2, "write_ply": True, "depth": {"model": "random-tiny"},
                                  "clips": {"num_frames": frames, "height": height, "width": width, "stride": stride}})
    summary = build_dataset([videos], out, config, progress=RichBuildProgress(console, quiet=quiet),
                            command=f"fwdata build {videos} --out {out} --config fast --depth-model random-tiny "
                                    f"--frames {frames} --height {height} --width {width} --stride {stride} --workers 2")
    print_summary(console, summary)
    return summary
