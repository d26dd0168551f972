"""The latent cache sharded like the data: `fwmodel cache SHARDS/` writes tar shards matching the data shards,
`fwmodel train --data SHARDS/` streams them beside the data shards.

- the cache index lists every cached sample once, under its data shard's name and key; each cache shard's
  bytes / sha256 are the file's, and its members are byte for byte the folder cache's latents and text files;
- a rerun keeps every shard; a deleted cache shard is rewritten with the same bytes;
- training on shards with the sharded cache gives exactly the logged losses of training on the same shards
  with the folder cache (same seed, shuffled shard order + shuffle buffer, 2 loader workers vs 0);
- a truncated, header-damaged or missing cache shard is refused at start in one line (exit 2); a flipped byte
  in a member's data is refused in one line when the sample is read (its sha256); a cache made with a text
  encoder of another width, and a sharded cache given to a dataset folder, are refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from fwdata.dataset.store import file_sha256
from fwmodel.train import train

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "fwmodel/recipes/tiny-stage1.toml")
SPEC = "5x32x48-s2-start"  # the tiny recipe's clip (frames x height x width - stride - window)
LOSSES = ("loss/total", "loss/depth_loss", "loss/point_loss", "loss/camera_loss", "grad_norm/total")


def _cli(args):
    from typer.testing import CliRunner

    from fwmodel.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _cache_cli(data: Path, encoders: Path, *extra):
    return _cli(["cache", data, "--config", RECIPE, "--vae", encoders, "--text-encoder", encoders, "--device", "cpu",
                 "--quiet", *extra])


@pytest.fixture(scope="module")
def six(tmp_path_factory, encoders) -> tuple[Path, Path, Path]:
    """6 synthetic clips with their folder cache, their shards (2 samples per shard, 3 shards) and the sharded
    cache `fwmodel cache SHARDS` writes (in SHARDS/.fwmodel_cache)."""
    from fwdata.shards.writer import ShardConfig, write_shards
    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cache-shards")
    write_synthetic_dataset(root / "ds", SynthOptions(num_scenes=6, num_frames=9, height=64, width=96,
                                                      write_ply=False))
    write_shards(ShardConfig(dataset=root / "ds", out=root / "shards", samples_per_shard=2))
    result = _cache_cli(root / "ds", encoders)
    assert result.exit_code == 0, result.output
    result = _cache_cli(root / "shards", encoders)
    assert result.exit_code == 0, result.output
    assert f"latent cache ready: {root / 'shards' / '.fwmodel_cache' / SPEC}" in result.output
    return root / "ds", root / "shards", root / "shards" / ".fwmodel_cache" / SPEC


def test_index_lists_every_sample_once_like_the_data_shards(six):
    from fwdata.shards.reader import iter_shard, load_index, load_manifest

    dataset, shards, cache = six
    index = json.loads((cache / "cache-shards.json").read_text())
    assert index["format"] == "fwmodel-latent-cache-shards" and index["vae"]["random_init"]
    assert index["dataset_fingerprint"] == load_index(shards).dataset_fingerprint
    manifest = load_manifest(shards)
    train_rows = manifest[manifest["split"] == "train"]
    assert len(train_rows) == 6
    # every training sample once, under its data shard and key
    assert {i: (e["shard"], e["key"]) for i, e in index["samples"].items()} == {
        r["id"]: (r["shard"], r["key"]) for r in train_rows.to_dict("records")}
    assert [s["name"] for s in index["shards"]] == [s.name for s in load_index(shards).shards]
    folder = json.loads((dataset / ".fwmodel_cache" / SPEC / "cache.json").read_text())
    seen = []
    for info in index["shards"]:
        path = cache / info["name"]
        assert info["bytes"] == path.stat().st_size and info["sha256"] == file_sha256(path)
        samples = list(iter_shard(path))
        assert [k for k, _ in samples] == sorted(e["key"] for e in index["samples"].values()
                                                 if e["shard"] == info["name"])
        assert info["num_samples"] == len(samples) and info["first_index"] == int(samples[0][0])
        for key, members in samples:
            sid = next(i for i, e in index["samples"].items() if e["key"] == key)
            entry, was = index["samples"][sid], folder["samples"][sid]
            seen.append(sid)
            # the folder cache's bytes: same latents and text, same window
            assert members["latents.safetensors"] == (dataset / ".fwmodel_cache" / SPEC / was["latents"]).read_bytes()
            assert members["text.safetensors"] == (dataset / ".fwmodel_cache" / SPEC / was["text"]).read_bytes()
            assert (entry["window_start"], entry["frames"], entry["record"]) == (
                was["window_start"], was["frames"], was["record"])
    assert sorted(seen) == sorted(index["samples"]) and len(seen) == len(set(seen))


def test_rerun_keeps_shards_and_rewrites_a_lost_one_identically(six, encoders, tmp_path):
    _, shards, cache = six
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    mine = copy / ".fwmodel_cache" / SPEC
    before = {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()}
    stamps = {p.name: p.stat().st_mtime_ns for p in mine.glob("shard-*.tar")}
    result = _cache_cli(copy, encoders)
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mtime_ns for p in mine.glob("shard-*.tar")} == stamps  # kept, not rewritten
    (mine / "shard-000001.tar").unlink()
    result = _cache_cli(copy, encoders)
    assert result.exit_code == 0, result.output
    after = {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in after if n.endswith(".tar"))  # same bytes again
    index = json.loads(after.pop("cache-shards.json"))
    assert index.pop("dataset") == str(copy)  # the only difference: the shards it was made from
    was = json.loads(before.pop("cache-shards.json"))
    assert was.pop("dataset") == str(shards) and index == was

    # a new caption for one sample of shard-000001: only that shard is rewritten, the other sample's bytes
    # reused, the captioned one's text re-encoded (its latents stay the same)
    from fwdata.shards.reader import iter_shard

    first, second = sorted((e["key"], i) for i, e in index["samples"].items() if e["shard"] == "shard-000001.tar")
    (tmp_path / "captions.json").write_text(json.dumps({second[1]: "a new caption"}))
    stamps = {p.name: p.stat().st_mtime_ns for p in mine.glob("shard-*.tar")}
    old_members = dict(iter_shard(mine / "shard-000001.tar"))
    result = _cache_cli(copy, encoders, "--captions", tmp_path / "captions.json")
    assert result.exit_code == 0 and "1/1" in result.output, result.output  # one sample encoded
    new_members = dict(iter_shard(mine / "shard-000001.tar"))
    assert new_members[first[0]] == old_members[first[0]]
    assert new_members[second[0]]["latents.safetensors"] == old_members[second[0]]["latents.safetensors"]
    assert new_members[second[0]]["text.safetensors"] != old_members[second[0]]["text.safetensors"]
    assert {n: t for n, t in stamps.items() if n != "shard-000001.tar"} == {
        p.name: p.stat().st_mtime_ns for p in mine.glob("shard-*.tar") if p.name != "shard-000001.tar"}
    entry = json.loads((mine / "cache-shards.json").read_text())["samples"][second[1]]
    assert entry["sha256"]["text.safetensors"] == hashlib.sha256(new_members[second[0]]["text.safetensors"]).hexdigest()
    assert {p.name: p.stat().st_mtime_ns for p in mine.glob("shard-*.tar") if p.name != "shard-000001.tar"} == {
        k: v for k, v in stamps.items() if k != "shard-000001.tar"}


def _losses(rows):
    return [{k: r[k] for k in ("step",) + LOSSES} for r in rows]


def test_sharded_cache_trains_like_the_folder_cache(six, make_config, metrics_of, tmp_path):
    dataset, shards, _ = six
    torch.set_num_threads(1)
    settings = dict(train__num_steps=3, train__log_every=1, train__checkpoint_every=3, train__batch_size=2,
                    data__shuffle=True, data__shuffle_buffer=3, data__cache="require")
    folder = train(make_config(1, shards, tmp_path / "folder-cache", **settings,
                               data__cache_dir=str(dataset / ".fwmodel_cache")), quiet=True)
    sharded = train(make_config(1, shards, tmp_path / "sharded-cache", **settings, data__num_workers=2), quiet=True)
    assert _losses(metrics_of(tmp_path / "sharded-cache")) == _losses(metrics_of(tmp_path / "folder-cache"))
    assert [r["step"] for r in sharded.history] == [1, 2, 3] and folder.history[0]["loss/depth_loss"] > 0
    log = (tmp_path / "sharded-cache" / "train.log").read_text()
    assert f"latent cache {shards / '.fwmodel_cache' / SPEC}" in log


def _member_offset(path: Path, member: str) -> int:
    with tarfile.open(path) as tar:
        info = next(i for i in tar if i.name.endswith(member))
        return info.offset_data + info.size // 2


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_damaged_or_foreign_cache_is_one_line(six, encoders, tmp_path):
    from fwmodel.cache import write_tiny_encoders

    dataset, shards, _ = six
    cases = {
        "truncated": (lambda c: (c / "shard-000001.tar").write_bytes((c / "shard-000001.tar").read_bytes()[:5000]),
                      "cache shard", "shard-000001.tar is damaged: 5000 bytes"),
        "header": (lambda c: _flip(c / "shard-000002.tar", _header_of_second(c / "shard-000002.tar")),
                   "cache shard", "shard-000002.tar holds 1 samples"),
        "missing": (lambda c: (c / "shard-000000.tar").unlink(), "cache shard", "shard-000000.tar is missing"),
        "data byte": (lambda c: _flip(c / "shard-000000.tar", _member_offset(c / "shard-000000.tar", "latents.safetensors")),
                      "cache shard", "latents.safetensors does not match its sha256"),
    }
    for name, (damage, *says) in cases.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(shards, copy)
        damage(copy / ".fwmodel_cache" / SPEC)
        out = tmp_path / f"out-{name}"
        workers = 2 if name == "data byte" else 0  # read by a loader worker: still one line
        result = _cli(["train", "--stage", "1", "--config", RECIPE, "--data", copy, "--output", out, "--steps", "1",
                       "--quiet", "--set", "data.shuffle=false", "--set", f"data.num_workers={workers}"])
        lines = result.output.strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        assert result.exit_code == 2 and len(errors) == 1 and lines[-1] == errors[0], (name, result.output)
        assert all(s in errors[0] for s in says) and f"fwmodel cache {copy} " in errors[0], (name, errors[0])
        if name != "data byte":  # refused at start: nothing written (a flipped data byte stops at its sample,
            assert len(lines) == 1 and not out.exists(), name  # after the run's random-init warning)

    # another text encoder (width 32, the tiny preset expects 16): refused by training and by a rerun into it
    wide = write_tiny_encoders(tmp_path / "wide", text_dim=32)
    copy = tmp_path / "wide-shards"
    shutil.copytree(shards, copy, ignore=shutil.ignore_patterns(".fwmodel_cache"))
    assert _cache_cli(copy, wide).exit_code == 0
    result = _cli(["train", "--stage", "1", "--config", RECIPE, "--data", copy, "--output", tmp_path / "o", "--quiet"])
    assert result.exit_code == 2 and "holds text embeddings of width 32" in result.output, result.output
    result = _cache_cli(copy, encoders)
    assert result.exit_code == 2 and "made with another text encoder" in result.output, result.output
    # a sharded cache given to the dataset folder
    result = _cli(["train", "--stage", "1", "--config", RECIPE, "--data", dataset, "--output", tmp_path / "f",
                   "--quiet", "--set", f"data.cache_dir={shards / '.fwmodel_cache'}"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "is sharded" in lines[0], result.output


def _header_of_second(path: Path) -> int:
    """An offset inside the tar header of the second sample's first member (its name field)."""
    with tarfile.open(path) as tar:
        infos = list(tar)
    second = next(i for i in infos if i.name.split(".")[0] != infos[0].name.split(".")[0])
    return second.offset + 3


def test_shards_and_cache_at_a_url_stream_the_same_entries(six):
    """The shards with their sharded cache copied to an fsspec URL (memory://) give the same samples, latents
    and text as on disk (no training: the stream itself)."""
    import fsspec

    from fwmodel.cache import LatentCache, ShardedLatentCache
    from fwmodel.data import DataConfig
    from fwmodel.shard_data import ShardDataset, open_shards

    _, shards, _ = six
    fs = fsspec.filesystem("memory")
    for p in sorted(shards.rglob("*")):
        if p.is_file() and ".fwdata" not in p.parts:
            fs.pipe_file(f"/cache-shards-test/{p.relative_to(shards)}", p.read_bytes())

    def first(root, n=6):
        cfg = DataConfig(root=root, num_frames=5, height=32, width=48, frame_stride=2, shuffle=True,
                         shuffle_buffer=3, cache="require")
        shard_set, cache = open_shards(cfg), LatentCache.find(cfg)
        assert isinstance(cache, ShardedLatentCache)
        stream = iter(ShardDataset(cfg, shard_set, shard_set.select(cfg), text_dim=16, cache=cache).layout(1, 1, 0, 4))
        return [next(stream) for _ in range(n)]

    try:
        local, remote = first(shards), first("memory://cache-shards-test")
    finally:
        fs.rm("/cache-shards-test", recursive=True)
    assert len({s["id"] for s in local}) == 6
    for a, b in zip(local, remote):
        assert a["id"] == b["id"] and torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])
        assert a["latents"].shape == (16, 2, 4, 6) and a["text"].shape == (512, 16)
