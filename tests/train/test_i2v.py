"""Training the image-to-video (I2V) presets: `tiny-i2v` end to end on CPU.

- `fwmodel cache --image-encoder random-tiny` also stores each sample's first-frame condition latent and CLIP
  image tokens (cache.json records the image encoder); the T2V cache keeps its exact layout;
- Stage 1 and Stage 2 train from that cache with finite losses, and the step-1 loss changes when the cached
  condition latent or the image tokens are zeroed (both reach the model);
- the step-1 loss from a float32 cache equals the step-1 loss encoding online (same seed);
- the cached condition latent's first latent frame is the cached latents' first latent frame (causal VAE), the
  later ones are not, and the loaded condition carries the I2V mask;
- the sharded cache holds the folder cache's I2V bytes and trains to the same losses;
- refusals in one line: an I2V run on a T2V cache (names --image-encoder), without a cache and without
  model.image_encoder, an image encoder of another width (cached or online), a rerun without --image-encoder;
- `fwmodel bench` builds the I2V inputs (257 tokens of width 1280 for the 14B preset) and times the step.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fwmodel.train import train

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "fwmodel/recipes/tiny-stage1.toml")
SPEC = "5x32x48-s2-start"
I2V = {"model__preset": "tiny-i2v"}
RANDOM = ["--vae", "random-tiny", "--text-encoder", "random-tiny"]


def _cli(args):
    from typer.testing import CliRunner

    from fwmodel.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("error")]
    assert len(error) == 1 and all(n in error[0] for n in needles), result.output
    return error[0]


def _losses(result) -> list[float]:
    return [row["loss/total"] for row in result.history]


@pytest.fixture(scope="module")
def i2v_cache(tmp_path_factory, dataset) -> Path:
    """The tiny recipe's cache of the shared dataset made with `--image-encoder random-tiny` (its own cache root)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("i2v-cache")
    result = _cli(["cache", dataset, "--config", RECIPE, *RANDOM, "--image-encoder", "random-tiny",
                   "--cache-dir", root, "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def f32_cache(tmp_path_factory, dataset) -> Path:
    """The same in float32 storage (no bf16 rounding): the cached-vs-online comparison."""
    from fwmodel.cache import CacheOptions, build_cache
    from fwmodel.train.config import load_config

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("i2v-cache-f32")
    cfg = load_config(RECIPE, {"data.cache_dir": str(root)})
    build_cache(CacheOptions(dataset=dataset, vae=Path("random-tiny"), text_encoder=Path("random-tiny"), data=cfg.data,
                             device="cpu", storage_dtype="float32", image_encoder=Path("random-tiny")))
    return root


def test_cache_records_the_image_encoder_and_the_t2v_cache_is_unchanged(i2v_cache, dataset):
    info = json.loads((i2v_cache / SPEC / "cache.json").read_text())
    image = info["image_encoder"]
    assert image["path"] == "random-tiny" and image["random_init"] and image["hidden_size"] == 16
    assert image["tokens"] == 5 and image["layer"] == "penultimate hidden states"
    for sample_id, entry in info["samples"].items():
        tensors = load_file(i2v_cache / SPEC / entry["i2v"])
        assert set(tensors) == {"condition_latents", "image_embeds"}
        assert list(tensors["condition_latents"].shape) == entry["latent_shape"] == [16, 2, 4, 6]
        assert tensors["image_embeds"].shape == (5, 16) and tensors["image_embeds"].dtype == torch.bfloat16
    # the T2V cache of the same dataset (made without --image-encoder) has nothing of it
    t2v = dataset / ".fwmodel_cache" / SPEC
    t2v_info = json.loads((t2v / "cache.json").read_text())
    assert "image_encoder" not in t2v_info and not (t2v / "i2v").exists()
    assert all("i2v" not in e for e in t2v_info["samples"].values())


def test_image_encoder_added_to_a_t2v_cache_keeps_its_files(dataset_copy):
    """Rerunning `fwmodel cache` with --image-encoder on a T2V cache adds the I2V part; the T2V files stay."""
    cache = dataset_copy / ".fwmodel_cache" / SPEC
    before = {p.relative_to(cache): p.read_bytes() for p in cache.rglob("*.safetensors")}
    result = _cli(["cache", dataset_copy, "--config", RECIPE, *RANDOM, "--image-encoder", "random-tiny",
                   "--device", "cpu", "--quiet"])
    assert result.exit_code == 0 and "encoded 2/2" in result.output, result.output
    after = {p.relative_to(cache): p.read_bytes() for p in cache.rglob("*.safetensors")}
    assert {k: v for k, v in after.items() if k.parts[0] != "i2v"} == before
    assert sorted(k.parts[0] for k in after if k not in before) == ["i2v", "i2v"]
    assert json.loads((cache / "cache.json").read_text())["image_encoder"]["hidden_size"] == 16


def test_condition_first_latent_frame_is_the_latents_first_frame(f32_cache, dataset):
    """Causal VAE: latent frame 0 sees frame 0 only, so [first frame, black frames] and the clip agree there."""
    from fwmodel.cache import LatentCache
    from fwmodel.data import TrainingDataset
    from fwmodel.train.config import load_config

    cache = LatentCache(f32_cache / SPEC)
    for sample_id, entry in cache.samples.items():
        latents = load_file(f32_cache / SPEC / entry["latents"])["latents"]
        condition = load_file(f32_cache / SPEC / entry["i2v"])["condition_latents"]
        # (the random-tiny VAE gives latents ~0.08 apart for two different first frames)
        torch.testing.assert_close(condition[:, 0], latents[:, 0], rtol=0, atol=1e-6)
        assert (condition[:, 1] - latents[:, 1]).abs().max() > 1e-3  # the black frames are not the clip's
    # what a sample of an I2V run gets: the mask rebuilt in front of the cached latent
    cfg = load_config(RECIPE, {"data.root": str(dataset), "data.cache_dir": str(f32_cache)})
    records = TrainingDataset(cfg.data).records
    cache.check_i2v(records, 16)
    sample = TrainingDataset(cfg.data, text_dim=16, cache=cache)[0]
    condition = sample["condition"]
    assert condition.shape == (20, 2, 4, 6) and sample["image_embeds"].shape == (5, 16)
    assert torch.all(condition[:4, 0] == 1) and torch.all(condition[:4, 1:] == 0)
    torch.testing.assert_close(condition[4:, 0], sample["latents"][:, 0], rtol=1e-4, atol=1e-5)


def _cfg(make_config, stage, dataset, cache_root, output, **overrides):
    """The tiny recipe as `tiny-i2v` on `dataset`, its cache looked for under `cache_root` (data.cache_dir)."""
    values = {"data__cache_dir": str(cache_root), **I2V, **overrides}
    return make_config(stage, dataset, output, **values)


def test_stage1_and_stage2_train_and_the_condition_is_used(i2v_cache, dataset, make_config, tmp_path):
    torch.set_num_threads(1)
    out1 = tmp_path / "s1"
    stage1 = train(_cfg(make_config, 1, dataset, i2v_cache, out1, train__num_steps=2, train__checkpoint_every=2),
                   quiet=True)
    assert len(_losses(stage1)) == 2 and all(torch.isfinite(torch.tensor(_losses(stage1))))
    stage2 = train(_cfg(make_config, 2, dataset, i2v_cache, tmp_path / "s2", train__num_steps=1,
                        model__init_from=str(out1 / "step-2.safetensors")), quiet=True)
    losses2 = {k: v for k, v in stage2.last_metrics.items() if k.startswith("loss/")}
    assert "loss/diffusion" in losses2 and all(torch.isfinite(torch.tensor(list(losses2.values()))))

    # the same first step with the cached condition latent, then the image tokens, zeroed
    first = _losses(stage1)[0]
    for zeroed in ("condition_latents", "image_embeds"):
        changed = tmp_path / f"zero-{zeroed}"
        shutil.copytree(i2v_cache, changed)
        for path in (changed / SPEC / "i2v").iterdir():
            tensors = load_file(path)
            tensors[zeroed] = torch.zeros_like(tensors[zeroed])
            save_file(tensors, path)
        other = train(_cfg(make_config, 1, dataset, changed, tmp_path / f"run-{zeroed}", train__num_steps=1),
                      quiet=True)
        assert abs(_losses(other)[0] - first) > 1e-4 * abs(first), zeroed


def test_cached_condition_gives_the_online_loss(f32_cache, dataset, make_config, tmp_path):
    """Step 1 from the float32 cache == step 1 encoding latents, text, condition and image tokens online."""
    torch.set_num_threads(1)
    cached = train(_cfg(make_config, 1, dataset, f32_cache, tmp_path / "cached", train__num_steps=1), quiet=True)
    online = train(_cfg(make_config, 1, dataset, f32_cache, tmp_path / "online", train__num_steps=1,
                        data__cache="off", model__vae="random-tiny", model__text_encoder="random-tiny",
                        model__image_encoder="random-tiny"), quiet=True)
    for key in ("loss/total", "loss/depth_loss", "loss/point_loss", "loss/camera_loss", "grad_norm/total"):
        assert online.last_metrics[key] == pytest.approx(cached.last_metrics[key], rel=1e-5, abs=1e-6), key


def test_sharded_cache_holds_the_folder_bytes_and_trains_alike(i2v_cache, dataset, make_config, tmp_path):
    from fwdata.shards.writer import ShardConfig, write_shards

    torch.set_num_threads(1)
    shards = tmp_path / "shards"
    write_shards(ShardConfig(dataset=dataset, out=shards, samples_per_shard=1))
    result = _cli(["cache", shards, "--config", RECIPE, *RANDOM, "--image-encoder", "random-tiny", "--device", "cpu",
                   "--quiet"])
    assert result.exit_code == 0, result.output
    sharded = shards / ".fwmodel_cache" / SPEC
    index = json.loads((sharded / "cache-shards.json").read_text())
    folder = json.loads((i2v_cache / SPEC / "cache.json").read_text())
    assert index["image_encoder"] == folder["image_encoder"]
    for sample_id, entry in index["samples"].items():
        with tarfile.open(sharded / entry["shard"]) as tar:
            member = tar.extractfile(f"{entry['key']}.i2v.safetensors").read()
        assert member == (i2v_cache / SPEC / folder["samples"][sample_id]["i2v"]).read_bytes()
    # a rerun encodes nothing and keeps every cache shard's bytes
    before = {p.name: p.read_bytes() for p in sharded.glob("shard-*.tar")}
    result = _cli(["cache", shards, "--config", RECIPE, *RANDOM, "--image-encoder", "random-tiny", "--device", "cpu",
                   "--quiet"])
    assert result.exit_code == 0 and "already cached" in result.output, result.output
    assert {p.name: p.read_bytes() for p in sharded.glob("shard-*.tar")} == before
    # the same shards trained with the sharded cache and with the folder cache (which serves them too)
    runs = [train(_cfg(make_config, 1, shards, root, tmp_path / name, train__num_steps=2), quiet=True)
            for name, root in (("sharded", shards / ".fwmodel_cache"), ("folder", i2v_cache))]
    assert runs[0].history and [r["loss/total"] for r in runs[0].history] == [r["loss/total"] for r in runs[1].history]


def test_i2v_run_on_a_t2v_cache_is_refused_in_one_line(dataset, tmp_path):
    result = _cli(["train", "--stage", "1", "--config", RECIPE, "--data", dataset, "--preset", "tiny-i2v",
                   "--output", tmp_path / "out"])
    _one_line_error(result, "--image-encoder", "fwmodel cache")
    assert not (tmp_path / "out").exists()


def test_i2v_without_cache_needs_model_image_encoder(dataset, tmp_path):
    result = _cli(["train", "--stage", "1", "--config", RECIPE, "--data", dataset, "--preset", "tiny-i2v",
                   "--output", tmp_path / "out", "--set", 'data.cache="off"', "--set", 'model.vae="random-tiny"',
                   "--set", 'model.text_encoder="random-tiny"'])
    _one_line_error(result, "model.image_encoder")


def test_image_encoder_of_another_width_is_refused(dataset, make_config, tmp_path):
    from fwmodel.cache import CacheError, CacheOptions, build_cache
    from fwmodel.i2v import write_tiny_image_encoder
    from fwmodel.train.config import ConfigError, load_config

    torch.set_num_threads(1)
    root = tmp_path / "cache8"
    cfg = load_config(RECIPE, {"data.cache_dir": str(root)})
    build_cache(CacheOptions(dataset=dataset, vae=Path("random-tiny"), text_encoder=Path("random-tiny"), data=cfg.data,
                             device="cpu", image_encoder=Path("random-tiny"), image_dim=8))
    with pytest.raises(CacheError, match="width 8, but the model expects 16") as err:
        train(_cfg(make_config, 1, dataset, root, tmp_path / "out", train__num_steps=1), quiet=True)
    assert "\n" not in str(err.value) and "--image-encoder" in str(err.value)
    # online: a CLIP folder of width 8 as model.image_encoder
    clip8 = write_tiny_image_encoder(tmp_path / "clip8", image_dim=8)
    with pytest.raises(ConfigError, match="width 8, but preset tiny-i2v expects 16"):
        train(_cfg(make_config, 1, dataset, root, tmp_path / "online", train__num_steps=1, data__cache="off",
                   model__vae="random-tiny", model__text_encoder="random-tiny", model__image_encoder=str(clip8)),
              quiet=True)
    # a rerun of the I2V cache without --image-encoder would leave new samples without their condition
    with pytest.raises(CacheError, match="was made with --image-encoder"):
        build_cache(CacheOptions(dataset=dataset, vae=Path("random-tiny"), text_encoder=Path("random-tiny"),
                                 data=cfg.data, device="cpu"))


def test_bench_builds_the_i2v_inputs_and_times_the_step():
    from fwmodel.bench import run_bench, synthetic_batch
    from fwmodel.config import get_preset

    batch = synthetic_batch(get_preset("wan2.1-i2v-14b"), 1, 1, 9, 32, 48, "cpu")
    assert batch["condition"].shape == (1, 20, 3, 4, 6) and batch["image_embeds"].shape == (1, 257, 1280)
    assert torch.all(batch["condition"][:, :4, 0] == 1) and torch.all(batch["condition"][:, :4, 1:] == 0)
    tiny = synthetic_batch(get_preset("tiny-i2v"), 1, 1, 5, 32, 48, "cpu")
    t2v = synthetic_batch(get_preset("tiny"), 1, 1, 5, 32, 48, "cpu")
    assert tiny["image_embeds"].shape == (1, 5, 16) and "condition" not in t2v
    assert all(torch.equal(t2v[k], tiny[k]) for k in t2v)  # the T2V inputs are unchanged
    result = run_bench("tiny-i2v", 1, steps=1, warmup=0, gradient_checkpointing=False, mixed_precision="no",
                       device="cpu", flops_device="cpu", echo=lambda s: None, batch_size=1, num_frames=5,
                       height=32, width=48)
    assert result.loss_total == result.loss_total and result.grad_norm > 0 and result.model_tflop_per_step > 0


def test_eval_of_an_i2v_checkpoint_uses_the_condition_cached_or_online(dataset_copy, make_config, tmp_path):
    """`fwmodel eval` gives an I2V checkpoint the first-frame condition and image tokens: from the cache, or
    encoded online when the dataset has no cache (nearly the same scores: the cache is bf16); a cache whose
    condition latents are zeroed changes the scores (the condition reaches the model)."""
    from fwmodel.evaluate import EvalOptions, evaluate

    torch.set_num_threads(1)
    result = _cli(["cache", dataset_copy, "--config", RECIPE, *RANDOM, "--image-encoder", "random-tiny",
                   "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    train(make_config(1, dataset_copy, out, train__num_steps=1, train__checkpoint_every=1, **I2V), quiet=True)
    opts = dict(checkpoints=[out / "step-1.safetensors"], split="all", device="cpu")
    cached = evaluate(EvalOptions(data=dataset_copy, **opts)).rows[0]

    zeroed = tmp_path / "zeroed"
    shutil.copytree(dataset_copy, zeroed)
    for path in (zeroed / ".fwmodel_cache" / SPEC / "i2v").iterdir():
        tensors = load_file(path)
        tensors["condition_latents"] = torch.zeros_like(tensors["condition_latents"])
        save_file(tensors, path)
    changed = evaluate(EvalOptions(data=zeroed, **opts)).rows[0]
    assert abs(changed["depth_absrel"] - cached["depth_absrel"]) > 1e-6 * abs(cached["depth_absrel"])

    online_data = tmp_path / "online"
    shutil.copytree(dataset_copy, online_data, ignore=shutil.ignore_patterns(".fwmodel_cache"))
    online = evaluate(EvalOptions(data=online_data, **opts)).rows[0]
    for k in ("depth_absrel", "point_err", "ate"):
        assert online[k] == pytest.approx(cached[k], rel=0.05, abs=0.01), k
