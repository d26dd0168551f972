"""Data loading for training: WebDataset shards vs the dataset folder, at the Stage-2 size (81 x 336 x 592).

    python tests/benchmarks/bench_loading.py [DATASET] [--samples N] [--items M] [--workers 1,2,4]

DATASET is a dataset folder with clips of at least 81 frames (default: N synthetic clips rendered at
81 x 336 x 592 into a temporary folder; rendering takes minutes per clip on a busy CPU). Its shards
are written with `fwdata shard`'s writer (one sample per shard). Each configuration loads M samples
through the trainer's own loader (`fwmodel.train.prepare_data` + `make_loader`: batch 1, shuffle off,
no latent cache, so each sample is the full work of an online-encoding run: the mp4 decoded, depth
and points read and normalised, cameras encoded) and prints, per source and number of workers:

    samples/s     M / the time from creating the loader iterator to the M-th batch (worker start-up
                  included: take M >> workers for the steady state)
    MB/s          the sample files' bytes (mp4 + depth + points + camera json) per second
    first batch   seconds from creating the loader iterator to the first batch (worker start-up)
    peak MiB      the largest total PSS (proportional set size: shared pages split between processes)
                  of this process and its loader workers while loading, sampled every 50 ms; and the
                  same before the loader started, for reference

Numbers are from a warm page cache on a local disk (the files are read once before timing): they
measure decoding and the loaders, not the disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

T, H, W = 81, 336, 592


def _pss(proc) -> int:
    try:
        info = proc.memory_full_info()
        return getattr(info, "pss", info.rss)
    except Exception:  # a worker that just exited
        return 0


class PeakMemory:
    """Largest total PSS of this process and its children while the `with` block runs (bytes)."""

    def __init__(self, every: float = 0.05):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()

    def total(self) -> int:
        return _pss(self.proc) + sum(_pss(c) for c in self.proc.children(recursive=True))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total())
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.total())


def render_dataset(root: Path, samples: int) -> Path:
    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset

    print(f"rendering {samples} synthetic clip(s) at {T} x {H} x {W} into {root} ...", flush=True)
    write_synthetic_dataset(root, SynthOptions(num_scenes=samples, num_frames=T, height=H, width=W, write_ply=False))
    return root


def sample_bytes(dataset: Path) -> float:
    """Mean bytes per sample of the files training reads."""
    meta = json.loads((dataset / "metadata.json").read_text())
    sizes = [sum((dataset / s["paths"][k]).stat().st_size for k in ("video", "depth", "points", "camera_json"))
             for s in meta["samples"] if s["status"] == "ok" and s["num_frames"] >= T]
    return sum(sizes) / len(sizes)


def measure(root: Path, workers: int, items: int) -> dict:
    from fwmodel.config import get_preset
    from fwmodel.train import Dist, load_config, make_loader, prepare_data

    cfg = load_config(None, {"data.root": str(root), "data.split": "all", "data.num_frames": T, "data.height": H,
                             "data.width": W, "data.frame_stride": 1, "data.cache": "off", "data.shuffle": False,
                             "data.num_workers": workers, "model.vae": "random-tiny",
                             "model.text_encoder": "random-tiny", "model.preset": "tiny",
                             "data.allow_random_init_labels": True})
    dataset = prepare_data(cfg, get_preset("tiny"))
    memory = PeakMemory()
    before = memory.total()
    with memory:
        t0 = time.perf_counter()
        _, loader = make_loader(dataset, cfg, Dist(), start_micro=0)
        it = iter(loader)
        times = []
        for _ in range(items):
            batch = next(it)
            assert batch["video"].shape == (1, 3, T, H, W) and batch["depth"].shape == (1, T, H, W)
            times.append(time.perf_counter() - t0)
        del it, loader
    return {"samples_s": items / times[-1], "first_s": times[0], "peak": memory.peak, "before": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", type=Path)
    parser.add_argument("--samples", type=int, default=2, help="synthetic clips to render without DATASET")
    parser.add_argument("--items", type=int, default=12, help="samples loaded per configuration")
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or render_dataset(Path(tmp) / "ds", args.samples)
        from fwdata.shards.writer import ShardConfig, write_shards

        shards = Path(tmp) / "shards"
        write_shards(ShardConfig(dataset=dataset, out=shards, samples_per_shard=1))
        for path in list(dataset.rglob("*")) + list(shards.rglob("*")):  # warm the page cache
            if path.is_file():
                path.read_bytes()
        per_sample = sample_bytes(dataset)
        print(f"{dataset}: {per_sample / 2**20:.1f} MiB per sample (mp4 + depth + points + cameras); "
              f"{args.items} samples per configuration, {torch.get_num_threads()} torch thread(s)")
        print("| source | workers | samples/s | MB/s | first batch (s) | peak PSS (MiB) | before (MiB) |")
        print("|---|---|---|---|---|---|---|")
        for workers in [int(w) for w in args.workers.split(",")]:
            for name, root in (("folder", dataset), ("shards", shards)):
                r = measure(root, workers, args.items)
                print(f"| {name} | {workers} | {r['samples_s']:.2f} | {r['samples_s'] * per_sample / 1e6:.0f} | "
                      f"{r['first_s']:.1f} | {r['peak'] / 2**20:.0f} | {r['before'] / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
