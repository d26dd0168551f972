"""How work runs on this machine: CPU threads per clip and per worker process.

A dataset's bytes must depend only on its inputs and options, never on ``--workers``, the core
count, or whether a clip ran in the main process or in a worker. Two libraries we use give results
that depend on the number of threads they run on:

- torch (the depth model on the CPU): reductions are split by thread, so 1 and 2 threads differ
  in the last bit of some pixels;
- COLMAP (matching and bundle adjustment through Ceres): with more than one thread, the cameras
  differ run to run at ~1e-16, which is enough to change every byte downstream.

So every clip runs with the same, explicitly configured number of threads (`BuildConfig.threads`,
default 1), set the same way in the main process and in workers; more speed comes from more
worker processes, which do not change the results.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

#: environment variables read by the BLAS / OpenMP pools when they start (worker processes only:
#: in a running process those pools already exist)
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def init_worker(threads: int) -> None:
    """Runs once in each spawned worker process, before any clip: its thread pools get `threads`."""
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(threads)
    _set_torch_threads(threads)


@contextlib.contextmanager
def clip_threads(threads: int) -> Iterator[None]:
    """Run one clip with torch on exactly `threads` intra-op threads, then restore the caller's setting.

    Used for every clip, in the main process as in workers, so where a clip runs never changes it.
    """
    previous = _set_torch_threads(threads)
    try:
        yield
    finally:
        if previous is not None:
            _set_torch_threads(previous)


def _set_torch_threads(threads: int):
    """Set torch's intra-op threads; returns the previous count (None when torch is unavailable)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    previous = torch.get_num_threads()
    if previous != threads:
        torch.set_num_threads(threads)
    return previous
