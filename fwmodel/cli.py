"""`fwmodel` command line: environment check, model verification, training, the end-to-end demo."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from fwdata import __version__
from fwdata.cli_common import fail, version_callback

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

    if config is None or not config.is_file():
        return
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
        None, "--config", "-c", help="Training recipe TOML, e.g. pipelines/train/stage1.toml."
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
    resume_step: Optional[int] = typer.Option(None, "--resume-step", help="With --resume: continue from step N."),
    allow_missing_sidecar: bool = typer.Option(
        False, "--allow-missing-sidecar",
        help="Load --init-from (or the resumed weights) without its .json sidecar: no size or sha256 check "
        "(logs a warning). Without this flag a checkpoint with no sidecar is refused.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="A few steps on one sample: shapes, memory, step time; writes nothing."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on the console (train.log has everything)."),
) -> None:
    """Train Stage 1 or Stage 2 on a dataset in our contract (one GPU, or many with torchrun).

    Exit codes: 0 finished, 1 aborted (too many non-finite steps), 2 bad config, data, weights or
    checkpoint (nothing trained), 130 Ctrl-C / 143 SIGTERM (the last saved state and the --resume
    command are printed and written to train.log). See docs/TRAINING.md.
    """
    from fwdata.runtime import Terminated, sigterm_as_interrupt
    from fwmodel.train import TrainingAborted, load_config
    from fwmodel.train import train as run_train

    if stage not in (1, 2):
        fail(f"--stage must be 1 or 2, got {stage}")
    _stage_config(config, stage)
    overrides = {
        "train.stage": stage, "data.root": data, "train.output": output, "model.init_from": init_from,
        "model.wan_weights": weights, "model.preset": preset, "train.num_steps": steps,
        "train.batch_size": batch_size, "train.grad_accum": grad_accum, "optim.lr": lr, "train.threads": threads,
    }
    user_errors = _user_errors()
    try:
        cfg = load_config(config, {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()}, set_)
        with sigterm_as_interrupt():
            run_train(cfg, resume=resume or resume_step is not None, resume_step=resume_step, dry_run=dry_run,
                      quiet=quiet, echo=typer.echo, allow_missing_sidecar=allow_missing_sidecar,
                      command=_command_line(ctx, cfg.output_dir()), echo_err=lambda m: typer.echo(m, err=True))
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
        None, "--config", "-c", help="Take frames, size, stride, window, split from this training recipe."
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
    quiet: bool = typer.Option(False, "--quiet", "-q"),
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

        def progress(sample_id: str, n: int, total: int) -> None:
            if not quiet:
                typer.echo(f"  [{n}/{total}] {sample_id}")

        directory = build_cache(opts, progress)
    except user_errors as err:
        fail(str(err))
    if not quiet:
        typer.echo(f"latent cache ready: {directory}")
    if is_random_encoder(vae) or is_random_encoder(text_encoder):
        typer.echo("warning: made with randomly initialised encoders (marked random_init in cache.json): the latents "
                   "and text embeddings mean nothing; for tests and demos only (training refuses it unless "
                   "data.allow_random_init_labels = true)", err=True)


@app.command()
def bench(
    preset: str = typer.Option("wan2.1-t2v-1.3b", "--preset", help="Model preset."),
    stage: int = typer.Option(1, "--stage", help="1 or 2."),
    batch_size: int = typer.Option(1, "--batch-size"),
    frames: int = typer.Option(81, "--frames", help="T = 4k+1."),
    height: int = typer.Option(336, "--height"),
    width: int = typer.Option(592, "--width"),
    steps: int = typer.Option(5, "--steps", help="Timed steps."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed steps first."),
    no_checkpointing: bool = typer.Option(False, "--no-checkpointing", help="Turn gradient checkpointing off."),
    mixed_precision: str = typer.Option("bf16", "--mixed-precision", help="bf16 or no."),
    device: str = typer.Option("auto", "--device"),
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
def demo(
    out: Path = typer.Argument(Path("demo_out"), help="Folder for the demo's outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """The main job end to end: render clips with ground truth, build a dataset from their videos, validate it, train.

    Runs offline: depth comes from `random-tiny` (a randomly initialised Depth Anything, so its depth
    is not real and validation flags it) and training uses a tiny random Wan. What `make demo` runs.
    """
    from fwdata.build.cli import run_demo_build
    from fwdata.cli import console, print_dataset_summary
    from fwdata.compare import compare_datasets
    from fwdata.dataset.contract import ContractError, load_metadata
    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset
    from fwdata.validate import ValidateOptions
    from fwdata.validate.report import ReportFormat, validate_and_report
    from fwmodel.demo import run_training_demo

    console.print("[bold]1/4 render[/]: 4 synthetic clips with ground truth (orbit, forward, pan, rotate)")
    gt = out / "synthetic"
    write_synthetic_dataset(gt, SynthOptions(num_scenes=4, num_frames=33, height=192, width=336),
                            progress=None if quiet else (lambda sid: console.print(f"  {sid}")))
    try:
        print_dataset_summary(gt, load_metadata(gt))
    except ContractError as e:
        fail(str(e), code=1)

    console.print("[bold]2/4 build[/]: fwdata build on the rendered videos (depth model random-tiny)")
    dataset = out / "dataset"
    built = run_demo_build(gt / "videos", dataset, console, quiet=quiet)
    if not built.metadata.samples:
        fail("the demo build produced no sample", code=1)

    accuracy, _ = compare_datasets(dataset, gt)
    console.print("  cameras against the ground truth (`fwdata compare`; the depth is random here, so only cameras):")
    console.print(accuracy[["truth", "frames", "registered_pct", "ate_pct", "focal_err_pct", "note"]].to_string(
        index=False, na_rep="-", float_format=lambda v: f"{v:.3g}"), markup=False, highlight=False, soft_wrap=True)

    console.print("[bold]3/4 validate[/]: fwdata validate on the built dataset (default gates)")
    code = validate_and_report(ValidateOptions(dataset=dataset, workers=0), ReportFormat.table, quiet=quiet,
                               console=console)
    if code == 2:
        fail("the built dataset could not be read by validation", code=1)
    if code == 1:
        console.print("  (expected here: the gate refuses depth from a randomly initialised model; "
                      "build with a real --depth-model to pass)")

    console.print("[bold]4/4 train[/]: tiny Stage 1, then Stage 2 from its checkpoint (random tiny Wan; see docs/TRAINING.md)")
    trained = run_training_demo(out, echo=lambda m: console.print(m, markup=False, highlight=False), quiet=quiet)
    console.print(f"[green]demo finished[/]: ground truth at {gt}, built dataset at {dataset} "
                  f"(validation exit {code}); Stage-1 weights {trained['stage1']}, Stage-2 weights {trained['stage2']}")


if __name__ == "__main__":  # pragma: no cover  (torchrun -m fwmodel.cli train ...)
    app()
