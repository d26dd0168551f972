"""Benchmark of `fwdata build` per clip against the straightforward recipe, on synthetic clips with known cameras.

Not run by the test suite. It prints a table (and writes results.json into --work):

- ours: one clip through the build (`fwdata.build.pipeline.process_clip`: decode, then depth in a background
  thread while the cameras are solved, then align, points, quality, write), as one worker runs it:
  frames in memory, keyframe mapping, batched depth;
- naive: what users do today: every frame dumped to PNG files, COLMAP feature extraction on the
  folder (defaults, one shared camera), exhaustive matching, incremental mapping of all frames,
  then Depth Anything run frame by frame (batch of 1). Its end-to-end time adds the build's own
  align/points/quality/write time, so both columns do the same total work.

Both run on the same rendered clips (orbit path, textured room) in fresh processes, so peak memory
(max RSS) is per worker. Times are wall seconds and CPU seconds (all threads; robust when other jobs
share the machine); the model load is excluded (a worker loads it once). Trajectory error is the ATE
after Sim(3) alignment, in % of the path's extent (for naive: over the frames its largest model
registered). The depth network is a randomly initialised Depth Anything V2 *Small* architecture
saved to a local folder (the same compute as the real model; no download), sized as transformers
sizes its input (--depth-input 518, the model's own). For the depth stage on a GPU see
bench_depth.py.

    .venv/bin/python tests/benchmarks/bench_build.py --work /tmp/fwdata-bench
    .venv/bin/python tests/benchmarks/bench_build.py --lengths 41 81 161 --naive-lengths 41 81 161
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def render(work: Path, T: int, H: int, W: int, seed: int, kind: str) -> Path:
    """A synthetic clip as an mp4 + its ground truth (npz), cached in `work`."""
    from fwdata.synth import render as synth
    from fwdata.dataset import camera
    from fwdata.dataset.video import write_mp4

    out = work / "clips" / f"{kind}_s{seed}_{T}_{H}x{W}.mp4"
    gt = out.with_suffix(".npz")
    if out.exists() and gt.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    clip = synth.make_clip(seed, kind, num_frames=T, height=H, width=W)
    write_mp4(out, clip.frames, fps=16)
    np.savez(gt, K=clip.K, w2c=camera.relative_to_first(clip.w2c))
    return out


def depth_model_dir(work: Path) -> Path:
    """A randomly initialised Depth Anything V2 Small (same architecture and compute as the real one)."""
    d = work / "depth-anything-v2-small-random"
    if not (d / "config.json").exists():
        import torch
        from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

        torch.manual_seed(0)
        DepthAnythingForDepthEstimation(DepthAnythingConfig()).save_pretrained(d)
    return d


def _metrics(est_w2c: np.ndarray, gt_w2c: np.ndarray, f_est: float, f_gt: float) -> dict:
    from fwdata.dataset import camera

    m = camera.trajectory_metrics(est_w2c, gt_w2c)
    return {"ate_pct": 100 * m["ate_rel"], "focal_err_pct": 100 * (f_est / f_gt - 1)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- one run (in its own process)


class _Clock:
    """Wall and CPU seconds (all threads of the process) of a block: `with clock("name"): ...`."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class _Block:
            def __enter__(self):
                self.t, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.wall[name] = clock.wall.get(name, 0.0) + time.perf_counter() - self.t
                clock.cpu[name] = clock.cpu.get(name, 0.0) + time.process_time() - self.c

        return _Block()


def run_ours(video: Path, T: int, H: int, W: int, model: Path, depth_input: int, out: Path) -> dict:
    """The build's own per-clip path (`process_clip`: depth in the background while COLMAP runs)."""
    import fwdata.build.pipeline as build
    from fwdata.build.clips import ClipOptions, plan_video
    from fwdata.build.depth import DepthOptions, get_estimator

    # one clip on every core, as the naive recipe runs (a build of many clips uses --workers instead)
    config = build._with_threads(build.BuildConfig(
        threads=os.cpu_count() or 1, clips=ClipOptions(num_frames=T, height=H, width=W, stride=1),
        depth=DepthOptions(model=str(model), input_size=depth_input, batch_size=8)))
    clock = _Clock()
    with clock("model_load"):
        get_estimator(config.depth)  # a worker loads its model once, before its first clip
    captured = {}
    run_sfm, align_depth = build.run_sfm, build.align_depth

    def capture_sfm(frames, opts):
        captured["sfm"] = run_sfm(frames, opts)
        return captured["sfm"]

    def timed_align(*a, **k):
        with clock("align"):  # the alignment itself, after waiting for depth
            return align_depth(*a, **k)

    build.run_sfm, build.align_depth = capture_sfm, timed_align
    steps = build.STEPS
    build.STEPS = [(name, _timed_step(clock, name, fn) if name in ("points", "quality", "write") else fn)
                   for name, fn in steps]
    plan = plan_video(video, config.clips).clips[0]
    with clock("total"):
        outcome = build.process_clip(plan, config, out)
    if not outcome.ok:
        raise RuntimeError(f"{outcome.stage}: {outcome.reason}")
    sfm = captured["sfm"]
    gt = np.load(video.with_suffix(".npz"))
    downstream = ("align", "points", "quality", "write")
    res = {"times": outcome.timings, "total": clock.wall["total"], "cpu_total": clock.cpu["total"],
           "model_load": clock.wall["model_load"], "registered": T, "sfm_detail": sfm.timings,
           "keyframes": len(sfm.keyframes), "downstream_wall": sum(clock.wall[k] for k in downstream),
           "downstream_cpu": sum(clock.cpu[k] for k in downstream)}
    res.update(_metrics(sfm.w2c, gt["w2c"], sfm.K[0, 0], gt["K"][0, 0]))
    return res


def _timed_step(clock: _Clock, name: str, fn):
    def step(job):
        with clock(name):
            fn(job)
    return step


def run_naive(video: Path, T: int, model: Path, depth_input: int) -> dict:
    import pycolmap
    from PIL import Image

    from fwdata.build.depth import DepthOptions, get_estimator
    from fwdata.dataset.video import read_frames

    pycolmap.logging.minloglevel = 2
    clock = _Clock()
    with clock("model_load"):
        est = get_estimator(DepthOptions(model=str(model), input_size=depth_input, batch_size=1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        with clock("dump_frames"):
            for i, f in enumerate(read_frames(video)):
                Image.fromarray(f).save(images / f"{i:06d}.png")
        db = tmp / "db.db"
        with clock("features"):
            pycolmap.extract_features(db, images, camera_mode=pycolmap.CameraMode.SINGLE)
        with clock("matching"):
            pycolmap.match_exhaustive(db)
        (tmp / "sparse").mkdir()
        with clock("mapping"):
            recs = pycolmap.incremental_mapping(db, images, tmp / "sparse")
        with clock("depth"):
            for p in sorted(images.glob("*.png")):  # one frame at a time, read back from disk
                est.predict(np.asarray(Image.open(p).convert("RGB"))[None])
    gt = np.load(video.with_suffix(".npz"))
    stages = ("dump_frames", "features", "matching", "mapping", "depth")
    res = {"times": {k: clock.wall[k] for k in stages}, "cpu": {k: clock.cpu[k] for k in stages},
           "total": sum(clock.wall[k] for k in stages), "cpu_total": sum(clock.cpu[k] for k in stages),
           "models": len(recs)}
    if recs:
        from bench_realistic import largest_model_cameras  # tests/benchmarks is the script's folder

        idx, w2c, cam = largest_model_cameras(recs)
        res["registered"] = len(idx)
        if len(idx) >= 3:
            res.update(_metrics(w2c, gt["w2c"][idx], cam.params[0], gt["K"][0, 0]))
    else:
        res["registered"] = 0
    return res


# --------------------------------------------------------------------------- driver


def one(args) -> None:
    video = Path(args.video)
    if args.one == "ours":
        with tempfile.TemporaryDirectory() as out:
            res = run_ours(video, args.T, args.H, args.W, Path(args.model), args.depth_input, Path(out))
    else:
        res = run_naive(video, args.T, Path(args.model), args.depth_input)
    res["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(res))


def _child(method: str, video: Path, T: int, H: int, W: int, model: Path, depth_input: int) -> dict:
    cmd = [sys.executable, __file__, "--one", method, "--video", str(video), "--T", str(T), "--H", str(H),
           "--W", str(W), "--model", str(model), "--depth-input", str(depth_input)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{method} T={T} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    res = json.loads(line[7:])
    res["wall"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fwdata-bench-build"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[41, 81, 161], help="clip lengths (4k+1) for ours")
    ap.add_argument("--naive-lengths", type=int, nargs="+", default=[41, 81], help="clip lengths for the naive recipe")
    ap.add_argument("--size", default="192x336", help="HxW of the clips")
    ap.add_argument("--depth-input", type=int, default=518, help="depth model input size (518: the model's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", default="orbit")
    ap.add_argument("--one", choices=["ours", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--video", help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--H", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--W", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    H, W = (int(x) for x in args.size.split("x"))
    model = depth_model_dir(work)
    rows = []
    for T in sorted(set(args.lengths) | set(args.naive_lengths)):
        video = render(work, T, H, W, args.seed, args.kind)
        row = {"T": T}
        if T in args.lengths:
            row["ours"] = _child("ours", video, T, H, W, model, args.depth_input)
        if T in args.naive_lengths:
            row["naive"] = _child("naive", video, T, H, W, model, args.depth_input)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps({"size": args.size, "depth_input": args.depth_input,
                                                   "cpus": os.cpu_count(), "rows": rows}, indent=1))
    print_table(rows, args)


def print_table(rows, args) -> None:
    print(f"\nclips {args.size}, {args.kind} path, depth input {args.depth_input}px, {os.cpu_count()} CPUs. "
          f"naive end-to-end adds the build's own align/points/quality/write time.")
    print(f"{'T':>4} {'method':>6} {'wall s':>7} {'CPU s':>7} {'CPU s/frame':>11} {'sfm s':>7} {'depth s':>8} "
          f"{'reg':>7} {'ATE %':>7} {'focal %':>8} {'peak MB':>8}")
    for row in rows:
        T = row["T"]
        ours = row.get("ours")
        for method in ("ours", "naive"):
            r = row.get(method)
            if r is None:
                continue
            t = r["times"]
            if method == "ours":  # depth ran in the background, overlapping sfm
                wall, cpu, sfm, depth = r["total"], r["cpu_total"], t["sfm"], t["depth"]
            else:
                wall = r["total"] + (ours["downstream_wall"] if ours else 0.0)
                cpu = r["cpu_total"] + (ours["downstream_cpu"] if ours else 0.0)
                sfm = t["dump_frames"] + t["features"] + t["matching"] + t["mapping"]
                depth = t["depth"]
            print(f"{T:>4} {method:>6} {wall:>7.1f} {cpu:>7.1f} {cpu / T:>11.2f} {sfm:>7.1f} {depth:>8.1f} "
                  f"{r.get('registered', 0):>3}/{T:<3} {r.get('ate_pct', float('nan')):>7.3f} "
                  f"{r.get('focal_err_pct', float('nan')):>8.2f} {r['peak_rss_mb']:>8.0f}")
        if ours and "naive" in row:
            n = row["naive"]
            cpu_x = (n["cpu_total"] + ours["downstream_cpu"]) / ours["cpu_total"]
            wall_x = (n["total"] + ours["downstream_wall"]) / ours["total"]
            print(f"{'':>4} {'':>6} speed-up: {cpu_x:.1f}x CPU time, {wall_x:.1f}x wall time")


if __name__ == "__main__":
    main()
