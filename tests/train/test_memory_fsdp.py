"""The memory preflight with FSDP2 and the I2V-14B recipes (fwmodel/memory.py, `fwmodel memory`).

- FSDP2's trainable state is DDP's / world_size, plus the group buffers of fwmodel.train.parallel's groups;
- train.fsdp_shard_backbone: the frozen Wan blocks / world_size plus two gathered blocks;
- the 14B recipes: parameter counts of the reference (architecture section 6.1), FSDP2 fits 8 x 80 GB,
  DDP does not (Stage 2), the full 81 frames fit 80 GB with the sharded backbone, 96 GB only without;
- measured: two gloo processes shard the tiny model with fwmodel.train.parallel.wrap_model and take one AdamW
  step; each rank's local shard bytes of weights, grads and both moments equal the estimate to 1 %, and
  the FSDP2 groups are the ones the estimate counts; with the backbone sharded too, each rank's local
  frozen bytes equal the estimate's frozen backbone to 1 %. (This file is also the torchrun worker of that test.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GIB = 1024**3
REPO = Path(__file__).resolve().parents[2]
# Reference parameter counts of the published Wan2.1-I2V-14B FantasyWorld (architecture section 6.1)
REF_FROZEN, REF_STAGE1, REF_STAGE2 = 16_394.88e6, 1_241.32e6, 2_147.9e6


def _estimate(preset, stage, frames, parallel, world_size=8, **kw):
    from fwmodel.config import get_preset
    from fwmodel.memory import estimate_memory

    return estimate_memory(get_preset(preset), stage, 1, frames, 336, 592, True, 2, 2, world_size,
                           parallel=parallel, **kw)


@pytest.mark.parametrize("stage", [1, 2])
def test_fsdp2_state_is_ddp_state_over_world_size_plus_group_buffers(stage):
    from fwmodel.config import get_preset
    from fwmodel.memory import _parameter_totals, fsdp_groups

    config = get_preset("wan2.1-t2v-1.3b")
    ddp, fsdp = (_estimate("wan2.1-t2v-1.3b", stage, 21, p) for p in ("ddp", "fsdp2"))
    n_train = _parameter_totals(config.model_dump_json())[stage]
    assert ddp.trainable_state() == 16 * n_train and fsdp.trainable_state() == pytest.approx(16 * n_train / 8)
    assert ddp.parts["DDP gradient buckets"] == 4 * n_train and not any(k.startswith("DDP") for k in fsdp.parts)
    root, block = fsdp_groups(config, stage)
    assert 0 < block < root < n_train
    assert fsdp.parts["FSDP2 gathered weights"] == (root + 2 * block) * 2  # bf16 all-gathers
    assert fsdp.parts["FSDP2 grads + reduce-scatter"] == (root + block) * (2 + 4)  # bf16 grads, fp32 reduce
    same = [k for k in ddp.parts if not k.startswith(("trainable", "AdamW", "DDP", "overhead"))]
    assert same and all(ddp.parts[k] == fsdp.parts[k] for k in same)  # frozen weights, activations: replicated
    assert fsdp.total < ddp.total
    one = _estimate("wan2.1-t2v-1.3b", stage, 21, "fsdp2", world_size=1)  # one process: nothing is sharded
    assert one.parts == _estimate("wan2.1-t2v-1.3b", stage, 21, "ddp", world_size=1).parts


@pytest.mark.parametrize("stage", [1, 2])
def test_sharded_backbone_is_blocks_over_world_size_plus_two_gathered_blocks(stage):
    from fwmodel.config import get_preset
    from fwmodel.memory import _parameter_totals, backbone_blocks

    config = get_preset("wan2.1-i2v-14b")
    n_backbone = _parameter_totals(config.model_dump_json())[0]
    n_blocks, n_block = backbone_blocks(config)
    assert n_blocks == pytest.approx(40 * n_block) and 0.95 * n_backbone < n_blocks < n_backbone  # 40 equal blocks
    rep = _estimate("wan2.1-i2v-14b", stage, 21, "fsdp2")
    sharded = _estimate("wan2.1-i2v-14b", stage, 21, "fsdp2", shard_backbone=True)
    assert sharded.parts["frozen backbone"] == pytest.approx((n_backbone - n_blocks + n_blocks / 8) * 2)
    assert sharded.parts["frozen backbone: 2 gathered blocks"] == 2 * n_block * 2  # bf16, running + prefetched
    assert rep.parts["frozen backbone"] - sharded.parts["frozen backbone"] > 26 * GIB  # 30.5 GiB -> 4.2 GiB
    same = [k for k in rep.parts if not k.startswith(("frozen backbone", "overhead"))]
    assert same and all(rep.parts[k] == sharded.parts[k] for k in same)  # trainable state, activations: unchanged
    # one process shards nothing; DDP has no sharded backbone
    one = _estimate("wan2.1-i2v-14b", stage, 21, "fsdp2", world_size=1, shard_backbone=True)
    assert one.parts == _estimate("wan2.1-i2v-14b", stage, 21, "fsdp2", world_size=1).parts
    with pytest.raises(ValueError, match="fsdp2"):
        _estimate("wan2.1-i2v-14b", stage, 21, "ddp", shard_backbone=True)


def test_shard_backbone_option_needs_fsdp2_and_is_not_hashed():
    from fwmodel.train.config import ConfigError, config_hash, load_config

    with pytest.raises(ConfigError, match="fsdp_shard_backbone = true needs train.parallel"):
        load_config("tiny-stage2", sets=["train.fsdp_shard_backbone=true"])  # parallel = ddp
    on = load_config("tiny-stage2", sets=["train.parallel=fsdp2", "train.fsdp_shard_backbone=true"])
    assert config_hash(on) == config_hash(load_config("tiny-stage2"))  # same trajectory: resumable either way


def test_14b_numbers_follow_the_reference_parameter_counts():
    for stage, ref in ((1, REF_STAGE1), (2, REF_STAGE2)):
        fsdp = _estimate("wan2.1-i2v-14b", stage, 21, "fsdp2")
        assert fsdp.parts["frozen backbone"] == pytest.approx(REF_FROZEN * 2, rel=1e-3)  # bf16, every rank
        assert fsdp.trainable_state() == pytest.approx(ref * 16 / 8, rel=1e-3)  # e.g. 2148 M x 16 B / 8 ranks
        assert _estimate("wan2.1-i2v-14b", stage, 21, "ddp").trainable_state() == pytest.approx(ref * 16, rel=1e-3)
    s1 = _estimate("wan2.1-i2v-14b", 1, 21, "fsdp2")
    assert s1.parts["frozen Stage-2 modules"] == pytest.approx((REF_STAGE2 - REF_STAGE1) * 4, rel=1e-3)


def test_i2v_extras_image_context_and_clip_encoder():
    from fwmodel.memory import CLIP_IMAGE_ENCODER_BYTES, CLIP_IMAGE_TOKENS

    i2v = _estimate("wan2.1-i2v-14b", 2, 81, "fsdp2")
    L, D = 21 * 21 * 37, 5120
    assert i2v.parts["activations: image context"] == (CLIP_IMAGE_TOKENS * 3 + L) * D * 2  # one block recomputed
    full = _estimate("wan2.1-i2v-14b", 2, 81, "fsdp2", online_encoders=True)
    assert full.parts["online CLIP image encoder"] == CLIP_IMAGE_ENCODER_BYTES
    assert "activations: image context" not in _estimate("wan2.1-i2v-14b", 1, 21, "fsdp2").parts  # no grads
    t2v = _estimate("wan2.1-t2v-1.3b", 2, 81, "fsdp2", online_encoders=True)
    assert not any("image" in k for k in t2v.parts)


def test_the_14b_recipes_load_and_fit_8_x_80gb_with_fsdp2_only():
    from fwmodel.memory import config_estimate
    from fwmodel.train.config import load_config

    base = {s: load_config(f"stage{s}") for s in (1, 2)}
    for stage in (1, 2):
        cfg = load_config(f"stage{stage}-i2v-14b")
        link = REPO / f"pipelines/train/stage{stage}-i2v-14b.toml"
        assert link.is_symlink() and not os.readlink(link).startswith("/")  # relative, into the package
        assert link.resolve() == (REPO / f"fwmodel/recipes/stage{stage}-i2v-14b.toml").resolve()
        assert load_config(link) == cfg
        assert cfg.train.stage == stage and cfg.model.preset == "wan2.1-i2v-14b" and cfg.train.parallel == "fsdp2"
        assert cfg.train.fsdp_shard_backbone == (stage == 2)
        assert cfg.model.backbone_dtype == "bfloat16" and cfg.model.gradient_checkpointing and cfg.train.batch_size == 1
        assert cfg.data.cache in ("require", "auto")
        # the same global batch on the same GPUs as the 1.3B recipes
        b = base[stage].train
        assert cfg.train.batch_size * cfg.train.grad_accum == b.batch_size * b.grad_accum
        fits = {}
        for parallel in ("fsdp2", "ddp"):
            for gb in (80, 96):
                est = config_estimate(cfg.model_copy(update={"memory": cfg.memory.model_copy(update={"limit_gb": gb})}),
                                      8, parallel)
                fits[parallel, gb] = est.fits()
        assert fits["fsdp2", 80] and fits["fsdp2", 96], (stage, fits)
        if stage == 2:
            assert not fits["ddp", 80] and not fits["ddp", 96]
    s1 = load_config("stage1-i2v-14b")
    assert load_config("stage2-i2v-14b").model.init_from == s1.output_dir() / "step-20000.safetensors"
    # the full 81 frames of Stage 2: 80 GB with the backbone sharded (the recipe), 96 GB only replicated
    s2 = load_config("stage2-i2v-14b")
    assert s2.data.num_frames == 81 and config_estimate(s2, 8).total <= 0.95 * 80 * GIB
    full = config_estimate(load_config("stage2-i2v-14b", sets=["train.fsdp_shard_backbone=false"]), 8)
    assert 76 * GIB < full.total <= 0.95 * 96 * GIB


def test_memory_command_table_json_and_exit_codes():
    from typer.testing import CliRunner

    from fwmodel.cli import app
    from fwmodel.memory import config_estimate
    from fwmodel.train.config import load_config

    runner = CliRunner()
    args = ["memory", "--config", "stage2-i2v-14b", "--world-size", "8", "--limit-gb", "80"]
    res = runner.invoke(app, args + ["--parallel", "fsdp2", "--parallel", "ddp"])
    assert res.exit_code == 0, res.output  # the first strategy (fsdp2) fits
    for row in ("frozen weights", "trainable state", "activations", "encoders", "overhead", "total (estimate)"):
        assert row in res.output
    assert "fits" in res.output and "DOES NOT FIT" in res.output and "fsdp2 x 8" in res.output
    assert runner.invoke(app, args + ["--parallel", "ddp"]).exit_code == 1
    res = runner.invoke(app, args + ["--format", "json", "--online-encoders"])
    assert res.exit_code == 1, res.output  # + UMT5, VAE, CLIP online: too much for 80 GB
    out = json.loads(res.output)["estimates"]["fsdp2"]
    want = config_estimate(load_config("stage2-i2v-14b"), 8, "fsdp2", online_encoders=True)
    assert out["total_gib"] == round(want.total / GIB, 3) and out["capacity_gib"] == 80 and out["fits"] is False
    assert "online CLIP image encoder" in out["parts_gib"]
    bad = runner.invoke(app, ["memory", "--config", "stage2-i2v-14b", "--parallel", "zero"])
    assert bad.exit_code == 2 and "--parallel" in bad.output


# ---------------------------------------------------------------- measured: two gloo processes


def _worker(out: Path) -> None:
    """torchrun worker: the tiny Stage-2 model sharded by wrap_model (frozen Wan blocks too), one AdamW step
    on zero grads, the local bytes of weights, grads and moments, the FSDP2 groups and the local frozen
    elements, written to OUT/rank<R>.json."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    from fwmodel.train.distributed import init_distributed
    from fwmodel.model import FantasyWorldModel
    from fwmodel.config import get_preset
    from fwmodel.train.parallel import local_frozen_numel, wrap_model
    from fwmodel.stages import set_trainable
    from fwmodel.train.config import load_config

    torch.set_num_threads(1)
    d = init_distributed("cpu")
    cfg = load_config(REPO / "fwmodel/recipes/tiny-stage2.toml",
                      sets=["train.parallel=fsdp2", "train.fsdp_shard_backbone=true"])
    torch.manual_seed(0)
    model = FantasyWorldModel(get_preset(cfg.model.preset))
    set_trainable(model, 2)
    model = wrap_model(model, cfg, d)
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's AdamW as the trainer builds it (fwmodel.train.step.build_optimizer) but the for-loop variant:
    # the same moments (zeros_like of each shard), while the first foreach step on ~300 DTensors costs ~20 s
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, foreach=False)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()

    def local(t) -> int:
        return t.to_local().numel()

    moments = [local(optimizer.state[p][k]) for p in params for k in ("exp_avg", "exp_avg_sq")]
    groups = []
    for m in model.modules():
        if isinstance(m, FSDPModule) and m is not model:
            groups.append(sum(p.numel() for p in m.parameters() if p.requires_grad))
    result = {"params": sum(local(p) for p in params), "grads": sum(local(p.grad) for p in params),
              "moments": sum(moments), "full": sum(p.numel() for p in params), "block_groups": groups,
              "frozen": local_frozen_numel(model)}
    (out / f"rank{d.rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_measured_fsdp2_shard_bytes_match_the_estimate(tmp_path):
    from fwmodel.config import get_preset
    from fwmodel.memory import estimate_memory, fsdp_groups

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    config = get_preset("tiny")
    est = estimate_memory(config, 2, 1, 5, 32, 48, True, 4, 4, world_size=2, parallel="fsdp2")
    for r in ranks:
        measured = 4 * (r["params"] + r["grads"] + r["moments"])
        assert measured == pytest.approx(est.trainable_state(), rel=0.01), (measured, est.trainable_state())
    assert sum(r["params"] for r in ranks) == ranks[0]["full"]  # the shards cover every trainable weight once
    root, block = fsdp_groups(config, 2)
    groups = ranks[0]["block_groups"]
    assert max(groups) == block and ranks[0]["full"] - sum(groups) == root  # the groups the estimate counts
    sharded = estimate_memory(config, 2, 1, 5, 32, 48, True, 4, 4, world_size=2, parallel="fsdp2",
                              shard_backbone=True)
    # the local frozen bytes: the Wan blocks' shards (dim-0 chunks: rank 0 has the larger ones) + the
    # replicated embeddings and head; the mean over the ranks is the estimate's blocks / world_size exactly
    assert 2 * ranks[0]["frozen"] == pytest.approx(sum(r["frozen"] for r in ranks), rel=0.02)
    assert 4 * sum(r["frozen"] for r in ranks) / 2 == pytest.approx(sharded.parts["frozen backbone"], rel=1e-9)
    assert 4 * ranks[0]["frozen"] < 0.8 * est.parts["frozen backbone"]  # the replicated backbone


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
