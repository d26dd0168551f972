"""Output shapes of every head, causal temporal upsampling, and the camera head's frame expansion."""

from __future__ import annotations

import pytest
import torch

from fwmodel.heads import CameraHead, CausalTemporalUpsampler


@pytest.mark.parametrize("latent_hw", [(4, 6), (6, 4)], ids=["landscape", "portrait"])
def test_output_shapes_for_1_5_9_frames(tiny_model, inputs_for, tiny_config, latent_hw):
    tiny_model.eval()
    Hl, Wl = latent_hw
    H, W = 8 * Hl, 8 * Wl
    for S, T in [(1, 1), (2, 5), (3, 9)]:
        x = inputs_for(tiny_config, num_latent_frames=S, latent_hw=latent_hw, batch=2)
        with torch.no_grad():
            out = tiny_model(**x)
        assert out["video"].shape == (2, 16, S, Hl, Wl)
        assert out["depth"].shape == (2, T, H, W, 1)
        assert out["depth_conf"].shape == (2, T, H, W)
        assert out["points"].shape == (2, T, H, W, 3)
        assert out["points_conf"].shape == (2, T, H, W)
        assert len(out["pose_enc_list"]) == tiny_config.geometry.camera_iterations
        assert all(p.shape == (2, T, 9) for p in out["pose_enc_list"])
        assert out["pose_enc"] is out["pose_enc_list"][-1]
        assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all() and (out["points_conf"] > 1).all()
        assert (out["pose_enc"][..., 7:] >= 0).all()  # fields of view through ReLU
        assert all(torch.isfinite(v).all() for k, v in out.items() if torch.is_tensor(v))


def test_geometry_only_mode_matches_full_forward_at_init(tiny_model, inputs_for, tiny_config):
    """Stage 1 runs geometry only (no video halves, no bi-cross); with zero gates it is the same geometry."""
    tiny_model.eval()
    x = inputs_for(tiny_config, num_latent_frames=2)
    with torch.no_grad():
        full = tiny_model(**x)
        geometry_only = tiny_model(**x, video=False)
    assert geometry_only["video"] is None
    for key in ("depth", "depth_conf", "points", "points_conf", "pose_enc"):
        torch.testing.assert_close(geometry_only[key], full[key], rtol=0, atol=1e-6)


def test_temporal_upsampling_is_causal_and_aligned():
    """Latent frame 0 -> video frame 0; latent k >= 1 -> video frames 4k-3 .. 4k, never earlier ones."""
    torch.manual_seed(0)
    upsampler = CausalTemporalUpsampler(4).eval()
    x = torch.randn(1, 4, 3, 2, 2)
    with torch.no_grad():
        y = upsampler(x)
        assert y.shape == (1, 4, 9, 2, 2)
        x2 = x.clone()
        x2[:, :, 2] += 1.0  # change latent frame 2 only
        y2 = upsampler(x2)
    changed = [(y2[:, :, t] - y[:, :, t]).abs().max().item() > 0 for t in range(9)]
    assert changed == [False] * 5 + [True] * 4


def _camera_head(expand: str) -> CameraHead:
    torch.manual_seed(0)
    return CameraHead(
        dim_in=8, trunk_depth=1, num_heads=2, mlp_ratio=2, layerscale_init=0.01, iterations=2, expand=expand
    ).eval()


def test_camera_head_expansion_follows_latent_frames():
    head = _camera_head("per_latent_frame")
    tokens = torch.randn(1, 3, 8)
    with torch.no_grad():
        base = head.expand_to_frames(tokens)
        assert base.shape == (1, 9, 8)
        moved = tokens.clone()
        moved[:, 1] += 1.0  # latent frame 1 feeds video frames 1..4 only
        changed = (head.expand_to_frames(moved) - base).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False, True, True, True, True, False, False, False, False]


def test_camera_head_release_raw_reshape_interleaves_latent_frames():
    """The published raw reshape feeds frame 1 + j from latent 1 + (j mod (S-1))."""
    head = _camera_head("release_raw_reshape")
    tokens = torch.randn(1, 3, 8)
    with torch.no_grad():
        base = head.expand_to_frames(tokens)
        moved = tokens.clone()
        moved[:, 1] += 1.0
        changed = (head.expand_to_frames(moved) - base).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False, True, False, True, False, True, False, True, False]
