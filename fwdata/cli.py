"""`fwdata` command line. Commands are thin: they parse options and call library functions."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from fwdata.cli_common import EXIT_USAGE, fail, version_callback
from fwdata.dataset.contract import ContractError, export_schemas, json_schemas, load_metadata

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
    flags = {"k1": k1, "k2": k2, "p1": p1, "p2": p2, "noise_std": noise, "blur_shutter": blur,
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
    except ValueError as e:
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
    as_json: bool = typer.Option(False, "--json", help="Print the per-sample table as JSON lines."),
) -> None:
    """Show a dataset's structure: folders, samples with their size and quality, failures, splits."""
    from fwdata.dataset.contract import METADATA_FILE
    from fwdata.dataset.layout import MARKER_DIR

    if not (dataset / METADATA_FILE).exists() and (dataset / MARKER_DIR).is_dir():
        done = sum(1 for _ in (dataset / MARKER_DIR).glob("*.json"))
        fail(f"{dataset} is an unfinished build ({done} clips finished, no {METADATA_FILE} yet): run the same "
             f"`fwdata build ... --out {dataset}` command again to finish it")
    try:
        meta = load_metadata(dataset)
    except ContractError as e:
        fail(str(e))
    df = meta.to_frame()
    if as_json:
        typer.echo(df.to_json(orient="records", lines=True))
        return
    print_dataset_summary(dataset, meta)


def print_dataset_summary(dataset: Path, meta) -> None:
    from fwdata.dataset.layout import dataset_dirs

    df = meta.to_frame()
    folders = ", ".join(f"{d.name}/ ({sum(1 for _ in d.iterdir()) if d.is_dir() else 0} files)"
                        for d in dataset_dirs(dataset))
    console.print(f"[bold]{dataset}[/]  schema {meta.schema_version}  made by {meta.provenance.tool} "
                  f"{meta.provenance.tool_version} ({meta.provenance.command})")
    console.print(folders)
    table = Table(show_lines=False)
    cols = ["id", "split", "status", "T", "H", "W", "fps", "scale"]
    quality = [c for c in ("registered_ratio", "depth_sfm_absrel", "multiview_consistency", "path_length")
               if c in df and df[c].notna().any()]
    for c in cols + quality:
        table.add_column(c)
    for _, row in df.iterrows():
        table.add_row(*[f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols + quality])
    console.print(table)
    st = meta.statistics
    console.print(f"{st.num_samples} samples ({st.num_ok} ok, {st.num_gated_out} gated out), "
                  f"{st.total_frames} frames, {st.duration_s:.1f} s of video; {st.num_failed_inputs} failed inputs; "
                  f"splits: " + ", ".join(f"{k}={len(v)}" for k, v in meta.splits.items()))
    for f in meta.failures:
        console.print(f"  failed: {f.source} [{f.stage}] {f.reason}", highlight=False)


# --------------------------------------------------------------------------- validate


@app.command()
def validate(
    # paths as text, checked by validate itself: a NUL byte or an over-long path is a one-line error
    dataset: str = typer.Argument(..., metavar="DATASET", help="Dataset folder (holds metadata.json)."),
    gates: Optional[str] = typer.Option(None, "--gates", "-g", metavar="<path>",
                                        help="Gate TOML file, e.g. pipelines/gates/strict.toml "
                                             "(default: built-in = pipelines/gates/default.toml)."),
    fmt: str = typer.Option("table", "--format", "-f", help="Report format: table, json or junit."),
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="<path>",
                                         help="Write the report here instead of stdout."),
    workers: int = typer.Option(1, "--workers", "-j", min=0, help="Processes checking samples in parallel "
                                                                  "(0: in this process, no crash isolation)."),
    sample: Optional[List[str]] = typer.Option(None, "--sample", "-s", help="Check only this sample id (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; print only the summary line."),
) -> None:
    """Check a dataset: schema, file integrity, cross-consistency and quality gates. Never modifies it.

    Exit codes: 0 pass, 1 a check or gate failed, 2 bad options or unreadable dataset. See docs/VALIDATE.md.
    """
    from fwdata.validate.report import ReportFormat, validate_and_report
    from fwdata.validate import UsageError, ValidateOptions, check_path_option

    if fmt not in {f.value for f in ReportFormat}:
        fail(f"--format {fmt!r}: choose table, json or junit")
    try:
        for what, path in (("dataset folder", dataset), ("gate file", gates), ("--output", output)):
            if path is not None:
                check_path_option(what, path)
        code = validate_and_report(ValidateOptions(dataset=Path(dataset), gates=Path(gates) if gates else None,
                                                   workers=workers, samples=sample or []),
                                   ReportFormat(fmt), output=Path(output) if output else None, quiet=quiet,
                                   console=console)
    except UsageError as e:
        fail(str(e))
    raise typer.Exit(code)


# --------------------------------------------------------------------------- compare


@app.command()
def compare(
    dataset: Path = typer.Argument(..., help="Built dataset folder (holds metadata.json)."),
    truth: Path = typer.Option(..., "--truth", "-t", help="Ground-truth dataset of the same videos, e.g. from "
                                                          "`fwdata synth`."),
    fmt: str = typer.Option("table", "--format", "-f", help="Output format: table, json (records) or csv."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the result here instead of stdout."),
) -> None:
    """Measure a built dataset against ground truth: trajectory error, focal error, depth and point-map error.

    Samples are matched by source video name and frames by source frame index; see docs/BUILD.md
    ("Accuracy"). Percent columns are percentages. Never modifies either dataset. Exit codes: 0
    compared, 2 unreadable dataset or no sample in common.
    """
    import pandas as pd

    from fwdata.cli_common import err_console
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
    else:  # pandas' own layout: never squeezed to the terminal width, easy to paste into notes
        numeric = df.drop(columns=["sample", "truth", "note"]).apply(pd.to_numeric, errors="coerce")
        text = df.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3g}") + "\nmean: " + ", ".join(
            f"{c} {numeric[c].mean():.3g}" for c in numeric.columns if numeric[c].notna().any())
    if output is not None:
        output.write_text(text + "\n")
    else:
        typer.echo(text)
    for sid in unmatched:
        err_console.print(f"no truth sample for {sid} (matched by source video name)", highlight=False)


# --------------------------------------------------------------------------- build


@app.command()
def build(
    videos: List[Path] = typer.Argument(..., help="Video files or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write (created; finished clips are kept)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Build preset: a TOML file or a name in "
                                                                      "pipelines/build/ (default: default)."),
    depth_model: Optional[str] = typer.Option(None, help="Depth model: hub id, local dir, or 'random-tiny'."),
    depth_prior: Optional[Path] = typer.Option(None, help="Import depth from this folder instead (see docs/BUILD.md)."),
    intrinsics: Optional[str] = typer.Option(None, help="Known intrinsics 'fx,fy,cx,cy' in source-video pixels, "
                                                        "optionally with OpenCV distortion ',k1', ',k1,k2' or "
                                                        "',k1,k2,p1,p2' (the clips are undistorted to pinhole)."),
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
        distortion=dist)
    raise typer.Exit(run_build_command(videos, out, config, overrides, force, quiet, console, err_console))


# --------------------------------------------------------------------------- doctor


@app.command()
def doctor(
    videos: Optional[List[Path]] = typer.Argument(None, help="Input videos or folders, to estimate the disk needed."),
    out: Path = typer.Option(Path("dataset"), "--out", help="Where the dataset will be written."),
    depth_model: str = typer.Option("depth-anything/Depth-Anything-V2-Small-hf", help="Hub id or local directory."),
    frames: int = typer.Option(81, help="Frames per clip (for the disk estimate)."),
    height: int = typer.Option(336, help="Clip height (for the disk estimate)."),
    width: int = typer.Option(592, help="Clip width (for the disk estimate)."),
    need_gpu: bool = typer.Option(False, "--need-gpu", help="Treat a missing GPU as a problem."),
) -> None:
    """Check torch, GPUs, free disk against what the build will write, packages and the depth model.

    Exits 1 with one line per problem when something required is missing.
    """
    from fwdata.doctor import DoctorOptions, estimate_dataset_bytes, run_doctor

    files = list(_video_files(videos or []))
    needed, clips = estimate_dataset_bytes(files, frames, height, width) if files else (0, 0)
    notes = [f"estimate: {len(files)} videos -> about {clips} clips of {frames}x{height}x{width}"] if files else []
    opts = DoctorOptions(path=out, required_free_bytes=needed, need_gpu=need_gpu, depth_model=depth_model,
                         purpose="build", notes=notes)
    raise typer.Exit(run_doctor(opts, console))


VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}


def _video_files(paths: List[Path]):
    for p in paths:
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.suffix.lower() in VIDEO_SUFFIXES)
        elif p.exists():
            yield p
        else:
            fail(f"{p} does not exist")


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


if __name__ == "__main__":  # pragma: no cover
    app()
