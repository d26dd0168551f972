"""Stage 1 then Stage 2 end to end through the command line, as the user runs them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fwmodel.cli import app

runner = CliRunner()


def test_cache_then_stage1_then_stage2(dataset_copy, encoders, recipes, tmp_path, metrics_of):
    ds = dataset_copy
    # The cache command (the fixture cached the original; this copy is re-cached: nothing to do, or fresh).
    result = runner.invoke(app, ["cache", str(ds), "--config", str(recipes[1]), "--vae", str(encoders),
                                 "--text-encoder", str(encoders), "--prompt", "a room", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info = json.loads(next((ds / ".fwmodel_cache").glob("5x32x48-*/cache.json")).read_text())
    assert info["text_encoder"]["max_length"] == 512 and info["vae"]["random_init"] is True
    assert len(info["samples"]) == 2 and info["spec"]["num_frames"] == 5

    s1 = tmp_path / "stage1"
    result = runner.invoke(app, ["train", "--stage", "1", "--config", str(recipes[1]), "--data", str(ds),
                                 "--output", str(s1)])
    assert result.exit_code == 0, result.output
    # checkpoint_every = 3 over 6 steps: step-3 and step-6, each with sidecar and resumable state
    assert sorted(p.name for p in s1.glob("step-*.safetensors")) == ["step-3.safetensors", "step-6.safetensors"]
    sidecar = json.loads((s1 / "step-6.json").read_text())
    assert sidecar["stage"] == 1 and sidecar["step"] == 6 and sidecar["preset"] == "tiny"
    assert sidecar["extra"]["config_hash"] and sidecar["extra"]["data_fingerprint"]
    assert sorted(p.name for p in (s1 / "state").iterdir()) == ["step-3", "step-6"]
    rows = metrics_of(s1)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss/total", "loss/depth_loss", "loss/point_loss", "loss/camera_loss", "loss/depth/reg",
                "loss/point/reg", "loss/camera/T", "lr", "grad_norm/total", "grad_norm/geometry.aggregator",
                "perf/step_time_s", "perf/samples_per_s", "perf/data_wait_frac", "mem/peak_gib"):
        assert key in rows[-1], key
    assert "loss/diffusion" not in rows[-1]  # nothing trainable in Stage 1 can change the video
    assert (s1 / "train.log").read_text().count("step 6/6") == 1
    assert list((s1 / "tb").glob("events.out.tfevents.*"))
    assert "stage = 1" in (s1 / "config.toml").read_text()

    # Stage 2 refuses to start without the Stage-1 file...
    result = runner.invoke(app, ["train", "--stage", "2", "--config", str(recipes[2]), "--data", str(ds),
                                 "--output", str(tmp_path / "nothing")], env={"STAGE1_CHECKPOINT": ""})
    assert result.exit_code == 2 and "--init-from" in result.output
    # ... and a Stage-1 recipe run as Stage 2 is a mistake
    result = runner.invoke(app, ["train", "--stage", "2", "--config", str(recipes[1]), "--data", str(ds)])
    assert result.exit_code == 2 and "Stage-1 recipe" in result.output

    s2 = tmp_path / "stage2"
    result = runner.invoke(app, ["train", "--stage", "2", "--config", str(recipes[2]), "--data", str(ds),
                                 "--output", str(s2), "--init-from", str(s1 / "step-6.safetensors")])
    assert result.exit_code == 0, result.output
    assert "Stage 1 checkpoint loaded successfully" in result.output
    assert str(s1 / "step-6.safetensors") in result.output
    assert "interaction.bicross" in result.output  # the expected missing (zero-initialised) Stage-2 modules
    assert sorted(p.name for p in s2.glob("step-*.safetensors")) == ["step-3.safetensors", "step-6.safetensors"]
    assert json.loads((s2 / "step-6.json").read_text())["stage"] == 2
    rows = metrics_of(s2)
    assert "loss/diffusion" in rows[-1] and "grad_norm/interaction.bicross" in rows[-1]
    assert "Stage 1 checkpoint loaded successfully" in (s2 / "train.log").read_text()


def test_dry_run_reports_and_writes_nothing(dataset, recipes, tmp_path):
    out = tmp_path / "dry"
    result = runner.invoke(app, ["train", "--stage", "1", "--config", str(recipes[1]), "--data", str(dataset),
                                 "--output", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "input  latents" in result.output and "output depth" in result.output
    assert "dry run finished: 3 steps on 1 sample" in result.output and "peak memory" in result.output
    assert not out.exists()


def test_refuses_to_overwrite_a_run_and_resume_needs_a_state(dataset, recipes, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--stage", "1", "--config", str(recipes[1]), "--data", str(dataset), "--output", str(out)]
    result = runner.invoke(app, args + ["--resume"])
    assert result.exit_code == 2 and "nothing to resume" in result.output
    assert runner.invoke(app, args + ["--steps", "1", "--set", "train.checkpoint_every=1"]).exit_code == 0
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--resume" in result.output


def test_bad_config_values_are_named(dataset, recipes):
    result = runner.invoke(app, ["train", "--stage", "1", "--config", str(recipes[1]), "--data", str(dataset),
                                 "--set", "data.num_frames=6"])
    assert result.exit_code == 2 and "4k+1" in result.output
    result = runner.invoke(app, ["train", "--stage", "1", "--config", str(recipes[1]), "--set", "optim.lrr=1"])
    assert result.exit_code == 2 and "optim.lrr" in result.output
    result = runner.invoke(app, ["train", "--stage", "1", "--config", str(recipes[1]), "--data", "/nonexistent"])
    assert result.exit_code == 2 and "metadata.json" in result.output


def test_recipes_are_the_users(recipes):
    from fwmodel.train.config import load_config

    s1, s2 = load_config(recipes[1].parent / "stage1.toml"), load_config(recipes[1].parent / "stage2.toml")
    assert (s1.train.stage, s1.train.num_steps, s1.train.checkpoint_every) == (1, 20000, 1000)
    assert (s2.train.stage, s2.train.num_steps, s2.train.checkpoint_every) == (2, 10000, 1000)
    for cfg in (s1, s2):
        assert cfg.optim.lr == 1e-5 and cfg.model.preset == "wan2.1-t2v-1.3b" and cfg.loss.camera_weight == 3.0
    assert str(s2.model.init_from) == "outputs/fantasy_world_stage1/step-20000.safetensors"
    assert s2.data.num_frames == 81
