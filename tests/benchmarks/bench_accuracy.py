"""Accuracy of `fwdata build` on rendered scenes with known cameras and depth, per camera-path kind.

Not run by the test suite (tests/build asserts the targets on three clips; this measures more).
It renders `--scenes` clips (`fwdata synth`: textured rooms, 60 degree horizontal FoV; scene i has
seed i and the path kinds take turns), writes each clip's depth prior (ground-truth inverse depth
times 3.7 plus 0.25, with 1 % per-pixel noise: an unknown scale and shift, as a relative depth
model gives), builds the videos with the default preset at the renders' size, and measures the
result with `fwdata compare` (fwdata.compare). Prints every clip, then the mean and worst per
kind, and writes results.csv into --work.

    .venv/bin/python tests/benchmarks/bench_accuracy.py --scenes 9 --frames 49
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "build"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fwdata-bench-accuracy"))
    ap.add_argument("--scenes", type=int, default=9)
    ap.add_argument("--kinds", nargs="+", default=["orbit", "forward", "pan"])
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--size", default="192x336")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import pandas as pd

    from conftest import kind_of, write_prior  # the build tests' prior distortion, one definition
    from fwdata.build.pipeline import build_dataset, load_config
    from fwdata.dataset.contract import load_metadata
    from fwdata.compare import compare_datasets
    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset

    H, W = (int(x) for x in args.size.split("x"))
    work = Path(args.work)
    gt, prior, ds = work / f"gt_{args.scenes}x{args.frames}_{H}x{W}", work / "prior", work / "ds"
    if not (gt / "metadata.json").exists():
        write_synthetic_dataset(gt, SynthOptions(num_scenes=args.scenes, num_frames=args.frames, height=H, width=W,
                                                 path_kinds=args.kinds, write_ply=False))
    write_prior(gt, prior)
    config = load_config(None, {"workers": args.workers, "write_ply": False, "depth": {"prior_dir": str(prior)},
                                "clips": {"num_frames": args.frames, "height": H, "width": W, "stride": 1}})
    t0 = time.perf_counter()
    summary = build_dataset([gt / "videos"], ds, config)
    seconds = time.perf_counter() - t0
    for f in summary.failures:
        print(f"FAILED {f.source} [{f.stage}] {f.reason}")
    df, _ = compare_datasets(ds, gt)
    gt_meta = load_metadata(gt)
    df.insert(0, "kind", [kind_of(next(g for g in gt_meta.samples if g.id == t)) for t in df["truth"]])
    df.to_csv(work / "results.csv", index=False)
    cols = ["ate_pct", "rpe_rot_deg", "focal_err_pct", "depth_absrel_pct", "point_err_pct"]
    pd.set_option("display.width", 200)
    print(df[["kind", "truth", "registered_pct"] + cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    df["abs_focal_err_pct"] = df["focal_err_pct"].abs()
    by_kind = df.groupby("kind").agg(
        clips=("truth", "count"), registered_pct=("registered_pct", "min"),
        ate_mean=("ate_pct", "mean"), ate_max=("ate_pct", "max"),
        focal_abs_mean=("abs_focal_err_pct", "mean"), focal_abs_max=("abs_focal_err_pct", "max"),
        absrel_mean=("depth_absrel_pct", "mean"), absrel_max=("depth_absrel_pct", "max"),
        point_mean=("point_err_pct", "mean"), point_max=("point_err_pct", "max"))
    print(f"\n{args.scenes} clips of {args.frames} frames, {H}x{W}, built in {seconds:.0f} s with "
          f"{args.workers} workers; {len(summary.failures)} failed")
    print(by_kind.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
