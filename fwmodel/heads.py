"""Prediction heads of the geometry branch: DPT depth / point-map heads and the camera head.

Shapes: B batch, S latent frames, (h, w) token grid, P tokens per latent frame (special tokens
first), 2C = the aggregated width, T = 1 + 4(S-1) video frames, H = 16h, W = 16w pixels.

DPTHead (depth: 2 output channels, points: 4; the last channel is confidence):
    4 aggregated layers [B, S, P, 2C]
      -> per latent frame: LayerNorm, Conv1x1 -> out_channels[k], UV position embedding, resize
         (x4 ConvTranspose, x2 ConvTranspose, x1, /2 Conv)            [B, S, oc_k, h_k, w_k]
      -> causal temporal upsampling x4 per level (frame 0 -> 1 frame, each later frame -> 4)
                                                                       [B, T, oc_k, h_k, w_k]
      -> per video frame: RefineNet fusion, output convs, resize to (H, W), position embedding
      -> depth [B, T, H, W, 1] = exp, or points [B, T, H, W, 3] = sign(x)(exp|x| - 1);
         confidence [B, T, H, W] = 1 + exp

CameraHead:
    camera tokens of the last layer [B, S, 2C] -> expanded to [B, T, 2C] (frame 0 from latent 0,
    four frames from each later latent frame) -> 4 refinement iterations of a 4-block trunk
    -> pose_enc_list: 4 x [B, T, 9] = [t(3), quat xyzw(4), fov_h, fov_w] (fov through ReLU).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fwmodel.config import VAE_TEMPORAL
from fwmodel.layers import Block, Mlp, uv_position_embedding

POSE_ENCODING_DIM = 9


# ---- causal temporal upsampling (Wan-VAE-decoder style) -------------------------------------------


class CausalConv3d(nn.Conv3d):
    """Conv3d that only looks back in time (zero left padding in time, 'same' padding in space)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size):
        super().__init__(in_channels, out_channels, kernel_size)
        kt, kh, kw = self.kernel_size
        self.causal_padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.causal_padding))


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels of [B, C, T, H, W] (the Wan VAE's RMS_norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class CausalResidualBlock(nn.Module):
    """x + CausalConv3x3x3(SiLU(RMSNorm(x))). [B, C, T, H, W] -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ChannelRMSNorm(channels)
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(F.silu(self.norm(x)))


class CausalTimeUpsample(nn.Module):
    """[B, C, N, H, W] -> [B, C, 1 + 2(N-1), H, W]: frame 0 stays one frame, every later frame becomes two.

    A causal time convolution C -> 2C over frames 1.. (frame 0 is not in their history, as in the
    Wan VAE decoder's first chunk), its two halves interleaved in time.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = x[:, :, :1], x[:, :, 1:]
        if rest.shape[2] == 0:
            return first
        y = self.time_conv(rest).unflatten(1, (2, -1))  # [B, 2, C, N-1, H, W]
        y = torch.stack([y[:, 0], y[:, 1]], dim=3).flatten(2, 3)  # [B, C, 2(N-1), H, W]
        return torch.cat([first, y], dim=2)


class CausalTemporalUpsampler(nn.Module):
    """Latent frames -> video frames: [B, C, S, H, W] -> [B, C, 1 + 4(S-1), H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_in = CausalConv3d(channels, channels, 1)
        self.stages = nn.ModuleList(
            nn.Sequential(CausalTimeUpsample(channels), CausalResidualBlock(channels)) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.stages:
            x = stage(x)
        return x


# ---- DPT ------------------------------------------------------------------------------------------


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """RefineNet fusion: (x [+ RCU(skip)]) -> RCU -> bilinear resize -> Conv1x1."""

    def __init__(self, features: int, has_skip: bool):
        super().__init__()
        self.skip_unit = ResidualConvUnit(features) if has_skip else None
        self.unit = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(
        self, x: torch.Tensor, skip: Optional[torch.Tensor] = None, size: Optional[tuple[int, int]] = None
    ) -> torch.Tensor:
        if skip is not None:
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


def activate_dense(out: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> (prediction [..., D-1], confidence [...]); confidence = 1 + exp(c) > 1."""
    pred, conf = out[..., :-1], out[..., -1]
    if activation == "exp":
        pred = torch.exp(pred)
    elif activation == "inv_log":
        pred = torch.sign(pred) * torch.expm1(pred.abs())
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return pred, 1 + torch.exp(conf)


class DPTHead(nn.Module):
    """Dense prediction per video frame from 4 aggregated layers, with causal temporal upsampling.

    forward(layers: 4 x [B, S, P, dim_in], grid (S, h, w), patch_start)
      -> (prediction [B, T, H, W, output_dim - 1], confidence [B, T, H, W]).
    """

    def __init__(
        self,
        dim_in: int,
        features: int,
        out_channels: tuple[int, int, int, int],
        output_dim: int,
        activation: str,
        patch_size: int = 16,
        frames_chunk: int = 16,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.activation = activation
        self.frames_chunk = frames_chunk
        # Recompute each frame chunk's fusion in backward (set by FantasyWorldModel.gradient_checkpointing):
        # the full-resolution fusion is the largest activation of the whole model.
        self.gradient_checkpointing = False
        # channels_last activations for the convolutions (speed.dpt_channels_last; set by fwmodel.train.step):
        # the same values, in the layout cuDNN's fastest convolution kernels read. The weights are untouched.
        self.channels_last = False
        oc = out_channels
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, c, 1) for c in oc)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.temporal_upsamplers = nn.ModuleList(CausalTemporalUpsampler(c) for c in oc)
        self.layers_rn = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in oc)
        # fusion[k] fuses level k (fusion[3] starts from the coarsest level and has no skip input)
        self.fusion = nn.ModuleList([FusionBlock(features, has_skip=k < 3) for k in range(4)])
        self.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, 1)
        )

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] or [B, C, T, H, W] in channels_last (_3d) memory format when `channels_last`, else x."""
        if not self.channels_last:
            return x
        return x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)

    def _add_position(self, x: torch.Tensor, aspect_ratio: float) -> torch.Tensor:
        pos = uv_position_embedding(x.shape[-2], x.shape[-1], x.shape[1], aspect_ratio, x.device, x.dtype)
        return x + 0.1 * pos

    def forward(
        self, layers: list[torch.Tensor], grid: tuple[int, int, int], patch_start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        S, h, w = grid
        B = layers[0].shape[0]
        T = 1 + VAE_TEMPORAL * (S - 1)
        H, W = h * self.patch_size, w * self.patch_size

        levels = []  # per level [B*T, oc_k, h_k, w_k]
        for k, tokens in enumerate(layers):
            x = self.norm(tokens[:, :, patch_start:])  # [B, S, h*w, dim_in]
            x = self._layout(x.reshape(B * S, h, w, -1).permute(0, 3, 1, 2))  # [B*S, dim_in, h, w]
            x = self._add_position(self.projects[k](x), W / H)
            x = self.resize_layers[k](x)  # [B*S, oc_k, h_k, w_k]
            x = x.unflatten(0, (B, S)).transpose(1, 2)  # [B, oc_k, S, h_k, w_k]
            x = self.temporal_upsamplers[k](self._layout(x))  # [B, oc_k, T, h_k, w_k]
            levels.append(self._layout(x.transpose(1, 2).flatten(0, 1)))

        fuse = self._fuse
        if self.gradient_checkpointing and torch.is_grad_enabled():
            fuse = partial(checkpoint, self._fuse, use_reentrant=False)
        chunks = [
            fuse([level[i : i + self.frames_chunk] for level in levels], (H, W))
            for i in range(0, B * T, self.frames_chunk)
        ]
        out = torch.cat(chunks).unflatten(0, (B, T)).permute(0, 1, 3, 4, 2)  # [B, T, H, W, output_dim]
        return activate_dense(out.float(), self.activation)

    def _fuse(self, levels: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """4 levels [N, oc_k, h_k, w_k] (fine to coarse) -> [N, output_dim, H, W]."""
        l1, l2, l3, l4 = (rn(x) for rn, x in zip(self.layers_rn, levels))
        x = self.fusion[3](l4, size=l3.shape[-2:])
        x = self.fusion[2](x, l3, size=l2.shape[-2:])
        x = self.fusion[1](x, l2, size=l1.shape[-2:])
        x = self.fusion[0](x, l1)  # x2
        x = self.output_conv1(x)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        x = self._add_position(x, size[1] / size[0])
        return self.output_conv2(x)


# ---- camera ---------------------------------------------------------------------------------------


def activate_pose(pose_enc: torch.Tensor) -> torch.Tensor:
    """Translation and quaternion linear, field of view through ReLU. [..., 9] -> [..., 9]."""
    return torch.cat([pose_enc[..., :7], F.relu(pose_enc[..., 7:])], dim=-1)


class CameraHead(nn.Module):
    """VGGT camera head with temporal expansion. camera tokens [B, S, dim_in] -> iterations x [B, T, 9].

    Expansion: frame 0 uses latent frame 0's token; a Conv1d(dim_in -> 4 dim_in) turns each later
    latent token into 4 frame tokens ("per_latent_frame": frame 1 + 4(k-1) + j comes from latent k,
    all tokens LayerNormed; "release_raw_reshape": the published raw reshape, see fwmodel.config).
    Refinement: starting from a learned empty pose, each iteration embeds the (detached) current
    estimate, modulates the tokens with it (adaLN shift/scale/gate), runs the trunk and adds a delta.
    """

    def __init__(
        self,
        dim_in: int,
        trunk_depth: int,
        num_heads: int,
        mlp_ratio: float,
        layerscale_init: float,
        iterations: int,
        expand: str = "per_latent_frame",
    ):
        super().__init__()
        self.iterations = iterations
        self.expand_mode = expand
        self.expand = nn.Conv1d(dim_in, VAE_TEMPORAL * dim_in, kernel_size=1)
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk = nn.Sequential(*(Block(dim_in, num_heads, mlp_ratio, layerscale_init) for _ in range(trunk_depth)))
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose = nn.Parameter(torch.zeros(1, 1, POSE_ENCODING_DIM))
        self.embed_pose = nn.Linear(POSE_ENCODING_DIM, dim_in)
        self.pose_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, POSE_ENCODING_DIM)

    def expand_to_frames(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, S, C] -> [B, T, C] with T = 1 + 4(S-1)."""
        B, S, C = tokens.shape
        first, rest = tokens[:, :1], tokens[:, 1:]
        if S == 1:
            return self.token_norm(first)
        expanded = self.expand(rest.transpose(1, 2))  # [B, 4C, S-1]
        if self.expand_mode == "release_raw_reshape":
            expanded = expanded.reshape(B, C, VAE_TEMPORAL * (S - 1)).transpose(1, 2)
            return torch.cat([self.token_norm(first), expanded], dim=1)
        expanded = expanded.unflatten(1, (VAE_TEMPORAL, C)).permute(0, 3, 1, 2).reshape(B, -1, C)
        return self.token_norm(torch.cat([first, expanded], dim=1))

    def forward(self, camera_tokens: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.expand_to_frames(camera_tokens)  # [B, T, C]
        B, T, _ = tokens.shape
        pose_enc = None
        pose_enc_list = []
        for _ in range(self.iterations):
            if pose_enc is None:
                condition = self.embed_pose(self.empty_pose.expand(B, T, -1))
            else:
                condition = self.embed_pose(pose_enc.detach())
            shift, scale, gate = self.pose_modulation(condition).chunk(3, dim=-1)
            x = tokens + gate * (self.adaln_norm(tokens) * (1 + scale) + shift)
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            pose_enc = delta if pose_enc is None else pose_enc + delta
            pose_enc_list.append(activate_pose(pose_enc).float())
        return pose_enc_list
