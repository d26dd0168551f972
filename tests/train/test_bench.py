"""`fwmodel bench` times the trainer's own step: same model, optimizer, clipping and grad norms."""

from __future__ import annotations

import itertools

import pytest
import torch

from fwmodel.bench import bench_config, prepare_bench, run_bench, synthetic_batch
from fwmodel.config import get_preset
from fwmodel.train.distributed import Dist
from fwmodel.train.config import load_config
from fwmodel.train.log import RunLogger
from fwmodel.train.model import build_model
from fwmodel.train.step import build_optimizer, module_groups, train_step

SIZE = dict(batch_size=1, num_frames=5, height=32, width=48)


# Adam's first update is lr * g / (|g| + eps): nearly blind to the scale of g at eps = 1e-8. With a large
# eps the update depends on the scale, so a step with and one without gradient clipping differ visibly.
EPS = 1e-2


def _trainer_step(stage: int, grad_clip: float = 1.0, eps: float = 1e-8):
    """One step of the trainer's pieces, set up from a config written the way a user writes one."""
    cfg = load_config(None, sets=[f"train.stage={stage}", "model.preset=tiny", 'model.wan_weights="random"',
                                  "model.gradient_checkpointing=false", 'model.backbone_dtype="float32"',
                                  'model.mixed_precision="no"', "data.num_frames=5", "data.height=32",
                                  "data.width=48", f"optim.grad_clip={grad_clip}", f"optim.eps={eps}"])
    d = Dist()
    model = build_model(cfg, d.device, RunLogger(d, quiet=True, echo=lambda m: None))
    _, optimizer, scheduler = build_optimizer(model, cfg, d.device)
    groups = module_groups(model, stage)
    batch = synthetic_batch(get_preset("tiny"), stage, 1, 5, 32, 48, d.device)
    out = train_step(model, itertools.repeat(batch), optimizer, scheduler, groups, cfg, d, step=1)
    return model, out


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("stage", [1, 2])
def test_bench_step_is_the_trainers_step(stage):
    cfg = bench_config("tiny", stage, gradient_checkpointing=False, mixed_precision="no", **SIZE)
    assert cfg.optim.grad_clip == 1.0  # the trainer's default
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"eps": EPS})})
    bench = prepare_bench(cfg, torch.device("cpu"))
    before = {id(p): p.detach().clone() for p in bench.model.parameters() if p.requires_grad}
    bench_out = bench.step(1)
    model, out = _trainer_step(stage, eps=EPS)

    trained = dict(model.named_parameters())
    for name, p in bench.model.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=1e-6, atol=1e-7, msg=name)
    assert not bench_out.skipped and not out.skipped
    for group, params in bench.groups.items():  # the AdamW step moved every module that got a gradient
        if float(bench_out.module_grad_norms[group]) > 0:
            assert any(not torch.equal(p, before[id(p)]) for p in params), group
    torch.testing.assert_close(bench_out.grad_norm, out.grad_norm)
    assert float(bench_out.grad_norm) > 1.0  # the clip to 1.0 rescaled the gradients in this step ...
    unclipped, _ = _trainer_step(stage, grad_clip=0.0, eps=EPS)
    assert _max_difference(bench.model, unclipped) > 100 * _max_difference(bench.model, model)  # ... visibly
    assert set(bench_out.module_grad_norms) == set(out.module_grad_norms) == set(module_groups(model, stage))
    # the total is the per-module norms combined, reported before clipping
    total = torch.linalg.vector_norm(torch.stack(list(bench_out.module_grad_norms.values())))
    torch.testing.assert_close(bench_out.grad_norm, total)
    assert torch.is_tensor(bench_out.losses["loss/total"])  # tensors: the caller decides when to sync
    assert ("loss/diffusion" in bench_out.losses) == (stage == 2)


def test_run_bench_reports_the_trainers_grad_norm():
    result = run_bench("tiny", 2, steps=1, warmup=0, gradient_checkpointing=False, mixed_precision="no",
                       device="cpu", count_flops=False, echo=lambda s: None, **SIZE)
    _, out = _trainer_step(2)
    assert result.grad_norm == pytest.approx(float(out.grad_norm), rel=1e-6)
    assert result.loss_total == pytest.approx(float(out.losses["loss/total"]), rel=1e-6)
    assert result.model_tflop_per_step is None and result.step_time_s > 0


def test_run_bench_refuses_zero_steps():
    with pytest.raises(ValueError, match="--steps must be at least 1"):
        run_bench("tiny", 1, steps=0, device="cpu", count_flops=False, **SIZE)
