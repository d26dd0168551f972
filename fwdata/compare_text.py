"""The human table of `fwdata compare`, fitted to the terminal (80 columns is enough).

Two tables, one row per sample plus a `mean` row: cameras (frames compared, registered %, ATE %,
RPE degrees, Sim(3) scale, focal error %) and depth and points (AbsRel %, delta1 %, point error %).
Sample ids are shortened to unique prefixes (`fwdata.textout.short_ids`, accepted by `--sample`);
a column that does not fit is left out and named; notes follow the tables, one per sample.
`wide=True` prints every column of `fwdata.compare.COLUMNS` in one table with whole ids.
The json and csv formats are unchanged (whole ids, every column).
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.markup import escape

from fwdata.textout import fitted_table, short_ids

#: (column of compare_datasets, header) of the two fitted tables, most important first
CAMERA_COLUMNS = (("ate_pct", "ATE%"), ("focal_err_pct", "focal%"), ("rpe_rot_deg", "RPEdeg"), ("scale", "scale"),
                  ("registered_pct", "reg%"), ("frames", "frames"))
DEPTH_COLUMNS = (("depth_absrel_pct", "absrel%"), ("delta1_pct", "delta1%"), ("point_err_pct", "points%"))
LEGEND = ("ATE% trajectory error (% of the path extent), RPEdeg rotation error between frames, focal% focal "
          "error, reg% registered frames, absrel% depth AbsRel, delta1% depth within 1.25x, points% point-map error")


def number(v) -> str:
    """A short, readable number: at most about 6 characters, '-' for a missing value."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(v):
        return "-"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000 or a < 0.01:
        return f"{v:.0e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def print_compare(df, console: Console, wide: bool = False) -> None:
    """Print the comparison `df` (from `fwdata.compare.compare_datasets`) for a person."""
    import pandas as pd

    if wide:
        console = Console(width=10_000, file=console.file, color_system=console.color_system,
                          force_terminal=console.is_terminal)
        numeric = [c for c in df.columns if c not in ("sample", "truth", "note")]
        cols = [("sample", list(df["sample"]) + ["mean"]), ("truth", list(df["truth"]) + [""])]
        cols += [(c, [number(v) for v in df[c]] + [number(pd.to_numeric(df[c], errors="coerce").mean())])
                 for c in numeric]
        cols += [("note", [str(n or "") for n in df["note"]] + [""])]
        table, _ = fitted_table(cols, None)
        console.print(table)
        return
    ids = list(df["sample"])
    short = short_ids(ids)
    shown = [short[i] for i in ids] + ["mean"]
    left_out = []
    for title, spec in (("cameras", CAMERA_COLUMNS), ("depth and points", DEPTH_COLUMNS)):
        present = [(c, h) for c, h in spec if c in df and pd.to_numeric(df[c], errors="coerce").notna().any()]
        if not present:
            continue
        cols = [("sample", shown)]
        for c, h in present:
            values = pd.to_numeric(df[c], errors="coerce")
            cols.append((h, [number(v) for v in values] + [number(values.mean())]))
        table, out = fitted_table(cols, console.width, title=title, title_justify="left")
        console.print(table)
        left_out += out
    for sid, note in zip(ids, df["note"]):
        if note:
            console.print(f"{escape(short[sid])}: {escape(str(note))}", highlight=False)
    console.print(LEGEND, highlight=False, style="dim")
    notes = []
    if shown[:-1] != ids:
        notes.append("ids shortened to unique prefixes")
    if left_out:
        notes.append(f"not shown: {', '.join(left_out)}")
    console.print("; ".join(notes + ["--wide or --format csv shows every column"]), highlight=False)
