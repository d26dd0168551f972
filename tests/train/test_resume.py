"""Kill a run, `--resume` it, and get the same losses and weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fwmodel.train import ResumeError, train

# Stage 2 (diffusion + geometry, adapters and cross-attention), 2 samples over several epochs,
# 2 micro-steps per step: the noise, the data order and the optimizer state must all line up.
SETTINGS = dict(train__num_steps=6, train__checkpoint_every=2, train__grad_accum=2, train__log_every=1)
LOSSES = ("loss/total", "loss/diffusion", "loss/depth_loss", "loss/point_loss", "loss/camera_loss")


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(dataset, stage1_checkpoint, make_config, metrics_of, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    init = dict(model__init_from=str(stage1_checkpoint))

    # A real crash: the process SIGKILLs itself as step 5 begins (after the step-4 checkpoint).
    args = [sys.executable, "-m", "fwmodel.cli", "train", "--stage", "2", "--config",
            str(_recipe(2)), "--data", str(dataset),
            "--output", str(killed), "--init-from", str(stage1_checkpoint), "--quiet"]
    args += [f"--set=train.{k.split('__')[1]}={v}" for k, v in SETTINGS.items()]
    env = {**os.environ, "FWMODEL_FAULT_KILL_AT_STEP": "5", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "state" / "step-4" / "trainer.json").is_file()
    assert not (killed / "step-6.safetensors").exists()

    reference = train(make_config(2, dataset, whole, **init, **SETTINGS), quiet=True)
    resumed = train(make_config(2, dataset, killed, **init, **SETTINGS), resume=True, quiet=True)
    assert resumed.step == 6 and [r["step"] for r in resumed.history] == [5, 6]

    want = {r["step"]: r for r in reference.history}
    for row in resumed.history:
        for key in LOSSES:
            assert row[key] == pytest.approx(want[row["step"]][key], rel=1e-5, abs=1e-6), (row["step"], key)
    # metrics.jsonl of the resumed run: every step once, the killed run's tail replaced
    assert [r["step"] for r in metrics_of(killed)] == [1, 2, 3, 4, 5, 6]
    final_a = load_file(str(whole / "step-6.safetensors"))
    final_b = load_file(str(killed / "step-6.safetensors"))
    assert final_a.keys() == final_b.keys()
    worst = max((final_a[k] - final_b[k]).abs().max().item() for k in final_a)
    assert worst < 1e-5, worst


def _recipe(stage):
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / f"pipelines/train/tiny-stage{stage}.toml"


def test_resume_refuses_a_changed_config(dataset, make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(1, dataset, out, train__num_steps=1, train__checkpoint_every=1), quiet=True)
    with pytest.raises(ResumeError, match="optim.lr"):
        train(make_config(1, dataset, out, train__num_steps=2, optim__lr=5e-4), resume=True, quiet=True)
    with pytest.raises(ResumeError, match="samples per micro-step"):
        train(make_config(1, dataset, out, train__num_steps=2, train__batch_size=2), resume=True, quiet=True)
    # more steps is fine: the run continues
    result = train(make_config(1, dataset, out, train__num_steps=2, train__checkpoint_every=1), resume=True, quiet=True)
    assert result.step == 2
    trainer = json.loads((out / "state" / "step-2" / "trainer.json").read_text())
    assert trainer["micro_batches"] == 2 and trainer["step"] == 2
