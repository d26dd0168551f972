"""The [speed] flags: each one really changes how the step runs, and one training step with and without it gives
the same losses, grad norms and updated parameters to float tolerance (tiny preset, fp32, CPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fwmodel.bench import synthetic_batch
from fwmodel.config import get_preset
from fwmodel.data import move_batch
from fwmodel.train.distributed import Dist
from fwmodel.train.config import ConfigError, config_hash, load_config, parse_speed
from fwmodel.train.log import RunLogger
from fwmodel.train.model import build_model
from fwmodel.train.speed import COMPILE_BACKEND_ENV, apply_speed, check_speed
from fwmodel.train.step import build_optimizer, module_groups, train_step

SETS = ['model.preset="tiny"', 'model.wan_weights="random"', 'model.backbone_dtype="float32"',
        'model.mixed_precision="no"', "data.num_frames=5", "data.height=32", "data.width=48",
        "model.gradient_checkpointing=false"]


def _config(stage: int, speed: dict, extra=()):
    sets = [*SETS, f"train.stage={stage}", *extra]
    return load_config(None, sets=sets, overrides={f"speed.{k}": v for k, v in speed.items()})


def _run(stage: int, speed: dict, steps: int = 1, extra=(), record: bool = False):
    """`steps` trainer steps with the [speed] flags `speed`: (model, optimizer, last StepResult, step results)."""
    cfg = _config(stage, speed, extra)
    d = Dist()
    model = build_model(cfg, d.device, RunLogger(d, quiet=True, echo=lambda m: None))
    apply_speed(model, cfg, d.device)
    _, optimizer, scheduler = build_optimizer(model, cfg, d.device)
    groups = module_groups(model, stage)
    batch = synthetic_batch(get_preset("tiny"), stage, 1, 5, 32, 48, d.device)
    results = [train_step(model, itertools.repeat(batch), optimizer, scheduler, groups, cfg, d, step=s + 1,
                          describe=(lambda i, o: None) if record and s == 0 else None) for s in range(steps)]
    return model, optimizer, results


def _assert_same_step(a, b, rtol=1e-5, atol=1e-6):
    """Same losses, grad norms (global and per module) and updated trainable parameters."""
    (ma, _, ra), (mb, _, rb) = a, b
    for x, y in zip(ra, rb):
        assert not x.skipped and not y.skipped
        assert set(x.losses) == set(y.losses)
        for key in x.losses:
            torch.testing.assert_close(x.losses[key], y.losses[key], rtol=rtol, atol=atol, msg=key)
        torch.testing.assert_close(x.grad_norm, y.grad_norm, rtol=rtol, atol=atol)
        for key in x.module_grad_norms:
            torch.testing.assert_close(x.module_grad_norms[key], y.module_grad_norms[key], rtol=rtol, atol=atol,
                                       msg=key)
    pb = dict(mb.named_parameters())
    moved = 0
    for name, p in ma.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, pb[name], rtol=rtol, atol=atol, msg=name)
            moved += 1
    assert moved > 0
    assert float(ra[-1].grad_norm) > 0


@pytest.fixture(scope="module")
def baseline2():
    torch.manual_seed(0)
    return _run(2, {}, record=True)


def test_attention_math_equals_auto_and_the_kernels_are_recorded(baseline2):
    math = _run(2, {"attention_backend": "math"}, record=True)
    _assert_same_step(baseline2, math)
    auto_kernels, math_kernels = baseline2[2][0].attention_kernels, math[2][0].attention_kernels
    calls = sum(auto_kernels.values())
    # tiny Stage 2: 4 Wan blocks x (self + cross), 2 IRG x (frame + global + 2 bi-cross), camera head trunk
    assert calls >= 8 and sum(math_kernels.values()) == calls
    assert math_kernels == {"math": calls}  # every attention, ours and the Wan blocks', took the math path
    assert "flash (CPU)" in auto_kernels  # torch's own choice on a CPU is its fused flash kernel


def test_gpu_backends_on_a_cpu_are_one_line_errors():
    for backend in ("flash", "cudnn", "efficient"):
        cfg = _config(1, {"attention_backend": backend})
        with pytest.raises(ConfigError, match=f"speed.attention_backend = '{backend}' needs a CUDA GPU"):
            check_speed(cfg, torch.device("cpu"))
    check_speed(_config(1, {"attention_backend": "math"}), torch.device("cpu"))
    with pytest.raises(ConfigError, match="runs in bf16 only"):  # flash / cuDNN have no fp32 kernel
        check_speed(_config(1, {"attention_backend": "flash"}), torch.device("cuda"))
    check_speed(_config(1, {"attention_backend": "flash"}, extra=['model.mixed_precision="bf16"']),
                torch.device("cuda"))
    with pytest.raises(ConfigError, match="speed.attention_backend"):
        load_config(None, sets=['speed.attention_backend="sdpa"'])
    assert parse_speed(["compile=blocks", "fused_adamw=true", "ac_every=3"]) == {
        "compile": "blocks", "fused_adamw": True, "ac_every": 3}
    with pytest.raises(ConfigError, match="--speed nope"):
        parse_speed(["nope=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_speed(["compile"])


def test_compile_blocks_equals_eager_with_checkpointing(monkeypatch):
    """aot_eager: torch.compile's graph capture and autograd, no C compiler; with every block recomputed."""
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    eager = _run(2, {"activation_checkpointing": "full"}, steps=2)
    compiled = _run(2, {"activation_checkpointing": "full", "compile": "blocks"}, steps=2)
    model = compiled[0]
    assert model.geometry.aggregator.frame_blocks[0]._compiled_call_impl is not None
    assert model.backbone.wan.blocks[0].attn1._compiled_call_impl is not None
    assert model.interaction.bicross[0]._compiled_call_impl is not None
    # parameter names (checkpoints, DDP / FSDP2) are unchanged by the in-place compilation
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager[0].named_parameters()]
    _assert_same_step(eager, compiled, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_fused_adamw_equals_foreach_after_two_steps():
    fused = _run(1, {"fused_adamw": True}, steps=2)
    foreach = _run(1, {"fused_adamw": False}, steps=2)
    assert fused[1].defaults["fused"] and not foreach[1].defaults["fused"] and foreach[1].defaults["foreach"]
    _assert_same_step(fused, foreach)


def _saved_bytes(model, stage: int) -> int:
    """Bytes autograd keeps for backward in one forward (the outer saved-tensor hook: a checkpointed region's
    own hook takes precedence, so what it recomputes is not counted)."""
    cfg = _config(stage, {})
    batch = synthetic_batch(get_preset("tiny"), stage, 1, 5, 32, 48, "cpu")
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    from fwmodel.data import plucker_for_batch

    plucker = plucker_for_batch(batch["w2c"], batch["K"], 32, 48) if stage == 2 else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch["latents"], torch.full((1,), 500.0), batch["text"], plucker=plucker, video=stage == 2)
    del cfg
    return total


def test_activation_checkpointing_modes_equal_and_keep_less():
    runs = {mode: _run(2, {"activation_checkpointing": mode, "ac_every": 2}) for mode in ("off", "selective", "full")}
    _assert_same_step(runs["off"], runs["selective"])
    _assert_same_step(runs["off"], runs["full"])
    saved = {mode: _saved_bytes(run[0], 2) for mode, run in runs.items()}
    assert saved["off"] > saved["selective"] > saved["full"], saved
    # model.gradient_checkpointing (old configs) maps to full / off; speed.activation_checkpointing wins
    cfg = load_config(None, sets=[*SETS[:-1], "model.gradient_checkpointing=true"])
    model = build_model(cfg, torch.device("cpu"), RunLogger(Dist(), quiet=True, echo=lambda m: None))
    apply_speed(model, cfg, torch.device("cpu"))
    assert model.activation_checkpointing == "full" and model.geometry.depth_head.gradient_checkpointing
    model.gradient_checkpointing = False
    assert model.activation_checkpointing == "off" and not model.geometry.point_head.gradient_checkpointing


def test_dpt_channels_last_equal():
    plain = _run(1, {})
    cl = _run(1, {"dpt_channels_last": True})
    _assert_same_step(plain, cl)
    head = cl[0].geometry.depth_head
    assert head.channels_last and head._layout(torch.zeros(2, 3, 4, 5)).is_contiguous(
        memory_format=torch.channels_last)
    assert head._layout(torch.zeros(1, 3, 2, 4, 5)).is_contiguous(memory_format=torch.channels_last_3d)


def test_move_batch_keeps_the_batch():
    batch = synthetic_batch(get_preset("tiny"), 2, 1, 5, 32, 48, "cpu")
    batch["id"] = ["sample-0"]
    moved = move_batch(batch, torch.device("cpu"))
    assert moved.keys() == batch.keys() and moved["id"] == ["sample-0"]
    for k, v in batch.items():
        if torch.is_tensor(v):
            assert moved[k].dtype == v.dtype and torch.equal(moved[k], v), k


def test_speed_flags_are_not_hashed_for_resume():
    base = _config(1, {})
    fast = _config(1, {"attention_backend": "math", "compile": "blocks", "fused_adamw": True,
                       "activation_checkpointing": "selective", "dpt_channels_last": True, "pin_memory": False})
    assert config_hash(base) == config_hash(fast)
    assert config_hash(base) != config_hash(_config(1, {}, extra=["optim.lr=2e-5"]))


def _torchrun(parallel, out, dataset, stage1_checkpoint, recipe):
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "fwmodel.cli", "train", "--stage", "2", "--config", str(recipe), "--data", str(dataset),
            "--output", str(out), "--init-from", str(stage1_checkpoint), "--batch-size", "1", "--quiet",
            f"--set=train.parallel={parallel}", "--set=train.num_steps=2", "--set=train.log_every=1",
            '--set=speed.compile="blocks"', '--set=speed.activation_checkpointing="full"']
    env = {**os.environ, "OMP_NUM_THREADS": "1", COMPILE_BACKEND_ENV: "aot_eager"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_compiled_checkpointed_blocks_under_fsdp2(dataset, stage1_checkpoint, make_config, recipes,
                                                          metrics_of, tmp_path):
    """Compiled before wrapping: two FSDP2 processes equal one uncompiled process with the same global batch.
    (DDP passed the same check when written, with ("ddp", "fsdp2") here: about 2 minutes on 2 busy cores.)"""
    from fwmodel.train import train

    procs = {p: _torchrun(p, tmp_path / p, dataset, stage1_checkpoint, recipes[2]) for p in ("fsdp2",)}
    cfg = make_config(2, dataset, tmp_path / "single", model__init_from=str(stage1_checkpoint), train__batch_size=2,
                      train__num_steps=2, train__log_every=1)
    reference = {r["step"]: r for r in train(cfg, quiet=True).history}
    for parallel, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        log = (tmp_path / parallel / "train.log").read_text()
        assert "compile (aot_eager, dynamic=False):" in log and "activation checkpointing full" in log
        assert "SDPA kernels of the first forward: flash (CPU) x" in log
        rows = metrics_of(tmp_path / parallel)
        assert [r["step"] for r in rows] == [1, 2]
        for row in rows:
            for key in ("loss/total", "loss/diffusion", "loss/depth_loss", "loss/camera_loss", "grad_norm/total"):
                assert row[key] == pytest.approx(reference[row["step"]][key], rel=1e-4, abs=1e-6), (parallel, key)
