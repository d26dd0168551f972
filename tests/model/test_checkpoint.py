"""Saving and loading our trainable weights; refusing damaged, foreign or wrong-stage files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fwmodel.checkpoint import CheckpointError, load_trainable, save_trainable, sidecar_path
from fwmodel.model import FantasyWorldModel
from fwmodel.stages import trainable_parameter_names


def _model(config, seed: int) -> FantasyWorldModel:
    torch.manual_seed(seed)
    return FantasyWorldModel(config)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before: dict):
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("stage", [1, 2])
def test_round_trip(tmp_path: Path, tiny_config, stage):
    source, target = _model(tiny_config, 0), _model(tiny_config, 1)
    path = save_trainable(source, tmp_path / f"stage{stage}" / "step-10.safetensors", stage=stage, step=10)
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["preset"] == "tiny" and sidecar["stage"] == stage and sidecar["step"] == 10
    assert sidecar["num_tensors"] == len(trainable_parameter_names(source, stage))

    info = load_trainable(target, path, stage=stage)
    assert info.stage == stage and info.step == 10
    names = trainable_parameter_names(source, stage)
    src, tgt = source.state_dict(), target.state_dict()
    assert all(torch.equal(src[k], tgt[k]) for k in names)
    assert not any(k.startswith("backbone.") for k in names)
    assert info.missing == ([k for k in tgt if k.startswith("interaction.")] if stage == 1 else [])


def test_stage1_to_stage2_handoff_leaves_only_interaction_at_init(tmp_path: Path, tiny_config):
    stage1 = save_trainable(_model(tiny_config, 0), tmp_path / "step-20000.safetensors", stage=1)
    target = _model(tiny_config, 1)
    interaction_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("interaction.")}
    info = load_trainable(target, stage1, stage=1)
    assert set(info.missing) == set(interaction_before)
    _assert_unchanged(target, interaction_before)


def test_stage1_file_refused_when_stage2_keys_expected(tmp_path: Path, tiny_config):
    path = save_trainable(_model(tiny_config, 0), tmp_path / "step-1.safetensors", stage=1)
    target = _model(tiny_config, 1)
    before = _state(target)
    with pytest.raises(CheckpointError, match=r"is a Stage-1 checkpoint: it has no Stage-2 weights.*STAGE1_CHECKPOINT"):
        load_trainable(target, path, stage=2)
    _assert_unchanged(target, before)


def test_stage2_file_refused_as_stage1(tmp_path: Path, tiny_config):
    path = save_trainable(_model(tiny_config, 0), tmp_path / "step-1.safetensors", stage=2)
    with pytest.raises(CheckpointError, match="is a Stage-2 checkpoint.*load it with stage=2"):
        load_trainable(_model(tiny_config, 1), path, stage=1)


def test_truncated_file_refused_and_nothing_loaded(tmp_path: Path, tiny_config):
    path = save_trainable(_model(tiny_config, 0), tmp_path / "step-1.safetensors", stage=1)
    data = path.read_bytes()
    target = _model(tiny_config, 1)
    before = _state(target)

    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is damaged"):
        load_trainable(target, path, stage=1)
    sidecar_path(path).unlink()  # without the sidecar the safetensors header check still catches it
    with pytest.raises(CheckpointError, match="is damaged"):
        load_trainable(target, path, stage=1)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="is damaged or not a safetensors file"):
        load_trainable(target, path, stage=1)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_trainable(target, tmp_path / "missing.safetensors", stage=1)
    _assert_unchanged(target, before)


def test_flipped_byte_caught_by_sidecar_hash(tmp_path: Path, tiny_config):
    path = save_trainable(_model(tiny_config, 0), tmp_path / "step-1.safetensors", stage=1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_trainable(_model(tiny_config, 1), path, stage=1)


def test_file_from_another_preset_refused(tmp_path: Path, tiny_config):
    geometry = tiny_config.geometry.model_copy(update={"embed_dim": 16, "num_heads": 2})
    other = tiny_config.model_copy(update={"name": "tiny-narrow", "geometry": geometry})
    path = save_trainable(_model(other, 0), tmp_path / "step-1.safetensors", stage=1)
    target = _model(tiny_config, 1)
    before = _state(target)
    with pytest.raises(CheckpointError, match=r"written for model preset 'tiny-narrow'.*this model is preset 'tiny'"):
        load_trainable(target, path, stage=1)
    _assert_unchanged(target, before)
