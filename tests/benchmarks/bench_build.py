"""Benchmark of `fwdata build` per clip against the straightforward recipe, on synthetic clips with known cameras.

Not run by the test suite. It prints a table (and writes results.json into --work):

- ours: one clip through the build (`fwdata.build.process_clip`: decode, then depth in a background
  thread while the cameras are solved, then align, points, quality, write), as one worker runs it:
  frames in memory, keyframe mapping, batched depth;
- naive: what users do today: every frame dumped to PNG files, COLMAP feature extraction on the
  folder (defaults, one shared camera), exhaustive matching, incremental mapping of all frames,
  then Depth Anything run frame by frame (batch of 1). Its end-to-end time adds the build's own
  align/points/quality/write time, so both columns do the same total work.

Both run on the same rendered clips (orbit path, textured room) in fresh processes, so peak memory
(max RSS) is per worker. Trajectory error is the ATE after Sim(3) alignment, in % of the path's
extent (for naive: over the frames its largest model registered). The depth network is a randomly
initialised Depth Anything V2 *Small* architecture saved to a local folder (the same compute as the
real model; no download), at --depth-input pixels (518 is the model's native size).

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
    from fwdata import camera, synth
    from fwdata.video import write_mp4

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
    from fwdata import camera

    m = camera.trajectory_metrics(est_w2c, gt_w2c)
    return {"ate_pct": 100 * m["ate_rel"], "focal_err_pct": 100 * (f_est / f_gt - 1)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- one run (in its own process)


def run_ours(video: Path, T: int, H: int, W: int, model: Path, depth_input: int, out: Path) -> dict:
    """The build's own per-clip path (`process_clip`: depth in the background while COLMAP runs)."""
    import fwdata.build as build
    from fwdata.clips import ClipOptions, plan_video
    from fwdata.depth import DepthOptions, get_estimator

    config = build._with_threads(build.BuildConfig(
        clips=ClipOptions(num_frames=T, height=H, width=W, stride=1),
        depth=DepthOptions(model=str(model), input_size=depth_input, batch_size=8)))
    t0 = time.perf_counter()
    get_estimator(config.depth)  # a worker loads its model once, before its first clip
    load = time.perf_counter() - t0
    captured = {}
    run_sfm = build.run_sfm

    def capture(frames, opts):
        captured["sfm"] = run_sfm(frames, opts)
        return captured["sfm"]

    build.run_sfm = capture
    plan = plan_video(video, config.clips).clips[0]
    outcome = build.process_clip(plan, config, out)
    if not outcome.ok:
        raise RuntimeError(f"{outcome.stage}: {outcome.reason}")
    sfm = captured["sfm"]
    gt = np.load(video.with_suffix(".npz"))
    res = {"times": outcome.timings, "total": outcome.seconds, "model_load": load, "registered": T,
           "sfm_detail": sfm.timings, "keyframes": len(sfm.keyframes)}
    res.update(_metrics(sfm.w2c, gt["w2c"], sfm.K[0, 0], gt["K"][0, 0]))
    return res


def run_naive(video: Path, T: int, model: Path, depth_input: int) -> dict:
    import pycolmap
    from PIL import Image

    from fwdata.depth import DepthOptions, get_estimator
    from fwdata.video import read_frames

    pycolmap.logging.minloglevel = 2
    est = get_estimator(DepthOptions(model=str(model), input_size=depth_input, batch_size=1))
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        t0 = time.perf_counter()
        for i, f in enumerate(read_frames(video)):
            Image.fromarray(f).save(images / f"{i:06d}.png")
        times["dump_frames"] = time.perf_counter() - t0
        db = tmp / "db.db"
        t0 = time.perf_counter()
        pycolmap.extract_features(db, images, camera_mode=pycolmap.CameraMode.SINGLE)
        times["features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pycolmap.match_exhaustive(db)
        times["matching"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        (tmp / "sparse").mkdir()
        recs = pycolmap.incremental_mapping(db, images, tmp / "sparse")
        times["mapping"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in sorted(images.glob("*.png")):  # one frame at a time, read back from disk
            est.predict(np.asarray(Image.open(p).convert("RGB"))[None])
        times["depth"] = time.perf_counter() - t0
    gt = np.load(video.with_suffix(".npz"))
    res = {"times": times, "total": sum(times.values()), "models": len(recs)}
    if recs:
        rec = max(recs.values(), key=lambda r: r.num_reg_images())
        idx, w2c = [], []
        for im in rec.images.values():
            if im.has_pose:
                m = np.eye(4)
                m[:3] = im.cam_from_world().matrix()
                idx.append(int(Path(im.name).stem))
                w2c.append(m)
        order = np.argsort(idx)
        idx = np.asarray(idx)[order]
        res["registered"] = len(idx)
        if len(idx) >= 3:
            cam = next(iter(rec.cameras.values()))
            res.update(_metrics(np.asarray(w2c)[order], gt["w2c"][idx], cam.params[0], gt["K"][0, 0]))
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
    ap.add_argument("--depth-input", type=int, default=266, help="shorter side fed to the depth model (518 native)")
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
    print(f"\nclips {args.size}, {args.kind} path, depth input {args.depth_input}px, {os.cpu_count()} CPUs")
    print(f"{'T':>4} {'method':>6} {'total s':>8} {'s/frame':>8} {'sfm s':>7} {'depth s':>8} {'reg':>7} "
          f"{'ATE %':>7} {'focal %':>8} {'peak MB':>8}")
    for row in rows:
        T = row["T"]
        downstream = None
        if "ours" in row:
            t = row["ours"]["times"]
            downstream = t["align"] + t["points"] + t["quality"] + t["write"]
        for method in ("ours", "naive"):
            if method not in row:
                continue
            r = row[method]
            t = r["times"]
            if method == "ours":  # depth ran in the background, overlapping sfm
                total, sfm, depth = r["total"], t["sfm"], t["depth"]
            else:
                total = r["total"] + (downstream or 0.0)
                sfm = t["dump_frames"] + t["features"] + t["matching"] + t["mapping"]
                depth = t["depth"]
            print(f"{T:>4} {method:>6} {total:>8.1f} {total / T:>8.2f} {sfm:>7.1f} {depth:>8.1f} "
                  f"{r.get('registered', 0):>3}/{T:<3} {r.get('ate_pct', float('nan')):>7.3f} "
                  f"{r.get('focal_err_pct', float('nan')):>8.2f} {r['peak_rss_mb']:>8.0f}")
        if "ours" in row and "naive" in row:
            naive_total = row["naive"]["total"] + downstream
            print(f"{'':>4} {'':>6} speed-up {naive_total / row['ours']['total']:.1f}x")


if __name__ == "__main__":
    main()
