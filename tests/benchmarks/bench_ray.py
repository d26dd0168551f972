"""Benchmark of the Ray executor against the local executor: build throughput on the same clips, in
the same run. Not run by the test suite.

For P = 1 and 2 worker processes it builds the same clips twice into fresh folders:

- local: `fwdata build --workers P` (P = 1: in this process; P = 2: two spawned worker processes);
- ray: `--executor ray` on a Ray instance started here with P CPUs (`ray.init(num_cpus=P)`), so P
  clips run at once, each in its Ray worker's clean process (fwdata.build.executors).

Throughput is clips / s and frames / s over the build's wall time (`BuildSummary.seconds`: planning,
worker start and model load included, as a user waits for them); the Ray instance's own start is
timed apart. Every Ray build is checked to be byte-identical to the local one (metadata.json without
its run fields). From the two Ray runs it prints the scaling efficiency from 1 to 2 workers, the
figure a projection to N nodes multiplies by.

    .venv/bin/python tests/benchmarks/bench_ray.py --work /tmp/fwdata-bench-ray
    .venv/bin/python tests/benchmarks/bench_ray.py --frames 17 --height 128 --width 224 --max-clips 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

K = (290.9845356715714, 290.9845356715714, 168.0, 96.0)  # the example renders' camera (examples/ground_truth)


def files(root: Path) -> dict[str, bytes]:
    """Every file's bytes; metadata.json without the folder name and the fields that describe the run."""
    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    meta = json.loads(out.pop("metadata.json"))
    meta.pop("name")
    for key in ("created", "command", "runs"):
        meta["provenance"].pop(key)
    out["metadata.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


def build(videos: list[str], out: Path, options: dict) -> dict:
    from fwdata.build.pipeline import build_dataset, load_config

    if out.exists():
        shutil.rmtree(out)
    s = build_dataset(videos, out, load_config(None, options))
    frames = sum(r.num_frames for r in s.metadata.samples)
    return {"built": s.built, "failed": len(s.failures), "seconds": s.seconds, "clips_per_s": s.built / s.seconds,
            "frames_per_s": frames / s.seconds, "clip_seconds": sum(s.clip_seconds) / max(1, len(s.clip_seconds))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/fwdata-bench-ray"))
    ap.add_argument("--videos", type=Path, nargs="*", default=sorted((ROOT / "examples" / "videos").glob("*.mp4")))
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--max-clips", type=int, default=1, help="clips per video")
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    args = ap.parse_args()

    videos = [str(v) for v in args.videos]
    base = {"clips": {"num_frames": args.frames, "height": args.height, "width": args.width, "stride": 2,
                      "max_clips_per_video": args.max_clips},
            "depth": {"model": "random-tiny"}, "intrinsics": K}
    rows = []
    for p in args.workers:
        local = build(videos, args.work / f"local-{p}", {**base, "workers": p})
        import ray  # after the first local build: that one runs in this process (fwdata.build.executors)

        t0 = time.time()
        ray.init(num_cpus=p, include_dashboard=False, log_to_driver=False)
        ray_start = time.time() - t0
        try:
            on_ray = build(videos, args.work / f"ray-{p}", {**base, "executor": "ray"})
        finally:
            ray.shutdown()
        same = files(args.work / f"local-{p}") == files(args.work / f"ray-{p}")
        rows.append({"workers": p, "local": local, "ray": on_ray, "ray_start_s": ray_start, "identical": same})
        print(f"workers {p}: local {local['clips_per_s']:.3f} clips/s {local['frames_per_s']:.2f} frames/s "
              f"({local['built']} clips in {local['seconds']:.1f} s) | ray {on_ray['clips_per_s']:.3f} clips/s "
              f"{on_ray['frames_per_s']:.2f} frames/s ({on_ray['seconds']:.1f} s; Ray start {ray_start:.1f} s) | "
              f"ray/local {on_ray['clips_per_s'] / local['clips_per_s']:.2f} | identical bytes: {same}", flush=True)
    print()
    print("| worker processes | local clips/s | local frames/s | ray clips/s | ray frames/s | ray / local | "
          "same bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lo, ra = r["local"], r["ray"]
        print(f"| {r['workers']} | {lo['clips_per_s']:.3f} | {lo['frames_per_s']:.2f} | {ra['clips_per_s']:.3f} | "
              f"{ra['frames_per_s']:.2f} | {ra['clips_per_s'] / lo['clips_per_s']:.2f} | "
              f"{'yes' if r['identical'] else 'NO'} |")
    by = {r["workers"]: r for r in rows}
    if 1 in by and 2 in by:
        eff = by[2]["ray"]["clips_per_s"] / (2 * by[1]["ray"]["clips_per_s"])
        print(f"\nray scaling 1 -> 2 workers: {by[2]['ray']['clips_per_s'] / by[1]['ray']['clips_per_s']:.2f}x "
              f"(efficiency {eff:.0%}); N slots ~ N x {by[1]['ray']['clips_per_s']:.3f} clips/s x {eff:.2f}")
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
