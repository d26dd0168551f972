"""Shared helpers for the model tests: tiny presets and random inputs (no weights, no network)."""

from __future__ import annotations

import pytest
import torch

from fwmodel.config import VAE_SPATIAL, ModelConfig, get_preset


def tiny_i2v_config() -> ModelConfig:
    """The tiny preset with an I2V backbone (36 input channels, CLIP image tokens): the tiny-i2v preset."""
    return get_preset("tiny-i2v")


def make_inputs(
    config: ModelConfig, num_latent_frames: int = 2, latent_hw=(4, 6), batch: int = 1, plucker: bool = True, seed=0
) -> dict:
    """Random model inputs for `config`; text is 512 tokens for I2V (the Wan I2V processor needs that)."""
    g = torch.Generator().manual_seed(seed)
    S, (Hl, Wl) = num_latent_frames, latent_hw
    T = 1 + 4 * (S - 1)
    i2v = config.wan.image_dim is not None
    inputs = {
        "latents": torch.randn(batch, 16, S, Hl, Wl, generator=g),
        "timestep": torch.full((batch,), 400.0),
        "text": torch.randn(batch, 512 if i2v else 7, config.wan.text_dim, generator=g),
    }
    if i2v:
        inputs["condition"] = torch.randn(batch, config.wan.in_channels - 16, S, Hl, Wl, generator=g)
        inputs["image_embeds"] = torch.randn(batch, 3, config.wan.image_dim, generator=g)
    if plucker:
        inputs["plucker"] = torch.randn(batch, T, Hl * VAE_SPATIAL, Wl * VAE_SPATIAL, 6, generator=g)
    return inputs


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return get_preset("tiny")


@pytest.fixture()
def tiny_model(tiny_config):
    from fwmodel.model import FantasyWorldModel

    torch.manual_seed(0)
    return FantasyWorldModel(tiny_config)


@pytest.fixture(scope="session")
def inputs_for():
    """make_inputs as a fixture (test modules here are not a package, so they cannot import conftest)."""
    return make_inputs


@pytest.fixture(scope="session")
def i2v_config() -> ModelConfig:
    return tiny_i2v_config()
