"""`fwmodel train --data SHARDS/`: WebDataset shards (written by `fwdata shard`'s own writer) train like the folder.

- same seed, shuffle off: the losses on the shards equal the losses on the dataset folder (online encoding
  from the mp4 bytes, and with the latent cache);
- kill + `--resume` on shards (shuffled shard order + shuffle buffer, 2 loader workers) equals an
  uninterrupted run with 0 workers;
- two gloo ranks (2 loader workers each) cover one epoch without overlap, in the planned order;
- a shard folder without shards.json, or with a shard missing, is refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fwmodel.train import train

LOSSES = ("loss/total", "loss/depth_loss", "loss/point_loss", "loss/camera_loss", "grad_norm/total")
REPO = Path(__file__).resolve().parents[2]


def write_shards(dataset: Path, out: Path, samples_per_shard: int) -> Path:
    """The shards `fwdata shard DATASET --out OUT --samples-per-shard N` writes."""
    from fwdata.shards.writer import ShardConfig, write_shards as write

    write(ShardConfig(dataset=dataset, out=out, samples_per_shard=samples_per_shard))
    return out


@pytest.fixture(scope="module")
def shards(dataset, tmp_path_factory) -> Path:
    """The 2-sample training dataset of conftest, one sample per shard."""
    return write_shards(dataset, tmp_path_factory.mktemp("shards") / "shards", 1)


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> tuple[Path, Path]:
    """6 synthetic clips (9 frames, 64x96; decord cannot decode 48-pixel-wide clips) and their shards, 2 samples per
    shard (3 shards)."""
    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset

    root = tmp_path_factory.mktemp("six")
    write_synthetic_dataset(root / "ds", SynthOptions(num_scenes=6, num_frames=9, height=64, width=96,
                                                      write_ply=False))
    return root / "ds", write_shards(root / "ds", root / "shards", 2)


def _online(encoders) -> dict:
    """Encode on the fly from the decoded mp4 frames (tiny random VAE / UMT5): the video bytes are used."""
    return dict(data__cache="off", model__vae=str(encoders), model__text_encoder=str(encoders))


def _losses(rows):
    return [{k: r[k] for k in ("step",) + LOSSES} for r in rows]


def test_shards_and_folder_give_the_same_losses(dataset, shards, encoders, make_config, metrics_of, tmp_path):
    torch.set_num_threads(1)
    settings = dict(train__num_steps=3, train__log_every=1, train__checkpoint_every=3, data__shuffle=False)
    for name, extra in (("online", _online(encoders)),
                        ("cache", dict(data__cache="require", data__cache_dir=str(dataset / ".fwmodel_cache")))):
        folder = train(make_config(1, dataset, tmp_path / f"folder-{name}", **settings, **extra), quiet=True)
        sharded = train(make_config(1, shards, tmp_path / f"shards-{name}", **settings, **extra), quiet=True)
        assert _losses(metrics_of(tmp_path / f"shards-{name}")) == _losses(metrics_of(tmp_path / f"folder-{name}"))
        assert [r["step"] for r in sharded.history] == [1, 2, 3]
        assert folder.history[0]["loss/depth_loss"] > 0
        log = (tmp_path / f"shards-{name}" / "train.log").read_text()
        assert "(WebDataset shards)" in log and "2 samples" in log
    # the same samples: the data fingerprint of both runs is the same
    a = json.loads((tmp_path / "folder-online" / "step-3.json").read_text())["extra"]["data_fingerprint"]
    b = json.loads((tmp_path / "shards-online" / "step-3.json").read_text())["extra"]["data_fingerprint"]
    assert a == b


@pytest.mark.slow
def test_kill_and_resume_on_shards_matches_uninterrupted(six, encoders, make_config, metrics_of, tmp_path):
    _, shard_root = six
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    settings = dict(train__num_steps=4, train__checkpoint_every=2, train__grad_accum=2, train__log_every=1,
                    data__shuffle=True, data__shuffle_buffer=3)
    # A real crash: SIGKILL as step 3 begins (after the step-2 state, mid-epoch), reading with 2 loader workers.
    args = [sys.executable, "-m", "fwmodel.cli", "train", "--stage", "1", "--config",
            str(REPO / "fwmodel/recipes/tiny-stage1.toml"), "--data", str(shard_root), "--output", str(killed),
            "--quiet", "--set=data.num_workers=2"]
    args += [f"--set={k.replace('__', '.')}={v if not isinstance(v, bool) else str(v).lower()}"
             for k, v in {**settings, **_online(encoders)}.items()]
    env = {**os.environ, "FWMODEL_FAULT_KILL_AT_STEP": "3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "state" / "step-2" / "trainer.json").is_file() and not (killed / "step-4.safetensors").exists()

    torch.set_num_threads(1)
    reference = train(make_config(1, shard_root, whole, **settings, **_online(encoders)), quiet=True)
    resumed = train(make_config(1, shard_root, killed, **settings, **_online(encoders), data__num_workers=1),
                    resume=True, quiet=True)
    assert [r["step"] for r in resumed.history] == [3, 4]
    assert _losses(metrics_of(killed)) == _losses(metrics_of(whole))  # steps 1-2 killed run, 3-4 resumed
    assert [r["train/epoch"] for r in reference.history] == pytest.approx([s / 3 for s in range(1, 5)])
    a, b = load_file(str(whole / "step-4.safetensors")), load_file(str(killed / "step-4.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


RANKS_SCRIPT = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from fwmodel.config import get_preset
from fwmodel.train.distributed import init_distributed
from fwmodel.train import make_loader, prepare_data
from fwmodel.train.config import load_config

shards, out, recipe, epochs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cfg = load_config(Path(recipe), {"data.root": shards, "data.cache": "off", "model.vae": "random-tiny",
                                 "model.text_encoder": "random-tiny", "data.num_workers": 2, "data.shuffle": True,
                                 "data.shuffle_buffer": 2, "train.batch_size": 1, "train.seed": 5})
d = init_distributed("cpu")
assert d.world_size == 2 and dist.get_backend() == "gloo"
dataset = prepare_data(cfg, get_preset("tiny"))
stream, loader = make_loader(dataset, cfg, d, start_micro=0)
per_epoch = stream.plan(0).micro_batches
batches, it = [], iter(loader)
for k in range(epochs * per_epoch):
    batch = next(it)
    batches.append({"ids": list(batch["id"]), "epoch": stream.epoch_of(k)})
gathered = [None, None]
dist.all_gather_object(gathered, batches)
if d.rank == 0:
    out.write_text(json.dumps({"ranks": gathered, "per_epoch": per_epoch}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_cover_the_epoch_without_overlap(six, tmp_path):
    from fwmodel.data import DataConfig
    from fwmodel.shard_data import open_shards

    dataset, shard_root = six
    script, out = tmp_path / "ranks.py", tmp_path / "ranks.json"
    script.write_text(textwrap.dedent(RANKS_SCRIPT))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
            str(shard_root), str(out), str(REPO / "fwmodel/recipes/tiny-stage1.toml"), "2"]
    proc = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    per_epoch, ranks = result["per_epoch"], result["ranks"]
    all_ids = {r["id"] for r in json.loads((dataset / "metadata.json").read_text())["samples"]
               if r["split"] == "train"}
    assert len(all_ids) == 6
    # 3 shards of 2 samples on 2 ranks: one rank reads 2 shards (4 samples), the other 1 shard, padded to 4
    assert per_epoch == 4
    for epoch in range(2):
        seen = [[i for b in rank[epoch * per_epoch:(epoch + 1) * per_epoch] for i in b["ids"]] for rank in ranks]
        assert not set(seen[0]) & set(seen[1]), (epoch, seen)
        assert set(seen[0]) | set(seen[1]) == all_ids, (epoch, seen)

    # the ranks yielded exactly the planned order (computed from the index, no data read)
    cfg = DataConfig(root=shard_root, num_frames=5, height=32, width=48, frame_stride=2, shuffle=True,
                     shuffle_buffer=2)
    from fwmodel.shard_data import ShardDataset

    shard_set = open_shards(cfg)
    plan = ShardDataset(cfg, shard_set, shard_set.select(cfg))
    for r, rank in enumerate(ranks):
        plan.layout(1, 2, r, 5)
        want = [plan.records[plan.items(k)[0][0]].id for k in range(2 * per_epoch)]
        assert [b["ids"][0] for b in rank] == want
    # a seeded, per-epoch order: the two epochs differ (for this seed), and another seed gives another order
    epochs = [[b["ids"][0] for b in ranks[0][e * per_epoch:(e + 1) * per_epoch]] for e in range(2)]
    assert epochs[0] != epochs[1]
    plan.layout(1, 2, 0, 6)
    assert [plan.records[plan.items(k)[0][0]].id for k in range(2 * per_epoch)] != [b["ids"][0] for b in ranks[0]]


def test_shuffle_off_is_the_manifest_order_and_padding_like_the_folder(six):
    from fwmodel.data import DataConfig, StepSampler, select_samples
    from fwmodel.shard_data import ShardDataset, open_shards

    dataset, shard_root = six
    cfg = DataConfig(root=shard_root, num_frames=5, height=32, width=48, frame_stride=2, shuffle=False)
    shard_set = open_shards(cfg)
    stream = ShardDataset(cfg, shard_set, shard_set.select(cfg)).layout(4, 1, 0, 3)
    folder = StepSampler(6, batch_size=4, world_size=1, rank=0, seed=3, shuffle=False)
    folder_items = iter(folder)
    assert [r.id for r in stream.records] == [r.id for r in select_samples(dataset, cfg.model_copy(
        update={"root": dataset})).records]
    for k in range(4):  # 6 samples, 4 per micro-batch: padded by wrapping, 2 micro-batches per epoch
        assert stream.items(k) == [next(folder_items) for _ in range(4)]
    assert stream.epoch_of(3) == 1.5


def _cli(args):
    from typer.testing import CliRunner

    from fwmodel.cli import app

    return CliRunner().invoke(app, args)


def test_incomplete_or_damaged_shard_folder_is_one_line(shards, tmp_path):
    recipe = str(REPO / "fwmodel/recipes/tiny-stage1.toml")
    cases = {
        "no index": (lambda d: (d / "shards.json").unlink(), "holds shards but no shards.json"),
        "shard missing": (lambda d: (d / "shard-000001.tar").unlink(), "shard-000001.tar is missing"),
        "shard truncated": (lambda d: (d / "shard-000000.tar").write_bytes((d / "shard-000000.tar").read_bytes()[:9000]),
                            "shard-000000.tar is damaged: 9000 bytes"),
    }
    for name, (damage, says) in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        shutil.copytree(shards, folder)
        damage(folder)
        result = _cli(["train", "--stage", "1", "--config", recipe, "--data", str(folder),
                       "--output", str(tmp_path / f"out-{name}"), "--steps", "1", "--quiet"])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, (name, result.output)
        assert lines[0].startswith("error: ") and says in lines[0], (name, lines[0])
        assert not (tmp_path / f"out-{name}").exists()  # refused before anything was written
