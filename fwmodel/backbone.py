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
original-format `.safetensors` file, after `check_wan_weights` (the same check `fwmodel doctor`
runs) has validated the path without reading tensor data.
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
        return f"download them with `hf download {hub_id} --local-dir {path}` or pass the right path"
    return "pass a local diffusers-format directory or an original-format .safetensors file"


#: what diffusers' `from_pretrained` reads in a model folder (sharded: the index and its shards)
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


@dataclass
class WanWeights:
    """Wan2.1 weights that passed `check_wan_weights`: what `load_wan_transformer` will read."""

    path: Path
    subfolder: Optional[str]  # "transformer" for a repository root, None otherwise
    files: list[Path]  # the .safetensors files (one, or the shards of an index)

    @property
    def single_file(self) -> bool:
        return not self.path.is_dir()

    def describe(self) -> str:
        size = sum(f.stat().st_size for f in self.files) / 1e9
        kind = "single .safetensors file" if self.single_file else (
            "diffusers directory" + (f" ({self.subfolder}/)" if self.subfolder else "")
            + f", {len(self.files)} safetensors file(s)")
        return f"{self.path}: {kind}, {size:.2f} GB"


def check_wan_weights(path: str | Path, cfg: WanConfig, hub_id: Optional[str] = None) -> WanWeights:
    """Every check `load_wan_transformer` makes before it reads tensor data; loads no weights.

    The one validation of Wan2.1 weights: training calls it through `load_wan_transformer` and
    `fwmodel doctor --weights` calls it directly, so both accept the same paths. Checks that the
    path exists; for a directory, that it is diffusers-format (`transformer/config.json` or
    `config.json`), that its config matches `cfg`, and that its weights are safetensors (one file,
    or an index whose shards all exist); for a file, that it is `.safetensors` (pickle files are
    never opened). Every safetensors header must parse and cover its whole file (catches truncated
    and non-safetensors files), and the tensors it lists (renamed from the original Wan layout the
    way diffusers' `from_single_file` does) must include every backbone tensor with the shape the
    model expects: diffusers would otherwise leave the missing ones randomly initialised.
    Raises BackboneWeightsError naming the path and what to do.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise BackboneWeightsError(f"Wan2.1 weights not found at {path}: {_download_hint(hub_id, path)}.")

    if not path.is_dir():
        if path.suffix != ".safetensors":
            raise BackboneWeightsError(
                f"{path}: only .safetensors weight files are loaded (pickle files are never opened); "
                "convert it to safetensors or pass a diffusers-format directory."
            )
        found = _read_safetensors_header(path, path, hub_id)
        expected = _expected_shapes(cfg.diffusers_kwargs())  # the config load_wan_transformer gives diffusers
        if set(found) != set(expected):  # original Wan names: convert as from_single_file does
            found = _original_to_diffusers_shapes(found)
        _check_tensors(found, expected, path, hub_id)
        return WanWeights(path, None, [path])

    subfolder = "transformer" if (path / "transformer" / "config.json").is_file() else None
    folder = path / (subfolder or "")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BackboneWeightsError(
            f"{path} is not a diffusers-format Wan2.1 directory (no transformer/config.json or "
            f"config.json): {_download_hint(hub_id, path)}."
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise BackboneWeightsError(
            f"{config_file} is not readable JSON ({err}): {_download_hint(hub_id, path)}."
        ) from err
    if not isinstance(config, dict):
        raise BackboneWeightsError(f"{config_file} is not a diffusers config (not a JSON object).")
    _check_matches_preset(config, cfg, path)

    index = folder / _DIFFUSERS_INDEX
    if index.is_file():  # diffusers prefers the index when both are present
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise BackboneWeightsError(
                f"{index} is not a readable weights index ({type(err).__name__}: {err}): {_download_hint(hub_id, path)}."
            ) from err
        files = [folder / name for name in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing or not files:
            raise BackboneWeightsError(
                f"{path}: the weights index names shards that are missing ({', '.join(missing) or 'none listed'}): "
                f"the download is incomplete; {_download_hint(hub_id, path)}."
            )
    elif (folder / _DIFFUSERS_WEIGHTS).is_file():
        files = [folder / _DIFFUSERS_WEIGHTS]
    else:
        pickles = sorted(f.name for f in folder.glob("*.bin"))
        what = (f"only pickle weights ({', '.join(pickles)}), which are never opened" if pickles
                else f"no {_DIFFUSERS_WEIGHTS} (or {_DIFFUSERS_INDEX})")
        raise BackboneWeightsError(f"{folder} has {what}: {_download_hint(hub_id, path)}.")
    found = {}
    for f in files:
        found.update(_read_safetensors_header(f, path, hub_id))
    _check_tensors(found, _expected_shapes(config), path, hub_id)  # from_pretrained builds from config.json
    return WanWeights(path, subfolder, files)


def _read_safetensors_header(file: Path, path: Path, hub_id: Optional[str]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the header only (memory-mapped, no tensor data read)."""
    from safetensors import safe_open

    try:  # safetensors refuses headers that do not cover the whole file (truncated downloads)
        with safe_open(str(file), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as err:  # SafetensorError (truncated, not safetensors) or OSError
        raise BackboneWeightsError(
            f"could not load Wan2.1 weights from {file} ({type(err).__name__}: {err}); check the files are "
            f"complete and match the preset, or {_download_hint(hub_id, path)}."
        ) from err


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the state dict diffusers builds from `config` (on the meta device: no memory)."""
    WanTransformer3DModel, _ = _wan_classes()
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _original_to_diffusers_shapes(found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Rename original-format Wan tensors with diffusers' own single-file conversion (on meta tensors)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    checkpoint = {name: torch.empty(shape, device="meta") for name, shape in found.items()}
    return {name: tuple(t.shape) for name, t in convert_wan_transformer_to_diffusers(checkpoint).items()}


def _check_tensors(found: dict, expected: dict, path: Path, hub_id: Optional[str]) -> None:
    """Every expected tensor present with its shape (extra tensors are ignored, as diffusers does)."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise BackboneWeightsError(
            f"{path} does not hold the Wan2.1 backbone for this preset: {len(missing)} of its {len(expected)} "
            f"tensors are missing (e.g. {', '.join(missing[:3])}); {_download_hint(hub_id, path)}."
        )
    wrong = [(k, found[k], expected[k]) for k in sorted(expected) if tuple(found[k]) != tuple(expected[k])]
    if wrong:
        detail = ", ".join(f"{k}: file {list(got)} vs preset {list(want)}" for k, got, want in wrong[:3])
        raise BackboneWeightsError(
            f"the Wan2.1 weights at {path} do not match the model preset ({len(wrong)} tensors of another "
            f"shape, e.g. {detail}); pick the preset that matches these weights, or the weights that match the preset."
        )


def load_wan_transformer(
    path: str | Path, cfg: WanConfig, hub_id: Optional[str] = None, dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """Load the Wan2.1 transformer from `path` and check it matches `cfg`.

    `path` is either a diffusers-format directory (the repository root with `transformer/`, or the
    `transformer/` folder itself) or one original-format `.safetensors` file (loaded with diffusers'
    `from_single_file`, offline, with the config taken from `cfg`). Pickle files are refused.
    `check_wan_weights` validates the path first (the same check `fwmodel doctor` runs).
    Raises BackboneWeightsError naming the path and what to do.
    """
    weights = check_wan_weights(path, cfg, hub_id)
    path = weights.path
    WanTransformer3DModel, _ = _wan_classes()
    try:
        if not weights.single_file:
            model = WanTransformer3DModel.from_pretrained(
                path, subfolder=weights.subfolder, torch_dtype=dtype, local_files_only=True, use_safetensors=True
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
