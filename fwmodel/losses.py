"""Training losses: flow matching on Wan latents, and the VGGT-style geometry losses.

    L_total = L_diffusion + lambda * L_geo                  (Stage 2)
    L_total = lambda * L_geo                                (Stage 1: nothing trainable can change
                                                             the video prediction, so no L_diffusion)
    L_geo   = w_depth L_depth + w_point L_pmap + w_camera L_camera      (1, 1, 3 by default)

Dense terms (depth, point map), per valid pixel with confidence c > 1 from the head:

    reg   = ||pred - gt||_2                            plain regression (what the user's targets mean)
    conf  = gamma * reg * c - alpha * log(c)           goes negative by design
    grad  = multi-scale (strides 1, 2, 4, 8) L1 of the spatial differences of (pred - gt),
            confidence-weighted the same way
    L     = conf + reg + grad (+ temporal_weight * TGM for depth)

Pixels whose error is above the `valid_quantile` (0.98) of the sample are dropped from conf/reg,
per-pixel errors are clamped at `clamp` (100). A sample with fewer than `min_valid_pixels` valid
pixels contributes 0 (through the graph, so data parallel stays in step).

Camera: for refinement iterate i of n, weight decay^(n-1-i); per frame L1 (or Huber) on
t (clamped at `clamp`), q, and the two FoVs: L = w_T L_T + w_R L_R + w_FL L_FL, averaged over the
iterates. Frames whose ground-truth pose is not finite are skipped.

Every term is computed per sample and then averaged over the batch, so B samples on one process
give the same gradient as B processes with one sample each. Ground truth is sanitised first
(NaN/Inf -> invalid, value 0): a bad label can never put a NaN into the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class LossConfig(BaseModel):
    """The `[loss]` section of a training config."""

    model_config = ConfigDict(extra="forbid")

    lambda_geo: float = Field(1.0, ge=0, description="L_total = L_diffusion + lambda_geo * L_geo")
    diffusion_weight: float = Field(1.0, ge=0)
    depth_weight: float = Field(1.0, ge=0)
    point_weight: float = Field(1.0, ge=0)
    camera_weight: float = Field(3.0, ge=0)
    conf_gamma: float = 1.0
    conf_alpha: float = 0.2
    gradient_weight: float = Field(1.0, ge=0)
    gradient_scales: int = Field(4, ge=1)
    temporal_weight: float = Field(0.0, ge=0, description="temporal gradient matching on depth (Video Depth Anything)")
    valid_quantile: float = Field(0.98, gt=0, le=1, description="drop pixels with errors above this quantile")
    clamp: float = Field(100.0, gt=0)
    min_valid_pixels: int = Field(100, ge=0)
    camera_iteration_decay: float = Field(0.6, gt=0)
    camera_translation_weight: float = 1.0
    camera_rotation_weight: float = 1.0
    camera_fov_weight: float = 0.5
    camera_loss: Literal["l1", "huber"] = "l1"


class DiffusionConfig(BaseModel):
    """The `[diffusion]` section: the rectified-flow schedule Wan trains with (DiffSynth convention)."""

    model_config = ConfigDict(extra="forbid")

    shift: float = Field(5.0, gt=0, description="sigma' = shift*sigma / (1 + (shift-1)*sigma)")
    num_train_timesteps: int = Field(1000, ge=2)
    min_timestep_fraction: float = Field(0.0, ge=0, le=1)
    max_timestep_fraction: float = Field(1.0, ge=0, le=1)
    weighting: Literal["none", "gaussian"] = Field(
        "gaussian", description="per-timestep loss weight: DiffSynth's exp(-2((t-500)/1000)^2), mean 1"
    )


# --------------------------------------------------------------------------- flow matching


def flow_sigmas(cfg: DiffusionConfig) -> torch.Tensor:
    """The N shifted training sigmas, from ~1 down to 1/N (float64)."""
    sigmas = torch.linspace(1.0, 0.0, cfg.num_train_timesteps + 1, dtype=torch.float64)[:-1]
    return cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)


def timestep_weights(cfg: DiffusionConfig) -> torch.Tensor:
    """Loss weight of each of the N timesteps (mean 1)."""
    t = flow_sigmas(cfg) * 1000
    if cfg.weighting == "none":
        return torch.ones_like(t)
    y = torch.exp(-2 * ((t - 500) / 1000) ** 2)
    y = y - y.min()
    return y * (len(y) / y.sum())


@dataclass
class NoisedLatents:
    noisy: torch.Tensor  # z_t = (1 - sigma) z0 + sigma eps      [B, 16, S, Hl, Wl]
    timestep: torch.Tensor  # 1000 * sigma                       [B]
    target: torch.Tensor  # velocity eps - z0                    [B, 16, S, Hl, Wl]
    weight: torch.Tensor  # per-sample loss weight               [B]
    sigma: torch.Tensor  # [B]


def add_noise(latents: torch.Tensor, cfg: DiffusionConfig, seeds: list[int]) -> NoisedLatents:
    """One timestep and one noise draw per sample, each from its own seeded generator.

    The draws depend only on the seeds, never on the batch layout or the process, so resumed and
    data-parallel runs see the same noise as an uninterrupted single-process run.
    """
    sigmas, weights = flow_sigmas(cfg), timestep_weights(cfg)
    n = len(sigmas)
    lo = int(cfg.min_timestep_fraction * n)
    hi = max(lo + 1, int(cfg.max_timestep_fraction * n))
    noise, index = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        index.append(int(torch.randint(lo, hi, (1,), generator=g)))
        noise.append(torch.randn(latents.shape[1:], generator=g))
    index_t = torch.tensor(index)
    eps = torch.stack(noise)  # drawn on the CPU: the same noise on every machine
    if latents.device.type == "cuda":  # an asynchronous copy from pinned memory: no host sync in the step
        eps = eps.pin_memory()
    eps = eps.to(latents.device, torch.float32, non_blocking=True)
    sigma = sigmas[index_t].float().to(latents.device)
    z0 = latents.float()
    s = sigma.view(-1, *[1] * (z0.ndim - 1))
    return NoisedLatents(
        noisy=(1 - s) * z0 + s * eps,
        timestep=sigma * 1000,
        target=eps - z0,
        weight=weights[index_t].float().to(latents.device),
        sigma=sigma,
    )


def diffusion_loss(pred: torch.Tensor, noised: NoisedLatents) -> torch.Tensor:
    """Per-sample weighted MSE between predicted and target velocity, in float32. -> [B]."""
    mse = (pred.float() - noised.target).pow(2).flatten(1).mean(dim=1)
    return mse * noised.weight


# --------------------------------------------------------------------------- ground truth hygiene


def sanitize(values: torch.Tensor, valid: torch.Tensor, point_dims: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask NaN/Inf ground truth: invalid where not finite, value 0 there."""
    finite = torch.isfinite(values)
    if point_dims:
        finite = finite.all(dim=-1)
    valid = valid.bool() & finite
    mask = valid[..., None] if point_dims else valid
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)), valid


# --------------------------------------------------------------------------- dense losses


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _gradient_term(residual, conf, valid, cfg: LossConfig) -> torch.Tensor:
    """Multi-scale confidence-weighted L1 of spatial differences of the residual. residual [T, H, W, C]."""
    terms = []
    for k in range(cfg.gradient_scales):
        s = 2**k
        r, c, m = residual[:, ::s, ::s], conf[:, ::s, ::s], valid[:, ::s, ::s]
        if r.shape[1] < 2 or r.shape[2] < 2:
            break
        total, count = r.new_zeros(()), r.new_zeros(())
        for dim in (1, 2):  # y, x
            n = r.shape[dim]
            a, b = r.narrow(dim, 1, n - 1), r.narrow(dim, 0, n - 1)
            pair = m.narrow(dim, 1, n - 1) & m.narrow(dim, 0, n - 1)
            g = (a - b).abs().sum(dim=-1).clamp(max=cfg.clamp)
            cw = c.narrow(dim, 1, n - 1)
            g = cfg.conf_gamma * g * cw - cfg.conf_alpha * torch.log(cw)
            total = total + (g * pair).sum()
            count = count + pair.sum()
        terms.append(total / count.clamp(min=1))
    return torch.stack(terms).mean() if terms else residual.sum() * 0


def dense_loss(
    pred: torch.Tensor, conf: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, cfg: LossConfig, temporal: bool
) -> dict[str, torch.Tensor]:
    """One sample. pred/gt [T, H, W, C], conf [T, H, W] (> 1), valid [T, H, W] -> dict of scalars.

    Keys: total (conf + reg + grad [+ temporal]), conf, reg (plain mean error), grad, temporal.
    """
    pred, conf = pred.float(), conf.float()
    zero = (pred.sum() + conf.sum()) * 0  # keeps the graph connected when nothing is valid
    # No host sync (a Python `if` on a device value, or a boolean-indexed tensor of data-dependent size):
    # too few valid pixels selects zeros with torch.where, and the quantile is read from the sorted errors
    # (invalid ones sorted last as +inf) at a device-side index.
    count = valid.sum()
    enough = count >= max(cfg.min_valid_pixels, 1)
    residual = pred - gt
    err = residual.norm(dim=-1).clamp(max=cfg.clamp)  # [T, H, W]
    keep = valid
    if cfg.valid_quantile < 1:
        inf = torch.full((), float("inf"), device=err.device)
        ordered = torch.where(valid, err.detach(), inf).flatten().sort().values
        k = (cfg.valid_quantile * count.double()).round().clamp(min=1).long()  # the k-th smallest valid error
        threshold = ordered.gather(0, (k - 1).clamp(max=ordered.numel() - 1).view(1))[0]
        keep = valid & (err.detach() <= threshold)
    reg = _masked_mean(err, keep)
    conf_term = _masked_mean(cfg.conf_gamma * err * conf - cfg.conf_alpha * torch.log(conf), keep)
    grad = _gradient_term(residual, conf, valid, cfg) if cfg.gradient_weight > 0 else zero
    out = {"conf": conf_term, "reg": reg, "grad": grad, "temporal": zero}
    total = conf_term + reg + cfg.gradient_weight * grad
    if temporal and cfg.temporal_weight > 0 and pred.shape[0] > 1:
        both = valid[1:] & valid[:-1]
        tgm = ((residual[1:] - residual[:-1]).norm(dim=-1).clamp(max=cfg.clamp))
        out["temporal"] = _masked_mean(tgm, both)
        total = total + cfg.temporal_weight * out["temporal"]
    out["total"] = total
    return {key: torch.where(enough, value, zero) for key, value in out.items()}


# --------------------------------------------------------------------------- camera loss


def camera_loss(
    pose_list: list[torch.Tensor], gt: torch.Tensor, frame_valid: torch.Tensor, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """One sample. pose_list: iterations x [T, 9], gt [T, 9], frame_valid [T] -> dict of scalars.

    Keys: total (weighted over iterates), T, R, FL (weighted over iterates), last (plain mean L1 of
    the final iterate over all 9 numbers).
    """
    n = len(pose_list)
    gt = gt.float()
    # means over the valid frames as masked sums (no boolean indexing: no host sync); 0 when none is valid
    weight = frame_valid.float()[:, None]  # [T, 1]
    frames = weight.sum()

    def mean(x: torch.Tensor) -> torch.Tensor:  # x [T, C]: the mean over valid frames and the C numbers
        return (x * weight).sum() / (frames * x.shape[-1]).clamp(min=1)

    def err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if cfg.camera_loss == "huber":
            return F.smooth_l1_loss(a, b, reduction="none", beta=1.0)
        return (a - b).abs()

    zero = sum(p.sum() for p in pose_list) * 0  # keeps the graph connected when nothing is valid
    parts = {"T": zero, "R": zero, "FL": zero}
    for i, pred in enumerate(pose_list):
        pred = pred.float()
        w = cfg.camera_iteration_decay ** (n - 1 - i)
        parts["T"] = parts["T"] + w * mean(err(pred[:, :3], gt[:, :3]).clamp(max=cfg.clamp))
        parts["R"] = parts["R"] + w * mean(err(pred[:, 3:7], gt[:, 3:7]))
        parts["FL"] = parts["FL"] + w * mean(err(pred[:, 7:], gt[:, 7:]))
    parts = {k: v / n for k, v in parts.items()}
    total = (
        cfg.camera_translation_weight * parts["T"]
        + cfg.camera_rotation_weight * parts["R"]
        + cfg.camera_fov_weight * parts["FL"]
    )
    last = mean((pose_list[-1].float() - gt).abs())
    return {"total": total, **parts, "last": last}


# --------------------------------------------------------------------------- all together


@dataclass
class Losses:
    total: torch.Tensor  # scalar with grad
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, log keys


def compute_losses(
    outputs: dict,
    batch: dict,
    stage: int,
    cfg: LossConfig,
    noised: Optional[NoisedLatents] = None,
) -> Losses:
    """All losses of one micro-batch. `outputs` from FantasyWorldModel, `batch` from the data loader."""
    B = outputs["depth"].shape[0]
    per_sample: dict[str, list[torch.Tensor]] = {}

    def add(prefix: str, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            per_sample.setdefault(f"{prefix}/{k}", []).append(v)

    for b in range(B):
        depth_gt, depth_valid = sanitize(batch["depth"][b], batch["depth_valid"][b], point_dims=False)
        points_gt, points_valid = sanitize(batch["points"][b], batch["points_valid"][b], point_dims=True)
        pose_gt = batch["pose_enc"][b]
        frame_valid = torch.isfinite(pose_gt).all(dim=-1)
        if "pose_valid" in batch:
            frame_valid &= batch["pose_valid"][b].bool()
        pose_gt = torch.where(frame_valid[:, None], pose_gt, torch.zeros((), device=pose_gt.device))
        add("depth", dense_loss(outputs["depth"][b], outputs["depth_conf"][b], depth_gt[..., None], depth_valid, cfg, True))
        add("point", dense_loss(outputs["points"][b], outputs["points_conf"][b], points_gt, points_valid, cfg, False))
        add("camera", camera_loss([p[b] for p in outputs["pose_enc_list"]], pose_gt, frame_valid, cfg))

    mean = {k: torch.stack(v).mean() for k, v in per_sample.items()}
    depth_l, point_l, camera_l = mean["depth/total"], mean["point/total"], mean["camera/total"]
    geo = cfg.depth_weight * depth_l + cfg.point_weight * point_l + cfg.camera_weight * camera_l
    total = cfg.lambda_geo * geo
    terms = {
        "loss/depth_loss": depth_l,
        "loss/point_loss": point_l,
        "loss/camera_loss": camera_l,
        "loss/geometry": geo,
    }
    for part in ("conf", "reg", "grad", "temporal"):
        terms[f"loss/depth/{part}"] = mean[f"depth/{part}"]
    for part in ("conf", "reg", "grad"):
        terms[f"loss/point/{part}"] = mean[f"point/{part}"]
    for part in ("T", "R", "FL", "last"):
        terms[f"loss/camera/{part}"] = mean[f"camera/{part}"]
    if stage == 2:
        if outputs.get("video") is None or noised is None:
            raise ValueError("Stage 2 needs the video prediction and the noised latents for the diffusion loss")
        diff = diffusion_loss(outputs["video"], noised).mean()
        total = total + cfg.diffusion_weight * diff
        terms["loss/diffusion"] = diff
    terms["loss/total"] = total
    return Losses(total=total, terms={k: v.detach() for k, v in terms.items()})
