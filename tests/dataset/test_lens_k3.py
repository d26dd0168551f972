"""The lens's k3 (r^6 radial) term end to end: the maths in fwdata.dataset.lens, the record, the
`--intrinsics` parser, the COLMAP camera given to SfM (FULL_OPENCV) and read back.

The lens is TUM fr1's published calibration (k3 = 1.1633, the one that made the fr1/rpy clip fail
the gate when k3 was dropped) at 640x480."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fwdata.dataset.lens import (Lens, Undistortion, _jacobian, check_lens, distort_normalized, distort_pixels,
                                 lens_from_dict, undistort_pixels)

K_FR1 = np.array([[517.3, 0.0, 318.6], [0.0, 516.5, 255.3], [0.0, 0.0, 1.0]])
FR1 = Lens(k1=0.2624, k2=-0.9531, p1=-0.0054, p2=0.0026, k3=1.1633)
H, W = 480, 640


def _grid(step: float = 8.0) -> np.ndarray:
    """Pixel positions (N,2) over the whole 640x480 image, its border included."""
    u, v = np.meshgrid(np.arange(0.0, W + step / 2, step), np.arange(0.0, H + step / 2, step))
    return np.stack([u.ravel(), v.ravel()], -1)


def test_round_trip_with_k3_to_1e6_px():
    """distort then undistort (and the other way) returns every pixel of the image to 1e-6 px."""
    check_lens(FR1, K_FR1, H, W)  # one-to-one over the image
    uv = _grid()
    back = undistort_pixels(distort_pixels(uv, K_FR1, FR1), K_FR1, FR1)
    assert np.abs(back - uv).max() < 1e-6
    forth = distort_pixels(undistort_pixels(uv, K_FR1, FR1), K_FR1, FR1)
    assert np.abs(forth - uv).max() < 1e-6
    # k3 matters at the edges: the same lens without it puts the corner pixels elsewhere by pixels
    no_k3 = Lens(FR1.k1, FR1.k2, FR1.p1, FR1.p2)
    shift = np.linalg.norm(undistort_pixels(uv, K_FR1, FR1) - undistort_pixels(uv, K_FR1, no_k3), axis=-1)
    assert shift.max() > 20.0 and shift.min() < 1e-3, (shift.max(), shift.min())


def test_forward_model_matches_colmap_full_opencv():
    """Our distortion is COLMAP's FULL_OPENCV camera with k4 = k5 = k6 = 0 (pixel centres at +0.5 in both)."""
    import pycolmap

    cam = pycolmap.Camera(model="FULL_OPENCV", width=W, height=H,
                          params=[517.3, 516.5, 318.6, 255.3, FR1.k1, FR1.k2, FR1.p1, FR1.p2, FR1.k3, 0.0, 0.0, 0.0])
    rng = np.random.default_rng(0)
    xy = rng.uniform([-0.62, -0.5], [0.62, 0.5], size=(500, 2))
    pts = np.concatenate([xy, np.ones((500, 1))], 1)
    ours = distort_pixels(xy @ K_FR1[:2, :2].T + K_FR1[:2, 2], K_FR1, FR1)
    np.testing.assert_allclose(ours, cam.img_from_cam(pts), atol=1e-9)


def test_jacobian_with_k3_matches_finite_differences():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-0.6, 0.6, 200), rng.uniform(-0.45, 0.45, 200)
    a, b, c, d = _jacobian(x, y, FR1)
    h = 1e-6
    dxd_dx = (np.stack(distort_normalized(x + h, y, FR1)) - np.stack(distort_normalized(x - h, y, FR1))) / (2 * h)
    dxd_dy = (np.stack(distort_normalized(x, y + h, FR1)) - np.stack(distort_normalized(x, y - h, FR1))) / (2 * h)
    np.testing.assert_allclose(a, dxd_dx[0], atol=1e-7)
    np.testing.assert_allclose(c, dxd_dx[1], atol=1e-7)
    np.testing.assert_allclose(b, dxd_dy[0], atol=1e-7)
    np.testing.assert_allclose(d, dxd_dy[1], atol=1e-7)


def test_lens_without_k3_keeps_its_bits_and_its_record():
    lens = Lens(-0.12, 0.03, 0.0008, -0.0005)
    x, y = np.meshgrid(np.linspace(-0.6, 0.6, 31), np.linspace(-0.4, 0.4, 21))
    r2 = x * x + y * y
    radial = 1.0 + lens.k1 * r2 + lens.k2 * r2 * r2  # the formula before k3 existed, operation for operation
    xd, yd = distort_normalized(x, y, lens)
    assert np.array_equal(xd, x * radial + 2.0 * lens.p1 * x * y + lens.p2 * (r2 + 2.0 * x * x))
    assert np.array_equal(yd, y * radial + lens.p1 * (r2 + 2.0 * y * y) + 2.0 * lens.p2 * x * y)
    assert json.dumps(lens.to_dict()) == ('{"model": "OPENCV", "k1": -0.12, "k2": 0.03, "p1": 0.0008, '
                                          '"p2": -0.0005}')
    assert lens.model == "OPENCV" and lens_from_dict(lens.to_dict()) == lens
    assert FR1.to_dict() == {"model": "FULL_OPENCV", "k1": 0.2624, "k2": -0.9531, "p1": -0.0054, "p2": 0.0026,
                             "k3": 1.1633}
    assert lens_from_dict(FR1.to_dict()) == FR1
    assert not Lens(k3=0.1).is_identity and Lens(k3=0.0).is_identity


def test_undistortion_observations_follow_k3():
    """A pinhole point seen through the lens comes back to its pinhole pixel through `Undistortion.pixels`."""
    u = Undistortion.create(K_FR1, FR1, H, W)
    rng = np.random.default_rng(2)
    pin = rng.uniform([20, 20], [W - 20, H - 20], size=(300, 2))  # pinhole pixels of the output camera u.K
    x = (pin[:, 0] - u.K[0, 2]) / u.K[0, 0]
    y = (pin[:, 1] - u.K[1, 2]) / u.K[1, 1]
    xd, yd = distort_normalized(x, y, FR1)
    seen = np.stack([K_FR1[0, 0] * xd + K_FR1[0, 2], K_FR1[1, 1] * yd + K_FR1[1, 2]], -1)
    assert np.abs(u.pixels(seen) - pin).max() < 1e-6


def test_parse_intrinsics_accepts_k3_and_keeps_the_old_forms():
    from fwdata.build.cli import parse_intrinsics

    assert parse_intrinsics("500,501,320,240") == ((500.0, 501.0, 320.0, 240.0), None)
    assert parse_intrinsics("500,501,320,240,-0.1") == ((500.0, 501.0, 320.0, 240.0), (-0.1, 0.0, 0.0, 0.0))
    assert parse_intrinsics("500,501,320,240,-0.1,0.02,0.001,0.002")[1] == (-0.1, 0.02, 0.001, 0.002)
    k, d = parse_intrinsics("517.3,516.5,318.6,255.3,0.2624,-0.9531,-0.0054,0.0026,1.1633")
    assert k == (517.3, 516.5, 318.6, 255.3) and d == (0.2624, -0.9531, -0.0054, 0.0026, 1.1633)
    # k3 = 0 is the OPENCV lens: the same config (and record) as the 8-number form
    assert parse_intrinsics("500,501,320,240,-0.1,0.02,0.001,0.002,0")[1] == (-0.1, 0.02, 0.001, 0.002)
    for bad in ("500,501,320,240,1,2,3", "500,501,320,240,1,2,3,4,5,6", "500,501,320,240,1,2,3,4,nan"):
        with pytest.raises(ValueError, match="k1,k2,p1,p2,k3"):
            parse_intrinsics(bad)


def test_build_cli_rejects_a_bad_distortion_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from fwdata.cli import app

    r = CliRunner().invoke(app, ["build", str(tmp_path), "--out", str(tmp_path / "ds"),
                                 "--intrinsics", "500,501,320,240,1,2,3,4,5,6"])
    assert r.exit_code == 2
    assert "k1,k2,p1,p2,k3" in r.output and "Traceback" not in r.output


def test_given_k3_makes_a_full_opencv_camera_and_reads_back():
    import pycolmap

    from fwdata.build.pipeline import BuildConfig
    from fwdata.build.sfm import SfmError, SfmOptions, camera_intrinsics, initial_camera, max_extra_param

    opts = SfmOptions(intrinsics=(517.3, 516.5, 318.6, 255.3), distortion=(0.2624, -0.9531, -0.0054, 0.0026, 1.1633))
    model, params = initial_camera(H, W, opts)
    assert model == "FULL_OPENCV"
    assert params == [517.3, 516.5, 318.6, 255.3, 0.2624, -0.9531, -0.0054, 0.0026, 1.1633, 0.0, 0.0, 0.0]
    K, lens = camera_intrinsics(pycolmap.Camera(model=model, width=W, height=H, params=params))
    np.testing.assert_array_equal(K, K_FR1)
    assert lens == FR1
    # COLMAP calls a camera with a coefficient above its max_extra_param (1) bogus and maps nothing with it
    assert max_extra_param(opts) == 2 * 1.1633 and max_extra_param(SfmOptions()) == 1.0
    assert max_extra_param(opts.model_copy(update={"distortion": (-0.2, 0.03, 0.0, 0.0)})) == 1.0
    # without k3 (or with k3 = 0) the camera stays OPENCV, as before
    for dist in ((0.2624, -0.9531, -0.0054, 0.0026), (0.2624, -0.9531, -0.0054, 0.0026, 0.0)):
        model, params = initial_camera(H, W, opts.model_copy(update={"distortion": dist}))
        assert model == "OPENCV" and params == [517.3, 516.5, 318.6, 255.3, 0.2624, -0.9531, -0.0054, 0.0026]
    with pytest.raises(SfmError, match="k4-k6"):
        camera_intrinsics(pycolmap.Camera(model="FULL_OPENCV", width=W, height=H, params=params + [0.0, 0.1, 0, 0]))
    cfg = BuildConfig(intrinsics=(517.3, 516.5, 318.6, 255.3), distortion=(0.1, 0.0, 0.0, 0.0, 0.5))
    assert cfg.distortion == (0.1, 0.0, 0.0, 0.0, 0.5)
    with pytest.raises(ValueError):
        BuildConfig(intrinsics=(517.3, 516.5, 318.6, 255.3), distortion=(0.1, 0.0, 0.0))


def test_source_camera_record_names_full_opencv_only_with_k3():
    from pydantic import ValidationError

    from fwdata.dataset.contract import SourceCamera

    base = dict(estimated=False, fx=517.3, fy=516.5, cx=318.6, cy=255.3, k1=0.2624, k2=-0.9531, p1=-0.0054, p2=0.0026)
    old = SourceCamera(model="OPENCV", **base)
    assert "k3" not in json.loads(old.model_dump_json()) and "k3" not in old.model_dump()
    assert list(json.loads(old.model_dump_json())) == ["model", "estimated", "fx", "fy", "cx", "cy", "k1", "k2",
                                                       "p1", "p2", "pinhole_focal_scale"]
    full = SourceCamera(model="FULL_OPENCV", k3=1.1633, **base)
    doc = json.loads(full.model_dump_json())
    assert doc["k3"] == 1.1633 and SourceCamera.model_validate(doc) == full
    assert SourceCamera.model_validate(json.loads(old.model_dump_json())).k3 == 0.0  # older records
    with pytest.raises(ValidationError, match="FULL_OPENCV"):
        SourceCamera(model="OPENCV", k3=0.5, **base)


def test_synth_lens_option_carries_k3():
    from fwdata.synth.effects import Effects

    fx = Effects(k1=-0.2, k3=0.4)
    assert fx.lens == Lens(k1=-0.2, k3=0.4) and fx.changed() == {"k1": -0.2, "k3": 0.4} and fx.active
    assert "k3" not in Effects(k1=-0.2).changed()  # clips without k3 keep their ids
    with pytest.raises(ValueError, match="k3"):
        Effects(k3=5.0).check()
