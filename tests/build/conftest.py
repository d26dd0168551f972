"""Shared inputs of the build tests: one synthetic ground-truth dataset and one build of its videos.

Rendering and building take a minute or two on a small CPU, so they happen once per test session
and, under pytest-xdist, once for all workers (a file lock in the shared temp folder: the first
worker builds, the others wait and reuse the files).

Inputs of the main build (`main_build`): the three rendered clips (orbit, forward, pan; 33 frames,
192x336) plus inputs that must fail cleanly: a static clip, a textureless clip, an empty file, a
text file named .mp4, a clip too short for 33 frames, and an audio-only file. Depth comes from
`--depth-prior`: ground-truth inverse depth with an unknown scale and shift and 1 % noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from fwdata.build.pipeline import build_dataset, load_config
from fwdata.dataset.contract import load_metadata
from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset
from fwdata.dataset.video import write_mp4

T, H, W = 33, 192, 336
KINDS = ("orbit", "forward", "pan")
#: distortion of the depth prior: inverse depth * PRIOR_SCALE + PRIOR_SHIFT, times (1 + noise)
PRIOR_SCALE, PRIOR_SHIFT, PRIOR_NOISE = 3.7, 0.25, 0.01

#: build options shared by every build of these inputs (a kill-and-resume build must match)
BUILD_OVERRIDES = {
    "workers": 2,
    "clips": {"num_frames": T, "height": H, "width": W, "stride": 1},
    "sfm": {"num_threads": 1},
}


def shared_dir(tmp_path_factory) -> Path:
    """A folder shared by all xdist workers of this session."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if base.name.startswith("popen-gw") else base
    d = root / "fwdata-build-shared"
    d.mkdir(exist_ok=True)
    return d


def _once(tmp_path_factory, name: str, make):
    d = shared_dir(tmp_path_factory)
    out = d / name
    with FileLock(str(d / f"{name}.lock")):
        if not (out / ".complete").exists():
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            make(out)
            (out / ".complete").write_text("ok")
    return out


def seen_through_lens(values: np.ndarray, valid: np.ndarray, K: np.ndarray, lens) -> tuple[np.ndarray, np.ndarray]:
    """Maps (T,H,W) on the pinhole grid -> what a camera with `lens` records at each of its pixels
    (nearest pinhole pixel of the ray; pixels whose ray leaves the pinhole image are invalid)."""
    from fwdata.dataset.lens import undistort_pixels

    T, H, W = values.shape
    uu, vv = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    p = undistort_pixels(np.stack([uu, vv], -1), K, lens)
    col, row = np.floor(p[..., 0]).astype(np.int64), np.floor(p[..., 1]).astype(np.int64)
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
    col, row = np.clip(col, 0, W - 1), np.clip(row, 0, H - 1)
    return values[:, row, col], valid[:, row, col] & inside


def write_prior(gt_root: Path, out: Path) -> None:
    """Per-video depth priors (`<video stem>.npz`, key inverse_depth) from the ground truth, distorted.

    A clip rendered through a lens gets its prior on the video's (distorted) pixel grid, as a depth
    network run on the video would give it.
    """
    from fwdata.dataset.contract import read_camera_json
    from fwdata.dataset.lens import lens_from_dict

    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    for s in load_metadata(gt_root).samples:
        d = np.load(gt_root / s.paths.depth)
        z, v = d["depth"].astype(np.float64), d["valid"]
        truth = (s.provenance.options.get("ground_truth", {}) if s.provenance else {}) or {}
        if "lens" in truth:
            K = read_camera_json(gt_root / s.paths.camera_json).intrinsics_array()[0]
            z, v = seen_through_lens(z, v, K, lens_from_dict(truth["lens"]))
        inv = np.where(v, 1.0 / np.where(v, z, 1.0), 0.0)
        noisy = (PRIOR_SCALE * inv + PRIOR_SHIFT) * (1.0 + PRIOR_NOISE * rng.standard_normal(inv.shape))
        np.savez(out / f"{s.id}.npz", inverse_depth=np.where(v, noisy, 0.0).astype(np.float32), valid=v)


def _make_inputs(root: Path) -> None:
    gt = root / "gt"
    write_synthetic_dataset(gt, SynthOptions(num_scenes=3, num_frames=T, height=H, width=W, path_kinds=list(KINDS),
                                             write_ply=False))
    videos = root / "videos"
    videos.mkdir()
    for p in sorted((gt / "videos").glob("*.mp4")):
        shutil.copy(p, videos / p.name)
    write_prior(gt, root / "prior")
    # inputs that must fail cleanly
    import decord

    vr = decord.VideoReader(str(sorted((gt / "videos").glob("*orbit*.mp4"))[0]))
    frame = vr[0].asnumpy()
    write_mp4(videos / "static.mp4", [frame] * T, fps=16)
    write_mp4(videos / "textureless.mp4", [np.full((H, W, 3), 128, np.uint8)] * T, fps=16)
    write_mp4(videos / "short.mp4", vr.get_batch(list(range(9))).asnumpy(), fps=16)
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notes.mp4").write_text("not a video\n")
    _write_audio_only(root / "audio_only.m4a")


def _write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        samples = (np.sin(np.linspace(0, 200, 16000)) * 0.1).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> Path:
    """Folder with gt/ (ground truth), videos/ (build inputs), prior/ (depth priors), audio_only.m4a."""
    return _once(tmp_path_factory, "inputs", _make_inputs)


def build_config(prior: Path, **extra):
    over = json.loads(json.dumps(BUILD_OVERRIDES))
    over["depth"] = {"prior_dir": str(prior)}
    over.update(extra)
    return load_config(None, over)


def _make_build(inputs: Path):
    def make(out: Path) -> None:
        summary = build_dataset([inputs / "videos", inputs / "audio_only.m4a"], out / "ds", build_config(inputs / "prior"))
        (out / "summary.json").write_text(json.dumps({
            "exit_code": summary.exit_code, "built": summary.built, "skipped": summary.skipped,
            "failures": [f.model_dump() for f in summary.failures], "seconds": summary.seconds,
        }))
    return make


@pytest.fixture(scope="session")
def main_build(tmp_path_factory, inputs) -> Path:
    """The main build: folder with ds/ (the dataset) and summary.json (exit code, failures)."""
    return _once(tmp_path_factory, "main_build", _make_build(inputs))


def gt_sample_for(gt_meta, record):
    """The ground-truth sample a built sample came from (by the source video's name)."""
    stem = Path(record.source.path).stem
    return next(s for s in gt_meta.samples if s.id == stem)


def kind_of(gt_record) -> str:
    return next(k for k in KINDS if f"path={k}" in " ".join(gt_record.notes))


def dataset_files(root: Path) -> dict[str, bytes]:
    """Every file below `root` (relative path -> bytes), for byte-for-byte comparisons of builds."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_files(a: dict[str, bytes], b: dict[str, bytes], what: str) -> None:
    """The same files with the same bytes; names the files that differ."""
    assert sorted(a) == sorted(b), f"{what}: different files"
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, f"{what}: files differ byte for byte: {differ}"
