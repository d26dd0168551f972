"""Model configuration: pydantic configs and the three presets.

A `ModelConfig` fully describes a FantasyWorld model: the frozen Wan2.1 backbone (`WanConfig`, passed
straight to diffusers' `WanTransformer3DModel`), where it is split into Preconditioning Blocks (PCB)
and IRG blocks, the geometry branch (`GeometryConfig`) and the interaction modules
(`InteractionConfig`).

Presets (see docs/MODEL.md for the parameter table):

    tiny              4 Wan blocks = 2 PCB + 2 IRG, a few thousand parameters; CPU tests.
    tiny-i2v          the tiny preset as an image-to-video model (36 input channels, CLIP image tokens,
                      camera-token projector): CPU tests of the I2V path and of the release key map.
    wan2.1-t2v-1.3b   the user's setup: Wan2.1-T2V-1.3B, 30 blocks = 12 PCB + 18 IRG.
    wan2.1-i2v-14b    the published FantasyWorld: Wan2.1-I2V-14B-480P, 40 blocks = 16 PCB + 24 IRG.

Where the published release has quirks, the presets use the sound behaviour for fresh training and a
switch (a `Literal` field whose other value is "release") reproduces the release.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Wan2.1 VAE compression: 4x in time (causal: T = 1 + 4 * (S - 1)), 8x in space; the DiT patchifies
# 2x2 latents, so one token covers 16x16 pixels.
VAE_TEMPORAL = 4
VAE_SPATIAL = 8
# Number of text tokens the Wan I2V cross-attention expects (hard-coded 512 in diffusers).
WAN_TEXT_LEN = 512


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WanConfig(_Strict):
    """Arguments of diffusers' `WanTransformer3DModel` (same names)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int
    attention_head_dim: int
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int
    num_layers: int
    cross_attn_norm: bool = True
    qk_norm: Optional[str] = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: Optional[int] = None
    added_kv_proj_dim: Optional[int] = None
    rope_max_seq_len: int = 1024

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def diffusers_kwargs(self) -> dict:
        return self.model_dump()


class GeometryConfig(_Strict):
    """VGGT-style geometry branch: latent bridge, aggregator, DPT heads, camera head."""

    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    rope_base: float = 100.0
    layerscale_init: float = 0.01
    time_freq_dim: int = 256

    # Optional camera-token projector: builds the camera tokens from ground-truth pose encodings.
    camera_token_projector: bool = False
    # How 4 video frames are grouped per latent frame for the projector. "causal" follows the VAE:
    # {0}, {1-4}, {5-8}, ...; "release" reproduces the published {0-3}, {4-7}, ..., {80,0,0,0}.
    camera_token_grouping: Literal["causal", "release"] = "causal"

    # DPT heads. `dpt_layers[k]` is the aggregator depth that feeds level k (level 0 = highest
    # resolution). The release feeds the deepest layer to the highest-resolution level.
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_layers: tuple[int, int, int, int] = (23, 17, 11, 7)
    dpt_frames_chunk: int = 16

    # Camera head.
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    camera_iterations: int = 4
    # How the S latent camera tokens become 1 + 4(S-1) frame tokens. "per_latent_frame": output frame
    # 4(k-1)+1+j comes from latent frame k (aligned with the VAE) and every token is LayerNormed;
    # "release_raw_reshape": the published raw reshape (frame 1+j comes from latent 1 + j mod (S-1))
    # with the expanded tokens left un-normalised. Needed only to run the released weights.
    camera_expand: Literal["per_latent_frame", "release_raw_reshape"] = "per_latent_frame"

    @property
    def head_dim_in(self) -> int:
        return 2 * self.embed_dim


class InteractionConfig(_Strict):
    """Bidirectional video<->geometry cross-attention, camera encoder and camera adapters."""

    bicross_dim: int = 1152
    bicross_heads: int = 12
    camera_context_dim: int = 2048
    camera_encoder_channels: tuple[int, int] = (384, 768)
    # Camera adapters sit in Wan blocks 0 .. num_camera_adapters-1.
    num_camera_adapters: int
    adapter_reduction: int = 5
    # Plucker rays built by fwmodel.pose.plucker_rays for inference. "pixel": correct pixel
    # intrinsics. "release_double_scaled": the published inference multiplies pixel intrinsics by
    # W and H again (nearly constant rays); only for reproducing the release.
    plucker_intrinsics: Literal["pixel", "release_double_scaled"] = "pixel"


class ModelConfig(_Strict):
    name: str
    description: str = ""
    hub_id: Optional[str] = Field(None, description="Hugging Face id of the diffusers-format Wan weights.")
    wan: WanConfig
    num_pcb_blocks: int
    geometry: GeometryConfig = GeometryConfig()
    interaction: InteractionConfig

    @property
    def num_irg_blocks(self) -> int:
        return self.wan.num_layers - self.num_pcb_blocks

    @property
    def num_special_tokens(self) -> int:
        return 1 + self.geometry.num_register_tokens

    @property
    def pixels_per_token(self) -> int:
        return VAE_SPATIAL * self.wan.patch_size[1]

    def fingerprint(self) -> str:
        """Short hash of everything that shapes the weights and their meaning (names and memory knobs excluded)."""
        exclude = {"name": True, "description": True, "hub_id": True, "geometry": {"dpt_frames_chunk"}}
        blob = json.dumps(self.model_dump(exclude=exclude), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        w, g, i = self.wan, self.geometry, self.interaction
        if not 0 < self.num_pcb_blocks < w.num_layers:
            raise ValueError(f"num_pcb_blocks must be in 1..{w.num_layers - 1}, got {self.num_pcb_blocks}")
        if w.patch_size[0] != 1:
            raise ValueError("only temporal patch size 1 is supported (geometry tokens live on latent frames)")
        if any(not 0 <= k < self.num_irg_blocks for k in g.dpt_layers):
            raise ValueError(f"dpt_layers {g.dpt_layers} must index the {self.num_irg_blocks} IRG blocks")
        if g.embed_dim % g.num_heads or (g.embed_dim // g.num_heads) % 4:
            raise ValueError("geometry head_dim must be a multiple of 4 (2-D RoPE splits it into y/x halves)")
        if i.bicross_dim % i.bicross_heads or (i.bicross_dim // i.bicross_heads) % 6:
            raise ValueError("bicross head_dim must be a multiple of 6 (3-D RoPE splits it into f/h/w pairs)")
        if not 0 <= i.num_camera_adapters <= w.num_layers:
            raise ValueError(f"num_camera_adapters must be in 0..{w.num_layers}")
        return self


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        description="CPU tests: 4 Wan blocks (2 PCB + 2 IRG), every part a few channels wide.",
        wan=WanConfig(
            num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=4, text_dim=16, rope_max_seq_len=32
        ),
        num_pcb_blocks=2,
        geometry=GeometryConfig(
            embed_dim=32,
            num_heads=2,
            dpt_features=8,
            dpt_out_channels=(8, 16, 16, 16),
            dpt_layers=(1, 1, 0, 0),
            camera_trunk_depth=1,
            camera_num_heads=2,
        ),
        interaction=InteractionConfig(
            bicross_dim=24,
            bicross_heads=2,
            camera_context_dim=16,
            camera_encoder_channels=(16, 16),
            num_camera_adapters=3,  # both PCB blocks and the first IRG block
        ),
    )


def _tiny_i2v() -> ModelConfig:
    """`tiny` shaped like `wan2.1-i2v-14b`: first-frame condition (36 input channels), CLIP image tokens of
    width 16 with their own key/value projections, the camera-token projector, and the release's adapter
    proportions (fwmodel.release maps the official weights onto it)."""
    tiny = _tiny()
    return tiny.model_copy(update={
        "name": "tiny-i2v",
        "description": "CPU tests: the tiny preset as an image-to-video model (36 input channels, CLIP image tokens).",
        "wan": tiny.wan.model_copy(update={"in_channels": 36, "image_dim": 16, "added_kv_proj_dim": tiny.wan.dim}),
        "geometry": tiny.geometry.model_copy(update={"camera_token_projector": True}),
        # camera context 8: the release sizes the adapters' key MLP min(D, ctx) // 2, ours D // adapter_reduction;
        # both are 4 here (as both are 1024 for the 14B), so the release key map loads a tiny official file
        "interaction": tiny.interaction.model_copy(update={"camera_context_dim": 8}),
    })


def _t2v_1_3b() -> ModelConfig:
    return ModelConfig(
        name="wan2.1-t2v-1.3b",
        description="The user's setup: Wan2.1-T2V-1.3B, 30 blocks = 12 PCB + 18 IRG.",
        hub_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        wan=WanConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
        num_pcb_blocks=12,
        # 18 aggregator depths; the DPT taps keep the release's relative depths (23, 17, 11, 7 of 24).
        geometry=GeometryConfig(dpt_layers=(17, 12, 8, 5)),
        # Adapters on the first 60% of the blocks (the paper's "first 24 of 40"): 12 PCB + 6 IRG.
        interaction=InteractionConfig(camera_context_dim=1536, num_camera_adapters=18),
    )


def _i2v_14b() -> ModelConfig:
    return ModelConfig(
        name="wan2.1-i2v-14b",
        description="The published FantasyWorld: Wan2.1-I2V-14B-480P, 40 blocks = 16 PCB + 24 IRG.",
        hub_id="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        wan=WanConfig(
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=36,
            ffn_dim=13824,
            num_layers=40,
            image_dim=1280,
            added_kv_proj_dim=5120,
        ),
        num_pcb_blocks=16,
        # The release carries the camera-token projector (unused at its inference); kept for parity.
        geometry=GeometryConfig(camera_token_projector=True),
        # The release puts adapters on blocks 0..24 (25 blocks; the paper says 24).
        interaction=InteractionConfig(num_camera_adapters=25),
    )


_PRESETS = {"tiny": _tiny, "tiny-i2v": _tiny_i2v, "wan2.1-t2v-1.3b": _t2v_1_3b, "wan2.1-i2v-14b": _i2v_14b}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


class UnknownPresetError(ValueError):
    pass


def get_preset(name: str) -> ModelConfig:
    """The named preset's `ModelConfig`. Raises UnknownPresetError listing the valid names."""
    try:
        return _PRESETS[name]()
    except KeyError:
        raise UnknownPresetError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}") from None
