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
    from fwmodel.memory import MemoryPreflightError
    from fwmodel.train import ConfigError, ResumeError

    return (BackboneWeightsError, CheckpointError, DataError, MemoryPreflightError, ConfigError, ResumeError)


def _stage_config(config: Optional[Path], stage: int):
    """Check --stage against the config file's train.stage (a Stage-1 recipe run as Stage 2 is a mistake)."""
    import tomllib

    from fwmodel.train import ConfigError, resolve_recipe

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
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder (metadata.json); sets data.root."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Output folder (default outputs/fantasy_world_stage<N>)."
    ),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", envvar="STAGE1_CHECKPOINT",
        help="Stage 2: the Stage-1 checkpoint to start from (or env STAGE1_CHECKPOINT).",
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
    from fwmodel.train import TrainingAborted, load_config
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
    dataset: Path = typer.Argument(..., help="Dataset folder (metadata.json)."),
    vae: Path = typer.Option(
        ..., "--vae", help="Wan VAE: the Wan2.1 diffusers repository or its vae/ folder; `random-tiny`: a tiny "
        "randomly initialised VAE built in memory (seeded, no download; tests and demos, marked random_init)."
    ),
    text_encoder: Path = typer.Option(
        ..., "--text-encoder", help="UMT5: the Wan2.1 diffusers repository or its text_encoder/ folder; "
        "`random-tiny`: a tiny random UMT5 as wide as the recipe's preset (tests and demos, marked random_init)."
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
    """
    import torch

    from fwmodel.cache import CacheOptions, build_cache, is_random_encoder
    from fwmodel.config import get_preset
    from fwmodel.progress import StepProgress, cache_summary, choose_mode
    from fwmodel.train import load_config

    sets = {"data.num_frames": frames, "data.height": height, "data.width": width, "data.frame_stride": stride,
            "data.split": split, "data.prompt": prompt}
    if include_gated_out:
        sets["data.include_gated_out"] = True
    user_errors = _user_errors()
    try:
        cfg = load_config(config, sets)
        if dtype == "auto":
            dtype = "bfloat16" if (device != "cpu" and torch.cuda.is_available()) else "float32"
        if dtype not in ("float32", "bfloat16"):
            fail(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
        opts = CacheOptions(dataset=dataset, vae=vae, text_encoder=text_encoder, data=cfg.data, captions=captions,
                            device=device, encoder_dtype=dtype, text_dim=get_preset(cfg.model.preset).wan.text_dim)

        meter = StepProgress("caching", 0, "sample", choose_mode(quiet), echo=typer.echo)
        try:
            directory = build_cache(opts, meter.item_callback())
        finally:
            meter.close()
    except user_errors as err:
        fail(str(err))
    typer.echo(f"latent cache ready: {directory} ({cache_summary(meter)})")  # also with --quiet: the one line
    if is_random_encoder(vae) or is_random_encoder(text_encoder):
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
) -> None:
    """Time real training steps with synthetic inputs: step time, tokens/s, TFLOP/s, MFU, peak memory."""
    from fwmodel.bench import render, run_bench
    from fwmodel.config import PRESET_NAMES

    if preset not in PRESET_NAMES:
        fail(f"unknown preset {preset!r}; choose one of: {', '.join(PRESET_NAMES)}")
    if stage not in (1, 2) or mixed_precision not in ("bf16", "no") or format not in ("table", "json"):
        fail("--stage must be 1 or 2, --mixed-precision bf16 or no, --format table or json")
    try:
        result = run_bench(preset, stage, batch_size, frames, height, width, steps, warmup, not no_checkpointing,
                           mixed_precision, device, peak_tflops, not no_flops,
                           echo=(lambda s: None) if format == "json" else typer.echo)
    except ValueError as err:
        fail(str(err))
    typer.echo(result.model_dump_json(indent=2) if format == "json" else render(result))


@app.command()
def recipes() -> None:
    """List the packaged training recipes, one line each.

    Use one by name (`fwmodel train --config tiny-stage1`), or copy one (its folder is printed) to
    start your own: a path to any TOML file works as well.
    """
    from fwdata.presets import listing
    from fwmodel.recipes import RECIPES

    typer.echo("\n".join(listing(RECIPES, "fwmodel train --config NAME")))


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


# every command's help reflowed to the terminal (after the last command; cli_common.reflow_help)
reflow_help(app)


if __name__ == "__main__":  # pragma: no cover  (torchrun -m fwmodel.cli train ...)
    app()
