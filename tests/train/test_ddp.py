"""Two-process data parallel (torchrun, gloo on CPU) equals one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fwmodel.train import train

SETTINGS = ["train.num_steps=3", "train.checkpoint_every=3", "train.log_every=1"]
LOSSES = ("loss/total", "loss/diffusion", "loss/depth_loss", "loss/point_loss", "loss/camera_loss", "grad_norm/total")


@pytest.mark.slow
def test_two_processes_equal_one_process(dataset, stage1_checkpoint, make_config, recipes, metrics_of, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "fwmodel.cli", "train", "--stage", "2", "--config", str(recipes[2]), "--data", str(dataset),
            "--output", str(ddp), "--init-from", str(stage1_checkpoint), "--batch-size", "1", "--quiet"]
    args += [f"--set={s}" for s in SETTINGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    log = (ddp / "train.log").read_text()
    assert "2 process(es)" in log and "1 per GPU x 2 GPUs x 1 accumulation = 2 samples" in log
    assert sorted(p.name for p in (ddp / "state" / "step-3").glob("rng-rank*.safetensors")) == [
        "rng-rank0.safetensors", "rng-rank1.safetensors"]

    cfg = make_config(2, dataset, single, model__init_from=str(stage1_checkpoint), train__batch_size=2,
                      train__num_steps=3, train__checkpoint_every=3, train__log_every=1)
    reference = {r["step"]: r for r in train(cfg, quiet=True).history}
    rows = metrics_of(ddp)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key in LOSSES:
            assert row[key] == pytest.approx(reference[row["step"]][key], rel=1e-4, abs=1e-6), (row["step"], key)
    # Weights: same up to float reduction order. Adam turns gradient rounding noise on near-zero
    # gradients into at most a few % of one update, so compare with the size of the updates.
    a, b = load_file(str(ddp / "step-3.safetensors")), load_file(str(single / "step-3.safetensors"))
    init = load_file(str(stage1_checkpoint))
    assert a.keys() == b.keys()
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    update = sum(((b[k] - init[k]) ** 2).sum() for k in init) ** 0.5
    assert diff / update < 1e-3, (float(diff), float(update))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.05 * 3 * 1e-3  # 5% of 3 steps at lr 1e-3
