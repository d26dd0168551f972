"""`fwmodel bench`: time real training steps with synthetic inputs of the configured size.

One step is the trainer's own step, `fwmodel.train.step.train_step`, on the trainer's model
(`build_model`) and optimizer (`build_optimizer`: AdamW + LR schedule, default [optim] settings):
seeded noise, Plucker rays from the cameras (Stage 2), forward (Stage 1: geometry only; Stage 2:
video + geometry), the real losses, backward, the grad norms per module, clipping to optim.grad_clip,
AdamW. Only the inputs are synthetic (`synthetic_batch`, a cached-latent batch of the configured size)
and the backbone has random weights (no download needed; the speed of a frozen block does not depend
on its values).

Reported:
    step time       median of the timed steps (after warm-up), seconds
    tokens/s        video tokens (latent frames x H/16 x W/16 per sample) processed per second
    TFLOP/s         model FLOPs per step / step time. Model FLOPs are counted exactly with
                    torch's FlopCounterMode on the meta device (no memory), forward + backward,
                    *without* the recomputation of gradient checkpointing (the MFU convention)
    MFU             TFLOP/s / the device's dense bf16 peak (known GPUs, or --peak-tflops)
    peak memory     torch.cuda.max_memory_allocated (CPU: peak resident set size), and the
                    preflight estimate for the same configuration
    grad norm       the global grad norm of the last timed step, before clipping (finite: the step ran)
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
from pydantic import BaseModel

from fwmodel.config import get_preset
from fwmodel.train.distributed import Dist, allow_tf32
from fwmodel.memory import GIB, estimate_memory
from fwmodel.train.config import TrainConfig, checkpointing_mode
from fwmodel.train.log import RunLogger, peak_memory_gib
from fwmodel.train.model import build_model
from fwmodel.train.speed import apply_speed
from fwmodel.train.step import StepResult, build_optimizer, module_groups, train_step

# Dense bf16 peak TFLOP/s (no sparsity). Checked in this order (H200 before H20).
PEAK_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("4090", 165.0),
    ("B200", 2250.0),
]


class BenchResult(BaseModel):
    preset: str
    stage: int
    device: str
    batch_size: int
    num_frames: int
    height: int
    width: int
    gradient_checkpointing: bool
    mixed_precision: str
    video_tokens_per_sample: int
    steps: int
    step_time_s: float
    step_times_s: list[float]
    tokens_per_s: float
    samples_per_s: float
    model_tflop_per_step: Optional[float]
    achieved_tflops: Optional[float]
    peak_tflops: Optional[float]
    mfu: Optional[float]
    peak_memory_gib: float
    estimated_memory_gib: float
    speed: dict = {}  # the [speed] flags of the run (fwmodel.train.config.SpeedSection)
    attention_kernels: Optional[dict[str, int]] = None  # SDPA kernels of the first warm-up forward
    grad_norm: float  # global grad norm of the last timed step, before clipping
    loss_total: float  # loss/total of the last timed step


def device_peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


def synthetic_batch(config, stage: int, batch: int, frames: int, height: int, width: int, device, seed: int = 0):
    """A micro-batch as the trainer's loader gives it with a latent cache (`train_step`'s input), on `device`:
    latents [B, 16, S, H/8, W/8], text [B, 512, text_dim], depth/points ground truth with all-valid masks,
    pose_enc [B, T, 9], identity w2c and a pinhole K (focal W/2, pixels) per frame; for an image-to-video
    preset also condition [B, 20, S, H/8, W/8] (the real `condition_mask` + a random first-frame latent) and
    image_embeds [B, N, image_dim] (N = `fwmodel.i2v.num_image_tokens`: 257 for the released CLIP). Seeded by
    `seed` (the T2V tensors are the same with or without the I2V ones)."""
    g = torch.Generator().manual_seed(seed)
    S = (frames - 1) // 4 + 1
    eye = torch.eye(4).expand(batch, frames, 4, 4).clone()
    K = torch.tensor([[width / 2, 0, width / 2], [0, width / 2, height / 2], [0, 0, 1.0]]).expand(batch, frames, 3, 3)
    data = {
        "latents": torch.randn(batch, 16, S, height // 8, width // 8, generator=g),
        "text": torch.randn(batch, 512, config.wan.text_dim, generator=g),
        "depth": torch.rand(batch, frames, height, width, generator=g) + 0.5,
        "depth_valid": torch.ones(batch, frames, height, width, dtype=torch.bool),
        "points": torch.randn(batch, frames, height, width, 3, generator=g),
        "points_valid": torch.ones(batch, frames, height, width, dtype=torch.bool),
        "pose_enc": torch.randn(batch, frames, 9, generator=g) * 0.1,
        "w2c": eye,
        "K": K.clone(),
    }
    data.update(synthetic_i2v(config, batch, frames, height, width, g))
    return {k: v.to(device) for k, v in data.items()}


def synthetic_i2v(config, batch: int, frames: int, height: int, width: int, generator=None) -> dict:
    """{"condition", "image_embeds"} of `synthetic_batch` for an image-to-video preset (fwmodel.i2v), {} else."""
    from fwmodel.i2v import is_i2v, num_image_tokens, with_mask

    if not is_i2v(config):
        return {}
    S = (frames - 1) // 4 + 1
    latent = torch.randn(batch, 16, S, height // 8, width // 8, generator=generator)
    image = torch.randn(batch, num_image_tokens(config.wan.image_dim), config.wan.image_dim, generator=generator)
    return {"condition": with_mask(latent), "image_embeds": image}


def count_model_flops(config, stage: int, batch: int, frames: int, height: int, width: int,
                      device: str = "meta") -> float:
    """Forward + backward FLOPs of one step (no recompute).

    On the meta device by default (shapes only: no memory, works for 14B; a few seconds of Python
    per thousand ops). `device="cpu"` runs the step for real, which is quicker for tiny models.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from fwmodel.model import FantasyWorldModel
    from fwmodel.stages import set_trainable

    with torch.device(device):
        model = FantasyWorldModel(config)
    set_trainable(model, stage)
    model.train()
    S = (frames - 1) // 4 + 1
    with torch.device(device):
        latents = torch.randn(batch, 16, S, height // 8, width // 8)
        text = torch.randn(batch, 512, config.wan.text_dim)
        plucker = torch.randn(batch, frames, height, width, 6) if stage == 2 else None
        timestep = torch.full((batch,), 500.0)
    i2v = {k: v.to(device) for k, v in synthetic_i2v(config, batch, frames, height, width).items()}
    with FlopCounterMode(display=False) as counter:
        out = model(latents, timestep, text, plucker=plucker, video=stage == 2, **i2v)
        loss = sum(out[k].float().sum() for k in ("depth", "points", "depth_conf", "points_conf"))
        loss = loss + sum(p.sum() for p in out["pose_enc_list"])
        if out["video"] is not None:
            loss = loss + out["video"].float().sum()
        loss.backward()
    return float(counter.get_total_flops())


def bench_config(preset: str, stage: int, batch_size: int = 1, num_frames: int = 81, height: int = 336,
                 width: int = 592, gradient_checkpointing: bool = True, mixed_precision: str = "bf16",
                 speed: Optional[dict] = None) -> TrainConfig:
    """The training config the bench runs: the given size and precision, random Wan weights (backbone in bf16
    with mixed_precision bf16, else fp32), one micro-batch per step, the [speed] flags `speed` (key -> value,
    e.g. {"compile": "blocks"}), every other setting the trainer's default."""
    bf16 = mixed_precision == "bf16"
    return TrainConfig.model_validate({
        "speed": dict(speed or {}),
        "train": {"stage": stage, "batch_size": batch_size},
        "model": {"preset": preset, "wan_weights": "random", "gradient_checkpointing": gradient_checkpointing,
                  "backbone_dtype": "bfloat16" if bf16 else "float32", "mixed_precision": mixed_precision},
        "data": {"num_frames": num_frames, "height": height, "width": width},
    })


@dataclass
class BenchStep:
    """The trainer's model, optimizer, LR schedule and grad-norm groups for `cfg`, and one synthetic batch."""

    cfg: TrainConfig
    dist: Dist
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    groups: dict
    batch: dict

    def step(self, step: int) -> StepResult:
        """Optimizer step number `step` (1-based: its noise seeds) on the synthetic batch: `train_step`."""
        return train_step(self.model, itertools.repeat(self.batch), self.optimizer, self.scheduler, self.groups,
                          self.cfg, self.dist, step=step)


def prepare_bench(cfg: TrainConfig, device: torch.device) -> BenchStep:
    """Build what `train()` builds for `cfg` on `device` (`build_model`, `build_optimizer`, `module_groups`)."""
    d = Dist(device=device)
    if device.type == "cuda":
        allow_tf32(not cfg.train.deterministic)  # as init_distributed does for the trainer
    model = build_model(cfg, device, RunLogger(d, quiet=True, echo=lambda m: None))
    apply_speed(model, cfg, device)  # [speed], as the trainer does before the optimizer
    _, optimizer, scheduler = build_optimizer(model, cfg, device)
    config = get_preset(cfg.model.preset)
    batch = synthetic_batch(config, cfg.train.stage, cfg.train.batch_size, cfg.data.num_frames, cfg.data.height,
                            cfg.data.width, device)
    return BenchStep(cfg, d, model, optimizer, scheduler, module_groups(model, cfg.train.stage), batch)


def run_bench(
    preset: str,
    stage: int,
    batch_size: int = 1,
    num_frames: int = 81,
    height: int = 336,
    width: int = 592,
    steps: int = 5,
    warmup: int = 2,
    gradient_checkpointing: bool = True,
    mixed_precision: str = "bf16",
    device: str = "auto",
    peak_tflops: Optional[float] = None,
    count_flops: bool = True,
    flops_device: str = "meta",
    echo=print,
    speed: Optional[dict] = None,
) -> BenchResult:
    """Time `steps` trainer steps (`train_step`) after `warmup` untimed ones; see the module docstring."""
    if (num_frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError("frames must be 4k+1 and height/width multiples of 16")
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be at least 1 and --warmup at least 0 (got {steps} and {warmup})")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    config = get_preset(preset)
    bf16 = mixed_precision == "bf16"
    cfg = bench_config(preset, stage, batch_size, num_frames, height, width, gradient_checkpointing,
                       mixed_precision, speed)
    gradient_checkpointing = checkpointing_mode(cfg) != "off"  # speed.activation_checkpointing may override
    est = estimate_memory(config, stage, batch_size, num_frames, height, width, gradient_checkpointing,
                          2 if bf16 else 4, 2 if bf16 else 4)
    flops = count_model_flops(config, stage, batch_size, num_frames, height, width, flops_device) if count_flops else None

    bench = prepare_bench(cfg, dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    kernels = None
    for i in range(warmup):
        if i == 0:  # the first warm-up step runs eagerly and records the SDPA kernels (compiling starts at the 2nd)
            kernels = train_step(bench.model, itertools.repeat(bench.batch), bench.optimizer, bench.scheduler,
                                 bench.groups, bench.cfg, bench.dist, step=1,
                                 describe=lambda inputs, outputs: None).attention_kernels
        else:
            bench.step(i + 1)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        last = bench.step(warmup + i + 1)
        sync()
        times.append(time.perf_counter() - t0)
        echo(f"  step {i + 1}/{steps}: {times[-1]:.3f} s")
    peak_mem = peak_memory_gib(dev)
    step_time = statistics.median(times)
    S = (num_frames - 1) // 4 + 1
    tokens = S * (height // 16) * (width // 16)
    peak = peak_tflops or device_peak_tflops(dev)
    achieved = flops / step_time / 1e12 if flops is not None else None
    return BenchResult(
        preset=preset, stage=stage,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        batch_size=batch_size, num_frames=num_frames, height=height, width=width,
        gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
        video_tokens_per_sample=tokens, steps=steps, step_time_s=step_time, step_times_s=times,
        tokens_per_s=tokens * batch_size / step_time, samples_per_s=batch_size / step_time,
        model_tflop_per_step=flops / 1e12 if flops is not None else None,
        achieved_tflops=achieved, peak_tflops=peak,
        mfu=achieved / peak if (achieved is not None and peak) else None,
        peak_memory_gib=peak_mem, estimated_memory_gib=est.total / GIB,
        speed=cfg.speed.model_dump(mode="json"), attention_kernels=kernels,
        grad_norm=float(last.grad_norm), loss_total=float(last.losses["loss/total"]),
    )


def render(result: BenchResult) -> str:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    return "\n".join([
        f"bench: preset {result.preset}, Stage {result.stage}, {result.device}, batch {result.batch_size}, "
        f"{result.num_frames}x{result.height}x{result.width} ({result.video_tokens_per_sample} video tokens/sample), "
        f"checkpointing {'on' if result.gradient_checkpointing else 'off'}, {result.mixed_precision}",
        f"  speed            " + (", ".join(f"{k} {v}" for k, v in result.speed.items()) or "defaults"),
        f"  attention        " + (", ".join(f"{k} x {n}" for k, n in sorted(result.attention_kernels.items()))
                                  if result.attention_kernels else "not recorded (--warmup 0)"),
        f"  step time        {result.step_time_s:.3f} s (median of {result.steps})",
        f"  tokens/s         {result.tokens_per_s:,.0f}",
        f"  samples/s        {result.samples_per_s:.3f}",
        f"  model TFLOP/step {f(result.model_tflop_per_step, '.2f')}",
        f"  achieved TFLOP/s {f(result.achieved_tflops, '.1f')}",
        f"  MFU              {'n/a' if result.mfu is None else f'{100 * result.mfu:.1f}%'}"
        + (f" (peak {result.peak_tflops:.0f} TFLOP/s bf16)" if result.peak_tflops else " (unknown device peak: --peak-tflops)"),
        f"  peak memory      {result.peak_memory_gib:.2f} GiB (preflight estimate {result.estimated_memory_gib:.2f} GiB)",
        f"  last step        loss {result.loss_total:.4f}, grad norm {result.grad_norm:.4f} (before clipping)",
    ])
