"""Where the clips of a build run: the executors of `fwdata build` (`BuildConfig.executor`).

An executor takes the clips still to build and hands each one's `ClipOutcome` to a callback in the
driver (the process that runs `build_dataset`), in the order they finish. Every executor runs the
very same `fwdata.build.pipeline.process_clip` (the same steps, each sample written atomically with
its completion marker by the worker); everything else stays in the driver and is the same whatever
the executor: skipping finished clips, the failure records, `--force` clean-up, progress and
`metadata.json`. So the bytes of a dataset do not depend on the executor, and a build can move
between executors and resume either way.

- `LocalExecutor` (``local``, the default): this process (``workers = 1``) or ``workers`` spawned
  processes on this machine (`fwdata.runtime.run_in_processes`).
- `RayExecutor` (``ray``): one Ray task per clip on a Ray cluster (`ray_address`), with declared
  resources: ``threads`` CPUs, a GPU when the depth model runs on CUDA, optionally memory. A task
  whose worker dies (killed, out of memory, its node lost) is retried by Ray up to
  ``ray_max_retries`` times, then recorded as a failure of that clip (stage ``worker``); a rerun of
  the same command builds it. Workers write into the output folder directly, so on several machines
  it must be on a shared file system, at the same path everywhere.

Same bytes under Ray: importing ``ray`` loads its core library with ``RTLD_GLOBAL``, which puts the
system libstdc++ in the global symbol scope before pycolmap is loaded; pycolmap then binds to it
instead of its own copy, and COLMAP's cameras come out different in the last bits (measured: a
clip's intrinsics differ after ``import ray``, not after other imports); the other order (pycolmap,
then ray, then a clip) was seen to abort with a heap corruption. So no clip runs in a process that
imported Ray: a Ray worker hands its clips to a `CleanProcess`, a Python child that never imports
Ray and is set up exactly like a local worker (`fwdata.runtime.init_worker`), kept for the worker's
next clips (the depth model loads once per process); and the local executor runs its one worker in
a spawned process, not in this one, when this process has imported Ray.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence

from fwdata.runtime import THREAD_ENV_VARS, init_worker, run_in_processes

if TYPE_CHECKING:
    from fwdata.build.clips import ClipPlan
    from fwdata.build.pipeline import BuildConfig, ClipOutcome

#: called in the driver with each clip's outcome, as soon as it is known
OnOutcome = Callable[["ClipOutcome"], None]
#: called in the driver with the number of clips in flight (handed to a worker or a Ray task, not yet
#: finished) whenever it changes; before the outcome of a clip that finished, and 0 at the end
OnFlight = Callable[[int], None]

#: test hook: ``<sample id>@<marker file>``: the worker about to run that clip kills itself (os._exit)
#: if it can create the marker file, i.e. once, on the first attempt (tests/build/test_build_ray.py)
FAULT_KILL_CLIP = "FWDATA_FAULT_KILL_CLIP"

RAY_INSTALL_HINT = "the ray executor needs Ray: pip install -e .[ray]"


class Executor(Protocol):
    """Runs clips somewhere and reports each outcome to the driver."""

    def run(self, todo: Sequence["ClipPlan"], config: "BuildConfig", out: Path, on_outcome: OnOutcome,
            on_flight: Optional[OnFlight] = None) -> None:
        """Run `process_clip(plan, config, out)` for every plan; `on_outcome(outcome)` for each, in the
        driver, in the order they finish; `on_flight(n)` (optional) as the clips in flight change.
        Never raises for one clip's failure."""
        ...


def make_executor(config: "BuildConfig") -> Executor:
    """The executor `config.executor` names."""
    if config.executor == "ray":
        return RayExecutor(address=config.ray_address, max_retries=config.ray_max_retries,
                           num_gpus=config.ray_gpus, memory_gb=config.ray_memory_gb)
    return LocalExecutor(workers=config.workers)


def worker_died(plan: "ClipPlan", why: str) -> "ClipOutcome":
    """The outcome of a clip whose worker process died: a failure of stage ``worker``."""
    from fwdata.build.pipeline import ClipOutcome

    return ClipOutcome(plan.sample_id, plan.source, plan.start_frame, False, stage="worker", reason=why)


# --------------------------------------------------------------------------- local processes


class LocalExecutor:
    """Clips in this process (one worker) or in ``workers`` spawned processes on this machine (0 = one
    per core, at most one per clip). A worker that dies is retried alone once (`run_in_processes`)."""

    def __init__(self, workers: int = 1):
        self.workers = workers

    def run(self, todo: Sequence["ClipPlan"], config: "BuildConfig", out: Path, on_outcome: OnOutcome,
            on_flight: Optional[OnFlight] = None) -> None:
        from fwdata.build.pipeline import process_clip, resolve_workers

        workers = resolve_workers(self.workers, len(todo))
        if workers == 1 and "ray" not in sys.modules:  # see the module's docstring
            for plan in todo:
                if on_flight is not None:
                    on_flight(1)
                o = process_clip(plan, config, out)
                if on_flight is not None:
                    on_flight(0)
                on_outcome(o)
            return
        for plan, o, err in run_in_processes(partial(process_clip, config=config, out=out), todo, workers,
                                             threads=config.threads, on_flight=on_flight):
            if err is not None:  # the worker died (killed, out of memory), also when the clip ran alone
                o = worker_died(plan, f"worker process died ({type(err).__name__}); try fewer --workers")
            on_outcome(o)


# --------------------------------------------------------------------------- Ray


def import_ray():
    """The `ray` module, or ConfigError with the one line that says how to install it."""
    try:
        import ray
    except ImportError:
        from fwdata.build.pipeline import ConfigError

        raise ConfigError(RAY_INSTALL_HINT) from None
    return ray


class CleanProcessDied(RuntimeError):
    """The process running a clip for a Ray worker died (a native crash, killed): Ray retries the task."""


class CleanProcess:
    """A child Python process that runs `process_clip` for this (Ray worker) process and never imports
    Ray (see the module's docstring); it dies with its parent (`init_worker`).

    Protocol: pickles over its stdin / stdout pipes, one ``(plan, config, out)`` in, one outcome
    back; the child's own prints go to stderr. Runs in the driver's working directory when this
    machine has it (sources are recorded as given, so relative paths must resolve the same way).
    """

    def __init__(self, threads: int, cwd: str):
        self.key = (threads, cwd, os.environ.get("CUDA_VISIBLE_DEVICES"))
        self.proc = subprocess.Popen([sys.executable, "-m", "fwdata.build.executors", str(threads), str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=cwd if cwd and os.path.isdir(cwd) else None)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, plan: "ClipPlan", config: "BuildConfig", out: str) -> "ClipOutcome":
        try:
            pickle.dump((plan, config, out), self.proc.stdin)
            self.proc.stdin.flush()
            return pickle.load(self.proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            code = self.proc.wait()
            raise CleanProcessDied(f"the process building the clip died (exit code {code})") from None


_CLEAN: Optional[CleanProcess] = None  # this Ray worker's clip process


def ray_clip_task(plan: "ClipPlan", config: "BuildConfig", out: str, cwd: str) -> "ClipOutcome":
    """One clip in a Ray worker: `process_clip` in this worker's `CleanProcess` (started on its first
    clip, again when it died or the settings changed). Module level, so workers import it by name."""
    global _CLEAN
    _fault_hook(plan.sample_id)
    key = (config.threads, cwd, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if _CLEAN is None or not _CLEAN.alive() or _CLEAN.key != key:
        if _CLEAN is not None and _CLEAN.alive():
            _CLEAN.proc.kill()
        _CLEAN = CleanProcess(config.threads, cwd)
    return _CLEAN.run(plan, config, out)


def _serve(threads: int, parent: int) -> None:
    """The child side of `CleanProcess`: clips from stdin, outcomes to stdout, until stdin closes."""
    init_worker(threads, parent)
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever else writes to stdout (a C library) must not corrupt the pickles
    from fwdata.build.pipeline import process_clip

    requests = sys.stdin.buffer
    while True:
        try:
            plan, config, out = pickle.load(requests)
        except EOFError:
            return
        pickle.dump(process_clip(plan, config, out), results)
        results.flush()


def _fault_hook(sample_id: str) -> None:
    """Tests only (`FAULT_KILL_CLIP`): die like a killed worker, once, when starting clip `sample_id`."""
    spec = os.environ.get(FAULT_KILL_CLIP, "")
    target, _, marker = spec.partition("@")
    if not spec or target != sample_id or not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # killed once already: this is a retry (or a rerun)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    os._exit(137)


class RayExecutor:
    """One Ray task per clip (`ray_clip_task`) on the cluster at `address`.

    - address: ``auto`` (the cluster `ray start` runs on this machine), ``HOST:PORT`` (the head's GCS
      port), ``ray://HOST:PORT`` (Ray Client); None: the cluster in ``RAY_ADDRESS``, else a Ray
      instance started on this machine for this build. When this process is already connected
      (`ray.init` was called), that connection is used as it is.
    - resources per task: ``num_cpus = threads``; ``num_gpus``: `num_gpus`, or (None) 1 when the depth
      model runs on CUDA (``depth.device`` cuda..., or auto on a cluster that has GPUs), else 0;
      ``memory``: `memory_gb` GiB when > 0 (Ray then schedules no more clips on a node than fit).
    - worker processes run on ``threads`` BLAS/OpenMP threads (``OMP_NUM_THREADS`` ... in the task's
      runtime env), as local workers do, so the results are the same bytes.
    - at most 2 tasks per CPU slot of the cluster are in flight, so neither tasks nor outcomes pile
      up in the driver (the count follows the cluster as nodes join or leave); `on_flight` gets the
      number of tasks submitted and not yet finished (running, or queued by Ray for a free slot).
    - Ctrl-C / SIGTERM of the driver cancels the tasks in flight (their unfinished clips leave nothing
      that counts as built).
    """

    def __init__(self, address: Optional[str] = None, max_retries: int = 1, num_gpus: Optional[float] = None,
                 memory_gb: float = 0.0):
        self.address = address
        self.max_retries = max_retries
        self.num_gpus = num_gpus
        self.memory_gb = memory_gb

    def connect(self):
        """Connect to the cluster (or reuse this process's connection); returns (ray, started_here)."""
        from fwdata.build.pipeline import ConfigError

        ray = import_ray()
        if ray.is_initialized():
            return ray, False
        try:
            local = self.address is None and not os.environ.get("RAY_ADDRESS")  # a new instance, started here
            ray.init(address=self.address, include_dashboard=False if local else None, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = self.address or os.environ.get("RAY_ADDRESS") or "a local instance"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ConfigError(f"cannot connect to the Ray cluster at {where}: {first} (start one with "
                              f"`ray start --head`, see docs/BUILD.md)") from None
        return ray, True

    def task_gpus(self, ray, config: "BuildConfig") -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        d = config.depth
        if d.prior_dir is not None or d.device == "cpu":
            return 0.0
        if d.device.startswith("cuda"):
            return 1.0
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0  # auto: cuda where there is one

    def run(self, todo: Sequence["ClipPlan"], config: "BuildConfig", out: Path, on_outcome: OnOutcome,
            on_flight: Optional[OnFlight] = None) -> None:
        if not todo:
            return
        ray, started = self.connect()
        shown = [0]

        def flight(n: int) -> None:  # forwards changes only
            if on_flight is not None and n != shown[0]:
                shown[0] = n
                on_flight(n)

        try:
            self._run(ray, todo, config, out, on_outcome, flight)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, todo: Sequence["ClipPlan"], config: "BuildConfig", out: Path, on_outcome: OnOutcome,
             on_flight: OnFlight) -> None:
        env = {v: str(config.threads) for v in THREAD_ENV_VARS}
        if os.environ.get(FAULT_KILL_CLIP):
            env[FAULT_KILL_CLIP] = os.environ[FAULT_KILL_CLIP]
        options = dict(num_cpus=config.threads, num_gpus=self.task_gpus(ray, config), max_retries=self.max_retries,
                       retry_exceptions=[CleanProcessDied], runtime_env={"env_vars": env})
        if self.memory_gb > 0:
            options["memory"] = int(self.memory_gb * 2**30)
        task = ray.remote(ray_clip_task).options(**options)
        config_ref = ray.put(config)
        out_s, cwd = str(Path(out).absolute()), os.getcwd()

        def window() -> int:
            cpus = ray.cluster_resources().get("CPU", 1)
            return max(2, 2 * int(cpus // max(1, config.threads)))

        pending: dict = {}  # ObjectRef -> ClipPlan
        queue = list(todo)[::-1]  # popped from the end: submitted in input order
        try:
            while queue or pending:
                limit = window()
                while queue and len(pending) < limit:
                    plan = queue.pop()
                    pending[task.remote(plan, config_ref, out_s, cwd)] = plan
                on_flight(len(pending))
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    plan = pending.pop(ref)
                    outcome = self._outcome(ray, ref, plan)
                    on_flight(len(pending))
                    on_outcome(outcome)
        except BaseException:
            for ref in pending:  # interrupted: nothing goes on writing into the dataset
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # pragma: no cover - already finished or gone
                    pass
            raise

    def _outcome(self, ray, ref, plan: "ClipPlan") -> "ClipOutcome":
        """The clip's outcome, or a ``worker`` failure when its task could not finish."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the clip's process died on every attempt, or a bug
            cause = e.cause if getattr(e, "cause", None) is not None else e
            first = (str(cause).strip().splitlines() or ["no message"])[0][:200]
            return worker_died(plan, f"Ray task failed ({type(cause).__name__}: {first}); run the same command "
                                     f"again to retry it")
        except ray.exceptions.RayError as e:  # the worker or its node died, after max_retries retries
            tries = self.max_retries + 1
            return worker_died(plan, f"Ray worker died ({type(e).__name__}) on each of {tries} "
                                     f"attempt{'s' if tries > 1 else ''}; run the same command again to retry it")


if __name__ == "__main__":  # a CleanProcess: python -m fwdata.build.executors THREADS PARENT_PID
    _serve(int(sys.argv[1]), int(sys.argv[2]))
