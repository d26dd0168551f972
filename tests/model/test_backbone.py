"""The re-assembled Wan forward equals diffusers' forward exactly; loading real weights, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fwmodel.backbone import (
    BackboneWeightsError,
    WanBackbone,
    build_wan_transformer,
    cross_attention_values,
    load_wan_transformer,
)
from fwmodel.config import get_preset


def _backbone(config, seed=0) -> WanBackbone:
    torch.manual_seed(seed)
    return WanBackbone(build_wan_transformer(config.wan), config.num_pcb_blocks).eval()


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_reassembled_forward_equals_diffusers_exactly(variant, i2v_config, inputs_for):
    config = get_preset("tiny") if variant == "t2v" else i2v_config
    backbone = _backbone(config)
    x = inputs_for(config, num_latent_frames=3, plucker=False)
    latents = x["latents"] if "condition" not in x else torch.cat([x["latents"], x["condition"]], dim=1)
    with torch.no_grad():
        ours = backbone(latents, x["timestep"], x["text"], x.get("image_embeds"))
        ref = backbone.wan(latents, x["timestep"], x["text"], x.get("image_embeds")).sample
    assert ours.shape == (1, 16, 3, 4, 6)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_split_block_and_cross_attention_values_are_exact(variant, i2v_config, inputs_for):
    """attention_half + ffn_half == the diffusers block; values + to_out == attn2 (the adapter path)."""
    config = get_preset("tiny") if variant == "t2v" else i2v_config
    backbone = _backbone(config)
    x = inputs_for(config, plucker=False)
    latents = x["latents"] if "condition" not in x else torch.cat([x["latents"], x["condition"]], dim=1)
    with torch.no_grad():
        h, inputs = backbone.embed(latents, x["timestep"], x["text"], x.get("image_embeds"))
        for index in range(backbone.num_blocks):
            whole = backbone.wan.blocks[index](h, inputs.context, inputs.timestep_proj, inputs.rotary_emb)
            half, modulation = backbone.attention_half(index, h, inputs)
            assert torch.equal(backbone.ffn_half(index, half, modulation), whole)
            # the camera-adapter path with a zero shift reproduces the block exactly
            zero_shift = backbone.block(index, h, inputs, camera_shift=torch.zeros_like)
            assert torch.equal(zero_shift, whole)

            attn = backbone.wan.blocks[index].attn2
            values = cross_attention_values(attn, h, inputs.context)
            assert torch.equal(attn.to_out[0](values), attn(h, inputs.context, None, None))
            h = whole


# ---- loading ---------------------------------------------------------------------------------------

# diffusers name -> original Wan name (the inverse of diffusers' convert_wan_transformer_to_diffusers)
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm_tmp"),
    ("norm3", "norm2"),
    ("norm_tmp", "norm3"),
    ("proj_out", "head.head"),
]


def _original_format_state_dict(wan) -> dict:
    out = {}
    for key, value in wan.state_dict().items():
        name = key
        for a, b in _TO_ORIGINAL:
            name = name.replace(a, b)
        name = "head.modulation" if name == "scale_shift_table" else name.replace("scale_shift_table", "modulation")
        out[name] = value.clone().contiguous()
    return out


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_diffusers_directory_and_single_file(tmp_path: Path, tiny_config):
    torch.manual_seed(1)
    wan = build_wan_transformer(tiny_config.wan)

    wan.save_pretrained(tmp_path / "repo" / "transformer")
    _assert_same_weights(load_wan_transformer(tmp_path / "repo", tiny_config.wan), wan)
    _assert_same_weights(load_wan_transformer(tmp_path / "repo" / "transformer", tiny_config.wan), wan)

    single = tmp_path / "wan2.1_tiny.safetensors"
    save_file(_original_format_state_dict(wan), str(single))
    _assert_same_weights(load_wan_transformer(single, tiny_config.wan), wan)


def test_missing_or_wrong_weights_give_clear_errors(tmp_path: Path, tiny_config):
    hub_id = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    with pytest.raises(BackboneWeightsError, match=r"not found at .*nowhere.*huggingface-cli download Wan-AI"):
        load_wan_transformer(tmp_path / "nowhere", tiny_config.wan, hub_id)
    with pytest.raises(BackboneWeightsError, match="not a diffusers-format Wan2.1 directory"):
        load_wan_transformer(tmp_path, tiny_config.wan, hub_id)
    pickle_file = tmp_path / "model.pt"
    pickle_file.write_bytes(b"not opened")
    with pytest.raises(BackboneWeightsError, match="pickle files are never opened"):
        load_wan_transformer(pickle_file, tiny_config.wan)

    build_wan_transformer(tiny_config.wan).save_pretrained(tmp_path / "tiny")
    with pytest.raises(BackboneWeightsError, match="do not match the model preset.*num_layers: file 4 vs preset 30"):
        load_wan_transformer(tmp_path / "tiny", get_preset("wan2.1-t2v-1.3b").wan)

    truncated = tmp_path / "truncated.safetensors"
    save_file(_original_format_state_dict(build_wan_transformer(tiny_config.wan)), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(BackboneWeightsError, match="could not load Wan2.1 weights from .*truncated"):
        load_wan_transformer(truncated, tiny_config.wan)
