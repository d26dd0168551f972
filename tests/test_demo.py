"""`fwmodel demo` (what `make demo` runs) is one story on one dataset: render -> build -> compare ->
validate (the demo's gate file) -> cache -> train Stage 1 and Stage 2 on the dataset it built; a failed
validation stops it with exit 1 and the reason.

Runs the real command at a smaller size (one rendered clip, 96x160) so it fits the test suite.
"""

from __future__ import annotations

import json
import tomllib

from typer.testing import CliRunner

import fwmodel.demo as demo
from fwdata.dataset.contract import load_metadata
from fwmodel.cli import app

SMALL = demo.DemoPlan(scenes=1, frames=17, height=96, width=160, path_kinds=["forward"], clip_frames=9,
                      clip_stride=2)
REFUSING_GATES = 'name = "refuses-random"\n\n[dataset]\nallow_random_init_models = false\n'


def test_demo_trains_on_the_dataset_it_built_and_its_exit_code_follows_validation(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEFAULT_PLAN", SMALL)
    out = tmp_path / "demo"
    runner = CliRunner()

    # a gate file that refuses labels from the random depth model: validation fails, the demo exits 1
    # with the reason, and nothing is cached or trained
    own_gates = demo.DEMO_GATES
    monkeypatch.setattr(demo, "DEMO_GATES", REFUSING_GATES)
    failed = runner.invoke(app, ["demo", str(out)])
    assert failed.exit_code == 1, failed.output
    assert "gate.random_init_model" in failed.stdout
    assert f"validation of {out / 'dataset'} failed (exit 1)" in failed.stderr.replace("\n", "")
    assert "nothing was cached or trained" in failed.stderr.replace("\n", "")
    assert not (out / "fantasy_world_stage1").exists() and not (out / "dataset" / ".fwmodel_cache").exists()

    # the demo's own gate file: validation passes (the allowance stated), then both stages train on
    # the dataset just built (the build resumes: its clip is already there)
    monkeypatch.setattr(demo, "DEMO_GATES", own_gates)
    result = runner.invoke(app, ["demo", str(out)])
    assert result.exit_code == 0, result.output
    text = result.stdout.replace("\n", " ")
    assert "allow_random_init_models = true" in text and "allowed for the demo only" in text
    gates = tomllib.loads((out / "demo-gates.toml").read_text())
    assert gates["dataset"]["allow_random_init_models"] is True and "sample" not in gates  # default + allowance
    assert "PASS" in result.stdout or "exit 0" in result.stdout
    # the compare step prints `fwdata compare`'s table (its cameras part), which fits 80 columns
    compared = result.stdout.split("3/6 compare", 1)[1].split("4/6 validate", 1)[0].splitlines()[1:]
    assert any(line.split()[:3] == ["sample", "ATE%", "focal%"] for line in compared if line.split()), compared
    assert all(len(line) <= 80 for line in compared)
    assert "depth and points" not in [line.strip() for line in compared]  # random depth: the cameras only

    dataset = out / "dataset"
    built_ids = {s.id for s in load_metadata(dataset).samples}
    assert built_ids and not (out / "train_data").exists()
    for stage in (1, 2):
        run = out / f"fantasy_world_stage{stage}"
        config = tomllib.loads((run / "config.toml").read_text())
        assert config["data"]["root"] == str(dataset)  # trained on the built dataset, nothing else
        log = (run / "train.log").read_text()
        assert f"data: {len(built_ids)} sample{'s' if len(built_ids) > 1 else ''} from {dataset} (split train" in log
        assert (run / "step-6.safetensors").is_file()
    stage2 = tomllib.loads((out / "fantasy_world_stage2/config.toml").read_text())
    assert stage2["model"]["init_from"] == str(out / "fantasy_world_stage1/step-6.safetensors")
    cache = next((dataset / ".fwmodel_cache").iterdir())
    cached = set(json.loads((cache / "cache.json").read_text())["samples"])
    assert cached == built_ids
    # progress of caching and training, as plain lines (the runner's stdout is not a terminal)
    assert "stage 1: step 6/6 (100%) | elapsed" in result.stdout and "stage 2: step 6/6" in result.stdout
    assert "\r" not in result.stdout
    assert f"both stages trained on {dataset}" in text
