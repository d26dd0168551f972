"""`fwmodel report RUN_DIR`: a training run as pictures. One self-contained HTML page and a PNG per plot.

A run folder (what `fwmodel train` writes: config.toml, train.log, metrics.jsonl, tb/,
step-N.safetensors + step-N.json sidecars, state/) is read, never written to, except for the
default `--out RUN_DIR/report`:

```
out/index.html            the run's facts (stage, steps, preset, data fingerprint, ...), its checkpoints,
                          one interactive plot per group of scalars of metrics.jsonl (losses, loss terms,
                          learning rate, gradient norms, performance, training), the eval table and one
                          metric-versus-step plot per metric (with --eval), config.toml, the end of train.log
out/plots/<group>.png     the same plots drawn by matplotlib (x: optimizer step)
out/plots/eval-<m>.png    metric m of `fwmodel eval` against the step, one line per stage
```

The page reuses the dataset report's machinery (`fwdata.report.page`: CSS, tables, plotly.js inlined
once, so the page works offline). Same run, same bytes. The run helpers here (`load_run`,
`pick_checkpoint`, `load_eval`) are shared with `fwmodel package` and `fwmodel publish`.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["RunError", "Run", "RunCheckpoint", "EvalFile", "load_run", "pick_checkpoint", "load_eval",
           "metric_groups", "scalar_series", "write_run_report"]

CONFIG_FILE, LOG_FILE, METRICS_FILE, TB_DIR, STATE_DIR = "config.toml", "train.log", "metrics.jsonl", "tb", "state"
EVAL_FILE = "eval.json"
_CHECKPOINT = re.compile(r"^step-(\d+)\.safetensors$")

#: groups of metrics.jsonl keys, one plot each, in page order: (title, file stem, key test)
GROUPS = (
    ("losses", "losses", lambda k: k.startswith("loss/") and k.count("/") == 1),
    ("loss terms", "loss-terms", lambda k: k.startswith("loss/") and k.count("/") > 1),
    ("learning rate", "lr", lambda k: k == "lr" or k.startswith("lr/")),
    ("gradient norms", "grad-norms", lambda k: k.startswith("grad_norm/")),
    ("performance", "perf", lambda k: k.startswith(("perf/", "mem/"))),
    ("training", "training", lambda k: k.startswith("train/")),
)
#: lines of train.log shown at the end of the page
LOG_TAIL = 40


class RunError(ValueError):
    """Bad input (not a run folder, unknown checkpoint, unreadable eval.json, --out a file): exit 2."""


@dataclass
class RunCheckpoint:
    """One step-N.safetensors of a run: its step (from the name), its sidecar (None when missing)."""

    path: Path
    step: int
    sidecar: Optional[dict]

    @property
    def sidecar_path(self) -> Path:
        return self.path.with_suffix(".json")


@dataclass
class Run:
    root: Path
    config: dict  # config.toml parsed ({} when missing)
    config_text: str
    metrics: list[dict]  # metrics.jsonl, one dict per logged step, in file order
    checkpoints: list[RunCheckpoint]  # by step
    problems: list[str] = field(default_factory=list)  # what could not be read (shown in the page)

    @property
    def last(self) -> Optional[RunCheckpoint]:
        return self.checkpoints[-1] if self.checkpoints else None

    def facts(self, checkpoint: Optional[RunCheckpoint] = None) -> dict:
        """The run's key facts (from `checkpoint`'s sidecar, default the last, and config.toml)."""
        ck = checkpoint or self.last
        side = (ck.sidecar or {}) if ck else {}
        extra = side.get("extra") or {}
        cfg = self.config
        train, model, data = cfg.get("train", {}), cfg.get("model", {}), cfg.get("data", {})
        logged = [m["step"] for m in self.metrics if isinstance(m.get("step"), int)]
        total = scalar_series(self.metrics, "loss/total")[1]
        return {
            "run": self.root.name,
            "stage": side.get("stage", train.get("stage")),
            "steps trained": ck.step if ck else (max(logged) if logged else None),
            "steps configured": train.get("num_steps"),
            "steps logged": len(logged),
            "preset": side.get("preset", model.get("preset")),
            "model fingerprint": side.get("fingerprint"),
            "trainable parameters": side.get("num_params"),
            "data fingerprint": extra.get("data_fingerprint"),
            "data root": data.get("root"),
            "split": data.get("split"),
            "clip (frames x H x W)": (f"{data['num_frames']}x{data['height']}x{data['width']}"
                                      if all(k in data for k in ("num_frames", "height", "width")) else None),
            "batch per GPU x grad accum": (f"{train['batch_size']} x {train['grad_accum']}"
                                           if "batch_size" in train and "grad_accum" in train else None),
            "learning rate": cfg.get("optim", {}).get("lr"),
            "Wan weights": model.get("wan_weights"),
            "init from (Stage 1)": model.get("init_from"),
            "config hash": extra.get("config_hash"),
            "tool version": extra.get("tool_version"),
            "checkpoint": ck.path.name if ck else None,
            "final loss/total": total[-1] if total else None,
        }


def list_checkpoints(root: Path) -> list[Path]:
    """The step-N.safetensors of a run folder, by N."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def load_run(run_dir: Path) -> Run:
    """Read a run folder; RunError when it is none (no config.toml, no metrics.jsonl, no checkpoint)."""
    from fwmodel.checkpoint import CheckpointError, read_sidecar

    root = Path(run_dir)
    if not root.is_dir():
        raise RunError(f"run folder {root} is not a folder")
    problems: list[str] = []
    config_text, config = "", {}
    if (root / CONFIG_FILE).is_file():
        config_text = (root / CONFIG_FILE).read_text()
        try:
            config = tomllib.loads(config_text)
        except tomllib.TOMLDecodeError as e:
            problems.append(f"{CONFIG_FILE} is not valid TOML ({e})")
    metrics = []
    if (root / METRICS_FILE).is_file():
        for n, line in enumerate((root / METRICS_FILE).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                problems.append(f"{METRICS_FILE} line {n} is not a JSON object with a step (skipped; a killed run?)")
                continue
            metrics.append(row)
    checkpoints = []
    for p in list_checkpoints(root):
        try:
            sidecar = read_sidecar(p)
        except CheckpointError as e:
            sidecar = None
            problems.append(str(e))
        checkpoints.append(RunCheckpoint(p, int(_CHECKPOINT.match(p.name).group(1)), sidecar))
    if not config_text and not metrics and not checkpoints:
        raise RunError(f"{root} is not a training run folder (no {CONFIG_FILE}, {METRICS_FILE} or "
                       "step-N.safetensors); give the --output folder of `fwmodel train`")
    return Run(root, config, config_text, metrics, checkpoints, problems)


def pick_checkpoint(run: Run, name: Optional[str | Path] = None) -> RunCheckpoint:
    """The checkpoint `name` (a file name or path of the run, e.g. step-1000.safetensors; default: the
    last one). RunError when the run has none or not that one."""
    if not run.checkpoints:
        raise RunError(f"{run.root} holds no checkpoint (step-N.safetensors) yet")
    if name is None:
        return run.last
    want = Path(name).name
    for ck in run.checkpoints:
        if ck.path.name == want:
            return ck
    names = ", ".join(ck.path.name for ck in run.checkpoints)
    raise RunError(f"--checkpoint {name}: not a checkpoint of {run.root} (it has: {names})")


def scalar_series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar over the logged steps that hold a finite number for it."""
    steps, values = [], []
    for m in metrics:
        v = m.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(m["step"])
            values.append(float(v))
    return steps, values


def metric_groups(metrics: list[dict]) -> list[tuple[str, str, list[str]]]:
    """(title, file stem, keys) of the groups present in `metrics` (GROUPS, then "other"), keys in first-seen order."""
    keys: list[str] = []
    for m in metrics:
        keys += [k for k, v in m.items() if k != "step" and k not in keys and isinstance(v, (int, float))]
    groups, taken = [], set()
    for title, stem, test in GROUPS:
        ks = [k for k in keys if test(k)]
        taken |= set(ks)
        if ks:
            groups.append((title, stem, ks))
    rest = [k for k in keys if k not in taken]
    if rest:
        groups.append(("other", "other", rest))
    return groups


# --------------------------------------------------------------------------- eval.json of `fwmodel eval`


class EvalRow(BaseModel):
    """One checkpoint's scores: which checkpoint, its stage and step, then one number per metric."""

    model_config = ConfigDict(extra="allow")
    checkpoint: str
    stage: int
    step: int


class EvalFile(BaseModel):
    """eval.json of `fwmodel eval`: {"rows": [{checkpoint, stage, step, <metric>: float, ...}], "metrics": [names]}."""

    model_config = ConfigDict(extra="allow")
    rows: list[EvalRow]
    metrics: list[str]

    def value(self, row: EvalRow, metric: str) -> Optional[float]:
        v = (row.model_extra or {}).get(metric)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    def table(self):
        """A pandas DataFrame: checkpoint (run folder/file name), stage, step, one column per metric; by (stage, step)."""
        import pandas as pd

        rows = [{"checkpoint": "/".join(Path(r.checkpoint).parts[-2:]), "stage": r.stage, "step": r.step,
                 **{m: self.value(r, m) for m in self.metrics}} for r in self.rows]
        df = pd.DataFrame(rows, columns=["checkpoint", "stage", "step", *self.metrics])
        return df.sort_values(["stage", "step"], kind="stable").reset_index(drop=True)


def load_eval(path: Path) -> EvalFile:
    """EVAL_DIR/eval.json (or the file itself); RunError when missing or not in eval.json's format."""
    path = Path(path)
    file = path / EVAL_FILE if path.is_dir() else path
    if not file.is_file():
        raise RunError(f"--eval {path}: no {EVAL_FILE} there; give the --out folder of `fwmodel eval --format json`")
    try:
        return EvalFile.model_validate_json(file.read_bytes())
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise RunError(f"--eval {file} is not an eval.json of `fwmodel eval` ({where}: {err['msg']})") from None


# --------------------------------------------------------------------------- drawing


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "metric"


def _plot_png(png: Path, title: str, lines: list[tuple[str, list, list]], xlabel: str, ylabel: str = "") -> None:
    """One matplotlib line plot (lines: (name, x, y)) to `png`, deterministic bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    for name, x, y in lines:
        ax.plot(x, y, "-o" if len(x) <= 50 else "-", ms=3, lw=1.4, label=name)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if 1 < len(lines) <= 20:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _plotly_lines(title: str, lines: list[tuple[str, list, list]], xlabel: str, div_id: str, mode: str = "lines") -> str:
    import plotly.graph_objects as go

    from fwdata.report.page import plotly_div

    fig = go.Figure([go.Scatter(x=x, y=y, name=name, mode=mode if len(x) > 1 else "markers") for name, x, y in lines])
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=380, margin=dict(l=50, r=10, t=40, b=40),
                      xaxis_title=xlabel, hovermode="x unified", template="plotly_white")
    values = {v for _, _, y in lines for v in y}
    if len(values) == 1 and (v := values.pop()) != 0:  # a constant (e.g. the learning rate): show it, not +-1
        fig.update_yaxes(range=sorted([0.0, 2 * v]), exponentformat="e")
    return plotly_div(fig, div_id)


@dataclass
class RunReportResult:
    index: Path
    pngs: list[Path]


def write_run_report(run_dir: Path, out: Optional[Path] = None, eval_dir: Optional[Path] = None) -> RunReportResult:
    """Write the report of the run in `run_dir` to `out` (default RUN_DIR/report; see the module docstring).

    Raises RunError for bad input.
    """
    import html

    import pandas as pd

    from fwdata.dataset.store import atomic_write_text
    from fwdata.report.page import html_document, html_table
    from fwmodel.checkpoint import CheckpointError, verify_checkpoint_file

    run = load_run(Path(run_dir))
    evals = load_eval(eval_dir) if eval_dir is not None else None
    out = Path(out) if out is not None else run.root / "report"
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; give a folder for the report")
    try:
        (out / "plots").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    e = lambda x: html.escape(str(x))  # noqa: E731

    facts = run.facts()
    body = [f"<h1>{e(run.root.name)}: training run report</h1>",
            f"<p>{e(run.root.resolve())}: Stage {e(facts['stage'])}, {e(facts['steps trained'])} steps of "
            f"{e(facts['steps configured'])}, preset {e(facts['preset'])}, data fingerprint "
            f"<code>{e(facts['data fingerprint'])}</code></p>"]
    for p in run.problems:
        body.append(f'<p class="bad">{e(p)}</p>')
    body += ["<h2>The run</h2>",
             html_table(pd.DataFrame([{"fact": k, "value": "-" if v is None else v} for k, v in facts.items()]),
                        classes="facts")]

    body.append("<h2>Checkpoints</h2>")
    if run.checkpoints:
        rows = []
        for ck in run.checkpoints:
            try:  # size and header against the sidecar (the sha256 is `fwmodel package --verify`'s job)
                verify_checkpoint_file(ck.path, verify_hash=False)
                check = "ok"
            except CheckpointError as err:
                check = str(err)
            s = ck.sidecar or {}
            rows.append({"checkpoint": ck.path.name, "step": ck.step, "stage": s.get("stage"),
                         "MB": round(ck.path.stat().st_size / 1e6, 3), "sha256": (s.get("sha256") or "")[:16],
                         "created": s.get("created"), "check (size, header)": check})
        body.append(html_table(pd.DataFrame(rows), classes="checkpoints"))
    else:
        body.append("<p>no checkpoint yet.</p>")

    pngs: list[Path] = []
    body.append(f"<h2>Training scalars (<code>{METRICS_FILE}</code>)</h2>")
    groups = metric_groups(run.metrics)
    if not groups:
        body.append(f"<p>no scalars logged ({METRICS_FILE} is missing or empty).</p>")
    for n, (title, stem, keys) in enumerate(groups):
        lines = [(k, *scalar_series(run.metrics, k)) for k in keys]
        png = out / "plots" / f"{stem}.png"
        _plot_png(png, title, lines, "step")
        pngs.append(png)
        body += [f'<h3 id="g-{stem}">{e(title)}</h3>', _plotly_lines(title, lines, "step", f"scalars-{stem}"),
                 f'<p class=small><a href="plots/{stem}.png">PNG</a></p>']

    if evals is not None:
        body.append("<h2>Evaluation (<code>fwmodel eval</code>)</h2>")
        body.append(html_table(evals.table(), classes="eval"))
        for n, metric in enumerate(evals.metrics):
            lines = []
            for stage in sorted({r.stage for r in evals.rows}):
                pts = sorted((r.step, v) for r in evals.rows if r.stage == stage
                             and (v := evals.value(r, metric)) is not None)
                if pts:
                    lines.append((f"stage {stage}", [p[0] for p in pts], [p[1] for p in pts]))
            if not lines:
                continue
            png = out / "plots" / f"eval-{_slug(metric)}.png"
            _plot_png(png, f"{metric} against the step", lines, "step", metric)
            pngs.append(png)
            body += [f"<h3>{e(metric)}</h3>",
                     _plotly_lines(f"{metric} against the step", lines, "step", f"eval-{n}", mode="lines+markers"),
                     f'<p class=small><a href="plots/eval-{_slug(metric)}.png">PNG</a></p>']

    body += [f"<h2>Configuration (<code>{CONFIG_FILE}</code>)</h2>",
             f"<pre>{e(run.config_text) if run.config_text else 'no ' + CONFIG_FILE}</pre>"]
    log = run.root / LOG_FILE
    if log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        body += [f"<h2>The end of <code>{LOG_FILE}</code></h2>",
                 f'<pre class=small style="white-space: pre-wrap">{e(chr(10).join(tail))}</pre>']
    index = out / "index.html"
    atomic_write_text(index, html_document(f"{run.root.name}: training run report", body))
    return RunReportResult(index, pngs)
