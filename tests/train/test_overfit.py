"""Overfitting one sample: the geometry regression terms halve, and in Stage 2 the diffusion loss falls.

16x32 clips of 5 frames (the tiny preset), one sample, lr 3e-3. Measured on a CPU (deterministic):
Stage 1, 50 steps, mean of the first 3 vs the last 10 steps: depth reg 0.105 -> 0.045, point reg
1.04 -> 0.25, camera 0.62 -> 0.11. Stage 2 from that checkpoint, 60 steps at a fixed noise level,
first 10 vs last 10: diffusion 1.53 -> 1.13, geometry still falling.
"""

from __future__ import annotations

import statistics

import pytest

from fwmodel.train import train

GEOMETRY = ("loss/depth/reg", "loss/point/reg", "loss/camera_loss")


def _mean(rows, key):
    return statistics.mean(r[key] for r in rows)


@pytest.mark.slow
def test_overfit_one_sample_stage1_then_stage2(dataset, make_config, tmp_path):
    common = dict(data__height=16, data__width=32, data__max_samples=1, optim__lr=3e-3, train__log_every=1)
    s1 = tmp_path / "s1"
    cfg = make_config(1, dataset, s1, train__num_steps=50, train__checkpoint_every=50, **common)
    rows = train(cfg, quiet=True).history
    assert [r["step"] for r in rows] == list(range(1, 51))
    for key in GEOMETRY:
        start, end = _mean(rows[:3], key), _mean(rows[-10:], key)
        print(f"Stage 1 {key}: {start:.4f} -> {end:.4f}")
        assert end <= 0.5 * start, f"{key}: {start:.4f} -> {end:.4f}"

    # Stage 2 from that checkpoint, at a fixed noise level so the diffusion loss is comparable step to step.
    cfg = make_config(2, dataset, tmp_path / "s2", train__num_steps=60, train__checkpoint_every=60,
                      model__init_from=str(s1 / "step-50.safetensors"), diffusion__weighting="none",
                      diffusion__min_timestep_fraction=0.5, diffusion__max_timestep_fraction=0.52, **common)
    rows = train(cfg, quiet=True).history
    first, last = _mean(rows[:10], "loss/diffusion"), _mean(rows[-10:], "loss/diffusion")
    print(f"diffusion {first:.4f} -> {last:.4f}; " + ", ".join(
        f"{k} {_mean(rows[:10], k):.4f} -> {_mean(rows[-10:], k):.4f}" for k in GEOMETRY))
    assert last < 0.85 * first, f"diffusion {first:.4f} -> {last:.4f}"
    # geometry keeps improving (or at least does not come apart) while the interaction is trained
    for key in GEOMETRY:
        assert _mean(rows[-10:], key) <= 1.2 * _mean(rows[:10], key), key
