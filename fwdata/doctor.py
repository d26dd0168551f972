"""Environment checks behind `fwdata doctor` and `fwmodel doctor`.

Each check gives one row (name, ok, detail); problems that stop the job are listed after the
table, each a paragraph starting `PROBLEM name:` (wrapped to the terminal, continuation lines
indented by two spaces), and make the command exit 1. Only the generic checks live here (python, torch, GPUs, disk,
packages, depth model); `fwmodel doctor` adds its model-weights check through
`DoctorOptions.extra_checks` (fwdata does not depend on fwmodel).
"""

from __future__ import annotations

import importlib
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from rich.console import Console
from rich.table import Table

from fwdata.textout import paragraph

if TYPE_CHECKING:
    from fwdata.build.clips import ClipOptions

#: packages the product uses, import name -> distribution name
KEY_PACKAGES = {
    "torch": "torch",
    "numpy": "numpy",
    "transformers": "transformers",
    "diffusers": "diffusers",
    "pycolmap": "pycolmap",
    "open3d": "open3d",
    "decord": "decord",
    "av": "av",
    "pandas": "pandas",
    "pydantic": "pydantic",
    "typer": "typer",
    "safetensors": "safetensors",
    "tensorboard": "tensorboard",
    "accelerate": "accelerate",
}

#: bytes per output pixel of one sample: depth f32 + valid + points 3xf16 + valid, before compression,
#: plus ~5% for video, cameras and the fused cloud
BYTES_PER_PIXEL = (4 + 1 + 6 + 1) * 1.05


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


@dataclass
class DoctorOptions:
    path: Path
    required_free_bytes: int = 0
    need_gpu: bool = False
    depth_model: Optional[str] = None
    purpose: str = "build"
    notes: list[str] = field(default_factory=list)
    #: checks made by the caller (e.g. fwmodel's Wan2.1 weights check), shown after the generic ones
    extra_checks: list[Check] = field(default_factory=list)


def package_versions() -> dict[str, str]:
    """Installed versions of the key packages ('missing' when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for mod, dist in KEY_PACKAGES.items():
        try:
            out[mod] = version(dist)
        except PackageNotFoundError:
            out[mod] = "missing"
    return out


def check_packages() -> list[Check]:
    checks = []
    versions = package_versions()
    for mod in KEY_PACKAGES:
        try:
            importlib.import_module(mod)
            checks.append(Check(f"package {mod}", True, versions[mod]))
        except Exception as e:  # ImportError, or OSError for a missing system library
            hint = ""
            if "libusb" in str(e):
                hint = " (install the system library: apt-get install -y libusb-1.0-0)"
            checks.append(Check(f"package {mod}", False, f"cannot import: {str(e).splitlines()[0]}{hint}"))
    return checks


def check_torch(need_gpu: bool) -> list[Check]:
    try:
        import torch
    except Exception as e:
        return [Check("torch", False, f"cannot import torch: {e}")]
    cuda = torch.version.cuda
    build = f"CUDA {cuda}" if cuda else "CPU"
    checks = [Check("torch", True, f"{torch.__version__} ({build} build)")]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        gpus = []
        for i in range(n):
            p = torch.cuda.get_device_properties(i)
            gpus.append(f"{p.name} {p.total_memory / 2**30:.0f} GiB")
        checks.append(Check("gpus", True, f"{n}: " + ", ".join(gpus)))
    else:
        why = "CPU build of torch" if not cuda else "no GPU visible (check CUDA_VISIBLE_DEVICES / drivers)"
        checks.append(Check("gpus", not need_gpu, f"0 ({why})", required=need_gpu))
    return checks


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk(path: Path, required_bytes: int) -> Check:
    free = shutil.disk_usage(_existing_parent(path)).free
    detail = f"{free / 1e9:.1f} GB free at {path}"
    if required_bytes:
        detail += f", about {required_bytes / 1e9:.1f} GB needed"
    return Check("disk", free >= required_bytes, detail)


@dataclass
class BuildEstimate:
    """What building `videos` with some clip options would write: clips, bytes, and why the videos
    without a clip have none (too short at the derived stride, unreadable)."""

    videos: int = 0
    clips: int = 0
    bytes: int = 0
    strides: list[int] = field(default_factory=list)  # the stride of each video with clips
    no_clip: list[tuple[str, str]] = field(default_factory=list)  # (video, reason)


def estimate_dataset_bytes(videos: Sequence[Path], clips: "ClipOptions") -> BuildEstimate:
    """The clips and bytes of building a dataset from `videos` with the clip options `clips`.

    The clips are planned by the build's own code (`fwdata.build.clips.schedule_clips`: the stride
    from the frame rate, the clip span, gaps, the most clips per video, portrait sizes), from a probe
    of each file; nothing is decoded. Each clip becomes one sample of T x H x W pixels.
    """
    from fwdata.build.clips import probe_for_plan, schedule_clips

    est = BuildEstimate(videos=len(videos))
    for v in videos:
        info, reason = probe_for_plan(v)
        if info is not None:
            schedule = schedule_clips(info, clips)
            reason = schedule.error
            if schedule.starts:
                est.clips += len(schedule.starts)
                est.strides.append(schedule.stride)
                est.bytes += int(len(schedule.starts) * clips.num_frames * schedule.height * schedule.width
                                 * BYTES_PER_PIXEL)
        if reason:
            est.no_clip.append((str(v), reason))
    return est


def estimate_notes(est: BuildEstimate, clips: "ClipOptions") -> tuple[Check, list[str]]:
    """The doctor's `clips` row and its notes: one line with the estimate, one per video without a clip."""
    strides = sorted(set(est.strides))
    at = f" at stride {strides[0]}" if len(strides) == 1 else (f" at strides {strides[0]}-{strides[-1]}"
                                                                if strides else "")
    summary = (f"{_count(est.videos, 'video')} -> {_count(est.clips, 'clip')} of {clips.num_frames} frames{at}, "
               f"{clips.height}x{clips.width} (HxW), about {est.bytes / 1e9:.2f} GB")
    detail = f"{_count(est.clips, 'clip')} from {_count(est.videos, 'video')}"
    if est.no_clip:
        detail += f"; {_count(len(est.no_clip), 'video')} without a clip (why: the `no clip from` lines)"
    notes = [f"estimate: {summary}"] + [f"no clip from {video}: {reason}" for video, reason in est.no_clip]
    return Check("clips", est.clips > 0, detail), notes


def _count(n: int, noun: str) -> str:
    from fwdata.textout import plural

    return plural(n, noun)


def check_depth_model(name: str) -> Check:
    """Is the Depth Anything model available offline (local dir, or in the Hugging Face cache)?"""
    if name == "random-tiny":
        return Check("depth model", True, "random-tiny (randomly initialised: labels are not real)", required=False)
    p = Path(name)
    if p.exists():
        ok = (p / "config.json").is_file()
        return Check("depth model", ok, f"{p} " + ("(local)" if ok else "has no config.json"))
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, local_files_only=True)
        return Check("depth model", True, f"{name} (cached at {local})")
    except Exception:
        return Check("depth model", False,
                     f"{name} is not downloaded; run `hf download {name}` on a machine with "
                     "internet, or pass --depth-model with a local directory")


def collect(opts: DoctorOptions) -> list[Check]:
    checks = [Check("python", sys.version_info >= (3, 10), sys.version.split()[0])]
    checks += check_torch(opts.need_gpu)
    checks.append(check_disk(opts.path, opts.required_free_bytes))
    checks += check_packages()
    if opts.depth_model:
        checks.append(check_depth_model(opts.depth_model))
    checks += opts.extra_checks
    return checks


def run_doctor(opts: DoctorOptions, console: Optional[Console] = None) -> int:
    """Print the checks as a table and the problems one per line. Returns the exit code (0 or 1)."""
    console = console or Console()
    checks = collect(opts)
    table = Table(title=f"fw {opts.purpose} environment", show_lines=False)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in checks:
        status = "[green]ok[/]" if c.ok else ("[red]PROBLEM[/]" if c.required else "[yellow]warning[/]")
        table.add_row(c.name, status, c.detail)
    console.print(table)
    for note in opts.notes:
        console.print(note, highlight=False, soft_wrap=True)
    problems = [c for c in checks if not c.ok and c.required]
    for c in problems:  # one paragraph each, wrapped to the terminal, continuation lines indented
        console.print(paragraph(f"PROBLEM {c.name}: {c.detail}", console.width), highlight=False, soft_wrap=True,
                      markup=False)
    if not problems:
        console.print("all required checks passed")
    return 1 if problems else 0
