"""FSDP2 (train.parallel = "fsdp2", two gloo processes on CPU) against DDP with the same global batch:
same losses, a consolidated step-N.safetensors, and a 2-rank state that resumes in one process; with the
frozen backbone sharded too (train.fsdp_shard_backbone) and gradient checkpointing, DDP's losses and grad norms."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fwmodel.train import train

SETTINGS = ["train.num_steps=4", "train.checkpoint_every=2", "train.log_every=1"]
LOSSES = ("loss/total", "loss/diffusion", "loss/depth_loss", "loss/point_loss", "loss/camera_loss", "grad_norm/total")


def _torchrun(parallel, out, dataset, stage1_checkpoint, recipes, settings=None):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "fwmodel.cli", "train", "--stage", "2", "--config", str(recipes[2]), "--data", str(dataset),
            "--output", str(out), "--init-from", str(stage1_checkpoint), "--batch-size", "1", "--quiet",
            f"--set=train.parallel={parallel}"] + [f"--set={s}" for s in SETTINGS] + list(settings or [])
    return subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_fsdp2_matches_ddp_and_resumes_on_one_process(dataset, stage1_checkpoint, make_config, recipes, metrics_of,
                                                      tmp_path):
    from fwmodel.inference import load_model

    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    procs = [_torchrun("fsdp2", fsdp, dataset, stage1_checkpoint, recipes),
             _torchrun("ddp", ddp, dataset, stage1_checkpoint, recipes)]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    assert "outside FSDP2" in (fsdp / "train.log").read_text()

    # same losses and global grad norms (over all shards) as DDP, step by step
    want = {r["step"]: r for r in metrics_of(ddp)}
    rows = metrics_of(fsdp)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in LOSSES:
            assert row[key] == pytest.approx(want[row["step"]][key], rel=1e-4, abs=1e-6), (row["step"], key)

    # the consolidated weights load for inference and equal DDP's up to float reduction order
    loaded = load_model(fsdp / "step-4.safetensors", wan_weights="random", device="cpu")
    a, b = load_file(str(fsdp / "step-4.safetensors")), load_file(str(ddp / "step-4.safetensors"))
    init = load_file(str(stage1_checkpoint))
    assert a.keys() == b.keys() and len(a) > len(init)  # the full Stage-2 set, not one rank's shard
    params = dict(loaded.model.named_parameters())
    assert all(params[k].shape == a[k].shape and params[k].equal(a[k]) for k in a)
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    update = sum(((b[k] - init[k]) ** 2).sum() for k in init) ** 0.5
    assert diff / update < 1e-3, (float(diff), float(update))

    # the 2-rank state of step 2 resumes in one process (batch 2 = the same global batch) with the same losses
    resumed_out = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed_out)
    shutil.rmtree(resumed_out / "state" / "step-4")
    cfg = make_config(2, dataset, resumed_out, model__init_from=str(stage1_checkpoint), train__batch_size=2,
                      train__num_steps=4, train__checkpoint_every=2, train__log_every=1, train__parallel="fsdp2")
    resumed = train(cfg, resume=True, quiet=True)
    assert [r["step"] for r in resumed.history] == [3, 4]
    mine = {r["step"]: r for r in rows}
    for row in resumed.history:
        for key in LOSSES:
            assert row[key] == pytest.approx(mine[row["step"]][key], rel=1e-4, abs=1e-6), (row["step"], key)
    c = load_file(str(resumed_out / "step-4.safetensors"))
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 0.05 * 4 * 1e-3  # 5% of 4 steps at lr 1e-3


@pytest.mark.slow
def test_fsdp2_sharded_backbone_matches_one_process_with_checkpointing(dataset, stage1_checkpoint, recipes,
                                                                       make_config, metrics_of, tmp_path):
    """train.fsdp_shard_backbone: the frozen Wan blocks sharded per block (their IRG halves and the recompute
    of gradient checkpointing included) give the losses and grad norms of one process with the same global
    batch (= DDP's, test above), and rank 0 holds half of the blocks."""
    import math

    from fwmodel.config import get_preset
    from fwmodel.model import FantasyWorldModel

    sharded = tmp_path / "sharded"
    proc = _torchrun("fsdp2", sharded, dataset, stage1_checkpoint, recipes,
                     ["--set=train.fsdp_shard_backbone=true", "--set=model.gradient_checkpointing=true",
                      "--set=train.num_steps=2", "--set=train.checkpoint_every=2"])
    cfg = make_config(2, dataset, tmp_path / "one", model__init_from=str(stage1_checkpoint), train__batch_size=2,
                      train__num_steps=2, train__checkpoint_every=2, train__log_every=1,
                      model__gradient_checkpointing=True)
    want = {r["step"]: r for r in train(cfg, quiet=True).history}
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    rows = metrics_of(sharded)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in LOSSES:
            assert row[key] == pytest.approx(want[row["step"]][key], rel=1e-4, abs=1e-6), (row["step"], key)

    # rank 0's local elements: the dim-0 chunk (ceil(rows / 2)) of every Wan block weight + the replicated rest
    backbone = FantasyWorldModel(get_preset("tiny")).backbone
    blocks = list(backbone.wan.blocks.parameters())
    chunk = sum(math.ceil(p.shape[0] / 2) * p[0].numel() for p in blocks)
    rest = sum(p.numel() for p in backbone.parameters()) - sum(p.numel() for p in blocks)
    held = re.search(r"Wan blocks sharded by FSDP2: ([\d,]+) held on this rank", (sharded / "train.log").read_text())
    assert held and int(held.group(1).replace(",", "")) == chunk + rest, (held and held.group(0), chunk, rest)
    assert 0.5 <= chunk / sum(p.numel() for p in blocks) < 0.52  # about half of the blocks' bytes per rank
