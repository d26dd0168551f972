"""Undistortion (fwdata.dataset.lens.Undistortion): a clip seen through a lens, resampled onto the
pinhole grid, matches the pinhole render of the same poses; observations map onto the same rays."""

from __future__ import annotations

import numpy as np
import pytest

from fwdata.dataset.lens import Lens, Undistortion, distort_pixels, pinhole_focal_scale
from fwdata.synth.effects import Effects, make_effects_clip

LENS = Lens(k1=-0.2, k2=0.04, p1=0.001, p2=-0.0008)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


@pytest.fixture(scope="module")
def pair():
    """(pinhole render, the same poses through LENS) of a 3-frame orbit, 96x160."""
    kw = dict(num_frames=3, height=96, width=160)
    clean = make_effects_clip(3, "orbit", Effects(), **kw)
    lensed = make_effects_clip(3, "orbit", Effects(k1=LENS.k1, k2=LENS.k2, p1=LENS.p1, p2=LENS.p2), **kw)
    return clean, lensed


def test_undistorted_frames_match_the_pinhole_render(pair):
    clean, lensed = pair
    u = Undistortion.create(lensed.K, LENS, 96, 160)
    assert np.allclose(u.K, clean.K)  # barrel: the same focal, no zoom needed
    inner = (slice(None), slice(2, -2), slice(2, -2))
    ours = _psnr(u.frames(lensed.frames)[inner], clean.frames[inner])
    untouched = _psnr(lensed.frames[inner], clean.frames[inner])
    wrong = _psnr(Undistortion.create(lensed.K, Lens(k1=-0.1), 96, 160).frames(lensed.frames)[inner],
                  clean.frames[inner])
    assert ours > 26.0, ours
    assert ours > untouched + 6.0 and ours > wrong + 3.0, (ours, untouched, wrong)


def test_depth_maps_follow_the_rays(pair):
    clean, lensed = pair
    u = Undistortion.create(lensed.K, LENS, 96, 160)
    # the lensed depth as a camera with this lens records it: nearest pinhole pixel of each ray
    uu, vv = np.meshgrid(np.arange(160) + 0.5, np.arange(96) + 0.5)
    from fwdata.dataset.lens import undistort_pixels

    p = undistort_pixels(np.stack([uu, vv], -1), clean.K, LENS)
    col = np.clip(np.floor(p[..., 0]).astype(int), 0, 159)
    row = np.clip(np.floor(p[..., 1]).astype(int), 0, 95)
    seen = clean.depth[:, row, col]
    back, valid = u.maps(seen, np.ones_like(seen, bool))
    rel = np.abs(back - clean.depth) / clean.depth
    assert valid.all()
    assert np.median(rel) < 0.002 and np.mean(rel < 0.02) > 0.97


def test_observations_map_to_the_same_rays():
    K = np.array([[300.0, 0, 168], [0, 300.0, 96], [0, 0, 1]])
    u = Undistortion.create(K, LENS, 192, 336)
    rng = np.random.default_rng(0)
    pin = rng.uniform([10, 10], [326, 182], (200, 2))
    seen = distort_pixels(pin, K, LENS)  # where the lens records the pinhole pixel
    assert np.abs(u.pixels(seen) - pin).max() < 1e-6
    assert np.abs(seen - pin).max() > 5  # the lens does move them


def test_pincushion_zooms_just_enough():
    K = np.array([[300.0, 0, 168], [0, 300.0, 96], [0, 0, 1]])
    lens = Lens(k1=0.1)
    s = pinhole_focal_scale(K, lens, 192, 336)
    assert 1.0 < s < 1.2
    u = Undistortion.create(K, lens, 192, 336)
    rc = u.source_coordinates()
    # every output pixel samples inside the recorded image (array indices -0.5 .. size - 0.5), tightly
    assert rc[0].min() >= -0.5 - 1e-6 and rc[0].max() <= 191.5 + 1e-6
    assert rc[1].min() >= -0.5 - 1e-6 and rc[1].max() <= 335.5 + 1e-6
    assert max(-rc[1].min(), rc[1].max() - 335) > -0.5 - 2.0  # touches the border (within 2 px)
    assert pinhole_focal_scale(K, Lens(k1=-0.1), 192, 336) == 1.0
