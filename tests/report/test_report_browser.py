"""`fwdata report`'s page in headless Chromium: it loads with no console errors, and its screenshot is not blank.

Chromium is driven over the DevTools protocol on a pipe by tests/headless_browser.py (shared with the
other page tests): every console call and uncaught exception arrives with its level, so an error is
told apart from a log line or from the browser's own notes about software WebGL. The detector is
itself tested here on pages with a deliberate `console.error`, a thrown exception and a missing image.
Skipped only when no chromium binary exists (`make sysdeps` installs it when root).
"""

from __future__ import annotations

import numpy as np
import pytest

from fwdata.dataset import camera
from fwdata.dataset.contract import load_metadata, read_camera_json
from fwdata.report import ReportOptions, write_report
from headless_browser import CHROMIUM, load_page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium, or "
                                                          "`make sysdeps` as root)")


def test_the_detector_sees_console_errors_exceptions_and_missing_files(tmp_path):
    cases = {
        "console_error": "<script>console.error('deliberate-console-error')</script>",
        "exception": "<script>undefinedFunctionCall()</script>",
        "missing_image": "<img src='no-such-file.png'>",
    }
    clean = tmp_path / "clean.html"
    clean.write_text("<!DOCTYPE html><html><body><h1>fine</h1><script>console.log('just a log line')</script>"
                     "</body></html>")
    errors, img, _ = load_page(clean, tmp_path / "profile", settle_s=0.2)
    assert errors == []
    assert img.shape == (2000, 1200, 3)
    for name, snippet in cases.items():
        page = tmp_path / f"{name}.html"
        page.write_text(f"<!DOCTYPE html><html><body><h1>{name}</h1>{snippet}</body></html>")
        errors, _, _ = load_page(page, tmp_path / "profile", settle_s=0.2)
        assert len(errors) >= 1, name
        if name == "console_error":
            assert "deliberate-console-error" in errors[0]
        if name == "exception":
            assert "undefinedFunctionCall" in errors[0]


#: the camera paths plotly drew (its decoded traces: the page holds numpy arrays base64-encoded)
TRACES = ("Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => d._fullData.map(t => "
          "({name: t.name, x: Array.from(t.x), y: Array.from(t.y), z: Array.from(t.z)})))")


def test_report_page_loads_without_errors_and_is_not_blank(built_ds, truth_ds, tmp_path):
    res = write_report(ReportOptions(dataset=built_ds, out=tmp_path / "report", truth=truth_ds, workers=0))
    errors, img, figures = load_page(res.index, tmp_path / "profile", expression=TRACES)
    assert errors == [], errors
    assert img.shape == (2000, 1200, 3)
    grey = img.astype(np.float64).mean(axis=2)
    assert grey.std() > 20  # text, tables and the contact sheets, not a white page
    # the first contact sheet is drawn in the page: the screenshot holds many colours, not just text
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 500
    # plotly drew one interactive path per sample, the built path aligned onto the truth
    meta, truth = load_metadata(built_ds), load_metadata(truth_ds)
    assert len(figures) == len(meta.samples)
    for rec, traces in zip(meta.samples, figures):
        by_name = {t["name"]: np.array([t["x"], t["y"], t["z"]]).T for t in traces}
        c = camera.camera_centers(read_camera_json(truth_ds / truth.sample(rec.id).paths.camera_json).w2c_array())
        want = np.stack([c[:, 0], c[:, 2], -c[:, 1]], axis=1)  # plotted as x, z, -y (up)
        np.testing.assert_allclose(by_name["truth"], want, atol=1e-9)
        np.testing.assert_allclose(by_name["built (aligned to truth)"], want, atol=1e-6)
