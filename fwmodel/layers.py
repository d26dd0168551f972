"""Small building blocks shared by the geometry branch and its heads (VGGT style).

Shapes: B batch, N tokens, C channels, heads x head_dim = C.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [N, head_dim]


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """timestep [B] -> [B, dim] float32, cosines first (the Wan convention), base 10000."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
    args = timestep.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def rope_2d(positions: torch.Tensor, head_dim: int, base: float) -> Rope:
    """VGGT 2-D RoPE tables. positions [N, 2] (y, x) -> cos, sin [N, head_dim].

    The first half of head_dim is rotated by y, the second half by x; inside each half the channels
    pair as (i, i + quarter) (`rotate_half` layout).
    """
    half = head_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half)
    angles = [positions[:, axis, None].float() * inv_freq[None] for axis in (0, 1)]  # 2 x [N, half/2]
    angles = torch.cat([angles[0], angles[0], angles[1], angles[1]], dim=-1)  # [N, head_dim]
    return angles.cos(), angles.sin()


def apply_rope_2d(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x [B, heads, N, head_dim] rotated by `rope_2d` tables."""
    cos, sin = (t.to(x.dtype) for t in rope)
    y_half, x_half = x.chunk(2, dim=-1)
    rotated = torch.cat([_rotate_half(y_half), _rotate_half(x_half)], dim=-1)
    return x * cos + rotated * sin


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention, optional LayerNorm q/k norm and 2-D RoPE. x [B, N, C] -> [B, N, C]."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[Rope] = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope_2d(q, rope), apply_rope_2d(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim_in: int, hidden: int, dim_out: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim_out or dim_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale, initialised to a small constant."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale (the camera head's trunk). x [B, N, C] -> [B, N, C]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_value: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_value)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def uv_position_embedding(height: int, width: int, dim: int, aspect_ratio: float, device, dtype) -> torch.Tensor:
    """VGGT's DPT position embedding: sin-cos of a diagonal-normalised UV grid (omega_0 = 100).

    -> [dim, height, width] (half the channels encode u, half v).
    """
    diagonal = math.sqrt(aspect_ratio**2 + 1.0)
    span_x, span_y = aspect_ratio / diagonal, 1.0 / diagonal
    u = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, device=device)
    v = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, device=device)
    vv, uu = torch.meshgrid(v, u, indexing="ij")  # [H, W]

    def sincos(pos: torch.Tensor, channels: int) -> torch.Tensor:
        omega = 1.0 / 100.0 ** (torch.arange(channels // 2, dtype=torch.float64, device=device) / (channels / 2.0))
        angles = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [H*W, channels]

    emb = torch.cat([sincos(uu, dim // 2), sincos(vv, dim // 2)], dim=1).float()
    return emb.reshape(height, width, dim).permute(2, 0, 1).to(dtype)
