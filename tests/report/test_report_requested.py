"""`fwdata report` on a generated sample: the requested cameras (requested_cameras/<id>.json) beside the predicted
ones (camera_params/<id>.json), in the contact sheet's top view and in an interactive 3-D plot with frusta.

The dataset is the synthetic truth with, for its first sample, a requested path made from its cameras by a
known perturbation (a sideways drift growing with the frame index), as `fwmodel generate` writes them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fwdata.dataset import camera
from fwdata.dataset.contract import REQUESTED_CAMERAS_DIR, load_metadata, read_camera_json, resolve_inside
from fwdata.dataset.store import atomic_write_text
from fwdata.report import ReportOptions, write_report
from fwdata.report.page import MAX_FRUSTA, frustum_lines
from headless_browser import CHROMIUM, PLOTLY_TRACES, load_page

#: the requested camera centre of frame i is the predicted one moved by i * DRIFT (world units)
DRIFT = np.array([0.15, -0.05, 0.1])


@pytest.fixture(scope="module")
def generated_ds(truth_ds, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("generated") / "ds"
    shutil.copytree(truth_ds, root)
    rec = load_metadata(root).samples[0]
    cams = read_camera_json(resolve_inside(root, rec.paths.camera_json))
    c2w = camera.invert_pose(cams.w2c_array())
    c2w[:, :3, 3] += np.arange(len(c2w))[:, None] * DRIFT
    for f, m in zip(cams.frames, camera.invert_pose(c2w)):
        f.w2c = m.tolist()
    (root / REQUESTED_CAMERAS_DIR).mkdir()
    atomic_write_text(root / REQUESTED_CAMERAS_DIR / f"{rec.id}.json", cams.model_dump_json(indent=1))
    return root, rec.id


def _centres(path: Path) -> np.ndarray:
    return camera.camera_centers(read_camera_json(path).w2c_array())


def test_validation_knows_requested_cameras_is_no_orphan(generated_ds, tmp_path):
    from fwdata.validate import ValidateOptions, validate_dataset

    root, _ = generated_ds
    report = validate_dataset(ValidateOptions(dataset=root, workers=0))
    assert [f.message for f in report.findings if f.check == "schema.orphan_file"] == []
    assert report.passed
    # the tree check still runs: the same file in a folder the contract does not know is an orphan
    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    shutil.move(copy / REQUESTED_CAMERAS_DIR, copy / "wanted_cameras")
    orphans = [f.file for f in validate_dataset(ValidateOptions(dataset=copy, workers=0)).findings
               if f.check == "schema.orphan_file"]
    assert len(orphans) == 1 and orphans[0].startswith("wanted_cameras/")


@pytest.fixture(scope="module")
def report(generated_ds, tmp_path_factory):
    root, _ = generated_ds
    return write_report(ReportOptions(dataset=root, out=tmp_path_factory.mktemp("rep") / "report", workers=0))


def test_sheet_draws_the_requested_path_beside_the_predicted_one(generated_ds, report):
    root, sid = generated_ds
    meta = load_metadata(root)
    out = report.index.parent
    panels = json.loads((out / "samples" / f"{sid}.json").read_text())
    req = _centres(root / REQUESTED_CAMERAS_DIR / f"{sid}.json")
    pred = _centres(resolve_inside(root, meta.sample(sid).paths.camera_json))
    np.testing.assert_allclose(panels["path_top"]["requested"], req[:, [0, 2]], atol=1e-9)
    np.testing.assert_allclose(panels["path_top"]["built"], pred[:, [0, 2]], atol=1e-9)
    # the two lines differ by the drift, frame by frame
    np.testing.assert_allclose(np.array(panels["path_top"]["requested"]) - pred[:, [0, 2]],
                               np.arange(len(pred))[:, None] * DRIFT[[0, 2]], atol=1e-9)
    assert panels["problems"] == []
    png = np.asarray(Image.open(out / "samples" / f"{sid}.png").convert("RGB"))
    assert png.std() > 30
    other = meta.samples[1].id  # a sample without requested cameras keeps its one path
    assert "requested" not in json.loads((out / "samples" / f"{other}.json").read_text())["path_top"]
    page = report.index.read_text()
    assert page.count("requested frusta") == 1 and page.count("predicted frusta") == 1


def test_frusta_start_at_the_camera_centres_and_look_forward():
    w2c = camera.invert_pose(camera.make_pose(np.eye(3)[None].repeat(2, 0), np.array([[0, 0, 0], [1.0, 2.0, 3.0]])))
    K = camera.intrinsics_matrix(np.array([50.0, 50.0]), np.array([50.0, 50.0]), np.array([40.0, 40.0]),
                                 np.array([30.0, 30.0]))
    lines = frustum_lines(w2c, K, width=80, height=60, size=0.5)
    pieces = np.split(lines, np.where(np.isnan(lines[:, 0]))[0])
    first = lines[0]
    np.testing.assert_allclose(first, [0, 0, 0])  # the apex is the centre
    # the image corners at z = size: (u - cx) / fx * size with u in {0, W}
    np.testing.assert_allclose(lines[1], [-40 / 50 * 0.5, -30 / 50 * 0.5, 0.5])
    np.testing.assert_allclose(lines[3], [40 / 50 * 0.5, 30 / 50 * 0.5, 0.5])
    second = [p[~np.isnan(p[:, 0])] for p in pieces if len(p[~np.isnan(p[:, 0])])][5]
    np.testing.assert_allclose(second[0], [1.0, 2.0, 3.0])  # the second camera's apex, moved with it


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH")
def test_page_plots_both_paths_in_3d_and_loads_without_errors(generated_ds, report, tmp_path):
    root, sid = generated_ds
    meta = load_metadata(root)
    errors, img, figures = load_page(report.index, tmp_path / "profile", expression=PLOTLY_TRACES)
    assert errors == [], errors
    assert img.astype(np.float64).mean(axis=2).std() > 20
    assert len(figures) == 2
    n = [r.id for r in meta.samples].index(sid)
    by_name = {t["name"]: np.array([t["x"], t["y"], t["z"]], dtype=float).T for t in figures[n]}
    assert {"requested", "predicted", "requested frusta", "predicted frusta"} <= set(by_name)
    up = lambda c: np.stack([c[:, 0], c[:, 2], -c[:, 1]], axis=1)  # plotted as x, z, -y (up)
    req = _centres(root / REQUESTED_CAMERAS_DIR / f"{sid}.json")
    pred = _centres(resolve_inside(root, meta.sample(sid).paths.camera_json))
    np.testing.assert_allclose(by_name["requested"], up(req), atol=1e-9)
    np.testing.assert_allclose(by_name["predicted"], up(pred), atol=1e-9)
    # the frusta: one wire frame per drawn camera (gaps between), each starting at that camera's centre
    wire = by_name["requested frusta"]
    starts = [0] + [i + 1 for i in np.where(np.isnan(wire[:, 0]))[0][4::5][:-1]]
    step = max(1, -(-len(req) // MAX_FRUSTA))
    np.testing.assert_allclose(wire[starts], up(req[::step]), atol=1e-9)
    # the other sample keeps its single path
    assert [t["name"] for t in figures[1 - n]][0] == "camera"
