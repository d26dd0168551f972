"""Loss maths: NaN/Inf ground truth is masked, confidence terms, camera iterates, flow matching."""

from __future__ import annotations

import math

import pytest
import torch

from fwmodel.losses import (
    DiffusionConfig,
    LossConfig,
    add_noise,
    camera_loss,
    compute_losses,
    dense_loss,
    flow_sigmas,
    timestep_weights,
)


def _outputs(B=2, T=5, H=16, W=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {
        "depth": (torch.rand(B, T, H, W, 1, generator=g) + 0.5).requires_grad_(),
        "depth_conf": (1 + torch.rand(B, T, H, W, generator=g)).requires_grad_(),
        "points": torch.randn(B, T, H, W, 3, generator=g).requires_grad_(),
        "points_conf": (1 + torch.rand(B, T, H, W, generator=g)).requires_grad_(),
        "pose_enc_list": [torch.randn(B, T, 9, generator=g).requires_grad_() for _ in range(4)],
        "video": None,
    }
    out["pose_enc"] = out["pose_enc_list"][-1]
    return out


def _batch(B=2, T=5, H=16, W=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "depth": torch.rand(B, T, H, W, generator=g) + 0.5,
        "depth_valid": torch.ones(B, T, H, W, dtype=torch.bool),
        "points": torch.randn(B, T, H, W, 3, generator=g),
        "points_valid": torch.ones(B, T, H, W, dtype=torch.bool),
        "pose_enc": torch.randn(B, T, 9, generator=g),
    }


def test_nan_and_inf_in_ground_truth_are_masked_never_propagated():
    cfg = LossConfig(valid_quantile=1.0)
    clean = _batch()
    dirty = {k: v.clone() for k, v in clean.items()}
    dirty["depth"][0, 1, 2, 3] = float("nan")
    dirty["depth"][1, 0, :4] = float("inf")
    dirty["points"][0, 2, 5, 5, 1] = float("nan")
    dirty["points"][1, 4, 0, 0] = -float("inf")
    dirty["pose_enc"][0, 3, 2] = float("nan")
    masked = {k: v.clone() for k, v in clean.items()}
    masked["depth_valid"][0, 1, 2, 3] = False
    masked["depth_valid"][1, 0, :4] = False
    masked["points_valid"][0, 2, 5, 5] = False
    masked["points_valid"][1, 4, 0, 0] = False

    out = _outputs()
    loss = compute_losses(out, dirty, stage=1, cfg=cfg)
    assert torch.isfinite(loss.total) and all(torch.isfinite(v) for v in loss.terms.values())
    loss.total.backward()
    for t in [out["depth"], out["depth_conf"], out["points"], out["points_conf"], *out["pose_enc_list"]]:
        assert torch.isfinite(t.grad).all()
    # same as marking those pixels invalid (the NaN pose frame is simply left out of the camera loss)
    ref = compute_losses(_outputs(), masked, stage=1, cfg=cfg)
    for key in ("loss/depth_loss", "loss/point_loss"):
        assert loss.terms[key] == pytest.approx(ref.terms[key].item(), rel=1e-6)


def test_dense_loss_parts_and_confidence():
    cfg = LossConfig(valid_quantile=1.0, min_valid_pixels=1)
    gt = torch.rand(3, 8, 8, 1) + 1
    valid = torch.ones(3, 8, 8, dtype=torch.bool)
    conf = torch.ones(3, 8, 8)  # c = 1: conf term = reg, -alpha log c = 0
    exact = dense_loss(gt.clone(), conf, gt, valid, cfg, temporal=True)
    assert exact["reg"] == 0 and exact["conf"] == 0 and exact["grad"] == 0
    off = dense_loss(gt + 0.1, conf, gt, valid, cfg, temporal=True)
    assert off["reg"].item() == pytest.approx(0.1, rel=1e-5)  # plain mean error
    assert off["conf"].item() == pytest.approx(0.1, rel=1e-5)
    assert off["grad"].item() == pytest.approx(0.0, abs=1e-6)  # a constant offset has no gradient error
    confident = dense_loss(gt + 0.1, torch.full((3, 8, 8), 2.0), gt, valid, cfg, temporal=True)
    assert confident["conf"].item() == pytest.approx(0.2 - 0.2 * math.log(2), rel=1e-5)
    few = dense_loss(gt + 1, conf, gt, torch.zeros_like(valid), cfg, temporal=True)
    assert few["total"] == 0  # nothing valid: zero, still connected to the graph


def test_camera_loss_weights_iterates_and_skips_invalid_frames():
    cfg = LossConfig()
    gt = torch.zeros(5, 9)
    preds = [torch.full((5, 9), 0.1 * (i + 1)) for i in range(4)]
    out = camera_loss(preds, gt, torch.ones(5, dtype=torch.bool), cfg)
    weights = [0.6**3, 0.6**2, 0.6, 1.0]
    expected = sum(w * 0.1 * (i + 1) for i, w in enumerate(weights)) / 4
    assert out["T"].item() == pytest.approx(expected, rel=1e-5)
    assert out["total"].item() == pytest.approx(expected * (1 + 1 + 0.5), rel=1e-5)
    assert out["last"].item() == pytest.approx(0.4, rel=1e-5)
    at_gt = camera_loss([gt.clone() for _ in range(4)], gt, torch.ones(5, dtype=torch.bool), cfg)
    assert at_gt["total"] == 0
    none = camera_loss(preds, gt, torch.zeros(5, dtype=torch.bool), cfg)
    assert none["total"] == 0


def test_flow_matching_schedule_and_noise():
    cfg = DiffusionConfig()
    sigmas = flow_sigmas(cfg)
    assert len(sigmas) == 1000 and sigmas[0] == pytest.approx(1.0) and (sigmas[1:] < sigmas[:-1]).all()
    assert sigmas[500].item() == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))  # shifted
    assert timestep_weights(cfg).mean().item() == pytest.approx(1.0)
    z0 = torch.randn(2, 16, 2, 4, 6)
    a, b = add_noise(z0, cfg, [1, 2]), add_noise(z0, cfg, [1, 2])
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.timestep, b.timestep)
    one = add_noise(z0[1:], cfg, [2])  # a sample's noise depends on its seed only, not on the batch
    assert torch.equal(one.noisy[0], a.noisy[1])
    s = a.sigma.view(-1, 1, 1, 1, 1)
    eps = a.target + z0
    assert torch.allclose(a.noisy, (1 - s) * z0 + s * eps, atol=1e-5)
    assert torch.allclose(a.timestep, a.sigma * 1000)


def test_stage2_total_adds_diffusion():
    cfg = LossConfig()
    out = _outputs()
    z0 = torch.randn(2, 16, 2, 2, 3)
    noised = add_noise(z0, DiffusionConfig(), [3, 4])
    out["video"] = torch.zeros_like(z0, requires_grad=True)
    loss = compute_losses(out, _batch(), stage=2, cfg=cfg, noised=noised)
    geo = loss.terms["loss/geometry"]
    assert loss.terms["loss/total"].item() == pytest.approx((loss.terms["loss/diffusion"] + cfg.lambda_geo * geo).item())
    assert loss.terms["loss/geometry"].item() == pytest.approx(
        (loss.terms["loss/depth_loss"] + loss.terms["loss/point_loss"] + 3 * loss.terms["loss/camera_loss"]).item(),
        rel=1e-6)
