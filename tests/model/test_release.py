"""The key map to and from the released FantasyWorld weights (fwmodel.release).

The official state dicts here are written from the release's source (Fantasy-AMAP/fantasy-world:
fusion/model_wan21.py + fusion/layer/block.py, vggt/models/{vggt,aggregator}.py, vggt/layers/block.py,
vggt/heads/{camera_head,dpt_head}.py, wan/modules/vae_modified.py, diffsynth_wan21/models/
{camera_control,pose_adaptor_ac3d}.py): module names, nesting and the shape formulas of its
constructors, independently of fwmodel.release's rules (never through `ours_to_release`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fwmodel.config import ModelConfig, get_preset
from fwmodel.release import (
    ReleaseError,
    convert_release,
    expected_shapes,
    is_release_config,
    load_release,
    map_release,
    ours_to_release,
    release_config,
    release_to_ours,
)

runner = CliRunner()


@dataclass
class ReleaseDims:
    """The numbers the release's constructors take (hard-coded there for the 14B model)."""

    D: int  # Wan dim (m1_dim, CameraPoseEncoder dim, hidden_dim of the adapters)
    C: int  # VGGT embed_dim
    heads: int  # aggregator heads (q/k LayerNorm over C // heads)
    freq: int  # VGGT freq_dim
    registers: int
    pcb: int  # start_index
    irg: int  # len(cross_attention_list)
    ctx: int  # plucker_fea_dim (context_dim)
    enc: tuple[int, int, int]  # CameraPoseEncoder input_channels: in*8^2, in*8^2, 2*in*8^2
    hidden: int  # bicross_dim
    features: int  # DPT features
    out_channels: tuple[int, int, int, int]
    trunk: int  # camera head trunk_depth
    adapters: int  # processors on Wan blocks 0 .. adapters-1

    @classmethod
    def of(cls, config: ModelConfig) -> "ReleaseDims":
        g, i = config.geometry, config.interaction
        return cls(config.wan.dim, g.embed_dim, g.num_heads, g.time_freq_dim, g.num_register_tokens,
                   config.num_pcb_blocks, config.num_irg_blocks, i.camera_context_dim,
                   (6 * 64, *i.camera_encoder_channels), i.bicross_dim, g.dpt_features, g.dpt_out_channels,
                   g.camera_trunk_depth, i.num_camera_adapters)


# The published model, with the constants of the release's code.
RELEASE_14B = ReleaseDims(D=5120, C=1024, heads=16, freq=256, registers=4, pcb=16, irg=24, ctx=2048,
                          enc=(384, 384, 768), hidden=1152, features=256, out_channels=(256, 512, 1024, 1024),
                          trunk=4, adapters=25)


def _linear(name, n_out, n_in):
    return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}


def _norm(name, n):
    return {f"{name}.weight": (n,), f"{name}.bias": (n,)}


def _vggt_block(name, dim, qk_head):
    """vggt/layers/block.py Block (every Block has `modulation`, even the camera trunk's)."""
    shapes = {**_norm(f"{name}.norm1", dim), **_linear(f"{name}.attn.qkv", 3 * dim, dim),
              **_linear(f"{name}.attn.proj", dim, dim), f"{name}.ls1.gamma": (dim,), **_norm(f"{name}.norm2", dim),
              **_linear(f"{name}.mlp.fc1", 4 * dim, dim), **_linear(f"{name}.mlp.fc2", dim, 4 * dim),
              f"{name}.ls2.gamma": (dim,), f"{name}.modulation": (1, 6, dim)}
    if qk_head:
        shapes.update({**_norm(f"{name}.attn.q_norm", qk_head), **_norm(f"{name}.attn.k_norm", qk_head)})
    return shapes


def _conv(name, n_out, n_in, *kernel, bias=True):
    return {f"{name}.weight": (n_out, n_in, *kernel), **({f"{name}.bias": (n_out,)} if bias else {})}


def _dpt(name, d: ReleaseDims, output_dim):
    """vggt/heads/dpt_head.py DPTHead_3D_Causal + WanVAE_(location="DPT") temporal upsamplers."""
    E, F, oc = 2 * d.C, d.features, d.out_channels
    s = _norm(f"{name}.norm", E)
    for k, c in enumerate(oc):
        s.update(_conv(f"{name}.projects.{k}", c, E, 1, 1))
        tu = f"{name}.temporal_upsamplers.{k}"
        s.update(_conv(f"{tu}.conv2", c, c, 1, 1, 1))
        for u in (0, 2):  # Resample(upsample3d) then ResidualBlock_Half, twice
            s.update(_conv(f"{tu}.decoder.upsamples.{u}.time_conv", 2 * c, c, 3, 1, 1))
            s[f"{tu}.decoder.upsamples.{u + 1}.residual.0.gamma"] = (c, 1, 1, 1)
            s.update(_conv(f"{tu}.decoder.upsamples.{u + 1}.residual.2", c, c, 3, 3, 3))
        s.update(_conv(f"{name}.scratch.layer{k + 1}_rn", F, c, 3, 3, bias=False))
    s.update({f"{name}.resize_layers.0.weight": (oc[0], oc[0], 4, 4), f"{name}.resize_layers.0.bias": (oc[0],),
              f"{name}.resize_layers.1.weight": (oc[1], oc[1], 2, 2), f"{name}.resize_layers.1.bias": (oc[1],),
              **_conv(f"{name}.resize_layers.3", oc[3], oc[3], 3, 3)})
    for r in range(1, 5):
        ref = f"{name}.scratch.refinenet{r}"
        s.update(_conv(f"{ref}.out_conv", F, F, 1, 1))
        for unit in ((1, 2) if r < 4 else (2,)):  # refinenet4 has no residual (skip) unit
            for conv in (1, 2):
                s.update(_conv(f"{ref}.resConfUnit{unit}.conv{conv}", F, F, 3, 3))
    s.update({**_conv(f"{name}.scratch.output_conv1", F // 2, F, 3, 3),
              **_conv(f"{name}.scratch.output_conv2.0", 32, F // 2, 3, 3),
              **_conv(f"{name}.scratch.output_conv2.2", output_dim, 32, 1, 1)})
    return s


def official_shapes(d: ReleaseDims) -> dict[str, dict[str, tuple]]:
    """The release's trainable state dict, by component: geometry (vggt.* + IRGBlock.i.x_agg), bicross,
    camera (camera_condition.pose_encoder + the cross-attention processors)."""
    C, E, D = d.C, 2 * d.C, d.D
    geo = {"vggt.projection_head.weight": (C, D, 1, 1, 1), "vggt.projection_head.bias": (C,),
           **_linear("vggt.time_embedding.0", C, d.freq), **_linear("vggt.time_embedding.2", C, C),
           **_linear("vggt.time_projection.1", 6 * C, C),
           "vggt.aggregator.camera_token": (1, 2, 1, C), "vggt.aggregator.register_token": (1, 2, d.registers, C),
           **_linear("vggt.aggregator.CamTokenProjector.mlp.0", 128, 36),
           **_linear("vggt.aggregator.CamTokenProjector.mlp.2", C, 128)}
    for i in range(d.irg):
        geo.update(_vggt_block(f"vggt.aggregator.frame_blocks.{i}", C, C // d.heads))
        geo.update(_vggt_block(f"IRGBlock.{i}.x_agg", C, C // d.heads))
    cam = "vggt.camera_head"
    for j in range(d.trunk):
        geo.update(_vggt_block(f"{cam}.trunk.{j}", E, None))
    geo.update({**_norm(f"{cam}.token_norm", E), **_norm(f"{cam}.trunk_norm", E),
                f"{cam}.empty_pose_tokens": (1, 1, 9), **_linear(f"{cam}.embed_pose", E, 9),
                **_linear(f"{cam}.poseLN_modulation.1", 3 * E, E),
                **_conv(f"{cam}.camera_time_upsample.expand_channels", 4 * E, E, 1),
                **_linear(f"{cam}.pose_branch.fc1", E // 2, E), **_linear(f"{cam}.pose_branch.fc2", 9, E // 2)})
    geo.update(_dpt("vggt.depth_head", d, 2))
    geo.update(_dpt("vggt.point_head", d, 4))

    bicross = {}
    for i in range(d.irg):
        b = f"IRGBlock.{i}.bicross_attention"
        bicross.update({f"{b}.gamma_m1": (D,), f"{b}.gamma_m2": (C,),
                        **_linear(f"{b}.cross_attn.m1_proj", d.hidden, D), **_linear(f"{b}.cross_attn.m2_proj", d.hidden, C),
                        **_linear(f"{b}.cross_attn.values_m1_proj", d.hidden, D),
                        **_linear(f"{b}.cross_attn.values_m2_proj", d.hidden, C),
                        **_linear(f"{b}.cross_attn.out_m1_proj", D, d.hidden),
                        **_linear(f"{b}.cross_attn.out_m2_proj", C, d.hidden)})

    pe = "camera_condition.pose_encoder"
    c0, c1, c2 = d.enc
    camera = {**_conv(f"{pe}.controlnet_encode_first.0", c1, c0, 1, 1), **_norm(f"{pe}.controlnet_encode_first.1", c1),
              **_conv(f"{pe}.controlnet_encode_first.2", c1, c1, 1, 1), **_norm(f"{pe}.controlnet_encode_first.3", c1),
              **_conv(f"{pe}.controlnet_encode_second.0", c2, c1, 1, 1), **_norm(f"{pe}.controlnet_encode_second.1", c2),
              **_conv(f"{pe}.patch_embedding", D, c2, 1, 2, 2), **_linear(f"{pe}.fc.0", D // 2, D),
              **_norm(f"{pe}.fc.1", D // 2), **_linear(f"{pe}.fc.3", d.ctx, D // 2), **_norm(f"{pe}.fc.4", d.ctx)}
    k_mid, v_mid = min(D, d.ctx) // 2, d.ctx // 5  # GroupLinearDualK / GroupLinearDualV
    for block in range(d.adapters):
        where = f"pipe.dit.blocks.{block}" if block < d.pcb else f"IRGBlock.{block - d.pcb}.x_dit"
        p = f"{where}.cross_attn.processor"
        camera.update({**_linear(f"{p}.k_proj.group1", d.ctx, d.ctx), **_linear(f"{p}.k_proj.group2.0", k_mid, D),
                       **_linear(f"{p}.k_proj.group2.2", d.ctx, k_mid), **_linear(f"{p}.v_proj.group2.0", v_mid, d.ctx),
                       **_linear(f"{p}.v_proj.group2.2", D, v_mid)})
    return {"geometry": geo, "bicross": bicross, "camera": camera}


UNUSED = ".modulation"  # the camera trunk's, see fwmodel.release


def _flat(d: ReleaseDims) -> dict[str, tuple]:
    return {k: v for part in official_shapes(d).values() for k, v in part.items()}


def tiny_release_config() -> ModelConfig:
    """tiny-i2v with the release switches (its camera context 8 gives the release's adapter widths)."""
    return release_config("tiny-i2v")


def wide_context_config() -> ModelConfig:
    """tiny-i2v with camera context 16: the release sizes the adapter's key MLP min(D, ctx) // 2 = 8 wide, ours
    D // 5 = 4, so an official file of these dimensions does not fit our preset."""
    base = release_config("tiny-i2v")
    return base.model_copy(update={"interaction": base.interaction.model_copy(update={"camera_context_dim": 16})})


def official_state(config: ModelConfig, seed: int = 0, dtype=torch.bfloat16, frozen: bool = True) -> dict:
    """A random state dict under the official names and shapes for `config` (bf16, as the release ships),
    plus a few frozen Wan tensors of the kind model.pth may hold."""
    g = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=g).to(dtype) for name, shape in sorted(_flat(ReleaseDims.of(config)).items())}
    if frozen:
        D = config.wan.dim
        state["pipe.dit.blocks.0.self_attn.q.weight"] = torch.randn(D, D, generator=g).to(dtype)
        state["pipe.dit.head.head.weight"] = torch.randn(64, D, generator=g).to(dtype)
        state["IRGBlock.0.x_dit.ffn.0.weight"] = torch.randn(config.wan.ffn_dim, D, generator=g).to(dtype)
    return state


def _save(state: dict, path):
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def _model(config: ModelConfig, seed: int = 1):
    from fwmodel.model import FantasyWorldModel

    torch.manual_seed(seed)
    return FantasyWorldModel(config)


# ---- the map ----------------------------------------------------------------------------------------


def test_official_tiny_state_loads_with_no_key_left_over():
    config = tiny_release_config()
    state = official_state(config)
    mapping = map_release(state, config)
    expected = expected_shapes(config)
    assert list(mapping.tensors) == list(expected)  # every trainable parameter, in model order
    assert sorted(mapping.frozen_wan) == ["IRGBlock.0.x_dit.ffn.0.weight", "pipe.dit.blocks.0.self_attn.q.weight",
                                          "pipe.dit.head.head.weight"]
    assert mapping.unused == [f"vggt.camera_head.trunk.{j}.modulation" for j in range(config.geometry.camera_trunk_depth)]
    assert len(mapping.tensors) + len(mapping.frozen_wan) + len(mapping.unused) == len(state)

    model = _model(config)
    info = load_release(model, "official.safetensors", state_dict=state)
    assert info.tensors == len(expected) and info.frozen_wan == 3 and info.unused == 1
    params = dict(model.named_parameters())
    used = {id(t) for t in mapping.tensors.values()}
    # each official tensor ended up in exactly one parameter, unchanged (bf16 -> float32 is exact)
    for ours, tensor in mapping.tensors.items():
        assert params[ours].dtype == torch.float32 and torch.equal(params[ours], tensor.float()), ours
    assert len(used) == len(mapping.tensors)
    trainable = {n for n in params if not n.startswith("backbone.")}
    assert trainable == set(mapping.tensors)
    # a few names checked by hand against the release source
    for ours, official in [("geometry.aggregator.global_blocks.1.attn.qkv.weight", "IRGBlock.1.x_agg.attn.qkv.weight"),
                           ("geometry.depth_head.fusion.3.unit.conv1.weight",
                            "vggt.depth_head.scratch.refinenet4.resConfUnit2.conv1.weight"),
                           ("geometry.point_head.temporal_upsamplers.2.stages.1.1.norm.gamma",
                            "vggt.point_head.temporal_upsamplers.2.decoder.upsamples.3.residual.0.gamma"),
                           ("interaction.camera_adapters.2.shift.2.weight",
                            "IRGBlock.0.x_dit.cross_attn.processor.v_proj.group2.2.weight"),
                           ("interaction.camera_adapters.1.values_key.0.bias",
                            "pipe.dit.blocks.1.cross_attn.processor.k_proj.group2.0.bias"),
                           ("geometry.camera_head.expand.weight",
                            "vggt.camera_head.camera_time_upsample.expand_channels.weight"),
                           ("interaction.bicross.1.geometry_gate", "IRGBlock.1.bicross_attention.gamma_m2")]:
        assert torch.equal(params[ours], state[official].float()), ours


def test_round_trip_ours_release_ours_is_identity_bytes():
    config = tiny_release_config()
    model = _model(config, seed=3)
    ours = {n: p.detach() for n, p in model.named_parameters() if not n.startswith("backbone.")}
    release = ours_to_release(ours, config)
    # the names ours_to_release writes are the official table (less the unused trunk modulations)
    assert set(release) == {k for k in _flat(ReleaseDims.of(config)) if not k.endswith(UNUSED) or "trunk" not in k}
    back = release_to_ours(release, config)
    assert list(back) == list(ours)
    for name, tensor in ours.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert back[name].numpy().tobytes() == tensor.numpy().tobytes(), name


def test_renamed_official_key_is_reported_by_name():
    config = tiny_release_config()
    state = official_state(config, frozen=False)
    state["vggt.aggregator.frame_blocks.1.attn.qkv_fused.weight"] = state.pop("vggt.aggregator.frame_blocks.1.attn.qkv.weight")
    del state["camera_condition.pose_encoder.fc.4.bias"]
    with pytest.raises(ReleaseError) as err:
        release_to_ours(state, config)
    message = str(err.value)
    assert "\n" not in message
    assert "1 release keys that do not map (vggt.aggregator.frame_blocks.1.attn.qkv_fused.weight)" in message
    assert "2 expected keys missing" in message
    assert ("geometry.aggregator.frame_blocks.1.attn.qkv.weight (release vggt.aggregator.frame_blocks.1.attn.qkv.weight)"
            in message)
    assert "interaction.camera_encoder.project.4.bias (release camera_condition.pose_encoder.fc.4.bias)" in message


def test_many_unknown_keys_are_counted():
    config = tiny_release_config()
    state = official_state(config, frozen=False)
    for k in range(5):
        state[f"vggt.track_head.layer{k}.weight"] = torch.zeros(1)
    with pytest.raises(ReleaseError, match=r"5 release keys that do not map \(vggt\.track_head\.layer0\.weight, "
                                           r"vggt\.track_head\.layer1\.weight, vggt\.track_head\.layer2\.weight, \.\.\.\)"):
        release_to_ours(state, config)


def test_wrong_shape_is_reported():
    config = tiny_release_config()
    state = official_state(config, frozen=False)
    state["vggt.projection_head.weight"] = state["vggt.projection_head.weight"][:, :-1]
    with pytest.raises(ReleaseError) as err:
        release_to_ours(state, config)
    message = str(err.value)
    assert "1 of the wrong shape or type (vggt.projection_head.weight: (32, 23, 1, 1, 1) in the file, " \
           "(32, 24, 1, 1, 1) for geometry.bridge.proj.weight of preset tiny-i2v)" in message
    assert "missing" not in message  # the tensor is there, only its shape is wrong


def test_a_wider_camera_context_gives_adapter_widths_the_release_does_not_have():
    """The adapter key MLP: release min(D, ctx) // 2 = 8 wide for camera context 16, ours D // 5 = 4."""
    config = wide_context_config()
    with pytest.raises(ReleaseError, match=r"IRGBlock\.0\.x_dit\.cross_attn\.processor\.k_proj\.group2\.0\.weight: "
                                           r"\(8, 24\) in the file, \(4, 24\) for interaction\.camera_adapters\.2\."):
        release_to_ours(official_state(config, frozen=False), config)


def test_release_weights_need_the_release_switches():
    plain = get_preset("tiny-i2v")
    assert not is_release_config(plain) and is_release_config(tiny_release_config())
    assert release_config("tiny-i2v").fingerprint() != plain.fingerprint()
    with pytest.raises(ReleaseError, match="release switches"):
        load_release(_model(plain), "x.safetensors", state_dict={})
    with pytest.raises(ReleaseError, match="not I2V: use --preset wan2.1-i2v-14b"):
        release_config("tiny")


# ---- files, inference, init-from -------------------------------------------------------------------


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    """The official tiny state as a release-layout .safetensors and as a .pth, and our converted checkpoint."""
    root = tmp_path_factory.mktemp("release")
    config = tiny_release_config()
    state = official_state(config)
    st = _save(state, root / "model_release.safetensors")
    pth = root / "model.pth"
    torch.save(state, pth)
    converted = convert_release(pth, root / "converted.safetensors", config=config, wan_weights="random")
    return {"config": config, "state": state, "safetensors": st, "pth": pth, "converted": converted, "root": root}


def test_convert_reads_the_pickle_weights_only_and_writes_our_checkpoint(release_files):
    from safetensors.torch import load_file

    from fwmodel.checkpoint import read_sidecar, verify_checkpoint_file
    from fwmodel.release import checkpoint_config

    f = release_files
    header = verify_checkpoint_file(f["converted"])
    assert header["stage"] == 2 and header["preset"] == "tiny-i2v"
    assert checkpoint_config(f["converted"]) == f["config"]
    sidecar = read_sidecar(f["converted"])
    assert sidecar["extra"]["source"]["format"] == "fantasyworld-release"
    assert sidecar["extra"]["source"]["file"] == "model.pth" and sidecar["extra"]["source"]["frozen_wan_skipped"] == 3
    assert sidecar["extra"]["train"]["model"]["wan_weights"] == "random"
    tensors = load_file(str(f["converted"]))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert torch.equal(tensors["geometry.bridge.proj.weight"], f["state"]["vggt.projection_head.weight"].float())
    # and back to the release layout: the official tensors (widened to float32), nothing else
    out = convert_release(f["converted"], f["root"] / "back.safetensors", to="release")
    back = load_file(str(out))
    official = {k: v for k, v in f["state"].items() if not k.startswith("pipe.dit.blocks.0.self_attn")
                and k != "pipe.dit.head.head.weight" and ".x_dit.ffn" not in k and not k.endswith("trunk.0.modulation")}
    assert set(back) == set(official)
    assert all(torch.equal(back[k], v.float()) for k, v in official.items())


def test_loaded_release_model_equals_the_converted_checkpoint(release_files):
    from fwmodel.inference import load_model

    f = release_files
    from_release = load_model(f["safetensors"], wan_weights="random", device="cpu", release_preset=f["config"])
    from_ours = load_model(f["converted"], device="cpu")  # wan_weights "random" comes from the sidecar
    assert from_release.header["format"] == "fantasyworld-release" and from_ours.stage == 2
    assert from_release.model.config == from_ours.model.config == f["config"]
    assert any("released FantasyWorld weights loaded" in line for line in from_release.log)
    inputs = _inputs(f["config"])
    with torch.no_grad():
        a, b = from_release.model(**inputs), from_ours.model(**inputs)
        fresh = _model(f["config"], seed=0)(**inputs)
    for key in ("video", "depth", "depth_conf", "points", "points_conf", "pose_enc"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.allclose(a["depth"], fresh["depth"])  # the weights were really loaded


def _inputs(config):
    g = torch.Generator().manual_seed(0)
    S, Hl, Wl = 2, 4, 6
    return {"latents": torch.randn(1, 16, S, Hl, Wl, generator=g), "timestep": torch.full((1,), 400.0),
            "text": torch.randn(1, 512, config.wan.text_dim, generator=g),
            "condition": torch.randn(1, 20, S, Hl, Wl, generator=g),
            "image_embeds": torch.randn(1, 3, config.wan.image_dim, generator=g),
            "plucker": torch.randn(1, 5, Hl * 8, Wl * 8, 6, generator=g)}


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, message, console=True):
        self.lines.append(message)


def test_init_from_release_files(release_files):
    from fwmodel.train.config import TrainConfig
    from fwmodel.train.model import check_init_from, load_stage1, model_config

    f = release_files
    cfg = TrainConfig()
    cfg.model.preset, cfg.model.init_from = "tiny-i2v", f["converted"]
    assert model_config(cfg) == f["config"]  # the converted checkpoint's own config, release switches on
    cfg.model.init_from = f["safetensors"]
    assert model_config(cfg) == release_config("tiny-i2v")  # a bare release file: the preset + the switches
    assert check_init_from(f["converted"])["converted_release"] is True
    assert check_init_from(f["safetensors"])["stage"] == 2
    with pytest.raises(ReleaseError, match=r"is a pickle .* `fwmodel convert-release .*model\.pth model\.safetensors`"):
        check_init_from(f["pth"])

    for source in (f["safetensors"], f["converted"]):
        model, log = _model(f["config"]), _Log()
        load_stage1(model, source, 2, log)
        assert "released FantasyWorld weights loaded" in log.lines[0], log.lines
        assert torch.equal(model.geometry.bridge.proj.weight, f["state"]["vggt.projection_head.weight"].float())
        assert torch.equal(model.interaction.bicross[1].video_gate,
                           f["state"]["IRGBlock.1.bicross_attention.gamma_m1"].float())


def test_inference_refuses_the_pickle_with_the_command(release_files):
    from fwmodel.inference import load_model

    with pytest.raises(ReleaseError, match="convert it once with `fwmodel convert-release"):
        load_model(release_files["pth"], wan_weights="random", device="cpu")


def test_cli_convert_release_names_the_keys_that_do_not_map(release_files, tmp_path):
    from fwmodel.cli import app

    # an official tiny file written for camera context 16 does not fit the tiny-i2v preset (8)
    wide = tmp_path / "wide.pth"
    torch.save(official_state(wide_context_config()), wide)
    result = runner.invoke(app, ["convert-release", str(wide), str(tmp_path / "o.safetensors"),
                                 "--preset", "tiny-i2v"])
    assert result.exit_code == 2, result.output
    assert "does not map onto preset tiny-i2v" in result.output and "k_proj.group1.weight" in result.output
    assert not (tmp_path / "o.safetensors").exists()
    result = runner.invoke(app, ["convert-release", str(release_files["converted"]), str(tmp_path / "r.pth"),
                                 "--to", "release"])
    assert result.exit_code == 0, result.output
    back = torch.load(tmp_path / "r.pth", weights_only=True)
    assert torch.equal(back["vggt.aggregator.camera_token"], release_files["state"]["vggt.aggregator.camera_token"].float())


# ---- the published 14B model, on the meta device ---------------------------------------------------

# shared/reference/fantasyworld-architecture.md section 6.1, in millions
PUBLISHED_M = {"geometry": 1241.32, "bicross": 510.0, "camera": 396.6}


def test_every_14b_parameter_maps_to_an_official_name():
    config = release_config("wan2.1-i2v-14b")
    assert is_release_config(config) and config.geometry.dpt_layers == (23, 17, 11, 7)
    official = official_shapes(RELEASE_14B)
    flat = {k: v for part in official.values() for k, v in part.items()}
    expected = expected_shapes(config)
    meta = {k: torch.empty(v, device="meta") for k, v in flat.items()}
    mapping = map_release(meta, config)  # every official name maps, with its shape; nothing missing
    assert list(mapping.tensors) == list(expected)
    assert mapping.unused == [f"vggt.camera_head.trunk.{j}.modulation" for j in range(4)]
    ours = {n: torch.empty(s, device="meta") for n, s in expected.items()}
    assert set(ours_to_release(ours, config)) == set(flat) - set(mapping.unused)

    counts = {part: sum(math.prod(s) for s in shapes.values()) for part, shapes in official.items()}
    # the release's geometry branch counts its camera-trunk modulations (4 x 6 x 2048), unused and not in ours
    unused = sum(math.prod(flat[k]) for k in mapping.unused)
    assert unused == 4 * 6 * 2048

    def ours_count(prefix):
        return sum(math.prod(s) for n, s in expected.items() if n.startswith(prefix))

    assert ours_count("geometry.") + unused == counts["geometry"]
    assert ours_count("interaction.bicross.") == counts["bicross"]
    assert ours_count("interaction.camera_") == counts["camera"]
    # 6.1 gives the geometry branch to two decimals (1241.32: it counts the trunk modulations), the others to one
    assert abs(counts["geometry"] / 1e6 - PUBLISHED_M["geometry"]) <= 0.01, counts
    assert round(counts["bicross"] / 1e6, 1) == PUBLISHED_M["bicross"], counts
    assert round(counts["camera"] / 1e6, 1) == PUBLISHED_M["camera"], counts


def test_stage2_trains_from_the_converted_release_weights(release_files, tmp_path):
    """`fwmodel train --stage 2 --init-from <convert-release output>` on tiny-i2v: the run builds the release
    config, loads the released tensors, trains, and its checkpoint loads back with the switches."""
    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset
    from fwmodel.cache import CacheOptions, build_cache
    from fwmodel.inference import load_model
    from fwmodel.release import checkpoint_config
    from fwmodel.train import train
    from fwmodel.train.config import load_config

    torch.set_num_threads(1)
    data = tmp_path / "ds"
    write_synthetic_dataset(data, SynthOptions(num_scenes=1, num_frames=9, height=64, width=96, write_ply=False))
    cfg = load_config("tiny-stage2", {"data.root": str(data), "train.output": str(tmp_path / "run"),
                                      "model.preset": "tiny-i2v", "train.num_steps": 1, "train.checkpoint_every": 1})
    build_cache(CacheOptions(dataset=data, vae=Path("random-tiny"), text_encoder=Path("random-tiny"), data=cfg.data,
                             device="cpu", image_encoder=Path("random-tiny")))
    # official weights of a realistic scale (N(0, 1) everywhere overflows exp() in the heads)
    small = {k: v * 0.05 for k, v in release_files["state"].items()}
    converted = convert_release(_save(small, tmp_path / "small.safetensors"), tmp_path / "fw.safetensors",
                                config=release_files["config"], wan_weights="random")
    cfg.model.init_from = converted
    result = train(cfg, quiet=True)
    assert all(math.isfinite(row["loss/total"]) for row in result.history) and len(result.history) == 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "model: preset tiny-i2v with the release switches" in log
    assert "released FantasyWorld weights loaded (converted checkpoint)" in log
    step = tmp_path / "run" / "step-1.safetensors"
    assert checkpoint_config(step) == release_files["config"]
    loaded = load_model(step, device="cpu")
    assert loaded.model.config == release_files["config"]
