"""The training configuration: `TrainConfig` (one pydantic section per TOML table), how it is loaded
(TOML file or packaged recipe + `--set section.key=value` overrides) and what of it is hashed for resume.

    cfg = load_config("tiny-stage1", sets=["optim.lr=2e-5"])      # TrainConfig; ConfigError names the field
    config_hash(cfg)                                              # 16 hex digits over hashed_config(cfg)

`hashed_config` is the part of the config that defines the training trajectory: `--resume` refuses a
run whose hash differs (paths, cadence, length and workers may change; see `_RESUMABLE_CHANGES`).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fwdata.runtime import ConfigFileError, load_config_file
from fwmodel.config import PRESET_NAMES
from fwmodel.data import DataConfig
from fwmodel.losses import DiffusionConfig, LossConfig


class ConfigError(ConfigFileError):
    """A training config that cannot be used; the message names the field."""



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TrainSection(_Section):
    stage: Literal[1, 2] = 1
    num_steps: int = Field(20000, ge=1)
    batch_size: int = Field(1, ge=1, description="samples per GPU per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    seed: int = 0
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    output: Optional[Path] = Field(None, description="default outputs/fantasy_world_stage<N>")
    keep_states: int = Field(2, ge=1, description="resumable states kept (weights files are all kept)")
    max_nonfinite_steps: int = Field(20, ge=0, description="abort after more skipped non-finite steps than this")
    dry_run_steps: int = Field(3, ge=1)
    deterministic: bool = Field(
        False, description="deterministic GPU kernels where torch has them (slower); CPU runs are always exact"
    )
    threads: Optional[int] = Field(
        None, ge=0, description="torch intra-op threads (--threads); unset: 1 for the tiny preset on a CPU (several "
        "times faster than the default for tiny models), torch's default otherwise; 0: torch's default"
    )
    parallel: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="strategy of a multi-process run: ddp (replicated trainable part) or fsdp2 (sharded "
        "trainable parameters, gradients and optimizer state; fwmodel.train.parallel); same trajectory, not hashed"
    )
    fsdp_shard_backbone: bool = Field(
        False, description="with parallel = fsdp2: also shard the frozen Wan blocks (one FSDP2 unit each, "
        "all-gathered for forward and backward, no gradients) instead of replicating them; same trajectory, not hashed"
    )

    @model_validator(mode="after")
    def _check_shard_backbone(self) -> "TrainSection":
        if self.fsdp_shard_backbone and self.parallel != "fsdp2":
            raise ValueError("train.fsdp_shard_backbone = true needs train.parallel = \"fsdp2\"")
        return self


class ModelSection(_Section):
    preset: str = "wan2.1-t2v-1.3b"
    wan_weights: Optional[str] = Field(
        None, description='diffusers Wan2.1 directory or .safetensors file; "random" only for tests/demos'
    )
    vae: Optional[Path] = Field(None, description="Wan VAE (repository root or vae/) for online encoding (no cache)")
    text_encoder: Optional[Path] = Field(None, description="UMT5 (repository root or text_encoder/) for online encoding")
    image_encoder: Optional[Path] = Field(
        None, description="CLIP image encoder of an image-to-video preset (Wan I2V repository root or image_encoder/, "
        "or random-tiny) for online encoding of the first-frame condition and image tokens (no cache)")
    init_from: Optional[Path] = Field(None, description="Stage-1 checkpoint that Stage 2 starts from")
    gradient_checkpointing: bool = True
    backbone_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    mixed_precision: Literal["bf16", "no"] = "bf16"
    device: str = Field("auto", description="auto (cuda:LOCAL_RANK when available), cpu or cuda")

    @model_validator(mode="after")
    def _check(self) -> "ModelSection":
        if self.preset not in PRESET_NAMES:
            raise ValueError(f"model.preset {self.preset!r} is unknown; choose one of: {', '.join(PRESET_NAMES)}")
        return self


class OptimSection(_Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip; 0 = off")


class MemorySection(_Section):
    check: bool = Field(True, description="refuse configurations estimated not to fit")
    limit_gb: Optional[float] = Field(None, gt=0, description="memory per device to plan for (default: the GPU's)")


class SpeedSection(_Section):
    """Speed flags of the step (docs/TRAINING.md "Speed flags"). Each leaves the trajectory unchanged to float
    tolerance (tests/train/test_speed_flags.py), so none is hashed for resume."""

    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = Field(
        "auto", description="SDPA kernel of every attention (ours and the Wan blocks'), through "
        "torch.nn.attention.sdpa_kernel around forward and backward; auto: torch's choice. A CPU runs auto or math")
    compile: Literal["off", "blocks"] = Field(
        "off", description="blocks: regional torch.compile (dynamic=False) of each repeated block (Wan attention / "
        "FFN, geometry frame and global blocks, bi-cross-attention, camera adapters), before DDP/FSDP2 wrapping")
    fused_adamw: Optional[bool] = Field(
        None, description="fused AdamW kernel; unset: fused on CUDA, foreach elsewhere; true also on a CPU")
    activation_checkpointing: Optional[Literal["full", "selective", "off"]] = Field(
        None, description="full: recompute every block and DPT chunk; selective: every ac_every-th block (DPT "
        "chunks still recomputed); off: nothing. Unset: model.gradient_checkpointing (true = full, false = off)")
    ac_every: int = Field(2, ge=1, description="selective checkpointing: recompute blocks 0, k, 2k, ...")
    dpt_channels_last: bool = Field(False, description="DPT heads' convolutions on channels_last activations")
    pin_memory: bool = Field(True, description="pinned DataLoader batches and non-blocking copies (CUDA only)")


class TrainConfig(_Section):
    train: TrainSection = TrainSection()
    model: ModelSection = ModelSection()
    data: DataConfig = DataConfig()
    optim: OptimSection = OptimSection()
    loss: LossConfig = LossConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    memory: MemorySection = MemorySection()
    speed: SpeedSection = SpeedSection()

    def output_dir(self) -> Path:
        return Path(self.train.output or Path("outputs") / f"fantasy_world_stage{self.train.stage}")


# Fields that may change between a run and its resumption (paths, cadence, length, workers).
_RESUMABLE_CHANGES = {
    # batch_size may change with the number of GPUs as long as batch_size x GPUs stays (checked on resume)
    "train": {"num_steps", "checkpoint_every", "log_every", "output", "keep_states", "max_nonfinite_steps",
              "dry_run_steps", "batch_size", "deterministic", "threads", "parallel",
              "fsdp_shard_backbone"},
    "model": {"wan_weights", "vae", "text_encoder", "image_encoder", "init_from", "device", "gradient_checkpointing"},
    "data": {"root", "num_workers", "cache_dir", "cache", "allow_random_init_labels"},
    "memory": None,  # the whole section
    "speed": None,  # same trajectory to float tolerance (tests/train/test_speed_flags.py)
}


# Fields added after runs were saved: hashed only when set to something other than their default, so
# that a run saved before the field existed (the same trajectory) still resumes.
_HASHED_WHEN_CHANGED = {"data": {"shuffle_buffer"}}


def hashed_config(cfg: TrainConfig) -> dict:
    """The part of the config that defines the training trajectory (what resuming must not change)."""
    out = {}
    defaults = TrainConfig().model_dump(mode="json")
    for section, values in cfg.model_dump(mode="json").items():
        skip = _RESUMABLE_CHANGES.get(section, set())
        if skip is None:
            continue
        late = _HASHED_WHEN_CHANGED.get(section, set())
        out[section] = {k: v for k, v in values.items()
                        if k not in skip and not (k in late and v == defaults[section][k])}
    return out


def parse_speed(items: list[str]) -> dict[str, Any]:
    """["compile=blocks", "fused_adamw=true", ...] (`fwmodel bench --speed`) -> validated [speed] values;
    ConfigError names a bad key or value."""
    values = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--speed {item!r}: expected KEY=VALUE, e.g. --speed compile=blocks")
        key, value = (t.strip() for t in item.split("=", 1))
        values[key] = _parse_value(value)
    try:
        return SpeedSection.model_validate(values).model_dump(include=set(values))
    except ValueError as err:
        first = err.errors()[0] if hasattr(err, "errors") else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "?"
        raise ConfigError(f"--speed {where}: {first.get('msg', err)}") from None


def checkpointing_mode(cfg: TrainConfig) -> str:
    """The activation checkpointing that runs: speed.activation_checkpointing, else model.gradient_checkpointing
    (true: "full", false: "off")."""
    if cfg.speed.activation_checkpointing is not None:
        return cfg.speed.activation_checkpointing
    return "full" if cfg.model.gradient_checkpointing else "off"


def config_hash(cfg: TrainConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(hashed_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: Optional[Path] = None, overrides: Optional[dict[str, Any]] = None,
                sets: Optional[list[str]] = None) -> TrainConfig:
    """TOML file or packaged recipe name (optional; `tiny-stage1`, see fwmodel.recipes) + `--set section.key=value`
    strings + explicit overrides {"section.key": value}."""
    items: list[tuple[str, Any]] = []
    for s in sets or []:
        if "=" not in s:
            raise ConfigError(f"--set {s!r}: expected section.key=value, e.g. --set optim.lr=2e-5")
        key, value = s.split("=", 1)
        items.append((key.strip(), _parse_value(value.strip())))
    items += [(k, v) for k, v in (overrides or {}).items() if v is not None]
    nested: dict = {}
    for key, value in items:
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(f"override {key!r}: expected section.key, e.g. optim.lr")
        nested.setdefault(parts[0], {})[parts[1]] = value
    if path is not None:
        path = resolve_recipe(path)
    return load_config_file(TrainConfig, path, nested, error=ConfigError,
                            missing_hint="`fwmodel recipes` lists the packaged recipes")


def resolve_recipe(recipe) -> Path:
    """A recipe file, or a packaged recipe by name (`tiny-stage1`); ConfigError listing the names otherwise."""
    from fwdata.presets import find_preset
    from fwmodel.recipes import RECIPES

    return find_preset(recipe, RECIPES, error=ConfigError)


def config_toml(cfg: TrainConfig) -> str:
    import tomli_w

    def clean(d):
        if isinstance(d, dict):
            return {k: clean(v) for k, v in d.items() if v is not None}
        if isinstance(d, (list, tuple)):
            return [clean(v) for v in d]
        return d

    return tomli_w.dumps(clean(cfg.model_dump(mode="json")))

