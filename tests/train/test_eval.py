"""`fwmodel eval`: the metrics equal hand-computed values, an overfit checkpoint scores clearly better than
its initial weights, several checkpoints give one table and eval.json / eval.csv / a plot, bad input is
refused in one line.

The overfit run: the tiny Stage-1 recipe on 16x32 clips (conftest's OVERFIT size, whose latents are cached),
both samples (split all), lr 3e-3, 60 steps, checkpoints at 30 and 60; its initial weights are a 1-step run
of the same seed at lr 1e-12. Measured on a CPU (eval at sigma 0.05): depth AbsRel 0.150 -> 0.099, point
error 0.320 -> 0.162, RRA@30 0 -> 1.0 (ATE barely moves: Sim(3) shrinks a wrong path onto the label's
centroid, so even the initial weights score the label path's spread).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from fwdata.dataset import camera as cam
from fwmodel.cli import app
from fwmodel.evaluate import (
    METRICS,
    EvalOptions,
    camera_metrics,
    depth_metrics,
    evaluate,
    point_error,
    pose_auc,
    trajectory_errors,
)

runner = CliRunner()


# --------------------------------------------------------------------------- metrics on constructed cases


def test_depth_metrics_after_median_alignment():
    rng = np.random.default_rng(0)
    gt = rng.uniform(1.0, 5.0, size=(3, 4, 5))
    valid = np.ones(gt.shape, bool)
    m = depth_metrics(3.7 * gt, gt, valid)  # a global scale is aligned away
    assert m["depth_absrel"] == pytest.approx(0.0, abs=1e-12) and m["depth_delta1"] == 1.0

    # 10 valid pixels at depth 2; predicted 4 on 7 of them and 6 on 3 (1.5x too far): median scale 2/4
    # puts the 7 exactly right and the 3 at 3 -> AbsRel = 3 * 0.5 / 10 = 0.15, delta1 = 7/10.
    gt = np.full((1, 2, 6), 2.0)
    pred = np.array([[[4, 4, 4, 4, 6, 100], [4, 4, 4, 6, 6, 100]]], float)
    valid = np.ones(gt.shape, bool)
    valid[..., 5] = False  # the 100s are not labelled: ignored, also by the median
    m = depth_metrics(pred, gt, valid)
    assert m["depth_absrel"] == pytest.approx(0.15) and m["depth_delta1"] == pytest.approx(0.7)
    gt[0, 0, 0] = 0.0  # a label of 0 is not a label: 9 pixels left (six 4s, three 6s), same median
    m = depth_metrics(pred, gt, valid)
    assert m["depth_absrel"] == pytest.approx(1.5 / 9) and m["depth_delta1"] == pytest.approx(6 / 9)


def test_point_error_after_sim3():
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(2, 3, 4, 3)) + np.array([0.0, 0.0, 3.0])
    valid = np.ones(gt.shape[:-1], bool)
    valid[0, 0, 0] = False
    R = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    pred = 0.4 * gt @ R.T + np.array([1.0, -2.0, 0.5])  # rotated, scaled, translated
    pred[0, 0, 0] = 1e6  # not labelled: ignored
    assert point_error(pred, gt, valid) == pytest.approx(0.0, abs=1e-9)

    # a known error no similarity removes: the 8 corners of a cube (centre (0, 0, 3)), each moved along z by
    # eps * x*y*z (x, y, z = +-1 its corner). The moves sum to 0 and are uncorrelated with the corners, so
    # Umeyama keeps R = I, t = (1 - s) * centre, and s = 3 / (3 + eps^2); the error at a corner is
    # |(s - 1) q_c + s e_c| = sqrt(3 (s-1)^2 + s^2 eps^2 + 2 s (s-1) eps x y), q_c the centred corner.
    eps = 0.3
    xyz = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    q = xyz + [0.0, 0.0, 3.0]
    p = q.copy()
    p[:, 2] += eps * xyz.prod(axis=1)
    s = 3 / (3 + eps**2)
    errors = np.sqrt(3 * (s - 1) ** 2 + s**2 * eps**2 + 2 * s * (s - 1) * eps * xyz[:, 0] * xyz[:, 1])
    scale = np.mean(np.sqrt(2 + (3 + xyz[:, 2]) ** 2))  # mean |q*|: sqrt(18) and sqrt(6), 4 corners each
    assert point_error(p, q, np.ones(8, bool)) == pytest.approx(errors.mean() / scale, rel=1e-9)
    assert math.isnan(point_error(pred, gt, np.zeros_like(valid)))


def _trajectory(n: int = 4):
    """A moving, turning camera path: w2c [n, 4, 4]."""
    c2w = [cam.look_at([0.5 * i, 0.1 * i * i, -2.0 + 0.3 * i], [0.0, 0.0, 2.0]) for i in range(n)]
    return cam.invert_pose(np.stack(c2w))


def test_camera_metrics_with_a_known_rotation_error():
    gt = _trajectory(4)
    m = camera_metrics(gt, gt)
    assert all(m[k] == 1.0 for k in m)
    # the same path in another world frame and 2.5x the size: relative errors are still 0
    S = cam.make_pose(Rotation.from_euler("z", 70, degrees=True).as_matrix(), [1.0, 2.0, 3.0])
    other = gt @ cam.invert_pose(S)
    other[:, :3, 3] *= 2.5
    assert camera_metrics(other, gt) == m
    t = trajectory_errors(other, gt)
    assert t["ate"] == pytest.approx(0, abs=1e-9) and t["rpe_rot_deg"] == pytest.approx(0, abs=1e-6)

    # frame 3 turned 12 degrees about its optical axis (its centre unchanged): the 3 pairs with frame 3 of
    # the 6 have a 12-degree rotation error and no translation error.
    pred = gt.copy()
    pred[3] = cam.make_pose(Rotation.from_euler("z", 12, degrees=True).as_matrix(), [0, 0, 0]) @ gt[3]
    m = camera_metrics(pred, gt)
    assert (m["rra@5"], m["rra@15"], m["rra@30"]) == (0.5, 1.0, 1.0)
    assert (m["rta@5"], m["rta@15"], m["rta@30"]) == (1.0, 1.0, 1.0)
    # AUC@30 = mean over thresholds 1..30 of the share below: 0.5 for 1..12, 1 for 13..30
    assert m["auc@30"] == pytest.approx((12 * 0.5 + 18 * 1.0) / 30)
    t = trajectory_errors(pred, gt)  # consecutive pairs (0,1), (1,2), (2,3): only the last is off, by 12
    assert t["ate"] == pytest.approx(0, abs=1e-9) and t["rpe_trans"] == pytest.approx(0, abs=1e-9)
    assert t["rpe_rot_deg"] == pytest.approx(12 / 3)

    # a translation direction error of 20.5 degrees on the one pair of a 2-frame path (camera 1 one unit to the
    # right of camera 0; not 20: at a bin edge rounding decides); its sign does not count (VGGT)
    gt = cam.invert_pose(np.stack([np.eye(4), cam.make_pose(np.eye(3), [1.0, 0.0, 0.0])]))
    turned = np.radians(20.5)
    for centre in ([np.cos(turned), np.sin(turned), 0.0], [-2 * np.cos(turned), -2 * np.sin(turned), 0.0]):
        pred = cam.invert_pose(np.stack([np.eye(4), cam.make_pose(np.eye(3), centre)]))
        m = camera_metrics(pred, gt)
        assert (m["rra@5"], m["rta@15"], m["rta@30"]) == (1.0, 0.0, 1.0)
        assert m["auc@30"] == pytest.approx(10 / 30)  # below the threshold only for 21..30
    assert pose_auc(np.array([0.0, 45.0]), np.array([0.0, 0.0])) == pytest.approx(0.5)
    assert pose_auc(np.array([0.0]), np.array([29.5])) == pytest.approx(1 / 30)  # below 30 only


# --------------------------------------------------------------------------- eval on trained checkpoints


@pytest.fixture(scope="module")
def overfit(dataset, make_config, tmp_path_factory):
    """(initial weights: a 1-step lr-1e-12 run, the overfit run's folder with step-30 and step-60)."""
    from fwmodel.train import train

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("overfit")
    common = dict(data__height=16, data__width=32, data__split="all", optim__lr=3e-3)
    init = base / "init"
    train(make_config(1, dataset, init, train__num_steps=1, train__checkpoint_every=1,
                      **{**common, "optim__lr": 1e-12}), quiet=True)
    run = base / "run"
    train(make_config(1, dataset, run, train__num_steps=60, train__checkpoint_every=30, **common), quiet=True)
    return init / "step-1.safetensors", run


def test_overfit_checkpoint_scores_clearly_better_and_stages_compare(overfit, dataset, tmp_path):
    init, run = overfit
    out = tmp_path / "report"
    r = runner.invoke(app, ["eval", "--checkpoint", str(init), "--checkpoint", str(run), "--data", str(dataset),
                            "--split", "all", "--device", "cpu", "--out", str(out), "-q"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    for label in ("init/step-1", "run/step-30", "run/step-60", "absrel", "AUC@30"):
        assert label in r.stdout, label

    report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"rows", "metrics", "data", "split", "num_samples"}
    assert report["metrics"] == list(METRICS) and report["split"] == "all" and report["num_samples"] == 2
    assert report["data"] == str(dataset)
    rows = report["rows"]
    assert [(r["checkpoint"], r["stage"], r["step"]) for r in rows] == [
        (str(init), 1, 1), (str(run / "step-30.safetensors"), 1, 30), (str(run / "step-60.safetensors"), 1, 60)]
    assert all(set(r) == {"checkpoint", "stage", "step", *METRICS} for r in rows)
    first, last = rows[0], rows[-1]
    print({k: (round(first[k], 4), round(last[k], 4)) for k in METRICS})
    assert last["depth_absrel"] < 0.8 * first["depth_absrel"]
    assert last["point_err"] < 0.7 * first["point_err"]
    assert last["rra@30"] > first["rra@30"] + 0.5

    import pandas as pd

    csv = pd.read_csv(out / "eval.csv")
    assert list(csv.columns) == ["checkpoint", "stage", "step", *METRICS]
    assert list(csv["step"]) == [1, 30, 60]
    assert np.allclose(csv["depth_absrel"], [r["depth_absrel"] for r in rows])

    from PIL import Image

    png = np.asarray(Image.open(out / "metrics_vs_step.png").convert("RGB"))
    assert png.shape[0] > 300 and png.shape[1] > 600
    assert len(np.unique(png.reshape(-1, 3), axis=0)) > 50 and png.std() > 10  # drawn, not blank

    # same inputs -> same numbers (the noise is seeded per sample); --format json prints eval.json's content
    r2 = runner.invoke(app, ["eval", "--checkpoint", str(run / "step-60.safetensors"), "--data", str(dataset),
                             "--split", "all", "--device", "cpu", "--format", "json", "-q"])
    assert r2.exit_code == 0, r2.output
    again = json.loads(r2.stdout)
    assert again["rows"] == rows[-1:] and again["metrics"] == report["metrics"]


def test_latents_are_encoded_online_when_the_cache_does_not_cover(stage1_checkpoint, dataset_copy):
    shutil.rmtree(dataset_copy / ".fwmodel_cache")  # the run's own dataset keeps the encoders' record
    opts = dict(checkpoints=[stage1_checkpoint], split="all", device="cpu")
    online = evaluate(EvalOptions(data=dataset_copy, **opts)).rows[0]
    from fwmodel.inference import load_model

    original = load_model(stage1_checkpoint, device="cpu").config.data.root
    cached = evaluate(EvalOptions(data=original, **opts)).rows[0]
    # the cache keeps latents in bf16: the same clips encoded online give nearly the same scores
    for k in ("depth_absrel", "depth_delta1", "point_err", "ate"):
        assert online[k] == pytest.approx(cached[k], rel=0.05, abs=0.01), k


def test_bad_input_is_refused_in_one_line(stage1_checkpoint, dataset, tmp_path):
    bad = tmp_path / "step-2.safetensors"
    shutil.copy(stage1_checkpoint, bad)
    shutil.copy(stage1_checkpoint.with_suffix(".json"), bad.with_suffix(".json"))
    data = bytearray(bad.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    cases = [
        (["--checkpoint", str(bad)], "damaged: its sha256 does not match"),
        (["--checkpoint", str(tmp_path / "missing.safetensors")], "not found"),
        (["--checkpoint", str(tmp_path / "empty")], "no step-N.safetensors checkpoint"),
        (["--checkpoint", str(stage1_checkpoint), "--split", "val"], "nothing to evaluate: no usable sample in split 'val'"),
        (["--checkpoint", str(stage1_checkpoint), "--split", "nope"], "--split 'nope'"),
        (["--checkpoint", str(stage1_checkpoint), "--format", "xml"], "--format 'xml'"),
        (["--checkpoint", str(stage1_checkpoint), "--noise", "1.5"], "--noise 1.5"),
    ]
    (tmp_path / "empty").mkdir()
    for args, message in cases:
        r = runner.invoke(app, ["eval", *args, "--data", str(dataset), "--device", "cpu"], env={"COLUMNS": "300"})
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
        err = r.stderr.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1 and message in err, (args, err)


def test_stage1_and_stage2_checkpoints_side_by_side(stage1_checkpoint, stage2_checkpoint, dataset):
    result = evaluate(EvalOptions([stage1_checkpoint, stage2_checkpoint], dataset, split="train", max_samples=1,
                                  device="cpu"))
    assert result.num_samples == 1 and [(r["stage"], r["step"]) for r in result.rows] == [(1, 2), (2, 2)]
    assert all(math.isfinite(r[m]) for r in result.rows for m in METRICS)
    assert result.rows[0]["depth_absrel"] != result.rows[1]["depth_absrel"]  # Stage 2 trained the geometry further
