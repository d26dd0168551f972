"""Training data: sample selection, frame windows, resize, GT normalisation, cache, NaN in the files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fwdata.dataset import camera as cam
from fwdata.dataset.contract import load_metadata, metadata_json
from fwmodel.cache import CacheError, LatentCache
from fwmodel.data import DataConfig, DataError, ResizePlan, StepSampler, TrainingDataset, plucker_for_batch


def _cfg(root, **kw):
    values = dict(root=root, num_frames=5, height=64, width=96, frame_stride=2, cache="off", num_workers=0)
    values.update(kw)
    return DataConfig(**values)


def _edit_metadata(root, changes: dict):
    meta = load_metadata(root)
    samples = [s.model_copy(update=changes.get(i, {})) for i, s in enumerate(meta.samples)]
    (root / "metadata.json").write_text(metadata_json(meta.model_copy(update={"samples": samples}).with_statistics()))
    return [s.id for s in samples]


def test_splits_and_gated_out_samples(dataset_copy):
    meta = load_metadata(dataset_copy)
    samples = [meta.samples[0].model_copy(update={"split": "val"}),
               meta.samples[1].model_copy(update={"status": "gated_out"})]
    (dataset_copy / "metadata.json").write_text(metadata_json(meta.model_copy(update={"samples": samples}).with_statistics()))
    with pytest.raises(DataError, match="gated out"):
        TrainingDataset(_cfg(dataset_copy))
    assert [r.id for r in TrainingDataset(_cfg(dataset_copy, include_gated_out=True)).records] == [samples[1].id]
    assert [r.id for r in TrainingDataset(_cfg(dataset_copy, split="val")).records] == [samples[0].id]
    assert len(TrainingDataset(_cfg(dataset_copy, split="all", include_gated_out=True))) == 2
    with pytest.raises(DataError, match="fewer than the 17"):  # 5 frames at stride 4 need 17 of the 9
        TrainingDataset(_cfg(dataset_copy, split="all", frame_stride=4))
    with pytest.raises(ValueError, match="4k\\+1"):
        _cfg(dataset_copy, num_frames=4)


@pytest.mark.parametrize("window", ["start", "center"])
def test_ground_truth_is_normalised_and_consistent(dataset, window):
    ds = TrainingDataset(_cfg(dataset, window=window, frame_stride=1))
    item = ds[0]
    T, H, W = 5, 64, 96
    assert item["depth"].shape == (T, H, W) and item["points"].shape == (T, H, W, 3)
    assert item["pose_enc"].shape == (T, 9) and item["video"].shape == (3, T, H, W)
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert torch.allclose(item["w2c"][0], torch.eye(4), atol=1e-6)  # relative to the first sampled frame
    valid = item["points_valid"]
    assert item["points"][valid].norm(dim=-1).mean().item() == pytest.approx(1.0, rel=1e-3)  # one scale
    # depth, points and cameras agree after normalisation: unprojecting depth j with camera j gives points j
    w2c, K = item["w2c"].double().numpy(), item["K"].double().numpy()
    for j in range(T):
        p = cam.unproject_depth(item["depth"][j].double().numpy(), K[j], cam.invert_pose(w2c[j]))
        both = (item["depth_valid"][j] & valid[j]).numpy()
        err = np.abs(p[both] - item["points"][j].double().numpy()[both]).max()
        assert err < 2e-2, (j, err)  # points are stored as float16
    assert torch.allclose(item["pose_enc"].double(), torch.from_numpy(cam.encode_pose(w2c, K, H, W)), atol=1e-5)
    rays = plucker_for_batch(item["w2c"][None], item["K"][None], H, W)[0]
    ref = cam.plucker_rays(K, cam.invert_pose(w2c), H, W)
    assert torch.allclose(rays.double(), torch.from_numpy(ref), atol=1e-4)


def test_resize_crop_adjusts_intrinsics():
    plan = ResizePlan.cover((64, 96), (32, 32))  # scale 0.5 -> 32x48, centre crop 8 px on each side
    assert plan.scaled_hw == (32, 48) and plan.crop_yx == (0, 8)
    K = np.array([[80.0, 0, 48], [0, 80, 32], [0, 0, 1]])
    K2 = plan.intrinsics(K)
    assert np.allclose(K2, [[40, 0, 16], [0, 40, 16], [0, 0, 1]])
    x = torch.arange(64 * 96, dtype=torch.float32).reshape(1, 1, 64, 96)
    assert plan.apply(x, "nearest").shape == (1, 1, 32, 32)


def test_random_window_is_seeded(dataset):
    ds = TrainingDataset(_cfg(dataset, window="random", frame_stride=1))
    a, b = ds[(0, 123)], ds[(0, 123)]
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["depth"], b["depth"])
    windows = {tuple(ds[(0, s)]["video"][:, 0, 0, 0].tolist()) for s in range(8)}
    assert len(windows) > 1  # different seeds pick different windows


def test_step_sampler_is_rank_consistent_and_resumable():
    one = StepSampler(5, batch_size=2, world_size=1, rank=0, seed=3, shuffle=True)
    ranks = [StepSampler(5, batch_size=1, world_size=2, rank=r, seed=3, shuffle=True) for r in range(2)]
    it1 = iter(one)
    its = [iter(s) for s in ranks]
    for _ in range(7):  # crosses epochs (3 global batches of 2 per epoch of 5, wrapped)
        global_batch = [next(it1)[0] for _ in range(2)]
        assert global_batch == [next(its[0])[0], next(its[1])[0]]
    later = StepSampler(5, batch_size=2, world_size=1, rank=0, seed=3, shuffle=True, start=7)
    assert [next(iter(later)) for _ in range(1)] == [next(it1)]


def test_nan_in_dataset_files_is_masked(dataset_copy):
    meta = load_metadata(dataset_copy)
    rec = meta.samples[0]
    depth_file, points_file = dataset_copy / rec.paths.depth, dataset_copy / rec.paths.points
    with np.load(depth_file) as z:
        depth = {k: z[k].copy() for k in z.files}
    with np.load(points_file) as z:
        points = {k: z[k].copy() for k in z.files}
    depth["depth"][0, 10:12, 20:22] = np.nan  # still marked valid in the file
    depth["depth"][2, 5, 5] = np.inf
    points["points"][0, 30, 40] = np.nan
    np.savez_compressed(depth_file, **depth)
    np.savez_compressed(points_file, **points)
    item = TrainingDataset(_cfg(dataset_copy, frame_stride=1, split="all"))[0]
    for key in ("depth", "points", "pose_enc", "w2c"):
        assert torch.isfinite(item[key]).all(), key
    assert not item["depth_valid"][0, 10:12, 20:22].any() and not item["depth_valid"][2, 5, 5]
    assert not item["points_valid"][0, 30, 40] and torch.isfinite(item["scale"])


def test_cache_contents_and_staleness(dataset_copy):
    cfg = _cfg(dataset_copy, height=32, width=48, frame_stride=2, cache="auto")
    cache = LatentCache.find(cfg)
    assert cache is not None and cache.random_init
    ds = TrainingDataset(cfg, text_dim=16, cache=cache)
    item = ds[0]
    assert item["latents"].shape == (16, 2, 4, 6) and item["text"].shape == (512, 16)
    assert "video" not in item
    used = int((item["text"].abs().sum(dim=1) > 0).sum())
    assert 0 < used < 512 and item["text"][used:].abs().sum() == 0  # zero-padded to 512 tokens
    info = json.loads((cache.dir / "cache.json").read_text())
    assert info["vae"]["latent"].startswith("posterior mode") and info["spec"]["frame_stride"] == 2
    with pytest.raises(CacheError, match="expects 32"):
        TrainingDataset(cfg, text_dim=32, cache=cache)
    _edit_metadata(dataset_copy, {0: {"notes": ["re-annotated"]}})
    with pytest.raises(CacheError, match="stale"):
        TrainingDataset(cfg, text_dim=16, cache=LatentCache.find(cfg))


class _RaisesInWorker(torch.utils.data.Dataset):
    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise self.error


@pytest.mark.parametrize("error", [DataError("shard-000001.tar is damaged: its sha256 does not match"),
                                   CacheError("cache entry 00000003 is damaged")])
def test_a_data_error_in_a_loader_worker_keeps_its_one_line(error):
    """torch re-raises a worker's exception with the worker's traceback in the message; the trainer's
    one-line errors stay one line (same class, the original message)."""
    loader = torch.utils.data.DataLoader(_RaisesInWorker(error), num_workers=1)
    with pytest.raises(type(error)) as caught:
        next(iter(loader))
    assert str(caught.value) == str(error)
    assert "\n" not in str(caught.value)
