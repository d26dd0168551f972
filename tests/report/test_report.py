"""`fwdata report` and `fwdata validate --html`: the page, the contact sheets and what they show.

The depth panels are checked against the depth file by mapping the PNG's colours back through the
colour map (the sheet's panel map says where each panel is and the colour map's range); the camera
path drawn with a truth is checked against the truth (the built copy's cameras live in a world moved
by a known Sim(3), which `fwdata compare`'s alignment must undo).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from fwdata.cli import app
from fwdata.dataset import camera
from fwdata.dataset.contract import DEPTH_NPZ, load_metadata, load_npz, read_camera_json, resolve_inside
from fwdata.textout import plural
from report_datasets import FAILURE_REASON, REGISTERED, SCALE

runner = CliRunner()


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def report_dir(built_ds, truth_ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "report"
    before = _tree_digest(built_ds)
    r = runner.invoke(app, ["report", str(built_ds), "--truth", str(truth_ds), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "2 contact sheets" in r.output
    assert _tree_digest(built_ds) == before  # the dataset is never written to
    return out


def _depth_back(png: np.ndarray, box, cmap_name: str, vmin: float, vmax: float, height: int, width: int):
    """The depth values the colours of one depth panel stand for, and the depth pixel under each PNG
    pixel of the panel: (values (h,w), rows (h,1), cols (1,w))."""
    x0, y0, x1, y1 = box
    crop = png[y0:y1, x0:x1, :3].astype(np.float64)
    cmap = matplotlib.colormaps[cmap_name]
    lut = cmap(np.arange(cmap.N))[:, :3] * 255
    dist, idx = cKDTree(lut).query(crop.reshape(-1, 3))
    values = vmin + (idx + 0.5) / cmap.N * (vmax - vmin)
    values[dist > 12] = np.nan  # not a colour of the map (invalid pixels, anti-aliased edges)
    rows = np.floor((np.arange(y1 - y0) + 0.5) / (y1 - y0) * height).astype(int)[:, None]
    cols = np.floor((np.arange(x1 - x0) + 0.5) / (x1 - x0) * width).astype(int)[None, :]
    return values.reshape(crop.shape[:2]), rows, cols


def test_sheets_are_not_blank_and_each_sample_has_one(report_dir, built_ds):
    meta = load_metadata(built_ds)
    for rec in meta.samples:
        png = np.asarray(Image.open(report_dir / "samples" / f"{rec.id}.png").convert("RGB"))
        assert png.std() > 30, rec.id
        panels = json.loads((report_dir / "samples" / f"{rec.id}.json").read_text())
        assert panels["size"] == [png.shape[1], png.shape[0]]
        assert panels["frames"] == [0, 3, 5, 8]  # spread over the 9 frames, first and last included
        assert panels["problems"] == []
        for d in panels["depth"]:  # each depth panel shows depth, not a flat colour
            x0, y0, x1, y1 = d["box"]
            assert png[y0:y1, x0:x1].std() > 10


def test_depth_panels_show_the_depth_file(report_dir, built_ds):
    meta = load_metadata(built_ds)
    for rec in meta.samples:
        png = np.asarray(Image.open(report_dir / "samples" / f"{rec.id}.png").convert("RGB"))
        panels = json.loads((report_dir / "samples" / f"{rec.id}.json").read_text())
        depth = load_npz(resolve_inside(built_ds, rec.paths.depth), DEPTH_NPZ, rec.dims)
        shown = depth["depth"][panels["frames"]][depth["valid"][panels["frames"]]]
        vmin, vmax = panels["vmin"], panels["vmax"]
        assert vmin == pytest.approx(np.percentile(shown, 1), rel=1e-5)  # the range comes from this file
        assert vmax == pytest.approx(np.percentile(shown, 99), rel=1e-5)
        bin_width = (vmax - vmin) / matplotlib.colormaps[panels["cmap"]].N
        assert len(panels["depth"]) == 4
        for d in panels["depth"]:
            values, rows, cols = _depth_back(png, d["box"], panels["cmap"], vmin, vmax, rec.height, rec.width)
            ok = ~np.isnan(values) & depth["valid"][d["frame"]][rows, cols]
            assert ok.mean() > 0.9
            want = np.clip(depth["depth"][d["frame"]][rows, cols], vmin, vmax)
            err = np.abs(values - want)[ok]
            assert np.median(err) < 1.0 * bin_width, (rec.id, d["frame"])
            assert np.percentile(err, 90) < 3.0 * bin_width, (rec.id, d["frame"])
            # the same check tells another frame's depth apart: it would fail if the wrong frame were drawn
            other = panels["frames"][-1] if d["frame"] != panels["frames"][-1] else panels["frames"][0]
            wrong = np.clip(depth["depth"][other][rows, cols], vmin, vmax)
            assert np.percentile(np.abs(values - wrong)[ok], 90) > 3.0 * bin_width


def test_camera_path_is_aligned_onto_the_truth_like_compare(report_dir, built_ds, truth_ds):
    meta, truth = load_metadata(built_ds), load_metadata(truth_ds)
    for rec in meta.samples:
        panels = json.loads((report_dir / "samples" / f"{rec.id}.json").read_text())
        gt = camera.camera_centers(read_camera_json(resolve_inside(truth_ds, truth.sample(rec.id).paths.camera_json))
                                   .w2c_array())
        built = camera.camera_centers(read_camera_json(resolve_inside(built_ds, rec.paths.camera_json)).w2c_array())
        drawn = panels["path_top"]
        np.testing.assert_allclose(drawn["truth"], gt[:, [0, 2]], atol=1e-9)
        np.testing.assert_allclose(drawn["built_aligned"], gt[:, [0, 2]], atol=1e-6)
        assert np.abs(built[:, [0, 2]] - gt[:, [0, 2]]).max() > 0.5  # the unaligned path is elsewhere
    page = (report_dir / "index.html").read_text()
    assert "built (aligned to truth)" in page
    # compare's table is in the page, with the scale its Sim(3) found (built unit -> truth unit)
    assert f"{1 / SCALE:.4g}" in page and "ate_pct" in page


def test_page_is_self_contained_and_lists_findings_and_failures(report_dir, built_ds):
    page = (report_dir / "index.html").read_text()
    assert "<script src=" not in page and 'href="http' not in page.split("<body>", 1)[1].split("<script")[0]
    assert "Plotly.newPlot" in page and len(page) > 3_000_000  # plotly.js inlined: works offline
    meta = load_metadata(built_ds)
    for rec in meta.samples:
        assert f'src="samples/{rec.id}.png"' in page
        assert (report_dir / "samples" / f"{rec.id}.png").is_file()
    assert FAILURE_REASON in page and "raw/broken.mp4" in page  # the build failure, with its reason
    for ratio in REGISTERED:  # the quality metrics the build recorded, in the samples table
        assert f"<td>{ratio:.4g}</td>" in page
    # validate's findings: the built copy's cameras no longer match its point maps
    r = runner.invoke(app, ["validate", str(built_ds), "--format", "json", "--workers", "0"])
    found = {f["check"] for f in json.loads(r.stdout)["findings"]}
    assert found
    for check in found:
        assert check in page
    assert page.count('id="path-') == 2


def test_one_sample_and_the_same_bytes_twice(built_ds, tmp_path):
    sid = load_metadata(built_ds).samples[1].id
    outs = []
    for k in range(2):
        out = tmp_path / f"r{k}"
        r = runner.invoke(app, ["report", str(built_ds), "--out", str(out), "--sample", sid, "-q"])
        assert r.exit_code == 0, r.output
        outs.append(out)
    assert sorted(p.name for p in (outs[0] / "samples").iterdir()) == [f"{sid}.json", f"{sid}.png"]
    page = (outs[0] / "index.html").read_text()
    assert "showing 1 of 2 samples" in page
    for rel in ("index.html", f"samples/{sid}.png", f"samples/{sid}.json"):
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_sample_takes_the_short_id_info_prints_and_refuses_an_ambiguous_prefix(built_ds, tmp_path):
    import os.path

    from fwdata.textout import short_ids

    ids = [s.id for s in load_metadata(built_ds).samples]
    sid = ids[1]
    short = short_ids(ids)[sid]
    info = runner.invoke(app, ["info", str(built_ds)], env={"COLUMNS": "80"})
    assert info.exit_code == 0 and short != sid and short in info.output.split()
    r = runner.invoke(app, ["report", str(built_ds), "--out", str(tmp_path / "r"), "--sample", short, "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "r" / "samples").iterdir()) == [f"{sid}.json", f"{sid}.png"]
    assert "showing 1 of 2 samples" in (tmp_path / "r" / "index.html").read_text()

    prefix = os.path.commonprefix(ids)
    assert prefix
    r = runner.invoke(app, ["report", str(built_ds), "--out", str(tmp_path / "a"), "--sample", prefix])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "ambiguous" in lines[0], r.output
    assert not (tmp_path / "a").exists()


def test_a_damaged_sample_is_reported_not_fatal(truth_ds, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(truth_ds, ds)
    rec = load_metadata(ds).samples[0]
    (ds / rec.paths.depth).write_bytes(b"not an npz")
    r = runner.invoke(app, ["report", str(ds), "--out", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "out" / "index.html").read_text()
    assert "depth: " in page and "depth not readable" not in page  # the problem line, in the page
    panels = json.loads((tmp_path / "out" / "samples" / f"{rec.id}.json").read_text())
    assert panels["depth"] == [] and panels["problems"][0].startswith("depth: ")


def test_bad_input_is_one_line_exit_2(truth_ds, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished" / ".fwdata" / "done").mkdir(parents=True)
    cases = [
        (["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], "not a readable dataset"),
        (["report", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "is not a folder"),
        (["report", str(tmp_path / "unfinished"), "--out", str(tmp_path / "o")], "unfinished build"),
        (["report", str(truth_ds), "--out", str(tmp_path / "file")], "is a file"),
        (["report", str(truth_ds), "--out", str(truth_ds / "report")], "inside the dataset"),
        (["report", str(truth_ds), "--out", str(tmp_path / "o"), "--truth", str(tmp_path / "empty")], "--truth"),
        (["report", str(truth_ds), "--out", str(tmp_path / "o"), "--sample", "nope-000000-00000000"], "unknown"),
        (["validate", str(truth_ds), "--html", str(tmp_path / "file")], "--html"),
    ]
    for args, words in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        lines = [x for x in r.output.strip().splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (args, r.output)
    assert not (truth_ds / "report").exists() and not (tmp_path / "o").exists()


def test_validate_html_writes_the_report_from_its_own_validation(built_ds, tmp_path):
    out = tmp_path / "html"
    r = runner.invoke(app, ["validate", str(built_ds), "--html", str(out), "--workers", "0", "--format", "json"])
    assert r.exit_code == 1  # the moved cameras fail validation; the report is written all the same
    report = json.loads(r.stdout)
    page = (out / "index.html").read_text()
    assert "validation <span class=\"bad\">failed</span>" in page
    assert plural(report['summary']['errors'], "error") in page
    assert "picture report in" in r.stderr
    assert len(list((out / "samples").glob("*.png"))) == 2


def test_many_samples_share_one_3d_plot(built_ds, tmp_path, monkeypatch):
    from fwdata.report import ReportOptions, page, write_report

    monkeypatch.setattr(page, "MAX_3D_PLOTS", 1)  # two samples are "many"
    res = write_report(ReportOptions(dataset=built_ds, out=tmp_path / "r", workers=0))
    html = res.index.read_text()
    assert html.count('id="paths-all"') == 1 and 'id="path-0"' not in html
    assert '"updatemenus"' in html
    for rec in load_metadata(built_ds).samples:  # one menu entry per sample
        assert f'"label":"{rec.id}"' in html
