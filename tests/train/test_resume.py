"""Kill a run, `--resume` it, and get the same losses and weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fwmodel.train import train
from fwmodel.train.state import ResumeError

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

    return Path(__file__).resolve().parents[2] / f"fwmodel/recipes/tiny-stage{stage}.toml"


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


# --------------------------------------------------------------------------- damaged state folders


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {  # name: (file in state/step-2, what is done to it, what the refusal says about it)
    "optimizer deleted": ("optimizer.safetensors", lambda p: p.unlink(), "is missing"),
    "optimizer truncated": ("optimizer.safetensors", _truncate, "is damaged: .* bytes, the manifest says"),
    "optimizer bit flip": ("optimizer.safetensors", _flip_byte, "is damaged: its sha256 does not match"),
    "rng deleted": ("rng-rank0.safetensors", lambda p: p.unlink(), "is missing"),
    "rng meta deleted": ("rng-rank0.json", lambda p: p.unlink(), "is missing"),
    "trainer not json": ("trainer.json", lambda p: p.write_text("{not json"), "is damaged"),
    "trainer deleted": ("trainer.json", lambda p: p.unlink(), "is missing"),
}


@pytest.fixture(scope="module")
def two_states(tmp_path_factory, dataset, make_config):
    """A finished 2-step Stage-1 run with state/step-1 and state/step-2."""
    import torch

    out = tmp_path_factory.mktemp("states") / "run"
    torch.set_num_threads(1)
    train(make_config(1, dataset, out, train__num_steps=2, train__checkpoint_every=1), quiet=True)
    return out


def _copy_run(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def _written(out):
    """What a refused resume must leave alone."""
    return {name: (out / name).read_bytes() for name in ("train.log", "metrics.jsonl", "config.toml")}


def test_state_has_a_manifest_of_every_file(two_states):
    import hashlib

    for step in (1, 2):
        directory = two_states / "state" / f"step-{step}"
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["step"] == step
        on_disk = sorted(p.name for p in directory.iterdir() if p.name != "manifest.json")
        assert sorted(manifest["files"]) == on_disk == sorted(
            ["optimizer.safetensors", "trainer.json", "rng-rank0.safetensors", "rng-rank0.json"])
        for name, entry in manifest["files"].items():
            data = (directory / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not list((two_states / "state").glob(".*"))  # no temporary folder or manifest left


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_state_is_refused_naming_the_file(case, two_states, dataset, make_config, tmp_path):
    out = _copy_run(two_states, tmp_path / "run")
    name, damage, says = DAMAGE[case]
    damaged = out / "state" / "step-2" / name
    damage(damaged)
    before = _written(out)
    with pytest.raises(ResumeError) as caught:
        train(make_config(1, dataset, out, train__num_steps=3), resume=True, quiet=True)
    message = str(caught.value)
    assert re.search(re.escape(str(damaged)) + " " + says, message), message
    assert "--resume-step N (available: 1)" in message and "\n" not in message
    assert _written(out) == before  # refused before anything was loaded or written


def test_state_without_manifest_is_refused(two_states, dataset, make_config, tmp_path):
    out = _copy_run(two_states, tmp_path / "run")
    (out / "state" / "step-2" / "manifest.json").unlink()  # as written by an older fwmodel
    with pytest.raises(ResumeError, match=r"state/step-2: it has no manifest.json .*cannot be verified"):
        train(make_config(1, dataset, out, train__num_steps=3), resume=True, quiet=True)


def test_missing_trainer_file_does_not_fall_back_silently(two_states, dataset, make_config, tmp_path):
    """The old behaviour: step-2 without trainer.json was skipped and the run restarted at step 1."""
    out = _copy_run(two_states, tmp_path / "run")
    (out / "state" / "step-2" / "trainer.json").unlink()
    with pytest.raises(ResumeError, match=r"step-2/trainer.json is missing"):
        train(make_config(1, dataset, out, train__num_steps=3), resume=True, quiet=True)
    # the earlier state, chosen explicitly, still resumes
    result = train(make_config(1, dataset, out, train__num_steps=3), resume=True, resume_step=1, quiet=True)
    assert result.step == 3 and [r["step"] for r in result.history] == [2, 3]


def test_damaged_state_cli_exits_2_with_one_line(two_states, dataset, tmp_path):
    from typer.testing import CliRunner

    from fwmodel.cli import app

    out = _copy_run(two_states, tmp_path / "run")
    damaged = out / "state" / "step-2" / "optimizer.safetensors"
    _flip_byte(damaged)
    result = CliRunner().invoke(app, ["train", "--stage", "1", "--config", str(_recipe(1)), "--data", str(dataset),
                                      "--output", str(out), "--steps", "3", "--set", "train.checkpoint_every=1",
                                      "--resume"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot resume from"), result.output
    assert str(damaged) in lines[0] and "sha256" in lines[0]


def test_the_same_run_twice_writes_the_same_state_bytes(two_states, dataset, make_config, tmp_path):
    """Every file of a saved state (the RNG files included: Python's and numpy's generators are seeded
    per rank) and every checkpoint is byte-identical between two runs of the same config."""
    import random

    import numpy as np
    import torch

    random.random(), np.random.random()  # whatever ran before in this process must not matter
    out = tmp_path / "run"
    torch.set_num_threads(1)
    train(make_config(1, dataset, out, train__num_steps=2, train__checkpoint_every=1), quiet=True)
    files = [p.relative_to(two_states) for p in sorted(two_states.glob("state/step-*/*"))]
    files += [p.relative_to(two_states) for p in sorted(two_states.glob("step-*.safetensors"))]
    assert len(files) == 12
    # trainer.json records when the state was written ("created", provenance like the checkpoints'
    # sidecars), so it and the manifest that hashes it differ by that field only
    differ = [str(f) for f in files if (out / f).read_bytes() != (two_states / f).read_bytes()]
    assert differ == [f"state/step-{s}/{n}" for s in (1, 2) for n in ("manifest.json", "trainer.json")]
    for s in (1, 2):
        a, b = (json.loads((r / "state" / f"step-{s}" / "trainer.json").read_text()) for r in (out, two_states))
        a.pop("created"), b.pop("created")
        assert a == b
