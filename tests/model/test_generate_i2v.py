"""`fwmodel generate --image` / `reconstruct` with an image-to-video checkpoint (tiny-i2v preset, CPU).

The checkpoints are written the way the trainer writes its own (`save_trainable` with the run's config in
`extra.train`, as `fwmodel.train.state.save_state` does) from the model `build_model` makes for the tiny
Stage-2 recipe with preset tiny-i2v (the trainer does not train I2V presets yet). VAE, UMT5 and CLIP are the
`random-tiny` encoders; clips are 5 frames of 32x64, 2 denoising steps.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fwdata.dataset.contract import load_metadata
from fwmodel.cli import app
from fwmodel.generate import (
    GenerateError,
    GenerateOptions,
    Request,
    SessionOptions,
    generate,
    open_session,
    read_first_frame,
    sample_clip,
)
from fwmodel.trajectories import resolve_trajectory

REPO = Path(__file__).resolve().parents[2]
T, H, W = 5, 32, 64
runner = CliRunner()
SIZE = ["--frames", str(T), "--height", str(H), "--width", str(W), "--steps", "2", "--device", "cpu"]


def _checkpoint(root: Path, preset: str) -> Path:
    from fwmodel.checkpoint import save_trainable
    from fwmodel.inference import _CollectLog
    from fwmodel.train.config import load_config
    from fwmodel.train.model import build_model

    cfg = load_config(REPO / "fwmodel/recipes/tiny-stage2.toml",
                      {"model.preset": preset, "model.vae": "random-tiny", "model.text_encoder": "random-tiny"})
    model = build_model(cfg, torch.device("cpu"), _CollectLog())
    return save_trainable(model, root / "step-1.safetensors", 2, 1, extra={"train": cfg.model_dump(mode="json")})


@pytest.fixture(scope="module")
def i2v_checkpoint(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("i2v"), "tiny-i2v")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A PNG of noise (80x40) and a JPEG of two flat halves (60x50)."""
    root = tmp_path_factory.mktemp("images")
    noise = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    halves = np.zeros((50, 60, 3), np.uint8)
    halves[:, :30] = (230, 40, 20)
    halves[:, 30:] = (20, 60, 220)
    Image.fromarray(noise).save(root / "noise.png")
    Image.fromarray(halves).save(root / "halves.jpg", quality=95)
    return {"png": root / "noise.png", "jpg": root / "halves.jpg"}


@pytest.fixture(scope="module")
def session(i2v_checkpoint):
    torch.set_num_threads(1)
    return open_session(SessionOptions(checkpoint=i2v_checkpoint, device="cpu", image_encoder="random-tiny"),
                        T, H, W, 2, require_stage2=True)


def _opts(checkpoint: Path, out: Path, requests: list[Request]) -> GenerateOptions:
    return GenerateOptions(session=SessionOptions(checkpoint=checkpoint, device="cpu", image_encoder="random-tiny"),
                           out=out, frames=T, height=H, width=W, steps=2, requests=requests)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_first_frame_is_resized_to_cover_and_centre_cropped(tmp_path):
    """A 20x40 image of a red left half and a blue right half -> 32x32: scaled 1.6x to 32x64, the middle 32
    columns kept, so the left 16 columns are red and the right 16 blue (8-bit levels in [-1, 1])."""
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = (255, 0, 0)
    image[:, 20:] = (0, 0, 255)
    Image.fromarray(image).save(tmp_path / "halves.png")
    first = read_first_frame(tmp_path / "halves.png", 32, 32)
    assert first.pixels.shape == (1, 3, 32, 32) and first.source_hw == (20, 40)
    assert first.sha256 == hashlib.sha256((tmp_path / "halves.png").read_bytes()).hexdigest()
    red, blue = first.pixels[0, :, :, :14], first.pixels[0, :, :, 18:]
    assert torch.equal(red, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand_as(red))
    assert torch.equal(blue, torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand_as(blue))
    levels = (first.pixels + 1) * 127.5
    assert (levels - levels.round()).abs().max() < 1e-4  # 8-bit levels, as a video frame's


def test_i2v_generation_writes_a_dataset_with_the_image_recorded(i2v_checkpoint, images, tmp_path):
    from fwdata.validate import validate_dataset
    from fwdata.validate.results import Severity, ValidateOptions

    out = tmp_path / "out"
    r = runner.invoke(app, ["generate", "--checkpoint", str(i2v_checkpoint), "--prompt", "a garden", "--image",
                            str(images["png"]), "--image-encoder", "random-tiny", "--out", str(out), "-q", *SIZE])
    assert r.exit_code == 0, r.output
    meta = load_metadata(out)
    (sample,) = meta.samples
    settings = sample.provenance.options["generate"]
    assert settings["image"] == str(images["png"]) and settings["image_size"] == [80, 40]
    assert settings["image_sha256"] == hashlib.sha256(images["png"].read_bytes()).hexdigest()
    assert any(settings["image_sha256"] in note for note in sample.notes)
    assert sample.provenance.options["image_encoder"] == "random-tiny"
    roles = {m.role: m for m in meta.provenance.models}
    assert roles["image encoder (CLIP, I2V first frame)"].random_init
    for kind in ("video", "depth", "points", "camera_json"):
        assert (out / getattr(sample.paths, kind)).stat().st_size > 0, kind
    report = validate_dataset(ValidateOptions(dataset=out, workers=0, allow_random_init=True))
    errors = [f"{f.check}: {f.message}" for f in report.findings if f.severity == Severity.ERROR
              and f.check.startswith(("schema.", "integrity.", "cross.points_match_depth", "cross.video_matches"))]
    assert errors == []


def test_the_image_conditions_the_clip(session, images):
    """Same prompt, seed and path: another first frame moves the clip; the same one reproduces it exactly;
    both the first-frame condition and the CLIP image tokens reach the model."""
    from fwmodel.inference import predict

    traj = resolve_trajectory("orbit", T, H, W)
    request = Request("a garden", seed=3)
    frames = {k: read_first_frame(p, H, W) for k, p in images.items()}
    clip = {k: sample_clip(session, request, traj, 2, 5.0, "unipc", f)[0] for k, f in frames.items()}
    again = sample_clip(session, request, traj, 2, 5.0, "unipc", frames["png"])[0]
    assert torch.equal(again, clip["png"])
    assert (clip["png"] - clip["jpg"]).abs().max() > 1e-3
    # one forward with the png's condition and tokens, then with each of them swapped for the jpg's
    condition, tokens = session.i2v_inputs(frames["png"].pixels, T)
    other_condition, other_tokens = session.i2v_inputs(frames["jpg"].pixels, T)
    assert condition.shape == (1, 20, 2, H // 8, W // 8) and tokens.shape == (1, 5, 16)
    latents = torch.randn(1, 16, 2, H // 8, W // 8, generator=torch.Generator().manual_seed(0))
    text = session.encode_text(["a garden"])

    def velocity(c, t):
        return predict(session.loaded, latents, text, torch.tensor([500.0]), video=True, amp=None,
                       condition=c, image_embeds=t).video

    base = velocity(condition, tokens)
    assert (velocity(other_condition, tokens) - base).abs().max() > 1e-4
    assert (velocity(condition, other_tokens) - base).abs().max() > 1e-4


def test_same_image_and_seed_give_identical_bytes(i2v_checkpoint, images, tmp_path):
    request = [Request("a garden", image=str(images["jpg"]), seed=4)]
    torch.set_num_threads(1)
    generate(_opts(i2v_checkpoint, tmp_path / "a", request))
    generate(_opts(i2v_checkpoint, tmp_path / "b", request))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    meta_a, meta_b = (json.loads(x.pop("metadata.json")) for x in (a, b))
    assert sorted(a) == sorted(b) and len(a) >= 8 and [k for k in a if a[k] != b[k]] == []
    for m in (meta_a, meta_b):
        m.pop("name")
        for key in ("created", "command"):
            m["provenance"].pop(key)
    assert meta_a == meta_b
    generate(_opts(i2v_checkpoint, tmp_path / "c", [Request("a garden", image=str(images["png"]), seed=4)]))
    video = lambda root: next((root / "videos").glob("*.mp4")).read_bytes()  # noqa: E731
    assert video(tmp_path / "c") != video(tmp_path / "a")  # another image, another clip


def test_batch_lines_each_take_their_own_image(i2v_checkpoint, images, tmp_path):
    batch = tmp_path / "requests.jsonl"
    batch.write_text("".join(json.dumps({"prompt": "a garden", "image": str(p), "seed": 1}) + "\n"
                             for p in images.values()))
    r = runner.invoke(app, ["generate", "--checkpoint", str(i2v_checkpoint), "--batch", str(batch),
                            "--image-encoder", "random-tiny", "--out", str(tmp_path / "out"), "-q", *SIZE])
    assert r.exit_code == 0, r.output
    meta = load_metadata(tmp_path / "out")
    shas = {s.provenance.options["generate"]["image_sha256"] for s in meta.samples}
    assert shas == {hashlib.sha256(p.read_bytes()).hexdigest() for p in images.values()}
    videos = {(tmp_path / "out" / s.paths.video).read_bytes() for s in meta.samples}
    assert len(videos) == 2


def _one_line_refusal(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return " ".join(lines[lines.index(errors[0]):])


def test_refusals_are_one_line(i2v_checkpoint, images, tmp_path):
    t2v = _checkpoint(tmp_path / "t2v", "tiny")
    out = tmp_path / "out"
    base = ["generate", "--prompt", "x", "--out", str(out), "--image-encoder", "random-tiny", *SIZE]
    r = runner.invoke(app, [*base, "--checkpoint", str(t2v), "--image", str(images["png"])])
    assert "--image needs an image-to-video (I2V) checkpoint; preset tiny is text-to-video" in _one_line_refusal(r)
    r = runner.invoke(app, [*base, "--checkpoint", str(i2v_checkpoint)])
    assert "is an image-to-video (I2V) model: give the first frame with --image" in _one_line_refusal(r)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    r = runner.invoke(app, [*base, "--checkpoint", str(i2v_checkpoint), "--image", str(broken)])
    assert f"--image {broken}: cannot be read as an image" in _one_line_refusal(r)
    r = runner.invoke(app, [*base, "--checkpoint", str(i2v_checkpoint), "--image", str(tmp_path / "missing.png")])
    assert "cannot be read as an image (No such file or directory)" in _one_line_refusal(r)
    no_encoder = [a for a in base if a not in ("--image-encoder", "random-tiny")]
    r = runner.invoke(app, [*no_encoder, "--checkpoint", str(i2v_checkpoint), "--image", str(images["png"])])
    assert "pass --image-encoder" in _one_line_refusal(r)
    batch = tmp_path / "requests.jsonl"
    batch.write_text(json.dumps({"prompt": "a", "image": str(images["png"])}) + "\n" + json.dumps({"prompt": "b"}))
    r = runner.invoke(app, [*[a for a in base if a not in ("--prompt", "x")], "--batch", str(batch),
                            "--checkpoint", str(i2v_checkpoint)])
    assert "request 2 of 2 has none" in _one_line_refusal(r)
    assert not out.exists()  # every refusal came before anything was written
    with pytest.raises(GenerateError, match="cannot be read as an image"):
        read_first_frame(broken, H, W)


def test_reconstruct_conditions_an_i2v_checkpoint_on_the_first_frame(i2v_checkpoint, tmp_path):
    from fwdata.dataset.video import write_mp4

    rng = np.random.default_rng(1)
    video = tmp_path / "clip.mp4"
    write_mp4(video, [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(T)], fps=8.0)
    r = runner.invoke(app, ["reconstruct", str(video), "--checkpoint", str(i2v_checkpoint), "--out",
                            str(tmp_path / "out"), "--image-encoder", "random-tiny", "--stride", "1", "-q", *SIZE[:6],
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    (sample,) = load_metadata(tmp_path / "out").samples
    assert any("conditioned on the clip's own frame 0" in note for note in sample.notes)
    assert sample.provenance.options["image_encoder"] == "random-tiny"
