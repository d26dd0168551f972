"""The frozen Wan2.1 video transformer (the "Imagination Prior Branch").

`WanBackbone` wraps diffusers' `WanTransformer3DModel` and re-assembles its forward from the public
submodules (`rope`, `patch_embedding`, `condition_embedder`, `blocks`, `norm_out`, `proj_out`,
`scale_shift_table`) so that

* blocks can run one at a time: blocks 0..num_pcb-1 are the Preconditioning Blocks (PCB), the rest
  are the video halves of the IRG blocks;
* one block can be split around the interaction: `attention_half` (self-attention + cross-attention,
  with an optional camera adapter inside the cross-attention) and `ffn_half`;
* the cross-attention output can be shifted by a camera adapter before its output projection.

With nothing attached, `forward` equals `WanTransformer3DModel.forward` exactly (tested).

Shapes (B batch, C_in latent channels, F latent frames, Hl x Wl latent size, (f, h, w) token grid with
f = F, h = Hl/2, w = Wl/2, L = f*h*w tokens, D model width):

    latents [B, C_in, F, Hl, Wl] -> tokens [B, L, D] -> blocks -> tokens [B, L, D] -> velocity [B, 16, F, Hl, Wl]

Loading real weights: `load_wan_transformer` reads a local diffusers-format directory or one
original-format `.safetensors` file.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from fwmodel.config import WAN_TEXT_LEN, WanConfig


def _wan_classes():
    # Imported lazily: importing diffusers takes seconds.
    from diffusers import WanTransformer3DModel
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return WanTransformer3DModel, dispatch_attention_fn


def build_wan_transformer(cfg: WanConfig) -> nn.Module:
    """A randomly initialised `WanTransformer3DModel` (on the current default device)."""
    WanTransformer3DModel, _ = _wan_classes()
    return WanTransformer3DModel(**cfg.diffusers_kwargs())


@dataclass
class WanInputs:
    """Everything the blocks and the head need besides the token stream."""

    grid: tuple[int, int, int]  # token grid (f, h, w)
    context: torch.Tensor  # [B, L_ctx, D] projected (image +) text tokens
    temb: torch.Tensor  # [B, D] time embedding (for the head)
    timestep_proj: torch.Tensor  # [B, 6, D] block modulation
    rotary_emb: tuple[torch.Tensor, torch.Tensor]  # cos, sin [1, L, 1, head_dim]


# A camera adapter: (cross-attention values before `to_out` [B, L, D]) -> shift [B, L, D].
CrossAttentionShift = Callable[[torch.Tensor], torch.Tensor]


class WanBackbone(nn.Module):
    """Frozen Wan2.1 DiT, callable block by block. Holds the diffusers model as `self.wan`."""

    def __init__(self, wan: nn.Module, num_pcb_blocks: int):
        super().__init__()
        self.wan = wan
        self.num_pcb_blocks = num_pcb_blocks

    @property
    def num_blocks(self) -> int:
        return len(self.wan.blocks)

    @property
    def dim(self) -> int:
        return self.wan.config.num_attention_heads * self.wan.config.attention_head_dim

    # ---- embedding -------------------------------------------------------------------------------
    def embed(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        image: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, WanInputs]:
        """latents [B, C_in, F, Hl, Wl], timestep [B], text [B, 512, text_dim], image [B, 257, 1280]
        -> tokens [B, L, D] and the per-call `WanInputs`."""
        wan = self.wan
        if timestep.ndim != 1:
            raise ValueError(f"timestep must have shape [B], got {tuple(timestep.shape)}")
        _, _, num_frames, height, width = latents.shape
        p_t, p_h, p_w = wan.config.patch_size
        grid = (num_frames // p_t, height // p_h, width // p_w)

        rotary_emb = wan.rope(latents)
        tokens = wan.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj, context, context_image = wan.condition_embedder(timestep, text, image)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        if context_image is not None:
            context = torch.concat([context_image, context], dim=1)
        return tokens, WanInputs(grid, context, temb, timestep_proj, rotary_emb)

    # ---- blocks ----------------------------------------------------------------------------------
    def block(
        self, index: int, x: torch.Tensor, inputs: WanInputs, camera_shift: Optional[CrossAttentionShift] = None
    ) -> torch.Tensor:
        """Run Wan block `index` whole. Without a camera shift this is the diffusers block call."""
        if camera_shift is None:
            return self.wan.blocks[index](x, inputs.context, inputs.timestep_proj, inputs.rotary_emb)
        x, ffn_modulation = self.attention_half(index, x, inputs, camera_shift)
        return self.ffn_half(index, x, ffn_modulation)

    def attention_half(
        self, index: int, x: torch.Tensor, inputs: WanInputs, camera_shift: Optional[CrossAttentionShift] = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Self-attention and cross-attention of block `index` (the first half of an IRG video block).

        x [B, L, D] -> (x [B, L, D], FFN modulation (shift, scale, gate) each [B, 1, D]).
        Mirrors `WanTransformerBlock.forward` operation by operation.
        """
        block = self.wan.blocks[index]
        modulation = (block.scale_shift_table + inputs.timestep_proj.float()).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = modulation

        # 1. Self-attention with 3-D RoPE.
        normed = (block.norm1(x.float()) * (1 + scale_msa) + shift_msa).type_as(x)
        attn_output = block.attn1(normed, None, None, inputs.rotary_emb)
        x = (x.float() + attn_output * gate_msa).type_as(x)

        # 2. Cross-attention to the (image +) text context; a camera adapter shifts it before `to_out`.
        normed = block.norm2(x.float()).type_as(x)
        if camera_shift is None:
            attn_output = block.attn2(normed, inputs.context, None, None)
        else:
            values = cross_attention_values(block.attn2, normed, inputs.context)
            values = values + camera_shift(values)
            attn_output = block.attn2.to_out[1](block.attn2.to_out[0](values))
        x = x + attn_output
        return x, (c_shift_msa, c_scale_msa, c_gate_msa)

    def ffn_half(
        self, index: int, x: torch.Tensor, ffn_modulation: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Feed-forward of block `index` (the second half of an IRG video block). x [B, L, D]."""
        block = self.wan.blocks[index]
        c_shift_msa, c_scale_msa, c_gate_msa = ffn_modulation
        normed = (block.norm3(x.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(x)
        ff_output = block.ffn(normed)
        return (x.float() + ff_output.float() * c_gate_msa).type_as(x)

    # ---- head ------------------------------------------------------------------------------------
    def head(self, x: torch.Tensor, inputs: WanInputs) -> torch.Tensor:
        """tokens [B, L, D] -> velocity [B, C_out, F, Hl, Wl] (final modulated norm, projection, unpatchify)."""
        wan = self.wan
        shift, scale = (wan.scale_shift_table.to(inputs.temb.device) + inputs.temb.unsqueeze(1)).chunk(2, dim=1)
        x = (wan.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = wan.proj_out(x)
        f, h, w = inputs.grid
        p_t, p_h, p_w = wan.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, image: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Plain Wan forward (no interaction, no camera): equals `WanTransformer3DModel.forward`."""
        x, inputs = self.embed(latents, timestep, text, image)
        for index in range(self.num_blocks):
            x = self.block(index, x, inputs)
        return self.head(x, inputs)


def cross_attention_values(attn: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Wan cross-attention up to, not including, its output projection `to_out`.

    x [B, L, D], context [B, (257 +) 512, D] -> values [B, L, D]. Mirrors diffusers' `WanAttnProcessor`
    (same projections, norms, attention dispatch; the I2V image tokens are the ones before the last 512).
    """
    _, dispatch_attention_fn = _wan_classes()
    backend = getattr(attn.processor, "_attention_backend", None)
    context_image = None
    if attn.add_k_proj is not None:
        num_image_tokens = context.shape[1] - WAN_TEXT_LEN
        context_image, context = context[:, :num_image_tokens], context[:, num_image_tokens:]

    query = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
    value = attn.to_v(context).unflatten(2, (attn.heads, -1))

    image_values = None
    if context_image is not None:
        key_image = attn.norm_added_k(attn.add_k_proj(context_image)).unflatten(2, (attn.heads, -1))
        value_image = attn.add_v_proj(context_image).unflatten(2, (attn.heads, -1))
        image_values = dispatch_attention_fn(query, key_image, value_image, attn_mask=None, backend=backend)
        image_values = image_values.flatten(2, 3).type_as(query)

    values = dispatch_attention_fn(query, key, value, attn_mask=None, backend=backend)
    values = values.flatten(2, 3).type_as(query)
    if image_values is not None:
        values = values + image_values
    return values


# ---- loading real weights ----------------------------------------------------------------------------


class BackboneWeightsError(RuntimeError):
    """The Wan weights are missing, unreadable or do not match the preset. The message says what to do."""


def _download_hint(hub_id: Optional[str], path: Path) -> str:
    if hub_id:
        return f"download them with `huggingface-cli download {hub_id} --local-dir {path}` or pass the right path"
    return "pass a local diffusers-format directory or an original-format .safetensors file"


def load_wan_transformer(
    path: str | Path, cfg: WanConfig, hub_id: Optional[str] = None, dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """Load the Wan2.1 transformer from `path` and check it matches `cfg`.

    `path` is either a diffusers-format directory (the repository root with `transformer/`, or the
    `transformer/` folder itself) or one original-format `.safetensors` file (loaded with diffusers'
    `from_single_file`, offline, with the config taken from `cfg`). Pickle files are refused.
    Raises BackboneWeightsError naming the path and what to do.
    """
    WanTransformer3DModel, _ = _wan_classes()
    path = Path(path).expanduser()
    if not path.exists():
        raise BackboneWeightsError(f"Wan2.1 weights not found at {path}: {_download_hint(hub_id, path)}.")

    if path.is_dir():
        subfolder = "transformer" if (path / "transformer" / "config.json").is_file() else None
        config_file = path / (subfolder or "") / "config.json"
        if not config_file.is_file():
            raise BackboneWeightsError(
                f"{path} is not a diffusers-format Wan2.1 directory (no transformer/config.json or "
                f"config.json): {_download_hint(hub_id, path)}."
            )
        _check_matches_preset(json.loads(config_file.read_text()), cfg, path)
    elif path.suffix != ".safetensors":
        raise BackboneWeightsError(
            f"{path}: only .safetensors weight files are loaded (pickle files are never opened); "
            "convert it to safetensors or pass a diffusers-format directory."
        )

    try:
        if path.is_dir():
            model = WanTransformer3DModel.from_pretrained(
                path, subfolder=subfolder, torch_dtype=dtype, local_files_only=True
            )
        else:
            with tempfile.TemporaryDirectory() as config_dir:
                config = {"_class_name": "WanTransformer3DModel", **cfg.diffusers_kwargs()}
                (Path(config_dir) / "config.json").write_text(json.dumps(config))
                model = WanTransformer3DModel.from_single_file(
                    str(path), config=config_dir, torch_dtype=dtype, local_files_only=True
                )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise BackboneWeightsError(
            f"could not load Wan2.1 weights from {path} ({type(err).__name__}: {err}); check the files are "
            f"complete and match the preset, or {_download_hint(hub_id, path)}."
        ) from err
    return model


def _check_matches_preset(found: dict, cfg: WanConfig, path: Path) -> None:
    """Compare a diffusers config.json with the preset before loading any weights."""
    mismatched = {
        key: (found.get(key), want)
        for key, want in cfg.diffusers_kwargs().items()
        if key != "rope_max_seq_len" and key in found and _normalise(found[key]) != _normalise(want)
    }
    if mismatched:
        detail = ", ".join(f"{k}: file {got} vs preset {want}" for k, (got, want) in mismatched.items())
        raise BackboneWeightsError(
            f"the Wan2.1 weights at {path} do not match the model preset ({detail}); "
            "pick the preset that matches these weights, or the weights that match the preset."
        )


def _normalise(value):
    return list(value) if isinstance(value, (list, tuple)) else value
