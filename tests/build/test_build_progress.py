"""The build's progress line: clips done / failed / in flight and throughput, reported by the executor.

A real build with the local executor and two worker processes (two of the bundled example renders,
one clip each, 9 frames at 96x160, known intrinsics, the randomly initialised `random-tiny` depth
model, and a text file named .mp4 that fails at planning): the progress object gets the pool's count
of clips in flight, the line shows it (> 0 while clips run, 0 at the end), and the bar printed to a
console ends with it.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from fwdata.build.cli import RichBuildProgress, progress_status
from fwdata.build.pipeline import ClipOutcome, build_dataset, load_config

REPO = Path(__file__).resolve().parents[2]
VIDEOS = [REPO / "examples" / "videos" / f"{k}.mp4" for k in ("forward", "pan")]
K = [290.9845356715714, 290.9845356715714, 168.0, 96.0]  # the renders' camera (examples/ground_truth)
OPTIONS = {"clips": {"num_frames": 9, "height": 96, "width": 160, "stride": 2, "max_clips_per_video": 1},
           "depth": {"model": "random-tiny"}, "intrinsics": K, "write_ply": False, "workers": 2}


def test_progress_status_formatting():
    """ok always; failed only when some failed; in flight once reported (0 included); clips/min of this run."""
    assert progress_status(0, 0, None, None) == "[green]0 ok[/]"
    assert progress_status(0, 0, 4, 1.0) == "[green]0 ok[/] [cyan]4 in flight[/]", "no throughput before a clip is done"
    assert progress_status(12, 1, 4, 240.0) == "[green]12 ok[/] [red]1 failed[/] [cyan]4 in flight[/] 3.25 clips/min"
    assert progress_status(3, 0, 0, 60.0) == "[green]3 ok[/] [cyan]0 in flight[/] 3.00 clips/min"
    assert progress_status(2, 0, None, 30.0) == "[green]2 ok[/] 4.00 clips/min", "an executor that does not report"


def test_in_flight_updates_the_line():
    progress = RichBuildProgress(Console(file=io.StringIO(), width=160))
    progress.start(total=3, skipped=0)
    progress.in_flight(2)
    assert progress._status() == "[green]0 ok[/] [cyan]2 in flight[/]"
    progress.t_start -= 60.0
    progress.in_flight(1)
    progress.clip_done(ClipOutcome("a", "a.mp4", 0, True))
    assert progress._status().startswith("[green]1 ok[/] [cyan]1 in flight[/] ")
    progress.finish()


class RecordingProgress(RichBuildProgress):
    """The CLI's progress bar, also keeping the status after each report: (event, ok, failed, in flight, status)."""

    def __init__(self, console: Console):
        super().__init__(console)
        self.events: list[tuple[str, int, int, int, str]] = []

    def in_flight(self, n: int) -> None:
        super().in_flight(n)
        self.events.append(("flight", self.ok, self.failed, n, self._status()))

    def clip_done(self, outcome: ClipOutcome) -> None:
        super().clip_done(outcome)
        self.events.append(("done", self.ok, self.failed, self.flight, self._status()))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    bad = root / "notes.mp4"
    bad.write_text("not a video\n")
    out = io.StringIO()
    progress = RecordingProgress(Console(file=out, width=200))
    summary = build_dataset([*map(str, VIDEOS), str(bad)], root / "ds", load_config(None, OPTIONS), progress=progress)
    return summary, progress, out.getvalue()


def test_local_pool_reports_clips_in_flight(recorded):
    summary, progress, printed = recorded
    assert summary.built == 2 and len(summary.failures) == 1, summary.failures
    flights = [e[3] for e in progress.events if e[0] == "flight"]
    # two clips, two workers: both handed out at once, then one finishes, then the other
    assert flights == [2, 1, 0], progress.events
    done = [e for e in progress.events if e[0] == "done"]
    assert [(e[1], e[3]) for e in done] == [(1, 1), (2, 0)], "each outcome comes with the clips still running"
    assert "[cyan]1 in flight[/]" in done[0][4] and "[cyan]2 in flight[/]" in progress.events[0][4]
    assert done[-1][4].startswith("[green]2 ok[/] [cyan]0 in flight[/] ") and done[-1][4].endswith(" clips/min")
    # the failed input was found at planning: it never was a clip in flight, and is not counted as done here
    last = [line for line in printed.splitlines() if "building" in line][-1]
    assert re.search(r"2/2 +2 ok 0 in flight \d+\.\d\d clips/min", last), printed


def test_one_worker_in_this_process_reports_too(tmp_path):
    """`--workers 1`: the clip runs here; 1 in flight while it runs, 0 when its outcome comes."""
    progress = RecordingProgress(Console(file=io.StringIO(), width=200))
    build_dataset([str(VIDEOS[1])], tmp_path / "ds", load_config(None, {**OPTIONS, "workers": 1}), progress=progress)
    assert [(e[0], e[3]) for e in progress.events] == [("flight", 1), ("flight", 0), ("done", 0)]
