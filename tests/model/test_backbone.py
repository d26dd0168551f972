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
    with pytest.raises(BackboneWeightsError, match=r"not found at .*nowhere.*`hf download Wan-AI"):
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


# ---- `fwmodel doctor --weights` and `fwmodel train` accept the same weights ---------------------------


def _weight_candidates(root: Path) -> dict[str, tuple[str, str, bool]]:
    """{case: (model.wan_weights, model.preset, should train accept it)}, all built offline from a tiny Wan."""
    torch.manual_seed(2)
    tiny = get_preset("tiny")
    wan = build_wan_transformer(tiny.wan)
    wan.save_pretrained(root / "repo" / "transformer")
    wan.save_pretrained(root / "sharded", max_shard_size="20KB")
    save_file(_original_format_state_dict(wan), str(root / "wan2.1_tiny.safetensors"))
    (root / "empty").mkdir()
    (root / "unrelated").mkdir()
    (root / "unrelated" / "notes.txt").write_text("not weights")
    (root / "model.pt").write_bytes(b"a pickle file is never opened")
    wan.save_pretrained(root / "pickle_only")  # diffusers layout, weights only as pickle
    (root / "pickle_only" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({k: v.clone() for k, v in wan.state_dict().items()}, root / "pickle_only" / "diffusion_pytorch_model.bin")
    wan.save_pretrained(root / "no_weights")
    (root / "no_weights" / "diffusion_pytorch_model.safetensors").unlink()
    wan.save_pretrained(root / "foreign")  # right config, unrelated tensors (diffusers alone would init randomly)
    save_file({"foo": torch.zeros(3)}, str(root / "foreign" / "diffusion_pytorch_model.safetensors"))
    wan.save_pretrained(root / "partial")  # one backbone tensor missing
    state = {k: v.clone().contiguous() for k, v in wan.state_dict().items() if k != "scale_shift_table"}
    save_file(state, str(root / "partial" / "diffusion_pytorch_model.safetensors"))
    truncated = root / "truncated.safetensors"
    truncated.write_bytes((root / "wan2.1_tiny.safetensors").read_bytes()[:-100])
    (root / "garbage.safetensors").write_bytes(b"garbage, not a safetensors file")
    wan.save_pretrained(root / "missing_shard", max_shard_size="20KB")
    next((root / "missing_shard").glob("*-00002-of-*.safetensors")).unlink()
    return {
        "missing path": (str(root / "nowhere"), "tiny", False),
        "empty folder": (str(root / "empty"), "tiny", False),
        "folder with an unrelated file": (str(root / "unrelated"), "tiny", False),
        "pickle file": (str(root / "model.pt"), "tiny", False),
        "diffusers folder with pickle weights only": (str(root / "pickle_only"), "tiny", False),
        "diffusers config without weights": (str(root / "no_weights"), "tiny", False),
        "diffusers folder with unrelated tensors": (str(root / "foreign"), "tiny", False),
        "diffusers folder missing one tensor": (str(root / "partial"), "tiny", False),
        "sharded folder missing a shard": (str(root / "missing_shard"), "tiny", False),
        "truncated single file": (str(truncated), "tiny", False),
        "garbage .safetensors": (str(root / "garbage.safetensors"), "tiny", False),
        "weights of another preset": (str(root / "repo"), "wan2.1-t2v-1.3b", False),
        "single file of another preset": (str(root / "wan2.1_tiny.safetensors"), "wan2.1-t2v-1.3b", False),
        "diffusers repository root": (str(root / "repo"), "tiny", True),
        "diffusers transformer/ folder": (str(root / "repo" / "transformer"), "tiny", True),
        "sharded diffusers folder": (str(root / "sharded"), "tiny", True),
        "original-format single file": (str(root / "wan2.1_tiny.safetensors"), "tiny", True),
        "random": ("random", "tiny", True),
    }


@pytest.fixture(scope="module")
def weight_candidates(tmp_path_factory):
    return _weight_candidates(tmp_path_factory.mktemp("weights"))


def _train_accepts(weights: str, preset: str) -> bool:
    """What `fwmodel train` does with model.wan_weights: build_model, refusing with BackboneWeightsError."""
    from fwmodel.train.distributed import Dist
    from fwmodel.train.config import load_config
    from fwmodel.train.log import RunLogger
    from fwmodel.train.model import build_model

    recipe = Path(__file__).resolve().parents[2] / "fwmodel/recipes/tiny-stage1.toml"
    cfg = load_config(recipe, {"model.wan_weights": weights, "model.preset": preset})
    try:
        build_model(cfg, torch.device("cpu"), RunLogger(Dist(), quiet=True, echo=lambda m: None))
    except BackboneWeightsError:
        return False
    return True


def test_doctor_passes_exactly_the_weights_training_accepts(weight_candidates):
    from fwmodel.doctor import wan_weights_check

    rows = {}
    for case, (weights, preset, expected) in weight_candidates.items():
        check = wan_weights_check(weights, preset)
        rows[case] = (check.ok, _train_accepts(weights, preset), expected, check.detail)
    disagree = {case: row for case, row in rows.items() if row[0] != row[1]}
    assert not disagree, f"doctor (ok) vs train (accepts) disagree: {disagree}"
    wrong = {case: row for case, row in rows.items() if row[1] != row[2]}
    assert not wrong, f"train accepted/refused unexpectedly: {wrong}"
    # a refused path is a required problem (exit 1), never a warning
    assert all(wan_weights_check(w, p).required for w, p, ok in weight_candidates.values() if not ok)


def test_doctor_command_reports_the_weights_row(weight_candidates, tmp_path):
    from typer.testing import CliRunner

    from fwmodel.cli import app

    runner = CliRunner()
    for case, accepted in (("diffusers repository root", True), ("diffusers folder missing one tensor", False)):
        weights, preset, _ = weight_candidates[case]
        r = runner.invoke(app, ["doctor", "--output", str(tmp_path), "--min-free-gb", "0", "--weights", weights,
                                "--preset", preset])
        problems = [line for line in r.output.replace("\n  ", " ").splitlines() if line.startswith("PROBLEM wan2.1 weights")]
        assert (not problems) == accepted, (case, r.output)
        if not accepted:
            assert r.exit_code == 1 and "scale_shift_table" in problems[0]
    r = runner.invoke(app, ["doctor", "--output", str(tmp_path), "--weights", "x", "--preset", "nope"])
    assert r.exit_code == 2 and "unknown preset" in r.output
