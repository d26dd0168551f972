"""`fwdata export`: a dataset in the formats users already load (docs/EXPORT.md).

- colmap: a COLMAP model per sample (pycolmap), with the frames as images (fwdata.export.colmap)
- nerfstudio: transforms.json per sample with frames, depth images and a sparse cloud (fwdata.export.nerfstudio)
- diffsynth: the metadata.csv of DiffSynth-Studio training scripts (fwdata.export.diffsynth)

Exports only read the dataset; the same dataset gives the same output bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from fwdata.export.common import DEFAULT_MAX_POINTS, IMAGE_FORMATS, ExportError, check_out, open_dataset, select_samples

FORMATS = ("colmap", "nerfstudio", "diffsynth")

__all__ = ["FORMATS", "ExportError", "ExportResult", "export_dataset"]


@dataclass
class ExportResult:
    """What an export wrote: one path per sample (a folder; for diffsynth the one CSV), and the
    samples left out because they are gated out (only when no --sample was given)."""

    format: str
    out: Path
    written: list[Path] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    skipped_gated_out: list[str] = field(default_factory=list)


def export_dataset(dataset: Union[str, Path], fmt: str, out: Union[str, Path], samples: Optional[Sequence[str]] = None,
                   image_format: str = "png", max_points: int = DEFAULT_MAX_POINTS, text: bool = False,
                   prompt: str = "", captions: Optional[Path] = None,
                   progress: Optional[Callable[[str, int, int], None]] = None) -> ExportResult:
    """Export `dataset` as `fmt` into the folder `out`.

    Every `ok` sample, or the samples named in `samples` (whatever their status). ExportError for
    usage errors (unknown format or image format, not a dataset, unknown sample, `out` a file or
    inside the dataset); ContractError / VideoError when a sample's files cannot be read.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    if image_format not in IMAGE_FORMATS:
        raise ExportError(f"--image-format {image_format!r}: choose png or jpg")
    if max_points < 0:
        raise ExportError(f"--max-points {max_points}: must be 0 or more")
    if fmt != "diffsynth" and (prompt or captions is not None):
        raise ExportError("--prompt and --captions apply to --format diffsynth only")
    if fmt != "colmap" and text:
        raise ExportError("--text applies to --format colmap only")
    dataset = Path(dataset)
    meta = open_dataset(dataset)
    records = select_samples(meta, dataset, samples)
    skipped = [] if samples else [s.id for s in meta.samples if s.status != "ok"]
    if fmt == "diffsynth":
        from fwdata.export import diffsynth

        caption_map = diffsynth.read_captions(captions)
        out = check_out(out, dataset)
        path = diffsynth.export(dataset, records, out, prompt=prompt, captions=caption_map)
        return ExportResult(fmt, out, [path], [r.id for r in records], skipped)
    out = check_out(out, dataset)
    result = ExportResult(fmt, out, [], [], skipped)
    for n, record in enumerate(records, 1):
        if progress is not None:
            progress(record.id, n, len(records))
        if fmt == "colmap":
            from fwdata.export import colmap

            path = colmap.export_sample(dataset, record, out, image_format, max_points, text=text)
        else:
            from fwdata.export import nerfstudio

            path = nerfstudio.export_sample(dataset, record, out, image_format, max_points)
        result.written.append(path)
        result.samples.append(record.id)
    return result
