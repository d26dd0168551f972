"""A headless Chromium for the tests of our HTML pages (`fwdata report`, `fwmodel report`): console errors and
a screenshot of a page.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: no port, no
extra package): every console call and uncaught exception arrives with its level, so an error is
told apart from a log line or from the browser's own notes about software WebGL. The detector is
itself tested (tests/report/test_report_browser.py) on pages with a deliberate `console.error`, a
thrown exception and a missing image. `CHROMIUM` is None when no chromium binary exists (the tests
then skip: `make sysdeps` installs it when root).
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
from PIL import Image

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
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


#: every plotly figure of a page as plotly drew it (its decoded traces; a page holds numpy arrays
#: base64-encoded): per figure a list of {name, x, y, z (null for 2-D traces)}; NaN gaps become null
PLOTLY_TRACES = ("Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => d._fullData.map(t => "
                 "({name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || []), "
                 "z: t.z ? Array.from(t.z) : null})))")
