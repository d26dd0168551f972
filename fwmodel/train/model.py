"""The model a training run trains: `build_model` (frozen Wan backbone in model.backbone_dtype, the
trainable geometry/interaction parts in fp32, what trains set by `fwmodel.stages`) and the Stage-1
initialisation of Stage 2 (`check_init_from`, `load_stage1`). `fwmodel.inference` builds trained
checkpoints' models with the same `build_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fwmodel.checkpoint import CheckpointError, load_trainable, read_sidecar, verify_checkpoint_file
from fwmodel.config import get_preset
from fwmodel.stages import TRAINED_PARTS, set_trainable
from fwmodel.train.config import ConfigError, TrainConfig
from fwmodel.train.log import RunLogger


def build_model(cfg: TrainConfig, device: torch.device, log: RunLogger, config=None):
    """The model for `cfg.train.stage` on `device`: frozen backbone, trainable parts in fp32.

    `config` (a ModelConfig) overrides the preset's (inference passes the one its checkpoint header
    names); without it, a run initialised from the released weights (`model.init_from` a release
    file or a converted one, `fwmodel.release`) gets the preset with the release switches.
    """
    from fwmodel.backbone import load_wan_transformer
    from fwmodel.model import FantasyWorldModel

    if config is None:
        config = model_config(cfg)
        if config.fingerprint() != get_preset(cfg.model.preset).fingerprint():
            log.info(f"model: preset {config.name} with the release switches (the released weights' "
                     f"camera expansion, camera-token grouping and Plucker intrinsics; {cfg.model.init_from})")
    backbone_dtype = torch.bfloat16 if cfg.model.backbone_dtype == "bfloat16" else torch.float32
    torch.manual_seed(cfg.train.seed)  # same random init on every rank
    weights = cfg.model.wan_weights
    if weights is None or weights == "random":
        if weights is None and config.name != "tiny":
            raise ConfigError(
                f"model.wan_weights is not set: point it at the Wan2.1 weights for preset {config.name} "
                f"(e.g. `hf download {config.hub_id} --local-dir weights/wan` then "
                "--set model.wan_weights=weights/wan)"
            )
        with torch.device(device):
            model = FantasyWorldModel(config)
        log.info(f"Wan backbone: RANDOM weights (preset {config.name}; for tests and demos only)")
    else:
        wan = load_wan_transformer(weights, config.wan, config.hub_id, backbone_dtype)
        with torch.device(device):
            model = FantasyWorldModel(config, wan)
        log.info(f"Wan backbone: {weights} (preset {config.name})")
    model.backbone.to(device=device, dtype=backbone_dtype)
    model.geometry.to(device=device, dtype=torch.float32)
    model.interaction.to(device=device, dtype=torch.float32)
    set_trainable(model, cfg.train.stage)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    model.train()
    return model


def model_config(cfg: TrainConfig):
    """The ModelConfig a run builds: its preset, with the release switches when `model.init_from` is
    the released weights (a release-layout file or a `convert-release` checkpoint; fwmodel.release)."""
    from fwmodel.release import checkpoint_config, release_config, release_source

    init = cfg.model.init_from
    kind = release_source(init) if init is not None else None
    if kind == "converted":
        return checkpoint_config(init)
    if kind in ("release", "pickle"):
        return release_config(cfg.model.preset)
    return get_preset(cfg.model.preset)


def check_init_from(path: Path, allow_missing_sidecar: bool = False) -> dict:
    """`--init-from` takes a Stage-1 checkpoint (docs/TRAINING.md): a readable file with its sidecar, of stage 1;
    or the released FantasyWorld weights: a release-layout .safetensors (no sidecar; detected by its keys)
    or our checkpoint converted from them (`fwmodel convert-release`, stage 2). A release .pth is refused
    with the conversion command (we do not unpickle here).

    Returns the header; raises CheckpointError (one line: the stage found and what is expected) before
    anything is written or loaded.
    """
    from fwmodel.release import RELEASE_FORMAT, ReleaseError, convert_command, release_source

    kind = release_source(path)
    if kind == "pickle":
        raise ReleaseError(f"--init-from {path} is a pickle (the release's model.pth): convert it once with "
                           f"`{convert_command(path)}` and pass the .safetensors")
    if kind == "release":
        return {"format": RELEASE_FORMAT, "preset": None, "stage": 2, "step": None}
    if kind == "converted":
        header = verify_checkpoint_file(path, verify_hash=False, allow_missing_sidecar=allow_missing_sidecar)
        source = ((read_sidecar(path) or {}).get("extra") or {}).get("source") or {}
        if source.get("format") == RELEASE_FORMAT and header.get("stage") == 2:
            return {**header, "converted_release": True}
    header = verify_checkpoint_file(path, verify_hash=False, allow_missing_sidecar=allow_missing_sidecar)
    found = header.get("stage")
    if found != 1:
        what = f"a Stage-{found} checkpoint" if found in (1, 2) else f"a checkpoint of stage {found!r}"
        raise CheckpointError(
            f"--init-from takes a Stage-1 checkpoint, but {path} is {what} (step {header.get('step')}): "
            "start from the Stage-1 file (e.g. outputs/fantasy_world_stage1/step-20000.safetensors); to continue "
            "a Stage-2 run, pass --resume with its --output instead"
        )
    return header


def load_stage1(model, path: Path, stage: int, log: RunLogger, allow_missing_sidecar: bool = False) -> None:
    """Initialise from a Stage-1 file, or from the released weights (`check_init_from`), and print exactly
    what was loaded. The released weights fill geometry and interaction (in Stage 1 the interaction is
    loaded but stays frozen and is not saved)."""
    header = check_init_from(path, allow_missing_sidecar)
    from fwmodel.release import RELEASE_FORMAT, load_release

    if header.get("format") == RELEASE_FORMAT:
        info = load_release(model, path)
        log.info(info.line() + ("" if stage == 2 else "; Stage 1 trains geometry.* only (interaction frozen)"))
        return
    if header.get("converted_release"):  # a `fwmodel convert-release` checkpoint (stage 2)
        info = load_trainable(model, path, 2, allow_missing_sidecar=allow_missing_sidecar)
        n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
        log.info(f"released FantasyWorld weights loaded (converted checkpoint): {path} (preset {info.preset}, "
                 f"release switches on); {n_params:,} parameters: geometry.*, interaction.*"
                 + ("" if stage == 2 else "; Stage 1 trains geometry.* only (interaction frozen)"))
        return
    warn_missing_sidecar(path, log)
    info = load_trainable(model, path, 1, allow_missing_sidecar=allow_missing_sidecar)
    loaded = [n for n, _ in model.named_parameters() if n.split(".")[0] in TRAINED_PARTS[1]]
    n_params = sum(p.numel() for n, p in model.named_parameters() if n in set(loaded))
    modules = sorted({".".join(n.split(".")[:2]) for n in loaded})
    fresh = sorted({".".join(n.split(".")[:2]) for n in info.missing})
    log.info(
        f"Stage 1 checkpoint loaded successfully: {path} (preset {info.preset}, stage 1, step {info.step}); "
        f"{len(loaded)} tensors, {n_params:,} parameters: {', '.join(modules)}"
    )
    if fresh:
        log.info(f"Stage-2 modules starting from their zero-gated initialisation: {', '.join(fresh)} "
                 f"({len(info.missing)} tensors, exactly the expected missing set)")


def warn_missing_sidecar(path: Path, log: RunLogger) -> None:
    """Put the missing-sidecar warning in train.log too (checks already allowed it)."""
    if not path.with_suffix(".json").is_file():
        log.info(f"warning: {path} has no sidecar: loaded without the size and sha256 checks "
                 "(--allow-missing-sidecar)")

