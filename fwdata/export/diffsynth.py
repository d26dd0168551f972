"""The metadata CSV that DiffSynth-Studio-based training scripts read (`--dataset_metadata_path`).

One row per sample, written with pandas to `OUT/metadata.csv`. DiffSynth's video datasets read the
columns `video` and `prompt` and resolve `video` against `--dataset_base_path`; pass `OUT` as the
base path. The other columns are our geometry files of the same sample and its dimensions; every
path is relative to the CSV's folder and points into the dataset in place (nothing is copied, so
keep the dataset and the export where they are, or export again after moving them).

Columns: video, prompt, depth, points, points_ply (empty when the sample has no .ply), camera_json,
camera_txt, id, split, num_frames, height, width, fps, scale.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from fwdata.dataset.contract import SampleRecord, resolve_inside
from fwdata.export.common import ExportError

CSV_NAME = "metadata.csv"
COLUMNS = ["video", "prompt", "depth", "points", "points_ply", "camera_json", "camera_txt", "id", "split",
           "num_frames", "height", "width", "fps", "scale"]


def read_captions(path: Optional[Path]) -> dict[str, str]:
    """`--captions` JSON {sample id: caption} (the same file `fwmodel cache --captions` reads)."""
    if path is None:
        return {}
    try:
        captions = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"--captions {path}: unreadable ({e}); it must be JSON {{sample id: text}}") from None
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise ExportError(f"--captions {path}: must be a JSON object {{sample id: text}}")
    return captions


def _rel(dataset: Path, rel: str, out: Path) -> str:
    return Path(os.path.relpath(resolve_inside(dataset, rel).absolute(), out.absolute())).as_posix()


def rows(dataset: Path, records: Sequence[SampleRecord], out: Path, prompt: str = "",
         captions: Optional[dict[str, str]] = None) -> list[dict]:
    """One CSV row per record; paths relative to `out`."""
    captions = captions or {}
    out_rows = []
    for r in records:
        ply = r.paths.points_ply
        has_ply = bool(ply) and resolve_inside(dataset, ply).is_file()
        out_rows.append({
            "video": _rel(dataset, r.paths.video, out),
            "prompt": captions.get(r.id, prompt),
            "depth": _rel(dataset, r.paths.depth, out),
            "points": _rel(dataset, r.paths.points, out),
            "points_ply": _rel(dataset, ply, out) if has_ply else "",
            "camera_json": _rel(dataset, r.paths.camera_json, out),
            "camera_txt": _rel(dataset, r.paths.camera_txt, out),
            "id": r.id, "split": r.split, "num_frames": r.num_frames, "height": r.height, "width": r.width,
            "fps": r.fps, "scale": r.scale,
        })
    return out_rows


def export(dataset: Path, records: Sequence[SampleRecord], out: Path, prompt: str = "",
           captions: Optional[dict[str, str]] = None) -> Path:
    """Write `out/metadata.csv`; returns its path."""
    import pandas as pd

    df = pd.DataFrame(rows(dataset, records, out, prompt, captions), columns=COLUMNS)
    path = out / CSV_NAME
    tmp = out / f".{CSV_NAME}.tmp-{os.getpid()}"
    df.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)
    return path
