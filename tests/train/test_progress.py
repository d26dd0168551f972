"""Progress of `fwmodel train` and `fwmodel cache`: elapsed time and ETA (fwmodel.progress).

A terminal gets a rich bar; a log (stdout not a terminal, as under CliRunner or in CI) gets plain
lines without carriage returns; --quiet gets one summary line."""

from __future__ import annotations

import io
import re
import shutil

from rich.console import Console
from typer.testing import CliRunner

from fwmodel.cli import app
from fwmodel.progress import StepProgress, choose_mode, format_duration

runner = CliRunner()
LINE = re.compile(r"^stage 1: step (\d+)/4 \((\d+)%\) \| elapsed (\d+):(\d\d):(\d\d) \| eta (\d+):(\d\d):(\d\d) "
                  r"\| (\d+\.\d\d) s/step$")
SUMMARY = re.compile(r"^finished Stage 1: 4/4 steps in \d+:\d\d:\d\d \((\d+\.\d\d) s/step\), 0 skipped; final weights "
                     r"(\S+)$")


def _seconds(h, m, s) -> int:
    return int(h) * 3600 + int(m) * 60 + int(s)


def _train(recipes, dataset, out, *extra):
    return runner.invoke(app, ["train", "--stage", "1", "--config", str(recipes[1]), "--data", str(dataset),
                               "--output", str(out), "--steps", "4", *extra])


def test_train_prints_steps_elapsed_and_eta_as_plain_lines_in_a_log(dataset, recipes, tmp_path):
    result = _train(recipes, dataset, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stdout  # no carriage-return bar in a log
    rows = [m.groups() for m in map(LINE.match, result.stdout.splitlines()) if m]
    steps = [int(r[0]) for r in rows]
    assert steps == [1, 2, 3, 4]  # 4 steps: 5 % of the run is less than a step, so every step has a line
    assert [int(r[1]) for r in rows] == [25, 50, 75, 100]
    elapsed = [_seconds(*r[2:5]) for r in rows]
    assert elapsed == sorted(elapsed)
    last = rows[-1]
    assert _seconds(*last[5:8]) == 0  # nothing left at the end
    # the ETA of the first line is the remaining steps at the measured rate (rounded to seconds)
    first_rate, first_eta = float(rows[0][8]), _seconds(*rows[0][5:8])
    assert abs(first_eta - 3 * first_rate) <= 0.51 + 0.01 * 3
    assert SUMMARY.match(result.stdout.strip().splitlines()[-1]), result.stdout[-400:]


def test_train_quiet_prints_one_summary_line(dataset, recipes, tmp_path):
    out = tmp_path / "run"
    result = _train(recipes, dataset, out, "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    match = SUMMARY.match(lines[0])
    assert match and match.group(2) == str(out / "step-4.safetensors")
    assert float(match.group(1)) > 0
    assert "WARNING:" in result.stderr  # the random-init warning stays, on stderr
    assert lines[0] in (out / "train.log").read_text()  # and the summary is the log's last line too
    assert (out / "train.log").read_text().strip().splitlines()[-1].endswith(lines[0])


def test_cache_prints_samples_elapsed_and_eta_and_one_line_with_quiet(dataset_copy, recipes):
    shutil.rmtree(dataset_copy / ".fwmodel_cache")
    args = ["cache", str(dataset_copy), "--config", str(recipes[1]), "--vae", "random-tiny", "--text-encoder",
            "random-tiny", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stdout
    lines = result.stdout.strip().splitlines()
    assert re.match(r"^caching: sample 1/2 \(50%\) \| elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d \| \d+\.\d\d s/sample$",
                    lines[0]), lines
    assert re.match(r"^caching: sample 2/2 \(100%\) \| elapsed \d+:\d\d:\d\d \| eta 0:00:00 ", lines[1]), lines
    assert re.match(r"^latent cache ready: \S+5x32x48-s2-start \(encoded 2/2 samples in \d+:\d\d:\d\d \(\d+\.\d\d "
                    r"s/sample\)\)$", lines[2]), lines
    assert len(lines) == 3

    shutil.rmtree(dataset_copy / ".fwmodel_cache")
    quiet = runner.invoke(app, args + ["--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert len(quiet.stdout.strip().splitlines()) == 1 and "encoded 2/2 samples" in quiet.stdout

    again = runner.invoke(app, args + ["--quiet"])  # nothing left to encode
    assert again.stdout.strip().endswith("(every selected sample was already cached)")


# --------------------------------------------------------------------------- the meter itself


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_eta_is_the_remaining_units_at_the_rate_of_this_run():
    clock, lines = Clock(), []
    meter = StepProgress("stage 1", 100, "step", "lines", echo=lines.append, clock=clock)
    meter.start(done=40)  # resumed at step 40: the rate counts this run's steps only
    clock.t = 20.0
    meter.update(50)
    assert meter.seconds_per_unit() == 2.0 and meter.eta() == 100.0
    assert lines == ["stage 1: step 50/100 (50%) | elapsed 0:00:20 | eta 0:01:40 | 2.00 s/step"]
    assert meter.summary() == "50/100 steps in 0:00:20 (2.00 s/step)"
    assert format_duration(3 * 3600 + 62) == "3:01:02" and format_duration(float("nan")) == "-:--:--"


def test_plain_lines_every_5_percent_or_5_minutes_and_at_the_end():
    clock, lines = Clock(), []
    meter = StepProgress("stage 2", 200, "step", "lines", echo=lines.append, clock=clock)
    meter.start()
    printed = []
    for step in range(1, 201):
        clock.t = step * 1.0
        if step == 120:
            clock.t = 120 + 400.0  # a slow step: more than 5 minutes since the last line
        elif step > 120:
            clock.t = step + 400.0
        n = len(lines)
        meter.update(step)
        if len(lines) > n:
            printed.append(step)
    # every 10 steps (5 % of 200) from the first, one extra after the 5-minute gap, and the last
    assert printed == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 101, 111, 120, 130, 140, 150, 160, 170, 180, 190, 200]


def test_bar_on_a_terminal_nothing_when_quiet():
    assert choose_mode(quiet=True) == "off"
    assert choose_mode(quiet=False, stream=io.StringIO()) == "lines"

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert choose_mode(quiet=False, stream=Tty()) == "bar"

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    lines = []
    meter = StepProgress("stage 1", 3, "step", "bar", echo=lines.append, console=console)
    meter.start()
    for step in (1, 2, 3):
        meter.update(step)
    meter.close()
    drawn = screen.getvalue()
    assert "3/3" in drawn and "stage 1" in drawn and "eta" in drawn and lines == []

    off = StepProgress("stage 1", 3, "step", "off", echo=lines.append)
    off.start()
    for step in (1, 2, 3):
        off.update(step)
    assert lines == [] and off.summary().startswith("3/3 steps in ")
