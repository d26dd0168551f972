"""The geometry branch ("Geometry-Consistent Branch", VGGT-derived, trainable).

Shapes (B batch, S latent frames, (h, w) token grid, C = embed_dim, R = 4 register tokens,
P = 1 + R + h*w tokens per latent frame, D = Wan width):

    video tokens after the last PCB block [B, S*h*w, D]
      -> LatentBridge (Conv3d 1x1x1, D -> C)          patch tokens   [B, S, h*w, C]
      -> + camera token and R register tokens per frame (frame 0 has its own pair)
                                                      tokens         [B, S, P, C]
      -> Aggregator: for each IRG depth i
           frame block i   (attention inside each latent frame: [B*S, P, C])
           global block i  (attention over all frames: [B, S*P, C]), split around the
                            bidirectional cross-attention with the video stream (fwmodel.model)
         layer i output = concat(frame out, global out)   [B, S, P, 2C]
      -> heads (fwmodel.heads)

Every aggregator block is modulated by the branch's own timestep embedding e0 [B, 6, C] plus the
block's `modulation` [1, 6, C] (the published form, which is not standard adaLN):

    attention:  x = x + ls1(Attn(LN1(x) * (1 + e1) + e0))                 (e2 unused)
    FFN:        x = x + ls2(MLP(LN2(x)) * (1 + e4) + e3) * e5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fwmodel.config import VAE_TEMPORAL, ModelConfig
from fwmodel.heads import CameraHead, DPTHead
from fwmodel.layers import Attention, LayerScale, Mlp, Rope, rope_2d, timestep_sinusoid


class LatentBridge(nn.Module):
    """Video tokens [B, S*h*w, D] on the grid (S, h, w) -> patch tokens [B, S, h*w, C] (Conv3d 1x1x1)."""

    def __init__(self, video_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv3d(video_dim, embed_dim, kernel_size=1)

    def forward(self, video_tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        x = video_tokens.transpose(1, 2).unflatten(2, grid)  # [B, D, S, h, w]
        x = self.proj(x.to(self.proj.weight.dtype))  # [B, C, S, h, w]
        return x.flatten(3).permute(0, 2, 3, 1)  # [B, S, h*w, C]


class GeometryTimeEmbedding(nn.Module):
    """timestep [B] -> e0 [B, 6, C] in float32: sinusoid -> MLP -> SiLU -> Linear(C, 6C)."""

    def __init__(self, freq_dim: int, embed_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.embed = nn.Sequential(nn.Linear(freq_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.project = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 6 * embed_dim))

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        x = timestep_sinusoid(timestep, self.freq_dim).to(self.embed[0].weight.dtype)
        return self.project(self.embed(x)).float().unflatten(1, (6, -1))


class SpecialTokens(nn.Module):
    """One camera token and R register tokens per latent frame; index 0 for frame 0, index 1 for the rest.

    forward(B, S) -> [B, S, 1 + R, C]. Initialised N(0, 1e-6) as in VGGT.
    """

    def __init__(self, embed_dim: int, num_register_tokens: int):
        super().__init__()
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, embed_dim) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, num_register_tokens, embed_dim) * 1e-6)

    def forward(self, batch: int, num_frames: int, camera_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        def per_frame(token: torch.Tensor) -> torch.Tensor:  # [1, 2, n, C] -> [B, S, n, C]
            first, rest = token[:, :1], token[:, 1:]
            return torch.cat([first, rest.expand(1, num_frames - 1, -1, -1)], dim=1).expand(batch, -1, -1, -1)

        camera = per_frame(self.camera_token) if camera_tokens is None else camera_tokens
        return torch.cat([camera, per_frame(self.register_token)], dim=2)


class CameraTokenProjector(nn.Module):
    """Ground-truth pose encodings [B, T, 9] (T = 1 + 4(S-1)) -> camera tokens [B, S, 1, C].

    Four frames (36 numbers) per latent frame through MLP 36 -> 128 -> GELU -> C. Grouping "causal"
    follows the VAE: {0,0,0,0}, {1-4}, {5-8}, ...; "release" is the published {0-3}, {4-7}, ...,
    {T-1, 0, 0, 0} (not aligned with the latent frames).
    """

    def __init__(self, embed_dim: int, grouping: str):
        super().__init__()
        self.grouping = grouping
        self.mlp = nn.Sequential(nn.Linear(4 * 9, 128), nn.GELU(), nn.Linear(128, embed_dim))

    def group(self, pose_enc: torch.Tensor) -> torch.Tensor:
        """[B, T, 9] -> [B, S, 36]."""
        B, T, _ = pose_enc.shape
        first = pose_enc[:, :1]
        if self.grouping == "release":
            padded = torch.cat([pose_enc, first.expand(B, 3, 9)], dim=1)  # [B, T + 3, 9]
            return padded.reshape(B, (T + 3) // 4, 36)
        return torch.cat([first.expand(B, 4, 9).reshape(B, 1, 36), pose_enc[:, 1:].reshape(B, -1, 36)], dim=1)

    def forward(self, pose_enc: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.group(pose_enc).to(self.mlp[0].weight.dtype)).unsqueeze(2)


@dataclass
class Modulation:
    """The six modulation vectors of one aggregator block, each [B, 1, 1, C]."""

    attn_shift: torch.Tensor
    attn_scale: torch.Tensor
    ffn_shift: torch.Tensor
    ffn_scale: torch.Tensor
    ffn_gate: torch.Tensor


class AggregatorBlock(nn.Module):
    """Timestep-modulated ViT block with q/k LayerNorm, 2-D RoPE and LayerScale.

    Works on tokens [B, S, P, C]; `attend="frame"` attends inside each frame ([B*S, P, C]),
    `attend="global"` over all frames ([B, S*P, C]). Split into `attention_half` and `ffn_half`
    so an IRG block can put the cross-attention between them.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layerscale_init: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qk_norm=True)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init)
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulation_for(self, e0: torch.Tensor) -> Modulation:
        e = (self.modulation.float() + e0)[:, :, None, None, :].unbind(1)  # 6 x [B, 1, 1, C]
        return Modulation(attn_shift=e[0], attn_scale=e[1], ffn_shift=e[3], ffn_scale=e[4], ffn_gate=e[5])

    def attention_half(self, x: torch.Tensor, mod: Modulation, rope: Rope, attend: str) -> torch.Tensor:
        B, S, P, C = x.shape
        h = (self.norm1(x) * (1 + mod.attn_scale) + mod.attn_shift).to(x.dtype)
        h = h.reshape(B * S, P, C) if attend == "frame" else h.reshape(B, S * P, C)
        return x + self.ls1(self.attn(h, rope).reshape(B, S, P, C))

    def ffn_half(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        h = self.mlp(self.norm2(x)) * (1 + mod.ffn_scale) + mod.ffn_shift
        return x + (self.ls2(h) * mod.ffn_gate).to(x.dtype)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, rope: Rope, attend: str) -> torch.Tensor:
        mod = self.modulation_for(e0)
        return self.ffn_half(self.attention_half(x, mod, rope, attend), mod)


@dataclass
class GeometryInputs:
    """What the aggregator needs besides its tokens, computed once per forward."""

    e0: torch.Tensor  # [B, 6, C] timestep modulation
    frame_rope: Rope  # tables for [P] tokens
    global_rope: Rope  # tables for [S*P] tokens
    grid: tuple[int, int, int]  # (S, h, w)


class Aggregator(nn.Module):
    """Frame blocks and global blocks, one pair per IRG depth (the global one split by the IRG block)."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_ratio: float, layerscale_init: float):
        super().__init__()
        self.frame_blocks = nn.ModuleList(
            AggregatorBlock(dim, num_heads, mlp_ratio, layerscale_init) for _ in range(depth)
        )
        self.global_blocks = nn.ModuleList(
            AggregatorBlock(dim, num_heads, mlp_ratio, layerscale_init) for _ in range(depth)
        )

    def frame_block(self, index: int, x: torch.Tensor, inputs: GeometryInputs) -> torch.Tensor:
        return self.frame_blocks[index](x, inputs.e0, inputs.frame_rope, attend="frame")

    def global_attention_half(
        self, index: int, x: torch.Tensor, inputs: GeometryInputs
    ) -> tuple[torch.Tensor, Modulation]:
        block = self.global_blocks[index]
        mod = block.modulation_for(inputs.e0)
        return block.attention_half(x, mod, inputs.global_rope, attend="global"), mod

    def global_ffn_half(self, index: int, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        return self.global_blocks[index].ffn_half(x, mod)


def token_positions(num_special: int, height: int, width: int, device=None) -> torch.Tensor:
    """2-D RoPE positions [P, 2] of one frame: special tokens at (0, 0), patch (y, x) at (y + 1, x + 1)."""
    y, x = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    patches = torch.stack([y.flatten(), x.flatten()], dim=-1) + 1
    return torch.cat([torch.zeros(num_special, 2, dtype=patches.dtype, device=device), patches])


class GeometryBranch(nn.Module):
    """Latent bridge, timestep embedding, special tokens, aggregator and the three heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        g = config.geometry
        self.num_special = config.num_special_tokens
        self.head_dim = g.embed_dim // g.num_heads
        self.rope_base = g.rope_base
        self.dpt_layers = tuple(g.dpt_layers)

        self.bridge = LatentBridge(config.wan.dim, g.embed_dim)
        self.time_embedding = GeometryTimeEmbedding(g.time_freq_dim, g.embed_dim)
        self.tokens = SpecialTokens(g.embed_dim, g.num_register_tokens)
        self.camera_token_projector = (
            CameraTokenProjector(g.embed_dim, g.camera_token_grouping) if g.camera_token_projector else None
        )
        self.aggregator = Aggregator(config.num_irg_blocks, g.embed_dim, g.num_heads, g.mlp_ratio, g.layerscale_init)
        self.camera_head = CameraHead(
            dim_in=g.head_dim_in,
            trunk_depth=g.camera_trunk_depth,
            num_heads=g.camera_num_heads,
            mlp_ratio=g.mlp_ratio,
            layerscale_init=g.layerscale_init,
            iterations=g.camera_iterations,
            expand=g.camera_expand,
        )
        dpt = dict(
            dim_in=g.head_dim_in,
            features=g.dpt_features,
            out_channels=g.dpt_out_channels,
            patch_size=config.pixels_per_token,
            frames_chunk=g.dpt_frames_chunk,
        )
        self.depth_head = DPTHead(**dpt, output_dim=2, activation="exp")
        self.point_head = DPTHead(**dpt, output_dim=4, activation="inv_log")

    def start(
        self,
        video_tokens: torch.Tensor,
        grid: tuple[int, int, int],
        timestep: torch.Tensor,
        gt_pose_enc: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, GeometryInputs]:
        """video tokens [B, S*h*w, D] -> geometry tokens [B, S, P, C] and the per-call inputs.

        `gt_pose_enc` [B, T, 9] builds the camera tokens through the projector (when configured).
        """
        S, h, w = grid
        patches = self.bridge(video_tokens, grid)  # [B, S, h*w, C]
        B = patches.shape[0]
        camera_tokens = None
        if gt_pose_enc is not None and self.camera_token_projector is not None:
            camera_tokens = self.camera_token_projector(gt_pose_enc).to(patches.dtype)
        tokens = torch.cat([self.tokens(B, S, camera_tokens).to(patches.dtype), patches], dim=2)

        positions = token_positions(self.num_special, h, w, device=patches.device)  # [P, 2]
        inputs = GeometryInputs(
            e0=self.time_embedding(timestep),
            frame_rope=rope_2d(positions, self.head_dim, self.rope_base),
            global_rope=rope_2d(positions.repeat(S, 1), self.head_dim, self.rope_base),
            grid=grid,
        )
        return tokens, inputs

    def predict(self, layers: dict[int, torch.Tensor], grid: tuple[int, int, int]) -> dict:
        """Aggregated layers {depth: [B, S, P, 2C]} -> geometry predictions for T = 1 + 4(S-1) frames.

        Returns depth [B, T, H, W, 1], depth_conf [B, T, H, W], points [B, T, H, W, 3],
        points_conf [B, T, H, W], pose_enc_list (iterations x [B, T, 9]) and pose_enc (the last).
        """
        dpt_inputs = [layers[i] for i in self.dpt_layers]
        depth, depth_conf = self.depth_head(dpt_inputs, grid, self.num_special)
        points, points_conf = self.point_head(dpt_inputs, grid, self.num_special)
        last = layers[max(layers)]
        pose_enc_list = self.camera_head(last[:, :, 0])
        return {
            "depth": depth,
            "depth_conf": depth_conf,
            "points": points,
            "points_conf": points_conf,
            "pose_enc_list": pose_enc_list,
            "pose_enc": pose_enc_list[-1],
        }


def num_video_frames(num_latent_frames: int) -> int:
    """Causal VAE frame count: S latent frames <-> 1 + 4(S-1) video frames."""
    return 1 + VAE_TEMPORAL * (num_latent_frames - 1)
