"""The dataset contract: acceptance and rejection of metadata, cameras, arrays and paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from fwdata.dataset import camera
from fwdata.dataset.contract import (
    DEPTH_NPZ,
    POINTS_NPZ,
    CameraFile,
    ContractError,
    DatasetMetadata,
    FailedInput,
    PathEscapeError,
    Provenance,
    SampleRecord,
    SourceRef,
    camera_txt_to_arrays,
    check_npz_arrays,
    format_camera_txt,
    json_schemas,
    load_metadata,
    load_npz,
    make_sample_id,
    parse_camera_txt,
    read_camera_json,
    resolve_inside,
    sample_paths,
)
from fwdata.dataset.store import npz_bytes

REPO = Path(__file__).resolve().parents[2]


def random_cameras(T=5, W=64, H=48, seed=0) -> CameraFile:
    rng = np.random.default_rng(seed)
    w2c = np.stack([camera.make_pose(camera.quaternion_xyzw_to_rotation(rng.normal(size=4)), rng.normal(size=3))
                    for _ in range(T)])
    w2c = camera.relative_to_first(w2c)
    K = camera.intrinsics_matrix(55.5, 51.25, 32.3, 23.9)
    return CameraFile.from_arrays(w2c, K, width=W, height=H, scale="normalized",
                                  source_frames=[3 * i + 7 for i in range(T)], timestamps=[0.1 * i for i in range(T)])


def record(sid="clip-000000-abcdef12", T=5, H=48, W=64, **kw) -> SampleRecord:
    base = dict(
        id=sid, paths=sample_paths(sid), num_frames=T, height=H, width=W, fps=16.0, scale="normalized",
        scale_source="sfm", depth_source="test",
        source=SourceRef(path="/videos/a.mp4", fps=30.0, num_frames=100, width=W, height=H, start_frame=0, stride=2,
                         crop_xywh=(0, 0, W, H), resize_scale=(1.0, 1.0)),
    )
    base.update(kw)
    return SampleRecord(**base)


def metadata(samples) -> DatasetMetadata:
    return DatasetMetadata(provenance=Provenance(tool_version="0", created="2026-01-01T00:00:00+00:00"), samples=samples)


# --------------------------------------------------------------------------- camera txt


def test_camera_txt_round_trip_is_exact():
    cams = random_cameras()
    text = format_camera_txt(cams)
    lines = text.strip().splitlines()
    assert len(lines) == 5 and all(len(line.split()) == 19 for line in lines)
    rows = parse_camera_txt(text)
    w2c, K = camera_txt_to_arrays(rows, cams.width, cams.height)
    np.testing.assert_array_equal(w2c, cams.w2c_array())  # repr() floats round-trip exactly
    np.testing.assert_allclose(K, cams.intrinsics_array(), rtol=1e-15)
    assert [r.frame for r in rows] == [0, 1, 2, 3, 4]


def test_camera_txt_known_line_layout():
    cams = random_cameras(T=1)
    nums = [float(x) for x in format_camera_txt(cams).split()]
    assert nums[0] == 0
    assert nums[1:5] == pytest.approx([55.5 / 64, 51.25 / 48, 32.3 / 64, 23.9 / 48])
    assert nums[5:7] == [0.0, 0.0]
    assert nums[7:] == pytest.approx([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0])  # frame 0 is the world frame


def test_camera_txt_reads_realestate10k_file_with_url_first_line():
    text = (
        "https://www.youtube.com/watch?v=abcdefghijk\n"
        "45145000 0.532139961 0.946026558 0.5 0.5 0 0 1 0 0 0.1 0 1 0 0.2 0 0 1 0.3\n"
        "45178367 0.532139961 0.946026558 0.5 0.5 0 0 1 0 0 0.4 0 1 0 0.5 0 0 1 0.6\n"
    )
    rows = parse_camera_txt(text)
    assert len(rows) == 2
    assert rows[0].frame == 45145000
    w2c, K = camera_txt_to_arrays(rows, 640, 360)
    np.testing.assert_allclose(w2c[1, :3, 3], [0.4, 0.5, 0.6])
    np.testing.assert_allclose(K[0, 0, 0], 0.532139961 * 640)
    np.testing.assert_allclose(K[0, 1, 2], 0.5 * 360)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 0.5 0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1\n", "expected 19 numbers, found 18"),
        ("0 0.5 0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 x\n", ":1: not a number"),
        ("0 0.5 0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0\n1 0.5 0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 zz\n", ":2: not a number"),
        ("0 0.5 0.5 0.5 0.5 0 0 1 0 0 nan 0 1 0 0 0 0 1 0\n", "non-finite"),
        ("0 -0.5 0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0\n", "fx_n"),
        ("", "no camera lines"),
    ],
)
def test_camera_txt_rejects_malformed_lines(text, message):
    with pytest.raises(ContractError, match=message):
        parse_camera_txt(text, source="cams.txt")


# --------------------------------------------------------------------------- camera json


def test_camera_json_round_trip(tmp_path):
    cams = random_cameras()
    p = tmp_path / "c.json"
    p.write_text(cams.model_dump_json())
    back = read_camera_json(p)
    np.testing.assert_array_equal(back.w2c_array(), cams.w2c_array())
    np.testing.assert_array_equal(back.intrinsics_array(), cams.intrinsics_array())
    assert back.convention == "opencv_w2c" and back.frames[2].source_frame == 13


def _camera_dict():
    return json.loads(random_cameras().model_dump_json())


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d["frames"][1].update(w2c=[[1, 0, 0], [0, 1, 0], [0, 0, 1]]), "w2c must be 4x4"),
        (lambda d: d["frames"][1]["w2c"][3].__setitem__(0, 0.5), "last row"),
        (lambda d: d["frames"][1]["w2c"][0].__setitem__(3, float("nan")), "non-finite"),
        (lambda d: d["frames"][1].update(fx=-3.0), "fx"),
        (lambda d: d["frames"][2].update(index=7), "in order"),
        (lambda d: d["frames"][2].update(source_frame=0), "strictly increasing"),
        (lambda d: d.update(convention="opengl_c2w"), "convention"),
        (lambda d: d.update(frames=[]), "frames"),
        (lambda d: d.update(width=0), "width"),
        (lambda d: d.update(unknown_key=1), "unknown_key"),
    ],
)
def test_camera_json_rejections(tmp_path, damage, message):
    d = _camera_dict()
    damage(d)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d).replace("NaN", "NaN"))
    with pytest.raises(ContractError, match=message):
        read_camera_json(p)


# --------------------------------------------------------------------------- arrays


def test_array_specs_accept_right_arrays_and_reject_wrong_ones():
    dims = {"T": 5, "H": 4, "W": 6}
    good = {"depth": np.ones((5, 4, 6), np.float32), "valid": np.ones((5, 4, 6), bool)}
    check_npz_arrays(good, DEPTH_NPZ, dims, "d.npz")
    with pytest.raises(ContractError, match="dtype float64, expected float32"):
        check_npz_arrays({**good, "depth": good["depth"].astype(np.float64)}, DEPTH_NPZ, dims, "d.npz")
    with pytest.raises(ContractError, match=r"shape \(4, 4, 6\), expected \(5, 4, 6\)"):
        check_npz_arrays({**good, "depth": good["depth"][:4]}, DEPTH_NPZ, dims, "d.npz")
    with pytest.raises(ContractError, match=r"missing arrays \['valid'\]"):
        check_npz_arrays({"depth": good["depth"]}, DEPTH_NPZ, dims, "d.npz")
    with pytest.raises(ContractError, match="unexpected arrays"):
        check_npz_arrays({**good, "extra": good["valid"]}, DEPTH_NPZ, dims, "d.npz")
    pts = {"points": np.zeros((5, 4, 6, 3), np.float16), "valid": np.ones((5, 4, 6), bool)}
    check_npz_arrays(pts, POINTS_NPZ, dims, "p.npz")
    with pytest.raises(ContractError, match="dtype float32, expected float16"):
        check_npz_arrays({**pts, "points": pts["points"].astype(np.float32)}, POINTS_NPZ, dims, "p.npz")


def test_load_npz_reports_truncated_and_pickled_files(tmp_path):
    dims = {"T": 2, "H": 3, "W": 4}
    arrays = {"depth": np.ones((2, 3, 4), np.float32), "valid": np.ones((2, 3, 4), bool)}
    data = npz_bytes(arrays)
    p = tmp_path / "d.npz"
    p.write_bytes(data)
    np.testing.assert_array_equal(load_npz(p, DEPTH_NPZ, dims)["depth"], arrays["depth"])
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ContractError, match="cannot be read as npz"):
        load_npz(p, DEPTH_NPZ, dims)
    obj = np.empty((2, 3, 4), dtype=object)
    np.savez(p, depth=obj, valid=arrays["valid"])
    with pytest.raises(ContractError, match="cannot be read as npz"):  # object arrays need pickle: refused
        load_npz(p, DEPTH_NPZ, dims)
    with pytest.raises(ContractError, match="missing"):
        load_npz(tmp_path / "nope.npz", DEPTH_NPZ, dims)


def _npz_member(zf, name: str, header: dict, body: bytes, version=(1, 0)) -> None:
    """One hand-written .npy member: a valid header (any declared shape) and exactly `body` after it."""
    from numpy.lib import format as npy

    with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
        (npy.write_array_header_1_0 if version == (1, 0) else npy.write_array_header_2_0)(fh, header)
        fh.write(body)


def _hand_npz(path: Path, members: list[tuple[str, dict, bytes]]) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, header, body in members:
            _npz_member(zf, name, header, body)


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_load_npz_checks_member_headers_before_reading_data(tmp_path):
    from fwdata.dataset.contract import NpzError

    dims = {"T": 2, "H": 3, "W": 4}
    valid = np.ones((2, 3, 4), bool)
    good_depth = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    hdr = lambda shape, descr="<f4": {"descr": descr, "fortran_order": False, "shape": shape}  # noqa: E731
    ok_valid = ("valid", hdr((2, 3, 4), "|b1"), valid.tobytes())
    p = tmp_path / "d.npz"

    def problems(members) -> list[str]:
        _hand_npz(p, members)
        with pytest.raises(NpzError) as e:
            load_npz(p, DEPTH_NPZ, dims)
        return [k for k, _ in e.value.problems]

    _hand_npz(p, [("depth", hdr((2, 3, 4)), good_depth.tobytes()), ok_valid])  # a hand-written good one loads
    np.testing.assert_array_equal(load_npz(p, DEPTH_NPZ, dims)["depth"], good_depth)
    # a header declaring 4 TB with a few bytes behind it: refused by its shape, nothing allocated
    assert problems([("depth", hdr((10**6, 10**6)), b"\0" * 64), ok_valid]) == ["shape"]
    assert problems([("depth", hdr((2, 3, 4), "<f8"), bytes(192)), ok_valid]) == ["dtype"]
    assert problems([("depth", hdr((2, 3, 4)), good_depth.tobytes() + b"\0"), ok_valid]) == ["file"]  # trailing
    assert problems([("depth", hdr((2, 3, 4)), good_depth.tobytes()[:-4]), ok_valid]) == ["file"]  # short
    assert problems([("depth", hdr((2, 3, 4)), good_depth.tobytes()), ok_valid, ok_valid]) == ["file"]  # twice
    assert problems([("depth", hdr((2, 3, 4), "|O"), bytes(8)), ok_valid]) == ["file"]  # objects: pickle
    import zipfile
    with zipfile.ZipFile(p, "w") as zf:  # a v2.0 header claiming 4 GB of header text
        with zf.open("depth.npy", "w") as fh:
            fh.write(b"\x93NUMPY\x02\x00" + (2**32 - 1).to_bytes(4, "little") + b"{")
        _npz_member(zf, *ok_valid)
    with pytest.raises(NpzError, match="header declares 4294967295 bytes"):
        load_npz(p, DEPTH_NPZ, dims)


_BOMB_SCRIPT = """
import json, re, sys, zipfile
from pathlib import Path
import numpy as np
from numpy.lib import format as npy
from fwdata.dataset.contract import DEPTH_NPZ, ContractError, load_npz

path, (T, H, W) = Path(sys.argv[1]), (17, 96, 160)
with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
    with zf.open("depth.npy", "w", force_zip64=True) as fh:  # 627 MB of zeros: a ~1 MB member
        npy.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (T * 600, H, W)})
        zeros = bytes(T * H * W * 4)
        for _ in range(600):
            fh.write(zeros)
    with zf.open("valid.npy", "w") as fh:
        npy.write_array(fh, np.ones((T, H, W), bool))
size = path.stat().st_size
try:
    load_npz(path, DEPTH_NPZ, {"T": T, "H": H, "W": W})
    error = None
except ContractError as e:
    error = str(e)
hwm = int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"size": size, "error": error, "peak_mb": hwm / 1024}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_load_npz_refuses_a_decompression_bomb_without_allocating_it(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _BOMB_SCRIPT, str(tmp_path / "bomb.npz")], capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["size"] < 5_000_000 and out["error"] and "has shape (10200, 96, 160)" in out["error"], out
    assert out["peak_mb"] < 500, out  # a fresh process, imports included; loading the member takes > 600


# --------------------------------------------------------------------------- metadata and paths


def test_sample_ids_are_stable_and_distinct():
    a = make_sample_id("my video (1).mp4", "c0ffee", 120, 2, 81, 336, 592)
    assert a == make_sample_id("my video (1).mp4", "c0ffee", 120, 2, 81, 336, 592)
    assert a.startswith("my_video_1-000120-")
    others = [make_sample_id("my video (1).mp4", "c0ffee", 0, 2, 81, 336, 592),  # start
              make_sample_id("my video (1).mp4", "beef", 120, 2, 81, 336, 592),  # content
              make_sample_id("my video (1).mp4", "c0ffee", 120, 3, 81, 336, 592),  # stride
              make_sample_id("my video (1).mp4", "c0ffee", 120, 2, 49, 336, 592),  # T
              make_sample_id("my video (1).mp4", "c0ffee", 120, 2, 81, 192, 336),  # H, W
              make_sample_id("other.mp4", "c0ffee", 120, 2, 81, 336, 592)]  # name (readable prefix)
    assert len({a, *others}) == 7
    record(sid=a)  # valid id for the schema


def test_content_fingerprint_tells_same_size_files_apart(tmp_path):
    from fwdata.dataset.video import FINGERPRINT_BLOCK, FINGERPRINT_BLOCKS, content_fingerprint

    rng = np.random.default_rng(0)
    for size in (1000, FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK * 3):  # read whole, and sampled
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        (tmp_path / "a").write_bytes(data)
        (tmp_path / "b").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, last byte differs
        assert content_fingerprint(tmp_path / "a") != content_fingerprint(tmp_path / "b")
        (tmp_path / "c").write_bytes(data)
        assert content_fingerprint(tmp_path / "a") == content_fingerprint(tmp_path / "c")


def test_metadata_accepts_a_good_index_and_computes_statistics():
    meta = metadata([record(), record(sid="b-000000-00000000", split="val")]).with_statistics()
    assert meta.statistics.num_samples == 2 and meta.statistics.total_frames == 10
    assert meta.splits == {"train": ["clip-000000-abcdef12"], "val": ["b-000000-00000000"]}
    assert meta.statistics.duration_s == pytest.approx(10 / 16)
    df = meta.to_frame()
    assert list(df["id"]) == ["clip-000000-abcdef12", "b-000000-00000000"] and set(df["split"]) == {"train", "val"}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: metadata([record(), record()]), "duplicate sample id"),
        (lambda: record(T=6), "4k\\+1"),
        (lambda: record(H=50), "multiples of 16"),
        (lambda: record(sid="../evil"), "id"),
        (lambda: record(paths=sample_paths("x-000000-00000000")), "paths.video"),
        (lambda: DatasetMetadata(schema_version="9.9", provenance=Provenance(tool_version="0", created="x")),
         "not supported"),
        (lambda: DatasetMetadata(provenance=Provenance(tool_version="0", created="x"), splits={"train": ["ghost"]}),
         "unknown sample ids"),
        (lambda: FailedInput(source="a.mp4", reason="x"), "stage"),
    ],
)
def test_metadata_rejections(make, message):
    with pytest.raises(ValidationError, match=message):
        make()


@pytest.mark.parametrize("bad", ["../outside.mp4", "/etc/passwd", "videos/../../x.mp4", "videos\\a.mp4", "C:/a.mp4",
                                 "videos//a.mp4", "./videos/a.mp4"])
def test_paths_that_escape_the_root_are_rejected(tmp_path, bad):
    meta = metadata([record()])
    raw = json.loads(meta.model_dump_json())
    raw["samples"][0]["paths"]["points_ply"] = bad
    (tmp_path / "metadata.json").write_text(json.dumps(raw))
    with pytest.raises(ContractError, match="points_ply"):
        load_metadata(tmp_path)
    with pytest.raises(PathEscapeError):
        resolve_inside(tmp_path, bad)


def test_symlink_out_of_the_root_is_rejected(tmp_path):
    root = tmp_path / "ds"
    (root / "videos").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    os.symlink(outside, root / "depth")
    meta = metadata([record()])
    (root / "metadata.json").write_text(meta.model_dump_json())
    with pytest.raises(PathEscapeError, match="outside the dataset root"):
        load_metadata(root)
    assert resolve_inside(root, "videos/clip-000000-abcdef12.mp4") == (root / "videos/clip-000000-abcdef12.mp4").resolve()


def test_load_metadata_gives_clear_errors(tmp_path):
    with pytest.raises(ContractError, match="metadata.json: missing"):
        load_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(ContractError, match="not valid JSON"):
        load_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({"schema_version": "1.0"}))
    with pytest.raises(ContractError, match="provenance"):
        load_metadata(tmp_path)


# --------------------------------------------------------------------------- schemas


def test_exported_json_schemas_match_the_models():
    """docs/schemas is generated by `fwdata schema export docs/schemas`; this fails when it drifts."""
    for name, text in json_schemas().items():
        path = REPO / "docs" / "schemas" / name
        assert path.is_file(), f"{path} missing: run `fwdata schema export docs/schemas`"
        assert path.read_text() == text, f"{path} is stale: run `fwdata schema export docs/schemas`"


def test_json_schema_describes_the_contract():
    schema = json.loads(json_schemas()["camera.schema.json"])
    assert schema["properties"]["convention"]["const"] == "opencv_w2c"
    assert {"width", "height", "frames", "scale"} <= set(schema["required"])
