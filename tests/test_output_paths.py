"""An output path that is an existing file (issue 14, item 3): one line, exit 2, before any work, with
the check `fwdata build --out` uses (`fwdata.dataset.store.check_writable_folder`)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fwdata.cli import app
from fwdata.dataset.store import check_output_folder, check_writable_folder
from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset

runner = CliRunner()


def _one_line(result) -> str:
    text = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "FileExistsError" not in result.output and "\n" not in text, text
    return text


def test_synth_into_an_existing_file_is_one_line_exit_2(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    text = _one_line(runner.invoke(app, ["synth", str(target), "--scenes", "1", "--frames", "5", "--height", "32",
                                         "--width", "48", "--quiet"]))
    assert text == f"error: {target} exists and is not a folder"
    assert target.read_text() == "keep me"
    text = _one_line(runner.invoke(app, ["synth", str(target / "ds"), "--scenes", "1", "--quiet"]))
    assert text.startswith(f"error: cannot create {target / 'ds'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # nothing rendered anywhere


def test_the_library_refuses_before_rendering(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("")
    with pytest.raises(OSError, match="exists and is not a folder"):
        write_synthetic_dataset(target, SynthOptions(num_scenes=1, num_frames=5, height=32, width=48))
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"] and target.read_text() == ""


def test_build_and_synth_share_the_check(tmp_path):
    target = tmp_path / "f"
    target.write_text("")
    messages = []
    for check in (check_output_folder, check_writable_folder):
        with pytest.raises(OSError) as err:
            check(target)
        messages.append(str(err.value))
    assert messages == [f"{target} exists and is not a folder"] * 2
    check_writable_folder(tmp_path / "new" / "run")  # created, writable, nothing left behind
    assert list((tmp_path / "new" / "run").iterdir()) == []
    r = runner.invoke(app, ["build", str(tmp_path), "--out", str(target)])
    assert _one_line(r) == messages[0].join(["error: ", ""])
