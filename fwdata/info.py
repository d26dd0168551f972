"""What `fwdata info` shows: a dataset's summary that fits the terminal, or its samples as JSON Lines.

Human output (`print_summary`): the header, the folders, one row per sample and the totals, fitted
to the console width (80 columns is enough). Sample ids are shortened to unique prefixes that
`--sample` accepts (`fwdata.textout.short_ids`); a column with the same value in every row is said
once above the table; quality columns that do not fit are left out and named. `wide=True` shows
whole ids and every column, however wide.

Machine output (`json_lines`): JSON Lines, one JSON object per sample per line (the columns of
`DatasetMetadata.to_frame`, missing values as null), nothing else: no blank line, no summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fwdata.textout import fitted_table, paragraph, plural, short_ids

#: quality columns shown when any sample has them: (metric, header in the fitted table)
QUALITY_COLUMNS = (("registered_ratio", "registered"), ("depth_sfm_absrel", "absrel"),
                   ("multiview_consistency", "multiview"), ("path_length", "path"))


def json_lines(meta) -> str:
    """One JSON object per sample, one per line (no trailing blank line; empty for no samples)."""
    records = json.loads(meta.to_frame().to_json(orient="records")) if meta.samples else []
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def print_summary(dataset: Path, meta, console: Console, wide: bool = False) -> None:
    from fwdata.dataset.layout import dataset_dirs

    df = meta.to_frame()
    if wide:  # nothing squeezed: the console is as wide as the widest line
        console = Console(width=10_000, file=console.file, color_system=console.color_system,
                          force_terminal=console.is_terminal)
    prov = meta.provenance
    console.print(f"[bold]{escape(str(dataset))}[/]", highlight=False)
    console.print(f"schema {meta.schema_version}, made by {prov.tool} {prov.tool_version} "
                  f"({escape(prov.command)})", highlight=False)
    console.print(", ".join(f"{d.name}/ {plural(sum(1 for _ in d.iterdir()) if d.is_dir() else 0, 'file')}"
                            for d in dataset_dirs(dataset)), highlight=False)
    if len(df):
        ids = list(df["id"])
        shown_ids = ids if wide else [short_ids(ids)[i] for i in ids]
        size = [f"{h}x{w}" for h, w in zip(df["H"], df["W"])]
        columns = [("id", shown_ids), ("split", list(df["split"])), ("status", list(df["status"])),
                   ("T", [_cell(v) for v in df["T"]]), ("HxW", size), ("fps", [_cell(v) for v in df["fps"]]),
                   ("scale", list(df["scale"]))]
        columns += [(name if wide else header, [_cell(v) for v in df[name]])
                    for name, header in QUALITY_COLUMNS if name in df and df[name].notna().any()]
        same = []
        if not wide and len(df) > 1:  # a column with one value in every row is said once
            keep = columns[:1]
            for header, cells in columns[1:]:
                if len(set(cells)) == 1:
                    same.append(f"{header}={cells[0]}")
                else:
                    keep.append((header, cells))
            columns = keep
        if same:
            console.print("every sample: " + ", ".join(same), highlight=False)
        table, left_out = fitted_table(columns, None if wide else console.width, required=1)
        console.print(table)
        notes = []
        if not wide and shown_ids != ids:
            notes.append("ids shortened to unique prefixes (accepted by --sample)")
        if left_out:
            notes.append(f"not shown: {', '.join(left_out)}")
        if notes:
            console.print("; ".join(notes) + "; --wide shows everything", highlight=False)
    st = meta.statistics
    console.print(f"{plural(st.num_samples, 'sample')} ({st.num_ok} ok, {st.num_gated_out} gated out), "
                  f"{plural(st.total_frames, 'frame')}, {st.duration_s:.1f} s of video; "
                  f"{plural(st.num_failed_inputs, 'failed input')}; splits: "
                  + (", ".join(f"{k}={len(v)}" for k, v in meta.splits.items()) or "none"), highlight=False)
    for f in meta.failures:  # one paragraph each; the width is the console's, or unlimited with --wide
        line = f"failed: {f.source} [{f.stage}] {f.reason}"
        console.print("  " + line if wide else paragraph(line, console.width, indent="    ", first="  "), markup=False,
                      highlight=False, soft_wrap=True)
