"""Preflight: estimated memory per GPU of a training configuration, before any weight is loaded.

The estimate is analytic (parameter counts from the meta-device model, activation sizes from the
token counts) with per-token constants measured on the diffusers Wan blocks and on our heads; it is
meant to say "this cannot fit" early, not to predict the allocator to the megabyte. Pieces:

    frozen weights       backbone (+ the Stage-2 modules, frozen in Stage 1) at their dtype, replicated
                         on every rank with either strategy (fwmodel.train.parallel leaves them out of FSDP2);
                         fsdp2 with train.fsdp_shard_backbone: the Wan blocks / world_size (the rest of
                         the backbone, embeddings and head, replicated) plus two all-gathered copies of
                         the largest block in its stored dtype (the one running, the one prefetched)
    trainable state      fp32 weights + fp32 grads + AdamW (2 x fp32) of the N trainable parameters:
                         ddp:   16 N bytes on every rank [+ DDP buckets, 4 N, when world_size > 1]
                         fsdp2: 16 N / world_size (the dim-0 shards), plus the transient buffers of
                         fwmodel.train.parallel's groups in the compute dtype c (2 for bf16, else 4):
                         gathered weights  (root + 2 x largest block group) x c   (the root group stays
                                           gathered forward through backward; one block group is
                                           prefetched while the previous one runs)
                         grad buffers      (root + largest block group) x (c + 4)  (unsharded grads and
                                           the fp32 reduce-scatter input; counted as if at the
                                           activation peak: conservative)
    activations          saved for backward: per token per block (video stream L tokens of width D,
                         geometry stream G tokens of width C), the DPT heads per output pixel,
                         the Plucker rays and camera encoder (Stage 2);
                         with gradient checkpointing only block inputs are kept plus one block's
                         recompute (and one DPT frame chunk);
                         I2V presets (Stage 2): the 257 CLIP image tokens in the context of every
                         cross-attention (their key/value, and the image attention's output per
                         video token); the 36 input channels are negligible (not counted)
    encoders             the VAE and UMT5 when there is no latent cache (encoded online), and for I2V
                         presets the CLIP image encoder (ViT-H/14)
    overhead             10 % + 1 GiB (allocator, CUDA context, workspaces)

`estimate_memory(...)` returns a `MemoryEstimate` (bytes per part); `check_fits` raises
`MemoryPreflightError` naming the knobs to turn when it exceeds the device. `config_estimate(cfg, ...)`
is the estimate of a training config (what `fwmodel train` checks and `fwmodel memory` prints);
`render_comparison` prints several side by side with the category subtotals.
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
# I2V presets: the CLIP ViT-H/14 image encoder of Wan2.1-I2V (632 M parameters, bf16), online without a
# cache, and the image tokens it puts in every cross-attention's context (16 x 16 patches + CLS).
CLIP_IMAGE_ENCODER_BYTES = 632e6 * 2
CLIP_IMAGE_TOKENS = 257
# Saved elements per cross-attention with image tokens (counted from diffusers' WanAttnProcessor): per
# image token per channel its key, normalised key and value; per video token per channel the image
# attention's output (added to the text attention's).
IMAGE_CONTEXT_ELEMENTS_PER_CHANNEL = 3.0
IMAGE_ATTENTION_ELEMENTS_PER_CHANNEL = 1.0
# Part name -> category of the summary (first matching prefix).
CATEGORIES = (("frozen", "frozen weights"), ("trainable", "trainable state"), ("AdamW", "trainable state"),
              ("DDP", "trainable state"), ("FSDP2", "trainable state"), ("activations", "activations"),
              ("Plucker", "activations"), ("online", "encoders"), ("overhead", "overhead"))
PARALLEL = ("ddp", "fsdp2")


class MemoryPreflightError(RuntimeError):
    """The configuration cannot fit on the device; the message lists the knobs."""


def _category(part: str) -> str:
    return next(c for prefix, c in CATEGORIES if part.startswith(prefix))


@dataclass
class MemoryEstimate:
    parts: dict[str, float] = field(default_factory=dict)  # name -> bytes
    capacity: Optional[float] = None  # bytes available per device, when known
    device: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def category_totals(self) -> dict[str, float]:
        """Bytes per category (frozen weights, trainable state, activations, encoders, overhead)."""
        out: dict[str, float] = {}
        for name, value in self.parts.items():
            out[_category(name)] = out.get(_category(name), 0.0) + value
        return out

    def trainable_state(self) -> float:
        """Bytes per rank of the trainable weights, gradients and AdamW moments (no transient buffers)."""
        return self.parts["trainable weights+grads"] + self.parts["AdamW state"]

    def fits(self, limit: float = 0.95) -> Optional[bool]:
        """Whether the total is within `limit` of the capacity (None when the capacity is unknown)."""
        return None if self.capacity is None else self.total <= limit * self.capacity

    def summary(self, limit: float = 0.95) -> dict:
        """JSON-ready: GiB per part and per category, the total, the capacity, whether it fits, the notes."""
        def gib(v):
            return None if v is None else round(v / GIB, 3)

        return {"parts_gib": {k: gib(v) for k, v in self.parts.items()},
                "categories_gib": {k: gib(v) for k, v in self.category_totals().items()},
                "total_gib": gib(self.total), "capacity_gib": gib(self.capacity), "device": self.device,
                "limit": limit, "fits": self.fits(limit), "notes": list(self.notes)}

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
    parallel: str = "ddp",
    shard_backbone: bool = False,
) -> MemoryEstimate:
    """Bytes per GPU of one training step (see the module docstring): `backbone_bytes` / `activation_bytes`
    2 (bf16) or 4 (fp32); `parallel` "ddp" or "fsdp2" (train.parallel; only matters when world_size > 1,
    as in the trainer); `online_encoders`: no latent cache; `shard_backbone`: train.fsdp_shard_backbone
    (fsdp2 only)."""
    from fwmodel.i2v import is_i2v

    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if shard_backbone and parallel != "fsdp2":
        raise ValueError("shard_backbone (train.fsdp_shard_backbone) needs parallel = \"fsdp2\"")
    n_backbone, n_stage1, n_stage2 = _parameter_totals(config.model_dump_json())
    n_train = n_stage1 if stage == 1 else n_stage2
    n_stage2_only = n_stage2 - n_stage1
    fsdp = parallel == "fsdp2" and world_size > 1
    i2v = is_i2v(config)

    est = MemoryEstimate()
    if fsdp and shard_backbone:  # fwmodel.train.parallel.shard_backbone_blocks
        n_blocks, n_block = backbone_blocks(config)
        est.parts["frozen backbone"] = (n_backbone - n_blocks + n_blocks / world_size) * backbone_bytes
        est.parts["frozen backbone: 2 gathered blocks"] = 2 * n_block * backbone_bytes
    else:
        est.parts["frozen backbone"] = n_backbone * backbone_bytes
    if stage == 1:
        est.parts["frozen Stage-2 modules"] = n_stage2_only * 4
    shards = world_size if fsdp else 1
    est.parts["trainable weights+grads"] = n_train * 8 / shards
    est.parts["AdamW state"] = n_train * 8 / shards
    if fsdp:
        root, block = _fsdp_groups(config.model_dump_json(), stage)
        c = activation_bytes  # the MixedPrecisionPolicy's param dtype (bf16 runs), else fp32
        est.parts["FSDP2 gathered weights"] = (root + 2 * block) * c
        est.parts["FSDP2 grads + reduce-scatter"] = (root + block) * (c + 4)
        est.notes.append(f"FSDP2: trainable state sharded over {world_size} ranks; the frozen backbone "
                         + ("blocks sharded too (train.fsdp_shard_backbone)" if shard_backbone else "replicated"))
    elif world_size > 1:
        est.parts["DDP gradient buckets"] = n_train * 4
    elif parallel == "fsdp2":
        est.notes.append("one process: train.parallel = fsdp2 shards nothing (as in the trainer)")

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
    if i2v and stage == 2:  # the image tokens in every Wan block's cross-attention (one block recomputed)
        per_block = (CLIP_IMAGE_TOKENS * IMAGE_CONTEXT_ELEMENTS_PER_CHANNEL
                     + L * IMAGE_ATTENTION_ELEMENTS_PER_CHANNEL) * D * activation_bytes
        est.parts["activations: image context"] = (
            per_block * (1 if gradient_checkpointing else n_pcb + n_irg) * batch_size)
    if stage == 2:
        est.parts["Plucker rays + camera encoder"] = 3 * batch_size * pixels * 6 * 4
    if online_encoders:
        est.parts["online VAE + UMT5"] = UMT5_XXL_BYTES + VAE_BYTES + VAE_ENCODE_BYTES_PER_PIXEL * pixels * 2
        if i2v:
            est.parts["online CLIP image encoder"] = CLIP_IMAGE_ENCODER_BYTES
        est.notes.append("no latent cache: the VAE and UMT5" + (" and the CLIP image encoder" if i2v else "")
                         + " are held in memory (run `fwmodel cache` to drop them)")
    base = est.total
    est.parts["overhead (10% + 1 GiB)"] = 0.1 * base + GIB
    return est


@lru_cache(maxsize=8)
def _parameter_totals(config_json: str) -> tuple[int, int, int]:
    """(frozen backbone, Stage-1 trainable, Stage-2 trainable) parameter counts, from the meta-device model."""
    from fwmodel.params import parameter_report

    totals = parameter_report(ModelConfig.model_validate_json(config_json), 1).totals
    return totals.frozen, totals.stage1_trainable, totals.stage2_trainable


def fsdp_groups(config: ModelConfig, stage: int) -> tuple[int, int]:
    """(root group, largest block group) trainable parameter counts of fwmodel.train.parallel's FSDP2 groups:
    one group per geometry frame block, bi-cross-attention block and camera adapter with trainable
    parameters; the root group holds every other trainable parameter."""
    return _fsdp_groups(config.model_dump_json(), stage)


@lru_cache(maxsize=8)
def _fsdp_groups(config_json: str, stage: int) -> tuple[int, int]:
    from fwmodel.params import build_meta_model
    from fwmodel.stages import set_trainable

    model = build_meta_model(ModelConfig.model_validate_json(config_json))
    set_trainable(model, stage)
    blocks = [*model.geometry.aggregator.frame_blocks, *model.interaction.bicross, *model.interaction.camera_adapters]
    sizes = [sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks]
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total - sum(sizes), max(sizes, default=0)


def backbone_blocks(config: ModelConfig) -> tuple[int, int]:
    """(all Wan blocks, the largest Wan block) frozen parameter counts: what train.fsdp_shard_backbone shards,
    one FSDP2 unit per block (fwmodel.train.parallel.shard_backbone_blocks)."""
    return _backbone_blocks(config.model_dump_json())


@lru_cache(maxsize=8)
def _backbone_blocks(config_json: str) -> tuple[int, int]:
    from fwmodel.params import build_meta_model

    blocks = build_meta_model(ModelConfig.model_validate_json(config_json)).backbone.wan.blocks
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    return sum(sizes), max(sizes, default=0)


def config_estimate(cfg, world_size: int = 1, parallel: Optional[str] = None,
                    online_encoders: Optional[bool] = None) -> MemoryEstimate:
    """The estimate of a training config (`fwmodel.train.config.TrainConfig`) on `world_size` ranks:
    `parallel` defaults to cfg.train.parallel; `online_encoders` (no latent cache) to data.cache = "off";
    train.fsdp_shard_backbone counts for fsdp2 only (so --parallel ddp compares the replicated backbone).
    The capacity is memory.limit_gb (GiB) when set."""
    from fwmodel.config import get_preset
    from fwmodel.train.config import checkpointing_mode

    est = estimate_memory(get_preset(cfg.model.preset), cfg.train.stage, cfg.train.batch_size, cfg.data.num_frames,
                          cfg.data.height, cfg.data.width, checkpointing_mode(cfg) != "off",
                          2 if cfg.model.backbone_dtype == "bfloat16" else 4,
                          2 if cfg.model.mixed_precision == "bf16" else 4, world_size,
                          online_encoders=cfg.data.cache == "off" if online_encoders is None else online_encoders,
                          parallel=parallel or cfg.train.parallel,
                          shard_backbone=cfg.train.fsdp_shard_backbone and (parallel or cfg.train.parallel) == "fsdp2")
    if cfg.memory.limit_gb:
        est.capacity, est.device = cfg.memory.limit_gb * GIB, "memory.limit_gb"
    return est


def render_comparison(estimates: dict[str, MemoryEstimate], limit: float = 0.95) -> str:
    """Estimates side by side (one column each, GiB): every part, the category subtotals, the total, the
    capacity and whether it fits within `limit` of it."""
    cats = list(dict.fromkeys(c for _, c in CATEGORIES))
    names: list[str] = []
    for est in estimates.values():
        names += [n for n in est.parts if n not in names]
    names.sort(key=lambda n: cats.index(_category(n)))  # stable: first appearance within a category
    width = max(12, *(len(k) for k in estimates))

    def row(label: str, values) -> str:
        return f"  {label:<38}" + "".join(f" {v:>{width}}" for v in values)

    def gib(v: Optional[float]) -> str:
        return "-" if v is None else f"{v / GIB:.2f}"

    out = [row("GiB per GPU", estimates)]
    out += [row(n, [gib(e.parts.get(n)) for e in estimates.values()]) for n in names]
    out.append(row("-" * 38, ["-" * width] * len(estimates)))
    out += [row(c, [gib(e.category_totals().get(c)) for e in estimates.values()]) for c in cats]
    out.append(row("total (estimate)", [gib(e.total) for e in estimates.values()]))
    out.append(row(f"limit ({limit:.0%} of the capacity)", [gib(e.capacity and limit * e.capacity)
                                                            for e in estimates.values()]))
    verdict = {True: "fits", False: "DOES NOT FIT", None: "-"}
    out.append(row("verdict", [verdict[e.fits(limit)] for e in estimates.values()]))
    return "\n".join(out)


def device_capacity(device) -> tuple[Optional[float], str]:
    """Total memory of a CUDA device in bytes (None on CPU) and its name."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return float(props.total_memory), props.name
    return None, "cpu"


def check_fits(est: MemoryEstimate, stage: int, limit: float = 0.95) -> None:
    if est.fits(limit) is not False:
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
    if any(n.startswith("DDP") for n in est.parts):
        knobs.append("train.parallel = \"fsdp2\" (shards the trainable state over the GPUs)")
    raise MemoryPreflightError(
        f"estimated {est.total / GIB:.1f} GiB per GPU, but {est.device} has {est.capacity / GIB:.1f} GiB; "
        "nothing was loaded. Reduce memory with: " + "; ".join(knobs) + ". "
        "(Set memory.check = false to try anyway.)\n" + "\n".join(est.lines())
    )
