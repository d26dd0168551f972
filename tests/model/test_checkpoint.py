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


# --------------------------------------------------------------------------- dtypes, values, sidecar


def _rewrite(path: Path, change) -> None:
    """Rewrite checkpoint `path` with `change(tensors)` applied, and a sidecar that matches the new file.

    The result is a well-formed checkpoint whose size and sha256 checks pass: only the tensor
    checks can catch what `change` did.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fwmodel.checkpoint import file_sha256

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    sidecar = json.loads(sidecar_path(path).read_text())
    sidecar.update(file_bytes=path.stat().st_size, sha256=file_sha256(path))
    sidecar_path(path).write_text(json.dumps(sidecar))


def _first_tensor(model, stage: int = 1) -> str:
    return trainable_parameter_names(model, stage)[0]


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float16, torch.float64])
def test_tensor_of_another_dtype_refused(tmp_path: Path, tiny_config, dtype):
    source = _model(tiny_config, 0)
    path = save_trainable(source, tmp_path / "step-1.safetensors", stage=1)
    name = _first_tensor(source)

    def cast(tensors):
        tensors[name] = tensors[name].to(dtype)

    _rewrite(path, cast)
    target = _model(tiny_config, 1)
    before = _state(target)
    dtype_name = str(dtype).replace("torch.", "")
    with pytest.raises(CheckpointError, match=rf"tensor {name} is {dtype_name} but the model parameter is float32"):
        load_trainable(target, path, stage=1)
    _assert_unchanged(target, before)


def test_bf16_saved_weights_load_into_a_bf16_model(tmp_path: Path, tiny_config):
    """The deliberate dtypes: bf16 weights saved from a bf16 model, and fp32 training weights into a bf16 model."""
    def bf16(model):
        model.geometry.to(torch.bfloat16)
        model.interaction.to(torch.bfloat16)
        return model

    source = bf16(_model(tiny_config, 0))
    path = save_trainable(source, tmp_path / "bf16" / "step-1.safetensors", stage=2)
    target = bf16(_model(tiny_config, 1))
    load_trainable(target, path, stage=2)
    names = trainable_parameter_names(source, 2)
    assert all(torch.equal(source.state_dict()[k], target.state_dict()[k]) for k in names)

    fp32 = save_trainable(_model(tiny_config, 0), tmp_path / "fp32" / "step-1.safetensors", stage=2)
    load_trainable(bf16(_model(tiny_config, 2)), fp32, stage=2)  # fp32 master weights -> bf16 inference model

    refused = r"is bfloat16 but the model parameter is float32; build the model in bfloat16"
    with pytest.raises(CheckpointError, match=refused):
        load_trainable(_model(tiny_config, 3), path, stage=2)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_refused(tmp_path: Path, tiny_config, value):
    source = _model(tiny_config, 0)
    path = save_trainable(source, tmp_path / "step-1.safetensors", stage=1)
    name = trainable_parameter_names(source, 1)[-1]

    def poison(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value

    _rewrite(path, poison)
    target = _model(tiny_config, 1)
    before = _state(target)
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds NaN or Inf"):
        load_trainable(target, path, stage=1)
    _assert_unchanged(target, before)


@pytest.mark.parametrize("field,value", [("preset", "wan2.1-t2v-1.3b"), ("stage", 2), ("fingerprint", "0" * 16)])
def test_edited_sidecar_field_refused(tmp_path: Path, tiny_config, field, value):
    path = save_trainable(_model(tiny_config, 0), tmp_path / "step-1.safetensors", stage=1, step=1)
    sidecar = json.loads(sidecar_path(path).read_text())
    sidecar[field] = value
    sidecar_path(path).write_text(json.dumps(sidecar))
    target = _model(tiny_config, 1)
    before = _state(target)
    with pytest.raises(CheckpointError, match=rf"does not match the header of checkpoint .*\({field}: sidecar"):
        load_trainable(target, path, stage=1)
    _assert_unchanged(target, before)


def test_sidecar_without_sha256_refused(tmp_path: Path, tiny_config):
    path = save_trainable(_model(tiny_config, 0), tmp_path / "step-1.safetensors", stage=1)
    sidecar = json.loads(sidecar_path(path).read_text())
    del sidecar["sha256"]
    sidecar_path(path).write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="sha256 does not match the sidecar"):
        load_trainable(_model(tiny_config, 1), path, stage=1)


def test_missing_sidecar_refused_unless_allowed(tmp_path: Path, tiny_config, caplog):
    source = _model(tiny_config, 0)
    path = save_trainable(source, tmp_path / "step-1.safetensors", stage=1)
    good = path.read_bytes()
    sidecar_path(path).unlink()
    data = bytearray(good)
    data[-3] ^= 0x01  # a bit flip in the last tensor: only the sidecar's sha256 would catch it
    path.write_bytes(bytes(data))
    target = _model(tiny_config, 1)
    before = _state(target)
    refused = r"step-1.safetensors has no sidecar step-1.json.*allow_missing_sidecar=True"
    with pytest.raises(CheckpointError, match=refused):
        load_trainable(target, path, stage=1)
    _assert_unchanged(target, before)

    path.write_bytes(good)  # the explicit choice: load without the checks, with a warning
    with caplog.at_level("WARNING", logger="fwmodel.checkpoint"):
        load_trainable(target, path, stage=1, allow_missing_sidecar=True)
    assert any("has no sidecar" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    names = trainable_parameter_names(source, 1)
    assert all(torch.equal(source.state_dict()[k], target.state_dict()[k]) for k in names)
