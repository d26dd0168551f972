"""Cameras on realistic renders and real clips: `fwdata build` against the plain pycolmap recipe.

The plain recipe is what users run today, measured in the same script on the same frames: every
frame dumped to PNG, one shared SIMPLE_RADIAL camera (COLMAP's default), SIFT with COLMAP's default
options, exhaustive matching, incremental mapping, the largest model kept. Ours is the build's own
per-clip path (`fwdata.build.pipeline.build_dataset`) with a depth prior.

Inputs:
- realistic renders (`fwdata synth --preset realistic`: lens k1 -0.12 / k2 0.03 with tangential
  terms, noise, blur, exposure and white-balance drift, H.264 at 0.2 bpp, two path poses per frame,
  low-texture walls, a moving sphere) of each `--kinds` path, `--seeds` seeds, `--frames` frames at
  `--size`; depth prior = the ground truth seen through the lens, inverse, scale 3.7 shift 0.25, 1 %
  noise (a network's affine-invariant output);
- with `--real`, the TUM RGB-D clips of ../shared/data/real (motion-capture cameras; their
  registered depth is a metric prior, so the build comes out in metres and its Sim(3) scale is ~1).

Per clip: frames registered, models, ATE (% of the truth's extent, Sim(3)), RPE rotation, focal
error (%), k1 (ours: the undistortion's; plain: SIMPLE_RADIAL's), time (wall and CPU seconds, all threads:
on a shared CPU the CPU time is the steadier measure); ours also the outcome (written / refused with the
reason), focal uncertainty and spread, and depth AbsRel.

    .venv/bin/python tests/benchmarks/bench_realistic.py --seeds 0 --frames 49 --real
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "build"))
REAL = ROOT.parent / "shared" / "data" / "real"


def plain_recipe(frames: np.ndarray) -> dict:
    """The recipe users follow today, on (T,H,W,3) frames -> cameras of the largest model.

    COLMAP runs in a fresh process that imports nothing but pycolmap: in a process that has loaded
    PyAV/decord/torch first, COLMAP's PNG reader fails ("libpng error: bad parameters to zlib"), and
    importing pycolmap first can crash later imports (a shared-library load-order conflict).
    """
    import subprocess

    from PIL import Image

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        for i, f in enumerate(frames):
            Image.fromarray(f).save(images / f"{i:06d}.png")
        c0 = _children_cpu()
        r = subprocess.run([sys.executable, __file__, "--plain-child", str(tmp)], capture_output=True, text=True)
        cpu = _children_cpu() - c0
        if r.returncode != 0:
            raise RuntimeError(f"plain recipe failed: {r.stderr[-2000:]}")
        res = dict(np.load(tmp / "result.npz"))
    out = {"seconds": time.perf_counter() - t0, "cpu_seconds": cpu, "models": int(res["models"]),
           "registered": int(res["registered"])}
    if out["registered"]:
        out.update(frames=res["frames"], w2c=res["w2c"], focal=float(res["focal"]), k1=float(res["k1"]))
    return out


def _children_cpu() -> float:
    """CPU seconds (user + system, all threads) of this process's finished child processes."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _plain_child(tmp: Path) -> None:
    """PNG frames in tmp/images -> tmp/result.npz: SIMPLE_RADIAL, exhaustive matching, incremental mapping."""
    import pycolmap

    pycolmap.logging.minloglevel = 2
    images, db = tmp / "images", tmp / "db.db"
    pycolmap.extract_features(db, images, camera_mode=pycolmap.CameraMode.SINGLE)
    pycolmap.match_exhaustive(db)
    (tmp / "sparse").mkdir()
    recs = pycolmap.incremental_mapping(db, images, tmp / "sparse")
    if not recs:
        np.savez(tmp / "result.npz", models=0, registered=0)
        return
    frames, w2c, cam = largest_model_cameras(recs)
    np.savez(tmp / "result.npz", models=len(recs), registered=len(frames), frames=frames, w2c=w2c,
             focal=float(cam.params[0]), k1=float(cam.params[3]))


def largest_model_cameras(recs) -> tuple[np.ndarray, np.ndarray, object]:
    """(frame indices (N,) sorted, w2c (N,4,4), camera) of the largest pycolmap model; images are named
    by frame index."""
    rec = max(recs.values(), key=lambda r: r.num_reg_images())
    idx, w2c = [], []
    for im in rec.images.values():
        if im.has_pose:
            m = np.eye(4)
            m[:3] = im.cam_from_world().matrix()
            idx.append(int(Path(im.name).stem))
            w2c.append(m)
    order = np.argsort(idx)
    return np.asarray(idx)[order], np.asarray(w2c)[order], next(iter(rec.cameras.values()))


def _camera_metrics(w2c: np.ndarray, gt_w2c: np.ndarray) -> dict:
    from fwdata.dataset import camera

    if len(w2c) < 3:
        return {}
    m = camera.trajectory_metrics(w2c, gt_w2c)
    return {"ate_pct": 100 * m["ate_rel"], "rpe_rot_deg": m["rpe_rot_deg"], "scale": m["scale"]}


def run_ours(video: Path, prior: Path, T: int, H: int, W: int, work: Path) -> dict:
    from fwdata.build.pipeline import build_dataset, load_config
    from fwdata.dataset.contract import load_metadata, read_camera_json

    vids = work / "videos"
    shutil.rmtree(vids, ignore_errors=True)
    vids.mkdir(parents=True)
    shutil.copy(video, vids / video.name)
    out = work / "ds"
    shutil.rmtree(out, ignore_errors=True)
    config = load_config(None, {"write_ply": False, "depth": {"prior_dir": str(prior)},
                                "clips": {"num_frames": T, "height": H, "width": W, "stride": 1,
                                          "max_clips_per_video": 1}})
    t0, c0 = time.perf_counter(), time.process_time() + _children_cpu()
    summary = build_dataset([vids], out, config)
    res = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() + _children_cpu() - c0}
    if summary.failures:
        res["outcome"] = f"refused [{summary.failures[0].stage}]: {summary.failures[0].reason}"
        return res
    rec = load_metadata(out).samples[0]
    cams = read_camera_json(out / rec.paths.camera_json)
    q, cam = rec.quality, rec.source.camera
    res.update(outcome="written", registered=cams.num_frames, frames=np.array([f.source_frame for f in cams.frames]),
               w2c=cams.w2c_array(), focal=cam.fx, k1=cam.k1, k2=cam.k2, focal_uncertainty=q.focal_uncertainty,
               focal_spread=q.focal_spread, scale_kind=rec.scale, out=out)
    return res


def _row(name: str, method: str, res: dict, gt_w2c: np.ndarray, f_gt: float, k1_gt, T: int) -> dict:
    row = {"clip": name, "method": method, "registered": f"{res.get('registered', 0)}/{T}",
           "models": res.get("models", ""), "seconds": round(res["seconds"], 1), "cpu_seconds": round(res["cpu_seconds"], 1),
           "outcome": res.get("outcome", "")}
    if res.get("registered", 0) >= 3:
        row.update(_camera_metrics(res["w2c"], gt_w2c[res["frames"]]))
        row["focal_err_pct"] = 100 * (res["focal"] / f_gt - 1)
        row["k1"] = res.get("k1")
        row["k1_true"] = k1_gt
    for k in ("focal_uncertainty", "focal_spread"):
        if k in res:
            row[k] = res[k]
    return row


def realistic_rows(args, work: Path) -> list[dict]:
    from conftest import write_prior  # the build tests' prior, one definition
    from fwdata.dataset.contract import load_metadata, read_camera_json
    from fwdata.dataset.video import read_frames
    from fwdata.synth.dataset import realistic_options, write_synthetic_dataset

    H, W = (int(x) for x in args.size.split("x"))
    CH, CW = (int(x) for x in (args.clip_size or args.size).split("x"))
    rows = []
    for seed in args.seeds:
        gt = work / f"gt_{seed}_{args.frames}_{H}x{W}"
        if not (gt / "metadata.json").exists():
            write_synthetic_dataset(gt, realistic_options(num_scenes=len(args.kinds), num_frames=args.frames,
                                                          height=H, width=W, seed=seed, path_kinds=args.kinds,
                                                          write_ply=False))
        write_prior(gt, work / "prior")
        for s in load_metadata(gt).samples:
            kind = next(k for k in args.kinds if f"path={k}" in " ".join(s.notes))
            cams = read_camera_json(gt / s.paths.camera_json)
            gt_w2c, f_gt = cams.w2c_array(), cams.frames[0].fx
            k1_gt = s.provenance.options["ground_truth"]["lens"]["k1"]
            name = f"{kind} seed {s.source.path.split('seed')[1].split('_')[0]}"
            frames = read_frames(gt / s.paths.video, range(s.num_frames))
            plain = plain_recipe(frames)
            rows.append(_row(name, "plain", plain, gt_w2c, f_gt, k1_gt, s.num_frames))
            ours = run_ours(gt / s.paths.video, work / "prior", s.num_frames, CH, CW, work / "ours")
            row = _row(name, "ours", ours, gt_w2c, f_gt, k1_gt, s.num_frames)
            if ours.get("outcome") == "written":
                from fwdata.compare import compare_datasets

                df, _ = compare_datasets(ours["out"], gt)
                row["depth_absrel_pct"] = float(df["depth_absrel_pct"].iloc[0])
            rows.append(row)
            print(rows[-2], "\n", rows[-1], flush=True)
    return rows


def real_rows(work: Path) -> list[dict]:
    from fwdata.dataset import camera
    from fwdata.dataset.video import read_frames

    rows = []
    prior = work / "real_prior"
    prior.mkdir(parents=True, exist_ok=True)
    for name, T in (("tum_fr3_cabinet_58f", 57), ("tum_fr1_rpy_120f", 81)):
        ref = np.load(REAL / f"{name.rsplit('_', 1)[0]}_ref.npz")
        np.savez(prior / f"{name}.npz", depth=(ref["depth"] / float(ref["depth_scale"])).astype(np.float32))
        gt_w2c = camera.invert_pose(ref["c2w"])
        f_gt = float(ref["K"][0, 0])
        frames = read_frames(REAL / f"{name}.mp4", range(T))
        plain = plain_recipe(frames)  # at the source size, 640x480
        rows.append(_row(name, "plain", plain, gt_w2c, f_gt, None, T))
        ours = run_ours(REAL / f"{name}.mp4", prior, T, 448, 592, work / "ours")
        if ours.get("outcome") == "written":  # our clip is 592x448 of a 640x480 source: focal in source px
            from fwdata.dataset.contract import load_metadata

            rec = load_metadata(ours["out"]).samples[0]
            ours["focal"] = rec.source.camera.fx
        row = _row(name, "ours", ours, gt_w2c, f_gt, None, T)
        if ours.get("outcome") == "written":
            row["unit"] = ours["scale_kind"]
        rows.append(row)
        print(rows[-2], "\n", rows[-1], flush=True)
    return rows


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--plain-child":
        _plain_child(Path(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fwdata-bench-realistic"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--kinds", nargs="+", default=["orbit", "forward", "pan", "rotate"])
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--size", default="192x336", help="rendered source size HxW (the plain recipe runs on it)")
    ap.add_argument("--clip-size", default=None, help="size HxW of the clips ours builds (default: --size); "
                                                       "features are found at the source size")
    ap.add_argument("--real", action="store_true", help="also the TUM clips of ../shared/data/real")
    ap.add_argument("--no-renders", action="store_true", help="only the real clips")
    args = ap.parse_args()

    import pandas as pd

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [] if args.no_renders else realistic_rows(args, work)
    if args.real:
        rows += real_rows(work)
    df = pd.DataFrame(rows)
    df.to_csv(work / "results.csv", index=False)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 90)
    print(df.drop(columns=[c for c in ("k1_true",) if c in df]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    (work / "results.json").write_text(json.dumps(rows, default=str, indent=1))


if __name__ == "__main__":
    main()
