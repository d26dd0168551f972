"""The resumable state of a training run, in OUTPUT/state/step-N/ beside the weights step-N.safetensors:

    optimizer.safetensors   AdamW moments per trainable parameter ("<param name>::<field>"), full (FSDP2
                            runs gather their shards), so a run resumes on any number of ranks
    trainer.json            step, counters, scheduler, config hash, data fingerprint, world size
    rng-rank<R>.safetensors torch (+ CUDA) and numpy RNG of rank R; rng-rank<R>.json the rest
    manifest.json           size and sha256 of every other file, written last

`save_state` writes it under a temporary name and renames it; `open_state` verifies every file
before anything is loaded (`--resume` refuses a damaged state, naming the file); `load_state`
restores weights, optimizer, scheduler, RNG and counters.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fwdata import __version__
from fwmodel.checkpoint import file_sha256, load_trainable, save_trainable, verify_checkpoint_file
from fwmodel.train.distributed import Dist
from fwmodel.train.parallel import full_trainable_state, is_fsdp, load_full_optimizer
from fwmodel.train.config import TrainConfig, config_hash, hashed_config
from fwmodel.train.log import RunLogger
from fwmodel.train.model import warn_missing_sidecar

STATE_FORMAT = "fwmodel-train-state"
MANIFEST = "manifest.json"  # written last into each state/step-N/: size and sha256 of every other file
MANIFEST_FORMAT = "fwmodel-train-state-manifest"


class ResumeError(ValueError):
    """`--resume` cannot continue this run; the message says why."""


def state_root(output: Path) -> Path:
    """OUTPUT/state: the state/step-N folders of a run."""
    return output / "state"


def list_states(output: Path) -> list[int]:
    """Steps of the state/step-N folders, damaged ones included (resume verifies the one it uses)."""
    root = state_root(output)
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


def _full_optimizer_tensors(optim: dict) -> tuple[dict, list]:
    """The `_optimizer_tensors` format from a full optimizer state dict keyed by parameter name
    (torch.distributed.checkpoint.state_dict.get_optimizer_state_dict with full_state_dict=True)."""
    tensors = {f"{name}::{key}": value.detach().cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
               for name, state in optim["state"].items() for key, value in state.items()}
    return tensors, [dict(g) for g in optim["param_groups"]]


def _full_optimizer_dict(tensors: dict, groups: list, names: list[str]) -> dict:
    """The inverse of `_full_optimizer_tensors`: {"state": {name: {field: tensor}}, "param_groups": [...]}."""
    if {n for g in groups for n in g["params"]} != set(names):
        raise ResumeError("the saved optimizer state is for a different set of trainable parameters")
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        name, field_ = key.split("::")
        state.setdefault(name, {})[field_] = value
    param_groups = [{**g, "betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else dict(g) for g in groups]
    return {"state": state, "param_groups": param_groups}


class _Consolidated:
    """What `save_trainable` reads of a model (`config`, `named_parameters`), for full tensors gathered
    from FSDP2 shards (`fwmodel.train.parallel.full_trainable_state`)."""

    def __init__(self, config, tensors: dict[str, torch.Tensor]):
        self.config, self._tensors = config, tensors

    def named_parameters(self):
        return iter(self._tensors.items())


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
    others = [s for s in list_states(output) if state_root(output) / f"step-{s}" != directory]
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
    directory = state_root(output) / f"step-{step}"
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
               data_fp: str, data_source: str, d: Dist, log: RunLogger) -> Path:
    """step-N.safetensors (+ sidecar) and state/step-N/; written under temporary names, then renamed.

    `data_source` ("folder" or "shards", `fwmodel.train.loop._data_source`) is recorded in trainer.json.
    """
    step = state.step
    weights = output / f"step-{step}.safetensors"
    final = state_root(output) / f"step-{step}"
    tmp = state_root(output) / f".step-{step}.tmp"
    full = None
    if is_fsdp(model):  # FSDP2: gather the full trainable weights and optimizer state on rank 0 (a collective)
        full = full_trainable_state(model, optimizer, names)
    if d.is_main:
        extra = {"config_hash": config_hash(cfg), "data_fingerprint": data_fp, "tool_version": __version__,
                 "train": cfg.model_dump(mode="json")}
        save_trainable(model if full is None else _Consolidated(model.config, full[0]), weights, cfg.train.stage,
                       step, extra=extra)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors, groups = _optimizer_tensors(optimizer, names) if full is None else _full_optimizer_tensors(full[1])
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
            "data_source": data_source,
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
            shutil.rmtree(state_root(output) / f"step-{old}", ignore_errors=True)
        log.info(f"checkpoint: {weights} and {final}")
    d.barrier()
    return weights


def _check_resumable(saved: SavedState, cfg: TrainConfig, data_fp: str, d: Dist) -> None:
    """ResumeError when this run cannot continue `saved` (stage, config hash, data, samples per micro-step)."""
    directory, trainer = saved.directory, saved.trainer
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


def load_weights(output: Path, saved: SavedState, model, cfg: TrainConfig, data_fp: str, d: Dist, log: RunLogger,
                 allow_missing_sidecar: bool = False):
    """Check that `saved` can be resumed, then load its step-N.safetensors into the (unsharded) model."""
    _check_resumable(saved, cfg, data_fp, d)
    warn_missing_sidecar(output / saved.trainer["weights"], log)
    return load_trainable(model, output / saved.trainer["weights"], cfg.train.stage,
                          allow_missing_sidecar=allow_missing_sidecar)


def load_state(output: Path, saved: SavedState, model, optimizer, scheduler, names, cfg: TrainConfig,
               data_fp: str, d: Dist, log: RunLogger, allow_missing_sidecar: bool = False,
               weights: bool = True) -> TrainState:
    """Load a state verified by `open_state`: weights (unless `weights` is False: FSDP2 loads them with
    `load_weights` before sharding), optimizer, scheduler, RNG, counters. The optimizer state is the
    full one (whatever the saved run's number of ranks): an FSDP2 model keeps its shard of it."""
    directory, step, trainer = saved.directory, saved.step, saved.trainer
    _check_resumable(saved, cfg, data_fp, d)
    name = trainer["weights"]
    if weights:
        name = load_weights(output, saved, model, cfg, data_fp, d, log, allow_missing_sidecar).path.name
    with safe_open(str(directory / "optimizer.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if is_fsdp(model):
        load_full_optimizer(model, optimizer, _full_optimizer_dict(tensors, trainer["param_groups"], names))
    else:
        _load_optimizer(optimizer, names, {k: v.to(d.device) for k, v in tensors.items()}, trainer["param_groups"])
    scheduler.load_state_dict(trainer["scheduler"])
    rng_file = directory / f"rng-rank{d.rank}.safetensors"
    if trainer["world_size"] == d.world_size and rng_file.is_file():
        with safe_open(str(rng_file), framework="pt") as f:
            rng = {k: f.get_tensor(k) for k in f.keys()}
        _set_rng_state(rng, json.loads((directory / f"rng-rank{d.rank}.json").read_text()), d.device)
    else:
        log.info("note: different number of processes than the saved run; RNG states re-seeded")
    log.info(f"resumed from {directory} (step {step}, weights {name}, "
             f"{trainer['skipped']} skipped steps so far)")
    return TrainState(step=step, skipped=trainer["skipped"], consecutive_skipped=trainer["consecutive_skipped"])
