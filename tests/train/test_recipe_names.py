"""Training recipes by name (issue 14, item 12) and `--output` that is an existing file (item 3)."""

from __future__ import annotations

from typer.testing import CliRunner

from fwmodel.cli import app

runner = CliRunner()


def test_train_by_recipe_name_from_any_folder(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: the recipe comes from the package
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--stage", "1", "--config", "tiny-stage1", "--data", str(dataset),
                            "--output", str(out), "--steps", "1", "--set", "train.checkpoint_every=1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "step-1.safetensors").is_file()
    assert 'preset = "tiny"' in (out / "config.toml").read_text()


def test_train_output_that_is_a_file_is_one_line_exit_2_before_any_work(dataset, recipes, tmp_path):
    target = tmp_path / "run.txt"
    target.write_text("keep me")
    r = runner.invoke(app, ["train", "--stage", "1", "--config", str(recipes[1]), "--data", str(dataset),
                            "--output", str(target), "--steps", "1"])
    text = r.stderr.strip()
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "FileExistsError" not in r.output and "\n" not in text
    assert text == f"error: --output (train.output): {target} exists and is not a folder"
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["run.txt"]
    r = runner.invoke(app, ["train", "--stage", "1", "--config", "tiny-stage1", "--data", str(dataset),
                            "--output", str(target / "sub"), "--resume"])
    assert r.exit_code == 2 and r.stderr.strip().startswith("error: --output (train.output): cannot create"), r.output
