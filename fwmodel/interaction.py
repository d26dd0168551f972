"""Interaction between the video and geometry streams, and camera conditioning of the video stream.

BiCrossAttention (one per IRG block, between each stream's attention and its FFN):
    video [B, L, Dv] (L = S*h*w), geometry [B, S*P, Dg] (P = 5 + h*w)
      q = video_qk(LN(video)), k = geometry_qk(LN(geometry))         [B, heads, *, dh] (shared q/k)
      3-D RoPE (f, h, w) on both; the 5 special tokens of each frame get no rotation
      video    += video_gate    * video_out(softmax(q k^T) geometry_value(LN(geometry)))
      geometry += geometry_gate * geometry_out(softmax(k q^T) video_value(LN(video)))
    The per-channel gates start at zero, so at initialisation both streams pass through unchanged.

CameraEncoder (AC3D-style):
    Plucker rays [B, T, H, W, 6] -> PixelUnshuffle(8) [B*T, 384, H/8, W/8] -> 1x1 convs + GroupNorm
    -> time 1 + 2k -> wider 1x1 conv -> time 1 + k (T -> S latent frames) -> Conv3d patch (1, 2, 2)
    -> MLP -> camera features [B, L, ctx] aligned one to one with the video tokens.

CameraAdapter (one per early Wan block, inside its cross-attention, before the output projection):
    values [B, L, Dv], camera [B, L, ctx] -> shift [B, L, Dv] = up(ReLU(down(camera_key(camera) +
    values_key(values)))); `up` starts at zero, so the video is unchanged at initialisation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fwmodel.config import VAE_SPATIAL, ModelConfig

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [N, head_dim / 2]


# ---- 3-D RoPE (interleaved channel pairs, as in Wan) ---------------------------------------------------


def rope_3d_angles(grid: tuple[int, int, int], head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """Rotation angles [f*h*w, head_dim / 2] for the token grid (f, h, w) in t-h-w order.

    head_dim splits into f / h / w parts of head_dim - 4(head_dim//6), 2(head_dim//6), 2(head_dim//6).
    """
    part = 2 * (head_dim // 6)
    sizes = (head_dim - 2 * part, part, part)
    axes = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float64) for n in grid), indexing="ij")
    angles = []
    for size, pos in zip(sizes, axes):
        inv_freq = 1.0 / base ** (torch.arange(0, size, 2, device=device, dtype=torch.float64) / size)
        angles.append(pos.reshape(-1, 1) * inv_freq[None])
    return torch.cat(angles, dim=1).float()


def apply_rope_interleaved(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x [B, heads, N, head_dim], channel pairs (2i, 2i+1) rotated by cos/sin [N, head_dim / 2]."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def bicross_ropes(grid: tuple[int, int, int], num_special: int, head_dim: int, device=None) -> tuple[Rope, Rope]:
    """RoPE tables for the video tokens [S*h*w] and the geometry tokens [S*(num_special + h*w)]."""
    S = grid[0]
    video = rope_3d_angles(grid, head_dim, device=device)  # [S*h*w, dh/2]
    special = torch.zeros(S, num_special, video.shape[-1], device=device)
    geometry = torch.cat([special, video.reshape(S, -1, video.shape[-1])], dim=1).flatten(0, 1)
    return (video.cos(), video.sin()), (geometry.cos(), geometry.sin())


# ---- bidirectional cross-attention ----------------------------------------------------------------


class BiCrossAttention(nn.Module):
    """Shared-QK bidirectional cross-attention with zero-initialised per-channel gates.

    forward(video [B, L1, Dv], geometry [B, L2, Dg], video_rope, geometry_rope) -> same shapes.
    Names in the release: video_qk = m1_proj, geometry_qk = m2_proj, *_value = values_m*_proj,
    *_out = out_m*_proj, *_gate = gamma_m*.
    """

    def __init__(self, video_dim: int, geometry_dim: int, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.video_norm = nn.LayerNorm(video_dim, elementwise_affine=False, eps=1e-6)
        self.geometry_norm = nn.LayerNorm(geometry_dim, elementwise_affine=False, eps=1e-6)
        self.video_qk = nn.Linear(video_dim, dim)
        self.geometry_qk = nn.Linear(geometry_dim, dim)
        self.video_value = nn.Linear(video_dim, dim)
        self.geometry_value = nn.Linear(geometry_dim, dim)
        self.video_out = nn.Linear(dim, video_dim)
        self.geometry_out = nn.Linear(dim, geometry_dim)
        self.video_gate = nn.Parameter(torch.zeros(video_dim))
        self.geometry_gate = nn.Parameter(torch.zeros(geometry_dim))
        for linear in (self.video_qk, self.geometry_qk, self.video_value, self.geometry_value):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, dim] -> [B, heads, N, dh]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(
        self, video: torch.Tensor, geometry: torch.Tensor, video_rope: Rope, geometry_rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.video_qk.weight.dtype
        video_n = self.video_norm(video).to(dtype)
        geometry_n = self.geometry_norm(geometry).to(dtype)
        q = apply_rope_interleaved(self._heads(self.video_qk(video_n)), video_rope)
        k = apply_rope_interleaved(self._heads(self.geometry_qk(geometry_n)), geometry_rope)
        video_values = self._heads(self.video_value(video_n))
        geometry_values = self._heads(self.geometry_value(geometry_n))

        to_video = F.scaled_dot_product_attention(q, k, geometry_values).transpose(1, 2).flatten(2)
        to_geometry = F.scaled_dot_product_attention(k, q, video_values).transpose(1, 2).flatten(2)
        video = video + (self.video_gate * self.video_out(to_video)).to(video.dtype)
        geometry = geometry + (self.geometry_gate * self.geometry_out(to_geometry)).to(geometry.dtype)
        return video, geometry


# ---- camera conditioning --------------------------------------------------------------------------


def _halve_time(x: torch.Tensor) -> torch.Tensor:
    """[B, 1 + 2k, ...] -> [B, 1 + k, ...]: keep frame 0, average the later frames in pairs."""
    first, rest = x[:, :1], x[:, 1:]
    if rest.shape[1] == 0:
        return first
    if rest.shape[1] % 2:
        raise ValueError(f"camera encoder needs 4k + 1 frames, got a stage with {x.shape[1]}")
    return torch.cat([first, rest.unflatten(1, (-1, 2)).mean(dim=2)], dim=1)


class CameraEncoder(nn.Module):
    """Plucker rays [B, T, H, W, 6] (T = 1 + 4(S-1), H = 8 Hl) -> camera features [B, S*h*w, ctx]."""

    def __init__(self, video_dim: int, context_dim: int, channels: tuple[int, int], patch_size=(1, 2, 2)):
        super().__init__()
        c0, (c1, c2) = 6 * VAE_SPATIAL**2, channels
        self.unshuffle = nn.PixelUnshuffle(VAE_SPATIAL)
        self.spatial = nn.Sequential(
            nn.Conv2d(c0, c1, 1), nn.GroupNorm(2, c1), nn.Conv2d(c1, c1, 1), nn.GroupNorm(2, c1), nn.ReLU()
        )
        self.widen = nn.Sequential(nn.Conv2d(c1, c2, 1), nn.GroupNorm(2, c2), nn.ReLU())
        self.patch_embedding = nn.Conv3d(c2, video_dim, kernel_size=patch_size, stride=patch_size)
        self.project = nn.Sequential(
            nn.Linear(video_dim, video_dim // 2),
            nn.LayerNorm(video_dim // 2),
            nn.GELU(),
            nn.Linear(video_dim // 2, context_dim),
            nn.LayerNorm(context_dim),
        )

    def forward(self, plucker: torch.Tensor) -> torch.Tensor:
        B, T = plucker.shape[:2]
        x = plucker.permute(0, 1, 4, 2, 3).flatten(0, 1).to(self.spatial[0].weight.dtype)  # [B*T, 6, H, W]
        x = self.spatial(self.unshuffle(x)).unflatten(0, (B, T))  # [B, T, c1, Hl, Wl]
        x = _halve_time(x)
        x = self.widen(x.flatten(0, 1)).unflatten(0, (B, -1))  # [B, 1 + (T-1)/2, c2, Hl, Wl]
        x = _halve_time(x)  # [B, S, c2, Hl, Wl]
        x = self.patch_embedding(x.transpose(1, 2))  # [B, Dv, S, h, w]
        return self.project(x.flatten(2).transpose(1, 2))  # [B, S*h*w, ctx]


class CameraAdapter(nn.Module):
    """Shift for one Wan block's cross-attention values. (values [B, L, Dv], camera [B, L, ctx]) -> [B, L, Dv].

    Names in the release: camera_key = k_proj.group1, values_key = k_proj.group2, shift = v_proj.group2.
    """

    def __init__(self, video_dim: int, context_dim: int, reduction: int):
        super().__init__()
        self.camera_key = nn.Linear(context_dim, context_dim)
        self.values_key = nn.Sequential(
            nn.Linear(video_dim, video_dim // reduction), nn.ReLU(), nn.Linear(video_dim // reduction, context_dim)
        )
        self.shift = nn.Sequential(
            nn.Linear(context_dim, context_dim // reduction), nn.ReLU(), nn.Linear(context_dim // reduction, video_dim)
        )
        nn.init.zeros_(self.shift[-1].weight)
        nn.init.zeros_(self.shift[-1].bias)

    def forward(self, values: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        dtype = self.camera_key.weight.dtype
        key = self.camera_key(camera.to(dtype)) + self.values_key(values.to(dtype))
        return self.shift(key).to(values.dtype)


class Interaction(nn.Module):
    """The Stage-2 modules: bi-cross-attention per IRG block, camera encoder, camera adapters."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        i, video_dim = config.interaction, config.wan.dim
        self.bicross = nn.ModuleList(
            BiCrossAttention(video_dim, config.geometry.embed_dim, i.bicross_dim, i.bicross_heads)
            for _ in range(config.num_irg_blocks)
        )
        self.camera_encoder = CameraEncoder(video_dim, i.camera_context_dim, i.camera_encoder_channels)
        self.camera_adapters = nn.ModuleList(
            CameraAdapter(video_dim, i.camera_context_dim, i.adapter_reduction) for _ in range(i.num_camera_adapters)
        )

    def camera_shift(self, wan_block: int, camera: Optional[torch.Tensor]):
        """The cross-attention shift for Wan block `wan_block`, or None (no camera or no adapter there)."""
        if camera is None or wan_block >= len(self.camera_adapters):
            return None
        adapter = self.camera_adapters[wan_block]
        return lambda values: adapter(values, camera)
