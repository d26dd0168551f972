"""`fwmodel` command line: environment check, model verification, training, the end-to-end demo."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from fwdata.cli_common import fail, reflow_help, version_callback

app = typer.Typer(
    name="fwmodel",
    help="The FantasyWorld model: verify the two-stage configuration, train Stage 1 and Stage 2.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """The FantasyWorld model and its two-stage trainer."""


@app.command()
def doctor(
    output: Path = typer.Option(Path("outputs"), help="Where checkpoints and logs will be written."),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="Wan2.1 weights (as `fwmodel train --weights`): a local diffusers-format directory "
        "or a single .safetensors file."
    ),
    preset: str = typer.Option(
        "wan2.1-t2v-1.3b", "--preset", help="Model preset the weights must match (as `fwmodel train --preset`)."
    ),
    need_gpu: bool = typer.Option(False, "--need-gpu", help="Treat a missing GPU as a problem."),
    min_free_gb: float = typer.Option(50.0, help="Free disk required at OUTPUT, in GB."),
) -> None:
    """Check torch, GPUs, disk space, key packages and the Wan2.1 weights for training.

    The weights pass exactly when `fwmodel train` would accept them for PRESET (the same check runs
    before training loads them). Exits 1 with one line per problem when something required is missing.
    """
    from fwmodel.config import PRESET_NAMES
    from fwmodel.doctor import run_training_doctor

    if preset not in PRESET_NAMES:
        fail(f"unknown preset {preset!r}; choose one of: {', '.join(PRESET_NAMES)}")
    raise typer.Exit(run_training_doctor(output, weights, preset, need_gpu=need_gpu,
                                         required_free_bytes=int(min_free_gb * 1e9)))


@app.command()
def verify(
    preset: str = typer.Option(
        "wan2.1-t2v-1.3b", "--preset", help="Model preset: tiny, wan2.1-t2v-1.3b or wan2.1-i2v-14b."
    ),
    stage: int = typer.Option(1, "--stage", help="Training stage whose trainable flags to show: 1 or 2."),
    format: str = typer.Option("table", "--format", help="Output format: table or json."),
) -> None:
    """Verify the two-stage configuration: parameters per module, trainable or frozen, and totals.

    Builds the model on the meta device (no weights, no memory; seconds even for 14B).
    """
    from fwmodel.config import PRESET_NAMES
    from fwmodel.params import parameter_report, render_table

    if preset not in PRESET_NAMES:
        fail(f"unknown preset {preset!r}; choose one of: {', '.join(PRESET_NAMES)}")
    if stage not in (1, 2):
        fail(f"--stage must be 1 or 2, got {stage}")
    if format not in ("table", "json"):
        fail(f"--format must be table or json, got {format!r}")
    report = parameter_report(preset, stage)
    if format == "json":
        typer.echo(report.model_dump_json(indent=2))
    else:
        from rich.console import Console

        Console().print(render_table(report))


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can cause and fix: printed as one line (exit 2) instead of a traceback."""
    from fwmodel.backbone import BackboneWeightsError
    from fwmodel.checkpoint import CheckpointError
    from fwmodel.data import DataError
    from fwmodel.evaluate import EvalError
    from fwmodel.generate import GenerateError
    from fwmodel.inference import InferenceError
    from fwmodel.trajectories import TrajectoryError
    from fwmodel.memory import MemoryPreflightError
    from fwmodel.train.config import ConfigError
    from fwmodel.train.state import ResumeError

    return (BackboneWeightsError, CheckpointError, DataError, MemoryPreflightError, ConfigError, ResumeError,
            EvalError, InferenceError, GenerateError, TrajectoryError)


def _stage_config(config: Optional[Path], stage: int):
    """Check --stage against the config file's train.stage (a Stage-1 recipe run as Stage 2 is a mistake)."""
    import tomllib

    from fwmodel.train.config import ConfigError, resolve_recipe

    if config is None:
        return
    try:
        config = resolve_recipe(config)
    except ConfigError as err:
        fail(str(err))
    try:
        file_stage = tomllib.loads(config.read_text()).get("train", {}).get("stage")
    except tomllib.TOMLDecodeError:
        return  # load_config reports it
    if file_stage is not None and file_stage != stage:
        fail(f"--stage {stage} but {config} is a Stage-{file_stage} recipe (train.stage = {file_stage})")


# Options left out of the command that continues an interrupted run (it adds --resume itself).
_NOT_REPEATED_ON_RESUME = {"resume", "resume_step", "dry_run"}


def _command_line(ctx: typer.Context, output: Path) -> str:
    """The `fwmodel train` command as the user gave it (options typed on the command line, in their
    canonical spelling), without --resume / --resume-step / --dry-run, and with --output made explicit."""
    import shlex

    world = int(os.environ.get("WORLD_SIZE", "1"))
    parts = ["torchrun", "...", "-m", "fwmodel.cli", "train"] if world > 1 else ["fwmodel", "train"]
    has_output = False
    for param in ctx.command.params:
        name = param.name
        if name in _NOT_REPEATED_ON_RESUME or getattr(ctx.get_parameter_source(name), "name", None) != "COMMANDLINE":
            continue
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        value = ctx.params[name]
        has_output |= name == "output"
        if getattr(param, "is_flag", False):
            if value:
                parts.append(flag)
        elif getattr(param, "multiple", False):
            for item in value or ():
                parts += [flag, str(item)]
        elif value is not None:
            parts += [flag, str(value)]
    if not has_output:
        parts += ["--output", str(output)]
    return shlex.join(parts)


@app.command()
def train(
    ctx: typer.Context,
    stage: int = typer.Option(..., "--stage", help="1: latent bridging, 2: unified co-optimisation."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Training recipe: a TOML file or a packaged name (stage1, stage2, tiny-stage1, "
        "tiny-stage2; `fwmodel recipes` lists them)."
    ),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder (metadata.json), or WebDataset shards "
                                        "(a folder or URL with shards.json, `fwdata shard`); sets data.root."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Output folder (default outputs/fantasy_world_stage<N>)."
    ),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", envvar="STAGE1_CHECKPOINT",
        help="Stage 2: the Stage-1 checkpoint to start from (or env STAGE1_CHECKPOINT). Or the released FantasyWorld "
        "weights (release-layout .safetensors, or `fwmodel convert-release` of model.pth; --preset wan2.1-i2v-14b).",
    ),
    weights: Optional[str] = typer.Option(None, "--weights", help="Wan2.1 weights; sets model.wan_weights."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Model preset; sets model.preset."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sets train.num_steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per GPU; sets train.batch_size."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Sets train.grad_accum."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Sets optim.lr."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=0,
        help="Torch intra-op threads on the CPU; sets train.threads. Default: 1 for the tiny preset on a CPU (tiny "
        "models run several times faster on one thread), torch's default otherwise; 0 = torch's default.",
    ),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="Any config value, e.g. --set data.num_frames=49 (repeatable)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its latest state."),
    allow_random_init: bool = typer.Option(
        False, "--allow-random-init",
        help="Train on labels or latents made by randomly initialised models (random-tiny depth, VAE or text "
        "encoder), with a warning; sets data.allow_random_init_labels = true. For tests and demos only.",
    ),
    resume_step: Optional[int] = typer.Option(None, "--resume-step", help="With --resume: continue from step N."),
    allow_missing_sidecar: bool = typer.Option(
        False, "--allow-missing-sidecar",
        help="Load --init-from (or the resumed weights) without its .json sidecar: no size or sha256 check "
        "(logs a warning). Without this flag a checkpoint with no sidecar is refused.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="A few steps on one sample: shapes, memory, step time; writes nothing."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress: only warnings, errors and one summary line at the end (steps, "
        "elapsed time, final weights); train.log has everything."),
) -> None:
    """Train Stage 1 or Stage 2 on a dataset in our contract (one GPU, or many with torchrun).

    Exit codes: 0 finished, 1 aborted (too many non-finite steps), 2 bad config, data, weights or
    checkpoint (nothing trained), 130 Ctrl-C / 143 SIGTERM (the last saved state and the --resume
    command are printed and written to train.log). See docs/TRAINING.md.
    """
    from fwdata.runtime import Terminated, sigterm_as_interrupt
    from fwmodel.train import TrainingAborted
    from fwmodel.train.config import load_config
    from fwmodel.progress import choose_mode
    from fwmodel.train import train as run_train

    if stage not in (1, 2):
        fail(f"--stage must be 1 or 2, got {stage}")
    _stage_config(config, stage)
    overrides = {
        "train.stage": stage, "data.root": data, "train.output": output, "model.init_from": init_from,
        "model.wan_weights": weights, "model.preset": preset, "train.num_steps": steps,
        "train.batch_size": batch_size, "train.grad_accum": grad_accum, "optim.lr": lr, "train.threads": threads,
        "data.allow_random_init_labels": True if allow_random_init else None,
    }
    user_errors = _user_errors()
    try:
        cfg = load_config(config, {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()}, set_)
        with sigterm_as_interrupt():
            run_train(cfg, resume=resume or resume_step is not None, resume_step=resume_step, dry_run=dry_run,
                      quiet=quiet, echo=typer.echo, allow_missing_sidecar=allow_missing_sidecar,
                      command=_command_line(ctx, cfg.output_dir()), echo_err=lambda m: typer.echo(m, err=True),
                      progress_mode=choose_mode(quiet))
    except KeyboardInterrupt as err:  # the trainer printed the last state and the --resume command
        raise typer.Exit(143 if isinstance(err, Terminated) else 130) from None
    except TrainingAborted as err:
        fail(str(err), code=1)
    except user_errors as err:
        fail(str(err))


@app.command()
def cache(
    dataset: Path = typer.Argument(..., help="Dataset folder (metadata.json), or WebDataset shards (a folder or URL "
                                   "holding shards.json, `fwdata shard`): the cache is then written as tar shards "
                                   "matching them."),
    vae: Path = typer.Option(
        ..., "--vae", help="Wan VAE: the Wan2.1 diffusers repository or its vae/ folder; `random-tiny`: a tiny "
        "randomly initialised VAE built in memory (seeded, no download; tests and demos, marked random_init)."
    ),
    text_encoder: Path = typer.Option(
        ..., "--text-encoder", help="UMT5: the Wan2.1 diffusers repository or its text_encoder/ folder; "
        "`random-tiny`: a tiny random UMT5 as wide as the recipe's preset (tests and demos, marked random_init)."
    ),
    image_encoder: Optional[Path] = typer.Option(
        None, "--image-encoder", help="Image-to-video presets: the CLIP image encoder (a Wan2.1 I2V diffusers "
        "repository or its image_encoder/ folder; `random-tiny`: a tiny random CLIP as wide as the preset's "
        "image_dim, 16 for a text-to-video preset). Also caches each sample's first-frame condition latent and "
        "CLIP image tokens."
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Take frames, size, stride, window, split from this training recipe (a TOML file or a "
        "packaged name, e.g. tiny-stage1)."
    ),
    frames: Optional[int] = typer.Option(None, "--frames", help="T = 4k+1 (overrides the recipe)."),
    height: Optional[int] = typer.Option(None, "--height", help="H, multiple of 16 (overrides the recipe)."),
    width: Optional[int] = typer.Option(None, "--width", help="W, multiple of 16 (overrides the recipe)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Frame stride (overrides the recipe)."),
    split: Optional[str] = typer.Option(None, "--split", help="train, val, test or all (overrides the recipe)."),
    include_gated_out: bool = typer.Option(False, "--include-gated-out", help="Also cache gated-out samples."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text for every sample without a caption."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="JSON {sample id: caption}."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Cache root (the trainer's data.cache_dir; default DATASET/.fwmodel_cache, or "
        "SHARDS/.fwmodel_cache on shards); the cache goes in <root>/<frames>x<height>x<width>-s<stride>-<window>/."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="Encoder dtype: auto (bf16 on GPU), float32 or bfloat16."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress: one summary line at the end (and warnings, "
                               "errors)."),
) -> None:
    """Pre-compute Wan VAE latents and UMT5 text embeddings (512 tokens) once, beside the dataset.

    Written to DATASET/.fwmodel_cache/<frames>x<height>x<width>-s<stride>-<window>/ with their
    provenance; training uses them automatically and then loads neither encoder. Re-running adds
    missing or changed samples only. `--vae random-tiny --text-encoder random-tiny` caches with tiny
    random encoders (no download) for the tiny recipes; the cache is marked random_init.
    `--image-encoder PATH` (image-to-video presets) also caches each sample's first-frame condition
    latent and CLIP image tokens (docs/TRAINING.md, "Image-to-video (I2V) presets").
    On shards (SHARDS/shards.json) the cache is WebDataset tar shards named and keyed like the data
    shards, with cache-shards.json (sha256 per shard and per entry), in SHARDS/.fwmodel_cache/<spec>/;
    `fwmodel train --data SHARDS` streams them beside the data shards.
    """
    import torch

    from fwmodel.cache import CacheOptions, build_cache, is_random_encoder
    from fwmodel.config import get_preset
    from fwmodel.progress import StepProgress, cache_summary, choose_mode
    from fwmodel.train.config import load_config

    sets = {"data.num_frames": frames, "data.height": height, "data.width": width, "data.frame_stride": stride,
            "data.split": split, "data.prompt": prompt}
    if include_gated_out:
        sets["data.include_gated_out"] = True
    if cache_dir is not None:
        sets["data.cache_dir"] = str(cache_dir)
    user_errors = _user_errors()
    try:
        cfg = load_config(config, sets)
        if dtype == "auto":
            dtype = "bfloat16" if (device != "cpu" and torch.cuda.is_available()) else "float32"
        if dtype not in ("float32", "bfloat16"):
            fail(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
        opts = CacheOptions(dataset=dataset, vae=vae, text_encoder=text_encoder, data=cfg.data, captions=captions,
                            device=device, encoder_dtype=dtype, text_dim=get_preset(cfg.model.preset).wan.text_dim,
                            image_encoder=image_encoder, image_dim=get_preset(cfg.model.preset).wan.image_dim or 16)

        meter = StepProgress("caching", 0, "sample", choose_mode(quiet), echo=typer.echo)
        try:
            directory = build_cache(opts, meter.item_callback())
        finally:
            meter.close()
    except user_errors as err:
        fail(str(err))
    typer.echo(f"latent cache ready: {directory} ({cache_summary(meter)})")  # also with --quiet: the one line
    if is_random_encoder(vae) or is_random_encoder(text_encoder) or is_random_encoder(image_encoder):
        typer.echo("warning: made with randomly initialised encoders (marked random_init in cache.json): the latents "
                   "and text embeddings mean nothing; for tests and demos only (training refuses it unless "
                   "`fwmodel train ... --allow-random-init`, or data.allow_random_init_labels = true)", err=True)


@app.command()
def bench(
    preset: str = typer.Option("wan2.1-t2v-1.3b", "--preset", help="Model preset."),
    stage: int = typer.Option(1, "--stage", help="1 or 2."),
    batch_size: int = typer.Option(1, "--batch-size", help="Samples per step."),
    frames: int = typer.Option(81, "--frames", help="T = 4k+1."),
    height: int = typer.Option(336, "--height", help="H, a multiple of 16."),
    width: int = typer.Option(592, "--width", help="W, a multiple of 16."),
    steps: int = typer.Option(5, "--steps", help="Timed steps."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed steps first."),
    no_checkpointing: bool = typer.Option(False, "--no-checkpointing", help="Turn gradient checkpointing off."),
    mixed_precision: str = typer.Option("bf16", "--mixed-precision", help="bf16 or no."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Device peak for MFU (known GPUs built in)."),
    no_flops: bool = typer.Option(False, "--no-flops", help="Skip the FLOP count (and MFU)."),
    format: str = typer.Option("table", "--format", help="table or json."),
    speed: list[str] = typer.Option([], "--speed", help="A [speed] flag KEY=VALUE (repeatable), e.g. --speed "
                                    "attention_backend=flash --speed compile=blocks; docs/TRAINING.md \"Speed flags\"."),
) -> None:
    """Time real training steps with synthetic inputs: step time, tokens/s, TFLOP/s, MFU, peak memory."""
    from fwmodel.bench import render, run_bench
    from fwmodel.config import PRESET_NAMES
    from fwmodel.train.config import ConfigError, parse_speed

    if preset not in PRESET_NAMES:
        fail(f"unknown preset {preset!r}; choose one of: {', '.join(PRESET_NAMES)}")
    if stage not in (1, 2) or mixed_precision not in ("bf16", "no") or format not in ("table", "json"):
        fail("--stage must be 1 or 2, --mixed-precision bf16 or no, --format table or json")
    try:
        result = run_bench(preset, stage, batch_size, frames, height, width, steps, warmup, not no_checkpointing,
                           mixed_precision, device, peak_tflops, not no_flops,
                           echo=(lambda s: None) if format == "json" else typer.echo, speed=parse_speed(speed))
    except (ValueError, ConfigError) as err:
        fail(str(err))
    typer.echo(result.model_dump_json(indent=2) if format == "json" else render(result))


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A training run folder (the --output of `fwmodel train`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the report (default RUN_DIR/report)."),
    eval_dir: Optional[Path] = typer.Option(
        None, "--eval", help="The --out folder of `fwmodel eval` (its eval.json): adds the eval table and one "
        "metric-versus-step plot per metric."),
) -> None:
    """A training run as pictures: OUT/index.html (self-contained, works offline) and OUT/plots/*.png.

    The run's facts (stage, steps, preset, data fingerprint), its checkpoints, one plot per group of
    metrics.jsonl's scalars (losses, loss terms, learning rate, gradient norms, performance), the
    config and the end of train.log; with --eval the eval table and each metric against the step.
    Exit codes: 0 written, 2 not a run folder, bad --eval or --out.
    """
    from fwdata.textout import plural
    from fwmodel.run_report import RunError, write_run_report

    try:
        res = write_run_report(run_dir, out, eval_dir)
    except RunError as err:
        fail(str(err))
    typer.echo(f"wrote {res.index} and {plural(len(res.pngs), 'plot')} in {res.index.parent / 'plots'}")


@app.command("package")
def package_cmd(
    run_dir: Optional[Path] = typer.Argument(None, help="A training run folder (the --output of `fwmodel train`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The tar file to write, e.g. run.tar."),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", help="Which checkpoint of the run, e.g. step-1000.safetensors (default: the last)."),
    with_state: bool = typer.Option(
        False, "--with-state", help="Also the optimizer / RNG state of that step (state/step-N/), to --resume "
        "from the package."),
    verify: Optional[Path] = typer.Option(
        None, "--verify", help="Check a package instead: every member against its manifest (size, sha256)."),
) -> None:
    """Back up a run as one tar with a manifest of sizes and sha256s; --verify checks one.

    The tar holds the checkpoint + sidecar, config.toml, train.log, metrics.jsonl, tb/, the dataset
    fingerprint and the manifest (never state/ unless --with-state). Same run, same bytes (sorted
    members, fixed times). `fwmodel package --verify run.tar` prints one line per problem.
    Exit codes: 0 written / verified, 1 --verify found problems, 2 bad input.
    """
    from fwdata.textout import plural
    from fwmodel.package import make_package, verify_package
    from fwmodel.run_report import RunError

    if verify is not None:
        if run_dir is not None or out is not None or checkpoint is not None or with_state:
            fail("--verify TAR takes no RUN_DIR, --out, --checkpoint or --with-state")
        try:
            problems, manifest = verify_package(verify)
        except RunError as err:
            fail(str(err))
        for line in problems:
            typer.echo(line)
        if problems:
            fail(f"{verify}: {plural(len(problems), 'problem')}", code=1)
        typer.echo(f"{verify}: ok, {plural(len(manifest['files']), 'file')} match the manifest "
                   f"({manifest['checkpoint']}, stage {manifest['stage']})")
        return
    if run_dir is None or out is None:
        fail("give RUN_DIR and --out run.tar (or --verify run.tar)")
    try:
        res = make_package(run_dir, out, checkpoint, with_state)
    except RunError as err:
        fail(str(err))
    others = plural(len(res.manifest["files"]) - 1, "other file")
    typer.echo(f"wrote {res.tar}: {res.manifest['checkpoint']} and {others}, {res.bytes / 1e6:.1f} MB")


@app.command("publish")
def publish_cmd(
    run_dir: Path = typer.Argument(..., help="A training run folder (the --output of `fwmodel train`)."),
    repo_id: str = typer.Option(..., "--repo-id", help="The Hugging Face model repository: USER/NAME or ORG/NAME."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", help="Which checkpoint of the run, e.g. step-1000.safetensors (default: the last)."),
    eval_dir: Optional[Path] = typer.Option(
        None, "--eval", help="The --out folder of `fwmodel eval`: its table goes into the model card."),
    dry_run: Optional[Path] = typer.Option(
        None, "--dry-run", help="Write the repository folder here (new or empty) and upload nothing."),
) -> None:
    """Publish a checkpoint to the Hugging Face Hub as a model repository (--dry-run: write the folder only).

    The folder: the safetensors and sidecar, config.json / config.toml and a model card (licence of
    the Wan2.1 base model, tags, the recipe, stage, steps, data fingerprint, eval table), uploaded
    with huggingface_hub.

    Needs a token (`hf auth login` or HF_TOKEN) unless --dry-run. Exit codes: 0 uploaded / written,
    1 the Hub refused or could not be reached, 2 bad input or no token (nothing uploaded).
    """
    from fwmodel.publish import UploadError, publish
    from fwmodel.run_report import RunError

    try:
        res = publish(run_dir, repo_id, private=private, checkpoint=checkpoint, eval_dir=eval_dir, dry_run=dry_run)
    except RunError as err:
        fail(str(err))
    except UploadError as err:
        fail(str(err), code=1)
    if res.url is None:
        typer.echo(f"wrote {res.folder}: {', '.join(res.files)} (dry run: nothing uploaded)")
    else:
        typer.echo(f"uploaded {', '.join(res.files)} to {res.url}")


@app.command("convert-release")
def convert_release_cmd(
    src: Path = typer.Argument(..., help="to ours: the release's model.pth (or a release-layout .safetensors); "
                               "to release: our Stage-2 checkpoint of a release-config model."),
    out: Path = typer.Argument(..., help="to ours: OUT.safetensors (+ .json sidecar); to release: .safetensors or .pth."),
    to: str = typer.Option("ours", "--to", help="ours (our checkpoint format) or release (the release's layout)."),
    preset: str = typer.Option("wan2.1-i2v-14b", "--preset", help="The I2V preset the weights are for."),
    wan_weights: Optional[str] = typer.Option(
        None, "--wan-weights", help="to ours: the Wan2.1-I2V-14B weights, recorded as the model.wan_weights that "
        "`fwmodel generate` then uses."),
) -> None:
    """Convert the released FantasyWorld weights (acvlab/FantasyWorld-Wan2.1-I2V-14B-480P model.pth) to our
    checkpoint format, or back (fwmodel.release; docs/MODEL.md).

    The output checkpoint holds geometry + interaction (Stage 2), float32, built with the release
    switches, and its sidecar says where it came from; use it with `fwmodel generate --checkpoint` or
    `fwmodel train --init-from`. This is the only command that opens a pickle (.pth): with
    torch.load(weights_only=True, mmap=True), tensors only, no code. Keys that do not map are named.
    Exit 2: a file or key that cannot be converted.
    """
    from fwmodel.release import ReleaseError, convert_release

    try:
        written = convert_release(src, out, to=to, preset=preset, wan_weights=wan_weights)
    except _user_errors() + (ReleaseError,) as err:
        fail(str(err))
    typer.echo(f"wrote {written}" + (f" and {written.with_suffix('.json').name}" if to == "ours" else ""))


@app.command()
def recipes() -> None:
    """List the packaged training recipes, one line each.

    Use one by name (`fwmodel train --config tiny-stage1`), or copy one (its folder is printed) to
    start your own: a path to any TOML file works as well.
    """
    from fwdata.presets import listing
    from fwmodel.recipes import RECIPES

    typer.echo("\n".join(listing(RECIPES, "fwmodel train --config NAME")))


@app.command("memory")
def memory_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="Training recipe: a TOML file or a packaged name "
                                "(`fwmodel recipes`), as `fwmodel train --config`."),
    world_size: int = typer.Option(1, "--world-size", min=1, help="Number of GPUs (ranks) of the run."),
    limit_gb: Optional[float] = typer.Option(
        None, "--limit-gb", help="Memory per GPU in GiB (default: memory.limit_gb of the config, else this "
        "machine's first GPU; none: no verdict)."),
    parallel: Optional[list[str]] = typer.Option(
        None, "--parallel", help="ddp or fsdp2 (default train.parallel); repeat to compare side by side."),
    online_encoders: Optional[bool] = typer.Option(
        None, "--online-encoders/--cached", help="Without / with a latent cache (default: --cached unless "
        "data.cache = \"off\"): online, the VAE, UMT5 (and CLIP for I2V) are held in memory."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="Any config value, e.g. --set data.num_frames=49 (repeatable)."),
    format: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Estimate memory per GPU of a training config, before anything is loaded (no weights, no data).

    The same estimate `fwmodel train` checks at its preflight (fwmodel/memory.py), per part (frozen
    weights, trainable state, activations, encoders, overhead) against 95 % of the limit. Exit codes:
    0 the (first) strategy fits or no limit is known, 1 it does not fit, 2 bad input.
    """
    import json

    from fwmodel.memory import GIB, PARALLEL, config_estimate, device_capacity, render_comparison
    from fwmodel.train.config import load_config

    strategies = parallel or []
    if any(p not in PARALLEL for p in strategies) or format not in ("table", "json"):
        fail(f"--parallel must be {' or '.join(PARALLEL)} and --format table or json")
    try:
        cfg = load_config(config, sets=set_)
        estimates = {p: config_estimate(cfg, world_size, p, online_encoders)
                     for p in (strategies or [cfg.train.parallel])}
    except _user_errors() as err:
        fail(str(err))
    for est in estimates.values():
        if limit_gb is not None:
            est.capacity, est.device = limit_gb * GIB, "--limit-gb"
        elif est.capacity is None:
            import torch

            if torch.cuda.is_available():
                est.capacity, est.device = device_capacity(torch.device("cuda", 0))
    first = next(iter(estimates.values()))
    if format == "json":
        typer.echo(json.dumps({"config": str(config), "preset": cfg.model.preset, "stage": cfg.train.stage,
                               "world_size": world_size, "batch_size": cfg.train.batch_size,
                               "frames": cfg.data.num_frames, "height": cfg.data.height, "width": cfg.data.width,
                               "estimates": {p: e.summary() for p, e in estimates.items()}}, indent=2))
    else:
        typer.echo(f"memory estimate per GPU: {cfg.model.preset}, Stage {cfg.train.stage}, {cfg.data.num_frames} x "
                   f"{cfg.data.height} x {cfg.data.width}, batch {cfg.train.batch_size} per GPU, {world_size} GPU(s)"
                   + (f", limit {first.capacity / GIB:.1f} GiB ({first.device})" if first.capacity else ""))
        typer.echo(render_comparison({f"{p} x {world_size}": e for p, e in estimates.items()}))
        for note in dict.fromkeys(n for e in estimates.values() for n in e.notes):
            typer.echo(f"  note: {note}")
    if first.fits() is False:
        raise typer.Exit(1)


@app.command()
def demo(
    out: Path = typer.Argument(Path("demo_out"), help="Folder for the demo's outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-clip lines; the steps' "
                                                            "summaries only."),
) -> None:
    """The main job end to end on one dataset: render clips with ground truth, build a dataset from their
    videos, compare it with the truth, validate it, cache it, train Stage 1 and Stage 2 on it.

    Runs offline: depth comes from `random-tiny` (a randomly initialised Depth Anything, so its depth
    is not real); validation uses the demo's gate file (OUT/demo-gates.toml: the default gates, plus
    allow_random_init_models for the demo only); training uses a tiny random Wan. Exit 1 when a step
    fails (validation included), with the reason. What `make demo` runs.
    """
    from fwdata.cli import console
    from fwmodel.demo import DemoFailed, run_demo

    try:
        run_demo(out, console, quiet=quiet)
    except DemoFailed as err:
        fail(f"demo stopped: {err}", code=1)


@app.command("eval")
def eval_(
    checkpoint: list[Path] = typer.Option(
        ..., "--checkpoint", metavar="FILE|RUN_DIR", help="A step-N.safetensors checkpoint, or a run folder (every step-N.safetensors in it); "
        "repeatable: several give one table side by side."),
    data: Path = typer.Option(..., "--data", help="Dataset folder (metadata.json) whose labels the predictions are "
                              "measured against."),
    split: str = typer.Option("val", "--split", help="Samples to evaluate: val, test, train or all."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Only the first N samples of the split."),
    noise: float = typer.Option(0.05, "--noise", help="Noise level sigma on the latents (timestep = 1000 sigma)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise (and of random clip windows)."),
    fmt: str = typer.Option("table", "--format", "-f", help="Output: table (checkpoints side by side), json "
                            "(eval.json's content) or csv."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write eval.json, eval.csv and "
                                       "metrics_vs_step.png (each metric against the step) to this folder."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    wan_weights: Optional[str] = typer.Option(None, "--wan-weights", help="Wan2.1 weights, where the checkpoint's "
                                              "run config does not name them (or they moved)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
) -> None:
    """Measure checkpoints' geometry against a dataset's labels: depth, point maps, cameras, trajectory.

    Depth AbsRel / delta1 after per-clip median scaling, point-map error after Sim(3), RRA / RTA at
    5/15/30 degrees and AUC@30 over frame pairs, ATE / RPE after Sim(3); averaged over the split's
    samples (chosen as training chooses them). Compare stages with several --checkpoint (or a run
    folder). See docs/INFERENCE.md. Exit codes: 0 evaluated, 2 bad checkpoint, dataset, split or option.
    """
    from fwmodel.evaluate import EvalOptions, evaluate, print_table, write_outputs

    if fmt not in ("table", "json", "csv"):
        fail(f"--format {fmt!r}: choose table, json or csv")
    opts = EvalOptions(checkpoints=list(checkpoint), data=data, split=split, max_samples=max_samples, noise=noise,
                       seed=seed, device=device, wan_weights=wan_weights)
    progress = None if quiet else (lambda line: typer.echo(line, err=True))
    try:
        result = evaluate(opts, progress)
        written = write_outputs(result, out) if out is not None else []
    except _user_errors() as err:
        fail(str(err))
    if fmt == "json":
        typer.echo(result.to_json())
    elif fmt == "csv":
        typer.echo(result.dataframe().to_csv(index=False), nl=False)
    else:
        from rich.console import Console

        print_table(result, Console())
    for path in written:
        if not quiet:
            typer.echo(f"wrote {path}", err=True)


def _session_options(checkpoint: Path, vae: Optional[str], text_encoder: Optional[str], wan_weights: Optional[str],
                     device: str, dtype: Optional[str], offload: bool, vae_tiling: bool, memory_check: bool,
                     image_encoder: Optional[str] = None):
    from fwmodel.generate import SessionOptions

    return SessionOptions(checkpoint=checkpoint, vae=vae, text_encoder=text_encoder, wan_weights=wan_weights,
                          device=device, dtype=dtype, offload=offload, vae_tiling=vae_tiling,
                          memory_check=memory_check, image_encoder=image_encoder)


def _run_inference(fn, opts, ctx: typer.Context, quiet: bool):
    """Run generate / reconstruct with the commands' error handling: known problems are one line (exit 2)."""
    import shlex
    import sys

    from fwdata.dataset.store import DatasetBusy

    given = sys.argv[2:] if sys.argv[1:2] == [ctx.info_name] else []  # empty when called in-process (tests)
    command = shlex.join(["fwmodel", ctx.info_name, *given])
    echo = (lambda line: None) if quiet else (lambda line: typer.echo(line, err=True))
    try:
        return fn(opts, command=command, echo=echo)
    except (*_user_errors(), DatasetBusy) as err:
        fail(str(err))
    except OSError as err:  # the output folder: exists as a file, not writable, disk full
        fail(str(err) if not err.strerror else f"{err.filename or ''}: {err.strerror}".lstrip(": "))


_CKPT_HELP = ("A step-N.safetensors checkpoint of `fwmodel train` (with its .json sidecar), or the released "
              "FantasyWorld weights (release-layout .safetensors, or `fwmodel convert-release` of model.pth).")
_VAE_HELP = ("Wan VAE: the Wan2.1 diffusers repository or its vae/ folder, or random-tiny (tests); default: the run's "
             "model.vae or the encoder its latent cache recorded.")
_TEXT_HELP = ("UMT5 text encoder: the Wan2.1 repository or its text_encoder/ folder, or random-tiny (tests); default: "
              "the run's model.text_encoder or the one its latent cache recorded.")
_IMAGE_ENCODER_HELP = ("I2V checkpoints: the CLIP image encoder, the Wan2.1 I2V diffusers repository or its "
                       "image_encoder/ folder, or random-tiny (tests); default: the run's, or the --vae repository "
                       "when it holds image_encoder/.")
_WAN_HELP = "Wan2.1 backbone weights; default: the ones the checkpoint's sidecar names (the run's model.wan_weights)."
_DTYPE_HELP = "Weights and compute: bf16 or fp32. Default bf16 on a GPU, fp32 on the CPU."
_OFFLOAD_HELP = ("Keep the text encoder, the model and the VAE on the CPU except while each runs (model CPU offload: "
                 "slower, less GPU memory).")
_TILING_HELP = "Decode the video in tiles (VAE tiling) when the VAE supports it: less memory for large frames."
_POINTS_HELP = ("What points/<id>.npz holds: depth (the predicted depth unprojected with the predicted cameras, "
                "consistent for `fwdata validate`) or head (the point head's own map).")
_MEMCHECK_HELP = "Refuse, before loading, when the memory estimate exceeds the GPU (--no-memory-check: try anyway)."


@app.command()
def generate(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., "--checkpoint", help=_CKPT_HELP + " Must be Stage 2 (camera adapters)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: a dataset in the contract (videos/, depth/, "
                             "points/, camera_params/ = predicted cameras, requested_cameras/, metadata.json)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What to generate (or --batch)."),
    batch: Optional[Path] = typer.Option(
        None, "--batch", help="Many clips with one model load: a text file with one prompt per line, or a .jsonl of "
        "{\"prompt\", \"negative_prompt\", \"image\", \"trajectory\", \"seed\"} objects (missing keys: the options)."),
    image: Optional[str] = typer.Option(None, "--image", help="First frame (image-to-video: a PNG or JPEG, resized "
                                        "to cover the clip and centre-cropped); needed by an I2V checkpoint, refused "
                                        "by a T2V one."),
    trajectory: str = typer.Option(
        "orbit", "--trajectory", "-t", help="Camera path: orbit, forward, pan, zoom, static; a camera file "
        "(camera_params/<id>.json, or a RealEstate10K 19-number .txt); or DATASET:ID (a sample's cameras)."),
    trajectory_scale: float = typer.Option(1.0, "--trajectory-scale", help="Size of the path in scene units (the "
                                           "scene is ~1 unit away): orbit radius, forward distance x 0.5, zoom "
                                           "factor - 1; multiplies a file's translations."),
    trajectory_speed: float = typer.Option(1.0, "--trajectory-speed", help="How far along the preset path the clip "
                                           "goes: orbit 90 deg, pan 30 deg, forward 0.5 units at 1; negative: the "
                                           "other way."),
    fov: Optional[float] = typer.Option(None, "--fov", help="Horizontal field of view in degrees (default 60 for the "
                                        "presets; replaces a file's intrinsics when given)."),
    frames: Optional[int] = typer.Option(None, "--frames", help="T = 4k+1 frames (default: the run's data.num_frames, "
                                         "e.g. 81)."),
    height: Optional[int] = typer.Option(None, "--height", help="H, a multiple of 16 (default: the run's, e.g. 336)."),
    width: Optional[int] = typer.Option(None, "--width", help="W, a multiple of 16 (default: the run's, e.g. 592)."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(5.0, "--guidance", help="Classifier-free guidance scale (<= 1: no negative pass)."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Prompt to steer away from (the guidance's "
                                        "unconditional pass)."),
    seed: int = typer.Option(42, "--seed", help="Seed of the initial noise: the same seed and inputs give the same "
                             "bytes."),
    sampler: str = typer.Option("unipc", "--sampler", help="diffusers scheduler: unipc (WanPipeline's "
                                "UniPCMultistepScheduler, flow prediction) or euler "
                                "(FlowMatchEulerDiscreteScheduler)."),
    vae: Optional[str] = typer.Option(None, "--vae", help=_VAE_HELP),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help=_TEXT_HELP),
    image_encoder: Optional[str] = typer.Option(None, "--image-encoder", help=_IMAGE_ENCODER_HELP),
    wan_weights: Optional[str] = typer.Option(None, "--wan-weights", help=_WAN_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=_DTYPE_HELP),
    offload: bool = typer.Option(False, "--offload", help=_OFFLOAD_HELP),
    vae_tiling: bool = typer.Option(True, "--vae-tiling/--no-vae-tiling", help=_TILING_HELP),
    memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check", help=_MEMCHECK_HELP),
    points: str = typer.Option("depth", "--points", help=_POINTS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines; only the summary line and errors."),
) -> None:
    """Generate videos along a camera trajectory with a Stage-2 checkpoint, with the predicted geometry.

    Writes a dataset in the contract (`fwdata validate`, `fwdata report` read it): the clip, the
    predicted depth, points (+ fused .ply) and cameras, the requested cameras, and provenance.
    Same seed and inputs -> the same bytes. See docs/INFERENCE.md. Exit 2: bad checkpoint, option,
    trajectory or batch file (one line).
    """
    from fwmodel.generate import GenerateOptions, Request, generate as run_generate, read_batch

    if (prompt is None) == (batch is None):
        fail("give exactly one of --prompt and --batch")
    defaults = Request(prompt or "", negative_prompt, trajectory, seed, image)
    try:
        requests = read_batch(batch, defaults) if batch is not None else [defaults]
    except _user_errors() as err:
        fail(str(err))
    opts = GenerateOptions(
        session=_session_options(checkpoint, vae, text_encoder, wan_weights, device, dtype, offload, vae_tiling,
                                 memory_check, image_encoder),
        out=out, frames=frames, height=height, width=width, steps=steps, guidance=guidance, sampler=sampler,
        trajectory_scale=trajectory_scale, trajectory_speed=trajectory_speed, fov=fov, points=points,
        requests=requests)
    meta = _run_inference(run_generate, opts, ctx, quiet)
    typer.echo(f"generated {len(requests)} clip(s) into {out} ({meta.statistics.num_samples} samples in the dataset)")


@app.command()
def reconstruct(
    ctx: typer.Context,
    videos: list[Path] = typer.Argument(..., help="Video files: one clip of each (from --start)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help=_CKPT_HELP + " Stage 1 or Stage 2."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: a dataset in the contract (depth, points, "
                             "predicted cameras, the clip as the model saw it)."),
    frames: Optional[int] = typer.Option(None, "--frames", help="T = 4k+1 (default: the run's data.num_frames)."),
    height: Optional[int] = typer.Option(None, "--height", help="H, a multiple of 16 (default: the run's)."),
    width: Optional[int] = typer.Option(None, "--width", help="W, a multiple of 16 (default: the run's)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Source frames between clip frames (default: the "
                                         "run's data.frame_stride)."),
    start: int = typer.Option(0, "--start", help="First source frame of the clip."),
    noise: float = typer.Option(0.05, "--noise", help="Noise level sigma of the VAE latents (timestep = 1000 sigma)."),
    seed: int = typer.Option(0, "--seed", help="Seed of that noise."),
    prompt: str = typer.Option("", "--prompt", help="Text condition (default empty)."),
    vae: Optional[str] = typer.Option(None, "--vae", help=_VAE_HELP),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help=_TEXT_HELP),
    image_encoder: Optional[str] = typer.Option(None, "--image-encoder", help=_IMAGE_ENCODER_HELP),
    wan_weights: Optional[str] = typer.Option(None, "--wan-weights", help=_WAN_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=_DTYPE_HELP),
    offload: bool = typer.Option(False, "--offload", help=_OFFLOAD_HELP),
    vae_tiling: bool = typer.Option(True, "--vae-tiling/--no-vae-tiling", help=_TILING_HELP),
    memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check", help=_MEMCHECK_HELP),
    points: str = typer.Option("depth", "--points", help=_POINTS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines; only the summary line and errors."),
) -> None:
    """Run a checkpoint's geometry branch on real videos: depth, points and cameras as a dataset.

    The sample ids are those `fwdata build` gives the same clips, so the outputs can be measured
    against a build of the same videos. See docs/INFERENCE.md. Exit 2: bad checkpoint, video or option.
    """
    from fwmodel.reconstruct import ReconstructOptions, reconstruct as run_reconstruct

    opts = ReconstructOptions(
        session=_session_options(checkpoint, vae, text_encoder, wan_weights, device, dtype, offload, vae_tiling,
                                 memory_check, image_encoder),
        videos=list(videos), out=out, frames=frames, height=height, width=width, stride=stride, start=start,
        noise=noise, prompt=prompt, seed=seed, points=points)
    meta = _run_inference(run_reconstruct, opts, ctx, quiet)
    typer.echo(f"reconstructed {len(videos)} video(s) into {out} ({meta.statistics.num_samples} samples)")


# every command's help reflowed to the terminal (after the last command; cli_common.reflow_help)
reflow_help(app)


if __name__ == "__main__":  # pragma: no cover  (torchrun -m fwmodel.cli train ...)
    app()
