"""Trainer behaviour: non-finite steps, preflight, precision options, bench."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import fwmodel.train.step as train_module
from fwmodel.cli import app
from fwmodel.memory import MemoryPreflightError, estimate_memory
from fwmodel.train import train

runner = CliRunner()


def _nan_at(monkeypatch, steps):
    """Make compute_losses return a NaN loss on the given calls (one call per micro-step)."""
    real = train_module.compute_losses
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        if steps == "all" or calls["n"] in steps:
            losses.total = losses.total * float("nan")
        return losses

    monkeypatch.setattr(train_module, "compute_losses", patched)


def test_non_finite_step_is_skipped_and_counted(dataset, make_config, tmp_path, monkeypatch, metrics_of):
    _nan_at(monkeypatch, {2})
    out = tmp_path / "run"
    result = train(make_config(1, dataset, out, train__num_steps=3, train__checkpoint_every=3), quiet=True)
    assert result.step == 3 and result.skipped == 1
    rows = metrics_of(out)
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 1]
    assert "step 2: non-finite loss or gradient, step skipped" in (out / "train.log").read_text()
    assert all(torch.isfinite(p).all() for p in _weights(out / "step-3.safetensors").values())


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_too_many_non_finite_steps_abort_with_exit_1(dataset, recipes, tmp_path, monkeypatch):
    _nan_at(monkeypatch, "all")
    result = runner.invoke(app, ["train", "--stage", "1", "--config", str(recipes[1]), "--data", str(dataset),
                                 "--output", str(tmp_path / "run"), "--set", "train.max_nonfinite_steps=1"])
    assert result.exit_code == 1, result.output
    assert "aborted at step 2" in result.output and "max_nonfinite_steps" in result.output


def test_preflight_refuses_before_loading_weights(dataset, make_config, tmp_path):
    cfg = make_config(1, dataset, tmp_path / "run", memory__limit_gb=0.5, model__wan_weights="/no/such/weights")
    with pytest.raises(MemoryPreflightError, match="nothing was loaded") as err:
        train(cfg, quiet=True)
    assert "train.batch_size" in str(err.value) and "data.height" in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written either


def test_memory_estimate_reacts_to_the_knobs():
    from fwmodel.config import get_preset

    config = get_preset("wan2.1-t2v-1.3b")

    def gib(**kw):
        args = dict(stage=2, batch_size=1, num_frames=81, height=336, width=592, gradient_checkpointing=True)
        args.update(kw)
        return estimate_memory(config, **args).total / 2**30

    base = gib()
    assert gib(gradient_checkpointing=False) > 2 * base
    assert gib(batch_size=2) > base and gib(num_frames=21) < base and gib(stage=1) < base
    assert gib(online_encoders=True) > base + 10  # UMT5-XXL without a cache
    assert 10 < base < 80


def test_bf16_autocast_step_on_cpu(dataset, make_config, tmp_path):
    cfg = make_config(2, dataset, tmp_path / "run", model__mixed_precision="bf16", model__backbone_dtype="bfloat16",
                      model__gradient_checkpointing=True, train__num_steps=1, train__checkpoint_every=1)
    # Stage 2 from scratch is refused; start from a fresh Stage-1 file of the same run settings
    s1 = make_config(1, dataset, tmp_path / "s1", train__num_steps=1, train__checkpoint_every=1)
    train(s1, quiet=True)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": tmp_path / "s1" / "step-1.safetensors"})})
    result = train(cfg, quiet=True)
    assert result.step == 1 and result.skipped == 0
    assert all(v == v for k, v in result.last_metrics.items() if k.startswith("loss/"))  # finite, not NaN


def test_bench_reports_throughput_and_flops(capsys):
    from fwmodel.bench import render, run_bench

    result = run_bench("tiny", 2, batch_size=1, num_frames=5, height=32, width=48, steps=2, warmup=1,
                       gradient_checkpointing=False, mixed_precision="no", device="cpu", flops_device="cpu",
                       echo=lambda s: None)
    assert result.step_time_s > 0 and result.tokens_per_s > 0 and result.video_tokens_per_sample == 2 * 2 * 3
    assert result.model_tflop_per_step > 0 and result.achieved_tflops > 0
    assert result.mfu is None  # CPU: no known peak
    text = render(result)
    assert "tokens/s" in text and "MFU" in text and "peak memory" in text
