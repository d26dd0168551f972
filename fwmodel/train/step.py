"""One optimizer step of the trainer, shared by `fwmodel train` and `fwmodel bench`.

    names, optimizer, scheduler = build_optimizer(model, cfg, device)   # AdamW + warmup/decay LR
    groups = module_groups(model, stage)                                 # grad-norm report groups
    result = train_step(model, micro_batches, optimizer, scheduler, groups, cfg, d, step=1)

A step is, for each of the cfg.train.grad_accum micro-batches: seeded noise (`add_noise`, one seed per
sample from (train.seed, global micro-batch index, global sample index)), Plucker rays (Stage 2),
forward under bf16 autocast (model.mixed_precision), the losses, backward of total / grad_accum
(DDP syncs gradients on the last micro-batch only); then the global grad norm and one per module
group, a skip when any rank saw a non-finite loss or gradient, clipping to optim.grad_clip, AdamW,
the LR schedule, zeroed gradients. The losses and norms come back as tensors on the device: the
caller decides when to copy them to the host (the trainer does at log steps). The one host sync in
the step is the finite check, which decides whether the optimizer steps.

The [speed] flags (fwmodel.train.speed): `apply_speed` sets the model-side ones before wrapping,
`build_optimizer` reads speed.fused_adamw, and the step runs forward and backward in
`attention_context` (the SDPA kernel of speed.attention_backend).
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from fwmodel.data import mix_seed
from fwmodel.train.distributed import Dist
from fwmodel.losses import add_noise, compute_losses
from fwmodel.stages import trainable_module_names
from fwmodel.train.speed import RecordAttention, attention_context, eager
from fwmodel.train.config import OptimSection, TrainConfig


def lr_factor(step: int, cfg: OptimSection, num_steps: int) -> float:
    """LR multiplier after `step` optimizer steps: linear warmup, then constant / cosine / linear decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, num_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def fused_adamw(cfg: TrainConfig, device: torch.device) -> bool:
    """speed.fused_adamw, unset: fused on CUDA (foreach elsewhere)."""
    return cfg.speed.fused_adamw if cfg.speed.fused_adamw is not None else device.type == "cuda"


def build_optimizer(model, cfg: TrainConfig, device: torch.device):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    fused = fused_adamw(cfg, device)  # False: the foreach implementation
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                  fused=fused, foreach=None if fused else True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, o, cfg.train.num_steps))
    return names, optimizer, scheduler


def module_groups(model, stage: int) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters per report module (geometry.aggregator, interaction.bicross, ...)."""
    groups: dict[str, list] = {m: [] for m in trainable_module_names(model, stage)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = ".".join(name.split(".")[:2])
            groups.setdefault(key, []).append(p)
    return {k: v for k, v in groups.items() if v}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: the local shard of a DTensor (FSDP2), else `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def grad_norms(groups: dict[str, list[torch.nn.Parameter]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(global L2 norm, L2 norm per group) of the gradients, 0-d fp32 on the device. FSDP2 gradients are
    DTensor shards: their squared norms are summed over all ranks (one all-reduce), so every rank gets
    the norms of the full gradients."""
    import torch.distributed as dist

    grads = {name: [p.grad for p in params if p.grad is not None] for name, params in groups.items()}
    if any(hasattr(g, "to_local") for gs in grads.values() for g in gs):  # FSDP2: sum of squares over the ranks
        squares = torch.stack([torch.stack([torch.linalg.vector_norm(g.to_local().float()) ** 2 for g in gs]).sum()
                               if gs else torch.zeros((), device=_local(groups[name][0]).device)
                               for name, gs in grads.items()])
        dist.all_reduce(squares)
        return squares.sum().sqrt(), dict(zip(groups, squares.sqrt().unbind()))
    per_module = {}
    for name, gs in grads.items():
        per_module[name] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in gs])) \
            if gs else torch.zeros((), device=groups[name][0].device)
    total = torch.linalg.vector_norm(torch.stack(list(per_module.values())))
    return total, per_module


def i2v_inputs(batch: dict, dtype: torch.dtype) -> dict:
    """The image-to-video model inputs of a micro-batch, cast to `dtype`: "condition" [B, 20, S, Hl, Wl] and
    "image_embeds" [B, N, image_dim] where the batch has them (fwmodel.i2v), else nothing (T2V)."""
    return {k: batch[k].to(dtype) for k in ("condition", "image_embeds") if k in batch}


@dataclass
class StepResult:
    """What one `train_step` did. Tensors are 0-d fp32 on the device, this rank's values."""

    losses: dict[str, torch.Tensor]  # loss terms ("loss/total", ...), mean over the micro-batches
    grad_norm: torch.Tensor  # global L2 norm of the trainable gradients, before clipping
    module_grad_norms: dict[str, torch.Tensor]  # the same per module group (`module_groups`)
    lr: float  # the learning rate the step used (before the scheduler advanced)
    skipped: bool  # a non-finite loss or gradient on some rank: no optimizer step (the schedule advanced)
    # with `describe`: the SDPA kernels of the first micro-batch's forward, kernel -> calls ("math": unfused)
    attention_kernels: Optional[dict[str, int]] = None


def train_step(model, micro_batches: Iterator[dict], optimizer: torch.optim.Optimizer, scheduler,
               groups: dict[str, list[torch.nn.Parameter]], cfg: TrainConfig, d: Dist, *, step: int,
               describe: Optional[Callable[[dict, dict], None]] = None) -> StepResult:
    """Optimizer step number `step` (1-based) over cfg.train.grad_accum micro-batches from `micro_batches`.

    `model` is the FantasyWorldModel, its DistributedDataParallel wrapper, or the model sharded by
    FSDP2 (`fwmodel.train.parallel.wrap_model`; one
    process: `Dist(device=...)`; autocast runs on d.device's type). Each
    micro-batch is a dict on the device: "latents" [B, 16, S, H/8, W/8], "text" [B, L, text_dim], the
    ground truth `compute_losses` reads (depth, points, pose_enc and their masks) and, for Stage 2,
    "w2c" [B, T, 4, 4] and "K" [B, T, 3, 3] (pixels of cfg.data.height x width) for the Plucker rays;
    for an image-to-video preset also "condition" and "image_embeds" (`i2v_inputs`).
    `groups`: the trainable parameters per module (`module_groups`). `describe(inputs, outputs)` is
    called once with the first micro-batch's model inputs and outputs (the trainer logs their shapes);
    that forward runs eagerly (no compiled blocks) with the SDPA kernels recorded (`attention_kernels`).
    Forward and backward run in `attention_context(cfg)` (speed.attention_backend).
    """
    from torch.nn.parallel import DistributedDataParallel

    from fwmodel.train.parallel import is_fsdp

    tcfg, stage = cfg.train, cfg.train.stage
    ddp, fsdp = isinstance(model, DistributedDataParallel), is_fsdp(model)
    core = model.module if ddp else model  # the FantasyWorldModel (FSDP2 shards it in place)
    backbone = core.backbone
    backbone_dtype = next(backbone.parameters()).dtype
    autocast = (torch.autocast(d.device.type, dtype=torch.bfloat16) if cfg.model.mixed_precision == "bf16"
                else nullcontext())
    terms_sum: dict[str, torch.Tensor] = {}
    finite: list[torch.Tensor] = []
    record = None
    for micro in range(tcfg.grad_accum):
        batch = next(micro_batches)
        k = (step - 1) * tcfg.grad_accum + micro  # global micro-batch index
        B = batch["latents"].shape[0]
        seeds = [mix_seed(tcfg.seed, k, d.rank * tcfg.batch_size + b, 7) for b in range(B)]
        noised = add_noise(batch["latents"], cfg.diffusion, seeds)
        # the rays of the model's own convention (config.interaction.plucker_intrinsics), as generation builds them
        plucker = core.camera_rays(batch["w2c"], batch["K"], cfg.data.height, cfg.data.width) if stage == 2 else None
        sync = ddp and micro < tcfg.grad_accum - 1
        if fsdp:  # reduce-scatter the gradients on the last micro-batch only
            model.set_requires_gradient_sync(micro == tcfg.grad_accum - 1)
        if describe is not None and micro == 0:  # eager (recompute in backward too), SDPA kernels recorded
            record = RecordAttention()
        with attention_context(cfg), eager(record is not None and micro == 0), \
                (model.no_sync() if sync else nullcontext()):
            with autocast, (record if record is not None and micro == 0 else nullcontext()):
                outputs = model(noised.noisy.to(backbone_dtype), noised.timestep,
                                batch["text"].to(backbone_dtype), plucker=plucker, video=stage == 2,
                                **i2v_inputs(batch, backbone_dtype))
                losses = compute_losses(outputs, batch, stage, cfg.loss, noised)
            (losses.total / tcfg.grad_accum).backward()
        finite.append(torch.isfinite(losses.total.detach()))
        for key, value in losses.terms.items():
            terms_sum[key] = terms_sum.get(key, 0) + value.float() / tcfg.grad_accum
        if describe is not None and micro == 0:
            describe({"latents": noised.noisy, "timestep": noised.timestep, "text": batch["text"],
                      "plucker": plucker, "depth": batch["depth"], "points": batch["points"],
                      "pose_enc": batch["pose_enc"], **i2v_inputs(batch, batch["latents"].dtype)}, outputs)
        del outputs, losses

    total_norm, module_norms = grad_norms(groups)
    finite.append(torch.isfinite(total_norm))
    bad = d.any(not bool(torch.stack(finite).all()))  # the step's one host sync
    if bad:
        optimizer.zero_grad(set_to_none=True)
    else:
        if cfg.optim.grad_clip > 0:
            coef = (cfg.optim.grad_clip / (total_norm + 1e-6)).clamp(max=1.0)
            for ps in groups.values():
                for p in ps:
                    if p.grad is not None:  # the local shard of a DTensor gradient (FSDP2)
                        _local(p.grad).mul_(coef.to(_local(p.grad).device))
        optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():  # a skipped step still advances the schedule (torch warns about the order)
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(terms_sum, total_norm, module_norms, lr, bad, record.summary() if record is not None else None)
