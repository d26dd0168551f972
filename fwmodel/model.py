"""FantasyWorldModel: frozen Wan2.1 backbone + geometry branch + interaction, block by block.

Forward (B batch, S latent frames, Hl x Wl latent size, (S, h, w) = (S, Hl/2, Wl/2) token grid,
L = S*h*w, T = 1 + 4(S-1) video frames, H x W = 8Hl x 8Wl pixels):

    latents [B, 16, S, Hl, Wl] (+ I2V condition [B, 20, S, Hl, Wl])      text [B, 512, text_dim]
      -> Wan embedding                                                  video tokens [B, L, D]
    Plucker [B, T, H, W, 6] -> camera encoder                           camera features [B, L, ctx]
      -> PCB blocks 0..num_pcb-1 (camera adapters in the first blocks)  video tokens [B, L, D]
      -> geometry start (latent bridge + special tokens)                geometry tokens [B, S, P, C]
      -> IRG block i, for i in 0..num_irg-1:
           geometry frame block i
           video: Wan block num_pcb+i attention half  |  geometry: global block i attention half
           bidirectional cross-attention between the two streams
           video: Wan block num_pcb+i FFN half        |  geometry: global block i FFN half
           layer i = concat(frame out, global out)                      [B, S, P, 2C]
      -> Wan head                                                       video velocity [B, 16, S, Hl, Wl]
      -> DPT heads / camera head                                        depth, points, confs, poses
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fwmodel.backbone import WanBackbone, build_wan_transformer, load_wan_transformer
from fwmodel.config import ModelConfig
from fwmodel.geometry import GeometryBranch
from fwmodel.interaction import Interaction, bicross_ropes
from fwmodel.pose import plucker_rays


class FantasyWorldModel(nn.Module):
    """The whole model. Top-level parts: `backbone` (frozen), `geometry` (Stage 1), `interaction` (Stage 2)."""

    def __init__(self, config: ModelConfig, wan: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        wan = wan if wan is not None else build_wan_transformer(config.wan)
        self.backbone = WanBackbone(wan, config.num_pcb_blocks)
        self.geometry = GeometryBranch(config)
        self.interaction = Interaction(config)
        self.backbone.requires_grad_(False)
        self.ac_every = 2
        self.activation_checkpointing = "off"

    @property
    def activation_checkpointing(self) -> str:
        """What backward recomputes: "full" (every Wan block, every IRG block and each DPT frame chunk),
        "selective" (Wan PCB block j and IRG block i when j, i % `ac_every` == 0, and each DPT frame chunk)
        or "off" (nothing: every activation is kept)."""
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode: str) -> None:
        if mode not in ("full", "selective", "off"):
            raise ValueError(f"activation checkpointing must be full, selective or off, got {mode!r}")
        self._activation_checkpointing = mode
        self.geometry.depth_head.gradient_checkpointing = mode != "off"
        self.geometry.point_head.gradient_checkpointing = mode != "off"

    @property
    def gradient_checkpointing(self) -> bool:
        """True when some activation checkpointing is on; setting it means "full" (True) or "off" (False)."""
        return self._activation_checkpointing != "off"

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.activation_checkpointing = "full" if value else "off"

    def compile_blocks(self, backend: str = "inductor") -> list[str]:
        """Regional `torch.compile` (dynamic=False) of the repeated blocks, in place: parameter names, state
        dicts and the module tree stay as they are (so compile before DDP / FSDP2 wrapping and checkpoint
        loading alike). Compiled: each Wan block's self-attention, cross-attention and FFN (the block itself
        is also run in halves around the interaction), each geometry frame block, each global block's two
        halves, each bi-cross-attention and each camera adapter. Returns what was compiled, for the log."""
        opts = dict(dynamic=False, backend=backend)
        for block in self.backbone.wan.blocks:
            for part in (block.attn1, block.attn2, block.ffn):
                part.compile(**opts)
        aggregator = self.geometry.aggregator
        for block in aggregator.frame_blocks:
            block.compile(**opts)
        for block in aggregator.global_blocks:  # called half by half (fwmodel.model._irg_block)
            block.attention_half = torch.compile(block.attention_half, **opts)
            block.ffn_half = torch.compile(block.ffn_half, **opts)
        for module in (*self.interaction.bicross, *self.interaction.camera_adapters):
            module.compile(**opts)
        return [f"{len(self.backbone.wan.blocks)} Wan blocks (attn1, attn2, ffn)",
                f"{len(aggregator.frame_blocks)} frame blocks", f"{len(aggregator.global_blocks)} global blocks "
                "(two halves)", f"{len(self.interaction.bicross)} bi-cross blocks",
                f"{len(self.interaction.camera_adapters)} camera adapters"]

    def train(self, mode: bool = True) -> "FantasyWorldModel":
        """Set train/eval mode; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @classmethod
    def from_wan_weights(
        cls, config: ModelConfig, path: str | Path, dtype: Optional[torch.dtype] = None
    ) -> "FantasyWorldModel":
        """Build with the Wan2.1 weights at `path` (diffusers directory or original .safetensors file).

        The geometry and interaction parts are freshly initialised; load our own trained weights
        with `fwmodel.checkpoint.load_trainable`.
        """
        wan = load_wan_transformer(path, config.wan, config.hub_id, dtype)
        model = cls(config, wan)
        if dtype is not None:
            model.geometry.to(dtype)
            model.interaction.to(dtype)
        return model

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        condition: Optional[torch.Tensor] = None,
        image_embeds: Optional[torch.Tensor] = None,
        plucker: Optional[torch.Tensor] = None,
        gt_pose_enc: Optional[torch.Tensor] = None,
        video: bool = True,
        interaction: bool = True,
    ) -> dict:
        """Run the model.

        Args:
            latents: noisy video latents [B, 16, S, Hl, Wl].
            timestep: [B] diffusion timesteps (0..1000, may be fractional).
            text: text embeddings [B, 512, text_dim] (umT5, zero-padded to 512).
            condition: I2V condition [B, 20, S, Hl, Wl] (mask + first-frame latent), concatenated to
                the latents; None for T2V.
            image_embeds: CLIP image tokens [B, 257, 1280] (I2V only).
            plucker: Plucker rays [B, T, H, W, 6] for the camera adapters; None: no camera conditioning.
            gt_pose_enc: [B, T, 9] ground-truth poses for the optional camera-token projector.
            video: False skips the video IRG halves and the Wan head (Stage 1: geometry only; the
                output's "video" is then None).
            interaction: False skips the bidirectional cross-attention.

        Returns dict: video [B, 16, S, Hl, Wl] or None, depth [B, T, H, W, 1], depth_conf [B, T, H, W],
            points [B, T, H, W, 3], points_conf [B, T, H, W], pose_enc_list (list of [B, T, 9], one per
            camera-head iteration) and pose_enc (the last of them).
        """
        cfg = self.config
        model_input = latents if condition is None else torch.cat([latents, condition], dim=1)
        camera = self.interaction.camera_encoder(plucker) if plucker is not None else None

        # PCB blocks: nothing trainable upstream unless the camera adapters are being trained.
        pcb_needs_grad = torch.is_grad_enabled() and camera is not None and _has_trainable(self.interaction)
        with torch.set_grad_enabled(pcb_needs_grad):
            h, wan_inputs = self.backbone.embed(model_input, timestep, text, image_embeds)
            for index in range(cfg.num_pcb_blocks):
                h = self._run(index, self._wan_block, index, h, wan_inputs, camera)

        x, geo_inputs = self.geometry.start(h, wan_inputs.grid, timestep, gt_pose_enc)
        ropes = None  # 3-D RoPE tables of the bi-cross-attention (video, geometry)
        if video and interaction:
            head_dim = cfg.interaction.bicross_dim // cfg.interaction.bicross_heads
            ropes = bicross_ropes(wan_inputs.grid, cfg.num_special_tokens, head_dim, device=h.device)

        keep = set(cfg.geometry.dpt_layers) | {cfg.num_irg_blocks - 1}  # layers the heads read
        layers = {}
        for i in range(cfg.num_irg_blocks):
            h, x, layer = self._run(i, self._irg_block, i, h, x, wan_inputs, geo_inputs, camera, ropes, video)
            if i in keep:
                layers[i] = layer

        outputs = {"video": self.backbone.head(h, wan_inputs) if video else None}
        outputs.update(self.geometry.predict(layers, wan_inputs.grid))
        return outputs

    def camera_rays(self, w2c: torch.Tensor, K: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Plucker rays [..., H, W, 6] for the camera encoder from w2c [..., 4, 4] and pixel K [..., 3, 3].

        Poses should already be relative to frame 0 and scale-normalised, as in the training data.
        Honours `config.interaction.plucker_intrinsics` ("release_double_scaled" reproduces the
        published inference quirk).
        """
        release = self.config.interaction.plucker_intrinsics == "release_double_scaled"
        return plucker_rays(K, torch.linalg.inv(w2c), height, width, release_double_scaled=release)

    # ---- one block at a time ----------------------------------------------------------------------
    def _wan_block(self, index, h, wan_inputs, camera):
        return self.backbone.block(index, h, wan_inputs, self.interaction.camera_shift(index, camera))

    def _irg_block(self, i, h, x, wan_inputs, geo_inputs, camera, ropes, video: bool):
        """IRG block i. h [B, L, D] video tokens, x [B, S, P, C] geometry tokens -> (h, x, layer [B, S, P, 2C])."""
        aggregator = self.geometry.aggregator
        x = aggregator.frame_block(i, x, geo_inputs)
        frame_out = x
        x, geo_modulation = aggregator.global_attention_half(i, x, geo_inputs)
        if video:
            wan_index = self.config.num_pcb_blocks + i
            h, wan_modulation = self.backbone.attention_half(
                wan_index, h, wan_inputs, self.interaction.camera_shift(wan_index, camera)
            )
            if ropes is not None:
                h, g = self.interaction.bicross[i](h, x.flatten(1, 2), *ropes)
                x = g.unflatten(1, x.shape[1:3])
            h = self.backbone.ffn_half(wan_index, h, wan_modulation)
        x = aggregator.global_ffn_half(i, x, geo_modulation)
        return h, x, torch.cat([frame_out, x], dim=-1)

    def _run(self, index: int, fn, *args):
        """fn(*args), recomputed in backward when block `index` is checkpointed (`activation_checkpointing`)."""
        mode = self._activation_checkpointing
        if torch.is_grad_enabled() and (mode == "full" or (mode == "selective" and index % self.ac_every == 0)):
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())
