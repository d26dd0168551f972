"""Packaged presets (issue 14, item 12): one lookup for build presets, gate files and training recipes,
`fwdata presets` / `fwmodel recipes`, and a wheel that carries every preset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fwdata.cli import app as fwdata_app
from fwdata.presets import BUILD_PRESETS, GATE_FILES, description, find_preset
from fwdata.runtime import ConfigFileError
from fwmodel.cli import app as fwmodel_app
from fwmodel.recipes import RECIPES

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

#: what the packages must ship; a preset added later is checked by the globs below as well
EXPECTED = {
    "fwdata/presets/build": {"default", "fast"},
    "fwdata/presets/gates": {"default", "strict"},
    "fwmodel/recipes": {"stage1", "stage1-i2v-14b", "stage2", "stage2-i2v-14b", "tiny-stage1", "tiny-stage2"},
}


def _one_line_error(result) -> str:
    text = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "\n" not in text, text
    assert text.startswith("error: ")
    return text


def test_the_presets_live_in_the_packages_not_in_pipelines():
    for folder, names in EXPECTED.items():
        assert {p.stem for p in (REPO / folder).glob("*.toml")} == names
    assert BUILD_PRESETS.names() == ["default", "fast"]
    assert GATE_FILES.names() == ["default", "strict"]
    assert RECIPES.names() == ["stage1", "stage1-i2v-14b", "stage2", "stage2-i2v-14b", "tiny-stage1", "tiny-stage2"]
    # launch scripts and CI examples only; a .toml there is a relative link to the packaged recipe (one file)
    for path in (REPO / "pipelines").rglob("*.toml"):
        assert path.is_symlink() and not Path(path.readlink()).is_absolute(), path
        assert path.resolve().parent == REPO / "fwmodel/recipes" and path.resolve().is_file(), path


def test_every_kind_is_found_by_name_with_the_one_lookup():
    from fwdata.build.pipeline import load_config as load_build
    from fwdata.validate.gates import load_gates
    from fwmodel.train.config import load_config as load_recipe

    assert find_preset("fast", BUILD_PRESETS) == REPO / "fwdata/presets/build/fast.toml"
    fast = load_build("fast")
    assert (fast.clips.num_frames, fast.clips.height, fast.clips.max_clips_per_video, fast.write_ply) == \
        (33, 192, 1, False)
    strict = load_gates("strict")
    assert strict.name == "strict" and strict.sample["registered_ratio"].min == 0.995
    assert strict.dataset.min_pass_fraction == 1.0
    tiny = load_recipe(Path("tiny-stage1"))
    assert (tiny.model.preset, tiny.train.stage, tiny.train.num_steps) == ("tiny", 1, 6)
    assert load_recipe("stage2").train.stage == 2 and load_recipe("stage2").model.preset == "wan2.1-t2v-1.3b"


def test_an_existing_path_is_read_as_a_file_before_any_name(tmp_path, monkeypatch):
    from fwdata.validate.gates import load_gates

    monkeypatch.chdir(tmp_path)
    Path("strict").write_text('name = "mine"\n[dataset]\nmin_pass_fraction = 0.25\n')
    mine = load_gates("strict")  # the file in the working folder, not the packaged gate file
    assert mine.name == "mine" and mine.dataset.min_pass_fraction == 0.25
    assert find_preset(tmp_path / "strict", GATE_FILES) == tmp_path / "strict"
    Path("fast").mkdir()
    with pytest.raises(ConfigFileError, match="is a folder"):
        find_preset("fast", BUILD_PRESETS)


@pytest.mark.parametrize("value", ["nope", "pipelines/gates/strict.toml", "strict.toml", "../strict", ""])
def test_unknown_names_list_the_available_ones(value):
    with pytest.raises(ConfigFileError) as err:
        find_preset(value, GATE_FILES)
    assert "available: default, strict" in str(err.value) and "`fwdata presets`" in str(err.value)


def test_unknown_names_are_one_line_exit_2_for_every_command(tmp_path):
    text = _one_line_error(runner.invoke(fwdata_app, ["build", str(tmp_path), "--out", str(tmp_path / "o"),
                                                      "--config", "fsat"]))
    assert "build preset 'fsat'" in text and "available: default, fast" in text
    text = _one_line_error(runner.invoke(fwdata_app, ["validate", str(tmp_path), "--gates", "strcit"]))
    assert "gate file 'strcit'" in text and "available: default, strict" in text
    text = _one_line_error(runner.invoke(fwdata_app, ["doctor", "--out", str(tmp_path), "--config", "fsat"]))
    assert "build preset 'fsat'" in text
    text = _one_line_error(runner.invoke(fwmodel_app, ["train", "--stage", "1", "--config", "tiny-stage3",
                                                       "--data", str(tmp_path)]))
    assert "training recipe 'tiny-stage3'" in text
    assert "available: stage1, stage1-i2v-14b, stage2, stage2-i2v-14b, tiny-stage1, tiny-stage2" in text and "`fwmodel recipes`" in text
    text = _one_line_error(runner.invoke(fwmodel_app, ["cache", str(tmp_path), "--vae", "random-tiny",
                                                       "--text-encoder", "random-tiny", "--config", "nope"]))
    assert "training recipe 'nope'" in text
    # a packaged name is resolved before the stage check too
    text = _one_line_error(runner.invoke(fwmodel_app, ["train", "--stage", "2", "--config", "tiny-stage1",
                                                       "--data", str(tmp_path)]))
    assert "fwmodel/recipes/tiny-stage1.toml is a Stage-1 recipe" in text


def test_validate_gates_by_name_is_the_packaged_file(tmp_path):
    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset

    ds = tmp_path / "ds"
    write_synthetic_dataset(ds, SynthOptions(num_scenes=1, num_frames=5, height=32, width=48, write_ply=False))

    def findings(gates):
        r = runner.invoke(fwdata_app, ["validate", str(ds), "--gates", gates, "--format", "json", "--quiet",
                                       "--workers", "0"])
        assert r.exit_code in (0, 1), r.output
        report = json.loads(r.stdout)
        return r.exit_code, sorted((f["check"], f.get("sample") or "") for f in report["findings"])

    by_name = findings("strict")
    assert by_name == findings(str(REPO / "fwdata/presets/gates/strict.toml"))
    # strict refuses this 5-frame, 0.3 s clip (SpatialVID's 3-15 s); the default gates do not gate duration
    assert by_name[0] == 1 and any(check == "gate.duration_s" for check, _ in by_name[1]), by_name
    assert not any(check == "gate.duration_s" for check, _ in findings("default")[1])


def _listed(output: str) -> dict[str, str]:
    """name -> description of the `  name  description` lines of a listing."""
    out = {}
    for line in output.splitlines():
        if line.startswith("  "):
            name, _, desc = line.strip().partition("  ")
            out[name] = desc.strip()
    return out


def test_fwdata_presets_lists_build_presets_and_gates_with_their_first_comment_line():
    r = runner.invoke(fwdata_app, ["presets"])
    assert r.exit_code == 0, r.output
    listed = _listed(r.stdout)
    assert set(listed) == {"default", "fast", "strict"}  # `default` of both kinds
    assert listed["fast"] == "Quick look / CI smoke: short small clips, one per video, no .ply."
    assert listed["strict"] == description(REPO / "fwdata/presets/gates/strict.toml") != ""
    head, _, tail = r.stdout.partition("gate files")
    assert "build presets" in head and "fwdata build --config NAME" in head and str(BUILD_PRESETS.directory) in head
    assert _listed(head)["default"].startswith("The default build") and _listed(tail)["default"].startswith("Permissive")
    assert all(len(line) <= 80 for line in r.stdout.splitlines() if line.startswith("  "))


def test_fwmodel_recipes_lists_every_recipe():
    r = runner.invoke(fwmodel_app, ["recipes"])
    assert r.exit_code == 0, r.output
    listed = _listed(r.stdout)
    assert set(listed) == EXPECTED["fwmodel/recipes"]
    for name, desc in listed.items():
        assert desc == description(REPO / f"fwmodel/recipes/{name}.toml") and desc
    assert "fwmodel train --config NAME" in r.stdout and str(RECIPES.directory) in r.stdout


def test_recipe_headers_use_names_that_resolve():
    for recipe in (REPO / "fwmodel/recipes").glob("*.toml"):
        for line in recipe.read_text().splitlines():
            if "--config" in line and line.startswith("#"):
                name = line.split("--config", 1)[1].split()[0]
                assert find_preset(name, RECIPES) == recipe, (recipe.name, line)


@pytest.mark.slow
def test_a_wheel_built_from_the_tree_contains_every_preset_and_finds_them(tmp_path):
    # a copy of what the wheel is built from, so the build leaves nothing in the working tree
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("fwdata", "fwmodel"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, expected in EXPECTED.items():
        in_wheel = {Path(n).stem for n in names if n.startswith(folder + "/") and n.endswith(".toml")}
        assert in_wheel == expected == {p.stem for p in (REPO / folder).glob("*.toml")}, folder
    assert not any(n.startswith("pipelines/") for n in names)

    # installed from the wheel (unpacked; no editable checkout on the path), every kind is found by name
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from fwdata.presets import BUILD_PRESETS, GATE_FILES, find_preset; from fwmodel.recipes import RECIPES; "
            "print(*[find_preset(n, k) for n, k in (('fast', BUILD_PRESETS), ('strict', GATE_FILES), "
            "('tiny-stage1', RECIPES))], sep='\\n')")
    res = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(site / "fwdata/presets/build/fast.toml"),
                                  str(site / "fwdata/presets/gates/strict.toml"),
                                  str(site / "fwmodel/recipes/tiny-stage1.toml")]
