"""fwmodel.inference: a checkpoint loaded for inference is the trained model, or a one-line refusal."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from fwmodel.checkpoint import CheckpointError
from fwmodel.inference import InferenceError, load_encoders, load_model, predict


def _cached_inputs(loaded):
    """The first cached sample of the run's dataset: latents [1, 16, S, Hl, Wl], text [1, 512, D]."""
    from fwmodel.cache import LatentCache
    from fwmodel.data import select_samples

    cfg = loaded.config.data
    cache = LatentCache.find(cfg)
    record = select_samples(cfg.root, cfg).records[0]
    latents, text = cache.load(record.id)
    return latents[None], text[None]


@pytest.mark.parametrize("stage", [1, 2])
def test_loaded_model_holds_the_checkpoint_and_the_runs_backbone(stage, stage1_checkpoint, stage2_checkpoint):
    from fwmodel.train.model import build_model
    from fwmodel.inference import _CollectLog, run_config
    from fwmodel.checkpoint import read_checkpoint_header

    path = stage1_checkpoint if stage == 1 else stage2_checkpoint
    loaded = load_model(path, device="cpu")
    assert loaded.stage == stage and loaded.step == 2
    params = dict(loaded.model.named_parameters())
    tensors = load_file(str(path))
    assert tensors and all(torch.equal(params[k], t.to(params[k].dtype)) for k, t in tensors.items())
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training

    # the frozen backbone is the one the run trained against: seeded with the run's train.seed
    cfg = run_config(path, read_checkpoint_header(path))
    cfg.model.backbone_dtype = "float32"
    same = build_model(cfg, torch.device("cpu"), _CollectLog())
    cfg.train.seed += 1
    other = build_model(cfg, torch.device("cpu"), _CollectLog())
    name, p = next(iter(loaded.model.backbone.named_parameters()))
    assert torch.equal(p, dict(same.backbone.named_parameters())[name])
    assert not torch.equal(p, dict(other.backbone.named_parameters())[name])


def test_prediction_is_deterministic_and_depends_on_the_weights(stage1_checkpoint, stage2_checkpoint):
    a = load_model(stage1_checkpoint, device="cpu")
    latents, text = _cached_inputs(a)
    t = torch.tensor([100.0])
    p1 = predict(a, latents, text, t)
    p2 = predict(load_model(stage1_checkpoint, device="cpu"), latents, text, t)
    B, T, H, W = p1.depth.shape
    assert (B, T) == (1, 5) and p1.points.shape == (B, T, H, W, 3) and p1.w2c.shape == (B, T, 4, 4)
    assert torch.equal(p1.depth, p2.depth) and torch.equal(p1.w2c, p2.w2c)
    assert torch.allclose(p1.K[..., 0, 2], torch.tensor(W / 2))  # principal point at the centre
    p3 = predict(load_model(stage2_checkpoint, device="cpu"), latents, text, t)
    assert not torch.equal(p1.depth, p3.depth)  # Stage 2 trained the geometry further


def test_damaged_or_foreign_checkpoints_are_refused(stage1_checkpoint, tmp_path):
    bad = tmp_path / "step-2.safetensors"
    shutil.copy(stage1_checkpoint, bad)
    shutil.copy(stage1_checkpoint.with_suffix(".json"), bad.with_suffix(".json"))
    data = bytearray(bad.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged: its sha256 does not match"):
        load_model(bad, device="cpu")
    (tmp_path / "x.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged or not a safetensors file"):
        load_model(tmp_path / "x.safetensors", device="cpu")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.safetensors", device="cpu")


def test_encoders_come_from_the_runs_cache_or_the_options(stage1_checkpoint, encoders):
    loaded = load_model(stage1_checkpoint, device="cpu")
    vae, text = load_encoders(loaded)  # recorded by the run's latent cache
    assert str(vae.dir).startswith(str(encoders)) and text.dim == 16
    loaded.config.data.root = None
    with pytest.raises(InferenceError, match="pass --vae and --text-encoder"):
        load_encoders(loaded)
    vae, text = load_encoders(loaded, vae="random-tiny", text_encoder="random-tiny")
    assert vae.random_tiny and text.random_tiny
