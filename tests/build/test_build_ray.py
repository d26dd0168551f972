"""`fwdata build --executor ray`: the same dataset as the local executor, byte for byte, on a Ray
instance started by a driver process (`ray.init(num_cpus=2)`), on a two-node cluster started by
`ray start` on loopback, and when a clip's worker is killed (retried by Ray, or recorded and
finished by a rerun).

Inputs: two of the bundled example renders (one clip each, 9 frames at 96x160, known intrinsics so
SfM runs once) and a text file named .mp4 (a failure recorded at planning); depth from the
randomly initialised `random-tiny` model, so torch really runs in the Ray workers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_same_files, dataset_files

from fwdata.build.clips import plan_video
from fwdata.build.executors import FAULT_KILL_CLIP
from fwdata.build.pipeline import build_dataset, load_config
from fwdata.dataset.contract import load_metadata

# This process never imports Ray: COLMAP gives other cameras (or crashes) in a process that did
# (fwdata.build.executors), and later tests run clips here. The Ray drivers are subprocesses.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray: pip install -e .[ray]")

REPO = Path(__file__).resolve().parents[2]
VIDEOS = [REPO / "examples" / "videos" / f"{k}.mp4" for k in ("forward", "pan")]
K = "290.9845356715714,290.9845356715714,168.0,96.0"  # the renders' camera (examples/ground_truth)
OPTIONS = {"clips": {"num_frames": 9, "height": 96, "width": 160, "stride": 2, "max_clips_per_video": 1},
           "depth": {"model": "random-tiny"}, "intrinsics": [float(x) for x in K.split(",")],
           "write_ply": True}
CLI_OPTIONS = ["--frames", "9", "--height", "96", "--width", "160", "--stride", "2", "--max-clips", "1",
               "--depth-model", "random-tiny", "--intrinsics", K]
VOLATILE = ("created", "command", "runs")  # provenance fields that describe the runs, not the data

#: a driver process: a Ray instance with 2 CPUs (`ray.init`), then builds one after another, each
#: with its own fault hook (or none) and the CLI's progress bar (its in-flight reports and status
#: lines are kept); a build may be copied aside when it ends
DRIVER = f"""
import io, json, os, shutil, sys
import ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
from rich.console import Console
from fwdata.build.cli import RichBuildProgress
from fwdata.build.pipeline import build_dataset, load_config

class Recording(RichBuildProgress):
    def __init__(self):
        super().__init__(Console(file=io.StringIO(), width=200))
        self.flights, self.lines = [], []
    def in_flight(self, n):
        super().in_flight(n)
        self.flights.append(n)
    def clip_done(self, outcome):
        super().clip_done(outcome)
        self.lines.append(self._status())

results = []
for b in json.loads(sys.argv[1]):
    os.environ.pop({FAULT_KILL_CLIP!r}, None)
    if b.get("fault"):
        os.environ[{FAULT_KILL_CLIP!r}] = b["fault"]
    p = Recording()
    s = build_dataset(b["inputs"], b["out"], load_config(None, b["options"]), progress=p)
    results.append(dict(built=s.built, skipped=s.skipped, failures=[f.model_dump(mode="json") for f in s.failures],
                        flights=p.flights, lines=p.lines))
    if b.get("copy_to"):
        shutil.copytree(b["out"], b["copy_to"])
ray.shutdown()
print("RESULTS", json.dumps(results))
"""



def _comparable(files: dict[str, bytes], failure_runs: bool = True) -> dict[str, bytes]:
    """Every file as it is; metadata.json without the dataset name (the folder's) and the run fields."""
    out = dict(files)
    meta = json.loads(out.pop("metadata.json"))
    meta.pop("name")
    for key in VOLATILE:
        meta["provenance"].pop(key)
    if not failure_runs:  # a rerun records the failures it saw itself under its own run number
        for f in meta["failures"]:
            f.pop("run")
    out["metadata.json"] = json.dumps(meta, sort_keys=True).encode()
    return out



@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """The two example renders and a text file named .mp4 that must fail cleanly."""
    bad = tmp_path_factory.mktemp("bad") / "notes.mp4"
    bad.write_text("not a video\n")
    return [str(v) for v in VIDEOS] + [str(bad)]


@pytest.fixture(scope="module")
def local_build(inputs, tmp_path_factory) -> Path:
    """The reference: the local executor (two worker processes), the same inputs and options."""
    out = tmp_path_factory.mktemp("local") / "ds"
    summary = build_dataset(inputs, out, load_config(None, {**OPTIONS, "workers": 2}))
    assert summary.built == 2 and len(summary.failures) == 1, summary.failures
    return out


def _forward_id() -> str:
    return plan_video(VIDEOS[0], load_config(None, OPTIONS).clips).clips[0].sample_id


@pytest.fixture(scope="module")
def ray_builds(inputs, tmp_path_factory) -> dict:
    """The builds on a `ray.init(num_cpus=2)` instance, in one driver process:

    - ray: the inputs, uninterrupted;
    - retry: the forward clip, its worker killed on the first attempt, `ray_max_retries = 1`;
    - killed: the inputs, the forward clip's worker killed, `ray_max_retries = 0` (copied aside);
    - rerun: the same command again into the same folder.
    """
    root = tmp_path_factory.mktemp("ray")
    ray_opts = {**OPTIONS, "executor": "ray"}
    fid = _forward_id()
    builds = [
        {"name": "ray", "inputs": inputs, "out": str(root / "ray"), "options": ray_opts},
        {"name": "retry", "inputs": [str(VIDEOS[0])], "out": str(root / "retry"),
         "options": {**ray_opts, "ray_max_retries": 1}, "fault": f"{fid}@{root / 'retry.killed'}"},
        {"name": "killed", "inputs": inputs, "out": str(root / "kill"), "copy_to": str(root / "after_kill"),
         "options": {**ray_opts, "ray_max_retries": 0}, "fault": f"{fid}@{root / 'kill.killed'}"},
        {"name": "rerun", "inputs": inputs, "out": str(root / "kill"),
         "options": {**ray_opts, "ray_max_retries": 0}, "fault": f"{fid}@{root / 'kill.killed'}"},
    ]
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(builds)], capture_output=True, text=True,
                       env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(r.stdout.split("RESULTS", 1)[1])
    return {"root": root, **{b["name"]: res for b, res in zip(builds, results)}}


def test_ray_builds_the_same_bytes_as_the_local_executor(inputs, local_build, ray_builds):
    res, out = ray_builds["ray"], ray_builds["root"] / "ray"
    assert (res["built"], res["skipped"], len(res["failures"])) == (2, 0, 1)
    assert res["failures"][0]["source"].endswith("notes.mp4"), "one bad video does not stop the build"
    assert_same_files(_comparable(dataset_files(local_build)), _comparable(dataset_files(out)), "local vs ray")
    options = json.loads((out / "metadata.json").read_text())["provenance"]["options"]
    assert "executor" not in options and "ray_address" not in options, "where clips ran is not part of the data"
    # progress from the driver: both clips submitted at once (window 4 on 2 CPUs), then one by one done
    assert res["flights"] == [2, 1, 0], res["flights"]
    assert "[cyan]1 in flight[/]" in res["lines"][0] and res["lines"][-1].startswith("[green]2 ok[/] [cyan]0 in flight[/]")
    # resume either way: the local executor finds every clip of the Ray build finished
    again = build_dataset(inputs, out, load_config(None, OPTIONS))
    assert (again.built, again.skipped) == (0, 2)


def test_a_killed_task_is_retried_by_ray(local_build, ray_builds):
    """The worker running the clip dies (os._exit) on its first attempt; Ray runs it again."""
    root = ray_builds["root"]
    assert (root / "retry.killed").is_file(), "the worker was really killed"
    assert ray_builds["retry"]["built"] == 1 and not ray_builds["retry"]["failures"]
    ref, got = dataset_files(local_build), dataset_files(root / "retry")
    sample = [name for name in got if _forward_id() in name]
    assert len(sample) == 7, sample  # video, depth, points npz + ply, camera txt + json, marker
    assert_same_files({n: ref[n] for n in sample}, {n: got[n] for n in sample}, "retried clip vs local")


def test_a_killed_task_without_retries_is_recorded_and_the_rerun_finishes(local_build, ray_builds):
    root, first, second = ray_builds["root"], ray_builds["killed"], ray_builds["rerun"]
    assert first["built"] == 1, "the other clip was built"
    worker = [f for f in first["failures"] if f["stage"] == "worker"]
    assert len(worker) == 1 and worker[0]["source"] == str(VIDEOS[0]) and worker[0]["clip_start"] == 0
    assert "run the same command again" in worker[0]["reason"]
    after_kill = root / "after_kill"
    assert not any(_forward_id() in p.name for p in after_kill.rglob("*")), "nothing of the killed clip is kept"
    assert sorted(f.stage for f in load_metadata(after_kill).failures) == sorted(f["stage"] for f in first["failures"])

    assert (second["built"], second["skipped"]) == (1, 1), "the same command again builds the killed clip"
    assert [f.stage for f in load_metadata(root / "kill").failures] == [f.stage for f in load_metadata(local_build).failures]
    assert_same_files(_comparable(dataset_files(local_build), failure_runs=False),
                 _comparable(dataset_files(root / "kill"), failure_runs=False), "killed + rerun vs uninterrupted")


# --------------------------------------------------------------------------- a cluster started by `ray start`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    """A head and a second worker node, each 1 CPU, started by `ray start --block` on loopback, in a
    private temp dir; stopped by terminating the two `ray start` processes (they stop their nodes)."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    temp = Path("/tmp") / f"fwray-{os.getpid()}-{port}"  # short: Ray's socket paths must fit in 107 bytes
    common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    logs = [open(tmp_path / "head.log", "w"), open(tmp_path / "worker.log", "w")]
    procs = [subprocess.Popen([ray_bin, "start", "--head", "--port", str(port), "--temp-dir", str(temp),
                               "--include-dashboard", "false", *common], env=env, stdout=logs[0],
                              stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        address = f"127.0.0.1:{port}"
        _wait_for(lambda: _alive_nodes(ray_bin, address, env) >= 1, 90, "the head node", tmp_path / "head.log")
        procs.append(subprocess.Popen([ray_bin, "start", "--address", address, *common], env=env, stdout=logs[1],
                                      stderr=subprocess.STDOUT, start_new_session=True))
        _wait_for(lambda: _alive_nodes(ray_bin, address, env) >= 2, 90, "the worker node", tmp_path / "worker.log")
        yield address, env
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in logs:
            f.close()
        shutil.rmtree(temp, ignore_errors=True)


def _alive_nodes(ray_bin: str, address: str, env: dict) -> int:
    r = subprocess.run([ray_bin, "status", "--address", address], capture_output=True, text=True, env=env)
    if r.returncode != 0 or "Active:" not in r.stdout:
        return 0
    active = r.stdout.split("Active:")[1].split("Pending:")[0]
    return active.count("node_")


def _wait_for(ok, seconds: float, what: str, log: Path) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if ok():
            return
        time.sleep(1)
    pytest.fail(f"{what} did not start: {log.read_text()[-2000:]}")


def test_a_two_node_cluster_started_by_ray_start_builds_the_same_bytes(inputs, local_build, ray_cluster, tmp_path):
    address, env = ray_cluster
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-m", "fwdata.cli", "build", *inputs, "--out", str(out), "-q",
                        "--executor", "ray", "--ray-address", address, *CLI_OPTIONS],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1, r.stdout + r.stderr  # 1: the text file failed, as in the local build
    assert "built 2" in r.stdout and "failed 1" in r.stdout, r.stdout
    assert_same_files(_comparable(dataset_files(local_build)), _comparable(dataset_files(out)), "local vs two-node ray cluster")


def test_without_ray_the_error_says_how_to_install_it(tmp_path):
    """`ray` not importable: one line naming the extra to install, exit code 2, nothing built."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "from fwdata.cli import app\n"
            "sys.argv = ['fwdata', 'build', sys.argv[1], '--out', sys.argv[2], '--executor', 'ray', '-q',\n"
            "            '--depth-model', 'random-tiny']\n"
            "app()\n")
    r = subprocess.run([sys.executable, "-c", code, str(VIDEOS[0]), str(tmp_path / "ds")], capture_output=True,
                       text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pip install -e .[ray]" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ds" / "videos").exists()
