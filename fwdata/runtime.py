"""How work runs on this machine: CPU threads per clip, and the one worker pool of build and validate.

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
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, TypeVar, Union

if TYPE_CHECKING:
    from pydantic import ValidationError

T = TypeVar("T")
R = TypeVar("R")

#: environment variables read by the BLAS / OpenMP pools when they start (worker processes only:
#: in a running process those pools already exist)
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def init_worker(threads: int, parent: Optional[int] = None) -> None:
    """Runs once in each spawned worker process, before any clip: its thread pools get `threads`, and
    it dies with its parent (`parent`'s pid), however the parent dies (kill -9 included)."""
    if parent is not None:
        die_with_parent(parent)
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(threads)
    _set_torch_threads(threads)


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux `PR_SET_PDEATHSIG`), so no
    worker goes on writing into a dataset after the build that started it is gone. Elsewhere, or if
    the parent is already gone, a worker whose parent is not `parent` exits at once."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


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


# --------------------------------------------------------------------------- one worker pool


class WorkerDied(RuntimeError):
    """The worker process running a task died (killed, out of memory, a native crash), twice."""


@contextlib.contextmanager
def _worker_env(threads: int) -> Iterator[None]:
    """Thread variables for the workers about to be spawned (they read them when their BLAS starts)."""
    saved = {k: os.environ.get(k) for k in THREAD_ENV_VARS}
    os.environ.update({k: str(threads) for k in THREAD_ENV_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_in_processes(fn: Callable[[T], R], items: Sequence[T], workers: int, threads: int = 1,
                     ordered: bool = False, on_flight: Optional[Callable[[int], None]] = None,
                     ) -> Iterator[tuple[T, Optional[R], Optional[BaseException]]]:
    """Run `fn(item)` for every item in `workers` spawned processes; yield (item, result, error).

    - spawn, never fork: torch and COLMAP threads do not survive a fork;
    - every worker runs on `threads` CPU threads (`init_worker`), whatever the machine;
    - a bounded window (2 tasks per worker) is in flight, so neither tasks nor results pile up;
    - crash isolation: when a worker dies, every task that was in flight is run again alone in a
      fresh process, so only a task that kills its process again gets a `WorkerDied` error;
    - `ordered`: results in the order of `items` (else as they finish);
    - `on_flight(n)`: called whenever the number of items in flight changes (handed to the workers,
      not yet yielded: at most 2 per worker), before the results that lowered it are yielded, and
      with 0 at the end.

    An exception raised by `fn` comes back as the error of its item; the pool goes on.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    workers = max(1, min(workers, len(items)))

    def new_pool() -> ProcessPoolExecutor:
        with _worker_env(threads):
            return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                                       initargs=(threads, os.getpid()))

    def alone(item: T) -> tuple[Optional[R], Optional[BaseException]]:
        with _worker_env(threads), ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=init_worker,
                                                       initargs=(threads, os.getpid())) as one:
            try:
                return one.submit(fn, item).result(), None
            except BrokenProcessPool:
                return None, WorkerDied("the worker process died (killed, out of memory, or a native crash)")
            except Exception as e:
                return None, e

    shown = [0]  # the in-flight count last reported

    def flight(n: int) -> None:
        if on_flight is not None and n != shown[0]:
            shown[0] = n
            on_flight(n)

    pool = new_pool()
    pending: deque = deque()  # (item, future) in submission order
    todo = iter(items)
    try:
        while True:
            while len(pending) < 2 * workers:
                item = next(todo, _END)
                if item is _END:
                    break
                pending.append((item, pool.submit(fn, item)))
            flight(len(pending))
            if not pending:
                return
            if ordered:
                finished = [pending[0]]
                wait([pending[0][1]])
            else:
                done, _ = wait([f for _, f in pending], return_when=FIRST_COMPLETED)
                finished = [(i, f) for i, f in pending if f in done]
            if any(isinstance(f.exception(), BrokenProcessPool) for _, f in finished):
                # a worker died: what finished before is kept, everything else in flight runs alone
                pool.shutdown(wait=False, cancel_futures=True)
                left = len(pending)
                for item, fut in list(pending):
                    if fut.done() and not fut.cancelled() and not isinstance(fut.exception(), BrokenProcessPool):
                        result = (item, fut.result(), None) if fut.exception() is None else (item, None, fut.exception())
                    else:
                        result = (item, *alone(item))
                    left -= 1
                    flight(left)
                    yield result
                pending.clear()
                pool = new_pool()
                continue
            for pair in finished:
                pending.remove(pair)
            flight(len(pending))
            for item, fut in finished:
                err = fut.exception()
                yield (item, None, err) if err is not None else (item, fut.result(), None)
    except BaseException:
        # interrupted (Ctrl-C, SIGTERM, the caller stopped reading): the clips in flight are abandoned,
        # their workers stopped now rather than finishing into the output
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stop_workers(pool) -> None:
    """Kill the worker processes of a ProcessPoolExecutor (its `_processes`: pid -> Process).

    SIGKILL, not SIGTERM: COLMAP installs glog's failure handler for SIGTERM in the workers, and that
    handler was seen to deadlock inside a worker, which then kept the pool (and the build) waiting.
    Their clips are abandoned anyway; nothing of an unfinished clip is kept."""
    for proc in list(getattr(pool, "_processes", {}).values()):
        try:
            proc.kill()
        except Exception:  # pragma: no cover - already gone
            pass


_END = object()


# --------------------------------------------------------------------------- configuration files


class ConfigFileError(ValueError):
    """A configuration (TOML file or override) that cannot be read or is not valid; one line."""


M = TypeVar("M")


def pydantic_one_line(e: "ValidationError", where: str = "") -> str:
    """The first error of a pydantic ValidationError as one line: `where: a.b: message (and N more)`."""
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    prefix = f"{where}: " if where else ""
    return f"{prefix}{loc + ': ' if loc else ''}{first['msg']}{more}"


def read_toml(path: Union[str, Path], error: type[ConfigFileError] = ConfigFileError, missing_hint: str = "") -> dict:
    """The tables of a TOML file; `error` naming the file when it is missing, unreadable or not TOML."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file{' (' + missing_hint + ')' if missing_hint else ''}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid TOML ({e})") from None


def deep_update(base: dict, new: dict) -> dict:
    """`base` with `new` merged in, nested tables merged key by key (a copy; neither is changed)."""
    out = dict(base)
    for k, v in new.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config_file(model: type[M], path: Union[str, Path, None] = None, overrides: Optional[dict] = None,
                     error: type[ConfigFileError] = ConfigFileError, missing_hint: str = "",
                     defaults: Optional[dict] = None) -> M:
    """A pydantic config from a TOML file (optional), `defaults` under it and nested `overrides` over it.

    The one loader of build presets, gate files and training recipes: unknown keys are rejected by
    the models (``extra = "forbid"``), and every error is one line naming the file and the key.
    """
    from pydantic import ValidationError

    data = dict(defaults or {})
    if path is not None:
        data = deep_update(data, read_toml(path, error, missing_hint))
    data = deep_update(data, overrides or {})
    try:
        return model.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as e:
        raise error(pydantic_one_line(e, str(path) if path is not None else "")) from None


# --------------------------------------------------------------------------- signals


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, `docker stop` and Kubernetes send), handled exactly like Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the body runs (in the main thread), SIGTERM raises `Terminated` instead of killing the
    process, so finished work is kept and workers are stopped; exit with 143 (128 + 15) after it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
