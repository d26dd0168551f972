"""Human output fits 80 columns, short ids go back into --sample, machine formats stay exact, help text
is complete (issue 14, items 13 and 17)."""

from __future__ import annotations

import json
import shutil

import pytest
import typer
from typer.testing import CliRunner

from fwdata.cli import app as fwdata_app
from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset
from fwdata.textout import SampleIdError, plural, resolve_sample_ids, short_ids
from fwmodel.cli import app as fwmodel_app

runner = CliRunner()
NARROW = {"COLUMNS": "80"}


def _lines(text: str) -> list[str]:
    return text.splitlines()


def assert_fits(text: str, width: int = 80) -> None:
    # a single word longer than the line (a long path) is kept whole rather than split
    too_long = [line for line in _lines(text) if len(line) > width and len(line.split()) > 1]
    assert not too_long, f"{len(too_long)} lines over {width} columns, e.g. {too_long[0]!r}"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """Two small rendered clips (with their .ply clouds)."""
    root = tmp_path_factory.mktemp("out") / "ds"
    write_synthetic_dataset(root, SynthOptions(num_scenes=2, num_frames=9, height=64, width=112))
    return root


@pytest.fixture(scope="module")
def ids(ds):
    from fwdata.dataset.contract import load_metadata

    return [s.id for s in load_metadata(ds).samples]


# --------------------------------------------------------------------------- helpers


def test_plural():
    assert [plural(n, "error") for n in (0, 1, 2)] == ["0 errors", "1 error", "2 errors"]
    assert plural(1, "sample") == "1 sample" and plural(3, "match") == "3 matches"
    assert plural(2, "process", "processes") == "2 processes"


def test_short_ids_are_unique_prefixes_that_resolve_back():
    ids = ["walk-000000-abcd12345678", "walk-000000-abcd99999999", "walk-000081-0123456789ab", "custom_id"]
    short = short_ids(ids)
    assert short == {"walk-000000-abcd12345678": "walk-000000-abcd1", "walk-000000-abcd99999999": "walk-000000-abcd9",
                     "walk-000081-0123456789ab": "walk-000081-0123", "custom_id": "custom_id"}
    assert resolve_sample_ids(list(short.values()), ids) == ids
    assert resolve_sample_ids(["walk-000081", " walk-000000-abcd9 "], ids) == [ids[2], ids[1]]
    with pytest.raises(SampleIdError, match="'walk-000000-abcd' is ambiguous: it matches 2 samples"):
        resolve_sample_ids(["walk-000000-abcd"], ids)
    with pytest.raises(SampleIdError, match="unknown .*: nope"):
        resolve_sample_ids(["nope"], ids)


def test_fitted_table_leaves_out_what_does_not_fit_and_names_it():
    import io

    from rich.console import Console

    from fwdata.textout import fitted_table

    ids = ["kitchen_walk-000000-3f9c", "kitchen_walk-000081-77aa"]
    cols = [("id", ids)] + [(f"metric{k}", ["0.123", "4.56"]) for k in range(8)]
    table, left_out = fitted_table(cols, 60)
    buf = io.StringIO()
    Console(file=buf, width=60, color_system=None).print(table)
    lines = buf.getvalue().splitlines()
    shown = lines[0].split()
    assert shown[0] == "id" and shown[1:] == [f"metric{k}" for k in range(len(shown) - 1)]
    assert left_out == [f"metric{k}" for k in range(len(shown) - 1, 8)] and left_out
    assert max(len(line) for line in lines) <= 60 and [line.split()[0] for line in lines[2:]] == ids
    table, left_out = fitted_table(cols, None)
    assert left_out == [] and len(table.columns) == 9


# --------------------------------------------------------------------------- info


def test_info_fits_80_columns_and_its_ids_go_back_into_sample(ds, ids):
    r = runner.invoke(fwdata_app, ["info", str(ds)], env=NARROW)
    assert r.exit_code == 0, r.output
    assert_fits(r.output)
    short = short_ids(ids)
    assert all(short[i] != i and len(short[i]) < len(i) for i in ids)
    rows = [line.split()[0] for line in _lines(r.output) if line.split() and line.split()[0] in short.values()]
    assert sorted(rows) == sorted(short.values())  # every id printed whole as its short form, no ellipsis
    assert "…" not in r.output and "2 samples (2 ok" in r.output and "0 failed inputs" in r.output
    v = runner.invoke(fwdata_app, ["validate", str(ds), "--sample", rows[0], "-j", "0", "-q"], env=NARROW)
    assert v.exit_code == 0, v.output
    assert "1/1 sample pass (of 2)" in v.output


def test_info_wide_shows_whole_ids_and_every_column(ds, ids):
    r = runner.invoke(fwdata_app, ["info", str(ds), "--wide"], env=NARROW)
    assert r.exit_code == 0, r.output
    assert all(i in r.output for i in ids)
    header = next(line for line in _lines(r.output) if line.startswith("id "))
    assert header.split() == ["id", "split", "status", "T", "HxW", "fps", "scale"]


def test_info_failures_wrap_with_the_path_whole(ds, tmp_path):
    failed = tmp_path / "failed"
    shutil.copytree(ds, failed)
    meta = json.loads((failed / "metadata.json").read_text())
    source = "/data/videos/a/rather/deep/folder/of/phone/footage/IMG_20240101_123456.mp4"
    meta["failures"] = [{"source": source, "stage": "plan",
                         "reason": "too short: 40 frames, a clip of 49 frames at stride 2 needs 97"}]
    meta["statistics"]["num_failed_inputs"] = 1
    (failed / "metadata.json").write_text(json.dumps(meta))
    r = runner.invoke(fwdata_app, ["info", str(failed)], env=NARROW)
    assert r.exit_code == 0, r.output
    assert_fits(r.output)
    assert f"    {source}" in _lines(r.output) and "1 failed input;" in r.output
    assert "  failed: " + source + " [plan] too short: 40 frames" in r.output.replace("\n    ", " ")


def test_info_json_is_json_lines(ds, ids):
    r = runner.invoke(fwdata_app, ["info", str(ds), "--json"], env=NARROW)
    assert r.exit_code == 0, r.output
    assert r.stdout.endswith("}\n") and "\n\n" not in r.stdout
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["id"] for rec in records] == ids
    assert all(rec["T"] == 9 and rec["H"] == 64 and rec["W"] == 112 and rec["status"] == "ok" for rec in records)


# --------------------------------------------------------------------------- validate


def test_validate_table_fits_80_columns_and_counts_in_the_singular(ds, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ds, broken)
    next((broken / "points").glob("*.ply")).unlink()
    r = runner.invoke(fwdata_app, ["validate", str(broken), "-j", "0"], env=NARROW)
    assert r.exit_code == 1, r.output
    assert_fits(r.stdout)
    assert "schema.missing_file" in r.stdout
    assert "FAIL: 1 error, 0 warnings; 1 of " in r.stdout.replace("\n", " ")

    # --output: the report goes to the file, stdout gets one summary line
    report = tmp_path / "report.json"
    r = runner.invoke(fwdata_app, ["validate", str(broken), "-j", "0", "-f", "json", "-o", str(report)], env=NARROW)
    assert r.exit_code == 1
    assert len(_lines(r.stdout)) == 1 and r.stdout.startswith("FAIL: 1 error,") and f"report in {report}" in r.stdout
    assert json.loads(report.read_text())["summary"]["errors"] == 1


def test_validate_sample_prefix_ambiguous_is_one_line(ds, ids):
    prefix = "synth_"
    assert all(i.startswith(prefix) for i in ids)
    r = runner.invoke(fwdata_app, ["validate", str(ds), "--sample", prefix, "-q"], env=NARROW)
    assert r.exit_code == 2
    assert _lines(r.stderr) == [f"error: sample id prefix '{prefix}' is ambiguous: it matches 2 samples "
                                f"({ids[0]}, {ids[1]}); give more of the id"]


# --------------------------------------------------------------------------- compare, doctor


def test_compare_fits_80_columns_and_wide_has_every_column(ds, ids):
    r = runner.invoke(fwdata_app, ["compare", str(ds), "--truth", str(ds)], env=NARROW)
    assert r.exit_code == 0, r.output
    assert_fits(r.output)
    out = [line.rstrip() for line in _lines(r.output)]
    cameras, depth = out.index("cameras"), out.index("depth and points")
    assert out[cameras + 1].split() == ["sample", "ATE%", "focal%", "RPEdeg", "scale", "reg%", "frames"]
    rows = {line.split()[0]: line.split()[1:] for line in out[cameras + 3:depth]}
    short = short_ids(ids)
    assert set(rows) == {short[i] for i in ids} | {"mean"}
    for cams in rows.values():  # the truth compared with itself: no error, scale 1, every frame
        assert float(cams[0]) < 1e-6 and cams[1] == "0" and cams[3] == "1" and cams[4:] == ["100", "9"]
    w = runner.invoke(fwdata_app, ["compare", str(ds), "--truth", str(ds), "--wide"], env=NARROW)
    assert w.exit_code == 0 and all(i in w.output for i in ids)
    header = next(line for line in _lines(w.output) if line.startswith("sample "))
    from fwdata.compare import COLUMNS

    assert header.split() == list(COLUMNS)


def test_doctor_fits_80_columns(tmp_path):
    missing = tmp_path / "no-model"  # the detail is longer than 80 columns; a path longer than that stays whole
    r = runner.invoke(fwdata_app, ["doctor", "--out", str(tmp_path), "--depth-model", str(missing)], env=NARROW)
    assert r.exit_code == 1
    assert_fits(r.output, 80)
    paragraph = r.output[r.output.index("PROBLEM depth model"):].replace("\n  ", " ")
    assert str(missing) in paragraph.splitlines()[0]


# --------------------------------------------------------------------------- help text


def _commands(app):
    root = typer.main.get_command(app)

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, path + [name])

    return list(walk(root, []))


@pytest.mark.parametrize("app", [fwdata_app, fwmodel_app], ids=["fwdata", "fwmodel"])
def test_every_option_has_help_and_flags_show_as_flags(app):
    commands = _commands(app)
    assert len(commands) > 5
    missing = [(" ".join(path), p.name) for path, cmd in commands for p in cmd.params
               if not (getattr(p, "help", None) or "").strip()]
    assert not missing, missing
    for path, cmd in commands:
        r = runner.invoke(app, path + ["--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, (path, r.output)
        assert "<bool>" not in r.output, path


def test_build_help_shows_the_preset_defaults():
    r = runner.invoke(fwdata_app, ["build", "--help"], env={"COLUMNS": "250"})
    text = " ".join(r.output.split())
    for value in ("81", "336", "592", "incremental", "no-loop-detection", "auto"):
        assert f"[default: ({value} in the default preset)]" in text, value
    # the docstring's source line breaks are gone: rich wraps the paragraph to the terminal
    assert "(the rest is written and listed in metadata.json), 2 bad options" in r.output


# --------------------------------------------------------------------------- --allow-random-init


def test_validate_random_init_failure_names_the_flag_and_the_flag_allows_it(ds, tmp_path):
    marked = tmp_path / "marked"
    shutil.copytree(ds, marked)
    meta = json.loads((marked / "metadata.json").read_text())
    meta["provenance"]["models"].append({"role": "depth", "name": "random-tiny", "revision": "seed0",
                                         "random_init": True})
    (marked / "metadata.json").write_text(json.dumps(meta))
    r = runner.invoke(fwdata_app, ["validate", str(marked), "-j", "0"], env=NARROW)
    assert r.exit_code == 1, r.output
    assert_fits(r.stdout)
    text = " ".join(r.stdout.split())
    assert ("error gate.random_init_model: metadata.json: made with the randomly initialised depth model "
            "'random-tiny'") in text and "allow it with `fwdata validate --allow-random-init`" in text
    r = runner.invoke(fwdata_app, ["validate", str(marked), "-j", "0", "-f", "json", "--allow-random-init"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["gates"] == "default (built-in) with --allow-random-init"
    assert [(f["check"], f["severity"]) for f in report["findings"]] == [("gate.random_init_model", "warning")]


def test_random_init_refusal_names_the_flag_and_the_flag_allows_it(monkeypatch, tmp_path):
    import fwmodel.train as train_module
    from fwmodel.train.loop import refuse_random_init

    message = str(refuse_random_init(["2 of the 2 training samples have labels made by ..."]))
    assert "--allow-random-init" in message and "data.allow_random_init_labels = true" in message
    seen = []
    monkeypatch.setattr(train_module, "train", lambda cfg, **kw: seen.append(cfg))
    for extra, allowed in (([], False), (["--allow-random-init"], True)):
        r = runner.invoke(fwmodel_app, ["train", "--stage", "1", "--config", "stage1", "--data", str(tmp_path),
                                        "--output", str(tmp_path / "out"), *extra])
        assert r.exit_code == 0, r.output
        assert seen[-1].data.allow_random_init_labels is allowed
