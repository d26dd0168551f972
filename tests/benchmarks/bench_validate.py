"""Benchmark of `fwdata validate`: throughput against merely reading the same files, and peak memory
for a small vs a 10x larger dataset (it must not grow with the dataset). Not part of the test suite;
prints the numbers that docs/VALIDATE.md quotes.

    .venv/bin/python tests/benchmarks/bench_validate.py                       # 17x96x160 clips, 10 and 100 samples
    .venv/bin/python tests/benchmarks/bench_validate.py --frames 49 --height 192 --width 336 --sizes 8

Datasets are made from `--distinct` rendered synthetic clips, copied under new ids (and new source
names) up to the wanted size. "read" decodes every video frame, loads every npz array, parses both
camera files and reads the ply: the least a validator has to do. Page cache is warm for both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fwdata.dataset.contract import load_metadata, make_sample_id, read_camera_json, read_camera_txt, sample_paths
from fwdata.validate.gates import GateConfig
from fwdata.dataset.ply import read_ply_xyz
from fwdata.validate import ValidateOptions, validate_dataset
from fwdata.dataset.video import read_video

# replicas share video bytes on purpose; do not let the duplicate gate fill the report
BENCH_GATES = GateConfig()
BENCH_GATES.dataset.max_duplicate_clips = 10**9


def replicate(base: Path, out: Path, n: int) -> Path:
    """A dataset of n samples at `out`, cycling over the samples of `base` under new ids."""
    from fwdata.dataset.store import write_metadata

    if (out / "metadata.json").is_file() and len(load_metadata(out).samples) == n:
        return out
    shutil.rmtree(out, ignore_errors=True)
    meta = load_metadata(base)
    records = []
    for i in range(n):
        src = meta.samples[i % len(meta.samples)]
        name = f"bench{i:05d}.mp4"
        sid = make_sample_id(name, 0, 0, 1, src.num_frames)
        paths = sample_paths(sid)
        if not src.paths.points_ply:
            paths = paths.model_copy(update={"points_ply": None})
        for a, b in zip(src.paths.all(), paths.all()):
            (out / b).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base / a, out / b)
        records.append(src.model_copy(update={"id": sid, "paths": paths,
                                               "source": src.source.model_copy(update={"path": name})}))
    write_metadata(out, meta.model_copy(update={"samples": records}))
    return out


def read_all(root: Path) -> int:
    """Read every file the way a validator must, without checking anything. Returns bytes of arrays."""
    meta = load_metadata(root)
    n = 0
    for r in meta.samples:
        n += read_video(root / r.paths.video)[1].nbytes
        for rel in (r.paths.depth, r.paths.points):
            with np.load(root / rel, allow_pickle=False) as z:
                n += sum(z[k].nbytes for k in z.files)
        read_camera_json(root / r.paths.camera_json)
        read_camera_txt(root / r.paths.camera_txt)
        if r.paths.points_ply:
            n += read_ply_xyz(root / r.paths.points_ply).nbytes
    return n


def timed(fn, repeat: int = 1) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run including worker processes).

    CPU time is reported too because wall time on a shared machine depends on the other jobs."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        c0, t0 = os.times(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        c1 = os.times()
        cpu = (c1.user + c1.system + c1.children_user + c1.children_system
               - c0.user - c0.system - c0.children_user - c0.children_system)
        best = min(best, (wall, cpu))
    return best


_MEM_SNIPPET = """
import sys, json
from pathlib import Path
mode, root, workers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if mode == "read":
    sys.path.insert(0, {bench_dir!r})
    from bench_validate import read_all
    read_all(root)
else:
    from bench_validate import BENCH_GATES
    from fwdata.validate import ValidateOptions, validate_dataset
    rep = validate_dataset(ValidateOptions(dataset=root, workers=workers), config=BENCH_GATES)
    assert rep.exit_code == 0, rep.summary
# VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and would include the benchmark's own memory
hwm_kb = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({{"self_mb": hwm_kb / 1024}}))
"""


def peak_memory(mode: str, root: Path, workers: int) -> dict:
    bench_dir = str(Path(__file__).resolve().parent)
    code = _MEM_SNIPPET.format(bench_dir=bench_dir)
    env_path = f"{bench_dir}"
    out = subprocess.run([sys.executable, "-c", code, mode, str(root), str(workers)], capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, "PYTHONPATH": env_path})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="folder for the datasets (default: a temp dir)")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--distinct", type=int, default=4, help="rendered clips the datasets cycle over")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="timing repeats (best is reported)")
    args = ap.parse_args()

    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_validate_"))
    base = work / f"base_{args.frames}x{args.height}x{args.width}"
    t0 = time.perf_counter()
    write_synthetic_dataset(base, SynthOptions(num_scenes=args.distinct, num_frames=args.frames, height=args.height,
                                               width=args.width))
    print(f"# base dataset: {args.distinct} clips of {args.frames}x{args.height}x{args.width} "
          f"({time.perf_counter() - t0:.0f} s to render)")
    largest = max(args.sizes)
    print(f"# machine: {__import__('os').cpu_count()} CPUs; python {sys.version.split()[0]}; numpy {np.__version__}")

    for n in args.sizes:
        root = replicate(base, work / f"ds_{n}_{args.frames}x{args.height}x{args.width}", n)
        size_mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
        read_all(root)  # warm the page cache
        t_read, c_read = timed(lambda: read_all(root), args.repeat)
        print(f"\n## {n} samples ({size_mb:.0f} MiB on disk)")
        print(f"read only            : {t_read:7.2f} s  {n / t_read:7.1f} samples/s  cpu {c_read:6.2f} s")
        for w in args.workers:
            rep = None

            def go():
                nonlocal rep
                rep = validate_dataset(ValidateOptions(dataset=root, workers=w), config=BENCH_GATES)

            t_val, c_val = timed(go, args.repeat)
            assert rep.exit_code == 0, [f.message for f in rep.findings[:5]]
            checks = sum(c.outcome == "passed" for c in rep.checks)
            print(f"validate workers={w:<2d} : {t_val:7.2f} s  {n / t_val:7.1f} samples/s  cpu {c_val:6.2f} s  "
                  f"{t_val / t_read:5.2f} x read wall, {c_val / c_read:5.2f} x read cpu  ({checks} checks passed)")
        if n in (min(args.sizes), largest):
            # peak resident memory of a fresh process (imports included): in-process validation shows
            # what one worker needs; with workers=1 the parent only holds metadata and findings
            mem0 = peak_memory("validate", root, 0)["self_mb"]
            mem1 = peak_memory("validate", root, 1)["self_mb"]
            memr = peak_memory("read", root, 0)["self_mb"]
            print(f"peak RSS: validate in-process {mem0:.0f} MiB; validate workers=1 parent {mem1:.0f} MiB; "
                  f"read only {memr:.0f} MiB")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
