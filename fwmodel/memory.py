"""Preflight: estimated memory per GPU of a training configuration, before any weight is loaded.

The estimate is analytic (parameter counts from the meta-device model, activation sizes from the
token counts) with per-token constants measured on the diffusers Wan blocks and on our heads; it is
meant to say "this cannot fit" early, not to predict the allocator to the megabyte. Pieces:

    frozen weights       backbone (+ the Stage-2 modules, frozen in Stage 1) at their dtype
    trainable state      fp32 weights + fp32 grads + AdamW (2 x fp32) [+ DDP buckets, fp32]
    activations          saved for backward: per token per block (video stream L tokens of width D,
                         geometry stream G tokens of width C), the DPT heads per output pixel,
                         the Plucker rays and camera encoder (Stage 2);
                         with gradient checkpointing only block inputs are kept plus one block's
                         recompute (and one DPT frame chunk)
    encoders             the VAE and UMT5 when there is no latent cache (encoded online)
    overhead             10 % + 1 GiB (allocator, CUDA context, workspaces)

`estimate_memory(...)` returns a `MemoryEstimate` (bytes per part); `check_fits` raises
`MemoryPreflightError` naming the knobs to turn when it exceeds the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from fwmodel.config import ModelConfig

GIB = 1024**3

# Saved activation bytes per token per channel for one block in bf16 (x2 in fp32). The frozen Wan
# block with gradients flowing through it: measured on the diffusers block (reference
# trainer-anchors section 3.2: 95 KB/token at width 1536). The trainable aggregator block (width
# 1024, MLP x4): counted from its saved tensors.
FROZEN_BLOCK_BYTES_PER_CHANNEL = 62.0
GEOMETRY_BLOCK_BYTES_PER_CHANNEL = 60.0
# Bi-cross-attention: saved elements per token per hidden channel (norms, q/k/v, outputs).
BICROSS_ELEMENTS_PER_CHANNEL = 8.0
# DPT head fusion: saved elements per output pixel per frame for one head (what a checkpointed
# frame chunk recomputes), and the multi-scale levels kept across chunks.
DPT_ELEMENTS_PER_PIXEL = 420.0
DPT_LEVEL_ELEMENTS_PER_PIXEL = 30.0
# Never checkpointed, per output pixel (both heads' causal temporal upsampling, the loss maps).
HEAD_AND_LOSS_BYTES_PER_PIXEL = 1210.0
# The three constants above were fitted to peaks measured with `fwmodel bench` on an H200
# (Wan2.1-1.3B, bf16, batch 1): Stage 1 at 21x336x592 with checkpointing 28.7 GiB and without
# 42.1 GiB, Stage 2 at 81x336x592 with checkpointing 52.6 GiB (see docs/TRAINING.md).
# Online encoders: UMT5-XXL and the Wan VAE weights in bf16, plus VAE encode activations.
UMT5_XXL_BYTES = 11.4e9
VAE_BYTES = 0.26e9
VAE_ENCODE_BYTES_PER_PIXEL = 1200.0


class MemoryPreflightError(RuntimeError):
    """The configuration cannot fit on the device; the message lists the knobs."""


@dataclass
class MemoryEstimate:
    parts: dict[str, float] = field(default_factory=dict)  # name -> bytes
    capacity: Optional[float] = None  # bytes available per device, when known
    device: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def lines(self) -> list[str]:
        rows = [f"  {name:<28} {value / GIB:8.2f} GiB" for name, value in self.parts.items()]
        rows.append(f"  {'total (estimate)':<28} {self.total / GIB:8.2f} GiB")
        if self.capacity:
            rows.append(f"  {'available on ' + self.device:<28} {self.capacity / GIB:8.2f} GiB")
        return rows + [f"  note: {n}" for n in self.notes]


def estimate_memory(
    config: ModelConfig,
    stage: int,
    batch_size: int,
    num_frames: int,
    height: int,
    width: int,
    gradient_checkpointing: bool,
    backbone_bytes: int = 2,
    activation_bytes: int = 2,
    world_size: int = 1,
    online_encoders: bool = False,
) -> MemoryEstimate:
    n_backbone, n_stage1, n_stage2 = _parameter_totals(config.model_dump_json())
    n_train = n_stage1 if stage == 1 else n_stage2
    n_stage2_only = n_stage2 - n_stage1

    est = MemoryEstimate()
    est.parts["frozen backbone"] = n_backbone * backbone_bytes
    if stage == 1:
        est.parts["frozen Stage-2 modules"] = n_stage2_only * 4
    est.parts["trainable weights+grads"] = n_train * 8
    est.parts["AdamW state"] = n_train * 8
    if world_size > 1:
        est.parts["DDP gradient buckets"] = n_train * 4

    # ---- activations ----------------------------------------------------------------------------
    a = activation_bytes / 2  # constants are for bf16
    S = (num_frames - 1) // 4 + 1
    h, w = height // 16, width // 16
    L = S * h * w  # video tokens per sample
    G = S * (config.num_special_tokens + h * w)  # geometry tokens per sample
    D, C = config.wan.dim, config.geometry.embed_dim
    n_irg, n_pcb = config.num_irg_blocks, config.num_pcb_blocks
    bd = config.interaction.bicross_dim
    pixels = num_frames * height * width

    geo_block = G * C * GEOMETRY_BLOCK_BYTES_PER_CHANNEL * a  # one aggregator block (frame or global)
    wan_block = L * D * FROZEN_BLOCK_BYTES_PER_CHANNEL * a if stage == 2 else 0.0
    bicross = (L + G) * bd * BICROSS_ELEMENTS_PER_CHANNEL * activation_bytes if stage == 2 else 0.0
    irg_block = 2 * geo_block + wan_block + bicross
    dpt_full = 2 * pixels * DPT_ELEMENTS_PER_PIXEL * activation_bytes  # both heads, every frame
    chunk = min(config.geometry.dpt_frames_chunk, num_frames * batch_size)
    dpt_chunk = chunk * height * width * DPT_ELEMENTS_PER_PIXEL * activation_bytes  # one head's chunk recomputed
    dpt_levels = 2 * pixels * DPT_LEVEL_ELEMENTS_PER_PIXEL * activation_bytes

    if gradient_checkpointing:
        inputs = n_irg * (G * C) * activation_bytes + (n_pcb + n_irg) * L * D * activation_bytes * (stage == 2)
        blocks = inputs + irg_block  # block inputs + one block recomputed in backward
        heads = dpt_levels * batch_size + dpt_chunk
    else:
        blocks = n_irg * irg_block + (n_pcb * wan_block)
        heads = dpt_full * batch_size
    est.parts["activations: blocks"] = blocks * batch_size
    est.parts["activations: DPT heads"] = heads
    est.parts["activations: upsampling + loss"] = HEAD_AND_LOSS_BYTES_PER_PIXEL * a * pixels * batch_size
    if stage == 2:
        est.parts["Plucker rays + camera encoder"] = 3 * batch_size * pixels * 6 * 4
    if online_encoders:
        est.parts["online VAE + UMT5"] = UMT5_XXL_BYTES + VAE_BYTES + VAE_ENCODE_BYTES_PER_PIXEL * pixels * 2
        est.notes.append("no latent cache: the VAE and UMT5 are held in memory (run `fwmodel cache` to drop them)")
    base = est.total
    est.parts["overhead (10% + 1 GiB)"] = 0.1 * base + GIB
    return est


@lru_cache(maxsize=8)
def _parameter_totals(config_json: str) -> tuple[int, int, int]:
    """(frozen backbone, Stage-1 trainable, Stage-2 trainable) parameter counts, from the meta-device model."""
    from fwmodel.params import parameter_report

    totals = parameter_report(ModelConfig.model_validate_json(config_json), 1).totals
    return totals.frozen, totals.stage1_trainable, totals.stage2_trainable


def device_capacity(device) -> tuple[Optional[float], str]:
    """Total memory of a CUDA device in bytes (None on CPU) and its name."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return float(props.total_memory), props.name
    return None, "cpu"


def check_fits(est: MemoryEstimate, stage: int, limit: float = 0.95) -> None:
    if est.capacity is None or est.total <= limit * est.capacity:
        return
    knobs = [
        "train.batch_size (per GPU) smaller, with train.grad_accum larger to keep the global batch",
        "model.gradient_checkpointing = true",
        "data.num_frames smaller (4k+1)",
    ]
    if stage == 1:
        knobs.insert(2, "data.height / data.width smaller (Stage 1 can train at lower resolution)")
    knobs.append("model.mixed_precision = \"bf16\" and model.backbone_dtype = \"bfloat16\"")
    knobs.append("a latent cache (`fwmodel cache`) so the VAE and UMT5 are not loaded")
    raise MemoryPreflightError(
        f"estimated {est.total / GIB:.1f} GiB per GPU, but {est.device} has {est.capacity / GIB:.1f} GiB; "
        "nothing was loaded. Reduce memory with: " + "; ".join(knobs) + ". "
        "(Set memory.check = false to try anyway.)\n" + "\n".join(est.lines())
    )
