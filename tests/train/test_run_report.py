"""`fwmodel report RUN_DIR`: a real tiny Stage-2 run as a page and PNGs.

The plotted curves are read back from the page (the data of each plotly figure, and what plotly drew in
headless Chromium) and compared with metrics.jsonl value for value; the eval table and the
metric-versus-step plots come from an eval.json written by `fwmodel eval`'s own writer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fwmodel.cli import app
from headless_browser import CHROMIUM, PLOTLY_TRACES, load_page

runner = CliRunner()

#: eval rows of the run: (run folder, checkpoint, stage, step, depth_absrel, rra@5); one score missing (NaN)
EVAL = [("stage1", "step-2.safetensors", 1, 2, 0.61, 0.25), ("run", "step-2.safetensors", 2, 2, 0.48, float("nan")),
        ("run", "step-4.safetensors", 2, 4, 0.37, 0.5)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, dataset, stage1_checkpoint, make_config) -> Path:
    """A Stage-2 run of the tiny recipe from the Stage-1 fixture: 4 steps, a checkpoint every 2."""
    from fwmodel.train import train

    out = tmp_path_factory.mktemp("runs") / "fantasy_world_stage2"
    torch.set_num_threads(1)
    train(make_config(2, dataset, out, train__num_steps=4, train__checkpoint_every=2,
                      model__init_from=str(stage1_checkpoint)), quiet=True)
    return out


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, run_dir, stage1_checkpoint, dataset) -> Path:
    from fwmodel.evaluate import EvalResult

    folders = {"stage1": stage1_checkpoint.parent, "run": run_dir}
    rows = [{"checkpoint": str(folders[f] / name), "stage": stage, "step": step, "depth_absrel": a, "rra@5": r}
            for f, name, stage, step, a, r in EVAL]
    out = tmp_path_factory.mktemp("eval")
    result = EvalResult(rows=rows, data=str(dataset), split="train", num_samples=2, metrics=("depth_absrel", "rra@5"))
    (out / "eval.json").write_text(result.to_json())
    return out


@pytest.fixture(scope="module")
def report(run_dir, eval_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "r"
    r = runner.invoke(app, ["report", str(run_dir), "--out", str(out), "--eval", str(eval_dir)])
    assert r.exit_code == 0, r.output
    assert f"wrote {out / 'index.html'}" in r.output
    return out


def figure(page: str, div_id: str) -> list[dict]:
    """The traces of the plotly figure `div_id` as embedded in the page (its Plotly.newPlot data)."""
    m = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', page)
    assert m, div_id
    data, _ = json.JSONDecoder().raw_decode(page, m.end())
    return data


def test_loss_curves_are_the_values_of_metrics_jsonl(report, run_dir, metrics_of):
    metrics = metrics_of(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    page = (report / "index.html").read_text()
    checked = 0
    for div, keys in (("scalars-losses", ["loss/total", "loss/diffusion", "loss/depth_loss", "loss/camera_loss"]),
                      ("scalars-loss-terms", ["loss/depth/reg", "loss/point/conf", "loss/camera/R"]),
                      ("scalars-lr", ["lr"]), ("scalars-grad-norms", ["grad_norm/total"]),
                      ("scalars-perf", ["perf/step_time_s"])):
        traces = {t["name"]: t for t in figure(page, div)}
        for key in keys:
            assert traces[key]["x"] == [m["step"] for m in metrics], key
            assert traces[key]["y"] == [m[key] for m in metrics], key  # exactly: the JSON numbers round-trip
            checked += 1
    assert checked == 10
    # every scalar of metrics.jsonl is in exactly one plot
    keys = {k for m in metrics for k in m if k != "step"}
    plotted = [t["name"] for div in re.findall(r'Plotly\.newPlot\(\s*"(scalars-[^"]+)"', page)
               for t in figure(page, div)]
    assert sorted(plotted) == sorted(keys)


def test_pngs_are_not_blank_and_the_same_bytes_twice(report, run_dir, eval_dir, tmp_path):
    pngs = sorted((report / "plots").glob("*.png"))
    names = [p.name for p in pngs]
    assert names == sorted(["losses.png", "loss-terms.png", "lr.png", "grad-norms.png", "perf.png", "training.png",
                            "eval-depth_absrel.png", "eval-rra-5.png"])
    for p in pngs:
        img = np.asarray(Image.open(p).convert("RGB")).astype(np.float64)
        assert img.std() > 15, p.name  # lines, axes and labels, not a white (or one-colour) picture
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20, p.name
    again = tmp_path / "again"
    r = runner.invoke(app, ["report", str(run_dir), "--out", str(again), "--eval", str(eval_dir)])
    assert r.exit_code == 0, r.output
    for p in [report / "index.html", *pngs]:
        rel = p.relative_to(report)
        assert (again / rel).read_bytes() == p.read_bytes(), rel


def test_facts_and_checkpoints_come_from_the_sidecars(report, run_dir):
    page = (report / "index.html").read_text()
    side = json.loads((run_dir / "step-4.json").read_text())
    facts = dict(re.findall(r"<tr>\s*<td>([^<]+)</td>\s*<td>([^<]*)</td>\s*</tr>", page))
    assert facts["stage"] == "2" and facts["steps trained"] == "4" and facts["preset"] == "tiny"
    assert facts["data fingerprint"] == side["extra"]["data_fingerprint"]
    assert facts["model fingerprint"] == side["fingerprint"]
    assert facts["trainable parameters"] == str(side["num_params"])
    assert facts["checkpoint"] == "step-4.safetensors"
    for name in ("step-2.safetensors", "step-4.safetensors"):
        sha = json.loads((run_dir / name.replace(".safetensors", ".json")).read_text())["sha256"]
        assert f"<td>{name}</td>" in page and sha[:16] in page
    assert "[optim]" in page and "lr = 0.001" in page  # config.toml
    assert "finished Stage 2" in page  # the end of train.log


def test_eval_table_and_metric_versus_step_plots(report, stage1_checkpoint):
    page = (report / "index.html").read_text()
    tables = re.findall(r'<table[^>]*class="[^"]*eval[^"]*".*?</table>', page, flags=re.S)
    assert len(tables) == 1
    rows = re.findall(r"<tr>\s*<td>(.*?)</td>\s*<td>(\d+)</td>\s*<td>(\d+)</td>\s*<td>(.*?)</td>\s*<td>(.*?)</td>",
                      tables[0], flags=re.S)
    assert [(r[0], int(r[1]), int(r[2])) for r in rows] == [(f"{stage1_checkpoint.parent.name}/step-2.safetensors", 1, 2),
                                                           ("fantasy_world_stage2/step-2.safetensors", 2, 2),
                                                           ("fantasy_world_stage2/step-4.safetensors", 2, 4)]
    assert [r[3] for r in rows] == ["0.61", "0.48", "0.37"] and [r[4] for r in rows] == ["0.25", "-", "0.5"]
    absrel = {t["name"]: t for t in figure(page, "eval-0")}
    assert absrel["stage 1"]["x"] == [2] and absrel["stage 1"]["y"] == [0.61]
    assert absrel["stage 2"]["x"] == [2, 4] and absrel["stage 2"]["y"] == [0.48, 0.37]
    rra = {t["name"]: t for t in figure(page, "eval-1")}
    assert rra["stage 2"]["x"] == [4] and rra["stage 2"]["y"] == [0.5]  # the missing score is left out, not 0


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH")
def test_page_opens_in_chromium_without_errors(report, run_dir, metrics_of, tmp_path):
    errors, img, figures = load_page(report / "index.html", tmp_path / "profile", expression=PLOTLY_TRACES)
    assert errors == [], errors
    grey = img.astype(np.float64).mean(axis=2)
    assert grey.std() > 20  # tables and plots, not a white page
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 30  # coloured curves drawn
    assert len(figures) == 6 + 2  # six scalar groups, two eval metrics
    drawn = {t["name"]: t for t in figures[0]}  # what plotly drew of the losses, decoded by the browser
    metrics = metrics_of(run_dir)
    assert drawn["loss/total"]["x"] == [m["step"] for m in metrics]
    assert drawn["loss/total"]["y"] == [m["loss/total"] for m in metrics]


def test_default_out_and_bad_input(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("state", "tb"))
    with (copy / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss/to')  # a run killed while writing its last line
    r = runner.invoke(app, ["report", str(copy)])
    assert r.exit_code == 0, r.output
    page = (copy / "report" / "index.html").read_text()
    assert "metrics.jsonl line 5 is not a JSON object" in page
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "noeval").mkdir()
    (tmp_path / "badeval").mkdir()
    (tmp_path / "badeval" / "eval.json").write_text(json.dumps({"rows": [{"checkpoint": "a", "step": 1}],
                                                                "metrics": []}))
    cases = [([str(tmp_path / "missing")], "is not a folder"),
             ([str(tmp_path / "empty")], "not a training run folder"),
             ([str(copy), "--out", str(tmp_path / "file")], "is a file"),
             ([str(copy), "--eval", str(tmp_path / "noeval")], "no eval.json"),
             ([str(copy), "--eval", str(tmp_path / "badeval")], "rows.0.stage")]
    for args, words in cases:
        r = runner.invoke(app, ["report", *args, "--out", str(tmp_path / "o")] if "--out" not in args
                          else ["report", *args])
        assert r.exit_code == 2, (args, r.output)
        lines = [x for x in r.output.strip().splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (args, r.output)
