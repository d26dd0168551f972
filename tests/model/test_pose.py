"""Torch camera maths (fwmodel.pose) agree with fwdata.dataset.camera; pose encodings round-trip through decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fwmodel import pose

camera = pytest.importorskip("fwdata.dataset.camera")

H, W = 48, 80


def _random_cameras(n: int, seed: int = 0):
    """n random w2c (n,4,4) with rotations of every size (incl. near 180 degrees) and intrinsics K (n,3,3)."""
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.concatenate([[0.0, np.pi - 1e-3, np.pi / 2], rng.uniform(0, np.pi, n - 3)])
    q = np.concatenate([axes * np.sin(angles / 2)[:, None], np.cos(angles / 2)[:, None]], axis=1)
    R = camera.quaternion_xyzw_to_rotation(q)
    w2c = camera.make_pose(R, rng.normal(size=(n, 3)))
    K = camera.intrinsics_matrix(rng.uniform(30, 120, n), rng.uniform(30, 120, n), W / 2, H / 2)
    return w2c, K


def test_encode_decode_agree_with_fwdata():
    w2c, K = _random_cameras(64)
    enc_np = camera.encode_pose(w2c, K, H, W)
    enc_t = pose.encode_pose(torch.from_numpy(w2c), torch.from_numpy(K), H, W)
    np.testing.assert_allclose(enc_t.numpy(), enc_np, atol=1e-9)

    w2c_np, K_np = camera.decode_pose(enc_np, H, W)
    w2c_t, K_t = pose.decode_pose(torch.from_numpy(enc_np), H, W)
    np.testing.assert_allclose(w2c_t.numpy(), w2c_np, atol=1e-9)
    np.testing.assert_allclose(K_t.numpy(), K_np, atol=1e-9)
    np.testing.assert_allclose(w2c_t.numpy(), w2c, atol=1e-9)  # principal point at the centre: exact K
    np.testing.assert_allclose(K_t.numpy(), K, atol=1e-9)


def test_camera_head_output_round_trips_through_decoding(tiny_model, inputs_for, tiny_config):
    """Decoding the camera head's raw output and encoding it again gives the canonical encoding."""
    tiny_model.eval()
    with torch.no_grad():
        enc = tiny_model(**inputs_for(tiny_config, num_latent_frames=2), video=False)["pose_enc"].double()
    enc[..., 7:] = enc[..., 7:].clamp(min=0.1)  # a usable field of view (the head's ReLU allows 0)
    w2c, K = pose.decode_pose(enc, H, W)
    again = pose.encode_pose(w2c, K, H, W)
    q = torch.nn.functional.normalize(enc[..., 3:7], dim=-1)
    q = torch.where(q[..., 3:] < 0, -q, q)
    canonical = torch.cat([enc[..., :3], q, enc[..., 7:]], dim=-1)
    torch.testing.assert_close(again, canonical, rtol=0, atol=1e-9)
    w2c_np, K_np = camera.decode_pose(enc.numpy(), H, W)  # and the data-side decoder agrees
    np.testing.assert_allclose(w2c.numpy(), w2c_np, atol=1e-9)
    np.testing.assert_allclose(K.numpy(), K_np, atol=1e-9)


def test_plucker_rays_agree_with_fwdata():
    w2c, K = _random_cameras(5, seed=1)
    c2w = camera.w2c_to_c2w(w2c)
    expected = camera.plucker_rays(K, c2w, 6, 10)
    ours = pose.plucker_rays(torch.from_numpy(K), torch.from_numpy(c2w), 6, 10)
    assert ours.shape == (5, 6, 10, 6)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-9)


def test_release_double_scaled_plucker_is_nearly_constant():
    w2c, K = _random_cameras(4, seed=2)
    c2w = torch.from_numpy(camera.w2c_to_c2w(w2c[3]))

    def spread(release: bool) -> float:
        rays = pose.plucker_rays(torch.from_numpy(K[3]), c2w, H, W, release_double_scaled=release)
        directions = rays[..., 3:].reshape(-1, 3)
        return (directions - directions.mean(0)).norm(dim=-1).max().item()

    assert spread(True) < 0.05 * spread(False)
