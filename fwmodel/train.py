"""The two-stage FantasyWorld trainer: one readable loop for one GPU, many GPUs and many nodes.

    fwmodel train --stage 1 --config stage1 --data DATASET
    fwmodel train --stage 2 --config stage2 --data DATASET \\
        --init-from outputs/fantasy_world_stage1/step-20000.safetensors
    torchrun --nproc_per_node 8 -m fwmodel.cli train ...          (data parallel, see pipelines/train/)

What one run does, in order:

    1. config       TrainConfig from TOML + CLI overrides (pydantic: every mistake named)
    2. distributed  torchrun / accelerate environment -> process group (NCCL on GPUs, gloo on CPU)
    3. data         dataset selection, latent cache lookup, resumable sampler (fails before any weight)
    4. preflight    estimated memory per GPU; refuses a configuration that cannot fit
    5. model        frozen Wan backbone (weights, bf16) + geometry/interaction (fp32 master weights);
                    Stage 2 loads the Stage-1 file and says what it loaded
    6. optimizer    AdamW over the stage's trainable parameters only; warmup + constant/cosine LR
    7. resume       weights, optimizer, scheduler, RNG, data position from OUTPUT/state/step-N
    8. loop         grad accumulation, bf16 autocast, DDP over the trainable part only (the frozen
                    backbone is outside DDP: no gradient sync, no broadcast, no optimizer state),
                    non-finite steps skipped and counted, logs, checkpoints

Outputs in OUTPUT (default outputs/fantasy_world_stage<N>/):

    config.toml                 the resolved configuration
    train.log                   everything printed, plus details
    metrics.jsonl               one JSON object per logged step (the TensorBoard scalars)
    tb/                         TensorBoard events
    step-N.safetensors (+.json) trainable weights + sidecar every checkpoint_every steps
    state/step-N/               optimizer, scheduler, RNG per rank, data position (for --resume), and
                                manifest.json (size + sha256 of each file, written last): `--resume`
                                verifies every file before loading anything and refuses a damaged state
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shlex
import shutil
import sys
import time
import tomllib
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import safe_open
from safetensors.torch import save_file

from fwdata import __version__
from fwdata.runtime import ConfigFileError, load_config_file
from fwmodel.checkpoint import CheckpointError, file_sha256, load_trainable, save_trainable, verify_checkpoint_file
from fwmodel.config import PRESET_NAMES, ModelConfig, get_preset
from fwmodel.data import DataConfig, DataError, StepSampler, TrainingDataset, mix_seed, move_batch, plucker_for_batch
from fwmodel.losses import DiffusionConfig, LossConfig, add_noise, compute_losses
from fwdata.textout import plural
from fwmodel.memory import GIB, check_fits, device_capacity, estimate_memory
from fwmodel.progress import Mode, StepProgress
from fwmodel.stages import TRAINED_PARTS, set_trainable, trainable_module_names

STATE_FORMAT = "fwmodel-train-state"
MANIFEST = "manifest.json"  # written last into each state/step-N/: size and sha256 of every other file
MANIFEST_FORMAT = "fwmodel-train-state-manifest"


class ConfigError(ConfigFileError):
    """A training config that cannot be used; the message names the field."""


class TrainingAborted(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); the message says what to check."""


class ResumeError(ValueError):
    """`--resume` cannot continue this run; the message says why."""


# =========================================================================== configuration


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


class ModelSection(_Section):
    preset: str = "wan2.1-t2v-1.3b"
    wan_weights: Optional[str] = Field(
        None, description='diffusers Wan2.1 directory or .safetensors file; "random" only for tests/demos'
    )
    vae: Optional[Path] = Field(None, description="Wan VAE (repository root or vae/) for online encoding (no cache)")
    text_encoder: Optional[Path] = Field(None, description="UMT5 (repository root or text_encoder/) for online encoding")
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


class TrainConfig(_Section):
    train: TrainSection = TrainSection()
    model: ModelSection = ModelSection()
    data: DataConfig = DataConfig()
    optim: OptimSection = OptimSection()
    loss: LossConfig = LossConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    memory: MemorySection = MemorySection()

    def output_dir(self) -> Path:
        return Path(self.train.output or Path("outputs") / f"fantasy_world_stage{self.train.stage}")


# Fields that may change between a run and its resumption (paths, cadence, length, workers).
_RESUMABLE_CHANGES = {
    # batch_size may change with the number of GPUs as long as batch_size x GPUs stays (checked on resume)
    "train": {"num_steps", "checkpoint_every", "log_every", "output", "keep_states", "max_nonfinite_steps",
              "dry_run_steps", "batch_size", "deterministic", "threads"},
    "model": {"wan_weights", "vae", "text_encoder", "init_from", "device", "gradient_checkpointing"},
    "data": {"root", "num_workers", "cache_dir", "cache", "allow_random_init_labels"},
    "memory": None,  # the whole section
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


# =========================================================================== distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def init_distributed(device_pref: str = "auto", deterministic: bool = False) -> Dist:
    """Read the torchrun / accelerate environment (RANK, WORLD_SIZE, LOCAL_RANK) and set up the group."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref not in ("auto", "cpu", "cuda") and not device_pref.startswith("cuda:"):
        raise ConfigError(f"model.device {device_pref!r}: use auto, cpu, cuda or cuda:N")
    if device_pref.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("model.device asks for CUDA but no GPU is visible (check CUDA_VISIBLE_DEVICES, `fwmodel doctor`)")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, device)


# =========================================================================== logging


class RunLogger:
    """train.log + console on rank 0; metrics.jsonl and TensorBoard for the scalars.

    Messages before `open(output)` (config, data, preflight: before anything is written) are kept
    and written to train.log when the output folder is opened.
    """

    def __init__(self, dist_: Dist, quiet: bool, echo: Callable[[str], None],
                 echo_err: Optional[Callable[[str], None]] = None):
        self.dist, self.quiet, self.echo = dist_, quiet, echo
        self.echo_err = echo_err or (lambda m: print(m, file=sys.stderr, flush=True))
        self.file = None
        self.tb = None
        self.metrics = None
        self.pending: list[str] = []

    def open(self, output: Path, resume_step: Optional[int] = None) -> None:
        if not self.dist.is_main:
            return
        output.mkdir(parents=True, exist_ok=True)
        self.file = open(output / "train.log", "a", buffering=1)
        for line in self.pending:
            self.file.write(line + "\n")
        self.pending = []
        metrics_path = output / "metrics.jsonl"
        if resume_step is not None and metrics_path.is_file():  # drop what a killed run logged after its state
            kept = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            metrics_path.write_text("".join(k + "\n" for k in kept))
        self.metrics = open(metrics_path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        except Exception as err:  # tensorboard missing or broken: keep training, say so
            self.info(f"TensorBoard disabled ({err})")

    def info(self, message: str, console: bool = True) -> None:
        if not self.dist.is_main:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = [f"{stamp} {line}" for line in (message.splitlines() or [""])]
        if self.file:
            for line in lines:
                self.file.write(line + "\n")
        else:
            self.pending += lines
        if console and not self.quiet:
            self.echo(message)

    def summary(self, message: str) -> None:
        """Into train.log and onto the console, also with --quiet: the run's last line."""
        if not self.dist.is_main:
            return
        self.info(message, console=False)
        self.echo(message)

    def warn(self, message: str) -> None:
        """Into train.log and onto stderr, also with --quiet: what the user must not miss."""
        if not self.dist.is_main:
            return
        self.info(message, console=False)
        self.echo_err(message)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        if self.metrics:
            self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        for handle in (self.file, self.metrics):
            if handle:
                handle.close()
        if self.tb:
            self.tb.close()


# =========================================================================== model and optimizer


def build_model(cfg: TrainConfig, device: torch.device, log: RunLogger):
    """The model for `cfg.train.stage` on `device`: frozen backbone, trainable parts in fp32."""
    from fwmodel.backbone import load_wan_transformer
    from fwmodel.model import FantasyWorldModel

    config = get_preset(cfg.model.preset)
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


def check_init_from(path: Path, allow_missing_sidecar: bool = False) -> dict:
    """`--init-from` takes a Stage-1 checkpoint (docs/TRAINING.md): a readable file with its sidecar, of stage 1.

    Returns the header; raises CheckpointError (one line: the stage found and what is expected) before
    anything is written or loaded.
    """
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
    """Initialise from a Stage-1 file (nothing else: `check_init_from`) and print exactly what was loaded."""
    check_init_from(path, allow_missing_sidecar)
    _warn_missing_sidecar(path, log)
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


def _warn_missing_sidecar(path: Path, log: RunLogger) -> None:
    """Put the missing-sidecar warning in train.log too (checks already allowed it)."""
    if not path.with_suffix(".json").is_file():
        log.info(f"warning: {path} has no sidecar: loaded without the size and sha256 checks "
                 "(--allow-missing-sidecar)")


def lr_factor(step: int, cfg: OptimSection, num_steps: int) -> float:
    """LR multiplier after `step` optimizer steps: linear warmup, then constant / cosine / linear decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, num_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_optimizer(model, cfg: TrainConfig, device: torch.device):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, o, cfg.train.num_steps))
    return names, optimizer, scheduler


def module_groups(model, stage: int) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters per report module (geometry.aggregator, interaction.bicross, ...)."""
    groups: dict[str, list] = {m: [] for m in trainable_module_names(model, stage)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = ".".join(name.split(".")[:2])
            groups.setdefault(key, []).append(p)
    return {k: v for k, v in groups.items() if v}


def grad_norms(groups: dict[str, list[torch.nn.Parameter]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    per_module = {}
    for name, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        per_module[name] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.zeros((), device=params[0].device)
    total = torch.linalg.vector_norm(torch.stack(list(per_module.values())))
    return total, per_module


# =========================================================================== state (resume)


def _state_root(output: Path) -> Path:
    return output / "state"


def list_states(output: Path) -> list[int]:
    """Steps of the state/step-N folders, damaged ones included (resume verifies the one it uses)."""
    root = _state_root(output)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-"):
            try:
                steps.append(int(d.name[5:]))
            except ValueError:
                pass
    return sorted(steps)


def _optimizer_tensors(optimizer, names: list[str]) -> tuple[dict, list]:
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{names[index]}::{key}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) \
                else torch.tensor(value)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, groups


def _load_optimizer(optimizer, names: list[str], tensors: dict, groups: list) -> None:
    index = {n: i for i, n in enumerate(names)}
    saved_names = {g for group in groups for g in group["params"]}
    if saved_names != set(names):
        raise ResumeError("the saved optimizer state is for a different set of trainable parameters")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, field_ = key.split("::")
        state.setdefault(index[name], {})[field_] = value
    param_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                    for g in groups]
    for g in param_groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _rng_state(device: torch.device) -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": json.loads(json.dumps(random.getstate()))}
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def write_manifest(directory: Path, step: int) -> Path:
    """Write manifest.json (size and sha256 of every file in `directory`) atomically; call it last."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def _refuse_state(directory: Path, problem: str, output: Path) -> ResumeError:
    """The one-line error for a damaged state: what is wrong, and the states to resume from instead."""
    others = [s for s in list_states(output) if _state_root(output) / f"step-{s}" != directory]
    fix = (f"resume from an earlier state with --resume-step N (available: {', '.join(map(str, others))}) "
           "or start a new run in another --output" if others else "start a new run in another --output")
    return ResumeError(f"cannot resume from {directory}: {problem}; {fix}")


def _read_manifest(directory: Path, output: Path) -> dict:
    """manifest.json of a state folder as {file name: {bytes, sha256}}; ResumeError when absent or unreadable."""
    path = directory / MANIFEST
    if not path.is_file():
        raise _refuse_state(directory, f"it has no {MANIFEST} (written by an older fwmodel, or removed), so its "
                            "files cannot be verified", output)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _refuse_state(directory, f"{path} is unreadable ({err})", output) from err
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not all(isinstance(v, dict) for v in files.values())):
        raise _refuse_state(directory, f"{path} is not a state manifest", output)
    return files


def _verify_state_files(directory: Path, output: Path) -> dict:
    """Every file of the manifest is there with its size and sha256; returns the manifest's files."""
    files = _read_manifest(directory, output)
    for name in ("trainer.json", "optimizer.safetensors"):
        if name not in files:
            raise _refuse_state(directory, f"its {MANIFEST} does not list {name}", output)
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise _refuse_state(directory, f"{path} is missing", output)
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise _refuse_state(directory, f"{path} is damaged: {size} bytes, the manifest says "
                                f"{entry.get('bytes')} (truncated?)", output)
        if file_sha256(path) != entry.get("sha256"):
            raise _refuse_state(directory, f"{path} is damaged: its sha256 does not match the manifest", output)
    return files


@dataclass
class SavedState:
    """A verified state/step-N folder: every file matches its manifest; trainer.json parsed."""
    directory: Path
    step: int
    trainer: dict


def open_state(output: Path, step: Optional[int], allow_missing_sidecar: bool = False) -> SavedState:
    """Find and verify the state to resume (latest or `step`) before anything is loaded or written.

    Raises ResumeError naming the missing or damaged file (manifest, trainer.json, optimizer, RNG,
    or the step-N.safetensors weights) and the states that could be used instead.
    """
    steps = list_states(output)
    if not steps:
        raise ResumeError(f"nothing to resume in {output}: no state/step-N folder (a run writes one every "
                          f"train.checkpoint_every steps); start without --resume")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ResumeError(f"no resumable state for step {step} in {output}; available: {', '.join(map(str, steps))}")
    directory = _state_root(output) / f"step-{step}"
    files = _verify_state_files(directory, output)
    try:
        trainer = json.loads((directory / "trainer.json").read_text())
    except ValueError as err:
        raise _refuse_state(directory, f"{directory / 'trainer.json'} is not valid JSON ({err})", output) from err
    if not isinstance(trainer, dict) or trainer.get("format") != STATE_FORMAT or trainer.get("step") != step:
        raise _refuse_state(directory, f"{directory / 'trainer.json'} is not the trainer state of step {step}", output)
    for rank in range(int(trainer.get("world_size", 1))):
        for name in (f"rng-rank{rank}.safetensors", f"rng-rank{rank}.json"):
            if name not in files:
                raise _refuse_state(directory, f"{directory / name} is missing (not in the manifest)", output)
    # the weights live beside state/ (step-N.safetensors): their sidecar is their manifest
    verify_checkpoint_file(output / str(trainer.get("weights")), verify_hash=False,
                           allow_missing_sidecar=allow_missing_sidecar)
    return SavedState(directory, step, trainer)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (skipped ones included)
    skipped: int = 0  # non-finite steps skipped
    consecutive_skipped: int = 0


def save_state(output: Path, model, optimizer, scheduler, names, state: TrainState, cfg: TrainConfig,
               data_fp: str, d: Dist, log: RunLogger) -> Path:
    """step-N.safetensors (+ sidecar) and state/step-N/; written under temporary names, then renamed."""
    step = state.step
    weights = output / f"step-{step}.safetensors"
    final = _state_root(output) / f"step-{step}"
    tmp = _state_root(output) / f".step-{step}.tmp"
    if d.is_main:
        extra = {"config_hash": config_hash(cfg), "data_fingerprint": data_fp, "tool_version": __version__,
                 "train": cfg.model_dump(mode="json")}
        save_trainable(model, weights, cfg.train.stage, step, extra=extra)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors, groups = _optimizer_tensors(optimizer, names)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        trainer = {
            "format": STATE_FORMAT,
            "step": step,
            "stage": cfg.train.stage,
            "preset": cfg.model.preset,
            "weights": weights.name,
            "config_hash": config_hash(cfg),
            "config": hashed_config(cfg),
            "data_fingerprint": data_fp,
            "data_source": _data_source(cfg),
            "micro_batches": step * cfg.train.grad_accum,
            "global_micro_batch": cfg.train.batch_size * d.world_size,
            "world_size": d.world_size,
            "skipped": state.skipped,
            "consecutive_skipped": state.consecutive_skipped,
            "scheduler": scheduler.state_dict(),
            "param_groups": groups,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2, default=float))
    d.barrier()
    rng_tensors, rng_meta = _rng_state(d.device)
    save_file(rng_tensors, str(tmp / f"rng-rank{d.rank}.safetensors"))
    (tmp / f"rng-rank{d.rank}.json").write_text(json.dumps(rng_meta))
    d.barrier()
    if d.is_main:
        write_manifest(tmp, step)  # last: a folder with a manifest holds every file complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_states(output)[: -cfg.train.keep_states]:
            shutil.rmtree(_state_root(output) / f"step-{old}", ignore_errors=True)
        log.info(f"checkpoint: {weights} and {final}")
    d.barrier()
    return weights


def load_state(output: Path, saved: SavedState, model, optimizer, scheduler, names, cfg: TrainConfig,
               data_fp: str, d: Dist, log: RunLogger, allow_missing_sidecar: bool = False) -> TrainState:
    """Load a state verified by `open_state`: weights, optimizer, scheduler, RNG, counters."""
    directory, step, trainer = saved.directory, saved.step, saved.trainer
    if trainer.get("stage") != cfg.train.stage:
        raise ResumeError(f"{directory} is a Stage-{trainer.get('stage')} run; resume it with --stage {trainer.get('stage')}")
    if trainer["config_hash"] != config_hash(cfg):
        now, then = hashed_config(cfg), trainer["config"]
        diffs = [f"{s}.{k}: {then.get(s, {}).get(k)!r} -> {v!r}" for s, sec in now.items() for k, v in sec.items()
                 if then.get(s, {}).get(k) != v]
        raise ResumeError(f"the config differs from the run being resumed ({'; '.join(diffs[:5])}); "
                          "resume with the same settings, or start a new run in another --output")
    if trainer["data_fingerprint"] != data_fp:
        raise ResumeError(f"the training samples differ from the run being resumed (data fingerprint "
                          f"{trainer['data_fingerprint']} -> {data_fp}): the dataset, split or selection changed")
    if trainer["global_micro_batch"] != cfg.train.batch_size * d.world_size:
        raise ResumeError(f"the run used {trainer['global_micro_batch']} samples per micro-step "
                          f"(batch_size x GPUs); now {cfg.train.batch_size} x {d.world_size}: keep it equal to resume")
    _warn_missing_sidecar(output / trainer["weights"], log)
    info = load_trainable(model, output / trainer["weights"], cfg.train.stage,
                          allow_missing_sidecar=allow_missing_sidecar)
    with safe_open(str(directory / "optimizer.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    _load_optimizer(optimizer, names, {k: v.to(d.device) for k, v in tensors.items()}, trainer["param_groups"])
    scheduler.load_state_dict(trainer["scheduler"])
    rng_file = directory / f"rng-rank{d.rank}.safetensors"
    if trainer["world_size"] == d.world_size and rng_file.is_file():
        with safe_open(str(rng_file), framework="pt") as f:
            rng = {k: f.get_tensor(k) for k in f.keys()}
        _set_rng_state(rng, json.loads((directory / f"rng-rank{d.rank}.json").read_text()), d.device)
    else:
        log.info("note: different number of processes than the saved run; RNG states re-seeded")
    log.info(f"resumed from {directory} (step {step}, weights {info.path.name}, "
             f"{trainer['skipped']} skipped steps so far)")
    return TrainState(step=step, skipped=trainer["skipped"], consecutive_skipped=trainer["consecutive_skipped"])


# =========================================================================== the run


@dataclass
class TrainResult:
    output: Optional[Path]
    step: int
    checkpoints: list[Path] = field(default_factory=list)
    last_metrics: dict = field(default_factory=dict)
    skipped: int = 0
    history: list[dict] = field(default_factory=list)  # every logged metrics row


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def prepare_data(cfg: TrainConfig, model_config: ModelConfig) -> TrainingDataset:
    """Dataset (with its cache when present), sampler and loader. Fails before any weight is loaded."""
    from fwmodel.cache import CacheError, LatentCache

    if cfg.data.root is None:
        raise DataError("no dataset: pass --data DATASET (a folder with metadata.json) or set data.root")
    from fwmodel.data import select_samples
    from fwmodel.shard_data import ShardDataset, open_shards

    shards = open_shards(cfg.data)  # WebDataset shards when data.root holds shards.json, else None (a folder)
    # a missing or empty dataset is named first
    selection = shards.select(cfg.data) if shards is not None else select_samples(Path(cfg.data.root), cfg.data)
    allowed = cfg.data.allow_random_init_labels
    if not allowed and (found := random_init_findings(cfg, selection.random_init, len(selection.records),
                                                      encoders=False)):
        raise refuse_random_init(found)  # before the cache: a rebuilt dataset needs a new cache anyway
    cache = None
    if cfg.data.cache != "off":
        cache = LatentCache.find(cfg.data)
        if cache is None and cfg.data.cache == "require" and shards is not None:
            raise CacheError(
                f"no latent cache for {cfg.data.clip_spec().key} for the shards {cfg.data.root}: build it on the "
                "dataset folder (`fwmodel cache DATASET --config CONFIG --vae PATH --text-encoder PATH`) and point "
                "data.cache_dir at DATASET/.fwmodel_cache (the cache is keyed by sample id)"
            )
        if cache is None and cfg.data.cache == "require":
            raise CacheError(
                f"no latent cache for {cfg.data.clip_spec().key} in {cfg.data.root}: run `fwmodel cache "
                f"{cfg.data.root} --config CONFIG --vae PATH --text-encoder PATH` first"
            )
    if cache is None and (cfg.model.vae is None or cfg.model.text_encoder is None):
        raise CacheError(
            f"no latent cache for {cfg.data.clip_spec().key} (frames x height x width - stride - window) in "
            f"{cfg.data.root}, and model.vae / model.text_encoder are not set for encoding on the fly: run "
            f"`fwmodel cache {cfg.data.root} --config CONFIG --vae WAN_DIR --text-encoder WAN_DIR` (recommended), "
            "or set both paths"
        )
    if not allowed and (found := random_init_findings(cfg, selection.random_init, len(selection.records), cache)):
        raise refuse_random_init(found)
    if shards is not None:
        return ShardDataset(cfg.data, shards, selection, text_dim=model_config.wan.text_dim, cache=cache)
    dataset = TrainingDataset(cfg.data, text_dim=model_config.wan.text_dim, cache=cache)
    return dataset


def _data_source(cfg: TrainConfig) -> str:
    """"shards" when data.root holds WebDataset shards (shards.json), else "folder" (recorded in trainer.json)."""
    from fwmodel.shard_data import is_shard_root

    return "shards" if is_shard_root(cfg.data.root) else "folder"


def make_loader(dataset: TrainingDataset, cfg: TrainConfig, d: Dist, start_micro: int):
    if not isinstance(dataset, TrainingDataset):  # shards (fwmodel.shard_data): the stream is its own sampler
        stream = dataset.layout(cfg.train.batch_size, d.world_size, d.rank, cfg.train.seed, start=start_micro)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers,
            pin_memory=d.device.type == "cuda", persistent_workers=cfg.data.num_workers > 0,
            prefetch_factor=2 if cfg.data.num_workers > 0 else None,
        )
        return stream, loader
    sampler = StepSampler(len(dataset), cfg.train.batch_size, d.world_size, d.rank, cfg.train.seed,
                          cfg.data.shuffle, start=start_micro)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
        pin_memory=d.device.type == "cuda", persistent_workers=cfg.data.num_workers > 0,
        prefetch_factor=2 if cfg.data.num_workers > 0 else None,
    )
    return sampler, loader


def _describe_shapes(inputs: dict, outputs: dict) -> list[str]:
    lines = []
    for k, v in inputs.items():
        if torch.is_tensor(v):
            lines.append(f"  input  {k:<12} {list(v.shape)} {str(v.dtype).replace('torch.', '')}")
    for k, v in outputs.items():
        if torch.is_tensor(v):
            lines.append(f"  output {k:<12} {list(v.shape)} {str(v.dtype).replace('torch.', '')}")
        elif isinstance(v, list) and v and torch.is_tensor(v[0]):
            lines.append(f"  output {k:<12} {len(v)} x {list(v[0].shape)}")
    return lines


def resolve_threads(cfg: TrainConfig, device: torch.device) -> tuple[Optional[int], str]:
    """(torch intra-op threads to set, or None to keep torch's; why) for `train.threads` on `device`."""
    n = cfg.train.threads
    if n is None:
        if device.type == "cpu" and cfg.model.preset == "tiny":
            return 1, "the default for the tiny preset on a CPU; --threads N to change"
        return None, "torch's default; --threads N to change"
    if n == 0:
        return None, "--threads 0: torch's default"
    return n, "train.threads / --threads"


def _interrupt_message(err: KeyboardInterrupt, output: Optional[Path], cfg: TrainConfig, step: Optional[int],
                       command: Optional[str]) -> str:
    """What a Ctrl-C (or SIGTERM) left behind and the exact command that continues the run."""
    from fwdata.runtime import Terminated

    what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"
    when = f"during step {step}" if step else "before the first training step"
    if output is None:
        return f"{what} {when}: dry run, nothing was written"
    if command is None:  # called from Python: the resolved config of the run says everything
        config = output / "config.toml"
        command = (f"fwmodel train --stage {cfg.train.stage} --config {shlex.quote(str(config))} "
                   f"--output {shlex.quote(str(output))}" if config.is_file() else
                   f"fwmodel train --stage {cfg.train.stage} --config CONFIG --output {shlex.quote(str(output))}")
    states = list_states(output)
    if states:
        last = states[-1]
        lost = f"; steps {last + 1}-{step} will be redone" if step and step > last + 1 else (
            f"; step {step} will be redone" if step == last + 1 else "")
        return (f"{what} {when}: the last saved state is {_state_root(output) / f'step-{last}'} (step {last}, weights "
                f"{output / f'step-{last}.safetensors'}){lost}. Continue the run with:\n  {command} --resume")
    first = cfg.train.checkpoint_every
    return (f"{what} {when}: no state was saved yet (the first is written at step {min(first, cfg.train.num_steps)}), "
            f"so there is nothing to resume; start again with:\n  {command}")


def train(cfg: TrainConfig, resume: bool = False, resume_step: Optional[int] = None, dry_run: bool = False,
          quiet: bool = False, echo: Callable[[str], None] = print,
          allow_missing_sidecar: bool = False, command: Optional[str] = None,
          echo_err: Optional[Callable[[str], None]] = None, progress_mode: Optional[Mode] = None,
          console=None) -> TrainResult:
    """Run (or resume) one training stage as configured. See the module docstring.

    `allow_missing_sidecar` loads --init-from (or the resumed weights) without its .json sidecar,
    i.e. without the size and sha256 checks; a warning is logged. By default that is refused.
    `command` is the command line that started the run without --resume (the CLI passes it): on
    Ctrl-C (KeyboardInterrupt, re-raised) the last saved state and `command --resume` are printed to
    stderr and written to train.log. Warnings go to `echo_err` (default stderr), also when `quiet`.
    The torch intra-op threads are set for the run (`train.threads`, see `resolve_threads`) and
    restored afterwards. `progress_mode` (fwmodel.progress: `bar`, `lines`, `off`; default `off` when
    `quiet`, else `lines`) shows the steps with elapsed time and ETA on rank 0 (`console`: the rich
    console of the bar); the last line ("finished Stage N: ... in H:MM:SS") is printed also when `quiet`.
    """
    if dry_run:
        cfg = cfg.model_copy(update={
            "train": cfg.train.model_copy(update={"num_steps": cfg.train.dry_run_steps, "batch_size": 1,
                                                  "grad_accum": 1, "log_every": 1,
                                                  "checkpoint_every": 10**9}),
            "data": cfg.data.model_copy(update={"max_samples": 1, "num_workers": 0}),
        })
    d = init_distributed(cfg.model.device, cfg.train.deterministic)
    threads_before = torch.get_num_threads()
    threads, threads_why = resolve_threads(cfg, d.device)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": torch.get_num_threads()})})
        mode = progress_mode or ("off" if quiet else "lines")
        meter = StepProgress(f"stage {cfg.train.stage}", cfg.train.num_steps, "step",
                             mode if d.is_main else "off", echo=echo, console=console)
        return _train_run(cfg, d, resume, resume_step, dry_run, quiet, echo, echo_err, allow_missing_sidecar,
                          command, threads_why, meter)
    finally:
        torch.set_num_threads(threads_before)


def _train_run(cfg: TrainConfig, d: Dist, resume: bool, resume_step: Optional[int], dry_run: bool, quiet: bool,
               echo: Callable[[str], None], echo_err: Optional[Callable[[str], None]], allow_missing_sidecar: bool,
               command: Optional[str], threads_why: str, meter: StepProgress) -> TrainResult:
    output = None if dry_run else cfg.output_dir()
    if output is not None:
        from fwdata.dataset.store import check_writable_folder

        try:  # the check of every output folder (fwdata build --out too): an existing file is one line
            check_writable_folder(output, create=False)
        except OSError as err:
            raise ConfigError(f"--output (train.output): {err}") from None
    if output is not None and not resume and list_states(output):
        raise ResumeError(f"{output} already holds a run (state/step-{list_states(output)[-1]}): pass --resume to "
                          "continue it, or choose another --output")
    if resume and output is not None and not list_states(output):
        raise ResumeError(f"nothing to resume in {output}: no state/step-N folder (a run writes one every "
                          "train.checkpoint_every steps); start without --resume")
    saved = open_state(output, resume_step, allow_missing_sidecar) if resume and output is not None else None
    log = RunLogger(d, quiet, echo, echo_err)
    progress: dict = {"step": None, "threads": threads_why}
    try:
        return _train(cfg, d, log, output, saved, dry_run, allow_missing_sidecar, progress, meter)
    except KeyboardInterrupt as err:  # Ctrl-C (or SIGTERM through fwdata.runtime.sigterm_as_interrupt)
        log.warn(_interrupt_message(err, output, cfg, progress["step"], command))
        raise
    except Exception as err:
        if log.file:  # the reason a run stopped belongs in its log
            log.info(f"error: {type(err).__name__}: {err}", console=False)
        raise
    finally:
        meter.close()
        log.close()


def random_init_findings(cfg: TrainConfig, random_init: dict[str, list[str]], num_samples: int, cache=None,
                         encoders: bool = True) -> list[str]:
    """What of this run was made by randomly initialised models: the samples' labels (`random_init`: sample
    id -> models, see fwmodel.data.Selection), the latent cache, or (`encoders`, without a cache) the
    online VAE / UMT5. Empty when everything is real."""
    from fwmodel.cache import is_random_encoder

    found = []
    if random_init:
        models = sorted({m for ms in random_init.values() for m in ms})
        found.append(f"{len(random_init)} of the {num_samples} training samples have labels made by a randomly "
                     f"initialised model ({', '.join(models)}; e.g. sample {next(iter(random_init))}): their depth "
                     "and points are not real")
    if cache is not None and cache.random_init:
        found.append(f"the latent cache {cache.dir} was made with randomly initialised encoders (VAE/UMT5): its "
                     "latents and text embeddings are not real")
    elif cache is None and encoders and (is_random_encoder(cfg.model.vae) or is_random_encoder(cfg.model.text_encoder)):
        found.append("model.vae / model.text_encoder are randomly initialised: the latents and text embeddings are "
                     "not real")
    return found


def refuse_random_init(found: list[str]) -> DataError:
    return DataError(
        "; ".join(found) + ". Training on them teaches nothing: build the dataset with a real depth model "
        "(`fwdata build --depth-model ...`) and cache it with the Wan weights (`fwmodel cache DATASET --vae WAN "
        "--text-encoder WAN`), or, for tests and demos only, allow it: `fwmodel train ... --allow-random-init` "
        "(sets data.allow_random_init_labels = true)"
    )


def _train(cfg: TrainConfig, d: Dist, log: RunLogger, output: Optional[Path], saved: Optional[SavedState],
           dry_run: bool, allow_missing_sidecar: bool, progress: Optional[dict] = None,
           meter: Optional[StepProgress] = None) -> TrainResult:
    progress = {} if progress is None else progress
    meter = meter or StepProgress(f"stage {cfg.train.stage}", cfg.train.num_steps, mode="off")
    stage = cfg.train.stage
    tcfg = cfg.train
    model_config = get_preset(cfg.model.preset)
    if model_config.wan.in_channels != 16 or model_config.wan.image_dim is not None:
        raise ConfigError(
            f"preset {model_config.name} is an image-to-video model: it needs the I2V condition (first-frame "
            "latent + mask) and CLIP image tokens, which the trainer does not build yet; train a text-to-video "
            "preset (wan2.1-t2v-1.3b)"
        )
    resuming = saved is not None
    if not resuming and stage == 2 and cfg.model.init_from is None:
        raise ConfigError(
            "Stage 2 starts from the Stage-1 checkpoint: pass --init-from "
            "outputs/fantasy_world_stage1/step-20000.safetensors (or set STAGE1_CHECKPOINT / model.init_from)"
        )
    if not resuming and cfg.model.init_from is not None:
        # a wrong path, a damaged header, a missing/edited sidecar or a file of another stage fails now
        check_init_from(cfg.model.init_from, allow_missing_sidecar)
    log.info(f"fwmodel {__version__} - Stage {stage} ({'latent bridging' if stage == 1 else 'unified co-optimisation'})"
             f" - preset {model_config.name} - {d.world_size} process(es) on {d.device}"
             + (" - DRY RUN" if dry_run else ""))
    log.info(f"threads: {cfg.train.threads} torch intra-op thread(s) on the CPU "
             f"({progress.get('threads', 'train.threads')})")
    # ---- data (before weights: a bad dataset fails in seconds) ----
    dataset = prepare_data(cfg, model_config)
    if not isinstance(dataset, TrainingDataset):  # shards: too few for the ranks fails now, not after the weights
        dataset.layout(tcfg.batch_size, d.world_size, d.rank, tcfg.seed)
    if resuming and not isinstance(dataset, TrainingDataset) and saved.trainer.get("world_size") != d.world_size:
        raise ResumeError(f"the run being resumed used {saved.trainer.get('world_size')} process(es), now "
                          f"{d.world_size}: on shards each rank reads its own shards, so resume with the same number")
    source = "folder" if isinstance(dataset, TrainingDataset) else "shards"
    if resuming and saved.trainer.get("data_source", "folder") != source and (cfg.data.shuffle or d.world_size > 1):
        raise ResumeError(f"the run being resumed read the {saved.trainer.get('data_source', 'folder')} and this one "
                          f"the {source}: with data.shuffle or several processes their sample orders differ, so "
                          "resume it on the same --data")
    for sid, why in list(dataset.skipped.items())[:10]:
        log.info(f"skipped sample {sid}: {why}", console=False)
    log.info(f"data: {plural(len(dataset), 'sample')} from {cfg.data.root}"
             f"{'' if isinstance(dataset, TrainingDataset) else ' (WebDataset shards)'} (split {cfg.data.split}"
             f"{', gated-out included' if cfg.data.include_gated_out else ''}, {len(dataset.skipped)} skipped), "
             f"{cfg.data.num_frames} frames at {cfg.data.height}x{cfg.data.width}, stride {cfg.data.frame_stride}; "
             + (f"latent cache {dataset.cache.dir}" + (" (RANDOM tiny encoders)" if dataset.cache.random_init else "")
                if dataset.uses_cache else "encoding on the fly (no cache)"))
    found = random_init_findings(cfg, dataset.random_init, len(dataset), dataset.cache)
    if found:  # (refused in prepare_data unless data.allow_random_init_labels)
        log.warn("WARNING: " + "; ".join(found) + ". This run is for tests and demos only: its weights learn "
                 "nothing real (data.allow_random_init_labels = true).")
    global_batch = tcfg.batch_size * d.world_size * tcfg.grad_accum
    log.info(f"batch: {tcfg.batch_size} per GPU x {plural(d.world_size, 'GPU')} x {tcfg.grad_accum} accumulation = "
             f"{plural(global_batch, 'sample')} per step; {plural(tcfg.num_steps, 'step')}")

    # ---- preflight ----
    act_bytes = 2 if cfg.model.mixed_precision == "bf16" else 4
    est = estimate_memory(model_config, stage, tcfg.batch_size, cfg.data.num_frames, cfg.data.height, cfg.data.width,
                          cfg.model.gradient_checkpointing, 2 if cfg.model.backbone_dtype == "bfloat16" else 4,
                          act_bytes, d.world_size, online_encoders=not dataset.uses_cache)
    est.capacity, est.device = device_capacity(d.device)
    if cfg.memory.limit_gb:
        est.capacity, est.device = cfg.memory.limit_gb * GIB, f"{est.device} (memory.limit_gb)"
    log.info("preflight: estimated memory per device\n" + "\n".join(est.lines()))
    if cfg.memory.check:
        check_fits(est, stage)

    # ---- output folder: only now is anything written ----
    if output is not None:
        log.open(output, resume_step=saved.step if resuming else None)
        if d.is_main:
            (output / "config.toml").write_text(config_toml(cfg))
        log.info(f"output: {output} (config.toml, train.log, metrics.jsonl, tb/, step-N.safetensors, state/)")

    # ---- model, optimizer ----
    model = build_model(cfg, d.device, log)
    if not resuming and cfg.model.init_from is not None:
        load_stage1(model, cfg.model.init_from, stage, log, allow_missing_sidecar)
    names, optimizer, scheduler = build_optimizer(model, cfg, d.device)
    groups = module_groups(model, stage)
    n_train = sum(p.numel() for ps in groups.values() for p in ps)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info(f"parameters: {n_train:,} trainable ({', '.join(groups)}), {n_frozen:,} frozen (no grads, "
             "no optimizer state, outside DDP)")

    state = TrainState()
    if resuming:
        state = load_state(output, saved, model, optimizer, scheduler, names, cfg, dataset.fingerprint, d, log,
                           allow_missing_sidecar)

    ddp_model = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ddp_model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                        find_unused_parameters=model_config.geometry.camera_token_projector,
                        broadcast_buffers=False)

    encoders = None
    if not dataset.uses_cache:
        from fwmodel.cache import TextEncoder, VideoEncoder

        enc_dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
        encoders = (VideoEncoder(cfg.model.vae, d.device, enc_dtype),
                    TextEncoder(cfg.model.text_encoder, d.device, enc_dtype, text_dim=model_config.wan.text_dim))

    sampler, loader = make_loader(dataset, cfg, d, start_micro=state.step * tcfg.grad_accum)
    data_iter = iter(loader)
    autocast = (torch.autocast(d.device.type, dtype=torch.bfloat16) if cfg.model.mixed_precision == "bf16"
                else nullcontext())
    backbone_dtype = next(model.backbone.parameters()).dtype
    H, W = cfg.data.height, cfg.data.width

    result = TrainResult(output=output, step=state.step, skipped=state.skipped)
    window = {"time": 0.0, "wait": 0.0, "steps": 0}
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    fault_step = int(os.environ.get("FWMODEL_FAULT_KILL_AT_STEP", "0"))  # tests: simulate a crash (SIGKILL)

    meter.start(done=state.step)  # elapsed time and ETA on the console (fwmodel.progress)
    while state.step < tcfg.num_steps:
        step = state.step + 1
        progress["step"] = step
        if fault_step and step == fault_step:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        wait = 0.0
        terms_sum: dict[str, torch.Tensor] = {}
        local_bad = False
        for micro in range(tcfg.grad_accum):
            tw = time.perf_counter()
            batch = next(data_iter)
            wait += time.perf_counter() - tw
            batch = move_batch(batch, d.device)
            k = (step - 1) * tcfg.grad_accum + micro  # global micro-batch index
            if encoders is not None:
                with torch.no_grad():
                    batch["latents"] = encoders[0](batch.pop("video"))
                    batch["text"] = encoders[1](batch["text"])
            B = batch["latents"].shape[0]
            seeds = [mix_seed(tcfg.seed, k, d.rank * tcfg.batch_size + b, 7) for b in range(B)]
            noised = add_noise(batch["latents"], cfg.diffusion, seeds)
            plucker = plucker_for_batch(batch["w2c"], batch["K"], H, W) if stage == 2 else None
            sync = d.enabled and micro < tcfg.grad_accum - 1
            with (ddp_model.no_sync() if sync else nullcontext()), autocast:
                outputs = ddp_model(noised.noisy.to(backbone_dtype), noised.timestep,
                                    batch["text"].to(backbone_dtype), plucker=plucker, video=stage == 2)
                losses = compute_losses(outputs, batch, stage, cfg.loss, noised)
            (losses.total / tcfg.grad_accum).backward()
            local_bad |= not bool(torch.isfinite(losses.total.detach()))
            for key, value in losses.terms.items():
                terms_sum[key] = terms_sum.get(key, 0) + value.float() / tcfg.grad_accum
            if step == 1 and micro == 0:
                log.info("shapes (first micro-batch):\n" + "\n".join(_describe_shapes(
                    {"latents": noised.noisy, "timestep": noised.timestep, "text": batch["text"],
                     "plucker": plucker, "depth": batch["depth"], "points": batch["points"],
                     "pose_enc": batch["pose_enc"]}, outputs)), console=dry_run)
            del outputs, losses

        total_norm, module_norms = grad_norms(groups)
        bad = d.any(local_bad or not bool(torch.isfinite(total_norm)))
        if bad:
            optimizer.zero_grad(set_to_none=True)
            state.skipped += 1
            state.consecutive_skipped += 1
            log.info(f"step {step}: non-finite loss or gradient, step skipped ({state.skipped} so far, "
                     f"limit {tcfg.max_nonfinite_steps})")
            if state.skipped > tcfg.max_nonfinite_steps:
                raise TrainingAborted(
                    f"aborted at step {step}: {state.skipped} steps had a non-finite loss or gradient (limit "
                    f"train.max_nonfinite_steps = {tcfg.max_nonfinite_steps}). Check the data (`fwdata validate`), "
                    "lower optim.lr, keep optim.grad_clip on, or train in fp32 (model.mixed_precision = \"no\")."
                )
        else:
            state.consecutive_skipped = 0
            if cfg.optim.grad_clip > 0:
                coef = (cfg.optim.grad_clip / (total_norm + 1e-6)).clamp(max=1.0)
                for ps in groups.values():
                    for p in ps:
                        if p.grad is not None:
                            p.grad.mul_(coef.to(p.grad.device))
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # a skipped step still advances the schedule (torch warns about the order)
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = step
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        dt = time.perf_counter() - t0
        window["time"] += dt
        window["wait"] += wait
        window["steps"] += 1

        if step % tcfg.log_every == 0 or step == tcfg.num_steps or step == 1:
            keys = sorted(terms_sum)
            values = d.all_reduce_mean(torch.stack([terms_sum[k] for k in keys]))
            metrics = {k: float(v) for k, v in zip(keys, values.tolist())}
            metrics["lr"] = lr
            metrics["grad_norm/total"] = float(total_norm)
            metrics.update({f"grad_norm/{k}": float(v) for k, v in module_norms.items()})
            step_time = window["time"] / window["steps"]
            metrics["perf/step_time_s"] = step_time
            metrics["perf/samples_per_s"] = global_batch / step_time
            metrics["perf/data_wait_frac"] = window["wait"] / max(window["time"], 1e-9)
            metrics["mem/peak_gib"] = _peak_memory(d.device)
            metrics["train/skipped_steps"] = state.skipped
            metrics["train/epoch"] = sampler.epoch_of(step * tcfg.grad_accum)
            log.scalars(step, metrics)
            result.history.append({"step": step, **metrics})
            result.last_metrics = metrics
            diff = f" diff {metrics['loss/diffusion']:.4f}" if "loss/diffusion" in metrics else ""
            log.info(f"step {step}/{tcfg.num_steps} | total {metrics['loss/total']:.4f}{diff} | depth reg "
                     f"{metrics['loss/depth/reg']:.4f} | point reg {metrics['loss/point/reg']:.4f} | camera "
                     f"{metrics['loss/camera_loss']:.4f} | lr {lr:.2e} | {step_time:.2f} s/step | data "
                     f"{100 * metrics['perf/data_wait_frac']:.0f}% | mem {metrics['mem/peak_gib']:.2f} GiB")
            window = {"time": 0.0, "wait": 0.0, "steps": 0}

        if output is not None and (step % tcfg.checkpoint_every == 0 or step == tcfg.num_steps):
            result.checkpoints.append(save_state(output, model, optimizer, scheduler, names, state, cfg,
                                                 dataset.fingerprint, d, log))
        meter.update(step)

    result.step, result.skipped = state.step, state.skipped
    meter.close()
    if dry_run:
        log.info(f"dry run finished: {state.step} steps on 1 sample, last step "
                 f"{result.last_metrics.get('perf/step_time_s', 0):.2f} s, peak memory "
                 f"{result.last_metrics.get('mem/peak_gib', 0):.2f} GiB; nothing was written")
    else:  # the one line --quiet prints
        log.summary(f"finished Stage {stage}: {meter.summary()}, {state.skipped} skipped; "
                    f"final weights {output / f'step-{state.step}.safetensors'}")
    return result
