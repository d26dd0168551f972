"""The released FantasyWorld weights (Fantasy-AMAP/fantasy-world, FantasyWorld-Wan2.1-I2V-14B-480P) <-> our layout.

The release ships one file, `model.pth`: a pickled state dict of its `FantasyWorldFusionModel`
(`torch.load` + `load_state_dict(strict=False)`, no unexpected keys allowed), in bfloat16. Its layout:

    vggt.projection_head / time_embedding / time_projection          geometry.bridge / time_embedding
    vggt.aggregator.{camera_token, register_token, CamTokenProjector,  geometry.tokens / camera_token_projector
                     frame_blocks.i}                                   / aggregator.frame_blocks.i
    IRGBlock.i.x_agg (global block i, moved into the IRG block)       geometry.aggregator.global_blocks.i
    vggt.{camera_head, depth_head, point_head}                        geometry.{camera_head, depth_head, point_head}
    IRGBlock.i.bicross_attention.{gamma_m*, cross_attn.*}             interaction.bicross.i
    camera_condition.pose_encoder                                     interaction.camera_encoder
    pipe.dit.blocks.j.cross_attn.processor (j < PCB), and             interaction.camera_adapters.j
      IRGBlock.(j - PCB).x_dit.cross_attn.processor
    pipe.* and IRGBlock.i.x_dit.* otherwise (the frozen Wan DiT)      skipped (see below)

(`IRGModel.i` is accepted for `IRGBlock.i`: the older fusion/model.py names it so.) Every tensor keeps
its shape: both sides use fused qkv, the same Conv/Linear layouts and the same parameter shapes, so the
map is a pure rename (`release_to_ours` / `ours_to_release`, exact inverses, dtypes untouched).

Skipped by design, and counted in what a load reports:
- the frozen Wan DiT (`pipe.*`, `IRGBlock.i.x_dit.*` except the camera adapters), if the file has it:
  it is frozen in both stages, so it equals the Wan2.1-I2V-14B weights, which our backbone loads
  from the Wan files as always (`model.wan_weights` / `--wan-weights`);
- `vggt.camera_head.trunk.j.modulation`: the release's camera-trunk blocks carry a modulation
  parameter that its forward never uses (no timestep there); our trunk blocks have none.
`ours_to_release` does not write either (the release loads with strict=False).

Release switches. The weights were trained with the release's quirks, so they only mean what they
meant with our release switches set (`release_config`): camera_expand="release_raw_reshape",
camera_token_grouping="release", plucker_intrinsics="release_double_scaled" (dpt_layers are already the
release's (23, 17, 11, 7) in the 14B preset). A release-config model keeps the preset's name and has
its own fingerprint, so checkpoints written from it record the switches (`model_config_for` rebuilds
the config from a checkpoint header), and loading release weights into a model without them is
refused (`ReleaseError`) rather than silently running them with other semantics.

Pickles. `model.pth` is a pickle; we never unpickle in training or generation. Only
`fwmodel convert-release` opens one, with `torch.load(..., weights_only=True, mmap=True)` (tensors
and plain containers only, no code), and writes our checkpoint format; everything else refuses a
.pth/.pt/.bin and prints that command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from fwmodel.checkpoint import CheckpointError
from fwmodel.config import ModelConfig, get_preset

RELEASE_PRESET = "wan2.1-i2v-14b"
RELEASE_FORMAT = "fantasyworld-release"
RELEASE_REPO = "acvlab/FantasyWorld-Wan2.1-I2V-14B-480P"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Top-level module names that only the release's state dicts have.
RELEASE_PREFIXES = ("vggt.", "IRGBlock.", "IRGModel.", "camera_condition.", "pipe.")


class ReleaseError(CheckpointError):
    """A release file that cannot be mapped or loaded; one line naming the keys and what to do."""


def convert_command(path) -> str:
    return f"fwmodel convert-release {path} {Path(path).with_suffix('.safetensors').name}"


# ---- configs ----------------------------------------------------------------------------------------


def release_config(preset: str = RELEASE_PRESET) -> ModelConfig:
    """`preset` with the release switches set (same name, own fingerprint). Only I2V presets: the release is I2V-14B."""
    base = get_preset(preset)
    if base.wan.image_dim is None:
        raise ReleaseError(f"the released FantasyWorld weights are an image-to-video model ({RELEASE_PRESET}); "
                           f"preset {preset!r} is not I2V: use --preset {RELEASE_PRESET}")
    return base.model_copy(update={
        "description": base.description + " With the release switches (to run the published weights).",
        "geometry": base.geometry.model_copy(
            update={"camera_token_grouping": "release", "camera_expand": "release_raw_reshape"}),
        "interaction": base.interaction.model_copy(update={"plucker_intrinsics": "release_double_scaled"}),
    })


def is_release_config(config: ModelConfig) -> bool:
    """True when `config` has the three release switches (what the released weights need)."""
    g, i = config.geometry, config.interaction
    return (g.camera_expand == "release_raw_reshape" and g.camera_token_grouping == "release"
            and i.plucker_intrinsics == "release_double_scaled")


def model_config_for(preset: str, fingerprint: Optional[str], saved: Optional[dict] = None) -> ModelConfig:
    """The config a checkpoint header names: the preset when the fingerprints agree; else `saved` (the
    sidecar's "config") when it has this preset's name and the header's fingerprint; else the preset
    with the release switches when the fingerprint says so; else the plain preset (`load_trainable`
    then reports the mismatch)."""
    base = get_preset(preset)
    if fingerprint is None or fingerprint == base.fingerprint():
        return base
    if saved is not None:
        try:
            config = ModelConfig.model_validate(saved)
        except ValueError:
            config = None
        if config is not None and config.name == preset and config.fingerprint() == fingerprint:
            return config
    if base.wan.image_dim is not None:
        release = release_config(preset)
        if release.fingerprint() == fingerprint:
            return release
    return base


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of our checkpoint `path` (header + sidecar; `model_config_for`)."""
    from fwmodel.checkpoint import read_checkpoint_header, read_sidecar

    header = read_checkpoint_header(path)
    return model_config_for(header.get("preset"), header.get("fingerprint"), (read_sidecar(path) or {}).get("config"))


# ---- the key map ------------------------------------------------------------------------------------

_GROUP = {"i": r"\d+", "j": r"\d+", "k": r"\d+", "s": r"\d+", "rest": r".+", "head": "depth_head|point_head",
          "tok": "camera_token|register_token", "irg": "IRGBlock|IRGModel"}


class _Rule:
    """One renaming pattern, e.g. ours `geometry.aggregator.global_blocks.{i}.{rest}` <-> release
    `IRGBlock.{i}.x_agg.{rest}`. `ints` maps an index name to (ours -> release, release -> ours)
    functions of the config (None from one of them: this rule does not apply)."""

    def __init__(self, ours: str, release: str, ints: Optional[dict] = None):
        self.templates = {"ours": ours, "release": release}
        self.patterns = {side: re.compile(_regex(t)) for side, t in self.templates.items()}
        self.ints = ints or {}

    def apply(self, name: str, source: str, config: ModelConfig) -> Optional[str]:
        m = self.patterns[source].fullmatch(name)
        if m is None:
            return None
        groups = dict(m.groupdict())
        target = "release" if source == "ours" else "ours"
        for key, (to_release, to_ours) in self.ints.items():
            value = (to_release if source == "ours" else to_ours)(int(groups[key]), config)
            if value is None:
                return None
            groups[key] = str(value)
        groups["irg"] = "IRGBlock"  # written names always use the released model_wan21 spelling
        return self.templates[target].format(**groups)


def _regex(template: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{_GROUP[m.group(1)]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return "".join(out)


def _pcb_block(j: int, config: ModelConfig) -> Optional[int]:
    return j if j < config.num_pcb_blocks else None


def _irg_block(j: int, config: ModelConfig) -> Optional[int]:
    return j - config.num_pcb_blocks if j >= config.num_pcb_blocks else None


_SAME = (lambda v, c: v, lambda v, c: v)
_PLUS1 = (lambda v, c: v + 1, lambda v, c: v - 1 if v >= 1 else None)
_STAGE_TIME = (lambda v, c: 2 * v, lambda v, c: v // 2 if v % 2 == 0 else None)
_STAGE_RES = (lambda v, c: 2 * v + 1, lambda v, c: v // 2 if v % 2 == 1 else None)
_TUP = "vggt.{head}.temporal_upsamplers.{k}"
_ADAPTER = {"camera_key": "k_proj.group1", "values_key": "k_proj.group2", "shift": "v_proj.group2"}
_BICROSS = {"video_qk": "m1_proj", "geometry_qk": "m2_proj", "video_value": "values_m1_proj",
            "geometry_value": "values_m2_proj", "video_out": "out_m1_proj", "geometry_out": "out_m2_proj"}

RULES: tuple[_Rule, ...] = (
    _Rule("geometry.bridge.proj.{rest}", "vggt.projection_head.{rest}"),
    _Rule("geometry.time_embedding.embed.{rest}", "vggt.time_embedding.{rest}"),
    _Rule("geometry.time_embedding.project.{rest}", "vggt.time_projection.{rest}"),
    _Rule("geometry.tokens.{tok}", "vggt.aggregator.{tok}"),
    _Rule("geometry.camera_token_projector.mlp.{rest}", "vggt.aggregator.CamTokenProjector.mlp.{rest}"),
    _Rule("geometry.aggregator.frame_blocks.{i}.{rest}", "vggt.aggregator.frame_blocks.{i}.{rest}"),
    _Rule("geometry.aggregator.global_blocks.{i}.{rest}", "{irg}.{i}.x_agg.{rest}"),
    _Rule("geometry.camera_head.expand.{rest}", "vggt.camera_head.camera_time_upsample.expand_channels.{rest}"),
    _Rule("geometry.camera_head.empty_pose", "vggt.camera_head.empty_pose_tokens"),
    _Rule("geometry.camera_head.pose_modulation.{rest}", "vggt.camera_head.poseLN_modulation.{rest}"),
    _Rule("geometry.camera_head.{rest}", "vggt.camera_head.{rest}"),
    _Rule("geometry.{head}.temporal_upsamplers.{k}.conv_in.{rest}", _TUP + ".conv2.{rest}"),
    _Rule("geometry.{head}.temporal_upsamplers.{k}.stages.{s}.0.time_conv.{rest}",
          _TUP + ".decoder.upsamples.{s}.time_conv.{rest}", {"s": _STAGE_TIME}),
    _Rule("geometry.{head}.temporal_upsamplers.{k}.stages.{s}.1.norm.gamma",
          _TUP + ".decoder.upsamples.{s}.residual.0.gamma", {"s": _STAGE_RES}),
    _Rule("geometry.{head}.temporal_upsamplers.{k}.stages.{s}.1.conv.{rest}",
          _TUP + ".decoder.upsamples.{s}.residual.2.{rest}", {"s": _STAGE_RES}),
    _Rule("geometry.{head}.layers_rn.{k}.{rest}", "vggt.{head}.scratch.layer{k}_rn.{rest}", {"k": _PLUS1}),
    _Rule("geometry.{head}.fusion.{k}.skip_unit.{rest}", "vggt.{head}.scratch.refinenet{k}.resConfUnit1.{rest}",
          {"k": _PLUS1}),
    _Rule("geometry.{head}.fusion.{k}.unit.{rest}", "vggt.{head}.scratch.refinenet{k}.resConfUnit2.{rest}",
          {"k": _PLUS1}),
    _Rule("geometry.{head}.fusion.{k}.out_conv.{rest}", "vggt.{head}.scratch.refinenet{k}.out_conv.{rest}",
          {"k": _PLUS1}),
    _Rule("geometry.{head}.output_conv1.{rest}", "vggt.{head}.scratch.output_conv1.{rest}"),
    _Rule("geometry.{head}.output_conv2.{rest}", "vggt.{head}.scratch.output_conv2.{rest}"),
    _Rule("geometry.{head}.{rest}", "vggt.{head}.{rest}"),  # norm, projects, resize_layers
    _Rule("interaction.bicross.{i}.video_gate", "{irg}.{i}.bicross_attention.gamma_m1"),
    _Rule("interaction.bicross.{i}.geometry_gate", "{irg}.{i}.bicross_attention.gamma_m2"),
    *(_Rule(f"interaction.bicross.{{i}}.{ours}.{{rest}}", f"{{irg}}.{{i}}.bicross_attention.cross_attn.{rel}.{{rest}}")
      for ours, rel in _BICROSS.items()),
    _Rule("interaction.camera_encoder.spatial.{rest}", "camera_condition.pose_encoder.controlnet_encode_first.{rest}"),
    _Rule("interaction.camera_encoder.widen.{rest}", "camera_condition.pose_encoder.controlnet_encode_second.{rest}"),
    _Rule("interaction.camera_encoder.patch_embedding.{rest}", "camera_condition.pose_encoder.patch_embedding.{rest}"),
    _Rule("interaction.camera_encoder.project.{rest}", "camera_condition.pose_encoder.fc.{rest}"),
    *(_Rule(f"interaction.camera_adapters.{{j}}.{ours}.{{rest}}",
            f"pipe.dit.blocks.{{j}}.cross_attn.processor.{rel}.{{rest}}", {"j": (_pcb_block, _SAME[1])})
      for ours, rel in _ADAPTER.items()),
    *(_Rule(f"interaction.camera_adapters.{{j}}.{ours}.{{rest}}",
            f"{{irg}}.{{j}}.x_dit.cross_attn.processor.{rel}.{{rest}}",
            {"j": (_irg_block, lambda i, c: i + c.num_pcb_blocks)})
      for ours, rel in _ADAPTER.items()),
)

# Release keys with no counterpart, on purpose (see the module docstring).
_FROZEN_WAN = re.compile(r"pipe\..+|(IRGBlock|IRGModel)\.\d+\.x_dit\..+")
_UNUSED = re.compile(r"vggt\.camera_head\.trunk\.\d+\.modulation")


def release_name(ours: str, config: ModelConfig) -> Optional[str]:
    """The release's name of our parameter `ours` (None: not part of a release file)."""
    return _first(ours, "ours", config)


def our_name(release: str, config: ModelConfig) -> Optional[str]:
    """Our name of the release's tensor `release` (None: no counterpart)."""
    return _first(release, "release", config)


def _first(name: str, source: str, config: ModelConfig) -> Optional[str]:
    for rule in RULES:
        mapped = rule.apply(name, source, config)
        if mapped is not None:
            return mapped
    return None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our trainable parameters (geometry.* + interaction.*, the Stage-2 set) and their shapes, built on
    the meta device (no memory, no backbone)."""
    from fwmodel.geometry import GeometryBranch
    from fwmodel.interaction import Interaction

    with torch.device("meta"):
        parts = {"geometry": GeometryBranch(config), "interaction": Interaction(config)}
    return {f"{part}.{n}": tuple(p.shape) for part, module in parts.items() for n, p in module.named_parameters()}


@dataclass
class ReleaseMapping:
    """What `map_release` made of a release state dict."""

    tensors: dict[str, torch.Tensor]  # our names, in our model's parameter order
    frozen_wan: list[str] = field(default_factory=list)  # release keys of the frozen Wan DiT (skipped)
    unused: list[str] = field(default_factory=list)  # release-only tensors its forward never uses (skipped)


def map_release(state_dict: dict, config: ModelConfig, where: str = "the release state dict") -> ReleaseMapping:
    """Rename a release state dict to our names and check it against `config` (see `release_to_ours`)."""
    expected = expected_shapes(config)
    mapped, frozen, unused, unknown, bad, bad_names = {}, [], [], [], [], set()
    for key, tensor in state_dict.items():
        ours = our_name(key, config)
        if ours is None or ours not in expected:
            if _FROZEN_WAN.fullmatch(key) and ".processor." not in key:
                frozen.append(key)
            elif _UNUSED.fullmatch(key):
                unused.append(key)
            else:
                unknown.append(key)
            continue
        if ours in mapped:
            unknown.append(f"{key} (a second copy of {ours})")
            continue
        if not isinstance(tensor, torch.Tensor):
            bad.append(f"{key}: not a tensor ({type(tensor).__name__})")
            bad_names.add(ours)
            continue
        if tuple(tensor.shape) != expected[ours]:
            bad.append(f"{key}: {tuple(tensor.shape)} in the file, {expected[ours]} for {ours} of preset {config.name}")
            bad_names.add(ours)
            continue
        mapped[ours] = tensor
    missing = [n for n in expected if n not in mapped and n not in bad_names]
    problems = _problems(unknown, "release keys that do not map", missing, "expected keys missing", bad,
                         lambda n: f"{n} (release {release_name(n, config)})")
    if problems:
        raise ReleaseError(f"{where} does not map onto preset {config.name}: {problems}")
    return ReleaseMapping({n: mapped[n] for n in expected}, frozen, unused)


def _problems(unknown: list[str], unknown_what: str, missing: list[str], missing_what: str, bad: list[str],
              show_missing: Callable[[str], str] = str) -> str:
    def first(items, show=str):
        return ", ".join(show(i) for i in items[:3]) + (", ..." if len(items) > 3 else "")

    parts = []
    if unknown:
        parts.append(f"{len(unknown)} {unknown_what} ({first(unknown)})")
    if missing:
        parts.append(f"{len(missing)} {missing_what} ({first(missing, show_missing)})")
    if bad:
        parts.append(f"{len(bad)} of the wrong shape or type ({first(bad)})")
    return "; ".join(parts)


def release_to_ours(state_dict: dict, model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """Release state dict -> our trainable state dict (geometry.* + interaction.*), same tensors.

    Raises ReleaseError (one line) naming the release keys that do not map, our expected keys that are
    missing (with the release name they would have), and tensors of the wrong shape, each as the first
    few + a count. The frozen Wan keys and the unused camera-trunk modulations are skipped (module docstring).
    """
    return map_release(state_dict, model_config).tensors


def ours_to_release(state_dict: dict, model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our trainable state dict (the full Stage-2 set) -> the release's names, same tensors.

    Raises ReleaseError naming our keys with no release name (e.g. backbone.*: the release file does not
    need the frozen Wan, its inference loads it from the Wan files) and the expected keys missing.
    """
    expected = expected_shapes(model_config)
    out, unknown, bad = {}, [], []
    for key, tensor in state_dict.items():
        name = release_name(key, model_config) if key in expected else None
        if name is None:
            unknown.append(key)
        elif tuple(tensor.shape) != expected[key]:
            bad.append(f"{key}: {tuple(tensor.shape)}, preset {model_config.name} has {expected[key]}")
        else:
            out[name] = tensor
    missing = [n for n in expected if n not in state_dict]
    problems = _problems(unknown, "keys with no release name", missing, "expected keys missing (a Stage-1 "
                         "checkpoint? the release needs the Stage-2 set)" if missing else "", bad)
    if problems:
        raise ReleaseError(f"this state dict cannot be written in the release layout (preset {model_config.name}): "
                           f"{problems}")
    return out


# ---- files ------------------------------------------------------------------------------------------


def release_source(path: str | Path) -> Optional[str]:
    """What kind of weights file `path` is, without reading tensors:

    "pickle" (.pth/.pt/.bin/.ckpt: the release's own model.pth), "release" (a safetensors file in the
    release layout, e.g. written by `convert-release --to release`), "converted" (our checkpoint of a
    release-config model, e.g. written by `convert-release`), or None (anything else, or unreadable).
    """
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "pickle"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
    except Exception:  # not a safetensors file: the checkpoint checks report it
        return None
    if "fwmodel" in metadata:
        try:
            config = checkpoint_config(path)
        except Exception:
            return None
        return "converted" if is_release_config(config) else None
    return "release" if any(k.startswith(RELEASE_PREFIXES) for k in keys) else None


def read_release_file(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a release file. safetensors always; a pickle (.pth, ...) only with `allow_pickle`
    (`fwmodel convert-release`), through torch.load(weights_only=True, mmap=True). ReleaseError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ReleaseError(f"release weights not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ReleaseError(f"{path} is a pickle (the release's model.pth); fwmodel does not unpickle weights "
                               f"here: convert it once with `{convert_command(path)}` and use the .safetensors")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise ReleaseError(f"{path} cannot be read as a weights-only torch file ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''})") from None
    else:
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:
            raise ReleaseError(f"{path} is damaged or not a safetensors file ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ReleaseError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


@dataclass
class ReleaseLoad:
    path: Path
    tensors: int
    params: int
    frozen_wan: int  # frozen Wan tensors in the file, skipped (the backbone comes from the Wan weights)
    unused: int  # release-only unused tensors, skipped
    dtypes: list[str]

    def line(self) -> str:
        skipped = f"skipped by design: {self.frozen_wan} frozen Wan tensors (the backbone is loaded from the Wan " \
                  f"weights), {self.unused} unused camera-trunk modulations"
        return (f"released FantasyWorld weights loaded: {self.path} ({self.tensors} tensors, {self.params:,} "
                f"parameters, {'/'.join(self.dtypes)} -> the model's dtype; release switches on); {skipped}")


def load_release(model, path: str | Path, state_dict: Optional[dict] = None) -> ReleaseLoad:
    """Load a release-layout file (or `state_dict`) into every trainable part of `model` (geometry +
    interaction). The model must have the release switches (`release_config`). Every check runs before
    anything is copied: key map, shapes, floating dtypes, finite values. Tensors are cast to each
    parameter's dtype (the release's bf16 widens exactly to our float32)."""
    path = Path(path)
    if not is_release_config(model.config):
        raise ReleaseError(f"{path}: the released weights need the release switches (camera_expand, "
                           f"camera_token_grouping, plucker_intrinsics); build the model from "
                           f"fwmodel.release.release_config({model.config.name!r})")
    state = read_release_file(path) if state_dict is None else state_dict
    mapping = map_release(state, model.config, where=str(path))
    params = dict(model.named_parameters())
    for name, tensor in mapping.tensors.items():
        if not tensor.dtype.is_floating_point:
            raise ReleaseError(f"{path}: tensor {release_name(name, model.config)} is {tensor.dtype}, not floating point")
    from fwmodel.checkpoint import check_finite

    check_finite(path, mapping.tensors)
    with torch.no_grad():
        for name, tensor in mapping.tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in mapping.tensors.values()})
    return ReleaseLoad(path, len(mapping.tensors), sum(t.numel() for t in mapping.tensors.values()),
                       len(mapping.frozen_wan), len(mapping.unused), dtypes)


def convert_release(src: str | Path, out: str | Path, to: str = "ours", preset: str = RELEASE_PRESET,
                    wan_weights: Optional[str] = None, config: Optional[ModelConfig] = None) -> Path:
    """`fwmodel convert-release`. to="ours": a release file (model.pth or release-layout safetensors) ->
    our Stage-2 checkpoint `out` (.safetensors + sidecar, float32, config = `release_config(preset)`,
    sidecar extra.source = where it came from; `wan_weights` is recorded as the run's model.wan_weights
    so `fwmodel generate` finds the backbone). to="release": our Stage-2 checkpoint of a release-config
    model -> the release layout (`out` .safetensors, or .pth through torch.save for the release's own
    inference_wan21.py), dtypes kept. `config` replaces `release_config(preset)` (it must have the
    release switches; tests use a tiny one)."""
    from fwmodel.checkpoint import file_sha256, verify_checkpoint_file, write_checkpoint

    src, out = Path(src), Path(out)
    if to == "ours":
        if out.suffix != ".safetensors":
            raise ReleaseError(f"output {out}: our checkpoints end in .safetensors")
        config = config or release_config(preset)
        if not is_release_config(config):
            raise ReleaseError(f"convert-release: configuration {config.name} lacks the release switches")
        mapping = map_release(read_release_file(src, allow_pickle=True), config, where=str(src))
        bad = [k for k, t in mapping.tensors.items() if not t.dtype.is_floating_point]
        if bad:
            raise ReleaseError(f"{src}: {len(bad)} tensors are not floating point (e.g. {release_name(bad[0], config)})")
        tensors = {k: t.to(torch.float32).contiguous() for k, t in mapping.tensors.items()}
        from fwmodel.checkpoint import check_finite
        from fwmodel.train.config import TrainConfig

        check_finite(src, tensors)
        train = TrainConfig()
        train.train.stage, train.model.preset, train.model.wan_weights = 2, config.name, wan_weights
        source = {"format": RELEASE_FORMAT, "file": src.name, "sha256": file_sha256(src), "repo": RELEASE_REPO,
                  "frozen_wan_skipped": len(mapping.frozen_wan), "unused_skipped": len(mapping.unused),
                  "release_switches": True}
        return write_checkpoint(tensors, out, config, stage=2, step=None,
                                extra={"source": source, "train": train.model_dump(mode="json")})
    if to == "release":
        header = verify_checkpoint_file(src, verify_hash=True)
        config = checkpoint_config(src)
        if not is_release_config(config) or header.get("fingerprint") != config.fingerprint():
            raise ReleaseError(f"{src} was trained without the release switches (preset {header.get('preset')}, "
                               "configuration " + str(header.get("fingerprint")) + "): its camera head and camera "
                               "rays mean something else than the release's, so it cannot be written as release weights")
        if header.get("stage") != 2:
            raise ReleaseError(f"{src} is a Stage-{header.get('stage')} checkpoint; the release layout needs the "
                               "Stage-2 set (geometry + interaction)")
        from safetensors.torch import load_file

        tensors = ours_to_release(load_file(str(src)), config)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() in PICKLE_SUFFIXES:
            torch.save(tensors, out)
        elif out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out),
                      metadata={"format": RELEASE_FORMAT, "converted_from": src.name})
        else:
            raise ReleaseError(f"output {out}: use .safetensors or .pth")
        return out
    raise ReleaseError(f"--to {to!r}: use ours or release")
