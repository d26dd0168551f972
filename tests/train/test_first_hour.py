"""The "first hour" usability fixes: random-tiny encoders, random-init labels, CPU threads, Ctrl-C, hf."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fwmodel.train.step as train_module
from fwmodel.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _header_command(recipe, name: str) -> list[str]:
    """The `fwmodel <name> ...` line of a recipe's header comment, as arguments after `fwmodel`
    (recipe paths made absolute)."""
    for line in recipe.read_text().splitlines():
        text = line.lstrip("#").strip()
        if text.startswith(f"fwmodel {name} "):
            return [str(REPO / a) if a.startswith("pipelines/") else a for a in shlex.split(text)[1:]]
    raise AssertionError(f"no `fwmodel {name}` line in the header of {recipe}")


def _train_args(recipes, data, out, *extra, stage=1):
    return ["train", "--stage", str(stage), "--config", str(recipes[stage]), "--data", str(data),
            "--output", str(out), *extra]


# --------------------------------------------------------------------------- 1: --vae / --text-encoder random-tiny


def test_recipe_header_cache_command_works_with_random_tiny(dataset, dataset_copy, recipes, tmp_path):
    ds = dataset_copy
    shutil.rmtree(ds / ".fwmodel_cache")  # the fixture's cache (made with write_tiny_encoders on disk)
    for stage in (1, 2):
        args = _header_command(recipes[stage], "cache")
        assert "random-tiny" in args and "TINY" not in args
        args = [str(ds) if a == "DATASET" else a for a in args] + ["--device", "cpu"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "randomly initialised encoders" in result.stderr
    info = json.loads((ds / ".fwmodel_cache/5x32x48-s2-start/cache.json").read_text())
    for part in ("vae", "text_encoder"):
        assert info[part]["random_init"] is True and info[part]["path"] == "random-tiny" and info[part]["seed"] == 0
    assert info["text_encoder"]["d_model"] == 16  # the tiny preset's text width

    # seeded, built from the config: the same weights as the on-disk tiny encoders, so the same latents
    reference = dataset / ".fwmodel_cache/5x32x48-s2-start"
    for sample_id, entry in info["samples"].items():
        new, old = load_file(str(ds / ".fwmodel_cache/5x32x48-s2-start" / entry["latents"])), \
            load_file(str(reference / entry["latents"]))
        assert torch.equal(new["latents"], old["latents"]), sample_id

    # and the tiny recipe trains on that cache (its header's train command)
    train_args = [str(ds) if a == "DATASET" else a for a in _header_command(recipes[1], "train")]
    train_args = [str(tmp_path / "out") if a == "OUT/stage1" else a for a in train_args]
    result = runner.invoke(app, train_args + ["--steps", "1", "--quiet"])
    assert result.exit_code == 0, result.output


def test_random_tiny_text_encoder_takes_the_preset_width_and_stays_small():
    from fwmodel.cache import TextEncoder

    enc = TextEncoder("random-tiny", torch.device("cpu"), text_dim=4096)  # the 1.3B preset's width
    assert enc.dim == 4096 and enc([""]).shape == (1, 512, 4096)
    assert sum(p.numel() for p in enc.model.parameters()) < 5_000_000
    assert enc.provenance()["random_init"] is True


def test_unknown_encoder_path_suggests_random_tiny(dataset, recipes):
    result = runner.invoke(app, ["cache", str(dataset), "--config", str(recipes[1]), "--vae", "TINY",
                                 "--text-encoder", "TINY", "--device", "cpu"])
    assert result.exit_code == 2
    assert "Wan VAE not found at TINY" in result.output and "random-tiny" in result.output
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in result.output


def test_cache_refuses_to_mix_random_and_real_encoders(dataset_copy, recipes):
    manifest = next((dataset_copy / ".fwmodel_cache").glob("5x32x48-*/cache.json"))
    info = json.loads(manifest.read_text())
    info["vae"]["random_init"] = False  # as if made with the real Wan VAE
    manifest.write_text(json.dumps(info))
    result = runner.invoke(app, ["cache", str(dataset_copy), "--config", str(recipes[1]), "--vae", "random-tiny",
                                 "--text-encoder", "random-tiny", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "real (pretrained) VAE" in result.output and "randomly initialised" in result.output


# --------------------------------------------------------------------------- 7: labels made by random models


def _mark_random(ds, per_sample: bool) -> str:
    meta_path = ds / "metadata.json"
    meta = json.loads(meta_path.read_text())
    if per_sample:  # one sample's own provenance says random-tiny depth
        meta["samples"][0]["provenance"] = {"tool_version": "0", "options": {}, "models": [
            {"role": "depth", "name": "random-tiny", "revision": "seed0", "random_init": True}]}
    else:  # the dataset's, for samples that carry no provenance of their own (older datasets)
        for sample in meta["samples"]:
            sample["provenance"] = None
        meta["provenance"]["models"][0].update(name="random-tiny", random_init=True)
    meta_path.write_text(json.dumps(meta))
    return meta["samples"][0]["id"]


def test_real_recipes_refuse_random_init_labels_by_default(recipes):
    from fwmodel.data import DataConfig
    from fwmodel.train.config import load_config

    assert DataConfig().allow_random_init_labels is False
    for name in ("stage1.toml", "stage2.toml"):
        assert load_config(recipes["dir"] / name).data.allow_random_init_labels is False
    for stage in (1, 2):  # the tiny (demo / CI) recipes allow them, with a warning
        assert load_config(recipes[stage]).data.allow_random_init_labels is True


@pytest.mark.parametrize("per_sample", [False, True])
def test_random_init_labels_are_refused_unless_allowed(per_sample, dataset_copy, recipes, tmp_path):
    sample_id = _mark_random(dataset_copy, per_sample)
    out = tmp_path / "out"
    result = runner.invoke(app, _train_args(recipes, dataset_copy, out, "--steps", "1",
                                            "--set", "data.allow_random_init_labels=false"))
    assert result.exit_code == 2, result.output
    text = result.stderr.replace("\n", "")
    expected = "1 of the 2" if per_sample else "2 of the 2"
    assert f"{expected} training samples have labels made by a randomly initialised model" in text
    assert "depth: random-tiny" in text and sample_id in text and "data.allow_random_init_labels = true" in text
    assert not out.exists()


def test_random_init_labels_allowed_warn_on_stderr_and_in_the_log(dataset_copy, recipes, tmp_path):
    _mark_random(dataset_copy, per_sample=False)
    out = tmp_path / "out"
    # the edited records no longer match the cache: encode on the fly with the random-tiny encoders
    online = ["--set", 'data.cache="off"', "--set", 'model.vae="random-tiny"', "--set", 'model.text_encoder="random-tiny"']
    result = runner.invoke(app, _train_args(recipes, dataset_copy, out, "--steps", "1", "--quiet", *online))
    assert result.exit_code == 0, result.output
    assert "WARNING: 2 of the 2 training samples have labels made by a randomly initialised model" in result.stderr
    assert "model.vae / model.text_encoder are randomly initialised" in result.stderr
    assert "tests and demos only" in result.stderr  # shown even with --quiet
    log = (out / "train.log").read_text()
    assert "WARNING: 2 of the 2 training samples" in log and "encoding on the fly" in log


def test_random_encoder_cache_is_refused_by_a_demanding_config(dataset, recipes, tmp_path):
    result = runner.invoke(app, _train_args(recipes, dataset, tmp_path / "out", "--steps", "1",
                                            "--set", "data.allow_random_init_labels=false"))
    assert result.exit_code == 2, result.output
    assert "made with randomly initialised encoders" in result.stderr


# --------------------------------------------------------------------------- 8: --threads


def _record_threads(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = train_module.compute_losses

    def patched(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "compute_losses", patched)
    return seen


def test_threads_default_to_one_for_tiny_on_cpu_and_are_recorded(dataset, recipes, tmp_path, monkeypatch):
    import tomllib

    seen = _record_threads(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = runner.invoke(app, _train_args(recipes, dataset, tmp_path / "a", "--steps", "1"))
        assert result.exit_code == 0, result.output
        assert seen == [1] and torch.get_num_threads() == 2  # one thread while training, restored after
        assert "threads: 1 torch intra-op thread(s) on the CPU (the default for the tiny preset" in result.output
        assert tomllib.loads((tmp_path / "a" / "config.toml").read_text())["train"]["threads"] == 1
        assert "threads: 1" in (tmp_path / "a" / "train.log").read_text()

        result = runner.invoke(app, _train_args(recipes, dataset, tmp_path / "b", "--steps", "1", "--threads", "2"))
        assert result.exit_code == 0, result.output
        assert seen[-1] == 2 and "threads: 2 torch intra-op thread(s)" in result.output
        assert tomllib.loads((tmp_path / "b" / "config.toml").read_text())["train"]["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_threads_default_is_torch_for_other_presets_and_devices(recipes):
    from fwmodel.train import resolve_threads
    from fwmodel.train.config import load_config

    tiny = load_config(recipes[1])
    assert resolve_threads(tiny, torch.device("cpu"))[0] == 1
    assert resolve_threads(tiny, torch.device("cuda", 0))[0] is None
    assert resolve_threads(load_config(recipes["dir"] / "stage1.toml"), torch.device("cpu"))[0] is None
    assert resolve_threads(load_config(recipes[1], {"train.threads": 0}), torch.device("cpu"))[0] is None
    assert resolve_threads(load_config(recipes[1], {"train.threads": 3}), torch.device("cpu"))[0] == 3


# --------------------------------------------------------------------------- 11: Ctrl-C


def _interrupt_at(monkeypatch, call: int, exc=KeyboardInterrupt):
    real = train_module.compute_losses
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise exc()
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "compute_losses", patched)


def test_ctrl_c_prints_the_last_state_and_the_resume_command(dataset, recipes, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 3)  # during step 3; state/step-2 was written
    # (options in the order `fwmodel train --help` lists them: the command is rebuilt in that order)
    args = _train_args(recipes, dataset, out, "--steps", "4", "--lr", "0.002", "--set", "train.checkpoint_every=2")
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    err = result.stderr
    assert "interrupted (Ctrl-C) during step 3" in err
    assert f"the last saved state is {out / 'state' / 'step-2'} (step 2" in err
    command = err.strip().splitlines()[-1].strip()
    assert command == shlex.join(["fwmodel", *args, "--resume"])
    log = (out / "train.log").read_text()
    assert "interrupted (Ctrl-C) during step 3" in log and command in log

    monkeypatch.undo()
    resumed = runner.invoke(app, shlex.split(command)[1:])  # exactly the printed command continues the run
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed from {out / 'state' / 'step-2'}" in resumed.output and (out / "step-4.safetensors").is_file()


def test_ctrl_c_before_any_state_says_to_start_again(dataset, recipes, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 1)
    result = runner.invoke(app, _train_args(recipes, dataset, out, "--steps", "2", "--quiet"))
    assert result.exit_code == 130, result.output
    assert "interrupted (Ctrl-C) during step 1: no state was saved yet" in result.stderr
    command = result.stderr.strip().splitlines()[-1].strip()
    assert "--resume" not in command and command.startswith("fwmodel train --stage 1")
    monkeypatch.undo()
    assert runner.invoke(app, shlex.split(command)[1:]).exit_code == 0  # the same folder starts over


def test_sigterm_is_reported_like_ctrl_c_with_exit_143(dataset, recipes, tmp_path, monkeypatch):
    from fwdata.runtime import Terminated

    _interrupt_at(monkeypatch, 2, Terminated)
    result = runner.invoke(app, _train_args(recipes, dataset, tmp_path / "run", "--steps", "3",
                                            "--set", "train.checkpoint_every=1"))
    assert result.exit_code == 143, result.output
    assert "terminated (SIGTERM) during step 2: the last saved state is" in result.stderr
    assert result.stderr.strip().endswith("--resume")


# --------------------------------------------------------------------------- 9: hf, not huggingface-cli


def test_docs_recipes_and_messages_use_hf_not_huggingface_cli():
    files = [*sorted((REPO / "fwmodel").rglob("*.py")), REPO / "docs/TRAINING.md", REPO / "docs/MODEL.md",
             *sorted((REPO / "pipelines/train").iterdir()),
             *sorted((REPO / "fwmodel/recipes").glob("*.toml"))]
    import re

    old_cli = re.compile(r"huggingface-cli\s+(download|upload|login)")  # the note naming the old CLI may stay
    offenders = [str(p.relative_to(REPO)) for p in files if old_cli.search(p.read_text())]
    assert offenders == []
    training = (REPO / "docs/TRAINING.md").read_text()
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir" in training
    assert "hf upload ORG/NAME outputs/fantasy_world_stage2 --include" in training
