"""`fwdata` command line. Commands are thin: they parse options and call library functions."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from fwdata.cli_common import fail, reflow_help, version_callback
from fwdata.dataset.contract import ContractError, export_schemas, json_schemas, load_metadata
from fwdata.textout import plural

app = typer.Typer(
    name="fwdata",
    help="Turn raw videos into geometry-labelled training data (depth, point maps, cameras) and check it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
schema_app = typer.Typer(help="JSON Schemas of the dataset contract.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")
console = Console()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Raw videos in; depth maps, point maps, cameras and metadata.json out."""


# --------------------------------------------------------------------------- synth


#: the help section of `fwdata synth` that lists the camera effects
EFFECTS_PANEL = "Camera effects (off by default; docs/SYNTH.md)"


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Dataset folder to write (created if missing)."),
    scenes: int = typer.Option(4, "--scenes", "-n", help="Number of clips (one scene each)."),
    frames: int = typer.Option(49, help="Frames per clip, 4k+1."),
    height: int = typer.Option(192, help="Frame height in pixels, a multiple of 16."),
    width: int = typer.Option(336, help="Frame width in pixels, a multiple of 16."),
    fov: float = typer.Option(60.0, help="Horizontal field of view, degrees."),
    fps: float = typer.Option(16.0, help="Frame rate of the written videos."),
    seed: int = typer.Option(0, help="Seed of the first scene; scene i uses seed + i."),
    paths: Optional[str] = typer.Option(None, help="Camera path kinds, cycled over the scenes (orbit, forward, pan, "
                                                   "rotate, spin) [default: orbit,forward,pan,rotate; the preset's "
                                                   "with --preset]."),
    no_ply: bool = typer.Option(False, "--no-ply", help="Skip the fused .ply clouds (faster)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Camera effects preset: 'realistic' (lens distortion, "
                                                                "noise, motion blur, exposure/white-balance drift, "
                                                                "H.264, keyframe steps, low-texture walls, a moving "
                                                                "sphere; every path kind). Flags below override it.",
                                         rich_help_panel=EFFECTS_PANEL),
    k1: Optional[float] = typer.Option(None, "--k1", help="Radial distortion k1 (OpenCV), about -0.35..0.15.",
                                       rich_help_panel=EFFECTS_PANEL),
    k2: Optional[float] = typer.Option(None, "--k2", help="Radial distortion k2.",
                                       rich_help_panel=EFFECTS_PANEL),
    p1: Optional[float] = typer.Option(None, "--p1", help="Tangential distortion p1.",
                                       rich_help_panel=EFFECTS_PANEL),
    p2: Optional[float] = typer.Option(None, "--p2", help="Tangential distortion p2.",
                                       rich_help_panel=EFFECTS_PANEL),
    k3: Optional[float] = typer.Option(None, "--k3", help="Radial distortion k3 (the r^6 term; COLMAP's FULL_OPENCV).",
                                       rich_help_panel=EFFECTS_PANEL),
    noise: Optional[float] = typer.Option(None, "--noise", help="Gaussian sensor noise std, 8-bit levels.",
                                          rich_help_panel=EFFECTS_PANEL),
    blur: Optional[float] = typer.Option(None, "--blur", help="Motion blur: shutter open for this fraction of the "
                                                              "frame interval (0..1).",
                                         rich_help_panel=EFFECTS_PANEL),
    exposure_drift: Optional[float] = typer.Option(None, "--exposure-drift", help="Exposure change over the clip, "
                                                                                  "stops.",
                                                   rich_help_panel=EFFECTS_PANEL),
    wb_drift: Optional[float] = typer.Option(None, "--wb-drift", help="White-balance drift over the clip, stops.",
                                             rich_help_panel=EFFECTS_PANEL),
    h264_bpp: Optional[float] = typer.Option(None, "--h264-bpp", help="Re-encode the videos at this many bits per "
                                                                      "pixel per frame (0.2 = about 0.2 Mbit/s at "
                                                                      "192x336, 16 fps).",
                                             rich_help_panel=EFFECTS_PANEL),
    h264_crf: Optional[int] = typer.Option(None, "--h264-crf", help="Re-encode the videos at this x264 CRF instead.",
                                           rich_help_panel=EFFECTS_PANEL),
    keyframe_step: Optional[int] = typer.Option(None, "--keyframe-step", help="Every k-th pose of a k times denser "
                                                                              "path (larger motion per frame).",
                                                rich_help_panel=EFFECTS_PANEL),
    low_texture_walls: Optional[int] = typer.Option(None, "--low-texture-walls", help="Room faces made nearly "
                                                                                      "uniform (0..6).",
                                                    rich_help_panel=EFFECTS_PANEL),
    moving_object: Optional[bool] = typer.Option(None, "--moving-object/--no-moving-object",
                                                 help="A sphere crossing the view (its depth is in the ground truth).",
                                                 rich_help_panel=EFFECTS_PANEL),
) -> None:
    """Render synthetic textured scenes with known cameras and depth, as a ground-truth dataset.

    Writes OUT/videos/*.mp4 plus exact depth, point maps and cameras (metres, frame 0 = world)
    in the dataset contract. Seeded and deterministic; finished clips are skipped on rerun.
    Camera effects (--preset realistic, or one by one) change the videos only: depth, points and
    cameras stay the exact pinhole ground truth, and each record says what was applied.
    """
    from fwdata.dataset.store import check_output_folder
    from fwdata.synth.dataset import SynthOptions, check_options, write_synthetic_dataset
    from fwdata.synth.effects import Effects
    from fwdata.synth.effects import preset as effects_preset
    from fwdata.synth.render import PATH_KINDS

    effects, kinds = Effects(), PATH_KINDS
    if preset is not None:
        try:
            effects, kinds = effects_preset(preset)
        except ValueError as e:
            fail(str(e))
    flags = {"k1": k1, "k2": k2, "p1": p1, "p2": p2, "k3": k3, "noise_std": noise, "blur_shutter": blur,
             "exposure_drift": exposure_drift, "wb_drift": wb_drift, "h264_bpp": h264_bpp, "h264_crf": h264_crf,
             "keyframe_step": keyframe_step, "low_texture_walls": low_texture_walls, "moving_object": moving_object}
    given = {k: v for k, v in flags.items() if v is not None}
    if "h264_crf" in given and "h264_bpp" not in given:
        given["h264_bpp"] = None  # --h264-crf replaces the preset's bitrate
    if "h264_bpp" in given and "h264_crf" not in given:
        given["h264_crf"] = None
    effects = effects.replace(**given)
    path_list = list(kinds) if paths is None else [p.strip() for p in paths.split(",") if p.strip()]
    opts = SynthOptions(num_scenes=scenes, num_frames=frames, height=height, width=width, fov_w_deg=fov, fps=fps,
                        seed=seed, path_kinds=path_list, write_ply=not no_ply, effects=effects)
    try:
        check_options(opts)
        check_output_folder(out)  # before any rendering: OUT an existing file is one line, exit 2
    except (ValueError, OSError) as e:
        fail(str(e))
    from rich.progress import Progress

    with Progress(console=console, disable=quiet, transient=True) as progress:
        task = progress.add_task("rendering", total=scenes)
        meta = write_synthetic_dataset(out, opts, progress=lambda sid: progress.advance(task))
    if not quiet:
        console.print(f"wrote {meta.statistics.num_samples} synthetic clips to {out}")


# --------------------------------------------------------------------------- info


@app.command()
def info(
    dataset: Path = typer.Argument(..., help="Dataset folder (holds metadata.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the samples as JSON Lines: one JSON object per "
                                                       "sample per line, nothing else."),
    wide: bool = typer.Option(False, "--wide", help="Whole sample ids and every column, however wide (default: fit "
                                                    "the terminal, ids shortened to unique prefixes)."),
) -> None:
    """Show a dataset's structure: folders, samples with their size and quality, failures, splits.

    Fits the terminal (80 columns is enough): ids are shortened to unique prefixes, which --sample
    accepts; --wide shows them whole.
    """
    from fwdata.dataset.contract import METADATA_FILE
    from fwdata.dataset.layout import MARKER_DIR

    if not (dataset / METADATA_FILE).exists() and (dataset / MARKER_DIR).is_dir():
        done = sum(1 for _ in (dataset / MARKER_DIR).glob("*.json"))
        fail(f"{dataset} is an unfinished build ({plural(done, 'clip')} finished, no {METADATA_FILE} yet): run the same "
             f"`fwdata build ... --out {dataset}` command again to finish it")
    try:
        meta = load_metadata(dataset)
    except ContractError as e:
        fail(str(e))
    if as_json:
        from fwdata.info import json_lines

        typer.echo(json_lines(meta), nl=False)
        return
    print_dataset_summary(dataset, meta, wide=wide)


def print_dataset_summary(dataset: Path, meta, wide: bool = False) -> None:
    """The human summary of `fwdata info` (fwdata.info.print_summary), fitted to the terminal unless `wide`."""
    from fwdata.info import print_summary

    print_summary(dataset, meta, console, wide=wide)


# --------------------------------------------------------------------------- validate


@app.command()
def validate(
    # paths as text, checked by validate itself: a NUL byte or an over-long path is a one-line error
    dataset: str = typer.Argument(..., metavar="DATASET", help="Dataset folder (holds metadata.json), or a shard "
                                                               "folder of `fwdata shard` (holds shards.json)."),
    gates: Optional[str] = typer.Option(None, "--gates", "-g", metavar="<path>",
                                        help="Gates: a TOML file or a packaged name, e.g. strict "
                                             "(default: the built-in gates = default; `fwdata presets` lists them)."),
    fmt: str = typer.Option("table", "--format", "-f", help="Report format: table, json or junit."),
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="<path>",
                                         help="Write the report (in --format) here instead of stdout; stdout "
                                              "then gets one summary line."),
    workers: int = typer.Option(1, "--workers", "-j", min=0, help="Processes checking samples in parallel "
                                                                  "(0: in this process, no crash isolation)."),
    sample: Optional[List[str]] = typer.Option(None, "--sample", "-s", help="Check only this sample: its id or a unique "
                                                                          "prefix, e.g. as `fwdata info` prints it "
                                                                          "(repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; print only the summary line."),
    allow_random_init: bool = typer.Option(False, "--allow-random-init",
                                           help="Accept data made by randomly initialised models (random-tiny): "
                                                "a warning instead of a failed gate. For tests and demos only."),
    html: Optional[str] = typer.Option(None, "--html", metavar="<dir>",
                                       help="Also write the picture report of `fwdata report` (index.html, contact "
                                            "sheets) into this folder."),
) -> None:
    """Check a dataset: schema, file integrity, cross-consistency and quality gates. Never modifies it.

    On a shard folder (`fwdata shard`) the same per-sample checks run on samples streamed from the tars
    (nothing unpacked), plus the shard checks: index, manifest, checksums, every sample exactly once.

    Exit codes: 0 pass, 1 a check or gate failed, 2 bad options or unreadable dataset. See docs/VALIDATE.md.
    """
    from fwdata.validate.report import ReportFormat, validate_and_report
    from fwdata.validate import UsageError, ValidateOptions, check_path_option

    if fmt not in {f.value for f in ReportFormat}:
        fail(f"--format {fmt!r}: choose table, json or junit")
    try:
        for what, path in (("dataset folder", dataset), ("gate file", gates), ("--output", output), ("--html", html)):
            if path is not None:
                check_path_option(what, path)
        if html is not None:
            from fwdata.shards import is_shard_folder

            if is_shard_folder(dataset):
                fail(f"--html draws a dataset folder; {dataset} is a shard folder (run `fwdata report` on the "
                     f"dataset it was made from)")
        code = validate_and_report(ValidateOptions(dataset=Path(dataset), gates=Path(gates) if gates else None,
                                                   workers=workers, samples=sample or [],
                                                   allow_random_init=allow_random_init),
                                   ReportFormat(fmt), output=Path(output) if output else None, quiet=quiet,
                                   console=console, html=Path(html) if html else None)
    except UsageError as e:
        fail(str(e))
    raise typer.Exit(code)


# --------------------------------------------------------------------------- shard


@app.command()
def shard(
    dataset: Path = typer.Argument(..., help="Dataset folder (holds metadata.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Shard folder to write (created; complete shards of an earlier "
                                                      "run whose samples are unchanged are kept)."),
    samples_per_shard: Optional[int] = typer.Option(None, "--samples-per-shard", "-n", min=1,
                                                    help="Samples per shard."),
    shard_size: Optional[str] = typer.Option(None, "--shard-size", help="Largest shard, e.g. 1GB, 500MB, 2GiB "
                                                                        "(default 1GB unless --samples-per-shard)."),
    split: str = typer.Option("all", "--split", help="Shard only this split: train, val, test or all."),
    no_ply: bool = typer.Option(False, "--no-ply", help="Leave the fused .ply clouds out of the shards."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; print only the summary."),
) -> None:
    """Write a dataset as WebDataset tar shards, a Parquet manifest (one row per sample) and shards.json.

    One WebDataset sample per dataset sample, in metadata order, keyed %08d (its manifest index); its
    members are the dataset's files byte for byte plus record.json. Every file is written atomically,
    shards.json last; the same dataset gives the same bytes. Rerun after the dataset grew: unchanged
    complete shards are kept and new samples go into new shards. See docs/DATA_FORMAT.md, "Shards".

    Exit codes: 0 written, 2 bad options, missing or unreadable dataset, unwritable --out.
    """
    from pydantic import ValidationError

    from fwdata.dataset.store import DatasetBusy
    from fwdata.shards.writer import ShardConfig, ShardError, write_shards

    try:
        cfg = ShardConfig(dataset=dataset, out=out, samples_per_shard=samples_per_shard, shard_size=shard_size,
                          split=split, ply=not no_ply)
    except ValidationError as e:
        err = e.errors()[0]
        where = {"shard_size": "--shard-size", "split": "--split"}.get(str(err["loc"][0]) if err["loc"] else "", "")
        fail(f"{where + ': ' if where else ''}{err['msg']}".replace("Value error, ", ""))
    from rich.progress import Progress

    try:
        with Progress(console=console, disable=quiet, transient=True) as progress:
            task = progress.add_task("sharding", total=None)
            res = write_shards(cfg, progress=lambda name, done, total: progress.update(task, completed=done,
                                                                                       total=total))
    except (ShardError, ContractError, DatasetBusy, OSError) as e:
        fail(str(e))
    index = res.index
    console.print(f"{plural(index.num_samples, 'sample')} in {plural(len(index.shards), 'shard')} at {out} "
                  f"({len(res.written)} written, {len(res.reused)} kept"
                  + (f", {len(res.removed)} removed" if res.removed else "") + ")", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- compare


@app.command()
def compare(
    dataset: Path = typer.Argument(..., help="Built dataset folder (holds metadata.json)."),
    truth: Path = typer.Option(..., "--truth", "-t", help="Ground-truth dataset of the same videos, e.g. from "
                                                          "`fwdata synth`."),
    fmt: str = typer.Option("table", "--format", "-f", help="Output format: table, json (records) or csv."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the result here instead of stdout "
                                                                       "(the table in its --wide form)."),
    wide: bool = typer.Option(False, "--wide", help="Table: whole ids and every column in one table, however wide "
                                                    "(default: fit the terminal, ids shortened to unique prefixes)."),
) -> None:
    """Measure a built dataset against ground truth: trajectory error, focal error, depth and point-map error.

    Samples are matched by source video name and frames by source frame index; see docs/BUILD.md
    ("Accuracy"). Percent columns are percentages. Never modifies either dataset. Exit codes: 0
    compared, 2 unreadable dataset or no sample in common.
    """
    import io

    from rich.console import Console

    from fwdata.cli_common import err_console
    from fwdata.compare_text import print_compare
    from fwdata.compare import CompareError, compare_datasets

    if fmt not in ("table", "json", "csv"):
        fail(f"--format {fmt!r}: choose table, json or csv")
    try:
        df, unmatched = compare_datasets(dataset, truth)
    except CompareError as e:
        fail(str(e))
    if fmt == "json":
        text = df.to_json(orient="records", indent=1)
    elif fmt == "csv":
        text = df.to_csv(index=False)
    elif output is not None:  # a file is not a terminal: every column, whole ids
        buf = io.StringIO()
        print_compare(df, Console(file=buf, color_system=None, width=80), wide=True)
        text = buf.getvalue().rstrip("\n")
    else:
        text = None
        print_compare(df, console, wide=wide)
    if text is not None and output is not None:
        output.write_text(text + "\n")
    elif text is not None:
        typer.echo(text)
    for sid in unmatched:
        err_console.print(f"no truth sample for {sid} (matched by source video name)", highlight=False)


# --------------------------------------------------------------------------- report


@app.command()
def report(
    dataset: Path = typer.Argument(..., help="Dataset folder (holds metadata.json)."),
    truth: Optional[Path] = typer.Option(None, "--truth", "-t", help="Ground-truth dataset of the same videos: adds "
                                                                     "`fwdata compare` and the aligned truth path."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder to write index.html and samples/*.png to."),
    sample: Optional[List[str]] = typer.Option(None, "--sample", "-s", help="Only this sample: its id or a unique prefix, "
                                                                          "e.g. as `fwdata info` prints it "
                                                                          "(repeatable)."),
    gates: Optional[Path] = typer.Option(None, "--gates", "-g", help="Gate TOML file for the validation section."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    """Write a dataset report: one offline HTML page and a PNG contact sheet per sample (docs/REPORT.md).

    Never modifies the dataset. Exit codes: 0 written (whatever it shows), 2 not a dataset, --out is a file.
    """
    from rich.progress import Progress

    from fwdata.cli_common import err_console
    from fwdata.report import ReportError, ReportOptions, write_report

    opts = ReportOptions(dataset=dataset, out=out, truth=truth, samples=sample or [], gates=gates)
    try:
        with Progress(console=err_console, disable=quiet, transient=True) as progress:
            task = progress.add_task("validating, comparing, drawing", total=None)
            res = write_report(opts, progress=lambda sid: progress.advance(task))
    except ReportError as e:
        fail(str(e))
    if not quiet:
        console.print(f"wrote {res.index} ({plural(len(res.sheets), 'contact sheet')})", highlight=False,
                      soft_wrap=True)  # a path stays whole (copyable)


# --------------------------------------------------------------------------- export


@app.command()
def export(
    dataset: Path = typer.Argument(..., help="Dataset folder (holds metadata.json)."),
    fmt: str = typer.Option(..., "--format", "-f", help="colmap, nerfstudio or diffsynth."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write to (outside the dataset)."),
    sample: Optional[List[str]] = typer.Option(None, "--sample", "-s", help="Only this sample, whatever its status: "
                                                                            "its id or a unique prefix, e.g. as "
                                                                            "`fwdata info` prints it (repeatable; "
                                                                            "default: every ok sample)."),
    image_format: str = typer.Option("png", "--image-format", help="colmap, nerfstudio: frames as png or jpg."),
    max_points: int = typer.Option(100_000, "--max-points", help="colmap, nerfstudio: most points of the sparse "
                                                                 "cloud from the depth maps (0: none)."),
    text: bool = typer.Option(False, "--text", help="colmap: write the model as .txt instead of .bin."),
    prompt: str = typer.Option("", "--prompt", help="diffsynth: prompt of every sample without a caption."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="diffsynth: JSON {sample id: caption}."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    """Export a dataset as COLMAP models, nerfstudio transforms.json or a DiffSynth metadata.csv (docs/EXPORT.md).

    Never modifies the dataset; the same dataset gives the same files. Exit codes: 0 written, 1 a
    sample's files could not be read, 2 bad options, not a dataset, unknown --sample, --out a file.
    """
    from fwdata.dataset.video import VideoError
    from fwdata.export import ExportError, export_dataset

    def progress(sample_id: str, n: int, total: int) -> None:
        if not quiet:
            typer.echo(f"  [{n}/{total}] {sample_id}")

    try:
        res = export_dataset(dataset, fmt, out, samples=sample, image_format=image_format, max_points=max_points,
                             text=text, prompt=prompt, captions=captions, progress=progress)
    except ExportError as e:
        fail(str(e))
    except (ContractError, VideoError, OSError) as e:
        fail(str(e), code=1)
    if not quiet:
        what = res.written[0] if fmt == "diffsynth" else res.out
        n, gated = len(res.samples), len(res.skipped_gated_out)
        console.print(f"exported {plural(n, 'sample')} as {fmt} to {what}"
                      + (f" ({plural(gated, 'gated-out sample')} left out; name them with --sample)"
                         if gated else ""), highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- build


@app.command()
def build(
    videos: List[Path] = typer.Argument(..., help="Video files or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write (created; finished clips are kept)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Build preset: a TOML file or a packaged name, "
                                                                      "e.g. fast (default: default; `fwdata presets` "
                                                                      "lists them)."),
    depth_model: Optional[str] = typer.Option(None, help="Depth model: hub id, local dir, or 'random-tiny'."),
    depth_prior: Optional[Path] = typer.Option(None, help="Import depth from this folder instead (see docs/BUILD.md)."),
    intrinsics: Optional[str] = typer.Option(None, help="Known intrinsics 'fx,fy,cx,cy' in source-video pixels, "
                                                        "optionally with OpenCV distortion ',k1', ',k1,k2', "
                                                        "',k1,k2,p1,p2' or ',k1,k2,p1,p2,k3' (the clips are "
                                                        "undistorted to pinhole)."),
    frames: Optional[int] = typer.Option(None, help="Frames per clip, 4k+1."),
    height: Optional[int] = typer.Option(None, help="Clip height, a multiple of 16."),
    width: Optional[int] = typer.Option(None, help="Clip width, a multiple of 16."),
    stride: Optional[int] = typer.Option(None, help="Source frames between clip frames (0: from --fps)."),
    fps: Optional[float] = typer.Option(None, help="Target clip frame rate when stride is 0."),
    max_clips: Optional[int] = typer.Option(None, help="Most clips per video (0: all that fit)."),
    mapper: Optional[str] = typer.Option(None, help="SfM mapper: incremental or global."),
    loop_detection: Optional[bool] = typer.Option(None, "--loop-detection/--no-loop-detection",
                                                  help="Match look-alike keyframes far apart in time."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0,
                                          help="Clips processed at once (processes; 0: one per core). Never changes "
                                               "the results."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="CPU threads per clip (default 1). The results depend on it; 1 gives "
                                               "bit-identical datasets on every run."),
    device: Optional[str] = typer.Option(None, help="Depth model device: auto, cpu, cuda, cuda:1 ..."),
    executor: Optional[str] = typer.Option(None, "--executor", help="Where clips run: local (processes on this "
                                                                    "machine, --workers) or ray (tasks on a Ray "
                                                                    "cluster). Never changes the results."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster for --executor ray: auto, "
                                                                          "HOST:PORT or ray://HOST:PORT (default: "
                                                                          "RAY_ADDRESS, else a local instance)."),
    no_ply: bool = typer.Option(False, "--no-ply", help="Skip the fused .ply clouds."),
    force: bool = typer.Option(False, "--force", help="Redo clips that are already finished."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; print only the summary."),
    verbose: bool = typer.Option(False, "--verbose", help="Show COLMAP's log."),
) -> None:
    """Turn videos into a dataset: clips, depth, cameras, point maps, quality metrics and metadata.json.

    Exit codes: 0 every input succeeded, 1 some inputs or clips failed (the rest is written and listed in
    metadata.json), 2 bad options or preset, missing inputs, or an unavailable depth model. See docs/BUILD.md.
    """
    from fwdata.build.cli import overrides_from_options, parse_intrinsics, run_build_command
    from fwdata.cli_common import err_console

    try:
        k, dist = parse_intrinsics(intrinsics) if intrinsics else (None, None)
    except ValueError as e:
        fail(str(e))
    overrides = overrides_from_options(
        frames=frames, height=height, width=width, stride=stride, fps=fps, max_clips=max_clips, depth_model=depth_model,
        depth_prior=depth_prior, device=device, mapper=mapper, loop_detection=loop_detection, workers=workers,
        threads=threads, write_ply=False if no_ply else None, verbose=True if verbose else None, intrinsics=k,
        distortion=dist, executor=executor, ray_address=ray_address)
    raise typer.Exit(run_build_command(videos, out, config, overrides, force, quiet, console, err_console))


#: `fwdata build` options whose default comes from the preset -> their key in the preset TOML
_BUILD_PRESET_KEYS = {
    "depth_model": "depth.model", "frames": "clips.num_frames", "height": "clips.height", "width": "clips.width",
    "stride": "clips.stride", "fps": "clips.fps", "max_clips": "clips.max_clips_per_video", "mapper": "sfm.mapper",
    "loop_detection": "sfm.loop_detection", "workers": "workers", "threads": "threads", "device": "depth.device",
}


def _show_preset_defaults(command, keys: dict[str, str]) -> None:
    """`--help` shows, for each option left to the preset (default None), what the default preset gives it."""
    import inspect
    import tomllib

    from fwdata.presets import BUILD_PRESETS

    preset = tomllib.loads((BUILD_PRESETS.directory / "default.toml").read_text())
    for name, param in inspect.signature(command).parameters.items():
        if name not in keys:
            continue
        value = preset
        for part in keys[name].split("."):
            value = value[part]
        if isinstance(value, bool):
            value = param.default.param_decls[0].split("/")[0 if value else 1].lstrip("-")
        param.default.show_default = f"{value} in the default preset"


_show_preset_defaults(build, _BUILD_PRESET_KEYS)


# --------------------------------------------------------------------------- doctor


@app.command()
def doctor(
    videos: Optional[List[Path]] = typer.Argument(None, help="Input videos or folders, to estimate the clips and the "
                                                             "disk the build needs."),
    out: Path = typer.Option(Path("dataset"), "--out", help="Where the dataset will be written."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Build preset, as for `fwdata build`: a TOML "
                                                                      "file or a packaged name, e.g. fast "
                                                                      "(default: default)."),
    depth_model: Optional[str] = typer.Option(None, help="Hub id or local directory (default: the preset's)."),
    frames: Optional[int] = typer.Option(None, help="Frames per clip, 4k+1 (default: the preset's)."),
    height: Optional[int] = typer.Option(None, help="Clip height, a multiple of 16 (default: the preset's)."),
    width: Optional[int] = typer.Option(None, help="Clip width, a multiple of 16 (default: the preset's)."),
    stride: Optional[int] = typer.Option(None, help="Source frames between clip frames (0: from --fps)."),
    fps: Optional[float] = typer.Option(None, help="Target clip frame rate when stride is 0."),
    max_clips: Optional[int] = typer.Option(None, help="Most clips per video (0: all that fit)."),
    need_gpu: bool = typer.Option(False, "--need-gpu", help="Treat a missing GPU as a problem."),
) -> None:
    """Check torch, GPUs, free disk against what the build will write, packages and the depth model.

    Takes the build's options (--config and the clip options): the clips of VIDEOS are planned by the
    build's own code, and a video without a clip says why (e.g. too short at the stride its frame rate
    gives). Exits 1 with one line per problem when something required is missing.
    """
    from fwdata.build.cli import overrides_from_options
    from fwdata.build.pipeline import ConfigError, input_videos, load_config
    from fwdata.doctor import DoctorOptions, estimate_dataset_bytes, estimate_notes, run_doctor

    try:
        cfg = load_config(config, overrides_from_options(frames=frames, height=height, width=width, stride=stride,
                                                         fps=fps, max_clips=max_clips, depth_model=depth_model))
    except ConfigError as e:
        fail(str(e))
    files, missing = input_videos(videos or [], exclude=out)
    if missing:
        fail(f"input not found: {', '.join(missing)}")
    checks, notes, needed = [], [], 0
    if videos:
        estimate = estimate_dataset_bytes(files, cfg.clips)
        clips_check, notes = estimate_notes(estimate, cfg.clips)
        checks, needed = [clips_check], estimate.bytes
    opts = DoctorOptions(path=out, required_free_bytes=needed, need_gpu=need_gpu,
                         depth_model=None if cfg.depth.prior_dir else cfg.depth.model, purpose="build", notes=notes,
                         extra_checks=checks)
    raise typer.Exit(run_doctor(opts, console))


# --------------------------------------------------------------------------- presets


@app.command()
def presets() -> None:
    """List the packaged build presets and gate files, one line each.

    Use one by name (`fwdata build --config fast`, `fwdata validate --gates strict`), or copy one (its
    folder is printed) to start your own: a path to any TOML file works as well.
    """
    from fwdata.presets import BUILD_PRESETS, GATE_FILES, listing

    typer.echo("\n".join(listing(BUILD_PRESETS, "fwdata build --config NAME") + [""]
                         + listing(GATE_FILES, "fwdata validate --gates NAME")))


# --------------------------------------------------------------------------- schema


@schema_app.command("export")
def schema_export(directory: Path = typer.Argument(Path("docs/schemas"), help="Folder to write the schemas to.")) -> None:
    """Write the JSON Schemas of metadata.json and the camera files (from the pydantic models)."""
    for p in export_schemas(directory):
        console.print(f"wrote {p}")


@schema_app.command("check")
def schema_check(directory: Path = typer.Argument(Path("docs/schemas"), help="Folder holding exported schemas.")) -> None:
    """Exit 1 when the schemas in DIRECTORY differ from the models (run `fwdata schema export`)."""
    stale = []
    for name, text in json_schemas().items():
        p = directory / name
        if not p.is_file() or p.read_text() != text:
            stale.append(name)
    if stale:
        console.print(f"out of date: {', '.join(stale)}; run `fwdata schema export {directory}`")
        raise typer.Exit(1)
    console.print("schemas are up to date")


# every command's help reflowed to the terminal (after the last command; cli_common.reflow_help)
reflow_help(app)


if __name__ == "__main__":  # pragma: no cover
    app()
