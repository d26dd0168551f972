"""Stage-2 initialisation refuses damaged or mismatched checkpoints with the right message, loading nothing."""

from __future__ import annotations

import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from fwmodel.cli import app

runner = CliRunner()


def _stage2(recipes, dataset, output, init, *extra):
    return runner.invoke(app, ["train", "--stage", "2", "--config", str(recipes[2]), "--data", str(dataset),
                               "--output", str(output), "--init-from", str(init), *extra])


def _copy(checkpoint, directory, sidecar=True):
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / checkpoint.name
    shutil.copy(checkpoint, target)
    if sidecar:
        shutil.copy(checkpoint.with_suffix(".json"), target.with_suffix(".json"))
    return target


@pytest.mark.parametrize("sidecar", [True, False])
def test_truncated_checkpoint_is_refused(sidecar, stage1_checkpoint, dataset, recipes, tmp_path):
    bad = _copy(stage1_checkpoint, tmp_path / "ck", sidecar)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    result = _stage2(recipes, dataset, tmp_path / "out", bad)
    assert result.exit_code == 2, result.output
    assert "damaged" in result.output and str(bad) in result.output.replace("\n", "")
    if sidecar:
        assert "truncated" in result.output
    assert not (tmp_path / "out").exists()  # refused before anything was written or loaded


def test_checkpoint_of_another_preset_is_refused(dataset, recipes, tmp_path):
    from fwmodel.checkpoint import save_trainable
    from fwmodel.config import get_preset
    from fwmodel.model import FantasyWorldModel

    tiny = get_preset("tiny")
    other = tiny.model_copy(update={"name": "tiny-wide", "geometry": tiny.geometry.model_copy(update={"dpt_features": 16})})
    path = save_trainable(FantasyWorldModel(other), tmp_path / "ck" / "step-7.safetensors", stage=1, step=7)
    result = _stage2(recipes, dataset, tmp_path / "out", path)
    assert result.exit_code == 2, result.output
    assert "preset 'tiny-wide'" in result.output and "preset 'tiny'" in result.output


def test_stage1_file_missing_modules_is_refused(stage1_checkpoint, tmp_path, dataset, recipes):
    with safe_open(str(stage1_checkpoint), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("geometry.point_head.")}
    path = tmp_path / "ck" / "step-2.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path), metadata=metadata)  # a well-formed file, just without the point head
    result = _stage2(recipes, dataset, tmp_path / "out", path, "--allow-missing-sidecar")  # (it has no sidecar)
    assert result.exit_code == 2, result.output
    assert "Stage-1 key set" in result.output and "missing" in result.output
    assert "geometry.point_head." in result.output


@pytest.mark.parametrize("stage", [1, 2])
def test_init_from_refuses_a_stage2_checkpoint(stage, dataset, recipes, tmp_path):
    """docs/TRAINING.md: --init-from takes the Stage-1 checkpoint; a Stage-2 file is refused in one line."""
    from fwmodel.checkpoint import save_trainable
    from fwmodel.config import get_preset
    from fwmodel.model import FantasyWorldModel

    path = save_trainable(FantasyWorldModel(get_preset("tiny")), tmp_path / "ck" / "step-5.safetensors", stage=2, step=5)
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--stage", str(stage), "--config", str(recipes[stage]), "--data",
                                 str(dataset), "--output", str(out), "--init-from", str(path), "--steps", "1"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --init-from takes a Stage-1 checkpoint"), result.stderr
    text = result.stderr.replace("\n", "")
    assert f"{path} is a Stage-2 checkpoint (step 5)" in text and "--resume" in text
    assert "loaded successfully" not in result.output
    assert not out.exists()  # refused before anything was written or loaded


def test_missing_checkpoint_path_is_named(dataset, recipes, tmp_path):
    result = _stage2(recipes, dataset, tmp_path / "out", tmp_path / "nope" / "step-20000.safetensors")
    assert result.exit_code == 2 and "checkpoint not found" in result.output


def test_checkpoint_without_sidecar_is_refused_unless_allowed(stage1_checkpoint, dataset, recipes, tmp_path):
    bare = _copy(stage1_checkpoint, tmp_path / "ck", sidecar=False)
    result = _stage2(recipes, dataset, tmp_path / "out", bare)
    assert result.exit_code == 2, result.output
    assert "has no sidecar" in result.output and "--allow-missing-sidecar" in result.output
    assert str(bare) in result.output.replace("\n", "")
    assert not (tmp_path / "out").exists()  # refused before anything was written

    result = _stage2(recipes, dataset, tmp_path / "out", bare, "--allow-missing-sidecar", "--steps", "1", "--quiet")
    assert result.exit_code == 0, result.output
    log = (tmp_path / "out" / "train.log").read_text()
    assert "has no sidecar" in log and "Stage 1 checkpoint loaded successfully" in log


def test_checkpoint_with_edited_sidecar_is_refused(stage1_checkpoint, dataset, recipes, tmp_path):
    import json

    edited = _copy(stage1_checkpoint, tmp_path / "ck")
    sidecar = json.loads(edited.with_suffix(".json").read_text())
    sidecar["stage"] = 2  # claims to be a Stage-2 file: the header inside the file says 1
    edited.with_suffix(".json").write_text(json.dumps(sidecar))
    result = _stage2(recipes, dataset, tmp_path / "out", edited)
    assert result.exit_code == 2, result.output
    assert "does not match the header" in result.output and "stage: sidecar 2, file 1" in result.output
    assert not (tmp_path / "out").exists()
