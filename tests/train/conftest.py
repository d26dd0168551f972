"""Shared fixtures for the trainer tests: a small synthetic dataset, tiny random encoders, caches.

Everything is CPU, tiny preset, no network: the dataset is rendered (2 rooms, 9 frames, 64x96, true
depth and cameras), the VAE and UMT5 are tiny random models written to disk, and the latent caches
are made with the real `fwmodel cache` code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY1 = REPO / "fwmodel/recipes/tiny-stage1.toml"
TINY2 = REPO / "fwmodel/recipes/tiny-stage2.toml"
# Smaller clips than the tiny recipe (16x32) for the long overfit runs.
OVERFIT = {"data.height": 16, "data.width": 32}


@pytest.fixture(scope="session")
def encoders(tmp_path_factory) -> Path:
    from fwmodel.cache import write_tiny_encoders

    return write_tiny_encoders(tmp_path_factory.mktemp("encoders"), text_dim=16)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, encoders) -> Path:
    """2 synthetic clips (9 frames, 64x96), cached for the tiny recipe (5 x 32x48) and for 5 x 16x32."""
    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset
    from fwmodel.cache import CacheOptions, build_cache
    from fwmodel.train.config import load_config

    root = tmp_path_factory.mktemp("data") / "ds"
    write_synthetic_dataset(root, SynthOptions(num_scenes=2, num_frames=9, height=64, width=96, write_ply=False))
    torch.set_num_threads(1)
    for overrides in ({}, OVERFIT):
        cfg = load_config(TINY1, dict(overrides))
        build_cache(CacheOptions(dataset=root, vae=encoders, text_encoder=encoders, data=cfg.data, device="cpu"))
    return root


@pytest.fixture()
def dataset_copy(dataset, tmp_path) -> Path:
    """A private copy of the dataset (for tests that modify it)."""
    target = tmp_path / "ds"
    shutil.copytree(dataset, target)
    return target


def tiny_config(stage: int, data: Path, output: Path, **overrides):
    from fwmodel.train.config import load_config

    values = {"data.root": str(data), "train.output": str(output)}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(TINY1 if stage == 1 else TINY2, values)


@pytest.fixture(scope="session")
def stage1_checkpoint(tmp_path_factory, dataset) -> Path:
    """A Stage-1 checkpoint of the tiny recipe (2 steps)."""
    from fwmodel.train import train

    out = tmp_path_factory.mktemp("stage1")
    torch.set_num_threads(1)
    cfg = tiny_config(1, dataset, out, train__num_steps=2, train__checkpoint_every=2)
    train(cfg, quiet=True)
    return out / "step-2.safetensors"


@pytest.fixture(scope="session")
def make_config():
    return tiny_config


@pytest.fixture(scope="session")
def recipes() -> dict:
    return {1: TINY1, 2: TINY2, "dir": REPO / "fwmodel/recipes"}


def read_metrics(output: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def metrics_of():
    return read_metrics


@pytest.fixture(scope="session")
def stage2_checkpoint(tmp_path_factory, dataset, stage1_checkpoint) -> Path:
    """A Stage-2 checkpoint of the tiny recipe (2 steps from the Stage-1 one)."""
    from fwmodel.train import train

    out = tmp_path_factory.mktemp("stage2")
    torch.set_num_threads(1)
    cfg = tiny_config(2, dataset, out, train__num_steps=2, train__checkpoint_every=2,
                      model__init_from=str(stage1_checkpoint))
    train(cfg, quiet=True)
    return out / "step-2.safetensors"
