"""Data loading for training: WebDataset shards vs the dataset folder, at the Stage-2 size (81 x 336 x 592).

    python tests/benchmarks/bench_loading.py [DATASET] [--samples N] [--items M] [--workers 1,2,4]
        [--step-times 0.6,3.5] [--frames 81 --frame-stride 1] [--sources folder,shards] [--cache]

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
    CPU-s/sample  process CPU time (user + system) of the loader workers per sample prepared: the
                  workers' CPU time from the batch at which every worker has delivered one sample
                  (the `workers`-th: their start-up excluded) to the last, over the batches in
                  between (needs M > workers); less sensitive to a busy machine than wall time

Then, for each `--step-times` value S (seconds; the documented H200 step times are 0.60 s for
Stage 1 and 3.50 s for Stage 2, docs/TRAINING.md) and worker count, a consumer that holds each batch
for S seconds (it sleeps, standing for the GPU step) measures its data-wait fraction: the time
blocked in `next()` over the whole step time (wait + S), over every batch after the first (the first
is the loader's start-up): the quantity the trainer logs as `perf/data_wait_frac`. Last, derived
from the measured CPU cost (not measured with a GPU): the loader workers per GPU that keep the wait
under 5 % at each step time. With `w` workers, each preparing a sample in `c` CPU-seconds on its own
core, the loader delivers `w / c` samples/s; a GPU taking `k` samples (batch x grad_accum) per step
of `S` s then waits a fraction `1 - w S / (k c)` when that is positive, so `w >= 0.95 k c / S` keeps
it under 5 % (a core per worker assumed, and the prefetch queue, 2 per worker, absorbing jitter).

`--frames 21 --frame-stride 4` loads the Stage 1 size (21 frames spread over 81) from the same clips.
`--cache` first runs `fwmodel cache` on each source (the random-tiny encoders; a folder cache for the
dataset, a sharded one for the shards) and loads with `data.cache = "require"`: the latents are read
instead of the mp4 decoded, as in a run of the recipes (`data.cache = "auto"` with a cache made).

Numbers are from a warm page cache on a local disk (the files are read once before timing): they
measure decoding and the loaders, not the disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def loader_cpu_seconds(workers: int) -> float:
    """CPU time (user + system, s) so far of the loader's worker processes (this process's children),
    or of this process when the loader runs in it (`workers` = 0)."""
    import psutil

    me = psutil.Process()
    procs = me.children(recursive=True) if workers > 0 else [me]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # a worker that just exited
            pass
    return total


def workers_needed(cpu_per_sample: float, step_s: float, samples_per_step: int = 1, max_wait: float = 0.05) -> int:
    """Loader workers (one core each) per GPU for a data-wait fraction under `max_wait`, derived from the
    CPU-seconds per sample `c`: the loader makes w / c samples/s, the GPU waits 1 - w S / (k c) of its time."""
    import math

    return max(1, math.ceil((1 - max_wait) * samples_per_step * cpu_per_sample / step_s))


def loader_config(root: Path, workers: int, frames: int = T, stride: int = 1, cache: bool = False):
    """The trainer's config for loading `root` (a dataset folder or shards) at frames x H x W."""
    from fwmodel.train.config import load_config

    return load_config(None, {"data.root": str(root), "data.split": "all", "data.num_frames": frames, "data.height": H,
                              "data.width": W, "data.frame_stride": stride, "data.cache": "require" if cache else "off",
                              "data.shuffle": False, "data.num_workers": workers, "model.vae": "random-tiny",
                              "model.text_encoder": "random-tiny", "model.preset": "tiny",
                              "data.allow_random_init_labels": True})


def build_latent_cache(roots: list[Path], encoders: Path, frames: int, stride: int) -> None:
    """`fwmodel cache` of each root (a folder cache for a dataset, a sharded one for shards) with the
    randomly initialised tiny encoders: the loader then reads latents instead of decoding the mp4, as a
    run with the recipes' `data.cache = "auto"` does (the latents' sizes are the tiny VAE's)."""
    from fwmodel.cache import CacheOptions, build_cache

    for root in roots:
        cfg = loader_config(root, 0, frames, stride, cache=True)
        build_cache(CacheOptions(dataset=root, vae=encoders, text_encoder=encoders, data=cfg.data, device="cpu"))


def measure(root: Path, workers: int, items: int, step_s: float = 0.0, frames: int = T, stride: int = 1,
            cache: bool = False) -> dict:
    """Load `items` batches through the trainer's loader, holding each for `step_s` seconds (a sleep that
    stands for the GPU step); samples/s, first batch (s), CPU-s/sample, data-wait fraction, peak PSS."""
    from fwmodel.config import get_preset
    from fwmodel.train.distributed import Dist
    from fwmodel.train import make_loader, prepare_data

    cfg = loader_config(root, workers, frames, stride, cache)
    dataset = prepare_data(cfg, get_preset("tiny"))
    memory = PeakMemory()
    before = memory.total()
    with memory:
        t0 = time.perf_counter()
        _, loader = make_loader(dataset, cfg, Dist(), start_micro=0)
        it = iter(loader)
        times, waits, cpu = [], [], []
        for i in range(items):
            tw = time.perf_counter()
            batch = next(it)  # what the trainer times as data wait (fwmodel.train: micro_batches)
            waits.append(time.perf_counter() - tw)
            cpu.append(loader_cpu_seconds(workers))
            assert batch["depth"].shape == (1, frames, H, W)
            assert ("latents" in batch and "video" not in batch) if cache else batch["video"].shape == (1, 3, frames, H, W)
            times.append(time.perf_counter() - t0)
            if step_s > 0 and i < items - 1:
                time.sleep(step_s)  # the GPU step: the loader's workers go on preparing meanwhile
        del it, loader
    k = max(workers, 1)  # from the k-th batch on every worker has delivered one sample (round-robin order)
    cpu_per_sample = (cpu[-1] - cpu[k - 1]) / (items - k) if items > k else float("nan")
    steady = waits[1:]
    wait_frac = sum(steady) / (sum(steady) + step_s * len(steady)) if steady and (sum(steady) or step_s) else 0.0
    return {"samples_s": items / times[-1], "first_s": times[0], "peak": memory.peak, "before": before,
            "cpu_per_sample": cpu_per_sample, "wait_frac": wait_frac}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", type=Path)
    parser.add_argument("--samples", type=int, default=2, help="synthetic clips to render without DATASET")
    parser.add_argument("--items", type=int, default=12, help="samples loaded per configuration")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--step-times", default="0.6,3.5",
                        help="GPU step times (s) the data-wait consumer holds each batch for")
    parser.add_argument("--frames", type=int, default=T, help="frames per sample (21 with --frame-stride 4: Stage 1)")
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--sources", default="folder,shards", help="which of folder,shards to load")
    parser.add_argument("--samples-per-step", type=int, default=1,
                        help="samples per GPU step (batch x grad_accum; the recipes: 1) for the derived workers")
    parser.add_argument("--cache", action="store_true",
                        help="load through a latent cache (made first with the random-tiny encoders), as the recipes' "
                             "data.cache = auto does, instead of decoding the mp4")
    args = parser.parse_args()
    steps = [float(x) for x in args.step_times.split(",") if x.strip()]
    sources = [x.strip() for x in args.sources.split(",") if x.strip()]
    if not steps or min(steps) <= 0 or not sources or not set(sources) <= {"folder", "shards"}:
        parser.error("--step-times: positive seconds, comma-separated; --sources: folder and/or shards")
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
              f"{args.items} samples per configuration, {torch.get_num_threads()} torch thread(s), loading "
              f"{args.frames} x {H} x {W} (frame stride {args.frame_stride}), "
              f"{'latents from the cache' if args.cache else 'no latent cache: the mp4 decoded'}")
        roots = {"folder": dataset, "shards": shards}
        if args.cache:
            from fwmodel.cache import write_tiny_encoders

            encoders = write_tiny_encoders(Path(tmp) / "encoders")
            build_latent_cache([roots[name] for name in sources], encoders, args.frames, args.frame_stride)
        worker_counts = [int(w) for w in args.workers.split(",")]
        size = dict(frames=args.frames, stride=args.frame_stride, cache=args.cache)
        cpu: dict[str, list[float]] = {name: [] for name in sources}
        print("| source | workers | samples/s | MB/s | first batch (s) | CPU-s/sample | peak PSS (MiB) | before (MiB) |")
        print("|---|---|---|---|---|---|---|---|")
        for workers in worker_counts:
            for name in sources:
                r = measure(roots[name], workers, args.items, **size)
                cpu[name].append(r["cpu_per_sample"])
                print(f"| {name} | {workers} | {r['samples_s']:.2f} | {r['samples_s'] * per_sample / 1e6:.0f} | "
                      f"{r['first_s']:.1f} | {r['cpu_per_sample']:.2f} | {r['peak'] / 2**20:.0f} | "
                      f"{r['before'] / 2**20:.0f} |", flush=True)
        print("\ndata-wait fraction of a consumer holding each batch for the step time (batches after the first)")
        print("| source | workers | step time (s) | data wait | samples/s | CPU-s/sample |")
        print("|---|---|---|---|---|---|")
        for step_s in steps:
            for workers in worker_counts:
                for name in sources:
                    r = measure(roots[name], workers, args.items, step_s=step_s, **size)
                    cpu[name].append(r["cpu_per_sample"])
                    print(f"| {name} | {workers} | {step_s:.2f} | {100 * r['wait_frac']:.1f} % | "
                          f"{r['samples_s']:.2f} | {r['cpu_per_sample']:.2f} |", flush=True)
        print(f"\nderived from the measured CPU cost (median CPU-s/sample of the runs above; a core per worker, "
              f"{args.samples_per_step} sample(s) per step), not measured on a GPU:")
        print("| source | CPU-s/sample | step time (s) | loader workers per GPU for < 5 % data wait |")
        print("|---|---|---|---|")
        for name in sources:
            c = statistics.median([x for x in cpu[name] if x == x])  # NaN: too few items for that worker count
            for step_s in steps:
                print(f"| {name} | {c:.2f} | {step_s:.2f} | {workers_needed(c, step_s, args.samples_per_step)} |")


if __name__ == "__main__":
    sys.exit(main())
