"""The HTML page of `fwdata report`: tables (pandas), contact sheets (beside it), 3-D camera paths (plotly).

plotly.js is inlined once in the page's head, so the page works offline; the contact sheets are
PNG files in `samples/` beside `index.html`, linked relatively. Figure ids are fixed, so the same
dataset gives the same page.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from fwdata.dataset import camera
from fwdata.dataset.contract import DatasetMetadata, SampleRecord
from fwdata.textout import plural

#: most validation findings listed in the page's findings table (the rest are counted)
MAX_FINDINGS = 500

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1500px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
th { background: #f0f0f0; }
.ok { color: #137333; font-weight: bold; } .bad { color: #b3261e; font-weight: bold; }
.error { color: #b3261e; } .warning { color: #b06000; } .info { color: #555; }
img.sheet { max-width: 100%; border: 1px solid #ddd; }
.small { font-size: 0.85em; color: #555; }
.scroll { overflow-x: auto; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(df, **kw) -> str:
    return ('<div class="scroll">' + df.to_html(index=False, na_rep="-", border=0, float_format=lambda v: f"{v:.4g}",
                                                **kw) + "</div>")


#: up to this many samples each get their own 3-D plot; more share one plot with a sample selector
#: (a browser keeps only about 16 WebGL contexts alive)
MAX_3D_PLOTS = 12

_LAYOUT = dict(height=460, margin=dict(l=0, r=0, t=40, b=0), legend=dict(x=0, y=1),
               scene=dict(aspectmode="data", xaxis_title="x", yaxis_title="z (forward)", zaxis_title="-y (up)"))


#: most camera frusta drawn per path in the 3-D plot
MAX_FRUSTA = 10


def frustum_lines(w2c: np.ndarray, K: np.ndarray, width: int, height: int, size: float) -> np.ndarray:
    """Wire frames of camera frusta as polylines (N,3) broken by NaN rows (plotly leaves a gap there):
    per camera the apex, the image rectangle at z = `size` (world units) joined to the apex, and a
    tick above the image's top edge (which way is up). w2c (T,4,4), K (T,3,3) pixels; world coordinates."""
    c2w = camera.invert_pose(w2c)
    uv = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    gap = np.full(3, np.nan)
    out = []
    for T, k in zip(c2w, K):
        x = (uv[:, 0] - k[0, 2]) / k[0, 0] * size
        y = (uv[:, 1] - k[1, 2]) / k[1, 1] * size
        tl, tr, br, bl = np.stack([x, y, np.full(4, size)], axis=1)
        apex = np.zeros(3)
        mid_top = (tl + tr) / 2
        tick = mid_top - np.array([0.0, 0.25 * (y.max() - y.min()), 0.0])
        local = np.stack([apex, tl, tr, br, bl, tl, gap, apex, tr, gap, apex, br, gap, apex, bl, gap,
                          mid_top, tick, gap])
        out.append(camera.transform_points(T, local))
    return np.concatenate(out)


def path_traces(view) -> tuple[list, str]:
    """The plotly traces of one sample's camera path (the truth and the aligned built path when a
    truth was given; the requested and the predicted cameras, with frusta, for a generated sample
    that has requested_cameras/<id>.json) and the plot's title. Plot axes: x, z (forward), -y (up)
    of the OpenCV world."""
    import plotly.graph_objects as go

    traces = []

    def trace(w2c: np.ndarray, name: str, colour: str, dash: str = "solid") -> None:
        c = camera.camera_centers(w2c)
        traces.append(go.Scatter3d(x=c[:, 0], y=c[:, 2], z=-c[:, 1], mode="lines+markers", name=name,
                                   text=[f"frame {i}" for i in range(len(c))],
                                   hovertemplate="%{text}<extra>" + name + "</extra>",
                                   line=dict(color=colour, width=4, dash=dash), marker=dict(size=2.5, color=colour)))
        traces.append(go.Scatter3d(x=c[:1, 0], y=c[:1, 2], z=-c[:1, 1], mode="markers", name=f"{name}: frame 0",
                                   marker=dict(size=6, color=colour, symbol="diamond"), showlegend=False))

    def frusta(w2c: np.ndarray, K: np.ndarray, name: str, colour: str, size: float) -> None:
        step = max(1, -(-len(w2c) // MAX_FRUSTA))
        w = frustum_lines(w2c[::step], K[::step], view.record.width, view.record.height, size)
        traces.append(go.Scatter3d(x=w[:, 0], y=w[:, 2], z=-w[:, 1], mode="lines", name=name,
                                   hoverinfo="skip", line=dict(color=colour, width=2)))

    if view.requested_w2c is not None and view.truth_w2c is None:
        both = np.concatenate([camera.camera_centers(view.requested_w2c), camera.camera_centers(view.w2c)])
        extent = float(np.max(np.ptp(both, axis=0)))
        size = 0.12 * extent if extent > 1e-9 else 0.1  # a static camera: a unit-ish frustum
        trace(view.requested_w2c, "requested", "#1f77b4", "dash")
        frusta(view.requested_w2c, view.requested_K, "requested frusta", "#1f77b4", size)
        trace(view.w2c, "predicted", "#d62728")
        frusta(view.w2c, view.K, "predicted frusta", "#d62728", size)
        return traces, "requested (blue, dashed) and predicted (red) cameras (world = camera of frame 0; z up = -y)"
    if view.truth_w2c is not None:
        trace(view.truth_w2c, "truth", "black")
        trace(view.aligned_w2c, "built (aligned to truth)", "#d62728", "dash")
        return traces, "camera path in the truth's world (built path aligned by compare's Sim(3))"
    trace(view.w2c, "camera", "#d62728")
    return traces, "camera path (world = camera of frame 0; z up = -y)"


def _div(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


#: the page machinery, for other pages in this style (`fwmodel report`)
html_table, plotly_div = _table, _div


def html_document(title: str, body: list[str]) -> str:
    """A whole self-contained page: CSS, plotly.js inlined in the head (works offline), `body` parts."""
    from plotly.offline import get_plotlyjs

    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def path_figure(view, div_id: str) -> str:
    """The interactive 3-D camera path of one sample (plotly; the truth beside it when given), as a div."""
    import plotly.graph_objects as go

    traces, title = path_traces(view)
    fig = go.Figure(traces)
    fig.update_layout(title=dict(text=title, font=dict(size=13)), **_LAYOUT)
    return _div(fig, div_id)


def paths_figure(paths: list[tuple[str, list, str]], div_id: str) -> str:
    """One 3-D plot of many samples' camera paths, (id, traces, title) each, with a menu choosing the
    sample shown (one WebGL context for the whole page)."""
    import plotly.graph_objects as go

    fig, owner = go.Figure(), []
    for n, (_, traces, _) in enumerate(paths):
        for t in traces:
            t.visible = n == 0
            fig.add_trace(t)
            owner.append(n)
    buttons = [dict(label=sid, method="update", args=[{"visible": [o == n for o in owner]},
                                                      {"title.text": f"{sid}: {title}"}])
               for n, (sid, _, title) in enumerate(paths)]
    fig.update_layout(title=dict(text=f"{paths[0][0]}: {paths[0][2]}", font=dict(size=13)),
                      updatemenus=[dict(buttons=buttons, direction="down", x=1, xanchor="right", y=1.08)], **_LAYOUT)
    return _div(fig, div_id)


def _validation_section(validation) -> str:
    import pandas as pd

    s = validation.summary
    verdict = '<span class="ok">passed</span>' if validation.passed else '<span class="bad">failed</span>'
    parts = [f"<p>validation {verdict} (gates {_e(validation.gates)}): {s.samples_checked} of "
             f"{plural(s.samples_total, 'sample')} checked, {s.samples_passed} passed; {plural(s.errors, 'error')}, "
             f"{plural(s.warnings, 'warning')}, {plural(s.infos, 'note')}; exit code {validation.exit_code}.</p>"]
    if validation.findings:
        rows = [{"severity": f.severity.value, "check": f.check, "sample": f.sample or "", "file": f.file or "",
                 "message": f.message} for f in validation.findings[:MAX_FINDINGS]]
        parts.append(_table(pd.DataFrame(rows), classes="findings"))
        if len(validation.findings) > MAX_FINDINGS:
            parts.append(f"<p class=small>{plural(len(validation.findings) - MAX_FINDINGS, 'more finding')}: run "
                         f"<code>fwdata validate</code>.</p>")
    else:
        parts.append("<p>no findings.</p>")
    return "\n".join(parts)


def _failures_section(meta: DatasetMetadata) -> str:
    import pandas as pd

    if not meta.failures:
        return "<p>no failed inputs.</p>"
    rows = []
    for f in meta.failures:
        run = meta.provenance.runs[f.run].created if f.run is not None and f.run < len(meta.provenance.runs) else ""
        rows.append({"source": f.source, "clip start": f.clip_start, "stage": f.stage, "reason": f.reason,
                     "run": run})
    return _table(pd.DataFrame(rows), classes="failures")


def _sample_block(view, png_rel: Optional[str], findings, cmp_row, div: Optional[str]) -> str:
    import pandas as pd

    rec: SampleRecord = view.record
    parts = [f'<h3 id="s-{_e(rec.id)}">{_e(rec.id)}</h3>',
             f"<p class=small>source {_e(rec.source.path)} from frame {rec.source.start_frame} (stride "
             f"{rec.source.stride}); {plural(rec.num_frames, 'frame')} {rec.height}x{rec.width} at {rec.fps:g} fps; scale "
             f"{_e(rec.scale)} ({_e(rec.scale_source)}); depth from {_e(rec.depth_source)}; {_e(rec.split)}, "
             f"{_e(rec.status)}</p>"]
    for p in view.problems:
        parts.append(f'<p class="bad">{_e(p)}</p>')
    if png_rel:
        parts.append(f'<a href="{_e(png_rel)}"><img class="sheet" src="{_e(png_rel)}" '
                     f'alt="contact sheet of {_e(rec.id)}"></a>')
    q = {k: v for k, v in rec.quality.model_dump().items() if v is not None and not isinstance(v, dict)}
    parts.append(_table(pd.DataFrame([q]), classes="quality") if q else "<p class=small>no quality metrics "
                 "recorded (a ground-truth dataset, or an older build).</p>")
    if cmp_row is not None:
        parts.append("<p>against the truth:</p>" + _table(pd.DataFrame([cmp_row]), classes="compare"))
    if findings:
        items = "".join(f'<li class="{_e(f.severity.value)}">{_e(f.severity.value)} {_e(f.check)}: '
                        f"{_e(f.message)}</li>" for f in findings[:50])
        parts.append(f"<ul>{items}</ul>")
    if view.w2c is not None and div is not None:
        parts.append(path_figure(view, div))
    elif view.w2c is not None:
        parts.append('<p class=small>3-D camera path: in <a href="#paths">the camera paths plot</a> (choose '
                     'this sample in its menu).</p>')
    return "\n".join(parts)


def build_page(dataset: Path, meta: DatasetMetadata, out: Path, validation, samples: Optional[list[str]] = None,
               truth: Optional[Path] = None, truth_meta: Optional[DatasetMetadata] = None, comparison=None,
               progress: Optional[Callable[[str], None]] = None) -> tuple[Path, list[Path]]:
    """Draw every sheet and write `out/index.html`; returns (index, sheets)."""
    from fwdata.compare import aligned_trajectory, match_truth
    from fwdata.dataset.store import atomic_write_text
    from fwdata.report.sheet import draw_sheet, load_view

    records = [r for r in meta.samples if samples is None or r.id in samples]
    cmp_df, unmatched = comparison if comparison is not None else (None, [])
    by_sample = {}
    if cmp_df is not None:
        cmp_df = cmp_df[cmp_df["sample"].isin([r.id for r in records])]
        by_sample = {row["sample"]: row for row in cmp_df.to_dict("records")}
    st = meta.statistics
    prov = meta.provenance
    head = [f"<h1>{_e(meta.name or dataset.name)}: dataset report</h1>",
            f"<p>{_e(dataset)}; schema {_e(meta.schema_version)}; made by {_e(prov.tool)} {_e(prov.tool_version)} "
            f"on {_e(prov.created)}: <code>{_e(prov.command)}</code></p>",
            f"<p>{plural(st.num_samples, 'sample')} ({st.num_ok} ok, {st.num_gated_out} gated out), "
            f"{plural(st.total_frames, 'frame')}, {st.duration_s:.1f} s of video; "
            f"{plural(st.num_failed_inputs, 'failed input')}; splits: "
            + ", ".join(f"{_e(k)}={len(v)}" for k, v in meta.splits.items()) + "</p>"]
    if samples is not None:
        head.append(f"<p class=small>showing {len(records)} of {plural(len(meta.samples), 'sample')} (--sample).</p>")
    models = [f"{m.role}: {m.name}" + (" (RANDOM INIT)" if m.random_init else "") for m in prov.models]
    if models:
        head.append(f"<p class=small>models: {_e('; '.join(models))}</p>")

    df = meta.to_frame()
    if len(df):
        df = df[df["id"].isin([r.id for r in records])]
        passed = {s.id: s.passed for s in validation.samples}
        df.insert(3, "validate", [("passed" if passed[i] else "failed") if i in passed else "-" for i in df["id"]])
        df = df.dropna(axis=1, how="all")
        df["id"] = [f'<a href="#s-{_e(i)}">{_e(i)}</a>' for i in df["id"]]
    body = head + ["<h2>Samples and quality metrics</h2>",
                   _table(df, escape=False, classes="samples") if len(df) else "<p>no samples.</p>",
                   "<h2>Build failures</h2>", _failures_section(meta),
                   "<h2>Validation (<code>fwdata validate</code>)</h2>", _validation_section(validation)]
    if cmp_df is not None:
        body += [f"<h2>Against the truth (<code>fwdata compare --truth {_e(truth)}</code>)</h2>", _table(cmp_df)]
        if unmatched:
            body.append(f"<p class=small>no truth sample for: {_e(', '.join(unmatched))}</p>")

    one_plot = len(records) > MAX_3D_PLOTS
    paths: list = []
    paths_at = len(body)  # the shared 3-D plot goes here when there are many samples
    body.append("<h2>Samples</h2>")
    sheets = []
    findings_of: dict[str, list] = {}
    for f in validation.findings:
        if f.sample:
            findings_of.setdefault(f.sample, []).append(f)
    for n, rec in enumerate(records):
        view = load_view(dataset, rec)
        if truth_meta is not None and view.w2c is not None:
            gt = match_truth(rec, truth_meta)
            if gt is not None:
                try:
                    view.aligned_w2c, view.truth_w2c, _ = aligned_trajectory(dataset, rec, Path(truth), gt)
                except (ValueError, OSError) as e:
                    view.problems.append(f"truth path not drawn: {e}")
        png = out / "samples" / f"{rec.id}.png"
        try:
            draw_sheet(view, png)
            sheets.append(png)
            rel = f"samples/{rec.id}.png"
        except Exception as e:  # a drawing failure of one sample must not lose the page
            view.problems.append(f"contact sheet not drawn: {type(e).__name__}: {e}")
            rel = None
        if one_plot and view.w2c is not None:
            paths.append((rec.id, *path_traces(view)))
        body.append(_sample_block(view, rel, findings_of.get(rec.id, []), by_sample.get(rec.id),
                                  None if one_plot else f"path-{n}"))
        if progress:
            progress(rec.id)
    if paths:
        body.insert(paths_at, '<h2 id="paths">Camera paths (3-D)</h2>\n' + paths_figure(paths, "paths-all"))
    page = html_document(f"{meta.name or dataset.name}: dataset report", body)
    index = out / "index.html"
    atomic_write_text(index, page)
    return index, sheets
