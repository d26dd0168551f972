"""Our trajectory metrics agree with evo (the field's trajectory-evaluation package) on real data.

``fwdata.dataset.camera.trajectory_metrics`` is compared with evo on the TUM RGB-D reference
trajectories of ``shared/data/real`` (copied to tests/data) and estimates made from them by a known similarity
transform plus seeded noise (and a drifting estimate). What is compared, like with like:

- ``ate``: evo ``APE(translation_part)`` RMSE after ``align(..., correct_scale=True)`` (Umeyama
  Sim(3) of est positions onto gt positions, exactly our alignment);
- ``rpe_trans``: evo ``RPE(translation_part, delta, Unit.frames)`` RMSE on the same scale-corrected
  estimate. evo's error is ``inv(inv(Q_i) Q_j) @ inv(P_i) P_j`` with c2w poses, i.e. our
  ``inv(rel_gt) @ rel_est`` (relative motion in camera i's frame), so the values match exactly;
- ``rpe_rot_deg``: evo ``RPE(rotation_angle_deg)`` mean;
- ``scale``: the scale evo's Umeyama returns.

One convention differs for ``delta > 1`` and is matched explicitly: evo's RPE with
``delta_unit=frames`` uses non-overlapping pairs ``(0, d), (d, 2d), ...`` by default, while ours
uses every pair ``(i, i + d)``; ours is evo's ``all_pairs=True``. For ``delta = 1`` both agree.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.spatial.transform import Rotation

from fwdata.dataset import camera as cam

from evo.core import metrics as evo_metrics  # a dev dependency: a missing evo fails here, loudly
from evo.core import trajectory as evo_trajectory
from evo.core.metrics import PoseRelation, StatisticsType, Unit  # noqa: E402

#: the TUM reference trajectories of ../shared/data/real, copied into the repository (tests/data/README.md)
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "tum_reference_c2w.npz"
CLIPS = ["tum_fr3_cabinet_ref.npz", "tum_fr1_rpy_ref.npz"]

# Both sides do the same float64 maths in a different order: measured differences are ~1e-15
# relative; these tolerances are still far below any definition change (see the negative tests).
REL = 1e-9


def load_gt_c2w(name: str) -> np.ndarray:
    with np.load(REFERENCE) as data:
        return np.asarray(data[name.removesuffix(".npz")], dtype=np.float64)


def similarity_estimate(gt_c2w: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """gt seen through a known Sim(3) (est world = s0 R0 gt world + t0) with seeded pose noise.

    Position noise is 3% of the gt extent per axis, rotation noise ~1 degree per frame.
    Returns (est_c2w, s0).
    """
    rng = np.random.default_rng(seed)
    extent = float(pdist(gt_c2w[:, :3, 3]).max())
    s0 = 0.37
    R0 = Rotation.from_rotvec([0.3, -1.1, 0.7]).as_matrix()
    t0 = np.array([2.0, -0.5, 1.3])
    n = len(gt_c2w)
    centres = gt_c2w[:, :3, 3] + rng.normal(scale=0.03 * extent, size=(n, 3))
    rot_noise = Rotation.from_rotvec(rng.normal(scale=np.radians(1.0), size=(n, 3))).as_matrix()
    est = np.tile(np.eye(4), (n, 1, 1))
    est[:, :3, :3] = R0 @ gt_c2w[:, :3, :3] @ rot_noise
    est[:, :3, 3] = s0 * centres @ R0.T + t0
    return est, s0


def drifting_estimate(gt_c2w: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Odometry-like estimate: gt relative motions with a 5% scale bias, a small rotation bias and
    noise, integrated from the first pose (errors accumulate), then seen through a known Sim(3)."""
    rng = np.random.default_rng(seed)
    rel = np.linalg.inv(gt_c2w[:-1]) @ gt_c2w[1:]
    bias = Rotation.from_rotvec(np.radians([0.2, -0.1, 0.15])).as_matrix()
    noise = Rotation.from_rotvec(rng.normal(scale=np.radians(0.3), size=(len(rel), 3))).as_matrix()
    step = np.median(np.linalg.norm(rel[:, :3, 3], axis=1))
    rel[:, :3, :3] = rel[:, :3, :3] @ bias @ noise
    rel[:, :3, 3] = 1.05 * rel[:, :3, 3] + rng.normal(scale=0.1 * step, size=(len(rel), 3))
    poses = [gt_c2w[0]]
    for r in rel:
        poses.append(poses[-1] @ r)
    est = np.stack(poses)
    s0 = 2.5
    R0 = Rotation.from_rotvec([-0.8, 0.2, 0.4]).as_matrix()
    t0 = np.array([-1.0, 0.3, 4.0])
    est[:, :3, :3] = R0 @ est[:, :3, :3]
    est[:, :3, 3] = s0 * est[:, :3, 3] @ R0.T + t0
    return est, s0


ESTIMATES = {"similarity+noise": similarity_estimate, "drift": drifting_estimate}


def evo_reference(est_c2w: np.ndarray, gt_c2w: np.ndarray, delta: int, all_pairs: bool) -> dict[str, float]:
    """The same metrics computed with evo."""
    traj_ref = evo_trajectory.PosePath3D(poses_se3=list(gt_c2w))
    traj_est = evo_trajectory.PosePath3D(poses_se3=list(est_c2w))
    aligned = copy.deepcopy(traj_est)
    _, _, scale = aligned.align(traj_ref, correct_scale=True)

    ape = evo_metrics.APE(PoseRelation.translation_part)
    ape.process_data((traj_ref, aligned))

    def rpe(relation: PoseRelation, stat: StatisticsType) -> float:
        m = evo_metrics.RPE(relation, delta=delta, delta_unit=Unit.frames, all_pairs=all_pairs)
        m.process_data((traj_ref, aligned))
        return float(m.get_statistic(stat))

    return {
        "ate": float(ape.get_statistic(StatisticsType.rmse)),
        "rpe_trans": rpe(PoseRelation.translation_part, StatisticsType.rmse),
        "rpe_rot_deg": rpe(PoseRelation.rotation_angle_deg, StatisticsType.mean),
        "scale": float(scale),
    }


def ours(est_c2w: np.ndarray, gt_c2w: np.ndarray, delta: int) -> dict[str, float]:
    return cam.trajectory_metrics(cam.c2w_to_w2c(est_c2w), cam.c2w_to_w2c(gt_c2w), delta=delta)


@pytest.mark.parametrize("delta", [1, 3])
@pytest.mark.parametrize("kind", list(ESTIMATES))
@pytest.mark.parametrize("clip", CLIPS)
def test_metrics_agree_with_evo(clip: str, kind: str, delta: int) -> None:
    gt = load_gt_c2w(clip)
    est, s0 = ESTIMATES[kind](gt, seed=7)
    got = ours(est, gt, delta)
    # evo's default frame-delta RPE uses non-overlapping pairs; ours uses all pairs (i, i+delta).
    ref = evo_reference(est, gt, delta, all_pairs=True)

    for key in ("ate", "rpe_trans", "rpe_rot_deg", "scale"):
        assert got[key] == pytest.approx(ref[key], rel=REL, abs=0.0), key

    # The comparison is not trivial: errors are well above zero and the scale was recovered.
    extent = float(pdist(gt[:, :3, 3]).max())
    assert got["ate"] > 0.005 * extent
    assert got["rpe_trans"] > 1e-4 * extent
    assert got["rpe_rot_deg"] > 0.1
    assert got["ate_rel"] == pytest.approx(got["ate"] / extent, rel=1e-12)
    if kind == "similarity+noise":
        assert got["scale"] == pytest.approx(1.0 / s0, rel=0.1)
        assert 0.01 < got["ate_rel"] < 0.1


@pytest.mark.parametrize("clip", CLIPS)
def test_delta_one_matches_evo_default_pairs(clip: str) -> None:
    """With delta = 1 evo's default (consecutive pairs) is the same as ours."""
    gt = load_gt_c2w(clip)
    est, _ = similarity_estimate(gt, seed=11)
    got = ours(est, gt, 1)
    ref = evo_reference(est, gt, 1, all_pairs=False)
    for key in ("rpe_trans", "rpe_rot_deg"):
        assert got[key] == pytest.approx(ref[key], rel=REL, abs=0.0), key


@pytest.mark.parametrize("clip", CLIPS)
def test_evo_default_pairs_differ_for_delta_above_one(clip: str) -> None:
    """evo's default frame-delta RPE for delta > 1 (non-overlapping pairs) is our RPE on the
    subsampled trajectory, not our RPE with that delta: the rotation part (scale-free) shows it."""
    gt = load_gt_c2w(clip)
    est, _ = similarity_estimate(gt, seed=11)
    ref_default = evo_reference(est, gt, 3, all_pairs=False)
    assert ours(est[::3], gt[::3], 1)["rpe_rot_deg"] == pytest.approx(ref_default["rpe_rot_deg"], rel=REL)
    assert ours(est, gt, 3)["rpe_rot_deg"] != pytest.approx(ref_default["rpe_rot_deg"], rel=1e-3)


@pytest.mark.parametrize("clip", CLIPS)
def test_wrong_definitions_would_fail(clip: str) -> None:
    """Plausible wrong definitions miss evo by far more than REL, so the agreement above means
    something: rigid (no-scale) alignment, RPE without the scale correction, relative motion in
    the world frame (P_j inv(P_i)) instead of camera i's frame, RMSE vs mean."""
    gt = load_gt_c2w(clip)
    est, _ = similarity_estimate(gt, seed=7)
    ref = evo_reference(est, gt, 1, all_pairs=True)
    gt_c, est_c = gt[:, :3, 3], est[:, :3, 3]

    def far(value: float, target: float) -> bool:
        return abs(value - target) > 1e-3 * abs(target)

    # ATE with an SE(3) (rigid) alignment
    s, R, t = cam.umeyama(est_c, gt_c, with_scale=False)
    ate_rigid = np.sqrt(np.mean(np.sum((s * est_c @ R.T + t - gt_c) ** 2, axis=1)))
    assert far(ate_rigid, ref["ate"])

    rel_gt = np.linalg.inv(gt[:-1]) @ gt[1:]
    rel_est = np.linalg.inv(est[:-1]) @ est[1:]
    # RPE translation without applying the alignment scale
    err = np.linalg.inv(rel_gt) @ rel_est
    assert far(np.sqrt(np.mean(np.sum(err[:, :3, 3] ** 2, axis=1))), ref["rpe_trans"])
    # relative motion in the world frame, P_{i+1} inv(P_i), of the Sim(3)-aligned estimate
    aligned = cam.w2c_to_c2w(cam.sim3_align(cam.c2w_to_w2c(est), cam.c2w_to_w2c(gt))[3])
    w_gt = gt[1:] @ np.linalg.inv(gt[:-1])
    w_est = aligned[1:] @ np.linalg.inv(aligned[:-1])
    w_err = np.linalg.inv(w_gt) @ w_est
    assert far(np.sqrt(np.mean(np.sum(w_err[:, :3, 3] ** 2, axis=1))), ref["rpe_trans"])
    # rotation: RMSE instead of mean
    rot = cam.rotation_angle_deg(err[:, :3, :3])
    assert rot.mean() == pytest.approx(ref["rpe_rot_deg"], rel=REL)
    assert far(np.sqrt(np.mean(rot**2)), ref["rpe_rot_deg"])
