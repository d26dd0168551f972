"""`fwdata report`'s page in headless Chromium: it loads with no console errors, and its screenshot is not blank.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: no port, no
extra package): every console call and uncaught exception arrives with its level, so an error is
told apart from a log line or from the browser's own notes about software WebGL. The detector is
itself tested on pages with a deliberate `console.error`, a thrown exception and a missing image.
Skipped only when no chromium binary exists (`make sysdeps` installs it when root).
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fwdata.dataset import camera
from fwdata.dataset.contract import load_metadata, read_camera_json
from fwdata.report import ReportOptions, write_report

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium, or "
                                                          "`make sysdeps` as root)")


class Browser:
    """A headless Chromium driven over the DevTools protocol on fds 3/4 (NUL-terminated JSON)."""

    def __init__(self, profile: Path):
        to_r, to_w = os.pipe()  # we write commands -> chromium reads fd 3
        from_r, from_w = os.pipe()  # chromium writes fd 4 -> we read
        to_r, from_w = (self._high(fd) for fd in (to_r, from_w))  # never 3 or 4 themselves

        # bash (dash takes one-digit fds only) moves our pipe ends onto fds 3 and 4, where
        # --remote-debugging-pipe expects them
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-', CHROMIUM, "--headless",
             "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--no-first-run", "about:blank"],
            pass_fds=(to_r, from_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self.w, self.r = os.fdopen(to_w, "wb"), os.fdopen(from_r, "rb")
        self.next_id, self.buf, self.events = 0, b"", []

    @staticmethod
    def _high(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def _read(self) -> dict:
        while b"\0" not in self.buf:
            chunk = os.read(self.r.fileno(), 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.w.write(json.dumps(msg).encode() + b"\0")
        self.w.flush()
        while True:
            m = self._read()
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > end:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.events.append(self._read())

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def load_page(path: Path, profile: Path, width: int = 1200, height: int = 2000, settle_s: float = 3.0,
              expression: str = "null"):
    """(console errors, screenshot as an RGB array, value of the JS `expression` after loading) of the
    page at `path`: errors are console.error / console.assert calls, uncaught exceptions and browser
    log entries of level error (e.g. a missing file the page links)."""
    b = Browser(profile)
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            b.send(f"{domain}.enable", session=session)
        b.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                      "mobile": False}, session=session)
        b.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        b.wait_event("Page.loadEventFired", timeout=90)
        time.sleep(settle_s)  # let plotly draw
        value = b.send("Runtime.evaluate", {"expression": f"JSON.stringify({expression})", "returnByValue": True},
                       session=session)["result"].get("value")  # also collects the events sent meanwhile
        shot = b.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        errors = []
        for e in b.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                          for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                errors.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(f"log error: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(shot))).convert("RGB"))
        return errors, img, json.loads(value) if value is not None else None
    finally:
        b.close()


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
