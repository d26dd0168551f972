"""Depth stage alone: the build's batched estimator against the per-frame recipe, on GPU when there is one.

- ours: `fwdata.build.depth.DepthEstimator`: frames already in memory (decoded once for the clip), resized
  and normalised on the device in batches of --batch, one forward pass per batch;
- naive: what users do today: frames saved as PNG files, then the `transformers` depth-estimation
  pipeline called on each file (PIL loading and preprocessing on the CPU, one forward pass per frame,
  the prediction interpolated back to the frame size).

Both use the same network, a randomly initialised Depth Anything V2 Small (the same architecture and
compute as the released model; no download), at its native input size 518 (sized as the transformers processor does). Frame content
does not change the compute, so the frames are random. Prints one JSON line per clip length and
a table. Not run by the test suite.

    python tests/benchmarks/bench_depth.py --lengths 41 81 161 --size 336x592
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def make_model(folder: Path) -> None:
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(DepthAnythingConfig()).save_pretrained(folder)
    try:  # the released model's preprocessing (keep aspect, scale as little as possible to 518, multiple of 14)
        from transformers import DPTImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import DPTImageProcessor as Processor
    Processor(do_resize=True, size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
              resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
              image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_pad=False).save_pretrained(folder)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(T: int, H: int, W: int, model: Path, batch: int, dtype: str) -> dict:
    import torch
    from PIL import Image
    from transformers import pipeline

    from fwdata.build.depth import DepthOptions, get_estimator

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (T, H, W, 3), dtype=np.uint8)
    est = get_estimator(DepthOptions(model=str(model), batch_size=batch, dtype=dtype))
    est.predict(frames[:batch])  # warm-up
    sync()
    t0 = time.perf_counter()
    r = est.predict(frames)
    sync()
    ours = time.perf_counter() - t0

    device = 0 if torch.cuda.is_available() else -1
    pipe = pipeline("depth-estimation", model=str(model), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        t0 = time.perf_counter()
        for i, f in enumerate(frames):
            p = Path(tmp) / f"{i:06d}.png"
            Image.fromarray(f).save(p)
            paths.append(p)
        dump = time.perf_counter() - t0
        pipe(Image.open(paths[0]))  # warm-up
        sync()
        t0 = time.perf_counter()
        for p in paths:
            out = pipe(Image.open(p))
            _ = out["predicted_depth"].cpu().numpy()
        sync()
        naive = time.perf_counter() - t0
    return {"T": T, "size": f"{H}x{W}", "device": torch.cuda.get_device_name(0) if device == 0 else "cpu",
            "batch": batch, "dtype": dtype, "ours_s": ours, "naive_s": naive, "naive_dump_s": dump,
            "ours_ms_per_frame": 1000 * ours / T, "naive_ms_per_frame": 1000 * (naive + dump) / T,
            "speedup": (naive + dump) / ours, "shape": list(r.values.shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[41, 81, 161])
    ap.add_argument("--size", default="336x592")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fwdata-bench-depth"))
    args = ap.parse_args()
    H, W = (int(x) for x in args.size.split("x"))
    model = Path(args.work) / "depth-anything-v2-small-random"
    if not (model / "config.json").exists():
        make_model(model)
    rows = []
    for T in args.lengths:
        row = run(T, H, W, model, args.batch, args.dtype)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\ndepth stage, {args.size} frames, Depth Anything V2 Small architecture at 518, {rows[0]['device']}, "
          f"batch {args.batch} {args.dtype}")
    print(f"{'T':>4} {'ours ms/frame':>14} {'naive ms/frame':>15} {'speed-up':>9}")
    for r in rows:
        print(f"{r['T']:>4} {r['ours_ms_per_frame']:>14.1f} {r['naive_ms_per_frame']:>15.1f} {r['speedup']:>8.1f}x")


if __name__ == "__main__":
    main()
