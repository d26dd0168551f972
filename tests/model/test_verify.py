"""`fwmodel verify`: parameter counts per module, built on the meta device."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fwmodel.cli import app

runner = CliRunner()

# The published FantasyWorld-Wan2.1-I2V-14B, in millions (shared/reference/fantasyworld-architecture.md §6.1):
# (our report modules that make up the part) -> published count.
GEOMETRY = tuple(
    f"geometry.{name}"
    for name in (
        "bridge", "time_embedding", "tokens", "camera_token_projector",  # the first four: ~13M together
        "aggregator", "camera_head", "depth_head", "point_head",
    )
)
PUBLISHED_14B = {
    ("backbone",): 16394.9,
    ("geometry.aggregator",): 605.0,
    ("geometry.camera_head",): 233.0,
    ("geometry.depth_head",): 195.1,
    ("geometry.point_head",): 195.1,
    GEOMETRY[:4]: 13.0,  # bridge + time embedding + special tokens + camera-token projector
    GEOMETRY: 1241.3,
    ("interaction.bicross",): 510.0,
    ("interaction.camera_encoder", "interaction.camera_adapters"): 396.6,
}


def _verify_json(preset: str, stage: int) -> dict:
    result = runner.invoke(app, ["verify", "--preset", preset, "--stage", str(stage), "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_14b_counts_match_the_published_release():
    report = _verify_json("wan2.1-i2v-14b", 2)
    assert set(report) == {"preset", "stage", "modules", "totals"}
    assert set(report["totals"]) == {"frozen", "stage1_trainable", "stage2_trainable"}
    assert report["preset"] == "wan2.1-i2v-14b" and report["stage"] == 2
    modules = {m["name"]: m["params"] for m in report["modules"]}
    assert set(modules) == set(GEOMETRY) | {n for part in PUBLISHED_14B for n in part}
    for part, published in PUBLISHED_14B.items():
        ours = sum(modules[n] for n in part) / 1e6
        assert abs(ours - published) <= 0.01 * published, f"{part}: {ours:.1f}M vs published {published}M"
    totals = report["totals"]
    assert totals["frozen"] == modules["backbone"]
    assert abs(totals["stage1_trainable"] / 1e6 - 1241.3) <= 12.4
    assert abs((totals["stage2_trainable"] - totals["stage1_trainable"]) / 1e6 - (510.0 + 396.6)) <= 9.1


@pytest.mark.parametrize("stage", [1, 2])
def test_trainable_flags_follow_the_stage(stage):
    report = _verify_json("wan2.1-t2v-1.3b", stage)
    flags = {m["name"]: m["trainable"] for m in report["modules"]}
    assert flags["backbone"] is False
    assert all(flags[n] for n in flags if n.startswith("geometry."))
    assert all(flags[n] is (stage == 2) for n in flags if n.startswith("interaction."))
    modules = {m["name"]: m["params"] for m in report["modules"]}
    totals = report["totals"]
    assert totals["frozen"] == modules["backbone"] > 1.4e9  # the real Wan2.1-T2V-1.3B DiT
    assert totals["stage1_trainable"] == sum(v for n, v in modules.items() if n.startswith("geometry."))
    assert totals["stage2_trainable"] == totals["stage1_trainable"] + sum(
        v for n, v in modules.items() if n.startswith("interaction.")
    )
    for name in ("geometry.aggregator", "geometry.depth_head", "interaction.bicross", "interaction.camera_adapters"):
        assert modules[name] > 1e6


def test_table_output_and_bad_options():
    result = runner.invoke(app, ["verify", "--preset", "wan2.1-t2v-1.3b", "--stage", "2"])
    assert result.exit_code == 0, result.output
    for text in ("geometry.aggregator", "interaction.camera_adapters", "Stage-1 trainable", "Stage-2 trainable"):
        assert text in result.stdout
    result = runner.invoke(app, ["verify", "--preset", "wan2.1-t2v-7b"])
    assert result.exit_code == 2 and "unknown preset" in result.output
    result = runner.invoke(app, ["verify", "--stage", "3"])
    assert result.exit_code == 2 and "--stage must be 1 or 2" in result.output
