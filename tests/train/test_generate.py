"""fwmodel generate / reconstruct on the tiny preset (CPU): valid datasets, exact replays, one-line refusals.

Clips are 5 frames of 32x64 (decord mis-decodes 48-pixel-wide videos, see tests/dataset/test_store.py),
2 denoising steps. The Stage-2 checkpoint here is trained 2 steps at a high learning rate, so that its
zero-initialised camera adapters already move the generated video by whole 8-bit levels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fwdata.dataset.contract import (
    CameraFile,
    format_camera_txt,
    load_metadata,
    make_sample_id,
    read_camera_json,
)
from fwmodel.cli import app
from fwmodel.generate import GenerateOptions, Request, SessionOptions, generate, read_batch
from fwmodel.trajectories import PRESETS, resolve_trajectory

T, H, W = 5, 32, 64
runner = CliRunner()
SIZE = ["--frames", str(T), "--height", str(H), "--width", str(W), "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def camera_checkpoint(tmp_path_factory, dataset, stage1_checkpoint, make_config) -> Path:
    """A tiny Stage-2 checkpoint whose camera adapters visibly steer the video (2 steps at lr 3e-2)."""
    from fwmodel.train import train

    out = tmp_path_factory.mktemp("stage2_camera")
    torch.set_num_threads(1)
    cfg = make_config(2, dataset, out, train__num_steps=2, train__checkpoint_every=2, optim__lr=3e-2,
                      model__init_from=str(stage1_checkpoint))
    train(cfg, quiet=True)
    return out / "step-2.safetensors"


@pytest.fixture(scope="module")
def trajectory_specs(tmp_path_factory, dataset) -> dict[str, str]:
    """One spec of every kind: the 5 presets, a camera json, a RealEstate10K txt, DATASET:ID."""
    root = tmp_path_factory.mktemp("trajectories")
    meta = load_metadata(dataset)
    sample = meta.samples[1]
    json_path = root / "cams.json"
    shutil.copy(dataset / sample.paths.camera_json, json_path)
    cams = read_camera_json(json_path)
    w2c = cams.w2c_array()[::-1].copy()  # the same path backwards: another real camera path
    txt = CameraFile.from_arrays(w2c, cams.intrinsics_array()[::-1], width=cams.width, height=cams.height,
                                 scale="metric")
    txt_path = root / "re10k.txt"
    txt_path.write_text("https://www.youtube.com/watch?v=test\n" + format_camera_txt(txt))
    specs = {k: k for k in PRESETS}
    specs.update(json=str(json_path), txt=str(txt_path), dataset=f"{dataset}:{meta.samples[0].id}")
    return specs


#: what the outputs must pass: the schema, every file's integrity, and the point maps being the depth
#: unprojected with the (predicted) cameras. Not cross.ply_matches_points: an untrained model's depth is
#: noise from pixel to pixel, and the fused cloud's voxel averages then fall between the maps' points.
CHECKED = ("schema.", "integrity.", "cross.points_match_depth", "cross.valid_masks", "cross.camera_txt_json",
           "cross.video_matches_record")


def _errors(root: Path) -> list[str]:
    from fwdata.validate import validate_dataset
    from fwdata.validate.results import Severity, ValidateOptions

    report = validate_dataset(ValidateOptions(dataset=root, workers=0, allow_random_init=True))
    ran = {c.id: c.ran for c in report.checks}
    assert ran["cross.points_match_depth"] > 0 and ran["integrity.camera_json"] > 0  # really checked
    return [f"{f.check}: {f.message}" for f in report.findings
            if f.severity == Severity.ERROR and f.check.startswith(CHECKED)]


def _opts(checkpoint: Path, out: Path, requests: list[Request], **kw) -> GenerateOptions:
    session = SessionOptions(checkpoint=checkpoint, device="cpu", **kw.pop("session", {}))
    return GenerateOptions(session=session, out=out, frames=T, height=H, width=W, steps=2, requests=requests, **kw)


@pytest.fixture(scope="module")
def every_kind(camera_checkpoint, trajectory_specs, tmp_path_factory):
    """One --batch JSONL run (one model load) with a line per trajectory kind, same prompt and seed."""
    root = tmp_path_factory.mktemp("every_kind")
    batch = root / "prompts.jsonl"
    batch.write_text("".join(json.dumps({"prompt": "a quiet room", "trajectory": spec, "seed": 7}) + "\n"
                             for spec in trajectory_specs.values()))
    requests = read_batch(batch, Request(prompt="", negative_prompt="blurry"))
    torch.set_num_threads(1)
    import time

    t0 = time.perf_counter()
    meta = generate(_opts(camera_checkpoint, root / "out", requests))
    print(f"8 clips generated in {time.perf_counter() - t0:.1f} s")
    return root / "out", meta, requests


def test_every_trajectory_kind_gives_a_valid_dataset(every_kind, trajectory_specs, camera_checkpoint):
    from fwmodel.checkpoint import file_sha256

    out, meta, requests = every_kind
    assert len(meta.samples) == len(trajectory_specs) == 8
    assert _errors(out) == []  # schema, integrity and cross-file checks all pass
    sha = file_sha256(camera_checkpoint)
    by_spec = {r.provenance.options["generate"]["trajectory"]["spec"]: r for r in meta.samples}
    assert set(by_spec) == set(trajectory_specs.values())
    for spec, record in by_spec.items():
        requested = read_camera_json(out / "requested_cameras" / f"{record.id}.json")
        expected = resolve_trajectory(spec, T, H, W)
        np.testing.assert_allclose(requested.w2c_array(), expected.w2c, atol=1e-12)
        np.testing.assert_allclose(requested.intrinsics_array(), expected.K, rtol=1e-12)
        predicted = read_camera_json(out / record.paths.camera_json)
        assert predicted.num_frames == T and (predicted.width, predicted.height) == (W, H)
        np.testing.assert_allclose(predicted.w2c_array()[0], np.eye(4))
        options = record.provenance.options
        assert options["generate"]["prompt"] == "a quiet room" and options["generate"]["seed"] == 7
        assert options["generate"]["negative_prompt"] == "blurry" and options["generate"]["steps"] == 2
        assert options["checkpoint_sha256"] == sha and options["stage"] == 2 and options["step"] == 2
        assert record.scale == "normalized" and (record.num_frames, record.height, record.width) == (T, H, W)
    # the dataset's provenance: the tool, and the random models flagged as such
    assert meta.provenance.tool == "fwmodel"
    models = {m.role: m for m in meta.provenance.models}
    assert models["video backbone"].random_init and models["vae"].random_init
    assert models["geometry, cameras and camera control"].revision == f"sha256:{sha}"


def test_different_trajectories_change_the_outputs(every_kind, camera_checkpoint):
    """Same prompt and seed, 8 camera paths: 8 different predicted geometries, bit for bit; the video too,
    where the camera's effect on this barely trained model exceeds the 8-bit rounding of the frames."""
    from fwmodel.generate import open_session, sample_clip

    out, meta, _ = every_kind
    for kind in ("camera_json", "depth"):
        assert len({(out / getattr(r.paths, kind)).read_bytes() for r in meta.samples}) == 8, kind
    assert len({(out / r.paths.video).read_bytes() for r in meta.samples}) >= 2
    # the decoded clip before rounding: another camera path moves it, the same one reproduces it exactly
    session = open_session(SessionOptions(checkpoint=camera_checkpoint, device="cpu"), T, H, W, 2,
                           require_stage2=True)
    request = Request("a quiet room", seed=7)
    clips = {k: sample_clip(session, request, resolve_trajectory(k, T, H, W), 2, 5.0, "unipc")[0]
             for k in ("orbit", "forward", "static")}
    again = sample_clip(session, request, resolve_trajectory("orbit", T, H, W), 2, 5.0, "unipc")[0]
    assert torch.equal(again, clips["orbit"])
    assert (clips["orbit"] - clips["forward"]).abs().max() > 1e-4
    assert (clips["orbit"] - clips["static"]).abs().max() > 1e-4


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_one_seed_gives_byte_identical_outputs(camera_checkpoint, tmp_path):
    """The same inputs twice (the second with --offload, which on a CPU moves nothing): every file equal,
    metadata.json up to its run fields (as `fwdata build`'s determinism test masks them)."""
    request = [Request("a red chair", trajectory="pan", seed=3)]
    torch.set_num_threads(1)
    generate(_opts(camera_checkpoint, tmp_path / "a", request))
    generate(_opts(camera_checkpoint, tmp_path / "b", request, session={"offload": True}))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) >= 8
    meta_a, meta_b = (json.loads(x.pop("metadata.json")) for x in (a, b))
    assert [k for k in a if a[k] != b[k]] == []
    for m in (meta_a, meta_b):
        m.pop("name")
        for key in ("created", "command"):
            m["provenance"].pop(key)
    assert meta_a == meta_b
    generate(_opts(camera_checkpoint, tmp_path / "c", [Request("a red chair", trajectory="pan", seed=4)]))
    assert _files(tmp_path / "c")["metadata.json"] != (tmp_path / "a" / "metadata.json").read_bytes()
    video = lambda root: next((root / "videos").glob("*.mp4")).read_bytes()  # noqa: E731
    assert video(tmp_path / "c") != video(tmp_path / "a")  # another seed, another clip


def _one_line_refusal(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return " ".join(lines[lines.index(errors[0]):])


def test_damaged_stage1_and_wrong_options_are_refused_in_one_line(camera_checkpoint, stage1_checkpoint, tmp_path):
    bad = tmp_path / "step-2.safetensors"
    shutil.copy(camera_checkpoint, bad)
    shutil.copy(camera_checkpoint.with_suffix(".json"), bad.with_suffix(".json"))
    data = bytearray(bad.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    base = ["generate", "--prompt", "x", "--out", str(tmp_path / "out"), *SIZE]
    r = runner.invoke(app, [*base, "--checkpoint", str(bad)])
    assert "damaged: its sha256 does not match" in _one_line_refusal(r)
    r = runner.invoke(app, [*base, "--checkpoint", str(stage1_checkpoint)])
    assert "Stage-1 checkpoint: it has no camera adapters" in _one_line_refusal(r)
    r = runner.invoke(app, [*base, "--checkpoint", str(camera_checkpoint), "--image", "first.png"])
    assert "--image needs an image-to-video (I2V) checkpoint; preset tiny is text-to-video" in _one_line_refusal(r)
    r = runner.invoke(app, [*base, "--checkpoint", str(camera_checkpoint), "--trajectory", "spiral"])
    assert "neither a preset" in _one_line_refusal(r)
    r = runner.invoke(app, [*base, "--checkpoint", str(camera_checkpoint), "--frames", "6"])
    assert "4k+1" in _one_line_refusal(r)
    assert not (tmp_path / "out").exists()  # every refusal came before anything was written


def test_batch_of_two_prompts_writes_two_samples(camera_checkpoint, tmp_path):
    batch = tmp_path / "prompts.txt"
    batch.write_text("a wooden bridge\n\n# a comment\na snowy street\n")
    r = runner.invoke(app, ["generate", "--checkpoint", str(camera_checkpoint), "--batch", str(batch), "--out",
                            str(tmp_path / "out"), "--trajectory", "forward", "--seed", "5", "-q", *SIZE])
    assert r.exit_code == 0, r.output
    meta = load_metadata(tmp_path / "out")
    prompts = sorted(s.provenance.options["generate"]["prompt"] for s in meta.samples)
    assert prompts == ["a snowy street", "a wooden bridge"]
    assert {s.provenance.options["generate"]["trajectory"]["spec"] for s in meta.samples} == {"forward"}


@pytest.mark.parametrize("stage", [1, 2])
def test_reconstruct_writes_the_geometry_of_a_real_clip(stage, stage1_checkpoint, camera_checkpoint, dataset,
                                                        tmp_path):
    from fwdata.dataset.video import content_fingerprint

    record = load_metadata(dataset).samples[0]
    video = dataset / record.paths.video
    checkpoint = stage1_checkpoint if stage == 1 else camera_checkpoint
    r = runner.invoke(app, ["reconstruct", str(video), "--checkpoint", str(checkpoint), "--out",
                            str(tmp_path / "out"), "--stride", "2", "--noise", "0.05", "-q", *SIZE[:6],
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    meta = load_metadata(tmp_path / "out")
    (sample,) = meta.samples
    # the id `fwdata build` gives the same clip: the geometry can be compared sample by sample
    assert sample.id == make_sample_id(video.name, content_fingerprint(video), 0, 2, T, H, W)
    assert sample.source.stride == 2 and sample.fps == pytest.approx(record.fps / 2)
    cams = read_camera_json(tmp_path / "out" / sample.paths.camera_json)
    assert cams.num_frames == T and (cams.width, cams.height) == (W, H)
    assert [f.source_frame for f in cams.frames] == [0, 2, 4, 6, 8]  # traced back to the video's frames
    assert sample.provenance.options["reconstruct"]["noise_sigma"] == 0.05
    assert sample.provenance.options["stage"] == stage
    assert _errors(tmp_path / "out") == []


def test_memory_preflight_counts_weights_and_refuses_what_does_not_fit():
    from fwmodel.config import get_preset
    from fwmodel.generate import check_inference_fits, inference_memory
    from fwmodel.memory import GIB, MemoryPreflightError
    from fwmodel.params import parameter_report

    config = get_preset("wan2.1-t2v-1.3b")
    totals = parameter_report(config, 2).totals
    bf16 = inference_memory(config, 2, 81, 336, 592, 2, torch.bfloat16, offload=False)
    assert bf16.parts["model weights"] == totals.frozen * 2 + totals.stage2_trainable * 4
    fp32 = inference_memory(config, 2, 81, 336, 592, 2, torch.float32, offload=False)
    offloaded = inference_memory(config, 2, 81, 336, 592, 2, torch.bfloat16, offload=True)
    assert offloaded.total < bf16.total < fp32.total
    bf16.capacity, bf16.device = 12 * GIB, "a 12 GiB GPU"
    with pytest.raises(MemoryPreflightError, match="Try --offload") as err:
        check_inference_fits(bf16)
    assert "\n" not in str(err.value)
    bf16.capacity = 140 * GIB
    check_inference_fits(bf16)  # fits: no error
