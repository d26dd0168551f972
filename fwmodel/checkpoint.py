"""Our trainable weights as safetensors, with a JSON sidecar.

    step-1000.safetensors   the parameters trained in the stage (backbone never included)
    step-1000.json          sidecar: preset, config fingerprint, stage, step, tensor names, file size
                            and sha256 (the same facts, less the hash, are also in the file's header)

`load_trainable(model, path, stage)` checks everything before touching the model, then loads the
exact key set of `stage`:

* stage=1: the file must hold exactly the Stage-1 keys (geometry.*). The Stage-2 keys of the model,
  if any, are the expected "missing" set: this is the Stage 1 -> Stage 2 hand-off.
* stage=2: the file must hold exactly the Stage-1 + Stage-2 keys (resume Stage 2, or inference).

A damaged file (truncated, bad header, hash mismatch), a sidecar whose preset/stage/fingerprint
differ from the file's header, a tensor of another dtype than the parameter it goes into, a NaN or
Inf tensor, a file from another preset/configuration, or the wrong stage raises `CheckpointError`
with one message naming the file (and tensor) and what to do, and the model is left unchanged.

The sidecar is required: it holds the sha256 that detects a damaged copy. Loading a file without
one is an explicit choice (`allow_missing_sidecar=True`, `fwmodel train --allow-missing-sidecar`)
and logs a warning.

Dtypes: a tensor must have the dtype of its parameter, except that float32 (what training saves:
fp32 master weights) also loads into a model built in bfloat16/float16 for inference (a deliberate
downcast by whoever built the model). Integer, bool, or lower-precision float tensors loaded into
float32 parameters are refused: they were not written by this trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fwmodel.stages import TRAINED_PARTS, check_stage, trainable_parameter_names

FORMAT = "fwmodel-trainable"
FORMAT_VERSION = 1
# Header facts that save_trainable also copies into the sidecar: the two must agree.
SIDECAR_MIRRORED = ("format", "preset", "fingerprint", "stage", "step")
# File dtype -> model dtypes it may be loaded into, besides its own (see the module docstring).
DOWNCASTS = {torch.float32: (torch.bfloat16, torch.float16)}

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded into this model. The message says why and what to do."""


@dataclass
class CheckpointInfo:
    path: Path
    preset: str
    fingerprint: str
    stage: int
    step: Optional[int]
    missing: list[str]  # model keys left at their current values (the later stage's modules)


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def save_trainable(
    model: nn.Module, path: str | Path, stage: int, step: Optional[int] = None, extra: Optional[dict] = None
) -> Path:
    """Write the parameters trained in `stage` to `path` (.safetensors) and its JSON sidecar.

    Both files are written under temporary names and renamed into place, so a killed job never
    leaves a half checkpoint under the final name. `extra` (JSON-serialisable) goes into the sidecar.
    """
    check_stage(stage)
    names = trainable_parameter_names(model, stage)
    params = dict(model.named_parameters())
    tensors = {name: params[name].detach().contiguous().cpu() for name in names}
    return write_checkpoint(tensors, path, model.config, stage, step, extra)


def write_checkpoint(tensors: dict[str, torch.Tensor], path: str | Path, config, stage: int,
                     step: Optional[int] = None, extra: Optional[dict] = None) -> Path:
    """Write `tensors` (the Stage-`stage` key set of a model of `config`, a ModelConfig) as our checkpoint
    `path` + sidecar, atomically. `save_trainable` uses it; so does `fwmodel convert-release`, which
    has the tensors but no model."""
    check_stage(stage)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in tensors.items()}

    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preset": config.name,
        "fingerprint": config.fingerprint(),
        "stage": stage,
        "step": step,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"fwmodel": json.dumps(header)})
    sidecar = {
        **header,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_tensors": len(tensors),
        "num_params": sum(t.numel() for t in tensors.values()),
        "file_bytes": tmp.stat().st_size,
        "sha256": file_sha256(tmp),
        "config": config.model_dump(mode="json"),
        "extra": extra or {},
    }
    tmp_sidecar = sidecar_path(tmp)
    tmp_sidecar.write_text(json.dumps(sidecar, indent=2))
    os.replace(tmp, path)
    os.replace(tmp_sidecar, sidecar_path(path))
    return path


def read_checkpoint_header(path: str | Path) -> dict:
    """The header facts (format, preset, fingerprint, stage, step). Raises CheckpointError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; check the path (e.g. outputs/<run>/step-N.safetensors).")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a safetensors file ({err}); copy it again or use an earlier step."
        ) from err
    if "fwmodel" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not an fwmodel checkpoint (no fwmodel header).")
    try:
        header = json.loads(metadata["fwmodel"])
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: its fwmodel header is not a JSON object; "
                              "copy it again or use an earlier step.")
    return header


def read_sidecar(path: str | Path) -> Optional[dict]:
    """The sidecar of checkpoint `path` as a dict, or None when there is none; CheckpointError when unreadable."""
    path = Path(path)
    sidecar_file = sidecar_path(path)
    if not sidecar_file.is_file():
        return None
    try:
        sidecar = json.loads(sidecar_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"the sidecar {sidecar_file} of checkpoint {path} is unreadable ({err}); copy both files again."
        ) from err
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"the sidecar {sidecar_file} of checkpoint {path} is not a JSON object; "
                              "copy both files again.")
    return sidecar


def verify_checkpoint_file(path: str | Path, verify_hash: bool = True, allow_missing_sidecar: bool = False) -> dict:
    """Check `path` against its sidecar without a model; returns the header. Raises CheckpointError.

    Checks: the safetensors header is readable; the sidecar exists (unless `allow_missing_sidecar`,
    which logs a warning); the file size and (with `verify_hash`) sha256 equal the sidecar's; the
    sidecar's preset, stage, fingerprint, step and format equal the header inside the file.
    """
    path = Path(path)
    header = read_checkpoint_header(path)
    sidecar = read_sidecar(path)
    if sidecar is None:
        _missing_sidecar(path, allow_missing_sidecar)
        return header
    size = path.stat().st_size
    if sidecar.get("file_bytes") != size:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {size} bytes, its sidecar says {sidecar.get('file_bytes')} "
            "(truncated copy?); copy it again or use an earlier step."
        )
    if verify_hash and sidecar.get("sha256") != file_sha256(path):
        raise CheckpointError(
            f"checkpoint {path} is damaged: its sha256 does not match the sidecar; "
            "copy it again or use an earlier step."
        )
    edited = [f"{k}: sidecar {sidecar.get(k)!r}, file {header.get(k)!r}" for k in SIDECAR_MIRRORED
              if sidecar.get(k) != header.get(k)]
    if edited:
        raise CheckpointError(
            f"the sidecar {sidecar_path(path)} does not match the header of checkpoint {path} ({'; '.join(edited)}): "
            "one of the two was edited or comes from another checkpoint; copy both files again."
        )
    return header


def _missing_sidecar(path: Path, allowed: bool) -> None:
    """Refuse a checkpoint without a sidecar, or warn when the caller chose to load it anyway."""
    if not allowed:
        raise CheckpointError(
            f"checkpoint {path} has no sidecar {sidecar_path(path).name} (it holds the size and sha256 that detect "
            "a damaged copy): copy it along with the weights, or load without the checks with "
            "allow_missing_sidecar=True (fwmodel train --allow-missing-sidecar)."
        )
    log.warning("checkpoint %s has no sidecar %s: loading without the size and sha256 checks",
                path, sidecar_path(path).name)


def load_trainable(model: nn.Module, path: str | Path, stage: int, verify_hash: bool = True,
                   allow_missing_sidecar: bool = False) -> CheckpointInfo:
    """Load the weights trained up to `stage` from `path` into `model` (see the module docstring).

    Nothing is copied into the model unless every check passes. `allow_missing_sidecar=True` loads
    a file without its sidecar (no size, hash or sidecar checks; a warning is logged).
    """
    check_stage(stage)
    path = Path(path)
    header = verify_checkpoint_file(path, verify_hash, allow_missing_sidecar)
    config = model.config

    if header.get("fingerprint") != config.fingerprint():
        raise CheckpointError(
            f"checkpoint {path} was written for model preset {header.get('preset')!r} "
            f"(configuration {header.get('fingerprint')}), but this model is preset {config.name!r} "
            f"(configuration {config.fingerprint()}); build the model with --preset {header.get('preset')} "
            "or pick a checkpoint of this preset."
        )

    file_stage = header.get("stage")
    expected = trainable_parameter_names(model, stage)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = [k for k in expected if k not in keys]
            unexpected = sorted(keys - set(expected))
            if missing or unexpected:
                raise CheckpointError(_key_mismatch_message(path, file_stage, stage, missing, unexpected))
            tensors = {k: f.get_tensor(k) for k in expected}
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} is damaged ({err}); copy it again or use an earlier step."
        ) from err

    params = dict(model.named_parameters())
    bad_shapes = [
        f"{k}: file {tuple(t.shape)} vs model {tuple(params[k].shape)}"
        for k, t in tensors.items()
        if t.shape != params[k].shape
    ]
    if bad_shapes:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model configuration ({'; '.join(bad_shapes[:3])}); "
            "build the model with the preset the checkpoint was trained with."
        )
    _check_dtypes(path, tensors, params)
    check_finite(path, tensors)

    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t)
    later_stage = [n for n, _ in model.named_parameters() if n.split(".")[0] not in TRAINED_PARTS[stage]]
    left_at_init = [n for n in later_stage if not n.startswith("backbone.")]
    return CheckpointInfo(path, header["preset"], header["fingerprint"], file_stage, header.get("step"), left_at_init)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_dtypes(path: Path, tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    """Refuse a tensor whose dtype is neither its parameter's nor an allowed downcast (DOWNCASTS)."""
    for name, tensor in tensors.items():
        want = params[name].dtype
        if tensor.dtype == want or want in DOWNCASTS.get(tensor.dtype, ()):
            continue
        hint = (f"build the model in {_dtype_name(tensor.dtype)} to load it"
                if tensor.dtype.is_floating_point and want.is_floating_point
                else "this file was not written by fwmodel; use a checkpoint from `fwmodel train`")
        raise CheckpointError(
            f"checkpoint {path}: tensor {name} is {_dtype_name(tensor.dtype)} but the model parameter is "
            f"{_dtype_name(want)}; {hint}."
        )


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a tensor holding NaN or Inf (a diverged run or a damaged file)."""
    for name, tensor in tensors.items():
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"checkpoint {path}: tensor {name} holds NaN or Inf values (a diverged run or a damaged file); "
                "use an earlier step."
            )


def _key_mismatch_message(path: Path, file_stage, stage: int, missing: list[str], unexpected: list[str]) -> str:
    if file_stage == 1 and stage == 2:
        return (
            f"{path} is a Stage-1 checkpoint: it has no Stage-2 weights ({len(missing)} missing, e.g. "
            f"{missing[0]}). To start Stage 2 from it, load it as the Stage-1 checkpoint (stage=1, "
            "STAGE1_CHECKPOINT); to resume or run Stage 2, pick a Stage-2 checkpoint."
        )
    if file_stage == 2 and stage == 1:
        return (
            f"{path} is a Stage-2 checkpoint ({len(unexpected)} Stage-2 tensors, e.g. {unexpected[0]}); "
            "load it with stage=2."
        )
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return (
        f"checkpoint {path} (stage {file_stage}) does not have the Stage-{stage} key set of this model: "
        f"{', '.join(parts)}; it was written by a different model version or configuration."
    )
