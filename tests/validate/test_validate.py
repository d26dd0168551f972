"""fwdata validate: a clean synthetic dataset passes; each kind of damage is caught by its check;
validation never changes a byte of the dataset; the CLI's formats and exit codes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from fwdata.dataset import camera
from fwdata.cli import app
from fwdata.dataset.contract import CameraFile, FrameCamera, format_camera_txt, sample_paths
from fwdata.validate.gates import GateConfig, MetricRange, load_gates
from fwdata.dataset.store import npz_bytes, point_maps
from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset
from fwdata.dataset.ply import read_ply_xyz
from fwdata.validate import REGISTRY, ValidateOptions, validate_dataset

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("validate") / "clean"
    write_synthetic_dataset(out, SynthOptions(num_scenes=3, num_frames=17, height=96, width=160,
                                              path_kinds=["orbit", "forward", "pan"]))
    return out


@pytest.fixture
def ds(clean_dataset, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(clean_dataset, dst, symlinks=True)
    return dst


def sample_ids(root: Path) -> list[str]:
    return [s["id"] for s in json.loads((root / "metadata.json").read_text())["samples"]]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file (and symlink target) under root -> sha256 of its bytes; also catches new files."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def run(root: Path, workers: int = 0, config: GateConfig | None = None, **kw):
    before = tree_digest(root)
    report = validate_dataset(ValidateOptions(dataset=root, workers=workers, **kw), config=config)
    assert tree_digest(root) == before, "validation changed the dataset"
    return report


# --------------------------------------------------------------------------- damage helpers


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.write_bytes(npz_bytes(arrays))


def edit_npz(root: Path, sid: str, kind: str, fn: Callable[[dict], None]) -> None:
    p = root / getattr(sample_paths(sid), kind)
    arrays = load_npz(p)
    fn(arrays)
    save_npz(p, arrays)


def edit_cameras(root: Path, sid: str, fn: Callable[[dict], None], txt: bool = True) -> None:
    """Apply fn to the raw camera json; rewrite the txt from it too (so json and txt stay in agreement)."""
    paths = sample_paths(sid)
    raw = json.loads((root / paths.camera_json).read_text())
    fn(raw)
    (root / paths.camera_json).write_text(json.dumps(raw))
    if txt:
        cams = CameraFile.model_construct(**{k: v for k, v in raw.items() if k != "frames"},
                                          frames=[FrameCamera.model_construct(**f) for f in raw["frames"]])
        (root / paths.camera_txt).write_text(format_camera_txt(cams))


def edit_metadata(root: Path, fn: Callable[[dict], None]) -> None:
    raw = json.loads((root / "metadata.json").read_text())
    fn(raw)
    (root / "metadata.json").write_text(json.dumps(raw, indent=1))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garble(path: Path, start: float = 0.4, n: int = 3000) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * start)
    for k in range(i, min(i + n, len(data))):
        data[k] = (data[k] * 7 + 13) % 256
    path.write_bytes(bytes(data))


def _w2c(raw, i):
    return np.asarray(raw["frames"][i]["w2c"], dtype=np.float64)


def flip_rotation(raw):  # a reflection: det -1
    m = _w2c(raw, 5)
    m[:3, 0] *= -1
    raw["frames"][5]["w2c"] = m.tolist()


def pp_outside(raw):
    for f in raw["frames"]:
        f["cx"] = f["cx"] + 1.5 * raw["width"]


def swap_cameras(raw):
    a, b = raw["frames"][4], raw["frames"][9]
    for k in ("fx", "fy", "cx", "cy", "w2c"):
        a[k], b[k] = b[k], a[k]


def move_world(raw):  # every camera shifted: frame 0 is no longer the identity
    shift = camera.make_pose(np.eye(3), [0.3, 0.0, 0.1])
    for i, f in enumerate(raw["frames"]):
        f["w2c"] = (_w2c(raw, i) @ shift).tolist()


def source_not_increasing(raw):
    raw["frames"][3]["source_frame"], raw["frames"][4]["source_frame"] = 4, 3


def drop_camera_frame(raw):
    raw["frames"] = raw["frames"][:-1]


def random_cameras_consistent_points(root: Path, sid: str) -> None:
    """Cameras replaced by random ones and the point maps remade from them: self-consistent, but the
    depth no longer agrees between frames."""
    rng = np.random.default_rng(3)

    def fn(raw):
        for i, f in enumerate(raw["frames"][1:], start=1):
            R = camera.quaternion_xyzw_to_rotation(rng.normal(size=4))
            f["w2c"] = camera.make_pose(R, rng.normal(size=3)).tolist()

    edit_cameras(root, sid, fn)
    paths = sample_paths(sid)
    cams = CameraFile.model_validate_json((root / paths.camera_json).read_bytes())
    d = load_npz(root / paths.depth)
    pts, valid = point_maps(d["depth"], d["valid"], cams)
    save_npz(root / paths.points, {"points": pts.astype(np.float16), "valid": valid})


def edit_txt_only(root: Path, sid: str) -> None:
    p = root / sample_paths(sid).camera_txt
    lines = p.read_text().splitlines()
    parts = lines[6].split()
    parts[10] = repr(float(parts[10]) + 0.05)  # t0 of frame 6
    lines[6] = " ".join(parts)
    p.write_text("\n".join(lines) + "\n")


def scale_ply(root: Path, sid: str) -> None:
    p = root / sample_paths(sid).points_ply
    data = p.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    xyz = read_ply_xyz(p)
    n = len(xyz)
    dt = np.dtype([("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    v = np.frombuffer(data[end:], dtype=dt, count=n).copy()
    for c in "xyz":
        v[c] *= 1.5
    p.write_bytes(data[:end] + v.tobytes() + data[end + n * dt.itemsize:])


def duplicate_sample(root: Path) -> None:
    """A second record of the first clip under another id (same source, same frames), files copied."""
    raw = json.loads((root / "metadata.json").read_text())
    s = json.loads(json.dumps(raw["samples"][0]))
    old, new = s["id"], s["id"][:-8] + "deadbeef"
    s["id"] = new
    for k, rel in s["paths"].items():
        if rel:
            s["paths"][k] = rel.replace(old, new)
            shutil.copyfile(root / rel, root / s["paths"][k])
    raw["samples"].append(s)
    raw["splits"]["train"].append(new)
    raw["statistics"]["num_samples"] += 1
    raw["statistics"]["num_ok"] += 1
    raw["statistics"]["total_frames"] += s["num_frames"]
    raw["statistics"]["duration_s"] = round(raw["statistics"]["duration_s"] + s["num_frames"] / s["fps"], 3)
    (root / "metadata.json").write_text(json.dumps(raw, indent=1))


def pickled_npz(root: Path, sid: str) -> None:
    p = root / sample_paths(sid).depth
    arrays = load_npz(p)
    import io

    buf = io.BytesIO()
    np.savez(buf, depth=arrays["depth"], valid=np.array([{"a": 1}], dtype=object))
    p.write_bytes(buf.getvalue())


def _set_nan(a):
    a["depth"][2, 10:20, 10:20] = np.nan


def _set_negative(a):
    a["depth"][7, 40, 40] = -1.0


def _drop_frame(a):
    a["valid"] = a["valid"][:-1]


def _to_float64(a):
    a["depth"] = a["depth"].astype(np.float64)


def _to_float32(a):
    a["points"] = a["points"].astype(np.float32)


def _scale_points(a):
    a["points"] = (a["points"].astype(np.float32) * 1.01).astype(np.float16)


def _scale_depth(a):
    a["depth"] = a["depth"] * np.float32(1.02)


def _inf_points(a):
    a["points"][3, 5, 5] = np.float16(np.inf)


def _points_valid_where_depth_not(root: Path, sid: str) -> None:
    def d(a):
        a["valid"][1, :8, :8] = False
        a["depth"][1, :8, :8] = 0.0
    edit_npz(root, sid, "depth", d)


def _invalid_not_zero(root: Path, sid: str) -> None:
    def d(a):
        a["valid"][1, :8, :8] = False  # depth values kept: should be 0 where invalid
    edit_npz(root, sid, "depth", d)
    edit_npz(root, sid, "points", d)


def _extra_key(a):
    a["confidence"] = np.ones(3, dtype=np.float32)


def _escape(raw):
    raw["samples"][1]["paths"]["depth"] = "../outside/depth.npz"


def _duplicate_id(raw):
    raw["samples"][2]["id"] = raw["samples"][1]["id"]


def _bad_T(raw):
    raw["samples"][1]["num_frames"] = 16


def _unknown_split_id(raw):
    raw["splits"]["val"] = ["nope-000000-00000000"]


def _random_init(raw):
    raw["provenance"]["models"][0]["random_init"] = True


def _wrong_fps(raw):
    raw["samples"][1]["fps"] = 24.0


def _lying_quality(raw):
    raw["samples"][1]["quality"]["multiview_consistency"] = 0.2


def _symlink_escape(root: Path, sid: str) -> None:
    p = root / sample_paths(sid).camera_txt
    outside = root.parent / "outside.txt"
    shutil.copyfile(p, outside)
    p.unlink()
    p.symlink_to(outside)


def set_video_hashes(root: Path) -> None:
    """Record every video's real sha256 in metadata.json (as the build does)."""
    def fn(raw):
        for s in raw["samples"]:
            s["video_sha256"] = hashlib.sha256((root / s["paths"]["video"]).read_bytes()).hexdigest()
    edit_metadata(root, fn)


def swap_videos(root: Path, sid: str, other: str | None = None) -> None:
    """Exchange the mp4s of `sid` and another sample (the last), after recording their hashes."""
    set_video_hashes(root)
    a, b = root / sample_paths(sid).video, root / sample_paths(other or sample_ids(root)[-1]).video
    tmp = a.with_name("swap.tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def folder_out_of_root(root: Path, name: str) -> None:
    """Move one of the dataset's own folders out of the root and leave a symlink to it."""
    outside = root.parent / f"outside-{name}"
    shutil.move(root / name, outside)
    (root / name).symlink_to(outside, target_is_directory=True)


def _nul_path(raw):
    raw["samples"][1]["paths"]["camera_txt"] = raw["samples"][1]["paths"]["camera_txt"][:-4] + "\x00.txt"


def _long_path(raw):
    raw["samples"][1]["paths"]["depth"] = "depth/" + "d" * 5000 + ".npz"


DEEP_JSON = "[" * 200_000 + "]" * 200_000


# (name, damage(root, sid), expected check id). sid is the second sample.
DAMAGES: list[tuple[str, Callable[[Path, str], None], str]] = [
    ("truncated depth npz", lambda r, s: truncate(r / sample_paths(s).depth), "integrity.depth_file"),
    ("truncated points npz", lambda r, s: truncate(r / sample_paths(s).points, 0.9), "integrity.points_file"),
    ("garbled depth npz", lambda r, s: garble(r / sample_paths(s).depth), "integrity.depth_file"),
    ("pickled object in npz", pickled_npz, "integrity.depth_file"),
    ("extra array in points npz", lambda r, s: edit_npz(r, s, "points", _extra_key), "integrity.points_file"),
    ("rotation flipped (det -1)", lambda r, s: edit_cameras(r, s, flip_rotation), "integrity.rotation"),
    ("principal point outside image", lambda r, s: edit_cameras(r, s, pp_outside), "integrity.intrinsics"),
    ("NaN in valid depth", lambda r, s: edit_npz(r, s, "depth", _set_nan), "integrity.depth_finite"),
    ("negative valid depth", lambda r, s: edit_npz(r, s, "depth", _set_negative), "integrity.depth_positive"),
    ("inf in valid points", lambda r, s: edit_npz(r, s, "points", _inf_points), "integrity.points_finite"),
    ("two frames' cameras swapped (json and txt)", lambda r, s: edit_cameras(r, s, swap_cameras),
     "cross.points_match_depth"),
    ("frame dropped from one array", lambda r, s: edit_npz(r, s, "depth", _drop_frame), "integrity.depth_shape"),
    ("point maps scaled only", lambda r, s: edit_npz(r, s, "points", _scale_points), "cross.points_match_depth"),
    ("depth scaled only", lambda r, s: edit_npz(r, s, "depth", _scale_depth), "cross.points_match_depth"),
    ("path escape in metadata", lambda r, s: edit_metadata(r, _escape), "schema.path_escape"),
    ("symlink leaving the root", _symlink_escape, "schema.path_escape"),
    ("duplicate ids", lambda r, s: edit_metadata(r, _duplicate_id), "schema.duplicate_ids"),
    ("depth stored as float64", lambda r, s: edit_npz(r, s, "depth", _to_float64), "integrity.depth_dtype"),
    ("points stored as float32", lambda r, s: edit_npz(r, s, "points", _to_float32), "integrity.points_dtype"),
    ("missing camera txt", lambda r, s: (r / sample_paths(s).camera_txt).unlink(), "schema.missing_file"),
    ("orphan file", lambda r, s: (r / "depth" / "stray.npz").write_bytes(b"x"), "schema.orphan_file"),
    ("left-over temporary file", lambda r, s: (r / "videos" / f".{s}.tmp-123.mp4").write_bytes(b"x"),
     "schema.orphan_file"),
    ("corrupt mp4", lambda r, s: garble(r / sample_paths(s).video), "integrity.video_decode"),
    ("truncated mp4", lambda r, s: truncate(r / sample_paths(s).video, 0.7), "integrity.video_decode"),
    ("camera txt disagrees with json", edit_txt_only, "cross.camera_txt_json"),
    ("garbage camera txt", lambda r, s: (r / sample_paths(s).camera_txt).write_bytes(b"\xff\xfe garbage\n"),
     "integrity.camera_txt"),
    ("frame 0 not identity", lambda r, s: edit_cameras(r, s, move_world), "integrity.world_frame"),
    ("source_frame not increasing", lambda r, s: edit_cameras(r, s, source_not_increasing),
     "integrity.source_frame_order"),
    ("camera json not JSON", lambda r, s: truncate(r / sample_paths(s).camera_json), "integrity.camera_json"),
    ("camera json one frame short", lambda r, s: edit_cameras(r, s, drop_camera_frame), "integrity.camera_count"),
    ("truncated ply", lambda r, s: truncate(r / sample_paths(s).points_ply), "integrity.ply_file"),
    ("ply not where the point maps are", scale_ply, "cross.ply_matches_points"),
    ("video fps differs from metadata", lambda r, s: edit_metadata(r, _wrong_fps), "integrity.video_fps"),
    ("points valid where depth is not", _points_valid_where_depth_not, "cross.valid_masks"),
    ("non-zero values where invalid", _invalid_not_zero, "integrity.invalid_zero"),
    ("T not 4k+1 in a record", lambda r, s: edit_metadata(r, _bad_T), "schema.sample_record"),
    ("split lists an unknown id", lambda r, s: edit_metadata(r, _unknown_split_id), "schema.splits"),
    ("random-init depth model", lambda r, s: edit_metadata(r, _random_init), "gate.random_init_model"),
    ("duplicate clip", lambda r, s: duplicate_sample(r), "gate.duplicate_clips"),
    ("recorded quality disagrees", lambda r, s: edit_metadata(r, _lying_quality), "cross.recorded_quality"),
    ("random cameras, self-consistent points", random_cameras_consistent_points, "cross.multiview_consistency"),
    ("two samples' videos swapped", swap_videos, "cross.video_matches_record"),
    (".fwdata symlinked out of the root", lambda r, s: folder_out_of_root(r, ".fwdata"), "schema.path_escape"),
    ("NUL byte in a record path", lambda r, s: edit_metadata(r, _nul_path), "schema.path_escape"),
    ("5,000-character record path", lambda r, s: edit_metadata(r, _long_path), "schema.path_escape"),
    ("camera json nested 200,000 deep", lambda r, s: (r / sample_paths(s).camera_json).write_text(DEEP_JSON),
     "integrity.camera_json"),
]


# --------------------------------------------------------------------------- tests


def test_clean_dataset_passes(clean_dataset):
    report = run(clean_dataset)
    assert report.exit_code == 0, [f.message for f in report.findings]
    assert report.findings == []
    assert report.summary.samples_passed == 3
    outcomes = {c.id: c.outcome for c in report.checks}
    # every check that applies to this dataset ran and passed
    for cid in ("schema.path_escape", "integrity.video_decode", "integrity.depth_dtype", "cross.points_match_depth",
                "cross.multiview_consistency", "cross.ply_matches_points", "cross.camera_txt_json",
                "integrity.rotation", "gate.pass_fraction"):
        assert outcomes[cid] == "passed", cid
    m = report.samples[0].metrics
    assert m["multiview_consistency"] > 0.95 and m["valid_depth_fraction"] == 1.0
    assert m["fov_w_deg"] == pytest.approx(60.0)


@pytest.mark.parametrize("name,damage,expected", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_damage_is_caught(ds, name, damage, expected):
    sid = sample_ids(ds)[1]
    damage(ds, sid)
    report = run(ds)
    checks = {f.check for f in report.findings}
    assert expected in checks, f"{name}: expected {expected}, got {sorted(checks)}"
    assert "internal.check_crashed" not in checks
    hit = next(f for f in report.findings if f.check == expected)
    assert hit.message
    if REGISTRY[expected].scope == "sample":
        assert hit.sample == sid and hit.file, hit
    if REGISTRY[expected].severity.value == "error":
        assert report.exit_code == 1
    # the other samples are not blamed for this sample's damage (dataset-level findings aside)
    blamed = {f.sample for f in report.findings if f.sample and REGISTRY[f.check].scope == "sample"}
    assert blamed <= {sid, sample_ids(ds)[-1]}, blamed


def test_unreadable_dataset_exit_2(ds):
    (ds / "metadata.json").write_text("{ not json")
    report = run(ds)
    assert report.exit_code == 2
    assert [f.check for f in report.findings] == ["schema.metadata_json"]
    edit = {"schema_version": "9.9"}
    (ds / "metadata.json").write_text(json.dumps(edit))
    report = run(ds)
    assert report.exit_code == 2 and report.findings[0].check == "schema.version"


def test_sample_gates_and_pass_fraction(clean_dataset):
    scores = sorted(s.metrics["multiview_consistency"] for s in run(clean_dataset).samples)
    cfg = GateConfig(sample={"multiview_consistency": MetricRange(min=(scores[1] + scores[2]) / 2)})
    report = run(clean_dataset, config=cfg)  # only the best clip passes
    gated = [f for f in report.findings if f.check == "gate.multiview_consistency"]
    assert len(gated) == 2 and all(f.severity.value == "warning" for f in gated)
    assert report.summary.samples_passed == 1
    assert "gate.pass_fraction" in {f.check for f in report.findings} and report.exit_code == 1
    cfg.dataset.min_pass_fraction = 0.3
    assert run(clean_dataset, config=cfg).exit_code == 0
    # required metric that the synthetic build does not record
    cfg = GateConfig(sample={"reprojection_error_px": MetricRange(max=1.0, required=True)})
    cfg.dataset.min_pass_fraction = 0.0
    cfg.dataset.min_samples = 0
    cfg.dataset.min_split_sizes = {}
    report = run(clean_dataset, config=cfg)
    assert {f.check for f in report.findings} == {"gate.reprojection_error_px"} and report.exit_code == 0


def test_severity_override_and_off(ds):
    (ds / "depth" / "stray.npz").write_bytes(b"x")
    assert run(ds).exit_code == 0  # orphan is a warning by default
    assert run(ds, config=GateConfig(severity={"schema.orphan_file": "error"})).exit_code == 1
    report = run(ds, config=GateConfig(severity={"schema.orphan_file": "off"}))
    assert report.findings == [] and {c.id: c.outcome for c in report.checks}["schema.orphan_file"] == "off"


def test_workers_match_serial(ds):
    sids = sample_ids(ds)
    edit_npz(ds, sids[0], "points", _scale_points)
    truncate(ds / sample_paths(sids[2]).video, 0.5)
    serial = run(ds)
    parallel = run(ds, workers=2)
    key = lambda r: [(f.check, f.sample, f.message) for f in r.findings]  # noqa: E731
    assert key(serial) == key(parallel) and serial.exit_code == parallel.exit_code == 1


def test_worker_crash_is_a_finding(clean_dataset, monkeypatch):
    from fwdata.validate import CRASH_TEST_ENV

    sid = sample_ids(clean_dataset)[1]
    monkeypatch.setenv(CRASH_TEST_ENV, sid)
    report = run(clean_dataset, workers=1)
    assert [(f.check, f.sample) for f in report.findings] == [("internal.worker_crashed", sid)]
    assert report.summary.samples_checked == 3 and report.exit_code == 1


def test_sample_subset(ds):
    sids = sample_ids(ds)
    edit_npz(ds, sids[0], "depth", _set_nan)
    report = run(ds, samples=[sids[1]])
    assert report.exit_code == 0 and report.summary.samples_checked == 1
    report = run(ds, samples=[sids[0]])
    assert {f.check for f in report.findings} == {"integrity.depth_finite"}


def test_gate_files():
    assert load_gates(REPO / "fwdata/presets/gates/default.toml") == GateConfig()
    strict = load_gates(REPO / "fwdata/presets/gates/strict.toml")
    assert strict.sample["registered_ratio"].min == 0.995 and strict.dataset.min_pass_fraction == 1.0
    assert set(strict.severity) <= set(REGISTRY)


def test_docs_list_every_check():
    text = (REPO / "docs/VALIDATE.md").read_text()
    missing = [cid for cid in REGISTRY if f"`{cid}`" not in text]
    assert not missing, f"docs/VALIDATE.md does not list {missing}"


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_metadata_json_symlinked_out_of_the_root_is_never_opened(ds, tmp_path):
    meta = ds / "metadata.json"
    outside = tmp_path / "outside.json"
    outside.write_text(meta.read_text().replace('"synth', '"OUTSIDE-synth'))  # a valid metadata.json
    meta.unlink()
    meta.symlink_to(outside)
    report = run(ds)
    assert report.exit_code == 2
    assert [(f.check, f.file) for f in report.findings] == [("schema.path_escape", "metadata.json")]
    assert report.summary.samples_total == 0 and "OUTSIDE" not in report.model_dump_json()
    fifo = tmp_path / "fifo"  # opening it for reading would block: it must not even be opened
    os.mkfifo(fifo)
    meta.unlink()
    meta.symlink_to(fifo)
    with deadline(30):
        report = run(ds)
    assert report.exit_code == 2
    assert [(f.check, f.file) for f in report.findings] == [("schema.path_escape", "metadata.json")]
    meta.unlink()
    os.mkfifo(meta)  # inside the root, but not a regular file: refused without blocking
    with deadline(30):
        report = run(ds)
    assert report.exit_code == 2 and [f.check for f in report.findings] == ["schema.metadata_json"]
    assert "not a regular file" in report.findings[0].message


@pytest.mark.parametrize("folder", ["videos", "depth", "points", "camera_params", ".fwdata"])
def test_dataset_folders_symlinked_out_of_the_root(ds, folder):
    folder_out_of_root(ds, folder)
    report = run(ds)
    assert report.exit_code == 1
    escapes = {f.file for f in report.findings if f.check == "schema.path_escape"}
    assert folder in escapes, [(f.check, f.file) for f in report.findings]
    assert "internal.check_crashed" not in {f.check for f in report.findings}


def test_deeply_nested_metadata_json_is_unreadable_not_a_crash(ds):
    (ds / "metadata.json").write_text(DEEP_JSON)
    report = run(ds)
    assert report.exit_code == 2 and [f.check for f in report.findings] == ["schema.metadata_json"]
    assert "nested too deeply" in report.findings[0].message
    res = runner.invoke(app, ["validate", str(ds), "-j", "0", "--quiet"])
    assert res.exit_code == 2 and "UNREADABLE" in res.output, res.output
    deep = ds.parent / "deep.toml"  # a gate file nested too deeply: a one-line usage error
    deep.write_text("[sample]\nx = " + "[" * 5000 + "]" * 5000 + "\n")
    res = runner.invoke(app, ["validate", str(ds), "-j", "0", "--gates", str(deep)])
    assert res.exit_code == 2 and "nested too deeply" in res.output and len(res.output.strip().splitlines()) == 1


def test_unusable_path_options_are_one_line_usage_errors(ds, tmp_path):
    from fwdata.validate import UsageError

    with pytest.raises(UsageError, match="NUL"):
        validate_dataset(ValidateOptions(dataset=str(ds) + "\x00x", workers=0))
    long = str(tmp_path / ("x" * 5000))
    with pytest.raises(UsageError, match="too long"):
        validate_dataset(ValidateOptions(dataset=long, workers=0))
    for args, what in [([str(ds) + "\x00x"], "NUL"), ([long], "too long"), ([str(ds), "--gates", long], "too long"),
                       ([str(ds), "--gates", "a\x00b"], "NUL"), ([str(ds), "-o", long], "too long"),
                       ([str(ds), "-o", "a\x00b"], "NUL")]:
        res = runner.invoke(app, ["validate", *args, "-j", "0", "--quiet"])
        assert res.exit_code == 2, (args[-1][:20], res.exit_code, res.exception)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and what in lines[0], res.output[:300]


def test_control_characters_in_metadata_keep_the_reports_well_formed(ds):
    from fwdata.validate.report import ReportFormat, render

    edit_metadata(ds, lambda raw: raw["samples"][1].__setitem__("odd\x00key\x1b", 1))
    report = run(ds)
    assert "schema.sample_record" in {f.check for f in report.findings} and report.exit_code == 1
    junit = ET.fromstring(render(report, ReportFormat.junit).split("\n", 1)[1])  # parses: no raw NUL in it
    assert "odd\\x00key" in ET.tostring(junit, encoding="unicode")
    assert json.loads(render(report, ReportFormat.json))["exit_code"] == 1


def write_npz_bomb(path: Path, name: str, shape: tuple[int, ...], dtype, others: dict[str, np.ndarray]) -> None:
    """An npz whose member `name` has a valid .npy header declaring `shape` and that many zero bytes,
    deflated (about 1/1000 of the size); the `others` are ordinary members."""
    import zipfile
    from numpy.lib import format as npy

    dtype = np.dtype(dtype)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
            npy.write_array_header_1_0(fh, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
            left, zeros = int(np.prod(shape)) * dtype.itemsize, bytes(1 << 22)
            while left > 0:
                fh.write(zeros[:min(left, len(zeros))])
                left -= len(zeros)
        for k, a in others.items():
            with zf.open(f"{k}.npy", "w") as fh:
                npy.write_array(fh, a)


#: peak memory of a fresh process: VmHWM (ru_maxrss would include the parent's at the fork)
_RSS_SCRIPT = """
import json, re, sys
from pathlib import Path
from fwdata.validate import ValidateOptions, validate_dataset
r = validate_dataset(ValidateOptions(dataset=sys.argv[1], workers=0, samples=[sys.argv[2]]))
hwm = int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"maxrss_mb": hwm / 1024, "findings": [[f.check, f.sample] for f in r.findings],
                  "exit_code": r.exit_code}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_npz_bomb_is_refused_before_it_is_allocated(ds):
    import subprocess
    import sys

    sid = sample_ids(ds)[1]
    p = ds / sample_paths(sid).depth
    valid = load_npz(p)["valid"]
    T, H, W = valid.shape
    write_npz_bomb(p, "depth", (T * 600, H, W), np.float32, {"valid": valid})  # 627 MB inflated
    assert p.stat().st_size < 5_000_000
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(ds), sid], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert ["integrity.depth_shape", sid] in out["findings"] and out["exit_code"] == 1, out
    assert out["maxrss_mb"] < 500, out  # the process, imports included; reading the bomb takes > 700


def test_swapped_videos_fail_against_the_recorded_hashes(ds):
    sids = sample_ids(ds)
    set_video_hashes(ds)
    report = run(ds)
    assert report.exit_code == 0, [f.message for f in report.findings]
    summary = {c.id: c for c in report.checks}["cross.video_matches_record"]
    assert summary.outcome == "passed" and summary.ran == 3
    swap_videos(ds, sids[0], sids[1])
    report = run(ds)
    hits = [f for f in report.findings if f.check == "cross.video_matches_record"]
    assert sorted(f.sample for f in hits) == sorted(sids[:2]) and report.exit_code == 1
    assert all(f.severity.value == "error" and f.file == sample_paths(f.sample).video for f in hits)
    assert runner.invoke(app, ["validate", str(ds), "-j", "0", "--quiet"]).exit_code == 1
    edit_metadata(ds, lambda raw: [s.pop("video_sha256", None) for s in raw["samples"]])  # an older dataset
    report = run(ds)
    summary = {c.id: c for c in report.checks}["cross.video_matches_record"]
    assert "cross.video_matches_record" not in {f.check for f in report.findings}
    assert summary.outcome == "skipped" and "video_sha256" in summary.skip_reason


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_formats_and_exit_codes(ds, tmp_path):
    res = runner.invoke(app, ["validate", str(ds), "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["validate", str(ds), "-j", "0", "--format", "table"])
    assert res.exit_code == 0 and "PASS" in res.output

    sid = sample_ids(ds)[0]
    edit_cameras(ds, sid, flip_rotation)
    res = runner.invoke(app, ["validate", str(ds), "-j", "0", "--format", "json"])
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["exit_code"] == 1 and any(f["check"] == "integrity.rotation" and f["sample"] == sid
                                          for f in data["findings"])

    out = tmp_path / "report.xml"
    res = runner.invoke(app, ["validate", str(ds), "-j", "0", "--format", "junit", "--output", str(out), "--quiet"])
    assert res.exit_code == 1 and "FAIL" in res.output
    root = ET.parse(out).getroot()
    cases = {tc.get("name"): tc for tc in root.iter("testcase")}
    assert set(cases) == set(REGISTRY)
    assert cases["integrity.rotation"].find("failure") is not None
    assert cases["integrity.depth_dtype"].find("failure") is None
    assert int(root.get("failures")) >= 1

    res = runner.invoke(app, ["validate", str(ds), "-j", "0"])
    assert res.exit_code == 1 and "integrity.rotation" in res.output and "FAIL" in res.output


def test_cli_usage_errors(ds, tmp_path):
    assert runner.invoke(app, ["validate", str(tmp_path / "nope")]).exit_code == 2
    assert runner.invoke(app, ["validate", str(ds), "--format", "xml"]).exit_code == 2
    assert runner.invoke(app, ["validate", str(ds), "--sample", "nope-000000-00000000"]).exit_code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[sample]\nsharpness = { min = 1 }\n")
    res = runner.invoke(app, ["validate", str(ds), "-j", "0", "--gates", str(bad)])
    assert res.exit_code == 2 and "sharpness" in res.output
    bad.write_text('[severity]\n"schema.nope" = "error"\n')
    assert runner.invoke(app, ["validate", str(ds), "-j", "0", "--gates", str(bad)]).exit_code == 2
    res = runner.invoke(app, ["validate", str(ds), "-j", "0", "-f", "json", "-o", str(ds / "report.json")])
    assert res.exit_code == 2 and not (ds / "report.json").exists()
    (ds / "metadata.json").unlink()
    res = runner.invoke(app, ["validate", str(ds), "-j", "0", "--quiet"])
    assert res.exit_code == 2 and "UNREADABLE" in res.output


def test_ci_script(clean_dataset, tmp_path):
    import subprocess

    env = {**os.environ, "FWDATA": str(REPO / ".venv/bin/fwdata"), "WORKERS": "0"}
    if not Path(env["FWDATA"]).exists():
        env["FWDATA"] = "fwdata"
    res = subprocess.run([str(REPO / "pipelines/ci/validate.sh"), str(clean_dataset), "default",
                          str(tmp_path / "reports")], capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    root = ET.parse(tmp_path / "reports" / "validate.xml").getroot()
    assert root.get("failures") == "0" and int(root.get("tests")) == len(REGISTRY)


# --------------------------------------------------------------------------- shared maths added for validation


def test_subsample_intrinsics_matches_strided_unprojection():
    rng = np.random.default_rng(1)
    K = camera.intrinsics_matrix(101.0, 87.0, 80.3, 47.9)
    d = rng.uniform(1, 5, (96, 160))
    for s in (1, 2, 3, 4):
        full = camera.unproject_depth(d, K)[::s, ::s]
        strided = camera.unproject_depth(d[::s, ::s], camera.subsample_intrinsics(K, s))
        np.testing.assert_allclose(strided, full, atol=1e-12)


def test_trajectory_anomalies():
    from fwdata.quality import trajectory_anomalies

    T = 17
    c2w = np.stack([camera.make_pose(camera.quaternion_xyzw_to_rotation([0, np.sin(0.01 * i), 0, np.cos(0.01 * i)]),
                                     [0.05 * i, 0, 0.02 * i]) for i in range(T)])
    w2c = camera.relative_to_first(camera.invert_pose(c2w))
    assert trajectory_anomalies(w2c, scene_scale=3.0) == 0
    swapped = w2c.copy()
    swapped[[5, 9]] = swapped[[9, 5]]
    assert trajectory_anomalies(swapped, scene_scale=3.0) >= 2
    assert trajectory_anomalies(np.repeat(np.eye(4)[None], T, 0), scene_scale=3.0) == 0  # a static camera
