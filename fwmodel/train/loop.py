"""The two-stage FantasyWorld trainer: one readable loop for one GPU, many GPUs and many nodes.

    fwmodel train --stage 1 --config stage1 --data DATASET
    fwmodel train --stage 2 --config stage2 --data DATASET \\
        --init-from outputs/fantasy_world_stage1/step-20000.safetensors
    torchrun --nproc_per_node 8 -m fwmodel.cli train ...          (data parallel, see pipelines/train/)

What one run does, in order (the module of each part in brackets; this one is the loop):

    1. config       TrainConfig from TOML + CLI overrides (pydantic: every mistake named) [config]
    2. distributed  torchrun / accelerate environment -> process group (NCCL on GPUs, gloo on CPU)
                    [distributed]
    3. data         dataset selection, latent cache lookup, resumable sampler (fails before any weight)
    4. preflight    estimated memory per GPU; refuses a configuration that cannot fit [memory]
    5. model        frozen Wan backbone (weights, bf16) + geometry/interaction (fp32 master weights);
                    Stage 2 loads the Stage-1 file and says what it loaded [model]
    6. optimizer    AdamW over the stage's trainable parameters only; warmup + constant/cosine LR
                    [step.build_optimizer]
    7. resume       weights, optimizer, scheduler, RNG, data position from OUTPUT/state/step-N [state]
    8. loop         one `train_step` per step (grad accumulation, bf16 autocast, grad clipping, grad
                    norms per module; DDP, or FSDP2 with train.parallel = "fsdp2" [parallel], over the
                    trainable part only: the frozen backbone is outside it, no gradient sync, no
                    broadcast, no optimizer state), non-finite steps skipped
                    and counted, logs [log], checkpoints [state]

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

import os
import random
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from fwdata import __version__
from fwdata.textout import plural
from fwmodel.config import ModelConfig, get_preset
from fwmodel.data import DataError, StepSampler, TrainingDataset, move_batch
from fwmodel.train.distributed import Dist, init_distributed
from fwmodel.i2v import is_i2v
from fwmodel.memory import GIB, check_fits, config_estimate, device_capacity
from fwmodel.progress import Mode, StepProgress
from fwmodel.train.config import ConfigError, TrainConfig, config_toml
from fwmodel.train.log import RunLogger, peak_memory_gib
from fwmodel.train.model import build_model, check_init_from, load_stage1
from fwmodel.train.parallel import local_frozen_numel, wrap_model
from fwmodel.train.state import (ResumeError, SavedState, TrainState, list_states, load_state, load_weights,
                                 open_state, save_state, state_root)
from fwmodel.train.speed import apply_speed, check_speed
from fwmodel.train.step import build_optimizer, module_groups, train_step


class TrainingAborted(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); the message says what to check."""


# =========================================================================== the run


@dataclass
class TrainResult:
    output: Optional[Path]
    step: int
    checkpoints: list[Path] = field(default_factory=list)
    last_metrics: dict = field(default_factory=dict)
    skipped: int = 0
    history: list[dict] = field(default_factory=list)  # every logged metrics row


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
                f"no latent cache for {cfg.data.clip_spec().key} for the shards {cfg.data.root}: run `fwmodel cache "
                f"{cfg.data.root} --config CONFIG --vae PATH --text-encoder PATH` (a sharded cache beside the shards), "
                "or point data.cache_dir at a cache root (a folder cache made on the dataset folder serves its shards too)"
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
    if cache is None and is_i2v(model_config) and cfg.model.image_encoder is None:
        raise ConfigError(
            f"preset {model_config.name} is image-to-video: without a latent cache holding its first-frame condition "
            "set model.image_encoder (the Wan I2V repository or its image_encoder/ folder; --set "
            "model.image_encoder=PATH) for encoding on the fly, or run `fwmodel cache ... --image-encoder PATH`")
    if not allowed and (found := random_init_findings(cfg, selection.random_init, len(selection.records), cache)):
        raise refuse_random_init(found)
    if shards is not None:
        dataset = ShardDataset(cfg.data, shards, selection, text_dim=model_config.wan.text_dim, cache=cache)
    else:
        dataset = TrainingDataset(cfg.data, text_dim=model_config.wan.text_dim, cache=cache)
    if cache is not None and is_i2v(model_config):  # after the coverage checks: the I2V part of every sample
        cache.check_i2v(dataset.records, model_config.wan.image_dim)
    return dataset


def _online_image_encoder(cfg: TrainConfig, model_config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The CLIP image encoder of model.image_encoder (fwmodel.i2v.ImageEncoder) for encoding on the fly;
    ConfigError (one line) when it cannot be loaded or its width is not the preset's image_dim."""
    from fwmodel.i2v import ImageEncoderError, load_image_encoder

    try:
        return load_image_encoder(cfg.model.image_encoder, device, dtype, model_config)
    except ImageEncoderError as err:
        raise ConfigError(f"model.image_encoder: {err}") from None


def _data_source(cfg: TrainConfig) -> str:
    """"shards" when data.root holds WebDataset shards (shards.json), else "folder" (recorded in trainer.json)."""
    from fwmodel.shard_data import is_shard_root

    return "shards" if is_shard_root(cfg.data.root) else "folder"


def make_loader(dataset: TrainingDataset, cfg: TrainConfig, d: Dist, start_micro: int):
    if not isinstance(dataset, TrainingDataset):  # shards (fwmodel.shard_data): the stream is its own sampler
        stream = dataset.layout(cfg.train.batch_size, d.world_size, d.rank, cfg.train.seed, start=start_micro)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers,
            pin_memory=d.device.type == "cuda" and cfg.speed.pin_memory, persistent_workers=cfg.data.num_workers > 0,
            prefetch_factor=2 if cfg.data.num_workers > 0 else None,
        )
        return stream, loader
    sampler = StepSampler(len(dataset), cfg.train.batch_size, d.world_size, d.rank, cfg.train.seed,
                          cfg.data.shuffle, start=start_micro)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
        pin_memory=d.device.type == "cuda" and cfg.speed.pin_memory, persistent_workers=cfg.data.num_workers > 0,
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
        if device.type == "cpu" and cfg.model.preset in ("tiny", "tiny-i2v"):
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
        return (f"{what} {when}: the last saved state is {state_root(output) / f'step-{last}'} (step {last}, weights "
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
        found.append(f"the latent cache {cache.dir} was made with randomly initialised encoders (VAE/UMT5"
                     f"{'/CLIP image encoder' if cache.info.get('image_encoder') else ''}): its latents and text "
                     "embeddings are not real")
    elif cache is None and encoders and is_random_encoder(cfg.model.image_encoder):
        found.append("model.vae / model.text_encoder / model.image_encoder are randomly initialised: the latents, "
                     "text embeddings and image tokens are not real")
    elif cache is None and encoders and (is_random_encoder(cfg.model.vae) or is_random_encoder(cfg.model.text_encoder)):
        found.append("model.vae / model.text_encoder are randomly initialised: the latents and text embeddings are "
                     "not real")
    return found


def refuse_random_init(found: list[str]) -> DataError:
    return DataError(
        "; ".join(found) + ". Training on them teaches nothing: build the dataset with a real depth model "
        "(`fwdata build --depth-model ...`) and cache it with the Wan weights (`fwmodel cache DATASET --vae WAN "
        "--text-encoder WAN`, plus --image-encoder WAN_I2V for an image-to-video preset), or, for tests and demos "
        "only, allow it: `fwmodel train ... --allow-random-init` "
        "(sets data.allow_random_init_labels = true)"
    )


def _train(cfg: TrainConfig, d: Dist, log: RunLogger, output: Optional[Path], saved: Optional[SavedState],
           dry_run: bool, allow_missing_sidecar: bool, progress: Optional[dict] = None,
           meter: Optional[StepProgress] = None) -> TrainResult:
    progress = {} if progress is None else progress
    meter = meter or StepProgress(f"stage {cfg.train.stage}", cfg.train.num_steps, mode="off")
    stage = cfg.train.stage
    tcfg = cfg.train
    # Python's and numpy's global generators are saved with every state (rng-rank*): seeded per rank so
    # that the same run writes the same bytes (a resume then restores them from the state)
    random.seed(tcfg.seed + d.rank)
    np.random.seed(tcfg.seed + d.rank)
    model_config = get_preset(cfg.model.preset)
    check_speed(cfg, d.device)  # [speed] flags this device cannot run: one line, before the data and the weights
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
    est = config_estimate(cfg, d.world_size, online_encoders=not dataset.uses_cache)  # with train.parallel
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
    for line in apply_speed(model, cfg, d.device):  # [speed]: before wrapping and the optimizer
        log.info(line)
    if not resuming and cfg.model.init_from is not None:
        load_stage1(model, cfg.model.init_from, stage, log, allow_missing_sidecar)
    fsdp = d.enabled and tcfg.parallel == "fsdp2"
    if fsdp:  # FSDP2 shards the model in place: weights loaded before, optimizer built after (fwmodel.train.parallel)
        if resuming:
            load_weights(output, saved, model, cfg, dataset.fingerprint, d, log, allow_missing_sidecar)
        model = wrap_model(model, cfg, d)
    names, optimizer, scheduler = build_optimizer(model, cfg, d.device)
    groups = module_groups(model, stage)
    n_train = sum(p.numel() for ps in groups.values() for p in ps)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    where = f"outside {'FSDP2' if fsdp else 'DDP'}"
    if fsdp and tcfg.fsdp_shard_backbone:  # [parallel] shard_backbone_blocks
        where = f"Wan blocks sharded by FSDP2: {local_frozen_numel(model):,} held on this rank"
    log.info(f"parameters: {n_train:,} trainable ({', '.join(groups)}), {n_frozen:,} frozen (no grads, "
             f"no optimizer state, {where})")

    state = TrainState()
    if resuming:
        state = load_state(output, saved, model, optimizer, scheduler, names, cfg, dataset.fingerprint, d, log,
                           allow_missing_sidecar, weights=not fsdp)

    ddp_model = model if fsdp else wrap_model(model, cfg, d)  # DDP (several processes) or the model itself

    encoders = None
    if not dataset.uses_cache:
        from fwmodel.cache import TextEncoder, VideoEncoder

        enc_dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
        encoders = (VideoEncoder(cfg.model.vae, d.device, enc_dtype),
                    TextEncoder(cfg.model.text_encoder, d.device, enc_dtype, text_dim=model_config.wan.text_dim))
        if is_i2v(model_config):  # the CLIP of the first frames (fwmodel.i2v; model.image_encoder checked above)
            encoders += (_online_image_encoder(cfg, model_config, d.device, enc_dtype),)

    sampler, loader = make_loader(dataset, cfg, d, start_micro=state.step * tcfg.grad_accum)
    data_iter = iter(loader)
    data_source = _data_source(cfg)

    def micro_batches(timing: dict) -> Iterator[dict]:
        """The loader's next micro-batches on the device (latents and text encoded when there is no cache);
        the time spent waiting for the loader is added to timing["wait"]."""
        while True:
            tw = time.perf_counter()
            batch = next(data_iter)
            timing["wait"] += time.perf_counter() - tw
            batch = move_batch(batch, d.device)
            if encoders is not None:
                with torch.no_grad():
                    if len(encoders) > 2:  # I2V: the condition and image tokens of the clips' first frames
                        from fwmodel.cache import encode_i2v
                        from fwmodel.i2v import with_mask

                        i2v = encode_i2v(batch["video"], encoders[0], encoders[2])
                        batch["condition"], batch["image_embeds"] = with_mask(i2v["condition_latents"]), \
                            i2v["image_embeds"]
                    batch["latents"] = encoders[0](batch.pop("video"))
                    batch["text"] = encoders[1](batch["text"])
            yield batch

    def describe(inputs: dict, outputs: dict) -> None:
        log.info("shapes (first micro-batch):\n" + "\n".join(_describe_shapes(inputs, outputs)), console=dry_run)

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
        timing = {"wait": 0.0}
        out = train_step(ddp_model, micro_batches(timing), optimizer, scheduler, groups, cfg, d, step=step,
                         describe=describe if step == 1 else None)
        if out.attention_kernels is not None:
            kernels = ", ".join(f"{k} x {n}" for k, n in sorted(out.attention_kernels.items())) or "none"
            log.info(f"attention: speed.attention_backend = {cfg.speed.attention_backend}; SDPA kernels of the first "
                     f"forward: {kernels}")
        if out.skipped:
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
        state.step = step
        log_step = step % tcfg.log_every == 0 or step == tcfg.num_steps or step == 1
        if d.device.type == "cuda" and log_step:  # no host sync between log steps: the window's time is right
            torch.cuda.synchronize(d.device)
        dt = time.perf_counter() - t0
        window["time"] += dt
        window["wait"] += timing["wait"]
        window["steps"] += 1

        if log_step:
            keys = sorted(out.losses)  # the host copies of the step's values: at log steps only
            values = d.all_reduce_mean(torch.stack([out.losses[k] for k in keys]))
            metrics = {k: float(v) for k, v in zip(keys, values.tolist())}
            metrics["lr"] = out.lr
            metrics["grad_norm/total"] = float(out.grad_norm)
            metrics.update({f"grad_norm/{k}": float(v) for k, v in out.module_grad_norms.items()})
            step_time = window["time"] / window["steps"]
            metrics["perf/step_time_s"] = step_time
            metrics["perf/samples_per_s"] = global_batch / step_time
            metrics["perf/data_wait_frac"] = window["wait"] / max(window["time"], 1e-9)
            metrics["mem/peak_gib"] = peak_memory_gib(d.device)
            metrics["train/skipped_steps"] = state.skipped
            metrics["train/epoch"] = sampler.epoch_of(step * tcfg.grad_accum)
            log.scalars(step, metrics)
            result.history.append({"step": step, **metrics})
            result.last_metrics = metrics
            diff = f" diff {metrics['loss/diffusion']:.4f}" if "loss/diffusion" in metrics else ""
            log.info(f"step {step}/{tcfg.num_steps} | total {metrics['loss/total']:.4f}{diff} | depth reg "
                     f"{metrics['loss/depth/reg']:.4f} | point reg {metrics['loss/point/reg']:.4f} | camera "
                     f"{metrics['loss/camera_loss']:.4f} | lr {out.lr:.2e} | {step_time:.2f} s/step | data "
                     f"{100 * metrics['perf/data_wait_frac']:.0f}% | mem {metrics['mem/peak_gib']:.2f} GiB")
            window = {"time": 0.0, "wait": 0.0, "steps": 0}

        if output is not None and (step % tcfg.checkpoint_every == 0 or step == tcfg.num_steps):
            result.checkpoints.append(save_state(output, model, optimizer, scheduler, names, state, cfg,
                                                 dataset.fingerprint, data_source, d, log))
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
